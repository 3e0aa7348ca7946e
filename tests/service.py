"""A running neurondb service for tests: real `neurondb start` / `stop` commands, real processes.

Each harness has its own data directory; it talks to the session's PostgreSQL through a fresh database
(`--dsn`), or runs the embedded server when no DSN is given. `close()` leaves no process or shared memory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import psycopg

from neurondb.paths import DataDir
from neurondb.shm import names
from neurondb.status import Status, pid_alive, read_status
from neurondb.supervisor import read_pid

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
FAST_SETTINGS = {
    "neurondb.neuranq_naptime": "200ms",
    "neurondb.neuranmon_naptime": "1s",
    "neurondb.neurandefrag_naptime": "1s",
    "neurondb.neuranllm_naptime": "200ms",
    "neurondb.worker_restart_interval": "100ms",
    "neurondb.metrics_port": "0",   # a free port: services of tests running at once never collide
}


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02,
             fail: Callable[[str], Exception] = AssertionError) -> T:
    """Poll until `predicate()` is truthy; after `timeout` seconds raise `fail(message)` naming `what` (an
    AssertionError fails the test; the benchmarks' harness passes its own error, see scripts/benchlib.py)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class Service:
    def __init__(self, root: Path, dsn: str | None, settings: dict[str, str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.datadir = DataDir(root)
        self.dsn = dsn
        # The repository on the path: tests load their own job types (tests.jobtypes) into the workers.
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.env.pop("NEURONDB_DSN", None)
        self.datadir.init()
        self.write_settings({**FAST_SETTINGS, **(settings or {})})
        self.prefix = names.instance_prefix(self.datadir.root)

    def write_settings(self, settings: dict[str, str]) -> None:
        lines = [f"{name} = '{value}'" for name, value in settings.items()]
        self.datadir.conf.write_text("\n".join(lines) + "\n")

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "neurondb", *args, "-D", str(self.datadir.root)]
        if self.dsn:
            cmd += ["--dsn", self.dsn]
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}\n"
                                 f"{self.log_tail()}")
        return result

    def start(self) -> Status:
        self.cli("start")
        return self.wait_healthy()

    def status(self) -> Status:
        return read_status(self.datadir, with_database=False)

    def wait_healthy(self, timeout: float = 3.0) -> Status:
        """All workers have a pid and a heartbeat younger than a second."""
        def healthy() -> Status | None:
            s = self.status()
            ok = s.running and s.workers and all(
                w.pid and w.state in ("idle", "running") and (w.heartbeat_age_s or 99) < 1.0 for w in s.workers)
            return s if ok else None
        return wait_for(healthy, timeout, "every worker to heartbeat")

    def worker(self, name: str) -> object:
        return next(w for w in self.status().workers if w.name == name)

    @property
    def supervisor_pid(self) -> int:
        return read_pid(self.datadir.pid_file)

    def shm_objects(self) -> list[str]:
        return names.list_objects(self.prefix)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.datadir.log_file.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def close(self) -> None:
        """Stop whatever still runs, whatever state the test left it in."""
        pid = self.supervisor_pid
        if pid_alive(pid):
            self.cli("stop", "-m", "immediate", check=False, timeout=30)
        for w in self.status().workers if pid_alive(pid) else []:
            if w.pid:
                os.kill(w.pid, signal.SIGKILL)
        names.unlink_all(self.prefix)


@contextmanager
def running_service(root: Path, dsn: str | None, settings: dict[str, str] | None = None,
                    env: dict[str, str] | None = None) -> Iterator[Service]:
    """A started `Service` in data directory `root`, closed on the way out whatever the test left it in (also
    when it did not start: whatever it started is stopped)."""
    svc = Service(root, dsn, settings, env)
    try:
        svc.start()
        yield svc
    finally:
        svc.close()


@contextmanager
def index_connection(dsn: str, dim: int) -> Iterator[psycopg.Connection]:
    """An autocommit connection to `dsn`, where the l2 index 'docs' of `dim` dimensions has been created."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT neurondb.create_index('docs', %s, 'l2')", (dim,))
        yield conn
