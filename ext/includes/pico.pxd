# The C API of picohttpparser, as compiled into the pycohttpparser package.
# Declarations only: the functions are reached through pointers taken from
# pycohttpparser's cffi `lib` at import time (see parser.pyx).

cdef extern from *:
    """
    #include <stddef.h>
    struct phr_header {
        const char *name;
        size_t name_len;
        const char *value;
        size_t value_len;
    };
    typedef int (*phr_parse_request_t)(const char *buf, size_t len,
        const char **method, size_t *method_len, const char **path,
        size_t *path_len, int *minor_version, struct phr_header *headers,
        size_t *num_headers, size_t last_len);
    typedef int (*phr_parse_response_t)(const char *buf, size_t len,
        int *minor_version, int *status, const char **msg, size_t *msg_len,
        struct phr_header *headers, size_t *num_headers, size_t last_len);
    typedef int (*phr_parse_headers_t)(const char *buf, size_t len,
        struct phr_header *headers, size_t *num_headers, size_t last_len);
    """
    struct phr_header:
        const char *name
        size_t name_len
        const char *value
        size_t value_len

    ctypedef int (*phr_parse_request_t)(const char *buf, size_t len,
        const char **method, size_t *method_len, const char **path,
        size_t *path_len, int *minor_version, phr_header *headers,
        size_t *num_headers, size_t last_len) noexcept nogil

    ctypedef int (*phr_parse_response_t)(const char *buf, size_t len,
        int *minor_version, int *status, const char **msg, size_t *msg_len,
        phr_header *headers, size_t *num_headers, size_t last_len) noexcept nogil

    ctypedef int (*phr_parse_headers_t)(const char *buf, size_t len,
        phr_header *headers, size_t *num_headers, size_t last_len) noexcept nogil
