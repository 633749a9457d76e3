# Constants shared by the parser and the proxy core.

cdef enum:
    MAX_FIELDS_CAP = 1024        # hard cap on fields per head, whatever the config says
    MAX_CONN_TOKENS = 64
    SEND_PARTS_MAX = 15          # buffers one ClientConn._send_parts writes in one writev

# Body framing, as exported to Python (BODY_*).
cdef enum BodyKind:
    B_NONE = 0
    B_LENGTH = 1
    B_CHUNKED = 2
    B_CLOSE = 3

# Field names the core acts on; everything else is H_OTHER.
cdef enum HeaderId:
    H_OTHER = 0
    H_HOST
    H_CONTENT_LENGTH
    H_TRANSFER_ENCODING
    H_CONNECTION
    H_KEEP_ALIVE
    H_TE
    H_TRAILER
    H_UPGRADE
    H_PROXY_CONNECTION
    H_EXPECT
    H_X_FORWARDED_FOR
    H_X_FORWARDED_PROTO
    H_X_FORWARDED_HOST
    H_FORWARDED
    H_SERVER
    H_X_POWERED_BY
    H_X_ASPNET_VERSION
    H_X_ASPNETMVC_VERSION
    H_X_RUNTIME
    H_DATE

# Chunked framing scanner states.
cdef enum ChunkPhase:
    CS_SIZE = 0
    CS_SIZE_WS
    CS_EXT
    CS_SIZE_LF
    CS_DATA
    CS_DATA_CR
    CS_DATA_LF
    CS_TR_START
    CS_TR_NAME
    CS_TR_VALUE
    CS_TR_LINE_LF
    CS_TR_END_LF
    CS_DONE
    CS_ERROR
