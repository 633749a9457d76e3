"""The shared HTTP cache: RFC 9111 rules (`policy`) over one LMDB file all workers use (`store`)."""
from edgeproxy.cache.entry import CacheEntry
from edgeproxy.cache.store import CacheError, CacheStore, CacheWriter, StoredLookup

__all__ = ["CacheEntry", "CacheError", "CacheStore", "CacheWriter", "StoredLookup"]
