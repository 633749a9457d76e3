"""The client's real address: the PROXY protocol's pure-Python twin (the
compiled parser is ext/proxyproto.pyx) and the trusted-proxy settings the
core gets (ext/clientaddr.pyx)."""

from edgeproxy.clientaddr.proxyproto import ProxyProtocolError, header, parse

__all__ = ["ProxyProtocolError", "header", "parse"]
