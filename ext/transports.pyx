# The map uvloop keeps of its transports by file descriptor, in C.
#
# uvloop's Loop records every transport it creates in `Loop._transports`, a
# weakref.WeakValueDictionary keyed by fd (it only looks there to refuse
# add_reader/add_writer on an fd a live transport owns).  That dictionary's
# __setitem__ is Python code that builds a KeyedRef: with a new connection
# per request it was ~5% of the worker's CPU (py-spy).  uvloop takes the
# class once, when its module is imported; edgeproxy.server.loop hands it
# this one instead, which keeps the same two operations (set, get; a
# dead or absent fd is a KeyError) on a dict of plain weak references.

from cpython.weakref cimport PyWeakref_NewRef, PyWeakref_GetObject
from cpython.ref cimport PyObject


@cython.final
cdef class TransportsByFd:
    """fd -> transport, holding the transports weakly (the subset of
    weakref.WeakValueDictionary that uvloop uses, plus get, len and del).
    Entries of dead transports stay until their fd is reused or looked up:
    at most one per descriptor number."""
    cdef dict refs

    def __cinit__(self):
        self.refs = {}

    def __setitem__(self, key, value):
        self.refs[key] = PyWeakref_NewRef(value, None)

    def __getitem__(self, key):
        cdef PyObject *obj = PyWeakref_GetObject(self.refs[key])
        if obj == <PyObject *>None:
            del self.refs[key]
            raise KeyError(key)
        return <object>obj

    def __delitem__(self, key):
        del self.refs[key]

    def __contains__(self, key):
        r = self.refs.get(key)
        return r is not None and PyWeakref_GetObject(r) != <PyObject *>None

    def __len__(self):
        return sum([1 for r in self.refs.values() if PyWeakref_GetObject(r) != <PyObject *>None])

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default
