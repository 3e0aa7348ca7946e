#!/usr/bin/env python3
"""The long chaos run (issue 9): the real service, real SIGKILLs, a real PostgreSQL restart, seeded bad input.

Three phases, each against `neurondb start` in one scratch installation under /tmp (embedded PostgreSQL),
all by default, or those named by --queue / --index / --fuzz:

1. queue: `neuranq_workers = 2` and the job types `chaos.record` and `chaos.arecord`, its async twin run
   many at once by the worker's async lane (scripts/chaos_jobs.py; alternate jobs of each), which append a
   line to a file when they start and when their work is done: an outside effect, not transactional, so the
   file counts executions whatever the job table says. 10,000 jobs are enqueued by plain SQL INSERTs in
   batches; while they drain, at random points of the drain: 50 SIGKILLs of a random queue worker, 2
   SIGKILLs of the supervisor (each followed by `neurondb start`, retried until accepted and timed) and
   one PostgreSQL restart (`neurondb db stop -m fast` / `db start`). Checks: no job missing or failed, none
   pending or processing once nothing has moved for 60 s, executions - jobs <= the jobs in flight at the
   kills (processing rows owned by the killed process, counted just before each kill; all processing rows
   for a supervisor kill or the restart), attempts charged by a kill <= jobs the killed worker had started,
   the jobs claimed before the restart released within 30 s (not after their 120 s lease), `neurondb start`
   right after a supervisor SIGKILL accepted at the first attempt; then two `chaos.suicide` jobs (they
   SIGKILL their worker on every run) ending in the dead letters after their retries while 100 more jobs
   complete; after `neurondb stop` no shared memory object and no process left.
2. index: an l2 index of dim 32; 20,000 vectors COPYed in batches of 150-900 (plus some deletes and vector
   updates), neurandefrag SIGKILLed after every commit that takes the node count past the graph's capacity
   (the moment the next generation's segment appears in /dev/shm, i.e. while the grown graph is being
   written, until one such kill has left that segment unpublished; 0-250 ms after the commit from then
   on) and 0-250 ms after a tenth of the other commits. Checks: the change log
   drains to 0, the graph's live labels are exactly the table's ids with the table's vectors, at least
   99.5 % of a sample of rows find themselves as top-1 through `neurondb.connect().search` (at ef 128),
   no deleted document comes back, and
   neurandefrag restarted exactly once per kill (no crash of its own).
3. fuzz: >= 1,000 seeded bad inputs: queue rows (unknown types, non-object payloads, missing or mistyped
   fields of embed / rerank / cache_refresh / http_call, JSON nested 1,000-3,000 deep, huge strings,
   numbers that overflow to infinity, bad URLs including one with a password in it, bad priorities and
   retry counts), LLM rows (unknown operations, nested or non-object parameters, missing inputs), vector
   rows (wrong dimension, NaN, infinity, NULL elements) and `Client.search` calls with bad arguments, with
   good jobs interleaved. Rows PostgreSQL stores but a JSON decoder refuses (nested 1,000-3,000 deep, a
   number beyond double range) go in a second round, so that a queue they stop does not hide what the
   first round shows. A refused insert must not answer with a raw constraint name; an accepted
   row must end `failed` with a message of one line, without "Traceback", at most 400 characters, naming
   the field or type concerned; a bad search must raise SearchError saying the same. Also: no worker
   restarted (`neurondb status --json`), every good job completed, the password in nowhere (messages, log).

At the end a table of figures and every check, PASS or FAIL; the exit status is 1 if any check failed (or
the run broke), 130 if interrupted. `--quick` scales the counts down for a 1-2 minute smoke run. Settings
that differ from the defaults, and why: worker_max_crashes 1000 in a 1 s window (50 deliberate kills must
not turn a worker FATAL), worker_restart_interval 100 ms and neuranq_naptime 200 ms (short run), retry
delays of 100 ms in the fuzz phase (bad input fails at once, or after its retries, in seconds).

    PYTHONPATH=. .venv/bin/python scripts/chaos.py [--quick] [--seed N] [--queue] [--index] [--fuzz] [--keep]

PYTHONPATH picks the checkout whose code runs (the service inherits it). Only 127.0.0.1 is contacted: the
LLM endpoint is set to 127.0.0.1:9 and every URL of the fuzz phase is a loopback or malformed one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from benchlib import OUTCOMES, BenchError, Scratch, code_version, guarded, install_sigterm_handler, log

import neurondb
from neurondb import db
from neurondb.client import SearchError
from neurondb.index.store import SharedIndex, index_key
from neurondb.shm import names
from neurondb.shm.control import SharedState
from neurondb.shm.segment import generation_name
from neurondb.status import Status, pid_alive
from neurondb.supervisor import read_pid
from neurondb.workers.leases import lease_owner

SCRIPTS = Path(__file__).resolve().parent
QUEUE = "neurondb.neurondb_job_queue"
LLM = "neurondb.neurondb_llm_jobs"
VECTORS = "neurondb.neurondb_vectors"
BASE_SETTINGS = {
    "neuranq_job_modules": "chaos_jobs",
    "neuranq_naptime": "200ms",
    "neuranq_queue_depth": "100000",
    "worker_max_crashes": "1000",
    "worker_crash_window": "1000ms",
    "worker_restart_interval": "100ms",
    "llm_endpoint": "http://127.0.0.1:9",   # nothing listens there: no call ever leaves the machine
}
JOB_MS = 10                  # work per chaos.record job: 2 workers drain at most ~200 jobs/s
MIN_EVENT_GAP_S = 0.3
RESTART_RECOVERY_LIMIT_S = 30.0
MAX_MESSAGE = 400
SECRET = "hunter2-chaos-secret"
RAW_CONSTRAINT = re.compile(r'violates [a-z ]*constraint "[^"]*_(check\d*|fkey|key|excl)"')


# -- the report ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Figures (what was measured) and checks (what must hold), in the order they were made."""

    figures: list[tuple[str, str, str]] = field(default_factory=list)
    checks: list[tuple[str, str, bool, str]] = field(default_factory=list)

    def figure(self, phase: str, name: str, value: object) -> None:
        text = f"{value:,}" if isinstance(value, int) else f"{value:.2f}" if isinstance(value, float) else str(value)
        self.figures.append((phase, name, text))
        log(f"{phase}: {name} = {text}")

    def check(self, phase: str, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((phase, name, bool(ok), detail))
        log(f"{phase}: {'PASS' if ok else 'FAIL'} {name}{f' ({detail})' if detail else ''}")
        return bool(ok)

    @property
    def failed(self) -> list[tuple[str, str, bool, str]]:
        return [c for c in self.checks if not c[2]]

    def render(self, header: dict[str, str]) -> str:
        lines = ["neurondb chaos run (issue 9)", ""] + [f"  {k:<11} {v}" for k, v in header.items()] + [""]
        width = max((len(n) for _, n, _ in self.figures), default=10)
        for phase in ("queue", "index", "fuzz", "run"):
            rows = [(n, v) for p, n, v in self.figures if p == phase]
            checks = [(n, ok, d) for p, n, ok, d in self.checks if p == phase]
            if not rows and not checks:
                continue
            lines.append(f"  {phase}")
            lines += [f"    {n:<{width}}  {v}" for n, v in rows]
            lines += [f"    {'PASS' if ok else 'FAIL'}  {n}" + (f": {d}" if d else "") for n, ok, d in checks]
            lines.append("")
        lines.append(f"  {len(self.checks) - len(self.failed)} of {len(self.checks)} checks passed")
        return "\n".join(lines)


# -- the installation -----------------------------------------------------------------------------------------


class Chaos(Scratch):
    """One scratch installation (embedded PostgreSQL) whose service each phase starts with its settings,
    plus what the phases share: a reconnecting SQL connection and the pids seen, to prove none survive."""

    def __init__(self) -> None:
        path = os.pathsep.join(p for p in (str(SCRIPTS), os.environ.get("PYTHONPATH", "")) if p)
        super().__init__("neurondb-chaos-", env={"PYTHONPATH": path}, owner="scripts/chaos.py")
        self.pg_dsn = ""
        self._conn: psycopg.Connection | None = None
        self.seen_pids: set[int] = set()

    def setup(self) -> None:
        self.datadir.init()
        self.write_conf(**BASE_SETTINGS)
        self.cli("init", timeout=300)
        self.pg_dsn = db.resolve_dsn(self.datadir)

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.pg_dsn, autocommit=True, application_name="neurondb chaos",
                                         connect_timeout=5)
        return self._conn

    def sql(self, text: str, params: Any = None) -> list[tuple]:
        """Rows of one autocommit statement (none for a statement without a result)."""
        cur = self.conn.execute(text, params)
        return cur.fetchall() if cur.description else []

    def try_sql(self, text: str, params: Any = None) -> list[tuple] | None:
        """Like `sql`, or None while the server is away (its restart is one of the events)."""
        try:
            return self.sql(text, params)
        except psycopg.OperationalError:
            db.close_quietly(self._conn)
            self._conn = None
            return None

    def status(self) -> Status:
        s = super().status()
        self.seen_pids.update(p for p in [s.supervisor_pid, *(w.pid for w in s.workers)] if p)
        return s

    def healthy(self) -> bool:
        s = self.status()
        return s.running and bool(s.workers) and all(
            w.pid and w.state in ("idle", "running") and (w.heartbeat_age_s or 99) < 2.0 for w in s.workers)

    def start_service(self, **settings: str) -> None:
        self.settings = {}
        self.write_conf(**{**BASE_SETTINGS, **settings})
        self.cli("start")
        self.wait_for(self.healthy, 60, "every worker to be healthy")

    def workers(self, kind: str) -> list[int]:
        return [w.pid for w in self.status().workers if w.kind == kind and w.pid and w.state in ("idle", "running")]

    def stop_service(self, phase: str, report: Report) -> None:
        """`neurondb stop`, then: nothing of the installation left in /dev/shm, no process seen alive. Jobs
        the phase left unfinished (its checks have counted them) are deleted first: the next phase's
        service must not pick them up."""
        self.status()
        for table in (QUEUE, LLM):
            self.try_sql(f"DELETE FROM {table} WHERE status IN ('pending', 'processing')")
        db.close_quietly(self._conn)
        self._conn = None
        self.cli("stop", timeout=120)
        left = names.list_objects(self.prefix)
        report.check(phase, "no shared memory object left after stop", not left, ", ".join(left[:5]))
        alive = sorted(p for p in self.seen_pids if pid_alive(p))
        report.check(phase, "no process left after stop", not alive,
                     f"{len(self.seen_pids)} pids seen" + (f", alive: {alive[:10]}" if alive else ""))
        self.seen_pids.clear()


def read_records(path: Path) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """(started, executed): job id -> pids of the `S` / `E` lines of chaos_jobs.record."""
    started: dict[int, list[int]] = defaultdict(list)
    executed: dict[int, list[int]] = defaultdict(list)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return started, executed
    for line in text.splitlines():
        kind, job, pid = line.split()
        (started if kind == "S" else executed)[int(job)].append(int(pid))
    return started, executed


# -- 1. queue -------------------------------------------------------------------------------------------------


@dataclass
class QueueRun:
    """What the chaos loop of the queue phase observed."""

    bound: int = 0                                   # jobs in flight at the kills, summed
    worker_kills: int = 0
    killed_owners: set[str] = field(default_factory=set)
    start_refusals: int = 0
    start_accept_s: list[float] = field(default_factory=list)
    start_healthy_s: list[float] = field(default_factory=list)
    restart_claims: list[tuple[int, str, Any]] = field(default_factory=list)   # (job, owner, started_at)
    restart_up_at: float | None = None
    restart_recovery_s: float | None = None


def enqueue_records(ch: Chaos, first: int, n: int, file: Path, batch: int = 500) -> list[int]:
    ids: list[int] = []
    for start in range(first, first + n, batch):
        stop = min(first + n, start + batch)
        ids += [r[0] for r in ch.sql(
            f"INSERT INTO {QUEUE} (job_type, payload) "
            "SELECT CASE WHEN g %% 2 = 0 THEN 'chaos.record' ELSE 'chaos.arecord' END, "
            "jsonb_build_object('file', %s::text, 'ms', %s::int, 'n', g) FROM generate_series(%s::int, %s::int) g "
            "RETURNING job_id", (str(file), JOB_MS, start, stop - 1))]
    return ids


def kill_worker(ch: Chaos, run: QueueRun, rng: random.Random) -> None:
    pids = ch.workers("neuranq")
    if not pids:
        pids = ch.wait_for(lambda: ch.workers("neuranq"), 15, "a queue worker to kill")
    pid = rng.choice(pids)
    owner = lease_owner(pid)
    in_flight = (ch.try_sql(f"SELECT count(*) FROM {QUEUE} WHERE status = 'processing' AND lease_owner = %s",
                            (owner,)) or [(0,)])[0][0]
    os.kill(pid, signal.SIGKILL)
    run.bound += in_flight
    run.worker_kills += 1
    run.killed_owners.add(owner)


def processing_now(ch: Chaos) -> list[tuple[int, str, Any]]:
    return [tuple(r) for r in
            ch.sql(f"SELECT job_id, lease_owner, started_at FROM {QUEUE} WHERE status = 'processing'")]


def kill_supervisor(ch: Chaos, run: QueueRun) -> None:
    """SIGKILL the supervisor, then `neurondb start` until it is accepted: the time until the accepted
    attempt was launched is how long a restart is refused."""
    ch.status()
    run.bound += len(processing_now(ch))
    pid = read_pid(ch.datadir.pid_file)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    while True:
        launched = time.monotonic()
        proc, out = ch.popen("start")
        text = ch.finish(proc, out, "start", check=False)
        if proc.returncode == 0:
            break
        run.start_refusals += 1
        if launched - killed > 60:
            raise BenchError(f"`neurondb start` still refused 60 s after a supervisor SIGKILL: {text.strip()}")
        time.sleep(0.2)
    run.start_accept_s.append(launched - killed)
    ch.wait_for(ch.healthy, 60, "the restarted service to be healthy")
    run.start_healthy_s.append(time.monotonic() - killed)


def restart_postgres(ch: Chaos, run: QueueRun) -> None:
    run.restart_claims = processing_now(ch)
    run.bound += len(run.restart_claims)
    db.close_quietly(ch._conn)
    ch._conn = None
    ch.cli("db", "stop", "-m", "fast", timeout=120)
    time.sleep(1.0)
    ch.cli("db", "start", timeout=120)
    run.restart_up_at = time.monotonic()
    # No other event until those jobs are released: a worker kill meanwhile would hand them back itself.
    while run.restart_recovery_s is None and time.monotonic() - run.restart_up_at < RESTART_RECOVERY_LIMIT_S + 5:
        track_restart_recovery(ch, run)
        time.sleep(0.1)


def track_restart_recovery(ch: Chaos, run: QueueRun) -> None:
    """Once the server is back: the moment none of the jobs claimed before the restart is still held
    under that claim (they completed, or went back to pending)."""
    if run.restart_up_at is None or run.restart_recovery_s is not None:
        return
    claims = run.restart_claims
    rows = ch.try_sql(f"SELECT count(*) FROM {QUEUE} q JOIN unnest(%s::bigint[], %s::text[], %s::timestamptz[]) "
                      "AS c(job_id, owner, started_at) USING (job_id) WHERE q.status = 'processing' "
                      "AND q.lease_owner = c.owner AND q.started_at = c.started_at",
                      ([c[0] for c in claims], [c[1] for c in claims], [c[2] for c in claims]))
    if rows is not None and rows[0][0] == 0:
        run.restart_recovery_s = time.monotonic() - run.restart_up_at


def drain(ch: Chaos, ids: list[int], quiet_s: float, cap_s: float, tick: Callable[[], None]) -> float:
    """Wait until none of `ids` is pending or processing, or nothing moved for `quiet_s`; seconds waited."""
    t0 = last_move = time.monotonic()
    last: Any = None
    while time.monotonic() - t0 < cap_s:
        tick()
        rows = ch.try_sql(f"SELECT count(*) FILTER (WHERE status IN ('pending', 'processing')), "
                          f"count(*) FILTER (WHERE status = 'completed') FROM {QUEUE} WHERE job_id = ANY(%s)", (ids,))
        if rows is not None:
            if rows[0][0] == 0:
                break
            if rows[0] != last:
                last, last_move = rows[0], time.monotonic()
            elif time.monotonic() - last_move > quiet_s:
                break
        time.sleep(0.2)
    return time.monotonic() - t0


def queue_phase(ch: Chaos, report: Report, rng: random.Random, n_jobs: int, n_kills: int, n_supervisor: int,
                quiet_s: float) -> None:
    phase = "queue"
    file = ch.root / "executions.log"
    ch.start_service(neuranq_workers="2")
    log(f"queue: enqueueing {n_jobs:,} chaos.record and chaos.arecord jobs (blocking and async, alternating)")
    t0 = time.monotonic()
    ids = enqueue_records(ch, 0, n_jobs, file)
    report.figure(phase, "jobs enqueued (plain SQL INSERT, batches of 500)", len(ids))
    events = ["worker"] * n_kills + ["supervisor"] * n_supervisor + ["postgres"]
    rng.shuffle(events)
    points = sorted(rng.uniform(0.03, 0.85) for _ in events)
    run = QueueRun()
    done_events: Counter[str] = Counter()
    last_event = 0.0
    for event, point in zip(events, points, strict=True):
        while True:
            track_restart_recovery(ch, run)
            rows = ch.try_sql(f"SELECT count(*) FROM {QUEUE} WHERE job_id = ANY(%s) AND status = 'completed'", (ids,))
            completed = rows[0][0] if rows else 0
            if completed >= point * n_jobs and time.monotonic() - last_event >= MIN_EVENT_GAP_S:
                break
            if completed >= n_jobs or time.monotonic() - t0 > 600:
                break
            time.sleep(0.05)
        if completed >= n_jobs or time.monotonic() - t0 > 600:
            break
        log(f"queue: {event} event at {completed:,} completed")
        {"worker": lambda: kill_worker(ch, run, rng), "supervisor": lambda: kill_supervisor(ch, run),
         "postgres": lambda: restart_postgres(ch, run)}[event]()
        done_events[event] += 1
        last_event = time.monotonic()
    chaos_s = time.monotonic() - t0
    waited = drain(ch, ids, quiet_s, 600, lambda: track_restart_recovery(ch, run))
    report.figure(phase, "drain time, chaos part / rest (s)", f"{chaos_s:.1f} / {waited:.1f}")
    report.figure(phase, "worker SIGKILLs / supervisor SIGKILLs / PostgreSQL restarts",
                  f"{done_events['worker']} / {done_events['supervisor']} / {done_events['postgres']}")
    report.check(phase, "every planned kill and restart happened",
                 done_events == Counter(events), f"planned {dict(Counter(events))}")

    counts = dict(ch.sql(f"SELECT status, count(*) FROM {QUEUE} WHERE job_id = ANY(%s) GROUP BY status", (ids,)))
    missing = n_jobs - sum(counts.values())
    failed = counts.get("failed", 0)
    stuck = counts.get("pending", 0) + counts.get("processing", 0)
    report.figure(phase, "final statuses", json.dumps(counts))
    report.check(phase, "0 lost (no job missing or failed)", missing == 0 and failed == 0,
                 f"{missing} missing, {failed} failed")
    report.check(phase, f"0 stuck (pending/processing after {quiet_s:.0f} s without progress)", stuck == 0,
                 f"{stuck} stuck")

    started, executed = read_records(file)
    executions = sum(len(executed[j]) for j in ids)
    never = sum(1 for j in ids if not executed[j] and counts.get("completed"))
    report.figure(phase, "executions / jobs", f"{executions:,} / {n_jobs:,}")
    report.figure(phase, "duplicates (executions - jobs) / bound (jobs in flight at the kills)",
                  f"{executions - n_jobs:,} / {run.bound:,}")
    report.check(phase, "duplicates <= jobs in flight at the kills", executions - n_jobs <= run.bound,
                 f"{executions - n_jobs} > {run.bound}" if executions - n_jobs > run.bound else "")
    rows = ch.sql(f"SELECT job_id, status, lease_owner, attempts, retry_count FROM {QUEUE} WHERE job_id = ANY(%s)",
                  (ids,))
    completed_by = {r[0]: r[2] for r in rows if r[1] == "completed"}
    report.check(phase, "every completed job ran (an E line)", never == 0 and all(executed[j] for j in completed_by),
                 f"{sum(1 for j in completed_by if not executed[j])} completed without running")
    charged = sum(1 for r in rows for a in r[3]
                  if a.get("owner") in run.killed_owners and not str(a.get("error", "")).startswith("lease expired"))
    ran = {(j, lease_owner(p)) for j, pids in started.items() for p in pids}
    started_unrecorded = sum(1 for j, owner in ran if owner in run.killed_owners and completed_by.get(j) != owner)
    report.figure(phase, "attempts charged by worker kills / jobs the killed workers had started",
                  f"{charged:,} / {started_unrecorded:,}")
    report.figure(phase, "highest retry_count", max((r[4] for r in rows), default=0))
    report.check(phase, "a kill charges an attempt only to jobs that had started", charged <= started_unrecorded,
                 f"{charged} charged, {started_unrecorded} started")
    report.figure(phase, "PostgreSQL restart: jobs claimed before it / released after (s)",
                  f"{len(run.restart_claims)} / "
                  + ("never" if run.restart_recovery_s is None else f"{run.restart_recovery_s:.1f}"))
    report.check(phase, f"jobs claimed before the PostgreSQL restart released within {RESTART_RECOVERY_LIMIT_S:.0f} s",
                 run.restart_recovery_s is not None and run.restart_recovery_s <= RESTART_RECOVERY_LIMIT_S,
                 "" if run.restart_recovery_s is not None else "still held under their old lease")
    accept = max(run.start_accept_s, default=0.0)
    report.figure(phase, "supervisor SIGKILL -> `neurondb start` accepted / healthy (s, worst)",
                  f"{accept:.1f} / {max(run.start_healthy_s, default=0.0):.1f} ({run.start_refusals} refusals)")
    report.check(phase, "`neurondb start` right after a supervisor SIGKILL accepted at the first attempt",
                 run.start_refusals == 0, f"{run.start_refusals} refused attempts, accepted after {accept:.1f} s")

    suicide_phase(ch, report, file, n_jobs, quiet_s)
    status = ch.status()
    report.check(phase, "no worker FATAL", all(w.state != "fatal" for w in status.workers),
                 ", ".join(w.name for w in status.workers if w.state == "fatal"))
    ch.stop_service(phase, report)


def suicide_phase(ch: Chaos, report: Report, file: Path, first: int, quiet_s: float) -> None:
    """Two jobs that SIGKILL their worker on every run, among 100 ordinary ones: after 1 + max_retries runs
    they must end failed, in the dead letters, and the others complete."""
    phase = "queue"
    others = enqueue_records(ch, first, 50, file)
    suicides = [r[0] for r in ch.sql(
        f"INSERT INTO {QUEUE} (job_type, payload, max_retries) SELECT 'chaos.suicide', "
        "jsonb_build_object('file', %s::text), 2 FROM generate_series(1, 2) RETURNING job_id", (str(file),))]
    others += enqueue_records(ch, first + 50, 50, file)
    drain(ch, others + suicides, quiet_s, 120, lambda: None)
    status = dict(ch.sql(f"SELECT job_id, status FROM {QUEUE} WHERE job_id = ANY(%s)", (suicides,)))
    dead = {r[0] for r in ch.sql("SELECT job_id FROM neurondb.neurondb_dead_letter WHERE job_id = ANY(%s)",
                                 (suicides,))}
    started, _ = read_records(file)
    runs = [len(started[j]) for j in suicides]
    report.figure(phase, "chaos.suicide jobs (max_retries 2): runs each / final status",
                  f"{runs} / {[status.get(j) for j in suicides]}")
    report.check(phase, "a job that kills its worker ends failed in the dead letters after 3 runs",
                 all(status.get(j) == "failed" and j in dead and runs[i] <= 3 for i, j in enumerate(suicides)),
                 f"{len(dead)} of {len(suicides)} in the dead letters")
    done = ch.sql(f"SELECT count(*) FROM {QUEUE} WHERE job_id = ANY(%s) AND status = 'completed'", (others,))[0][0]
    report.check(phase, "the jobs around them complete", done == len(others), f"{done} of {len(others)}")


# -- 2. index -------------------------------------------------------------------------------------------------


@dataclass
class IndexRun:
    kills: int = 0
    crossing_kills: int = 0
    targeted: int = 0
    targeted_hits: int = 0            # the new generation's segment appeared before the kill
    unpublished_left: int = 0         # ... and was still unpublished after it
    deletes: int = 0
    updates: int = 0
    writer_stalled: bool = False      # changes not applied 10 s after a commit: crossings no longer known
    defrag_gone: bool = False         # not running 15 s after a kill: no more kills (the checks will say why)


def copy_rows(ch: Chaos, index: str, docs: list[str], vectors: np.ndarray) -> None:
    with ch.conn.transaction(), ch.conn.cursor() as cur, \
            cur.copy(f"COPY {VECTORS} (index_name, doc_id, embedding) FROM STDIN") as copy:
        for doc, vec in zip(docs, vectors.tolist(), strict=True):
            copy.write_row((index, doc, vec))


def pending_changes(ch: Chaos, index: str) -> int | None:
    """Changes of `index` the writer has not applied yet, by the installation's recorded position in the
    change log (neurondb_index_consumers; all of them while it has none). None while the server is away."""
    rows = ch.try_sql(
        "SELECT count(*) FROM neurondb.neurondb_vector_changes c "
        "LEFT JOIN neurondb.neurondb_index_consumers k USING (index_name) "
        "WHERE c.index_name = %s AND (k.applied IS NULL OR (c.xid >= pg_snapshot_xmin(k.applied) "
        "AND NOT pg_visible_in_snapshot(c.xid, k.applied)))", (index,))
    return rows[0][0] if rows is not None else None


def wait_applied(ch: Chaos, index: str, timeout: float) -> float | None:
    """Seconds until the writer has applied every change of `index`, None if not within `timeout`."""
    t0 = time.monotonic()
    while pending_changes(ch, index) != 0:
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(0.02)
    return time.monotonic() - t0


def defrag_pid(ch: Chaos) -> int | None:
    try:
        return ch.wait_for(lambda: (ch.workers("neurandefrag") or [None])[0], 15, "neurandefrag to run")
    except BenchError:
        return None


def index_phase(ch: Chaos, report: Report, seed: int, n_vectors: int, sample: int, catch_up_s: float) -> None:
    phase, index, dim = "index", "chaos", 32
    rng = np.random.default_rng(seed)
    ch.start_service()
    ch.sql("SELECT neurondb.create_index(%s, %s, 'l2', 16, 100)", (index, dim))
    shared = SharedState.attach(ch.prefix)
    reader = SharedIndex(shared, index)
    counter = shared.generation(index_key(index))
    base = names.object_name(ch.prefix, index_key(index))
    live: dict[str, np.ndarray] = {}
    deleted: dict[str, np.ndarray] = {}
    run = IndexRun()
    inserted = 0
    t0 = time.monotonic()
    try:
        while inserted < n_vectors:
            size = min(n_vectors - inserted, 200 if inserted == 0 else int(rng.integers(150, 900)))
            # The writer caught up first, so that the graph's count and capacity say exactly which commit
            # makes it grow (a writer that never catches up is reported below; then the load goes on).
            run.writer_stalled = run.writer_stalled or (inserted > 0 and wait_applied(ch, index, 10.0) is None)
            arrays = reader.arrays()
            capacity = arrays.capacity if arrays is not None else None
            crossing = capacity is not None and not run.writer_stalled and arrays.count + size > capacity
            kill = crossing or (inserted > 0 and rng.random() < 0.1)
            pid = defrag_pid(ch) if kill and not run.defrag_gone else None
            run.defrag_gone = run.defrag_gone or (kill and pid is None)
            generation = int(counter)
            docs = [f"d{inserted + i}" for i in range(size)]
            vectors = rng.standard_normal((size, dim)).astype(np.float32)
            copy_rows(ch, index, docs, vectors)
            committed = time.monotonic()
            live.update(zip(docs, vectors, strict=True))
            inserted += size
            if pid is not None:
                run.kills += 1
                run.crossing_kills += crossing
                if crossing and not run.unpublished_left:
                    run.targeted += 1
                    path = names.segment_path(generation_name(base, generation + 1))
                    while not path.exists() and time.monotonic() - committed < 2.0:
                        pass     # busy: the window between creating the segment and publishing it is short
                    appeared = path.exists()
                    os.kill(pid, signal.SIGKILL)
                    run.targeted_hits += appeared
                    time.sleep(0.05)
                    run.unpublished_left += appeared and path.exists() and int(counter) == generation
                else:
                    time.sleep(max(0.0, committed + float(rng.uniform(0, 0.25)) - time.monotonic()))
                    os.kill(pid, signal.SIGKILL)
            if len(live) > 100:
                keys = list(live)
                gone = [keys[i] for i in rng.choice(len(keys), max(1, size // 30), replace=False)]
                ch.sql(f"DELETE FROM {VECTORS} WHERE index_name = %s AND doc_id = ANY(%s)", (index, gone))
                deleted.update((d, live.pop(d)) for d in gone)
                run.deletes += len(gone)
                keys = list(live)
                changed = [keys[i] for i in rng.choice(len(keys), max(1, size // 50), replace=False)]
                new = rng.standard_normal((len(changed), dim)).astype(np.float32)
                with ch.conn.transaction():
                    for doc, vec in zip(changed, new.tolist(), strict=True):
                        ch.sql(f"UPDATE {VECTORS} SET embedding = %s WHERE index_name = %s AND doc_id = %s",
                               (vec, index, doc))
                live.update(zip(changed, new, strict=True))
                run.updates += len(changed)
        load_s = time.monotonic() - t0
        report.figure(phase, "vectors COPYed / deleted / updated", f"{inserted:,} / {run.deletes:,} / {run.updates:,}")
        report.figure(phase, "defrag SIGKILLs (after capacity-step commits)", f"{run.kills} ({run.crossing_kills})")
        report.figure(phase, "targeted kills: segment seen / left unpublished",
                      f"{run.targeted}: {run.targeted_hits} / {run.unpublished_left}")
        report.figure(phase, "load time (s)", load_s)
        report.check(phase, "at least one kill after a commit crossing a capacity step", run.crossing_kills > 0)

        pending = pending_changes(ch, index)
        applied_s = wait_applied(ch, index, catch_up_s)
        took = f"{applied_s:.1f}" if applied_s is not None else f"not within {catch_up_s:.0f}"
        report.figure(phase, "pending changes after the load / seconds to 0", f"{pending} / {took}")
        report.check(phase, "pending changes reach 0", applied_s is not None,
                     f"{pending_changes(ch, index)} pending" + (", the writer stalled during the load"
                                                               if run.writer_stalled else ""))
        check_graph(ch, report, reader, index, live, deleted, sample, rng)
        restarts = next((w.restarts for w in ch.status().workers if w.kind == "neurandefrag"), -1)
        report.figure(phase, "neurandefrag restarts / kills", f"{restarts} / {run.kills}")
        report.check(phase, "neurandefrag restarted once per kill (no crash of its own)", restarts == run.kills)
    finally:
        reader.close()
        shared.close()
    ch.stop_service(phase, report)


def check_graph(ch: Chaos, report: Report, reader: SharedIndex, index: str, live: dict[str, np.ndarray],
                deleted: dict[str, np.ndarray], sample: int, rng: np.random.Generator) -> None:
    """The graph's live nodes are the table's rows with the table's vectors; rows find themselves."""
    phase = "index"
    table = {r[0]: (r[1], np.asarray(r[2], np.float32))
             for r in ch.sql(f"SELECT id, doc_id, embedding FROM {VECTORS} WHERE index_name = %s", (index,))}
    report.check(phase, "the table holds what was written", {d for d, _ in table.values()} == set(live),
                 f"{len(table)} rows, {len(live)} expected")
    arrays = reader.arrays()
    if arrays is None:
        report.check(phase, "the graph exists", False)
        return
    n = arrays.count
    nodes = np.flatnonzero(arrays.tombstones[:n] == 0)
    labels = arrays.labels[nodes].tolist()
    graph = set(labels)
    missing, extra = set(table) - graph, graph - set(table)
    report.figure(phase, "graph: live nodes / table rows / capacity", f"{len(labels):,} / {len(table):,} / "
                                                                      f"{arrays.capacity:,}")
    report.check(phase, "graph labels == table ids", not missing and not extra and len(labels) == len(graph),
                 f"{len(missing)} rows missing, {len(extra)} extra, {len(labels) - len(graph)} duplicated")
    wrong = sum(1 for node, label in zip(nodes.tolist(), labels, strict=True)
                if label in table and not np.allclose(arrays.vectors[node], table[label][1], atol=1e-5))
    report.check(phase, "graph vectors == table vectors", wrong == 0, f"{wrong} differ")
    docs = list(live)
    picked = [docs[i] for i in rng.choice(len(docs), min(sample, len(docs)), replace=False)]
    gone = list(deleted)[: max(1, sample // 10)]
    misses = returned_deleted = 0
    with neurondb.connect(data_dir=str(ch.root)) as client:
        for doc in picked:
            hits = client.search(index, vector=live[doc], k=1, ef=128)
            misses += not hits or hits[0].doc_id != doc
        for doc in gone:
            returned_deleted += any(h.doc_id == doc for h in client.search(index, vector=deleted[doc], k=10, ef=128))
    report.figure(phase, "self-search top-1 misses / searched", f"{misses} / {len(picked)}")
    # An approximate index: a few rows may miss themselves even at ef 128 (tombstones of the deletes and
    # updates stay in the graph until issue 11's maintenance); a damaged graph misses many.
    report.check(phase, "at least 99.5 % of the sampled rows are their own top-1", misses <= len(picked) // 200,
                 f"{misses} misses")
    report.check(phase, "no deleted document returned", returned_deleted == 0,
                 f"{returned_deleted} of {len(gone)} deleted returned")


# -- 3. fuzz --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One bad input: a row to insert (`sql`, `params`) or a search call (`call`), the words one of which a
    clear message names, and what became of it."""

    kind: str                            # queue, llm, vector, search
    what: str
    names: tuple[str, ...] = ()
    sql: str = ""
    params: tuple = ()
    call: dict[str, Any] | None = None
    outcome: str = ""                    # refused, accepted, raised, returned
    message: str = ""
    job_id: int | None = None


QUEUE_INSERT = (f"INSERT INTO {QUEUE} (job_type, payload, tenant_id, priority, max_retries) "
                "VALUES (%s, %s::jsonb, %s, %s, %s) RETURNING job_id")
LLM_INSERT = (f"INSERT INTO {LLM} (operation, model_name, provider, input_text, input_texts, documents, parameters, "
              "tenant_id, priority, max_retries) VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s) "
              "RETURNING job_id")
VECTOR_INSERT = f"INSERT INTO {VECTORS} (index_name, doc_id, embedding) VALUES (%s, %s, %s::real[])"
FUZZ_INDEX, FUZZ_DIM = "fuzz", 8


def nested(depth: int, rng: random.Random, inner: str = "1") -> str:
    """JSON text nested `depth` levels deep (arrays or objects), built as text: json.dumps would recurse."""
    if rng.random() < 0.5:
        return "[" * depth + inner + "]" * depth
    return '{"a":' * depth + inner + "}" * depth


def queue_case(what: str, names_: tuple[str, ...], job_type: str, payload: str, tenant: Any = "default",
               priority: Any = 0, max_retries: Any = None) -> Case:
    return Case("queue", what, names_, QUEUE_INSERT, (job_type, payload, tenant, priority, max_retries))


def queue_cases(rng: random.Random, n: int) -> Iterator[Case]:
    """Bad queue rows, drawn from every family until `n`."""
    j = json.dumps
    types = ["embed", "rerank", "cache_refresh", "http_call"]
    embed_bad = [
        ("missing 'index'", ("index",), {"doc_id": "1", "text": "t"}),
        ("'index' is a number", ("index",), {"index": 5, "doc_id": "1", "text": "t"}),
        ("'index' unknown", ("index",), {"index": "no_such_index", "doc_id": "1", "text": "t"}),
        ("missing 'text'", ("text",), {"index": FUZZ_INDEX, "doc_id": "1"}),
        ("'text' is a list", ("text",), {"index": FUZZ_INDEX, "doc_id": "1", "text": ["a"]}),
        ("missing 'doc_id'", ("doc_id",), {"index": FUZZ_INDEX, "text": "t"}),
        ("'doc_id' is a list", ("doc_id",), {"index": FUZZ_INDEX, "doc_id": [1], "text": "t"}),
        ("'metadata' is a string", ("metadata",), {"index": FUZZ_INDEX, "doc_id": "1", "text": "t", "metadata": "m"}),
        ("'documents' empty", ("documents",), {"index": FUZZ_INDEX, "documents": []}),
        ("'documents' a string", ("documents",), {"index": FUZZ_INDEX, "documents": "abc"}),
        ("'documents' of numbers", ("documents",), {"index": FUZZ_INDEX, "documents": [1, 2]}),
        ("document without text", ("text", "documents"), {"index": FUZZ_INDEX, "documents": [{"doc_id": "1"}]}),
    ]
    rerank_bad = [
        ("missing 'query'", ("query",), {"documents": ["a"]}),
        ("'query' a number", ("query",), {"query": 1, "documents": ["a"]}),
        ("missing 'documents'", ("documents",), {"query": "q"}),
        ("'documents' a string", ("documents",), {"query": "q", "documents": "a"}),
        ("'documents' of objects without text", ("documents",), {"query": "q", "documents": [{"id": 1}]}),
        ("'top_n' a string", ("top_n",), {"query": "q", "documents": ["a"], "top_n": "3"}),
        ("'top_n' a fraction", ("top_n",), {"query": "q", "documents": ["a"], "top_n": 1.5}),
        ("'model' unknown", ("model",), {"query": "q", "documents": ["a"], "model": "no-such-model"}),
    ]
    cache_bad = [
        ("missing 'cache'", ("cache",), {}),
        ("'cache' unknown", ("cache",), {"cache": "nope"}),
        ("'action' unknown", ("action",), {"cache": "llm", "action": "zap"}),
        ("'keys' a string", ("keys",), {"cache": "llm", "keys": "k"}),
        ("'older_than' a string", ("older_than",), {"cache": "llm", "older_than": "old"}),
        ("result cache without 'name'", ("name",), {"cache": "result"}),
        ("refresh of the llm cache", ("action", "refresh", "expire"), {"cache": "llm", "action": "refresh"}),
    ]
    http_bad = [
        ("missing 'url'", ("url",), {}),
        ("'url' a number", ("url",), {"url": 5}),
        ("'url' not a URL", ("url", "scheme"), {"url": "not a url"}),
        ("'url' empty", ("url", "scheme"), {"url": ""}),
        ("'url' without host", ("url", "host"), {"url": "http:///x"}),
        ("'url' bad port", ("url", "port", "loopback"), {"url": "http://127.0.0.1:99999/"}),
        ("'url' unclosed IPv6", ("url", "host"), {"url": "http://[::1/"}),
        ("'url' file scheme", ("url", "scheme"), {"url": "file:///etc/passwd"}),
        ("'url' javascript scheme", ("url", "scheme"), {"url": "javascript:alert(1)"}),
        ("'url' ftp scheme", ("url", "scheme"), {"url": "ftp://127.0.0.1/x"}),
        ("'url' loopback", ("url", "127.0.0.1", "loopback", "allowlist"), {"url": "http://127.0.0.1:9/hook"}),
        ("'url' loopback v6", ("url", "::1", "loopback", "allowlist"), {"url": "http://[::1]:9/hook"}),
        ("'url' 0.0.0.0", ("url", "0.0.0.0", "allowlist"), {"url": "http://0.0.0.0:9/"}),
        ("'url' with a password", ("url", "127.0.0.1", "loopback", "allowlist"),
         {"url": f"http://admin:{SECRET}@127.0.0.1:9/x"}),
        ("'url' with a token in the query", ("url", "127.0.0.1", "loopback", "allowlist"),
         {"url": f"http://127.0.0.1:9/x?token={SECRET}"}),
        ("'url' malformed, with a password", ("url", "host"), {"url": f"http://admin:{SECRET}@[::1/x"}),
        ("'url' bad port, with a password", ("url", "port", "loopback"),
         {"url": f"http://admin:{SECRET}@127.0.0.1:99999/x"}),
        ("'method' unknown", ("method",), {"url": "http://127.0.0.1:9/", "method": "FETCH"}),
        ("'method' a number", ("method",), {"url": "http://127.0.0.1:9/", "method": 7}),
        ("'headers' a list", ("headers",), {"url": "http://127.0.0.1:9/", "headers": ["a"]}),
        ("'headers' values not strings", ("headers",), {"url": "http://127.0.0.1:9/", "headers": {"a": 1}}),
        ("'timeout' negative", ("timeout",), {"url": "http://127.0.0.1:9/", "timeout": -1}),
        ("'timeout' a string", ("timeout",), {"url": "http://127.0.0.1:9/", "timeout": "10"}),
        ("both 'json' and 'body'", ("json", "body"), {"url": "http://127.0.0.1:9/", "json": {}, "body": "x"}),
        ("'expected_status' a string", ("expected_status",), {"url": "http://127.0.0.1:9/", "expected_status": "200"}),
    ]
    families: list[Callable[[], Case]] = []
    for table, jt in ((embed_bad, "embed"), (rerank_bad, "rerank"), (cache_bad, "cache_refresh"),
                      (http_bad, "http_call")):
        for what, names_, payload in table:
            families.append(lambda jt=jt, what=what, names_=names_, payload=payload:
                            queue_case(f"{jt}: {what}", names_, jt, j(payload)))
    families += [
        lambda: queue_case("unknown job type", ("job type", "unknown"),
                           rng.choice(["no_such_type", "EMBED", " embed", "embed\n", "émbed", "http-call", "x" * 99]),
                           "{}"),
        lambda: queue_case("non-object payload", ("payload",), rng.choice(types),
                           rng.choice(["[]", '"text"', "42", "null", "true", "[1, 2]", "3.5"])),
        lambda: queue_case("huge job type", ("job_type", "job type"), "t" * rng.randint(101, 20_000), "{}"),
        lambda: queue_case("empty job type", ("job_type", "job type"), "", "{}"),
        lambda: queue_case("huge tenant", ("tenant",), "rerank", j({"query": "q", "documents": ["a"]}),
                           tenant="t" * rng.randint(65, 5000)),
        lambda: queue_case("empty tenant", ("tenant",), "rerank", j({"query": "q", "documents": ["a"]}), tenant=""),
        lambda: queue_case("huge index name", ("index",), "embed",
                           j({"index": "i" * rng.randint(1000, 200_000), "doc_id": "1", "text": "t"})),
        lambda: queue_case("huge URL", ("url",), "http_call", j({"url": "http://127.0.0.1:9/" + "p" * 100_000})),
        lambda: queue_case("NaN in a number", ("older_than",), "cache_refresh", '{"cache": "llm", "older_than": NaN}'),
        lambda: queue_case("priority out of range", ("priority",), "rerank", j({"query": "q", "documents": ["a"]}),
                           priority=rng.choice([40_000, -40_000, 2**40])),
        lambda: queue_case("priority not a number", ("priority",), "rerank", j({"query": "q", "documents": ["a"]}),
                           priority=rng.choice(["high", "1.5", ""])),
        lambda: queue_case("max_retries out of range", ("max_retries", "retries"), "rerank",
                           j({"query": "q", "documents": ["a"]}), max_retries=rng.choice([-1, 101, 10**6])),
    ]
    for _ in range(n):
        yield rng.choice(families)()


UNDECODABLE_NAMES = ("payload", "parameters", "nest", "deep", "depth", "number", "infinit", "range", "json")


def undecodable_queue_case(rng: random.Random) -> Case:
    """A payload PostgreSQL stores but a JSON decoder refuses: nested 1,000-3,000 deep, or a number
    beyond double range (1e999)."""
    jt = rng.choice(["embed", "rerank", "cache_refresh", "http_call", "chaos.record"])
    if rng.random() < 0.25:
        return queue_case(f"{jt}: a number beyond double range", UNDECODABLE_NAMES, jt, '{"n": 1e999}')
    depth = rng.randint(1000, 3000)
    payload = nested(depth, rng) if rng.random() < 0.3 else '{"x": ' + nested(depth, rng) + "}"
    return queue_case(f"{jt}: payload nested 1,000-3,000 deep", UNDECODABLE_NAMES, jt, payload)


def llm_case(what: str, names_: tuple[str, ...], operation: Any, input_text: Any = None, input_texts: Any = None,
             documents: Any = None, parameters: str = "{}", model: Any = None, provider: Any = None,
             tenant: Any = "default", priority: Any = 0, max_retries: Any = None) -> Case:
    return Case("llm", what, names_, LLM_INSERT, (operation, model, provider, input_text, input_texts, documents,
                                                  parameters, tenant, priority, max_retries))


def llm_cases(rng: random.Random, n: int) -> Iterator[Case]:
    families: list[Callable[[], Case]] = [
        lambda: llm_case("unknown operation", ("operation",),
                         rng.choice(["chat", "summarize", "", "EMBEDDINGS", "gen"]), input_text="x"),
        lambda: llm_case("non-object parameters", ("parameters",), rng.choice(["embedding", "reranking"]),
                         input_text="q", documents=["a"], parameters=rng.choice(["[]", '"x"', "1", "null", "[{}]"])),
        lambda: llm_case("completion without input_text", ("input_text", "prompt"), "completion"),
        lambda: llm_case("embedding without input", ("input_text", "input_texts"), "embedding"),
        lambda: llm_case("embedding with both inputs", ("input_text", "input_texts"), "embedding", input_text="a",
                         input_texts=["b"]),
        lambda: llm_case("embedding with empty input_texts", ("input_texts",), "embedding", input_texts=[]),
        lambda: llm_case("embedding with a NULL text", ("input_texts", "null"), "embedding", input_texts=["a", None]),
        lambda: llm_case("reranking without documents", ("documents",), "reranking", input_text="q"),
        lambda: llm_case("reranking without query", ("input_text", "query"), "reranking", documents=["a"]),
        lambda: llm_case("reranking with a NULL document", ("documents", "null"), "reranking", input_text="q",
                         documents=["a", None]),
        lambda: llm_case("reranking with top_n a string", ("top_n",), "reranking", input_text="q", documents=["a"],
                         parameters='{"top_n": "x"}'),
        lambda: llm_case("unknown local model", ("model",), "embedding", input_text="a", model="no-such-model"),
        lambda: llm_case("unknown provider", ("provider",), "embedding", input_text="a", provider="nope"),
        lambda: llm_case("empty tenant", ("tenant",), "embedding", input_text="a", tenant=""),
        lambda: llm_case("max_retries out of range", ("max_retries", "retries"), "embedding", input_text="a",
                         max_retries=rng.choice([-1, 101])),
        lambda: llm_case("priority not a number", ("priority",), "embedding", input_text="a", priority="urgent"),
        lambda: llm_case("completion sent to an endpoint that refuses connections (a password in its URL)",
                         ("connect", "refused", "endpoint", "provider"), "completion", input_text="hello"),
    ]
    for _ in range(n):
        yield rng.choice(families)()


def undecodable_llm_case(rng: random.Random) -> Case:
    """LLM parameters a JSON decoder refuses (see undecodable_queue_case)."""
    operation = rng.choice(["embedding", "reranking"])
    if rng.random() < 0.25:
        return llm_case("parameters with a number beyond double range", UNDECODABLE_NAMES, operation,
                        input_text="q", documents=["a"], parameters='{"top_n": 1e999}')
    depth = rng.randint(1000, 3000)
    return llm_case("parameters nested 1,000-3,000 deep", UNDECODABLE_NAMES, operation, input_text="q",
                    documents=["a"], parameters='{"x": ' + nested(depth, rng) + "}")


def vector_cases(rng: random.Random, n: int) -> Iterator[Case]:
    def vec(values: list[str]) -> str:
        return "{" + ",".join(values) + "}"

    ok = [str(round(rng.uniform(-1, 1), 3)) for _ in range(FUZZ_DIM)]
    families: list[Callable[[], tuple[str, Any, Any]]] = [
        lambda: ("wrong dimension", FUZZ_INDEX, vec(ok[: rng.choice([1, FUZZ_DIM - 1])] + ok * rng.choice([0, 2]))),
        lambda: ("empty vector", FUZZ_INDEX, "{}"),
        lambda: ("NaN element", FUZZ_INDEX, vec([*ok[:-1], "NaN"])),
        lambda: ("infinite element", FUZZ_INDEX, vec([*ok[:-1], rng.choice(["Infinity", "-Infinity", "1e39"])])),
        lambda: ("NULL element", FUZZ_INDEX, vec([*ok[:-1], "NULL"])),
        lambda: ("two-dimensional", FUZZ_INDEX, "{" + vec(ok[:4]) + "," + vec(ok[4:]) + "}"),
        lambda: ("NULL embedding", FUZZ_INDEX, None),
        lambda: ("unknown index", "no_such_index", vec(ok)),
    ]
    for i in range(n):
        what, index, embedding = rng.choice(families)()
        yield Case("vector", what, (), VECTOR_INSERT, (index, f"bad{i}", embedding))


def search_cases(rng: random.Random, n: int) -> Iterator[Case]:
    good = [0.1] * FUZZ_DIM
    families: list[tuple[str, tuple[str, ...], Callable[[], dict[str, Any]]]] = [
        ("unknown index", ("index",), lambda: {"index": rng.choice(["nope", "", "x" * 500]), "vector": good}),
        ("index not a string", ("index",), lambda: {"index": rng.choice([5, None, ["fuzz"]]), "vector": good}),
        ("wrong dimension", ("dimension", "vector"), lambda: {"vector": [0.1] * rng.choice([1, 7, 9, 100])}),
        ("NaN in the vector", ("nan", "vector"), lambda: {"vector": [float("nan"), *good[1:]]}),
        ("infinity in the vector", ("infinit", "vector"), lambda: {"vector": [float("inf"), *good[1:]]}),
        ("vector a string", ("vector",), lambda: {"vector": rng.choice(["abc", "0.1,0.2"])}),
        ("vector ragged", ("vector",), lambda: {"vector": [[0.1, 0.2], [0.3]]}),
        ("vector of strings", ("vector",), lambda: {"vector": ["a"] * FUZZ_DIM}),
        ("vector a dict", ("vector",), lambda: {"vector": {"a": 1}}),
        ("neither vector nor text", ("vector", "text"), lambda: {}),
        ("k out of range", ("k",), lambda: {"vector": good, "k": rng.choice([0, -5, 1001, 10**9])}),
        ("k not an integer", ("k",), lambda: {"vector": good, "k": rng.choice(["10", 1.5, None, [3]])}),
        ("ef out of range", ("ef",), lambda: {"vector": good, "ef": rng.choice([0, -1, 10**9])}),
        ("ef not an integer", ("ef",), lambda: {"vector": good, "ef": rng.choice(["x", 2.5, [1]])}),
        ("tenant not a string", ("tenant",), lambda: {"vector": good, "tenant": rng.choice([5, ["a"], {"t": 1}])}),
        ("hybrid_weight out of range", ("hybrid_weight",),
         lambda: {"text": "cat", "hybrid_weight": rng.choice([2.0, -1.0, float("nan")])}),
        ("hybrid_weight not a number", ("hybrid_weight",), lambda: {"text": "cat", "hybrid_weight": "half"}),
        ("text not a string", ("text",), lambda: {"text": rng.choice([5, ["a"], b"bytes"])}),
    ]
    for _ in range(n):
        what, names_, make = rng.choice(families)
        yield Case("search", what, names_, call={"index": FUZZ_INDEX, **make()})


def unclear(message: str, names_: tuple[str, ...]) -> str | None:
    """Why `message` is not a clear one-line error naming one of `names_`, or None if it is."""
    text = message.strip()
    if not text:
        return "empty"
    if "Traceback" in text:
        return "contains a traceback"
    if "\n" in text:
        return "several lines"
    if RAW_CONSTRAINT.search(text):
        return "raw constraint name"
    if len(text) > MAX_MESSAGE:
        return f"{len(text):,} characters (the value is not shortened)"
    if names_ and not any(n.lower() in text.lower() for n in names_):
        return f"names none of {', '.join(names_)}"
    return None


def run_case(ch: Chaos, client: Any, case: Case) -> None:
    if case.call is not None:
        try:
            client.search(**case.call)
            case.outcome, case.message = "returned", "(no error)"
        except SearchError as exc:
            case.outcome, case.message = "raised", str(exc)
        except Exception as exc:
            case.outcome, case.message = "raised", f"{type(exc).__name__} (not SearchError): {exc}"
        return
    try:
        rows = ch.sql(case.sql, case.params)
        case.outcome = "accepted"
        case.job_id = rows[0][0] if rows else None
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        case.outcome, case.message = "refused", exc.diag.message_primary or str(exc)
    except (ValueError, OverflowError) as exc:   # refused by the client library before reaching the server
        case.outcome, case.message = "refused", f"{type(exc).__name__}: {exc}"


def good_jobs(ch: Chaos, file: Path, n: int) -> tuple[list[int], list[int]]:
    queue_ids = [r[0] for r in ch.sql(
        f"INSERT INTO {QUEUE} (job_type, payload) SELECT 'chaos.record', jsonb_build_object('file', %s::text) "
        "FROM generate_series(1, %s::int) RETURNING job_id", (str(file), n))]
    queue_ids += [r[0] for r in ch.sql(f"INSERT INTO {QUEUE} (job_type, payload) VALUES ('rerank', %s::jsonb) "
                                       "RETURNING job_id", (json.dumps({"query": "q", "documents": ["q a", "b"]}),))]
    llm_ids = [r[0] for r in ch.sql(f"INSERT INTO {LLM} (operation, input_text) VALUES ('embedding', %s) "
                                    "RETURNING job_id", (f"good text {random.random()}",))]
    return queue_ids, llm_ids


def wait_finished(ch: Chaos, queue_ids: list[int], llm_ids: list[int], timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        left = ch.sql(f"SELECT (SELECT count(*) FROM {QUEUE} WHERE job_id = ANY(%s) AND status IN ('pending', "
                      f"'processing')) + (SELECT count(*) FROM {LLM} WHERE job_id = ANY(%s) AND status IN "
                      "('pending', 'processing'))", (queue_ids, llm_ids))[0][0]
        if left == 0:
            break
        time.sleep(0.25)
    return time.monotonic() - t0


def restart_counts(ch: Chaos) -> dict[str, tuple[int, int, str]]:
    """name -> (restarts, pid, state), as `neurondb status --json` shows them."""
    out = ch.cli("status", "--json", check=False)
    data = json.loads(out[out.index("{"):])
    return {w["name"]: (w["restarts"], w["pid"], w["state"]) for w in data["workers"]}


def fuzz_phase(ch: Chaos, report: Report, rng: random.Random, n_cases: int, timeout: float) -> None:
    phase = "fuzz"
    file = ch.root / "fuzz-good.log"
    # The LLM endpoint carries a password: completions fail to connect, and it must show in no message.
    ch.start_service(neuranq_retry_delay="100ms", neuranq_retry_max_delay="500ms",
                     neuranllm_retry_delay="100ms", neuranllm_retry_max_delay="500ms",
                     llm_endpoint=f"http://chaos:{SECRET}@127.0.0.1:9")
    ch.sql("SELECT neurondb.create_index(%s, %s, 'l2', provider => 'local', model_name => %s)",
           (FUZZ_INDEX, FUZZ_DIM, f"hash-{FUZZ_DIM}"))
    ch.sql(f"INSERT INTO {VECTORS} (index_name, doc_id, content, embedding) SELECT %s, 'ok' || g, 'a cat ' || g, "
           f"array_fill(g::real / 100, ARRAY[{FUZZ_DIM}]) FROM generate_series(1, 50) g", (FUZZ_INDEX,))
    before = restart_counts(ch)
    n_undecodable = max(10, n_cases // 40)
    n_flat = n_cases - 2 * n_undecodable
    cases = (list(queue_cases(rng, n_flat * 50 // 100)) + list(llm_cases(rng, n_flat * 20 // 100))
             + list(vector_cases(rng, n_flat * 12 // 100)))
    cases += list(search_cases(rng, n_flat - len(cases)))
    rng.shuffle(cases)
    undecodable = ([undecodable_queue_case(rng) for _ in range(n_undecodable)]
                   + [undecodable_llm_case(rng) for _ in range(n_undecodable)])
    rng.shuffle(undecodable)
    good_q: list[int] = []
    good_l: list[int] = []
    rounds: list[tuple[str, list[Case], float, tuple[list[int], list[int]]]] = []
    with neurondb.connect(data_dir=str(ch.root)) as client:
        ch.wait_for(lambda: _loaded(client), 30, "the fuzz index to be loaded")
        for label, batch in (("round 1", cases), ("round 2 (undecodable JSON)", undecodable)):
            t0 = time.monotonic()
            round_q: list[int] = []
            round_l: list[int] = []
            for i, case in enumerate(batch):
                run_case(ch, client, case)
                if i % 10 == 9 or i == len(batch) - 1:   # and after the last: the queues must go on
                    q, ll = good_jobs(ch, file, 1)
                    round_q += q
                    round_l += ll
            accepted_q = [c.job_id for c in batch if c.kind == "queue" and c.outcome == "accepted"]
            accepted_l = [c.job_id for c in batch if c.kind == "llm" and c.outcome == "accepted"]
            waited = wait_finished(ch, accepted_q + round_q, accepted_l + round_l, timeout)
            rounds.append((label, batch, time.monotonic() - t0, (round_q, round_l)))
            good_q += round_q
            good_l += round_l
            report.figure(phase, f"{label}: inputs / seconds (waiting for the rows {waited:.0f} s)",
                          f"{len(batch)} / {time.monotonic() - t0:.0f}")
            done_q = ch.sql(f"SELECT count(*) FROM {QUEUE} WHERE job_id = ANY(%s) AND status = 'completed'",
                            (round_q,))[0][0]
            done_l = ch.sql(f"SELECT count(*) FROM {LLM} WHERE job_id = ANY(%s) AND status = 'completed'",
                            (round_l,))[0][0]
            report.check(phase, f"{label}: interleaved good jobs all complete",
                         done_q == len(round_q) and done_l == len(round_l),
                         f"queue {done_q}/{len(round_q)}, llm {done_l}/{len(round_l)}")
    judge_fuzz(ch, report, cases + undecodable)
    after = restart_counts(ch)
    changed = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    report.check(phase, "0 worker crashes (restarts, pids and states in `neurondb status --json` unchanged)",
                 not changed, "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))
    log_text = ch.datadir.log_file.read_text(errors="replace") if ch.datadir.log_file.exists() else ""
    report.check(phase, "the password of a URL appears in no log line", SECRET not in log_text,
                 f"{log_text.count(SECRET)} occurrences in {ch.datadir.log_file.name}")
    ch.stop_service(phase, report)


def _loaded(client: Any) -> bool:
    try:
        client._graph(FUZZ_INDEX)
        return True
    except SearchError:
        return False


def judge_fuzz(ch: Chaos, report: Report, cases: list[Case]) -> None:
    """Final state of every accepted row; each input classified clear or not; counts and examples."""
    phase = "fuzz"
    finals: dict[tuple[str, int], tuple[str, str | None]] = {}
    for kind, table in (("queue", QUEUE), ("llm", LLM)):
        ids = [c.job_id for c in cases if c.kind == kind and c.job_id is not None]
        for job_id, status, message in ch.sql(f"SELECT job_id, status, error_message FROM {table} "
                                              "WHERE job_id = ANY(%s)", (ids,)):
            finals[(kind, job_id)] = (status, message)
    tally: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    examples: dict[str, str] = {}       # one per kind of input, the first seen
    unclear_by: Counter[str] = Counter()
    leaked: Counter[str] = Counter()
    for c in cases:
        by_kind[c.kind] += 1
        if c.outcome == "accepted":
            status, message = finals.get((c.kind, c.job_id or 0), ("missing", None))
            c.message = message or ""
            if c.kind == "vector":
                verdict, why = "accepted bad vector", "the table took it"
            elif status in ("pending", "processing", "missing"):
                verdict, why = "stuck", f"still {status}"
            elif status == "completed":
                verdict, why = "completed although bad", "completed"
            else:
                why = unclear(c.message, c.names) or ""
                verdict = "failed, unclear message" if why else "failed, clear message"
        elif c.outcome == "refused":
            why = unclear(c.message, ()) or ""
            verdict = "refused at insert, unclear" if why else "refused at insert, clear"
        elif c.outcome == "returned":
            verdict, why = "search accepted bad arguments", "no error"
        else:
            why = unclear(c.message, c.names) or ""
            if "(not SearchError)" in c.message:
                why = why or "not a SearchError"
            verdict = "search error, unclear" if why else "search error, clear"
        if SECRET in c.message:
            leaked[f"[{c.kind}] {c.what}"] += 1
        tally[verdict] += 1
        if why:
            unclear_by[f"[{c.kind}] {c.what}"] += 1
            examples.setdefault(f"[{c.kind}] {c.what}", f"{verdict}, {why}: {c.message[:150]!r}")
    kinds = ", ".join(f"{k} {v}" for k, v in by_kind.items())
    report.figure(phase, "bad inputs generated", f"{len(cases):,} ({kinds})")
    for verdict in ("refused at insert, clear", "refused at insert, unclear", "failed, clear message",
                    "failed, unclear message", "completed although bad", "stuck", "accepted bad vector",
                    "search error, clear", "search error, unclear", "search accepted bad arguments"):
        report.figure(phase, verdict, tally.get(verdict, 0))
    for i, (what, example) in enumerate(list(examples.items())[:10], 1):
        report.figure(phase, f"unclear example {i}", f"{what} (x{unclear_by[what]}): {example}")
    if len(examples) > 10:
        report.figure(phase, "other inputs without a clear answer",
                      ", ".join(f"{w} x{n}" for w, n in list(unclear_by.items())[10:]))
    bad = len(cases) - tally["refused at insert, clear"] - tally["failed, clear message"] - tally["search error, clear"]
    report.check(phase, "at least 1,000 bad inputs" if len(cases) >= 1000 else "bad inputs generated (quick run)",
                 len(cases) >= 1000 or len(cases) >= 100, f"{len(cases)}")
    report.check(phase, "every bad input refused or failed with a clear message", bad == 0,
                 f"{bad} not: " + ", ".join(f"{v} {n}" for v, n in tally.items() if "clear" not in v or "unclear" in v))
    report.check(phase, "no bad row left pending or processing", tally["stuck"] == 0, f"{tally['stuck']} stuck")
    report.check(phase, "the password of a URL appears in no error message", not leaked,
                 ", ".join(f"{w} x{n}" for w, n in leaked.items()))


# -- main -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queue", action="store_true", help="run the queue phase (default: all phases)")
    parser.add_argument("--index", action="store_true", help="run the index phase")
    parser.add_argument("--fuzz", action="store_true", help="run the fuzz phase")
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    parser.add_argument("--quick", action="store_true", help="scaled-down counts: a 1-2 minute smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (stopped)")
    args = parser.parse_args(argv)
    phases = [p for p in ("queue", "index", "fuzz") if getattr(args, p)] or ["queue", "index", "fuzz"]
    scale = {"jobs": 1_500, "kills": 10, "supervisor": 1, "quiet": 20.0, "vectors": 5_000, "sample": 500,
             "catch_up": 20.0, "fuzz": 300, "fuzz_wait": 20.0} if args.quick else \
        {"jobs": 10_000, "kills": 50, "supervisor": 2, "quiet": 60.0, "vectors": 20_000, "sample": 2_000,
         "catch_up": 60.0, "fuzz": 1_200, "fuzz_wait": 60.0}
    install_sigterm_handler()
    report = Report()
    ch = Chaos()
    t_begin = time.monotonic()
    load_before = os.getloadavg()[0]

    def body() -> None:
        log(f"scratch installation {ch.root}")
        ch.setup()
        for phase in phases:
            rng = random.Random(f"{args.seed}-{phase}")
            t0 = time.monotonic()
            try:
                if phase == "queue":
                    queue_phase(ch, report, rng, scale["jobs"], scale["kills"], scale["supervisor"], scale["quiet"])
                elif phase == "index":
                    index_phase(ch, report, args.seed, scale["vectors"], scale["sample"], scale["catch_up"])
                else:
                    fuzz_phase(ch, report, rng, scale["fuzz"], scale["fuzz_wait"])
            except (BenchError, psycopg.Error) as exc:
                report.check(phase, "the phase ran to its end", False, str(exc).splitlines()[0])
                log(str(exc))
                ch.cli("stop", "-m", "immediate", check=False, timeout=60)
            report.figure(phase, "phase wall time (s)", time.monotonic() - t0)

    code = guarded(body, lambda: ch.cleanup(args.keep))
    report.figure("run", "wall time (s)", time.monotonic() - t_begin)
    header = {"outcome": OUTCOMES[code], "phases": ", ".join(phases) + (" (--quick)" if args.quick else ""),
              "seed": str(args.seed), "neurondb": code_version(show_repo_root=True),
              "machine": f"{os.cpu_count()} CPUs, load avg {load_before:.2f} before / {os.getloadavg()[0]:.2f} after"}
    print(report.render(header))
    if code:
        return code
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
