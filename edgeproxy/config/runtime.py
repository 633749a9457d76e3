"""Where the proxy keeps its run-time files when the configuration does not say: pid file, reload result, state file.

One rule for every process, so that `edgeproxy run` and a later
`edgeproxy reload` or `edgeproxy status` (from another shell, without the
service's private /tmp) agree: `$EDGEPROXY_RUNTIME_DIR` when set, else
/run/edgeproxy when that directory exists (systemd creates it for the unit's
`RuntimeDirectory=edgeproxy`, docs/edgeproxy.service), else the temp directory.
"""
from __future__ import annotations

import os
import tempfile

__all__ = ["RUNTIME_DIR_ENV", "SYSTEM_RUNTIME_DIR", "runtime_dir"]

SYSTEM_RUNTIME_DIR = "/run/edgeproxy"
RUNTIME_DIR_ENV = "EDGEPROXY_RUNTIME_DIR"


def runtime_dir() -> str:
    """The directory default pid and state files go in (see the module docstring)."""
    explicit = os.environ.get(RUNTIME_DIR_ENV)
    if explicit:
        return explicit
    if os.path.isdir(SYSTEM_RUNTIME_DIR):
        return SYSTEM_RUNTIME_DIR
    return tempfile.gettempdir()
