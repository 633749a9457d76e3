# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# The compiled half of edgeproxy: one extension module built from the
# files it includes (parser, routing path, chunked framing, proxy core).

from libc.stdint cimport uintptr_t
from libc.string cimport memcmp

include "consts.pxi"
from includes.pico cimport phr_header, phr_parse_headers_t

include "parser.pyx"
include "normalize.pyx"
include "chunked.pyx"
include "balance.pyx"
include "hotcache.pyx"
include "transports.pyx"
include "worker.pyx"
include "proxyproto.pyx"
include "clientaddr.pyx"
include "route.pyx"
include "backend.pyx"
include "heads.pyx"
include "client.pyx"
include "upstream.pyx"
include "phases.pyx"
include "cachephase.pyx"
include "toolkit.pyx"
include "static.pyx"
include "compress.pyx"
include "limits.pyx"
include "tlsserver.pyx"
