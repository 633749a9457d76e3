"""Backend health: the active prober, the memory it shares with the workers,
and the state file `edgeproxy status` reads.

- `board`: the shared-memory region (created before the workers fork) that
  carries each backend's up/down verdict to every worker and each worker's
  counters back.
- `probe`: one HTTP health probe of one backend.
- `checker`: probes every backend of every pool on its interval and applies
  the rise/fall thresholds.
- `status`: writes and reads the JSON state file, and formats it.
"""
from edgeproxy.health.board import HealthBoard
from edgeproxy.health.checker import HealthChecker
from edgeproxy.health.status import StateWriter, format_status, read_state, state_path

__all__ = ["HealthBoard", "HealthChecker", "StateWriter", "format_status", "read_state",
           "state_path"]
