"""The metrics endpoint's own process: neuranmon starts it, restarts it when it dies, and takes it down with it.

Why a process and not a thread of neuranmon: on a saturated machine a scrape waited behind everything else.
In a thread it shared neuranmon's GIL with the tuner, and it shared neuranmon's CPU share with every worker,
because Linux's scheduler (CFS with autogroups) first divides CPU between sessions, and every worker is in
the supervisor's session. Served from a thread, scrapes under heavy load took up to 113-153 ms, against a
median of 35 ms. A process of its own, in a session of its own, has its own GIL and its own CPU share, and
it only wakes up when a scrape comes.

How it runs:
- neuranmon spawns `python -m neurondb.observability.process`, a fresh interpreter, so none of neuranmon's
  threads, locks or connections are inherited.
- It passes the process's parameters as JSON on stdin. The DSN is a secret, so it never goes in argv or
  the environment, where `ps` and /proc would show it.
- The child asks the kernel to SIGKILL it when neuranmon dies (PR_SET_PDEATHSIG). A SIGKILLed neuranmon
  therefore leaves no endpoint behind: its successor starts a new one.
- The child publishes the port it bound (PORT_GAUGE) in neuranmon's slot.
- It exits on SIGTERM and reopens its log file on SIGUSR1, as the workers do.
- neuranmon's `ensure()`, called every batch, restarts a child that exited after RESTART_DELAY seconds,
  doubled for each further child that exits within STABLE_AFTER seconds of its start, up to
  MAX_RESTART_DELAY. So a child that cannot start is retried ever more rarely, not every second (a port it
  cannot bind is not such a case: the child keeps running and retries the bind). It also restarts the
  child when its parameters change after a reload.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
import setproctitle

from neurondb import log as logsetup
from neurondb.observability.families import PORT_GAUGE
from neurondb.observability.server import MetricsEndpoint
from neurondb.shm.control import SharedState

RESTART_DELAY = 1.0           # seconds between a child's exit and its successor (after a child that ran)
MAX_RESTART_DELAY = 60.0      # ... at most, after children that exited one after the other at once
STABLE_AFTER = 30.0           # a child that ran this long resets the delay to RESTART_DELAY
STOP_TIMEOUT = 5.0            # seconds a child gets to exit after SIGTERM before it is killed
PR_SET_PDEATHSIG = 1
log = logging.getLogger("neurondb.metrics")


@dataclass(frozen=True)
class Params:
    """Everything the child needs; a change (after a reload) restarts it."""

    name: str                 # the process name in log lines: "<neuranmon's name>-metrics"
    parent: int               # neuranmon's pid: the child exits at once if it is not its parent
    prefix: str               # the shared memory's prefix
    slot: int                 # neuranmon's slot, where the bound port is published
    dsn: str
    address: str
    port: int
    heartbeat_timeout_s: float
    log_file: str


class MetricsProcess:
    """neuranmon's handle on the endpoint's process."""

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        self._proc: subprocess.Popen[bytes] | None = None
        self._params: Params | None = None
        self._next_start = 0.0
        self._started = 0.0
        self._delay = RESTART_DELAY

    def ensure(self, params: Params) -> None:
        """Keep one child running with `params` (none when the address is ''); cheap when all is well."""
        if self._proc is not None and self._proc.poll() is not None:
            now = time.monotonic()
            if now - self._started >= STABLE_AFTER:
                self._delay = RESTART_DELAY
            log.warning("metrics process %d exited with status %s after %.1f s; restarting it in %.0f s",
                        self._proc.pid, self._proc.returncode, now - self._started, self._delay)
            self._reaped(now + self._delay)
            self._delay = min(self._delay * 2, MAX_RESTART_DELAY)
        if self._proc is not None and params != self._params:
            self.stop()
        if self._proc is None and params.address and time.monotonic() >= self._next_start:
            self._spawn(params)

    def reopen_log(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        """SIGTERM the child and reap it (SIGKILL after STOP_TIMEOUT)."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("metrics process %d did not stop in %.0f s; killing it", self._proc.pid, STOP_TIMEOUT)
            self._proc.kill()
            self._proc.wait()
        self._reaped(0.0)

    def _spawn(self, params: Params) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "neurondb.observability.process"],
                                      stdin=subprocess.PIPE, start_new_session=True)
        assert self._proc.stdin is not None
        self._proc.stdin.write(orjson.dumps(asdict(params)))    # a few hundred bytes: the pipe never blocks
        self._proc.stdin.close()
        self._params = params
        self._started = time.monotonic()

    def _reaped(self, next_start: float) -> None:
        if self._params is not None:      # it may have died before it could clear the port
            self.shared.slot(self._params.slot)["gauges"][PORT_GAUGE] = 0
        self._proc, self._params, self._next_start = None, None, next_start


def _die_with_parent(parent: int) -> None:
    """Ask for SIGKILL when the parent dies; exit now if it already has (we were re-parented)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(0)


def main() -> int:
    """The child: serve until SIGTERM."""
    params = Params(**orjson.loads(sys.stdin.buffer.read()))
    _die_with_parent(params.parent)
    setproctitle.setproctitle(f"neurondb: {params.name}")
    logsetup.setup(params.name, Path(params.log_file) if params.log_file else None, stderr=not params.log_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)              # the supervisor decides when we stop
    signal.signal(signal.SIGUSR1, lambda *_: logsetup.reopen())
    shared = SharedState.attach(params.prefix)
    endpoint = MetricsEndpoint(shared, params.slot, params.dsn, params.address, params.port,
                               params.heartbeat_timeout_s)
    endpoint.start()
    while not stop.wait(1.0):
        endpoint.ensure()           # retries a port it could not bind
    endpoint.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
