#!/usr/bin/env python3
"""How long a row written by plain SQL takes to become searchable (issue 5: "within 1 s, p95"; issue 11:
"p95 under 50 ms during maintenance").

Starts a service on a temporary data directory (embedded PostgreSQL, or `--dsn`), creates an index, then
inserts `--rate` rows per second, each in its own transaction as an application would, while a second
process searches the index continuously (the "normal load"). A poller reads the graph in shared memory and
notes when each row's id is published (a live node with that label: appended, or in a freed row reused);
freshness = publish time - commit time.

Default mode: `--preload` (10,000) random rows, then `--seconds` of inserts; one p50 / p95 / max line.

`--during-maintenance` (issue 11): with `neurandefrag_naptime` 1000 ms and `neurandefrag_compact_threshold`
0, a base set of `--preload` (20,000) clustered vectors (bench_index.Mixture, noise 0.3; index l2) is COPYed
before the start, and the graph built by the service. The insert stream (new vectors of the same mixture)
then runs through four phases, each ending when neurandefrag is quiet again (no 'running' record of the
index in neurondb_index_maintenance and no row in neurondb.maintenance_progress, twice in a row, after the
operation the phase asked for completed; `--phase-timeout` 90 s):

- idle: `--idle-seconds` (5) of inserts with nothing asked of the maintenance;
- delete: one DELETE of `--delete-share` (30 %) of the base set, half a region (the vectors nearest one
  of them) and half a random sample of the rest: pruning (and whatever the cycle decides next: cleanup,
  a compaction, VACUUM of the table) runs; the phase also waits for vector_stats.tombstones to reach 0;
- compaction: `UPDATE neurondb.neurondb_indexes SET maintenance_request = 'compaction'` (what
  `neurondb index compact` does, less the NOTIFY: the worker checks requests every second);
- rebuild: `maintenance_request = 'rebuild', maintenance_now = true` (`neurondb index rebuild --now`).

Afterwards the operation records of the run (neurondb_index_maintenance: the index's and the tables') give the
windows [started_at, finished_at]; an insert counts as "during maintenance" when its commit fell inside a
window, for the phase that recorded the operation; idle freshness is that of the idle phase's inserts outside
every window. Per phase: its operations with their durations, the inserts during them, p50 / p95 / p99 / max
(nearest rank), and "PASS/MISS p95 during maintenance < 50 ms"; then the inserts of the later phases that fell
outside every window (with `--json`, this table goes to stderr). The windows mix the database's clock (now())
and the worker's (a pruning's start): exact on one machine, shifted by the clock difference with a `--dsn`
server elsewhere. A compaction of 15,000 nodes takes about 20 ms, so its phase sees one insert or none at 50/s.
A run takes 35-50 s on 2 cores. Exit 0 when every row was seen (whatever the verdicts), 1 otherwise.

    .venv/bin/python scripts/bench_freshness.py [--rate 50] [--seconds 10] [--dim 128] [--dsn DSN] [--json]
    .venv/bin/python scripts/bench_freshness.py --during-maintenance [--preload 20000] [--rate 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import psycopg
from bench_index import Mixture
from benchlib import BenchError, Scratch, code_version, log, percentile

import neurondb
from neurondb.index import hnsw
from neurondb.index.store import SharedIndex
from neurondb.shm.control import SharedState

INDEX = "fresh"
MAINTENANCE_P95_MS = 50.0
POLL_S = 0.2


def searcher(data_dir: str, dsn: str, dim: int, queries: np.ndarray | None, stop: multiprocessing.Event,
             counter: multiprocessing.Value) -> None:
    """The background load: back-to-back searches from another process (random vectors, or `queries`)."""
    rng = np.random.default_rng(1)
    i = 0
    with neurondb.connect(data_dir, dsn) as client:
        while not stop.is_set():
            q = rng.standard_normal(dim).astype(np.float32) if queries is None else queries[i % len(queries)]
            i += 1
            try:
                client.search(INDEX, q, k=10)
                counter.value += 1
            except neurondb.client.SearchError:
                time.sleep(0.05)


class Tracker:
    """Commit times of the inserted rows (by the inserting thread) and the time each one's id became a live
    node of the shared graph (by a polling thread). The poller rescans the graph only when it changed (node
    count, mutation and deleted counters, generation) or a row was committed: a reused row is published by
    clearing its tombstone, after the mutation counter moves and before the deleted counter does."""

    def __init__(self, index: SharedIndex) -> None:
        self.index = index
        self.committed: dict[int, tuple[float, float]] = {}   # row id -> (perf_counter, wall clock) of commit
        self.seen: dict[int, float] = {}                      # row id -> perf_counter when found published
        self._pending: set[int] = set()
        self._version = 0
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.last_commit = time.perf_counter()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def commit(self, row_id: int) -> None:
        now, wall = time.perf_counter(), time.time()
        with self._lock:
            self.committed[row_id] = (now, wall)
            self._pending.add(row_id)
            self._version += 1
            self.last_commit = now

    def _poll(self) -> None:
        key = None
        while True:
            with self._lock:
                pending, version = np.fromiter(self._pending, np.int64, len(self._pending)), self._version
            a = self.index.arrays()
            if a is not None and len(pending):
                h = a.header
                k = (id(a), int(h[hnsw.H_COUNT]), int(h[hnsw.H_MUTATIONS]), int(h[hnsw.H_DELETED]), version)
                if k != key:
                    key = k
                    n = a.count
                    labels = a.labels[:n]
                    found = labels[np.isin(labels, pending) & (a.tombstones[:n] == 0)]
                    now = time.perf_counter()
                    with self._lock:
                        for label in found.tolist():
                            if label in self._pending:
                                self._pending.discard(label)
                                self.seen[label] = now
            if self.done.is_set() and (not len(pending) or time.perf_counter() - self.last_commit > 10):
                return
            time.sleep(0.001)

    def finish(self) -> None:
        """After the last commit: wait (at most 10 s after it) for the rows still pending."""
        self.done.set()
        self.thread.join(15)

    def latencies_ms(self, rows: list[int] | None = None) -> list[float]:
        """Freshness of these rows (all by default) that were seen, sorted."""
        rows = list(self.committed) if rows is None else rows
        return sorted((self.seen[r] - self.committed[r][0]) * 1000 for r in rows if r in self.seen)


class Inserter:
    """`rate` single-row INSERT transactions per second from a thread, until `stop()`."""

    def __init__(self, dsn: str, rate: float, vector: Callable[[int], np.ndarray], tracker: Tracker) -> None:
        self.dsn, self.rate, self.vector, self.tracker = dsn, rate, vector, tracker
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        interval = 1.0 / self.rate
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                t0 = time.perf_counter()
                i = 0
                while not self.stopping.is_set():
                    row_id = conn.execute("INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, embedding) "
                                          "VALUES (%s, %s, %s) RETURNING id",
                                          (INDEX, f"f{i}", self.vector(i).tolist())).fetchone()[0]
                    self.tracker.commit(row_id)
                    i += 1
                    time.sleep(max(0.0, t0 + i * interval - time.perf_counter()))
        except BaseException as exc:      # reported by stop(), in the main thread
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)
        if self.error is not None:
            raise BenchError(f"the insert stream failed: {self.error}")


def start_service(scratch: Scratch, rows: int) -> tuple[SharedState, SharedIndex]:
    """`neurondb start`, then wait until the shared graph holds the `rows` loaded before."""
    scratch.cli("start", timeout=300)
    shared = SharedState.attach(scratch.prefix)
    index = SharedIndex(shared, INDEX)
    scratch.wait_for(lambda: (a := index.arrays()) is not None and a.count >= rows, 300,
                     f"the service to load the {rows} rows into the graph")
    return shared, index


def start_searcher(scratch: Scratch, dsn: str, dim: int, queries: np.ndarray | None, stop: multiprocessing.Event,
                   counter: multiprocessing.Value) -> multiprocessing.Process:
    load = multiprocessing.get_context("fork").Process(
        target=searcher, args=(str(scratch.root), dsn, dim, queries, stop, counter), daemon=True)
    load.start()
    return load


# -- default mode -------------------------------------------------------------------------------------------

def plain(args: argparse.Namespace, scratch: Scratch, stop: multiprocessing.Event,
          processes: list[multiprocessing.Process]) -> int:
    scratch.cli("init", timeout=300)
    dsn = scratch.cli("dsn").strip()
    rng = np.random.default_rng(0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT neurondb.create_index(%s, %s, 'cosine')", (INDEX, args.dim))
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, embedding) "
                            "VALUES (%s, %s, %s)",
                            [(INDEX, f"p{i}", v.tolist()) for i, v in
                             enumerate(rng.standard_normal((args.preload, args.dim)).astype(np.float32))])
    shared, index = start_service(scratch, args.preload)
    searches = multiprocessing.Value("l", 0)
    processes.append(start_searcher(scratch, dsn, args.dim, None, stop, searches))

    tracker = Tracker(index)
    inserter = Inserter(dsn, args.rate, lambda _i: rng.standard_normal(args.dim).astype(np.float32), tracker)
    time.sleep(args.seconds)
    inserter.stop()
    tracker.finish()
    index.close()
    shared.close()
    lat = tracker.latencies_ms()
    missing = len(tracker.committed) - len(lat)
    if not lat:
        raise RuntimeError(f"no inserted row reached the graph; {scratch.log_tail(15)}")
    result = {
        "rows": len(tracker.committed), "rate_per_s": args.rate, "dim": args.dim, "preloaded": args.preload,
        "background_searches_per_s": round(searches.value / args.seconds, 1),
        "p50_ms": round(statistics.median(lat), 1), "p95_ms": round(lat[int(0.95 * (len(lat) - 1))], 1),
        "max_ms": round(lat[-1], 1), "never_seen": missing,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"freshness of {result['rows']} rows inserted at {args.rate:.0f}/s by plain SQL "
              f"(dim {args.dim}, {args.preload} preloaded, {result['background_searches_per_s']} searches/s "
              f"from another process):")
        print(f"  p50 {result['p50_ms']} ms   p95 {result['p95_ms']} ms   max {result['max_ms']} ms   "
              f"never seen {missing}   target p95 < 1000 ms: {'met' if result['p95_ms'] < 1000 else 'MISSED'}")
    return 0 if missing == 0 else 1


# -- during maintenance -------------------------------------------------------------------------------------

@dataclass
class Op:
    """One record of neurondb_index_maintenance made during the run."""

    id: int
    target: str
    operation: str
    status: str
    started: float             # epoch seconds
    finished: float
    duration_ms: float | None
    error: str | None
    details: dict

    def label(self) -> str:
        what = self.operation if self.target == INDEX else f"{self.operation} {self.target}"
        took = "-" if self.duration_ms is None else (f"{self.duration_ms / 1000:.1f} s" if self.duration_ms >= 1000
                                                     else f"{self.duration_ms:.0f} ms")
        return f"{what} {took}" + ("" if self.status == "completed" else f" ({self.status})")


@dataclass
class Phase:
    name: str
    started: float                  # wall clock at the phase's start
    first_id: int                   # records with a larger maintenance_id are this phase's (or later ones')
    ended: float = 0.0
    timed_out: bool = False
    ops: list[Op] = field(default_factory=list)
    during: list[float] = field(default_factory=list)     # freshness (ms) of inserts during its operations
    outside: list[float] = field(default_factory=list)    # ... of its inserts outside every window


class DuringMaintenance:
    def __init__(self, args: argparse.Namespace, scratch: Scratch) -> None:
        self.args = args
        self.scratch = scratch
        self.conn: psycopg.Connection | None = None
        self.phases: list[Phase] = []
        self.shown: list[tuple] = []       # the progress rows logged last

    def last_id(self) -> int:
        assert self.conn is not None
        return self.conn.execute("SELECT coalesce(max(maintenance_id), 0) "
                                 "FROM neurondb.neurondb_index_maintenance").fetchone()[0]

    def quiet(self, after: int, wanted: str | None, tombstones_zero: bool) -> bool:
        """The operation `wanted` completed (or failed) after record `after`, nothing of the index is running
        or in progress, and (if asked) the published statistics count no tombstone."""
        assert self.conn is not None
        rows = self.conn.execute("SELECT operation, status FROM neurondb.neurondb_index_maintenance "
                                 "WHERE maintenance_id > %s AND index_name = %s", (after, INDEX)).fetchall()
        progress = self.conn.execute("SELECT operation, phase, done, total FROM neurondb.maintenance_progress "
                                     "WHERE kind = 'index' AND target = %s", (INDEX,)).fetchall()
        if progress and progress != self.shown:
            log("  " + "; ".join(f"{op}: {phase} {done}/{total}" for op, phase, done, total in progress))
        self.shown = progress
        if wanted is not None and not any(op == wanted and status != "running" for op, status in rows):
            return False
        if progress or any(status == "running" for _, status in rows):
            return False
        if tombstones_zero:
            row = self.conn.execute("SELECT tombstones FROM neurondb.vector_stats WHERE index_name = %s",
                                    (INDEX,)).fetchone()
            return bool(row and row[0] == 0)
        return True

    def phase(self, name: str, action: Callable[[], None], wanted: str | None, tombstones_zero: bool = False) -> None:
        p = Phase(name, time.time(), self.last_id())
        self.phases.append(p)
        log(f"phase {name}")
        action()
        deadline = time.monotonic() + self.args.phase_timeout
        calm = 0
        while calm < 2:
            time.sleep(POLL_S)
            calm = calm + 1 if self.quiet(p.first_id, wanted, tombstones_zero) else 0
            if time.monotonic() > deadline:
                p.timed_out = True
                log(f"phase {name}: maintenance not finished after {self.args.phase_timeout:g} s; going on")
                break
        p.ended = time.time()

    def run(self, stop: multiprocessing.Event, processes: list[multiprocessing.Process]) -> dict:
        a = self.args
        s = self.scratch
        mix = Mixture(a.dim, n_clusters=max(8, round(math.sqrt(a.preload) / 3)), seed=a.seed)
        mix.noise = 0.3
        base = mix.sample(a.preload, a.seed + 1)
        stream = mix.sample(max(1000, int(a.rate * 300)), a.seed + 2)    # 5 minutes' worth, then again
        queries = mix.sample(200, a.seed + 3)
        s.write_conf(neurandefrag_naptime="1000", neurandefrag_compact_threshold="0")
        s.cli("init", timeout=300)
        dsn = s.cli("dsn").strip()
        self.conn = conn = psycopg.connect(dsn, autocommit=True)
        conn.execute("SELECT neurondb.create_index(%s, %s, 'l2')", (INDEX, a.dim))
        t = time.monotonic()
        with conn.cursor().copy("COPY neurondb.neurondb_vectors (index_name, doc_id, embedding) FROM STDIN") as copy:
            for i, v in enumerate(base.tolist()):
                copy.write_row((INDEX, f"p{i}", v))
        ids = dict(conn.execute("SELECT doc_id, id FROM neurondb.neurondb_vectors WHERE index_name = %s",
                                (INDEX,)).fetchall())
        base_ids = np.array([ids[f"p{i}"] for i in range(a.preload)], np.int64)
        log(f"COPY of {a.preload} x {a.dim} in {time.monotonic() - t:.1f} s; starting the service")
        t = time.monotonic()
        shared, index = start_service(s, a.preload)
        log(f"graph of {a.preload} built in {time.monotonic() - t:.1f} s (start included)")
        searches = multiprocessing.Value("l", 0)
        processes.append(start_searcher(s, dsn, a.dim, queries, stop, searches))

        rng = np.random.default_rng([a.seed, 4])
        n_region = int(a.preload * a.delete_share / 2)
        center = base[rng.integers(a.preload)]
        region = np.argpartition(np.einsum("ij,ij->i", base - center, base - center), n_region)[:n_region]
        rest = np.setdiff1d(np.arange(a.preload), region)
        gone = np.concatenate([region, rng.choice(rest, int(a.preload * a.delete_share) - n_region, replace=False)])

        tracker = Tracker(index)
        first = self.last_id()
        t_run = time.time()
        inserter = Inserter(dsn, a.rate, lambda i: stream[i % len(stream)], tracker)
        try:
            self.phase("idle", lambda: time.sleep(a.idle_seconds), None)
            self.phase("delete", lambda: conn.execute("DELETE FROM neurondb.neurondb_vectors WHERE id = ANY(%s)",
                                                      (base_ids[gone].tolist(),)), "prune", tombstones_zero=True)
            self.phase("compaction", lambda: conn.execute(
                "UPDATE neurondb.neurondb_indexes SET maintenance_request = 'compaction' WHERE index_name = %s",
                (INDEX,)), "compaction")
            self.phase("rebuild", lambda: conn.execute(
                "UPDATE neurondb.neurondb_indexes SET maintenance_request = 'rebuild', maintenance_now = true "
                "WHERE index_name = %s", (INDEX,)), "rebuild")
        finally:
            inserter.stop()
            tracker.finish()
        seconds = time.time() - t_run
        index.close()
        shared.close()
        return self.report(tracker, first, seconds, searches.value, len(gone))

    def report(self, tracker: Tracker, first: int, seconds: float, searches: int, deleted: int) -> dict:
        a = self.args
        assert self.conn is not None
        rows = self.conn.execute(
            "SELECT maintenance_id, coalesce(index_name, table_name), operation, status, "
            "extract(epoch FROM started_at)::float8, extract(epoch FROM coalesce(finished_at, now()))::float8, "
            "duration_ms, error_message, details FROM neurondb.neurondb_index_maintenance WHERE maintenance_id > %s "
            "ORDER BY maintenance_id", (first,)).fetchall()
        ops = [Op(*r) for r in rows]
        for i, p in enumerate(self.phases):
            upper = self.phases[i + 1].first_id if i + 1 < len(self.phases) else math.inf
            p.ops = [o for o in ops if p.first_id < o.id <= upper]
        for row, (_, wall) in tracker.committed.items():
            if row not in tracker.seen:
                continue
            ms = (tracker.seen[row] - tracker.committed[row][0]) * 1000
            owner = next((p for p in self.phases if any(o.started <= wall <= o.finished for o in p.ops)), None)
            if owner is not None:
                owner.during.append(ms)
            else:
                next((p for p in reversed(self.phases) if wall >= p.started), self.phases[0]).outside.append(ms)
        missing = len(tracker.committed) - len(tracker.seen)

        def figures(lat: list[float]) -> dict:
            return {"n": len(lat), "p50_ms": percentile(lat, 0.5), "p95_ms": percentile(lat, 0.95),
                    "p99_ms": percentile(lat, 0.99), "max_ms": max(lat) if lat else None}

        def line(name: str, what: str, lat: list[float]) -> str:
            f = figures(lat)
            cell = lambda v: "-" if v is None else f"{v:.1f}"   # noqa: E731
            return (f"{name:<22} {f['n']:>7} {cell(f['p50_ms']):>7} {cell(f['p95_ms']):>7} {cell(f['p99_ms']):>7} "
                    f"{cell(f['max_ms']):>8}   {what}")

        out = sys.stderr if a.json else sys.stdout     # with --json, stdout is the JSON

        def say(text: str = "") -> None:
            print(text, file=out, flush=True)

        say(f"# bench_freshness --during-maintenance: {len(tracker.committed)} rows inserted at {a.rate:g}/s by "
            f"plain SQL over {seconds:.0f} s (one transaction each), base {a.preload} x {a.dim} clustered (l2), "
            f"{deleted} deleted in phase delete, {searches / seconds:.0f} searches/s from another process; "
            f"neurandefrag_naptime 1000 ms, compact_threshold 0")
        say(f"# code: {code_version()}")
        say(f"{'phase / inserts':<22} {'n':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>8}   "
            "operations (duration)")
        idle = self.phases[0]
        say(line("idle (no operation)", "-", idle.outside))
        verdicts = []
        for p in self.phases:
            what = ", ".join(o.label() for o in p.ops) or "none recorded"
            if p.timed_out:
                what += f"; NOT FINISHED within {a.phase_timeout:g} s"
            if p is not idle or p.ops:
                say(line(f"{p.name}: during ops", what, p.during))
            f = figures(p.during)
            if p is not idle:
                verdicts.append((p.name, f))
        later = [ms for p in self.phases[1:] for ms in p.outside]
        say(line("later, between ops", "inserts of the phases above outside every window", later))
        pooled = [ms for p in self.phases for ms in p.during]
        say(line("all during maintenance", "pooled", pooled))
        say(f"never seen: {missing}")
        say()
        for name, f in [*verdicts, ("pooled", figures(pooled))]:
            if not f["n"]:
                say(f"n/a   p95 during maintenance < {MAINTENANCE_P95_MS:g} ms: {name}: no insert committed "
                    "while an operation ran")
                continue
            ok = f["p95_ms"] < MAINTENANCE_P95_MS
            few = " (under 20 inserts: the p95 is their maximum)" if f["n"] < 20 else ""
            say(f"{'PASS' if ok else 'MISS'}  p95 during maintenance < {MAINTENANCE_P95_MS:g} ms: {name}: "
                f"{f['p95_ms']:.1f} ms over {f['n']} inserts{few}")
        return {"args": vars(a), "rows": len(tracker.committed), "never_seen": missing, "seconds": seconds,
                "idle": figures(idle.outside), "later_outside": figures(later), "pooled": figures(pooled),
                "phases": [{"name": p.name, "timed_out": p.timed_out, "during": figures(p.during),
                            "outside": figures(p.outside),
                            "operations": [{"operation": o.operation, "target": o.target, "status": o.status,
                                            "duration_ms": o.duration_ms, "error": o.error, "details": o.details}
                                           for o in p.ops]}
                           for p in self.phases]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=50.0, help="rows inserted per second")
    ap.add_argument("--seconds", type=float, default=10.0, help="default mode: seconds of inserts")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--preload", type=int, help="rows in the index before measuring (default 10,000; "
                                                "20,000 with --during-maintenance)")
    ap.add_argument("--during-maintenance", action="store_true",
                    help="measure while neurandefrag prunes, compacts and rebuilds (issue 11)")
    ap.add_argument("--idle-seconds", type=float, default=5.0, help="--during-maintenance: idle phase")
    ap.add_argument("--delete-share", type=float, default=0.3, help="--during-maintenance: share deleted")
    ap.add_argument("--phase-timeout", type=float, default=90.0,
                    help="--during-maintenance: seconds to wait for the maintenance of one phase")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--dsn")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.preload is None:
        args.preload = 20_000 if args.during_maintenance else 10_000
    if not 0 < args.delete_share < 1 or args.rate <= 0:
        ap.error("--delete-share must be between 0 and 1, --rate positive")

    scratch = Scratch("neurondb-fresh-", args.dsn, owner="scripts/bench_freshness.py")
    stop = multiprocessing.Event()
    processes: list[multiprocessing.Process] = []
    bench: DuringMaintenance | None = None
    try:
        if not args.during_maintenance:
            return plain(args, scratch, stop, processes)
        bench = DuringMaintenance(args, scratch)
        result = bench.run(stop, processes)
        if args.json:
            print(json.dumps(result, indent=1, default=str))
        return 0 if result["never_seen"] == 0 else 1
    finally:
        stop.set()
        for p in processes:
            p.join(5)
        if bench is not None and bench.conn is not None:
            bench.conn.close()
        scratch.cleanup(keep=False)


if __name__ == "__main__":
    sys.exit(main())
