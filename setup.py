"""Build of edgeproxy's compiled half (ext/) into the edgeproxy package.

EDGEPROXY_DEBUG=1 builds with Cython line tracing, annotations (ext/*.html)
and the EDGEPROXY_DEBUG macro; release builds use -O2 and -Wall.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("EDGEPROXY_DEBUG") == "1"

directives = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "embedsignature": True,
}
macros = []
cflags = ["-O2", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
if DEBUG:
    directives.update(linetrace=True, profile=True)
    macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1"), ("EDGEPROXY_DEBUG", "1")]
    cflags = ["-O0", "-g", "-Wall"]

extensions = [
    Extension(
        "edgeproxy._ext",
        ["ext/_ext.pyx"],
        include_dirs=["ext"],
        define_macros=macros,
        extra_compile_args=cflags,
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        compiler_directives=directives,
        annotate=DEBUG,
    ),
)
