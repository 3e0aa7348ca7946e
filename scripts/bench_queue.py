#!/usr/bin/env python3
"""Benchmark neuranq, the job queue, against PGQueuer on the same PostgreSQL (issue 4).

Per configuration -- neurondb with 1 and 2 queue processes (`neurondb.neuranq_workers`), PGQueuer with 1
and 2 worker processes (psycopg driver) -- it prints, as medians over `--reps` repetitions (default 3):

- enqueue rate: `--n` no-op jobs (default 20,000) enqueued in batches of `--batch` (default 100) from one
  connection, one statement and one commit per batch (`neurondb.queue.enqueue_many`; PGQueuer's
  `enqueue` with lists), while nothing consumes them;
- drain rate: n / time from "start consuming" to "no job left pending or running", polled every 10 ms
  from another connection. neurondb: the service runs with `neurondb.neuranq_enabled = off` while jobs
  are enqueued, then the clock starts as the setting is turned on and the supervisor gets SIGHUP (the
  reload itself is timed). PGQueuer: its workers are started, connected and registered beforehand and
  the clock starts when they are told to begin dequeueing. Both dequeue `--batch` jobs per claim;
- pickup latency at light load: with the consumer idle, one job every 10 ms for `--latency-seconds`
  (default 5, split over the repetitions); latency = the claim's `now()` minus the enqueue's `now()`,
  both server timestamps of the committed rows (neurondb: `started_at - created_at`; PGQueuer: the
  `picked` minus the `queued` entry of its own `pgqueuer_log`, which it writes in the same statements),
  so the two are measured the same way and no client clock is involved. p50 and nearest-rank p99.
  It runs right after the drain, so neurondb's table still holds the n finished jobs (it keeps them for
  `neurondb.job_retention`, a week by default) and PGQueuer's log its entries: as in steady operation.

A second baseline, the naive loop (issue 12): one psycopg connection in this process claims `--batch`
jobs from neurondb's own table with SKIP LOCKED and commits (synchronous_commit off, as neuranq's claim),
runs nothing, marks them completed and commits again, until a claim is empty; same jobs, enqueued the
same way, interleaved with the other configurations, the service stopped meanwhile. No pickup latency.

Then the ratio of each neurondb drain rate to PGQueuer's with the same number of processes, to the best
PGQueuer figure and to the naive loop, and whether the targets are met: drain >= 1.5 x PGQueuer (issue 4),
pickup p50 < 10 ms, one neurondb process >= 0.7 x the naive loop (issue 12).

Last, the enqueue cost (issue 12): the median time of one `--batch`-row `queue.enqueue_many` statement
(autocommit, its commit included) with 0, 20,000 and 100,000 jobs pending and nothing consuming
(`--enqueue-statements` timed per backlog, each batch deleted again untimed), and the ratio 100k / 0
(target <= 1.3).

Fairness: one PostgreSQL server, default durable settings (fsync, synchronous_commit on), one database
per system. Before each enqueue and each drain both systems get the same treatment: their tables
truncated (before enqueueing), `ANALYZE` of the queue table and a `CHECKPOINT` (so neither drain pays for a
checkpoint the other did not). Configurations are interleaved and their order reversed on every other
repetition, so a noisy neighbour or a drifting machine hits all of them alike. PGQueuer runs its
QueueManager alone (no cron scheduler) with its defaults apart from the batch size; neurondb runs its
whole service (all four workers) with its defaults apart from the batch size, queue depth and the job
module.

Everything lives in fresh temporary directories under /tmp: the embedded PostgreSQL (`neurondb init`) and
the neurondb service's data directory. Both are stopped and removed at the end, also on Ctrl-C or an
error. With `--dsn`, that server is used instead (the role needs CREATEDB): two databases are created
there and dropped at the end.

    .venv/bin/python scripts/bench_queue.py [--n 20000] [--batch 100] [--reps 3] [--quick] [--no-pgqueuer]
        [--json] [--dsn DSN]

About three minutes with the defaults on two cores (`--quick`: one repetition, about one). Needs PGQueuer:
`pip install -e '.[bench]'`, or `--no-pgqueuer` to leave it out. The report names the neurondb it measured
(directory, commit, uncommitted changes); to measure a commit while the tree is being edited, run against
an export:
`git archive HEAD | tar -x -C /tmp/nb && PYTHONPATH=/tmp/nb .venv/bin/python scripts/bench_queue.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
from benchlib import (
    OUTCOMES,
    BenchError,
    Scratch,
    clean_env,
    code_version,
    guarded,
    install_sigterm_handler,
    log,
    median,
    percentile,
    run_cli,
    scratch_dir,
)

from neurondb import db, queue
from neurondb.paths import DataDir
from neurondb.supervisor import read_pid

SCRIPTS = Path(__file__).resolve().parent
NQ_JOB = "bench.noop"            # registered by scripts/bench_jobs.py
PGQ_ENTRYPOINT = "bench_noop"    # idem, for PGQueuer
POLL_S = 0.010                   # drain completion polling period
LIGHT_INTERVAL_S = 0.010         # light load: one job every 10 ms
SETTLE_S = 0.5                   # pause before the light-load phase so that the consumer is idle
DRAIN_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 60.0
TARGET_RATIO = 1.5
TARGET_P50_MS = 10.0
TARGET_NAIVE_RATIO = 0.7         # neuranq with one process vs the naive loop (issue 12)
TARGET_BACKLOG_RATIO = 1.3       # enqueue cost at the largest backlog vs at an empty queue (issue 12)
BACKLOGS = (0, 20_000, 100_000)
NQ_TABLE = "neurondb.neurondb_job_queue"


def with_dbname(dsn: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)


def paced(duration_s: float, interval_s: float, enqueue_one: Callable[[int], Any]) -> list[Any]:
    """Call `enqueue_one(i)` every `interval_s` for `duration_s`. A call that overruns its slot delays the
    next one instead of causing a catch-up burst: the load stays "light" whatever the enqueue costs."""
    out = []
    deadline = time.monotonic() + duration_s
    next_at = time.monotonic()
    i = 0
    while next_at < deadline:
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        out.append(enqueue_one(i))
        i += 1
        next_at = max(next_at + interval_s, time.monotonic())
    return out


def wait_until(conn: psycopg.Connection, done_sql: str, timeout: float, what: str, params: Any = None) -> float:
    """Poll `done_sql` (one boolean) every POLL_S until true; the monotonic time it was first seen true."""
    deadline = time.monotonic() + timeout
    while True:
        if conn.execute(done_sql, params).fetchone()[0]:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(POLL_S)


def checkpoint(conn: psycopg.Connection) -> None:
    """Flush dirty buffers now, so that no measured phase pays for a checkpoint another one did not."""
    try:
        conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        pass   # an external server where we are not allowed to: both systems are treated alike anyway


@dataclass
class Figures:
    """Everything measured for one configuration (system, number of processes), all repetitions."""

    system: str
    processes: int
    enqueue: list[float] = field(default_factory=list)        # jobs/s, one per repetition
    drain: list[float] = field(default_factory=list)          # jobs/s, wall clock from "go"
    drain_server: list[float] = field(default_factory=list)   # jobs/s, first claim -> last completion (server)
    latency_ms: list[float] = field(default_factory=list)     # pickup latencies, all repetitions pooled
    latency_p50_runs: list[float] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.system}/{self.processes}"

    def summary(self) -> dict[str, Any]:
        return {
            "system": self.system, "processes": self.processes,
            "enqueue_jobs_s": median(self.enqueue), "drain_jobs_s": median(self.drain),
            "drain_server_jobs_s": median(self.drain_server),
            "pickup_p50_ms": percentile(self.latency_ms, 0.50), "pickup_p99_ms": percentile(self.latency_ms, 0.99),
            "pickup_n": len(self.latency_ms),
            "runs": {"enqueue_jobs_s": [round(x, 1) for x in self.enqueue],
                     "drain_jobs_s": [round(x, 1) for x in self.drain],
                     "drain_server_jobs_s": [round(x, 1) for x in self.drain_server],
                     "pickup_p50_ms": [round(x, 2) for x in self.latency_p50_runs]},
        }


# -- the server -------------------------------------------------------------------------------------------


class Server:
    """The one PostgreSQL both systems use, with a fresh database for each: the embedded server of a
    temporary `neurondb init` data directory, or the server of `--dsn`."""

    def __init__(self, dsn: str | None, env: dict[str, str]) -> None:
        self.external_dsn = dsn
        self.env = env
        self.pg_root: Path | None = None
        self.admin_dsn = ""
        tag = uuid.uuid4().hex[:8]
        self.databases = {"neurondb": f"bench_neurondb_{tag}", "pgqueuer": f"bench_pgqueuer_{tag}"}
        self.created: list[str] = []

    def start(self) -> None:
        if self.external_dsn:
            self.admin_dsn = self.external_dsn
        else:
            self.pg_root = scratch_dir("neurondb-bench-queue-pg-")
            log(f"embedded PostgreSQL: neurondb init -D {self.pg_root}")
            run_cli(["init", "-D", str(self.pg_root)], self.env, timeout=180)
            self.admin_dsn = db.resolve_dsn(DataDir(self.pg_root))
        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            for name in self.databases.values():
                admin.execute(f'CREATE DATABASE "{name}"')
                self.created.append(name)
            settings = dict(admin.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', "
                "'wal_level', 'shared_buffers', 'server_version', 'full_page_writes')").fetchall())
        self.settings = settings

    def dsn(self, system: str) -> str:
        return with_dbname(self.admin_dsn, self.databases[system])

    def stop(self) -> None:
        """Drop our databases and stop the embedded server; every step runs even if an earlier one failed."""
        if self.created and self.admin_dsn:
            try:
                with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
                    for name in self.created:
                        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except psycopg.Error as exc:
                log(f"cleanup: dropping the benchmark databases failed: {exc}")
        if self.pg_root is not None:
            if (self.pg_root / "pgdata" / "postmaster.pid").exists():
                run_cli(["db", "stop", "-D", str(self.pg_root)], self.env, check=False, timeout=60)
            shutil.rmtree(self.pg_root, ignore_errors=True)


# -- neurondb -----------------------------------------------------------------------------------------------


class Neurondb(Scratch):
    """The real neurondb service (`neurondb start` in its own scratch data directory, `--dsn` to its
    database), with the benchmark's job module on its PYTHONPATH."""

    system = "neurondb"

    def __init__(self, dsn: str, env: dict[str, str], batch: int, depth: int) -> None:
        path = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH", "")) if p)
        super().__init__("neurondb-bench-queue-svc-", dsn, env={**env, "PYTHONPATH": path},
                         owner="scripts/bench_queue.py", settings={
                             "neurondb.neuranq_job_modules": "bench_jobs",
                             "neurondb.neuranq_batch_size": str(batch),
                             "neurondb.neuranq_queue_depth": str(depth),
                             "neurondb.neuranq_workers": "1",
                             "neurondb.neuranq_enabled": "off",
                         })
        self.conn: psycopg.Connection | None = None

    def setup(self) -> None:
        self.datadir.init()
        self.write_conf()
        self.cli("init")
        self.conn = psycopg.connect(self.dsn, autocommit=True, application_name="bench neurondb client")

    def start(self, processes: int) -> None:
        """Start the service with `processes` queue workers, their queue disabled (a postmaster setting:
        each configuration is a fresh start)."""
        self.write_conf(neuranq_workers=str(processes), neuranq_enabled="off")
        self.cli("start")
        deadline = time.monotonic() + 30
        while True:
            s = self.status()
            queue_workers = [w for w in s.workers if w.kind == "neuranq"]
            if s.running and len(queue_workers) == processes and all(
                    w.pid and w.state in ("idle", "running") and (w.heartbeat_age_s or 99) < 1.0 for w in s.workers):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"service not healthy 30s after start: {s}\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.cli("stop", "-m", "fast")

    def reset(self) -> None:
        assert self.conn is not None
        self.conn.execute(f"TRUNCATE {NQ_TABLE}, neurondb.neurondb_dead_letter")
        checkpoint(self.conn)

    def enqueue(self, n: int, batch: int) -> float:
        """n jobs in batches of `batch`, one statement and one commit each; jobs/s."""
        assert self.conn is not None
        t0 = time.monotonic()
        for start in range(0, n, batch):
            queue.enqueue_many(self.conn, NQ_JOB, [{"i": i} for i in range(start, min(n, start + batch))])
        return n / (time.monotonic() - t0)

    def prepare_drain(self) -> None:
        assert self.conn is not None
        self.conn.execute(f"ANALYZE {NQ_TABLE}")
        checkpoint(self.conn)

    def drain(self, n: int) -> tuple[float, float]:
        """Turn the queue on (settings file + SIGHUP to the supervisor, what `neurondb reload` does without
        the CLI's interpreter start-up) and time until nothing is pending or processing.
        (wall jobs/s, server jobs/s)."""
        assert self.conn is not None
        self.write_conf(neuranq_enabled="on")
        t0 = time.monotonic()
        os.kill(read_pid(self.datadir.pid_file), signal.SIGHUP)
        t1 = wait_until(self.conn, f"SELECT NOT EXISTS (SELECT 1 FROM {NQ_TABLE} "
                                   "WHERE status IN ('pending', 'processing'))", DRAIN_TIMEOUT_S, "the drain")
        counts = dict(self.conn.execute(f"SELECT status, count(*) FROM {NQ_TABLE} GROUP BY status").fetchall())
        if counts != {"completed": n}:
            raise BenchError(f"neurondb drain ended with {counts}, expected {n} completed\n{self.log_tail()}")
        span = self.conn.execute(f"SELECT extract(epoch FROM max(completed_at) - min(started_at)) "
                                 f"FROM {NQ_TABLE}").fetchone()[0]
        return n / (t1 - t0), n / float(span)

    def light_load(self, seconds: float) -> list[float]:
        """One job every 10 ms to the idle worker; started_at - created_at of each, in ms."""
        conn = self.conn
        assert conn is not None
        ids = paced(seconds, LIGHT_INTERVAL_S, lambda i: queue.enqueue(conn, NQ_JOB, {"i": i}))
        wait_until(conn, f"SELECT count(*) = %s FROM {NQ_TABLE} WHERE job_id = ANY(%s) AND status = 'completed'",
                   60, "the light-load jobs", (len(ids), ids))
        rows = conn.execute(f"SELECT extract(epoch FROM started_at - created_at) * 1000 FROM {NQ_TABLE} "
                            "WHERE job_id = ANY(%s)", (ids,)).fetchall()
        return [float(r[0]) for r in rows]

    def cleanup(self, keep: bool) -> None:
        """Close the client connection (a `--dsn` server's database is dropped after this), then leave
        nothing of the installation."""
        if self.conn is not None:
            db.close_quietly(self.conn)
        super().cleanup(keep)


# -- the naive loop -----------------------------------------------------------------------------------------


NAIVE_CLAIM = f"""
UPDATE {NQ_TABLE} SET status = 'processing', lease_owner = 'naive', started_at = now(),
       lease_expires_at = now() + interval '2 minutes'
 WHERE job_id IN (SELECT job_id FROM {NQ_TABLE} WHERE status = 'pending' AND run_at <= now()
                   ORDER BY priority DESC, run_at, job_id LIMIT %s FOR UPDATE SKIP LOCKED)
RETURNING job_id, payload"""
NAIVE_COMPLETE = f"UPDATE {NQ_TABLE} SET status = 'completed', completed_at = now() WHERE job_id = ANY(%s)"


class NaiveLoop:
    """The floor a queue on PostgreSQL can hope to reach from Python: one psycopg connection in the
    benchmark process that claims `batch` jobs with SKIP LOCKED (one commit), runs nothing, and marks them
    completed (a second commit), until a claim comes back empty. The commits are as durable as neuranq's:
    the claim's with synchronous_commit off, the completion's on. It drains neurondb's own table (same
    triggers, same indexes, same rows, enqueued the same way) while the service is stopped, and has none
    of neuranq's guarantees: no fairness, no rate limits, no attempt history, no lease renewal."""

    system = "naive"

    def __init__(self, nq: Neurondb, batch: int) -> None:
        self.nq = nq
        self.batch = batch

    def reset(self) -> None:
        self.nq.reset()

    def start(self, processes: int) -> None:
        """Nothing to start: the loop runs in `drain` (the service is down between configurations)."""

    def stop(self) -> None:
        """Nothing to stop."""

    def enqueue(self, n: int, batch: int) -> float:
        return self.nq.enqueue(n, batch)

    def prepare_drain(self) -> None:
        self.nq.prepare_drain()

    def drain(self, n: int) -> tuple[float, float]:
        conn = self.nq.conn
        assert conn is not None
        t0 = time.monotonic()
        while True:
            with conn.transaction():
                conn.execute("SET LOCAL synchronous_commit = off")
                rows = conn.execute(NAIVE_CLAIM, (self.batch,)).fetchall()
            if not rows:
                break
            conn.execute(NAIVE_COMPLETE, ([r[0] for r in rows],))
        t1 = time.monotonic()
        counts = dict(conn.execute(f"SELECT status, count(*) FROM {NQ_TABLE} GROUP BY status").fetchall())
        if counts != {"completed": n}:
            raise BenchError(f"naive loop ended with {counts}, expected {n} completed")
        span = conn.execute(f"SELECT extract(epoch FROM max(completed_at) - min(started_at)) "
                            f"FROM {NQ_TABLE}").fetchone()[0]
        return n / (t1 - t0), n / float(span)

    def light_load(self, seconds: float) -> list[float]:
        """Not measured: the loop polls without pause or NOTIFY, its latency would say nothing."""
        return []

    def cleanup(self, keep: bool) -> None:
        """The connection is neurondb's, closed with it."""


def enqueue_cost(nq: Neurondb, backlogs: list[int], statements: int, batch: int) -> dict[int, float]:
    """Median ms of one `batch`-row enqueue statement (`queue.enqueue_many`, autocommit, so its commit
    included) with `backlog` jobs already pending, for each backlog: the table truncated, filled with
    one INSERT ... SELECT, analysed and checkpointed; each measured batch is deleted again (untimed), so
    the backlog stays what it says. The service is stopped: nothing consumes."""
    conn = nq.conn
    assert conn is not None
    out = {}
    for backlog in backlogs:
        nq.reset()
        conn.execute(f"INSERT INTO {NQ_TABLE} (job_type, payload) SELECT %s, jsonb_build_object('i', i) "
                     "FROM generate_series(1, %s) AS i", (NQ_JOB, backlog))
        nq.prepare_drain()
        times = []
        for _ in range(statements):
            t0 = time.perf_counter()
            ids = queue.enqueue_many(conn, NQ_JOB, [{"i": i} for i in range(batch)])
            times.append((time.perf_counter() - t0) * 1000)
            conn.execute(f"DELETE FROM {NQ_TABLE} WHERE job_id = ANY(%s)", (ids,))
        out[backlog] = median(times) or 0.0
        log(f"enqueue of {batch} rows at {backlog:,} pending: median {out[backlog]:.2f} ms over {statements}")
    nq.reset()
    return out


# -- PGQueuer -----------------------------------------------------------------------------------------------


class PgQueuer:
    """PGQueuer in its own database: schema from `Queries.install()`, enqueue with its synchronous
    `SyncQueries` over psycopg, workers as separate processes (scripts/bench_jobs.py pgq-worker) over its
    psycopg async driver."""

    system = "PGQueuer"

    def __init__(self, dsn: str, env: dict[str, str], batch: int) -> None:
        self.dsn = dsn
        self.env = env
        self.batch = batch
        self.workers: list[tuple[subprocess.Popen[str], IO[str]]] = []
        self.conn: psycopg.Connection | None = None
        self.sync_queries: Any = None

    def setup(self) -> None:
        from pgqueuer.adapters.persistence.qb import QueryBuilderEnvironment
        from pgqueuer.db import PsycopgDriver, SyncPsycopgDriver
        from pgqueuer.queries import Queries, SyncQueries

        async def install() -> None:
            aconn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            try:
                await Queries(PsycopgDriver(aconn)).install()
            finally:
                await aconn.close()

        asyncio.run(install())
        s = QueryBuilderEnvironment().settings
        self.queue_table, self.log_table, self.stats_table = s.queue_table, s.queue_table_log, s.statistics_table
        self.conn = psycopg.connect(self.dsn, autocommit=True, application_name="bench pgqueuer client")
        self.sync_queries = SyncQueries(SyncPsycopgDriver(self.conn))

    def start(self, processes: int) -> None:
        """Start the worker processes and wait until each is connected and registered (not dequeueing)."""
        for _ in range(processes):
            err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by stop()
            proc = subprocess.Popen([sys.executable, str(SCRIPTS / "bench_jobs.py"), "pgq-worker", "--dsn", self.dsn,
                                     "--batch", str(self.batch)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, text=True, env=self.env)
            self.workers.append((proc, err))
        deadline = time.monotonic() + READY_TIMEOUT_S
        for proc, _ in self.workers:
            assert proc.stdout is not None
            readable, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = proc.stdout.readline() if readable else ""   # "" too if the worker died
            if line.strip() != "ready":
                raise BenchError(f"PGQueuer worker not ready within {READY_TIMEOUT_S:g}s: {self._stderr()}")

    def _stderr(self) -> str:
        texts = []
        for _, err in self.workers:
            err.seek(0)
            texts.append(err.read()[-2000:])
        return "\n".join(t for t in texts if t) or "(no output)"

    def stop(self) -> None:
        for proc, _ in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, err in self.workers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
            err.close()
        self.workers = []

    def reset(self) -> None:
        assert self.conn is not None
        self.conn.execute(f"TRUNCATE {self.queue_table}, {self.log_table}, {self.stats_table}")
        checkpoint(self.conn)

    def enqueue(self, n: int, batch: int) -> float:
        t0 = time.monotonic()
        for start in range(0, n, batch):
            size = min(n, start + batch) - start
            self.sync_queries.enqueue([PGQ_ENTRYPOINT] * size,
                                      [b'{"i": %d}' % i for i in range(start, start + size)], [0] * size)
        return n / (time.monotonic() - t0)

    def prepare_drain(self) -> None:
        assert self.conn is not None
        self.conn.execute(f"ANALYZE {self.queue_table}")
        checkpoint(self.conn)

    def drain(self, n: int) -> tuple[float, float]:
        """Tell the ready workers to begin; time until the queue table is empty (PGQueuer deletes a job
        from it when it records the job's completion in its log)."""
        assert self.conn is not None
        t0 = time.monotonic()
        for proc, _ in self.workers:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        t1 = wait_until(self.conn, f"SELECT NOT EXISTS (SELECT 1 FROM {self.queue_table})", DRAIN_TIMEOUT_S,
                        "the drain")
        ok, span = self.conn.execute(
            f"SELECT count(*) FILTER (WHERE status = 'successful'), extract(epoch FROM "
            f"max(created) FILTER (WHERE status = 'successful') - min(created) FILTER (WHERE status = 'picked')) "
            f"FROM {self.log_table}").fetchone()
        if ok != n:
            raise BenchError(f"PGQueuer drain logged {ok} successful jobs, expected {n}\n{self._stderr()}")
        return n / (t1 - t0), n / float(span)

    def light_load(self, seconds: float) -> list[float]:
        """One job every 10 ms to the idle workers; `picked` minus `queued` log entry of each, in ms."""
        conn = self.conn
        assert conn is not None
        ids = [x for batch in paced(seconds, LIGHT_INTERVAL_S,
                                    lambda i: self.sync_queries.enqueue(PGQ_ENTRYPOINT, b'{"i": %d}' % i))
               for x in batch]
        ids = [int(i) for i in ids]
        wait_until(conn, f"SELECT count(*) = %s FROM {self.log_table} WHERE status = 'successful' AND job_id = ANY(%s)",
                   60, "the light-load jobs", (len(ids), ids))
        rows = conn.execute(
            f"SELECT extract(epoch FROM p.created - q.created) * 1000 FROM {self.log_table} q "
            f"JOIN {self.log_table} p ON p.job_id = q.job_id AND p.status = 'picked' "
            f"WHERE q.status = 'queued' AND q.job_id = ANY(%s)", (ids,)).fetchall()
        return [float(r[0]) for r in rows]

    def cleanup(self, keep: bool) -> None:
        self.stop()
        if self.conn is not None:
            db.close_quietly(self.conn)


# -- one configuration, one repetition ------------------------------------------------------------------------


def run_one(system: Neurondb | PgQueuer | NaiveLoop, fig: Figures, n: int, batch: int, light_s: float) -> None:
    """Fresh tables -> consumer up but idle -> enqueue n -> drain -> light load -> consumer down."""
    system.reset()
    system.start(fig.processes)
    try:
        rate = system.enqueue(n, batch)
        system.prepare_drain()
        drain, drain_server = system.drain(n)
        time.sleep(SETTLE_S)
        lat = system.light_load(light_s) if light_s > 0 else []
    finally:
        system.stop()
    fig.enqueue.append(rate)
    fig.drain.append(drain)
    fig.drain_server.append(drain_server)
    fig.latency_ms.extend(lat)
    p50 = percentile(lat, 0.5)
    if p50 is not None:
        fig.latency_p50_runs.append(p50)
    log(f"{fig.key}: enqueue {rate:,.0f} jobs/s, drain {drain:,.0f} jobs/s (server span {drain_server:,.0f}), "
        f"pickup p50 {p50 if p50 is None else round(p50, 2)} ms over {len(lat)} jobs")


# -- report -------------------------------------------------------------------------------------------------


def compare(results: list[Figures]) -> list[dict[str, Any]]:
    """Summaries with the neurondb/PGQueuer and neurondb/naive-loop drain ratios and the targets."""
    pgq = {f.processes: median(f.drain) for f in results if f.system == "PGQueuer" and f.drain}
    best = max((v for v in pgq.values() if v), default=None)
    naive = next((median(f.drain) for f in results if f.system == "naive" and f.drain), None)
    rows = []
    for f in results:
        row = f.summary()
        d = row["drain_jobs_s"]
        same = pgq.get(f.processes)
        row["ratio_same_processes"] = d / same if d and same else None
        row["ratio_best_pgqueuer"] = d / best if d and best else None
        row["ratio_naive"] = d / naive if d and naive else None
        if f.system == "neurondb":
            row["target_drain_met"] = None if row["ratio_same_processes"] is None else \
                row["ratio_same_processes"] >= TARGET_RATIO
            row["target_naive_met"] = None if row["ratio_naive"] is None or f.processes != 1 else \
                row["ratio_naive"] >= TARGET_NAIVE_RATIO
            row["target_pickup_met"] = None if row["pickup_p50_ms"] is None else row["pickup_p50_ms"] < TARGET_P50_MS
        rows.append(row)
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render(settings: dict[str, Any], rows: list[dict[str, Any]], cost: dict[int, float]) -> str:
    lines = ["neurondb queue benchmark: neuranq vs PGQueuer and a naive SKIP LOCKED loop", ""]
    lines += [f"  {k:<22} {v}" for k, v in settings.items()]
    header = (f"  {'system':<9} {'procs':>5}  {'enqueue/s':>10}  {'drain/s':>9}  {'drain/s srv':>11}  "
              f"{'pickup p50':>10}  {'p99':>8}  {'vs PGQ same':>11}  {'vs PGQ best':>11}  {'vs naive':>8}")
    lines += ["", header, "  " + "-" * (len(header) - 2)]
    for r in rows:
        lines.append(
            f"  {r['system']:<9} {r['processes']:>5}  {_fmt(r['enqueue_jobs_s'], ',.0f'):>10}  "
            f"{_fmt(r['drain_jobs_s'], ',.0f'):>9}  {_fmt(r['drain_server_jobs_s'], ',.0f'):>11}  "
            f"{_fmt(r['pickup_p50_ms'], '.2f', ' ms'):>10}  {_fmt(r['pickup_p99_ms'], '.2f', ' ms'):>8}  "
            f"{_fmt(r['ratio_same_processes'], '.2f', 'x'):>11}  {_fmt(r['ratio_best_pgqueuer'], '.2f', 'x'):>11}  "
            f"{_fmt(r['ratio_naive'], '.2f', 'x'):>8}")
    lines += ["", "  per run, in run order:"]
    for r in rows:
        lines.append(f"    {r['system']} {r['processes']}: enqueue {r['runs']['enqueue_jobs_s']}, "
                     f"drain {r['runs']['drain_jobs_s']}, drain (server span) {r['runs']['drain_server_jobs_s']}, "
                     f"pickup p50 ms {r['runs']['pickup_p50_ms']}")
    lines += ["", f"  targets (issue 4): drain >= {TARGET_RATIO}x PGQueuer with the same number of processes, "
                  f"pickup p50 < {TARGET_P50_MS:g} ms"]
    for r in rows:
        if r["system"] != "neurondb":
            continue
        drain = {True: "met", False: "NOT met", None: "not measured"}[r["target_drain_met"]]
        pickup = {True: "met", False: "NOT met", None: "not measured"}[r["target_pickup_met"]]
        lines.append(f"    neurondb {r['processes']} process(es): drain {_fmt(r['ratio_same_processes'], '.2f', 'x')}"
                     f" -> {drain}; pickup p50 {_fmt(r['pickup_p50_ms'], '.2f', ' ms')} -> {pickup}")
        if r["target_naive_met"] is not None:
            naive = {True: "met", False: "NOT met"}[r["target_naive_met"]]
            lines.append(f"    neurondb 1 process vs the naive loop: {_fmt(r['ratio_naive'], '.2f', 'x')} "
                         f"(target >= {TARGET_NAIVE_RATIO}x) -> {naive}")
    if cost:
        first, last = cost[min(cost)], cost[max(cost)]
        ratio = last / first if first else None
        met = "not measured" if ratio is None else "met" if ratio <= TARGET_BACKLOG_RATIO else "NOT met"
        levels = ", ".join(f"{ms:.2f} ms at {b:,}" for b, ms in sorted(cost.items()))
        lines.append(f"    enqueue of one batch: {levels} pending; {max(cost):,}/{min(cost):,} = "
                     f"{_fmt(ratio, '.2f', 'x')} (target <= {TARGET_BACKLOG_RATIO}x) -> {met}")
    lines += ["",
              "  drain/s: n / (go -> nothing pending or running, polled every 10 ms); drain/s srv: n / (first claim ->",
              "  last completion, server timestamps). Medians over the runs; pickup = claim now() - enqueue now(),",
              "  all runs pooled, p99 nearest-rank. vs PGQ: neurondb's drain/s over PGQueuer's (same process count,",
              "  and PGQueuer's best); vs naive: over the naive loop's (one connection in this process: claim a batch",
              "  with SKIP LOCKED and commit, mark it completed and commit). Enqueue cost: median of one batch-row",
              "  enqueue statement, its commit included, with that many jobs pending and nothing consuming."]
    return "\n".join(lines)


def _counts(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of process counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("process counts must be >= 1")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="use this PostgreSQL instead of an embedded one (needs CREATEDB)")
    parser.add_argument("--n", type=int, default=20_000, help="jobs per drain (default 20000)")
    parser.add_argument("--batch", type=int, default=100,
                        help="enqueue batch and dequeue batch size, both systems (default 100)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per configuration (default 3)")
    parser.add_argument("--latency-seconds", type=float, default=5.0,
                        help="light-load duration per configuration, split over the repetitions (default 5)")
    parser.add_argument("--processes", type=_counts, default=[1, 2], metavar="LIST",
                        help="neurondb queue process counts (default 1,2)")
    parser.add_argument("--pgq-processes", type=_counts, default=[1, 2], metavar="LIST",
                        help="PGQueuer worker process counts (default 1,2)")
    parser.add_argument("--no-pgqueuer", action="store_true", help="leave PGQueuer out (the naive loop stays)")
    parser.add_argument("--enqueue-statements", type=int, default=60, metavar="N",
                        help="statements timed per backlog for the enqueue cost (default 60; --quick: 20)")
    parser.add_argument("--quick", action="store_true", help="one repetition instead of --reps")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser.add_argument("--keep", action="store_true", help="keep the service's data directory (stopped)")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps = 1
        args.enqueue_statements = min(args.enqueue_statements, 20)
    if args.n < 1 or args.batch < 1 or args.batch > 10_000 or args.reps < 1 or args.latency_seconds < 0 \
            or args.enqueue_statements < 0:
        parser.error("--n and --reps must be >= 1, --batch 1..10000, --latency-seconds and --enqueue-statements >= 0")
    pgqueuer: Any = None
    if args.no_pgqueuer:
        args.pgq_processes = []
    else:
        try:
            import pgqueuer
        except ImportError:
            parser.error("PGQueuer is not installed: pip install -e '.[bench]' (or leave it out: --no-pgqueuer)")

    install_sigterm_handler()
    env = clean_env()   # the benchmark's own settings must win, never the caller's installation or server
    server = Server(args.dsn, env)
    systems: dict[str, Neurondb | PgQueuer | NaiveLoop] = {}
    results = [Figures("neurondb", k) for k in args.processes] + [Figures("PGQueuer", k) for k in args.pgq_processes] \
        + [Figures("naive", 1)]
    cost: dict[int, float] = {}
    light_s = args.latency_seconds / args.reps
    load_before = os.getloadavg()
    t_begin = time.monotonic()

    def run() -> None:
        server.start()
        nq = systems["neurondb"] = Neurondb(server.dsn("neurondb"), env, args.batch,
                                            depth=max(args.n, *BACKLOGS) + 10_000)
        nq.setup()
        systems["naive"] = NaiveLoop(nq, args.batch)
        if args.pgq_processes:
            pgq = systems["PGQueuer"] = PgQueuer(server.dsn("pgqueuer"), env, args.batch)
            pgq.setup()
        for rep in range(args.reps):
            order = results if rep % 2 == 0 else results[::-1]
            for fig in order:
                log(f"run {rep + 1}/{args.reps}: {fig.system} with {fig.processes} process(es), n = {args.n:,}")
                run_one(systems[fig.system], fig, args.n, args.batch, light_s)
        if args.enqueue_statements:
            cost.update(enqueue_cost(nq, list(BACKLOGS), args.enqueue_statements, args.batch))

    def cleanup() -> None:
        for system in systems.values():
            try:
                system.cleanup(args.keep)
            except Exception as exc:
                log(f"cleanup of {system.system} failed: {exc}")
        server.stop()

    code = guarded(run, cleanup)
    pg = getattr(server, "settings", {})
    settings = {
        "outcome": OUTCOMES[code],
        "database": (f"external {db.redact(args.dsn)}" if args.dsn else "embedded PostgreSQL (neurondb init)")
                    + f", PostgreSQL {pg.get('server_version', '?')}, fsync={pg.get('fsync', '?')}, "
                      f"synchronous_commit={pg.get('synchronous_commit', '?')}",
        "jobs per drain": f"{args.n:,} no-op jobs, enqueue and dequeue batch {args.batch}",
        "repetitions": f"{args.reps} (medians), light load {light_s:.2f} s per run at one job / "
                       f"{LIGHT_INTERVAL_S * 1000:g} ms",
        "neurondb": code_version(show_repo_root=True),
        "versions": f"PGQueuer {getattr(pgqueuer, '__version__', '?') if pgqueuer else 'left out'}, "
                    f"psycopg {psycopg.__version__}, "
                    f"Python {sys.version.split()[0]}",
        "machine": f"{os.cpu_count()} CPUs, load avg {load_before[0]:.2f} before / {os.getloadavg()[0]:.2f} after",
        "wall time": f"{time.monotonic() - t_begin:.0f} s",
    }
    rows = compare(results)
    if args.json:
        print(json.dumps({"settings": settings, "ok": code == 0, "exit_code": code, "results": rows,
                          "enqueue_ms_by_backlog": cost,
                          "targets": {"drain_ratio": TARGET_RATIO, "pickup_p50_ms": TARGET_P50_MS,
                                      "naive_ratio": TARGET_NAIVE_RATIO, "backlog_ratio": TARGET_BACKLOG_RATIO}},
                         indent=2))
    else:
        print(render(settings, rows, cost))
    return code


if __name__ == "__main__":
    sys.exit(main())
