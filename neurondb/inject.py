"""Injection points, after PostgreSQL's (src/backend/utils/misc/injection_point.c): named places in the code
where a test can make a process crash, stall or stop heartbeating, so crash-safety tests hit the awkward
moment deterministically instead of by luck.

Points are armed only through the environment of the process that starts the service:
`NEURONDB_INJECTION_POINTS="neuranq:start=crash,neuranmon:batch=hang"`, each `WORKER:POINT=ACTION`
where ACTION is `crash` (exit 1), `kill` (SIGKILL itself), `sleep:SECONDS`, `hang` (sleep forever without
heartbeats), `error` (raise InjectedError, as a bug or an unexpected failure there would), or
`hold:LOCK:SECONDS` (take the named shared-memory lock and stall inside it, as a worker dying
mid-critical-section would). `*` as WORKER matches every worker. Unset, every call is a dictionary
lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

ENV = "NEURONDB_INJECTION_POINTS"


def _parse(spec: str) -> dict[tuple[str, str], str]:
    points = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, action = item.partition("=")
        worker, _, point = where.partition(":")
        if not (worker and point and action):
            raise ValueError(f"{ENV}: bad item {item!r}, expected WORKER:POINT=ACTION")
        points[(worker, point)] = action
    return points


class InjectedError(RuntimeError):
    """Raised by the `error` action."""


_POINTS = _parse(os.environ.get(ENV, ""))
_process = ""   # the worker kind of this process, set once at worker start
_lock: Callable[[str], AbstractContextManager[object]] | None = None


def set_process(kind: str, lock: Callable[[str], AbstractContextManager[object]] | None = None) -> None:
    """Name this process (a worker kind) so points armed for it fire here and nowhere else; `lock` gives
    the shared-memory locks for the `hold` action."""
    global _process, _lock
    _process, _lock = kind, lock


def point(name: str) -> None:
    """Run the action armed for this process at `name`, if any."""
    if not _POINTS or not _process:
        return
    action = _POINTS.get((_process, name)) or _POINTS.get(("*", name))
    if action is None:
        return
    if action == "crash":
        os._exit(1)
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "error":
        raise InjectedError(f"injected failure at {_process}:{name}")
    elif action == "hang":
        while True:
            time.sleep(3600)
    elif action.startswith("sleep:"):
        time.sleep(float(action.removeprefix("sleep:")))
    elif action.startswith("hold:") and _lock is not None:
        lock_name, _, seconds = action.removeprefix("hold:").partition(":")
        with _lock(lock_name):
            time.sleep(float(seconds or 3600))
    else:
        raise ValueError(f"{ENV}: unknown action {action!r} at {_process}:{name}")
