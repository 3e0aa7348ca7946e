"""The supervisor: neurondb's postmaster. One readable state machine, after gunicorn's arbiter.

It owns the data directory (an flock the kernel drops when the last process holding it dies), the shared
memory and semaphores (created at start, unlinked at exit, stale ones of a crashed predecessor removed),
and the worker processes, which it forks and watches:

- SIGCHLD: reap in the main loop; exit 0 is a deliberate stop (not restarted); anything else is a crash:
  release the semaphores the dead pid held, mark what it was writing for repair, hand its claimed jobs back,
  and restart it after `worker_restart_interval`, doubling per recent crash; too many crashes within
  `worker_crash_window` mark it FATAL instead of restarting it in a tight loop.
- a worker whose heartbeat is older than `worker_heartbeat_timeout` is sent SIGTERM, then SIGKILL.
- SIGHUP, `neurondb reload`, or NOTIFY neurondb_reload (`SELECT neurondb.reload_conf()`): apply the
  settings requested through `neurondb.alter_system()` (only those a database login may set), re-read the
  files, log what changed, what waits for a restart and what was rejected, publish that to
  `neurondb.settings` and to the reload report `neurondb reload` prints, then bump the config generation
  (so whoever sees the new generation finds the outcome published) and forward SIGHUP to the workers.
- SIGTERM smart / SIGINT fast / SIGQUIT immediate shutdown, forwarded as the same signals to the workers.
- SIGUSR1 (`neurondb logrotate`): reopen the log file by name and forward SIGUSR1 to the workers, which do
  the same.
- under systemd (`start --foreground` with $NOTIFY_SOCKET, see sdnotify.py): READY=1 once every worker has
  heartbeated, STOPPING=1 when a shutdown begins, WATCHDOG=1 from the loop every half $WATCHDOG_USEC.

Signal handlers only queue the signal and write a byte to a pipe that wakes the loop; all work happens in
the loop. The supervisor never takes a data lock: it reads worker slots as they are.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import signal
import socket
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psycopg
import setproctitle

from neurondb import db, inject
from neurondb import log as logsetup
from neurondb.index import hnsw
from neurondb.instance import Instance, publish_settings
from neurondb.migrate import migrate
from neurondb.observability.recorder import Recorder
from neurondb.paths import DataDir, write_private_file
from neurondb.queries import query
from neurondb.sdnotify import Notifier
from neurondb.settings import (
    REGISTRY,
    Config,
    SettingError,
    config_warnings,
    format_value,
    lookup,
    require_sql_settable,
    reset_auto,
    set_auto,
    shorten,
)
from neurondb.shm import names
from neurondb.shm.control import SHUTDOWN_MODES, SharedState
from neurondb.shm.ring import QueryRing
from neurondb.shm.series import SeriesTable
from neurondb.workers import WORKER_KINDS
from neurondb.workers.base import WorkerContext
from neurondb.workers.leases import JOB_TABLES, RetryPolicy, lease_owner, local_owners, owner_pid, release

log = logging.getLogger("neurondb.supervisor")

HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGUSR1)
SHUTDOWN_SIGNALS = {signal.SIGTERM: "smart", signal.SIGINT: "fast", signal.SIGQUIT: "immediate"}
WORKER_SIGNAL = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
# How long each shutdown mode waits for workers before escalating to the next one.
ESCALATE_AFTER = {"smart": 60.0, "fast": 10.0, "immediate": 2.0}
NEXT_MODE = {"smart": "fast", "fast": "immediate"}
KILL_GRACE = 5.0          # SIGTERM to SIGKILL for a hung worker
MAX_BACKOFF = 30.0
STATUS_INTERVAL = 2.0     # how often neurondb.workers is refreshed from shared memory
LOOP_TIMEOUT = 0.25
PREVIOUS_EXIT_WAIT = 10.0  # how long `neurondb start` waits for the workers of a killed supervisor


RELOAD_REPORT = "neurondb.reload.json"   # in the data directory: the last reload's outcome, for `neurondb reload`


class SupervisorError(RuntimeError):
    """The supervisor cannot start; the message says why and what to do."""


@dataclass
class HandBack:
    """Jobs of a dead worker still to be returned (the database was unreachable when it was reaped)."""

    owner: str
    ran: list[int] | None
    reason: str
    delayed: bool = False     # a first attempt failed (logged once)


@dataclass
class Child:
    """The supervisor's bookkeeping for one worker slot."""

    kind: str
    name: str
    slot: int
    pid: int = 0
    started_at: float = 0.0
    started_mono: float = 0.0
    restarts: int = 0
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    fatal: bool = False
    hung_since: float | None = None   # set when we sent SIGTERM for a stale heartbeat


def worker_layout(config: Config) -> list[tuple[str, str]]:
    """(kind, name) of every worker process, in slot order."""
    n_queue = config.get_int("neuranq_workers")
    layout = [("neuranq", "neuranq" if i == 0 else f"neuranq-{i + 1}") for i in range(n_queue)]
    return layout + [(kind, kind) for kind in ("neuranmon", "neurandefrag", "neuranllm")]


class Supervisor:
    def __init__(self, instance: Instance, ready_fd: int | None = None, notifier: Notifier | None = None) -> None:
        self.instance = instance
        self.datadir = instance.datadir
        self.ready_fd = ready_fd
        self.notifier = notifier
        self._notified_ready = False
        self._next_watchdog = 0.0
        self.prefix = names.instance_prefix(self.datadir.root)
        self.config: Config
        self.shared: SharedState
        self.dsn = ""
        self.children: list[Child] = []
        self.signals: list[int] = []
        self.shutdown_mode: str | None = None
        self.shutdown_started = 0.0
        self.sql_rejections: dict[str, tuple[str, str]] = {}
        self._lock_fd = -1
        self._life_r = self._life_w = -1
        self._wake_r = self._wake_w = -1
        self._conn: psycopg.Connection | None = None
        self._last_status = 0.0
        self._owed: list[HandBack] = []
        self._next_settle = 0.0

    # -- start ----------------------------------------------------------------------------------------

    def run(self) -> int:
        """Start, supervise until shut down, clean up; returns the process exit status."""
        try:
            self._acquire_lock()
        except SupervisorError as exc:
            self._report_ready(f"error: {exc}")
            raise
        try:
            try:
                self._startup()
            except Exception as exc:
                self._report_ready(f"error: {exc}")
                raise
            self._loop()
            return 0
        finally:
            self._cleanup()

    def _acquire_lock(self) -> None:
        """One supervisor per data directory. The lock fd is inherited by the workers on purpose: the kernel
        releases the lock only when the last process of this installation is gone, so a new supervisor can
        never start beside survivors of a crashed one (`wait_for_previous` waits for those first)."""
        self.datadir.init()
        fd = _try_lock(self.datadir.lock_file)
        if fd is None:
            raise SupervisorError(_already_running(self.datadir))
        self._lock_fd = fd

    def _startup(self) -> None:
        setproctitle.setproctitle(f"neurondb: supervisor -D {self.datadir.root}")
        inject.set_process("supervisor")
        stale = names.unlink_all(self.prefix)
        if stale:
            log.warning("removed %d stale shared memory objects of a previous run: %s", len(stale), ", ".join(stale))
        self.config = Config.load(self.datadir)
        for warning in config_warnings(self.config):
            log.warning("%s", warning)
        self.dsn = self.instance.ensure_database()
        with db.connect(self.dsn, "supervisor") as conn:
            migrate(conn)
            self._recover_orphans(conn)
        layout = worker_layout(self.config)
        self.shared = SharedState.create(self.prefix, n_slots=len(layout))
        self.ring = QueryRing.create(self.shared)
        self.series = SeriesTable.create(self.shared)
        self.metrics = Recorder(self.series, "supervisor")
        self.shared.control["supervisor_pid"] = os.getpid()
        self.shared.control["supervisor_started_at"] = time.time()
        self.shared.control["config_generation"] = 1
        for slot, (kind, name) in enumerate(layout):
            self.shared.init_slot(slot, name, kind)
            self.children.append(Child(kind=kind, name=name, slot=slot))
        self._life_r, self._life_w = os.pipe()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._on_signal)
        write_private_file(self.datadir.pid_file, f"{os.getpid()}\n{self.datadir.root}\n{time.time():.0f}\n")
        self._connect()
        self._publish_settings()
        # Load (or, the first time, compile) the index kernels before forking: every worker, and every
        # restart of one, inherits the machine code instead of loading it again.
        hnsw.warmup()
        for child in self.children:
            self._spawn(child)
        log.info("supervisor started (pid %d), %d workers, database %s", os.getpid(), len(self.children),
                 db.redact(self.dsn))
        self._report_ready("ready")

    def _report_ready(self, message: str) -> None:
        """Tell the `neurondb start` that daemonised us how the start went."""
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, message.encode() + b"\n")
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None

    # -- the loop -------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        if len(self.signals) < 10:
            self.signals.append(signum)
        try:
            os.write(self._wake_w, b".")
        except OSError:
            pass

    def _loop(self) -> None:
        while True:
            self._sleep()
            self._watchdog()
            self._drain_notifications()
            while self.signals:
                self._handle_signal(self.signals.pop(0))
            self._reap()
            self._settle_hand_backs()
            if self.shutdown_mode:
                if not any(c.pid for c in self.children):
                    return
                self._escalate_shutdown()
                continue
            self._check_heartbeats()
            self._spawn_due()
            self._notify_ready()
            if time.monotonic() - self._last_status >= STATUS_INTERVAL:
                self._publish_status()

    def _notify_ready(self) -> None:
        """READY=1 to systemd once every worker not FATAL has heartbeated since it was started."""
        if self.notifier is None or self._notified_ready:
            return
        if all(c.fatal or (c.pid and self.shared.slot(c.slot)["heartbeat"] > 0) for c in self.children):
            self._notified_ready = True
            self.notifier.notify("READY=1", f"STATUS={len(self.children)} workers running, database "
                                            f"{db.redact(self.dsn)}", f"MAINPID={os.getpid()}")

    def _watchdog(self) -> None:
        """WATCHDOG=1 every half $WATCHDOG_USEC, from the loop: a supervisor stuck anywhere stops sending."""
        if self.notifier is None or self.notifier.watchdog_interval is None:
            return
        now = time.monotonic()
        if now >= self._next_watchdog:
            self.notifier.notify("WATCHDOG=1")
            self._next_watchdog = now + self.notifier.watchdog_interval

    def _sleep(self) -> None:
        fds = [self._wake_r]
        if self._conn is not None and not self._conn.closed:
            fds.append(self._conn.fileno())
        timeout = LOOP_TIMEOUT
        due = [c.restart_at for c in self.children if c.restart_at is not None and not c.pid]
        if due and not self.shutdown_mode:
            timeout = min(timeout, max(min(due) - time.monotonic(), 0.0))
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # reaped right after
        if signum == signal.SIGHUP:
            self.reload()
        elif signum == signal.SIGUSR1:
            self._reopen_log()
        elif signum in SHUTDOWN_SIGNALS:
            self._begin_shutdown(SHUTDOWN_SIGNALS[signal.Signals(signum)])

    # -- children -------------------------------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        child.restart_at = None
        child.hung_since = None
        self.shared.reset_slot(child.slot)
        self.shared.slot(child.slot)["restarts"] = child.restarts
        self.shared.latch(child.slot).reset()
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                os.close(self._life_w)
                os.close(self._wake_r)
                os.close(self._wake_w)
                for signum in HANDLED_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)   # its default kills; the worker installs its own
                ctx = WorkerContext(kind=child.kind, name=child.name, slot=child.slot, datadir=self.datadir,
                                    dsn=self.dsn, config=self.config, shared=self.shared,
                                    latch=self.shared.latch(child.slot), death_fd=self._life_r)
                status = WORKER_KINDS[child.kind](ctx).main()
            except BaseException:
                traceback.print_exc()
                logging.getLogger(f"neurondb.{child.name}").critical("worker died: %s", traceback.format_exc())
            finally:
                os._exit(status)  # never run the supervisor's finalizers (its DB connection) in a worker
        child.pid = pid
        child.started_at, child.started_mono = time.time(), time.monotonic()
        log.info("started %s worker (pid %d)", child.name, pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = next((c for c in self.children if c.pid == pid), None)
            if child is not None:
                self._on_exit(child, status)

    def _on_exit(self, child: Child, status: int) -> None:
        pid, code = child.pid, os.waitstatus_to_exitcode(status)
        child.pid = 0
        how = f"was terminated by signal {-code} ({signal.Signals(-code).name})" if code < 0 else \
            f"exited with exit code {code}"
        for lock_name, dirty in self.shared.release_locks_held_by(pid):
            log.warning("%s worker (pid %d) died holding %s; released%s", child.name, pid, lock_name,
                        ", structure marked for repair" if dirty else "")
        ran = self.shared.running_jobs(child.slot)
        self._decide_restart(child, pid, code, how, during_jobs=ran is None or bool(ran))
        # After the restart is scheduled: a slow database must not delay it.
        self._hand_back_jobs(child, pid, ran, f"worker {child.name} (pid {pid}) {how}")

    def _decide_restart(self, child: Child, pid: int, code: int, how: str, during_jobs: bool = False) -> None:
        """Restart a crashed worker after the restart interval, doubling per recent crash; FATAL after too
        many. A crash while the worker ran jobs is charged to those jobs instead (each such run counts an
        attempt, so a job that kills its worker ends in the dead letters after its retries): it restarts after
        the plain interval and never counts towards FATAL, so one poison job cannot stop the queue.
        The error the dead process recorded in its slot (a module that fails to import) leads the slot's new
        last error and the log line: the exit code alone does not say what to fix."""
        if self.shutdown_mode:
            self.shared.set_state(child.slot, "stopped")
            log.info("%s worker (pid %d) %s", child.name, pid, how)
            return
        if code == 0 and child.hung_since is None:
            self.shared.set_state(child.slot, "stopped")
            log.info("%s worker (pid %d) exited deliberately; not restarted", child.name, pid)
            return
        self.metrics.inc("neurondb_worker_crashes", child.name, child.kind)
        interval = self.config.get_seconds("worker_restart_interval")
        slot = self.shared.read_slot(child.slot)
        if slot["last_error"] and slot["last_error_at"] >= child.started_at:   # written by this process
            how = f"{how}: {slot['last_error']}"
        if during_jobs:
            child.restart_at = time.monotonic() + interval
            child.restarts += 1
            self.shared.set_state(child.slot, "crashed")
            self.shared.set_last_error(child.slot, f"previous process (pid {pid}) {how} while running jobs")
            log.warning("%s worker (pid %d) %s while running jobs (charged to them, not counted towards FATAL); "
                        "restarting in %.2f s", child.name, pid, how, interval)
            return
        now = time.time()
        window = self.config.get_seconds("worker_crash_window")
        child.crashes.append(now)
        while child.crashes and child.crashes[0] < now - window:
            child.crashes.popleft()
        max_crashes = self.config.get_int("worker_max_crashes")
        if len(child.crashes) >= max_crashes:
            child.fatal = True
            self.shared.set_state(child.slot, "fatal")
            self.shared.set_last_error(child.slot, f"{how}; {len(child.crashes)} crashes within {window:.0f}s")
            log.error("%s worker (pid %d) %s; %d crashes within %.0f s, marked FATAL and not restarted (fix "
                      "the cause, then `neurondb reload` retries it; a fix to a postmaster setting, such as "
                      "neurondb.neuranq_job_modules, applies only after `neurondb stop` and `neurondb start`)",
                      child.name, pid, how, len(child.crashes), window)
            return
        delay = min(interval * 2 ** (len(child.crashes) - 1), MAX_BACKOFF)
        child.restart_at = time.monotonic() + delay
        child.restarts += 1
        self.shared.set_state(child.slot, "crashed")
        self.shared.set_last_error(child.slot, f"previous process (pid {pid}) {how}")
        log.warning("%s worker (pid %d) %s; restarting in %.2f s", child.name, pid, how, delay)

    def _hand_back_jobs(self, child: Child, pid: int, ran: list[int] | None, reason: str) -> None:
        """Jobs the dead worker had claimed go back at once (not after their lease expires). Only the jobs it
        listed as running in its slot count an attempt, so a job that kills its worker every time ends
        failed after its retries, while the jobs claimed with it that never started are not charged."""
        self._owed.append(HandBack(lease_owner(pid), ran, reason))
        self._settle_hand_backs()

    def _settle_hand_backs(self) -> None:
        """Make the owed hand-backs, oldest first. One the database refuses now (it restarted, the connection
        is stale) stays owed and is retried from the loop a second later, with a fresh connection: the jobs
        then come back within about a second of the server, not after their lease."""
        if not self._owed or time.monotonic() < self._next_settle or not self._ensure_connection():
            return
        while self._owed:
            owed = self._owed[0]
            try:
                for table in JOB_TABLES:
                    n, failed = release(self._conn, table, RetryPolicy.of(self.config, table), owed.owner, owed.ran,
                                        owed.reason)
                    if n:
                        log.warning("handed %d jobs of %s back to %s%s", n, owed.owner, table,
                                    f"; {len(failed)} out of retries failed: {failed}" if failed else "")
            except psycopg.Error as exc:
                if not owed.delayed:
                    log.warning("could not hand back the jobs of %s yet (retrying every second): %s", owed.owner,
                                db.first_line(exc))
                    owed.delayed = True
                self._next_settle = time.monotonic() + 1.0
                self._drop_connection()
                return
            self._owed.pop(0)

    def _recover_orphans(self, conn: psycopg.Connection) -> None:
        """At start: jobs still leased to processes of this host that no longer exist (the workers of a
        supervisor that was killed: they exit when they see it gone) come back now, no attempt counted (they
        stopped because their supervisor did, not because of the job), instead of after their lease."""
        for table in JOB_TABLES:
            owners = [r[0] for r in conn.execute(query("leases", "local_owners").format(table=table),
                                                 {"prefix": local_owners()})]
            for owner in owners:
                pid = owner_pid(owner)
                if pid is not None and not pid_alive(pid):
                    n, _ = release(conn, table, RetryPolicy.of(self.config, table), owner, [], None)
                    if n:
                        log.warning("handed %d jobs of %s (gone since a previous run) back to %s", n, owner, table)

    def _check_heartbeats(self) -> None:
        timeout = self.config.get_seconds("worker_heartbeat_timeout")
        if timeout <= 0:
            return
        now, now_mono = time.time(), time.monotonic()
        for child in self.children:
            if not child.pid:
                continue
            if child.hung_since is not None:
                if now - child.hung_since > KILL_GRACE:
                    log.warning("%s worker (pid %d) ignored SIGTERM; sending SIGKILL", child.name, child.pid)
                    self._kill(child.pid, signal.SIGKILL)
                continue
            # CLOCK_MONOTONIC is system-wide: comparable across processes, immune to clock steps.
            beat = float(self.shared.slot(child.slot)["heartbeat_mono"]) or child.started_mono
            if now_mono - beat > timeout:
                log.warning("%s worker (pid %d) sent no heartbeat for %.1f s; terminating it", child.name,
                            child.pid, now_mono - beat)
                child.hung_since = now
                self._kill(child.pid, signal.SIGTERM)

    def _spawn_due(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if not child.pid and child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)

    @staticmethod
    def _kill(pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def _reopen_log(self) -> None:
        """SIGUSR1: after logrotate renamed the log file, write to a new file of the old name; then the workers."""
        logsetup.reopen()
        log.info("log file reopened")
        for child in self.children:
            if child.pid:
                self._kill(child.pid, signal.SIGUSR1)

    # -- reload ---------------------------------------------------------------------------------------

    def reload(self) -> None:
        """Apply `neurondb.alter_system()` requests, re-read the settings and tell every worker.

        The outcome is published (neurondb.settings, the reload report) before the generation is bumped:
        `neurondb reload` and the workers take the new generation as "the outcome is there to read"."""
        started = time.monotonic()
        report = self._apply_sql_requests()
        report += self._reload_files()
        report += [(logging.WARNING, warning) for warning in config_warnings(self.config)]
        for level, text in report:
            log.log(level, "%s", text)
        inject.point("reload")
        self._publish_settings()
        generation = int(self.shared.control["config_generation"]) + 1
        try:
            write_private_file(self.datadir.root / RELOAD_REPORT, orjson.dumps({
                "generation": generation, "started_mono": started,
                "lines": [[logging.getLevelName(level), text] for level, text in report],
            }).decode())
        except OSError as exc:   # a full disk must not stop the reload itself; the log has it all
            log.warning("could not write the reload report %s: %s", RELOAD_REPORT, exc)
        self.shared.control["config_generation"] = generation
        for child in self.children:
            if child.fatal:   # a reload is the operator's way of saying "try again"
                child.fatal = False
                child.crashes.clear()
                child.restart_at = time.monotonic()
                log.info("%s worker: FATAL cleared by reload, restarting", child.name)
            if child.pid:
                self._kill(child.pid, signal.SIGHUP)
        log.info("configuration reloaded (generation %d)", generation)

    def _reload_files(self) -> list[tuple[int, str]]:
        """Re-read the files; what changed, waits for a restart or was rejected, as (level, line) to log."""
        result = self.config.reload()

        def shown(name: str, value: object) -> str:
            return format_value(REGISTRY[name], value, with_unit=True)

        lines = [(logging.INFO, f"parameter {name} changed from {shown(name, old)} to {shown(name, new)}")
                 for name, old, new in result.changed]
        lines += [(logging.WARNING, f"parameter {name} cannot be changed without restarting neurondb "
                                    f"({shown(name, old)} in force, {shown(name, new)} in the files); pending restart")
                  for name, old, new in result.pending_restart]
        for name, _, message in result.rejected:
            if name in REGISTRY:
                message += f"; the value in force stays {shown(name, self.config.get(name))}"
            elif name:
                message += "; ignored"
            lines.append((logging.ERROR, message))
        return lines

    def _apply_sql_requests(self) -> list[tuple[int, str]]:
        """Settings requested with `SELECT neurondb.alter_system(name, value)` since the last reload, applied
        only if a database login may set them; what happened, as (level, line) to log."""
        if not self._ensure_connection():
            return [(logging.WARNING, "could not read neurondb.alter_system() requests: no database connection")]
        try:
            with self._conn.transaction():
                rows = self._conn.execute(query("supervisor", "take_settings_requests")).fetchall()
        except psycopg.Error as exc:
            self._drop_connection()
            return [(logging.WARNING, f"could not read neurondb.alter_system() requests: {exc}")]
        lines = []
        for _, name, value in sorted(rows):
            try:
                require_sql_settable(name)
                setting = set_auto(self.datadir, name, value) if value is not None else \
                    reset_auto(self.datadir, name)
                self.sql_rejections.pop(setting.name, None)
                what = f"{setting.name} = '{shorten(value)}'" if value is not None else f"reset of {setting.name}"
                lines.append((logging.INFO, f"neurondb.alter_system: {what} written to {self.datadir.auto_conf.name}"))
            except SettingError as exc:
                try:
                    key = lookup(name).name
                except SettingError:
                    key = name
                self.sql_rejections[key] = ("(reset)" if value is None else value, str(exc))
                lines.append((logging.ERROR, f"neurondb.alter_system: rejected: {exc}"))
        return lines

    # -- database side --------------------------------------------------------------------------------

    def _connect(self) -> None:
        self._conn = db.connect(self.dsn, "supervisor", connect_timeout=3, statement_timeout_ms=5000)
        self._conn.execute("LISTEN neurondb_reload")

    def _ensure_connection(self) -> bool:
        if self._conn is not None and not self._conn.closed:
            return True
        try:
            self._connect()
            return True
        except psycopg.Error:
            self._conn = None
            return False

    def _drop_connection(self) -> None:
        db.close_quietly(self._conn)
        self._conn = None

    def _drain_notifications(self) -> None:
        if self._conn is None:
            return
        try:
            notified = any(True for _ in self._conn.notifies(timeout=0))
        except psycopg.Error:
            self._drop_connection()
            return
        if notified and not self.shutdown_mode:
            log.info("reload requested through neurondb.reload_conf()")
            self.reload()

    def _publish_settings(self) -> None:
        if not self._ensure_connection():
            return
        try:
            publish_settings(self._conn, self.config, self.sql_rejections)
        except psycopg.Error as exc:
            log.warning("could not publish settings to neurondb.settings: %s", exc)
            self._drop_connection()

    def _publish_status(self) -> None:
        """Copy the worker slots into neurondb.neurondb_worker_status, so heartbeats are visible from SQL."""
        self._last_status = time.monotonic()
        if not self._ensure_connection():
            return
        rows = []
        host = socket.gethostname()
        for child in self.children:
            s = self.shared.read_slot(child.slot)
            rows.append((child.name, s["pid"] or None, s["state"], ts(s["started_at"]), ts(s["heartbeat"]),
                         ts(s["last_batch_at"]), child.restarts, s["jobs_processed"], s["jobs_failed"],
                         s["last_error"] or None, host))
        try:
            with self._conn.transaction(), self._conn.cursor() as cur:
                cur.executemany(query("supervisor", "upsert_worker_status"), rows)
        except psycopg.Error as exc:
            log.debug("could not refresh neurondb.workers: %s", exc)
            self._drop_connection()

    # -- shutdown -------------------------------------------------------------------------------------

    def _begin_shutdown(self, mode: str) -> None:
        if self.shutdown_mode and list(ESCALATE_AFTER).index(mode) <= list(ESCALATE_AFTER).index(self.shutdown_mode):
            return
        log.info("received %s shutdown request", mode)
        if self.notifier is not None and self.shutdown_mode is None:
            self.notifier.notify("STOPPING=1", f"STATUS={mode} shutdown")
        self.shutdown_mode = mode
        self.shutdown_started = time.monotonic()
        for child in self.children:
            child.restart_at = None
            if child.pid:
                self._kill(child.pid, WORKER_SIGNAL[mode])
        self.shared.control["shutdown_mode"] = SHUTDOWN_MODES.index(mode)

    def _escalate_shutdown(self) -> None:
        assert self.shutdown_mode is not None
        if time.monotonic() - self.shutdown_started < ESCALATE_AFTER[self.shutdown_mode]:
            return
        nxt = NEXT_MODE.get(self.shutdown_mode)
        if nxt:
            log.warning("%s shutdown is taking too long; switching to %s", self.shutdown_mode, nxt)
            self._begin_shutdown(nxt)
        else:
            for child in self.children:
                if child.pid:
                    self._kill(child.pid, signal.SIGKILL)

    def _cleanup(self) -> None:
        """Leave nothing behind: status rows say stopped, shared memory and semaphores are unlinked."""
        for child in self.children:   # only after a startup failure or an exception in the loop
            if child.pid:
                self._kill(child.pid, signal.SIGKILL)
                try:
                    os.waitpid(child.pid, 0)
                except ChildProcessError:
                    pass
                self._hand_back_jobs(child, child.pid, self.shared.running_jobs(child.slot),
                                     f"worker {child.name} killed: supervisor exiting")
                child.pid = 0
        if hasattr(self, "shared"):
            self._publish_status()
            if hasattr(self, "ring"):
                self.ring.close()
            if hasattr(self, "series"):
                self.series.close()
            self.shared.close()
        self._drop_connection()
        names.unlink_all(self.prefix)
        for fd in (self._life_r, self._life_w, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        if self._lock_fd >= 0:
            try:
                if read_pid(self.datadir.pid_file) == os.getpid():
                    self.datadir.pid_file.unlink()
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = -1
        log.info("supervisor stopped")


def ts(epoch: float) -> float | None:
    return float(epoch) if epoch else None


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, IndexError):
        return False


def _try_lock(lock_file: Path) -> int | None:
    """An fd holding the data directory's lock, or None while another process holds it."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        return None
    return fd


def lock_holders(lock_file: Path) -> list[int]:
    """Pids of the processes with `lock_file` open (the lock is inherited, so /proc/locks would name only
    the dead process that took it). Processes of other users whose fds we cannot read are not listed."""
    target = str(lock_file.resolve())
    holders = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
            if any(os.readlink(f"/proc/{entry.name}/fd/{fd}") == target for fd in fds):
                holders.append(int(entry.name))
        except OSError:   # gone meanwhile, or not ours to inspect
            continue
    return sorted(holders)


def _pids(pids: list[int]) -> str:
    return f" (pids {', '.join(map(str, pids))})" if pids else ""


def _already_running(datadir: DataDir, waited: float = 0.0) -> str:
    """Why the lock is taken: a running supervisor, or survivors of a dead one and what to do about them."""
    pid = read_pid(datadir.pid_file)
    if pid_alive(pid):
        return f"neurondb is already running on {datadir.root} (supervisor pid {pid})"
    after = f" after {waited:g} s" if waited else ""
    return (f"processes of a previous neurondb{_pids(lock_holders(datadir.lock_file))} still hold "
            f"{datadir.lock_file}{after}; stop them (kill PID) or wait for them to exit, then start again")


def wait_for_previous(datadir: DataDir, timeout: float = PREVIOUS_EXIT_WAIT,
                      say: Callable[[str], None] = log.info) -> None:
    """Return once no process of a previous run holds the data directory's lock.

    A running supervisor is refused at once. A killed one leaves its workers holding the lock until they
    notice (within a naptime slice, or after the batch they are in): say so, wait up to `timeout` seconds
    for them, then give up with their pids.
    """
    fd = _try_lock(datadir.lock_file)
    if fd is not None:
        os.close(fd)
        return
    pid = read_pid(datadir.pid_file)
    if pid_alive(pid):
        raise SupervisorError(_already_running(datadir))
    holders = lock_holders(datadir.lock_file)
    gone = f"supervisor pid {pid} is gone" if pid else "the previous supervisor is gone"
    say(f"{gone}; waiting for its {len(holders)} remaining workers{_pids(holders)} to exit (up to {timeout:g} s)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        fd = _try_lock(datadir.lock_file)
        if fd is not None:
            os.close(fd)
            return
    raise SupervisorError(_already_running(datadir, waited=timeout))


def read_pid(pid_file: os.PathLike[str]) -> int:
    """The supervisor pid recorded in the pid file, 0 when absent or unreadable."""
    try:
        with open(pid_file) as f:
            return int(f.readline().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0
