"""The lifecycle every worker shares, after PostgreSQL's background workers (see the document, Architecture).

initialise (process title, logging, signal handlers, own shared-memory slot, DB connection), then loop:
run one batch -> update heartbeat and counters in the slot -> check the SIGTERM/SIGHUP flags -> wait on the
latch for at most the naptime. The latch is set by the supervisor, by a NOTIFY on the worker's channels
(a listener thread), and by our own signal handlers, so a worker never sleeps through work or a signal.

Signals, as in PostgreSQL: SIGTERM = finish the current batch then exit 0 (smart); SIGINT = abort the
batch, handing its jobs back, then exit 0 (fast); SIGQUIT = exit at once (immediate); SIGHUP = re-read the
settings at the next safe point; SIGUSR1 = reopen the log file (`neurondb logrotate`) at the next safe
point. Handlers only set flags and the latch: all work happens in the loop.

A worker exits (status 1, after handing back what it holds, as a fast shutdown does) when the supervisor
dies: it holds the read end of a pipe whose write end only the supervisor has, so the pipe turns readable
(EOF) the moment the supervisor is gone.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import ClassVar

import psycopg
import setproctitle

from neurondb import db, inject
from neurondb import log as logsetup
from neurondb.observability.recorder import Recorder
from neurondb.paths import DataDir
from neurondb.settings import Config, ReloadResult
from neurondb.shm.control import SharedState, heartbeat
from neurondb.shm.latch import Latch

# Longest uninterrupted sleep: bounds heartbeat staleness and how late a supervisor death is noticed.
SLICE = 0.5
RECONNECT_MIN, RECONNECT_MAX = 0.2, 10.0


@dataclass
class WorkerContext:
    """What the supervisor hands a worker at fork."""

    kind: str          # "neuranq", "neuranmon", "neurandefrag", "neuranllm"
    name: str          # unique per process: "neuranq", "neuranq-2", ...
    slot: int
    datadir: DataDir
    dsn: str
    config: Config
    shared: SharedState
    latch: Latch
    death_fd: int      # read end of the supervisor's life pipe


@dataclass
class BatchResult:
    processed: int = 0
    failed: int = 0
    retried: int = 0
    more: bool = False          # work is still waiting: run the next batch at once, no naptime
    latency_ms: float = 0.0     # summed over the batch's items


class DatabaseUnavailable(Exception):
    """The server went away; the loop reconnects with backoff instead of crashing the worker."""


class Worker:
    """Base class; subclasses set `kind` and `listen_channels` and implement `run_batch`."""

    kind: ClassVar[str]
    listen_channels: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.log = logging.getLogger(f"neurondb.{ctx.name}")
        self.slot = ctx.shared.slot(ctx.slot)
        self.shutdown: str | None = None      # None, "smart" or "fast"
        self.reload_requested = False
        self.reopen_log_requested = False
        self.orphaned = False                 # the supervisor died: stopping on our own
        self._conn: psycopg.Connection | None = None
        self._db_down = False
        self._reconnect_delay = RECONNECT_MIN
        self._listener: threading.Thread | None = None
        # Counters for the metrics endpoint, in shared memory (they outlive this process), under our name.
        self.metrics = Recorder.attach(ctx.shared, ctx.name)

    # -- settings -------------------------------------------------------------------------------------

    @property
    def naptime(self) -> float:
        return self.config.get_seconds(f"{self.kind}_naptime")

    @property
    def enabled(self) -> bool:
        return self.config.get_bool(f"{self.kind}_enabled")

    # -- hooks for subclasses -------------------------------------------------------------------------

    def on_start(self) -> None:
        """Runs once after initialisation; raising here is a crash at start (the supervisor backs off)."""

    def run_batch(self) -> BatchResult:
        """Do one batch of work. Raise DatabaseUnavailable (or let psycopg.OperationalError through)
        when the server is gone; the loop reconnects."""
        return BatchResult()

    def on_reload(self, result: ReloadResult) -> None:
        """Settings changed; `self.config` already holds the new values."""

    def on_log_reopened(self) -> None:
        """This process reopened its log file (SIGUSR1); pass it on to any process of the worker's own."""

    def on_stop(self) -> None:
        """Last call before a deliberate exit (smart or fast): hand back anything still claimed."""

    def idle_nap(self) -> float:
        """Seconds to sleep when a batch found nothing to do: the naptime, unless the worker knows work
        becomes due sooner (a retry's backoff, a rate-limit token)."""
        return self.naptime

    def should_abort(self) -> bool:
        """True once a fast shutdown was requested or the supervisor is gone (it holds the data directory
        lock through us until we exit): batches stop between items and hand the rest back."""
        return self.shutdown == "fast" or self._supervisor_gone()

    # -- database -------------------------------------------------------------------------------------

    @property
    def conn(self) -> psycopg.Connection:
        """The worker's connection, opened on first use; raises DatabaseUnavailable while the server is down."""
        if self._conn is None or self._conn.closed:
            try:
                self._conn = db.connect(self.ctx.dsn, self.ctx.name)
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailable(str(exc).strip()) from exc
        return self._conn

    def _drop_connection(self) -> None:
        db.close_quietly(self._conn)
        self._conn = None

    def _listen_forever(self) -> None:
        """Listener thread: LISTEN on our channels and set the latch on every notification."""
        delay = RECONNECT_MIN
        while self.shutdown is None:
            try:
                with db.connect(self.ctx.dsn, f"{self.ctx.name} listener") as conn:
                    for channel in self.listen_channels:
                        conn.execute(f'LISTEN "{channel}"')
                    delay = RECONNECT_MIN
                    self.ctx.latch.set()   # notifications may have been missed while disconnected
                    while self.shutdown is None:
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self.ctx.latch.set()
            except psycopg.Error as exc:
                self.log.debug("listener disconnected: %s", exc)
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)

    # -- the process ----------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        def on_term(signum: int, frame: object) -> None:
            self.shutdown = self.shutdown or "smart"
            self.ctx.latch.set()

        def on_int(signum: int, frame: object) -> None:
            self.shutdown = "fast"
            self.ctx.latch.set()

        def on_hup(signum: int, frame: object) -> None:
            self.reload_requested = True
            self.ctx.latch.set()

        def on_usr1(signum: int, frame: object) -> None:
            self.reopen_log_requested = True
            self.ctx.latch.set()

        signal.signal(signal.SIGUSR1, on_usr1)
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_int)
        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGQUIT, lambda signum, frame: os._exit(2))
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _set_state(self, state: str) -> None:
        self.ctx.shared.set_state(self.ctx.slot, state)

    def _beat(self) -> None:
        heartbeat(self.slot)

    def _supervisor_gone(self) -> bool:
        readable, _, _ = select.select([self.ctx.death_fd], [], [], 0)
        return bool(readable)

    def _nap(self, seconds: float) -> None:
        """Sleep on the latch up to `seconds`, heartbeating every slice; return early when woken."""
        deadline = time.monotonic() + seconds
        while self.shutdown is None and not self.reload_requested:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.ctx.latch.wait(min(remaining, SLICE)):
                return
            self._beat()
            if self._supervisor_gone():
                return

    def _reload(self) -> None:
        """Re-read the settings, then announce the generation last: whoever sees it may rely on the new
        values being in force (read before the files, so a later reload is never announced early)."""
        self.reload_requested = False
        generation = int(self.ctx.shared.control["config_generation"])
        result = self.config.reload()     # the supervisor logs each change once, with secrets in URLs masked
        self._publish_settings()
        self.on_reload(result)
        self.slot["config_generation_seen"] = generation

    def _publish_settings(self) -> None:
        self.slot["naptime_ms"] = int(self.naptime * 1000)
        self.slot["enabled"] = self.enabled

    def _record(self, result: BatchResult) -> None:
        self.slot["jobs_processed"] += result.processed
        self.slot["jobs_failed"] += result.failed
        self.slot["jobs_retried"] += result.retried
        self.slot["latency_sum_ms"] += result.latency_ms
        self.slot["batches"] += 1
        self.slot["last_batch_at"] = time.time()

    def _record_error(self, message: str) -> None:
        self.ctx.shared.set_last_error(self.ctx.slot, message)

    def main(self) -> int:
        """The process body; returns the exit status (0 = deliberate stop, not restarted)."""
        setproctitle.setproctitle(f"neurondb: {self.ctx.name} worker")
        self._install_signals()   # first: a SIGUSR1 from now on reopens the log file opened below
        logsetup.setup(self.ctx.name, self.ctx.datadir.log_file, stderr=False,
                       level=logging.getLogger().level or logging.INFO)
        self.slot["pid"] = os.getpid()
        self.slot["started_at"] = time.time()
        self._publish_settings()
        self.slot["config_generation_seen"] = self.ctx.shared.control["config_generation"]
        self._beat()
        self._set_state("starting")
        inject.set_process(self.kind, self.ctx.shared.lock)
        inject.point("start")
        try:
            self.on_start()
        except Exception as exc:
            self.log.error("failed to start: %s", exc)
            self._record_error(f"failed to start: {exc}")
            return 1
        if self.listen_channels:
            self._listener = threading.Thread(target=self._listen_forever, name="listener", daemon=True)
            self._listener.start()
        self.log.info("started (naptime %.0f ms)", self.naptime * 1000)
        while True:
            self._beat()
            if self._supervisor_gone():
                # Nobody will reap us or hand our jobs back: stop as a fast shutdown does (claimed jobs go back
                # to pending at once), then exit non-zero.
                self.log.warning("supervisor is gone; handing back the jobs in hand and exiting")
                self.shutdown, self.orphaned = "fast", True
                break
            if self.reload_requested:
                self._reload()
            if self.reopen_log_requested:
                self.reopen_log_requested = False
                logsetup.reopen()
                self.on_log_reopened()
                self.log.info("log file reopened")
            if self.shutdown:
                break
            if not self.enabled:
                self._set_state("idle")
                self._nap(self.naptime)
                continue
            more = self._one_batch()
            if not more:
                self._set_state("idle")
                self._nap(self._reconnect_delay if self._db_down else self.idle_nap())
        self._set_state("stopping")
        try:
            self.on_stop()
        except Exception:
            self.log.exception("error while stopping")
        self._drop_connection()
        self.log.info("stopped (%s shutdown)", "supervisor gone" if self.orphaned else self.shutdown)
        self._set_state("stopped")
        return 1 if self.orphaned else 0

    def _one_batch(self) -> bool:
        """Run a batch, keeping the worker alive through database outages and bugs; True if more work waits."""
        self._set_state("running")
        inject.point("batch")
        try:
            result = self.run_batch()
        except (DatabaseUnavailable, psycopg.OperationalError) as exc:
            self._drop_connection()
            if not self._db_down:
                self.log.warning("database unavailable, reconnecting: %s", str(exc).strip().splitlines()[0])
                self._db_down = True
            else:
                self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_MAX)
            self._record_error(f"database unavailable: {str(exc).strip()[:150]}")
            return False
        except Exception as exc:
            self.log.error("batch failed: %s\n%s", exc, traceback.format_exc())
            self._record_error(f"batch failed: {exc}")
            return False
        if self._db_down:
            self.log.info("database connection re-established")
            self._db_down = False
            self._reconnect_delay = RECONNECT_MIN
        self._record(result)
        return result.more
