"""The key-exchange groups a TLS context offers: X25519, P-256 and P-384 (Mozilla's "intermediate" set), set through OpenSSL's SSL_CTX_set1_groups_list.

Python's ssl module can name only one curve (`set_ecdh_curve`), and OpenSSL's
default list also offers X448 and P-521, which TLS scanners flag against the
intermediate profile. So the list goes to OpenSSL directly, with ctypes, on
the SSL_CTX the ssl module owns: the function comes from the libssl that
`_ssl` itself is linked to, and the SSL_CTX pointer read from the context
object is trusted only when OpenSSL reports the same options for it as the
ssl module does. Where that cannot be done, OpenSSL's defaults stay and one
warning says so.
"""
from __future__ import annotations

import ctypes
import logging
import ssl

__all__ = ["GROUPS", "restrict_groups"]

log = logging.getLogger("edgeproxy.tls")

GROUPS = "X25519:P-256:P-384"
_SSL_CTRL_SET_GROUPS_LIST = 92      # SSL_CTX_set1_groups_list is this SSL_CTX_ctrl


class _OpenSSL:
    def __init__(self) -> None:
        import _ssl
        lib = ctypes.CDLL(_ssl.__file__)      # dlsym looks in its libssl too
        self.ctrl = lib.SSL_CTX_ctrl
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
        self.ctrl.restype = ctypes.c_long
        self.get_options = lib.SSL_CTX_get_options
        self.get_options.argtypes = [ctypes.c_void_p]
        self.get_options.restype = ctypes.c_uint64


_lib: _OpenSSL | None = None
_warned = False


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: _OpenSSL) -> int | None:
    # The C struct behind ssl.SSLContext starts with its object header, then
    # the SSL_CTX pointer (CPython's Modules/_ssl.c, PySSLContext).
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or lib.get_options(ptr) != int(ctx.options):
        return None
    return ptr


def restrict_groups(ctx: ssl.SSLContext, groups: str = GROUPS) -> bool:
    """Offer only `groups` on ctx; False (and one warning per process) when
    this Python's ssl module does not let us, and ctx keeps OpenSSL's list."""
    global _lib, _warned
    try:
        if _lib is None:
            _lib = _OpenSSL()
        ptr = _ssl_ctx_pointer(ctx, _lib)
        if ptr is not None and _lib.ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0,
                                         groups.encode("ascii")) == 1:
            return True
        reason = "the SSL context was not recognised" if ptr is None else "OpenSSL refused it"
    except (OSError, AttributeError, ImportError) as exc:
        reason = str(exc)
    if not _warned:
        _warned = True
        log.warning("TLS: cannot limit key exchange to %s (%s); OpenSSL's default groups "
                    "stay on offer", groups, reason)
    return False
