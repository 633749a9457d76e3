"""The built-in demo: an origin server for `edgeproxy demo` and for the tests."""
from edgeproxy.demo.origin import OriginServer, OriginThread, big_body, start_origin

__all__ = ["OriginServer", "OriginThread", "big_body", "start_origin"]
