#!/usr/bin/env python3
"""neuranmon's ef_search tuning against an oracle and against the document's fixed-factor strategy (issue 10).

One run, on a scratch installation (embedded PostgreSQL, or `--dsn`) with realistic clustered data
(`bench_index.make_data`: topics on low-dimensional subspaces plus noise; default 50,000 x 128) loaded by
COPY, an index `b` (l2, M 16, ef_construction 200) and a held query set from the same distribution:

1. **Oracle.** The smallest ef of `tuning.ef_ladder(k, hnsw_max_ef_search)` whose mean recall@k over the
   query set reaches the target, measured by this script on the service's own shared-memory graph against
   its own brute-force ground truth (not the tuner's).
2. **neuranmon, from each start** (16 and 512). The index starts at that ef (created with it, then
   `UPDATE neurondb.neurondb_indexes SET ef_search = START`, the operator's reset), and the script searches
   through `neurondb.connect().search()` (what applications call; 5 % of searches keep their vector for
   the tuner) while it follows neurondb_tuning_state (one row per cycle) and neurondb_tuning_history.
   Counted from the first cycle that saw START: the decision cycles until the first cycle in state
   `converged` (the changes plus the confirming cycle; cycles still `waiting` for 100 sampled queries are
   shown apart), their wall time, and whether the ef still holds `--settle` cycles later.
3. **Baseline: the document's strategy** (`tuning.fixed_factor`: x1.5 when recall misses and latency
   meets, /1.5 when latency misses and recall meets, else nothing), simulated cycle by cycle from the
   same starts and with the same targets: each cycle searches a fresh sample of the held queries through
   the client at the current ef (as many as the tuner's decisions were measured on), takes their mean
   client-observed latency and the recall@k of their hits, applies the rule, until the ef stops moving or
   `--max-cycles`. (In the service a cycle is `neuranmon_naptime`: 60 s by default.)
4. **QPS** at every ef that was chosen and at the oracle ef, median of `--repeats`, the efs alternating:
   client QPS (`client.search(..., ef=E)` over the query set, one call after another: what an application
   thread gets, database round trip included) and kernel QPS (`hnsw.search_many` over the whole set in one
   call, single thread: the graph walk alone). Ratio chosen / oracle; target >= 0.9. neuranmon is switched
   off (`neuranmon_enabled`, reload) for the baseline and the QPS measurements, so that its replays do not
   share the 2 cores with them.

Printed: the oracle curve, one table row per strategy and start, and one verdict line per target.

    .venv/bin/python scripts/bench_tuner.py --quick       # 10,000 x 64, 400 queries: 1-2 minutes
    .venv/bin/python scripts/bench_tuner.py               # 50,000 x 128, 1,000 queries
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime

import numpy as np
import psycopg
from bench_index import Mixture, ground_truth
from benchlib import OUTCOMES, BenchError, Scratch, add_run_options, code_version, copy_vectors, log, median, run_bench

import neurondb
from neurondb import tuning
from neurondb.client import SearchError
from neurondb.index import hnsw
from neurondb.index.store import SharedIndex
from neurondb.shm.control import SharedState

INDEX = "b"
QPS_TARGET = 0.9
CYCLES_TARGET = 3
KERNEL_S = 1.0               # kernel QPS: whole batches for at least this long per measurement
POLL_S = 0.3                 # state-row polling while searching (cycles are >= 1 s apart)


@dataclass
class Cycle:
    """One tuner evaluation: a neurondb_tuning_state row, with the history rows written in that cycle."""

    at: datetime
    state: str
    ef: int
    queries: int
    recall: float | None
    recall_low: float | None
    reason: str
    seen: int = 0            # the ef the cycle started from (old_ef of its history row, else its ef)


@dataclass
class Run:
    strategy: str
    start: int
    cycles: int | None = None          # decision cycles up to the converged one (None: did not converge)
    waiting: int = 0                   # cycles before, still waiting for enough sampled queries
    seconds: float | None = None       # from the start (load or UPDATE) to the converged cycle
    ef: int | None = None              # where it ended
    held: bool | None = None           # ef unchanged over the settle cycles
    path: list[int] = field(default_factory=list)
    queries: int | None = None         # sampled queries of the converged decision
    tuner_recall: float | None = None  # the tuner's replayed recall at its ef, on those queries
    tuner_low: float | None = None     # and its lower confidence bound
    cycle_s: float | None = None       # median time between the tuner's cycles
    cpu_s: float | None = None         # neuranmon's CPU seconds per cycle over the run
    searches: int = 0                  # client searches made during the run
    cpu_ms_per_search: float | None = None   # neuranmon's CPU per client search (drain + tuning)
    note: str = ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (/proc/PID/stat, fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.k = args.k
        settings = {"neurondb.neuranmon_naptime": f"{args.naptime}s",
                    "neurondb.neuranmon_target_recall": str(args.target_recall),
                    "neurondb.neuranmon_target_latency": f"{args.target_latency}ms"}
        self.scratch = Scratch("neurondb-benchtuner-", args.dsn, settings, owner="scripts/bench_tuner.py")
        self.shared: SharedState | None = None
        self.index: SharedIndex | None = None
        self.conn: psycopg.Connection | None = None
        self.client: neurondb.client.Client | None = None
        self.rng = np.random.default_rng(args.seed + 7)
        self.recall: dict[int, float] = {}
        self.runs: list[Run] = []
        self.oracle: int | None = None
        self.qps: dict[int, dict[str, float]] = {}
        self.max_ef = 1024

    # -- set-up ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        t = time.monotonic()
        mix = Mixture(a.dim, n_clusters=max(8, round(np.sqrt(a.n) / 3)), seed=a.seed)   # as bench_index.make_data
        mix.noise = a.noise
        self.base, self.queries = mix.sample(a.n, a.seed + 1), mix.sample(a.queries, a.seed + 2)
        self.truth_rows = ground_truth(self.base, self.queries, self.k)
        log(f"data {a.n} x {a.dim} and {a.queries} queries with exact top-{self.k} in {time.monotonic() - t:.1f} s")
        self.client, self.conn = self.scratch.start_connected("bench_tuner")
        self.max_ef = int(self.conn.execute("SELECT setting FROM neurondb.neurondb_settings "
                                            "WHERE name = 'neurondb.hnsw_max_ef_search'").fetchone()[0])
        self.conn.execute(f"SELECT neurondb.create_index('{INDEX}', %s, 'l2', %s, %s, ef_search => %s)",
                          (a.dim, a.m, a.ef_construction, a.starts[0]))
        t = time.monotonic()
        copy_vectors(self.conn, INDEX, self.base)
        log(f"COPY of {a.n} vectors in {time.monotonic() - t:.1f} s; waiting for the graph")
        self.shared = SharedState.attach(self.scratch.prefix)
        self.index = SharedIndex(self.shared, INDEX)
        t = time.monotonic()
        while (arrays := self.index.arrays()) is None or arrays.count < a.n:
            if time.monotonic() - t > a.build_timeout:
                raise BenchError(f"the graph has {arrays.count if arrays else 0} of {a.n} vectors after "
                                 f"{a.build_timeout:.0f} s\n{self.scratch.log_tail()}")
            time.sleep(0.5)
        log(f"graph built by neurandefrag in {time.monotonic() - t:.1f} s")
        ids = dict(self.conn.execute("SELECT doc_id, id FROM neurondb.neurondb_vectors WHERE index_name = %s",
                                     (INDEX,)).fetchall())
        self.truth_labels = np.array([ids[str(i)] for i in range(a.n)], np.int64)[self.truth_rows]
        self.client.search(INDEX, self.queries[0], k=self.k)     # the client attaches the graph

    def graph(self) -> hnsw.HnswArrays:
        assert self.index is not None
        arrays = self.index.arrays()
        assert arrays is not None
        return arrays

    # -- oracle ---------------------------------------------------------------------------------------

    def recall_at(self, ef: int) -> float:
        """Mean recall@k of the query set at `ef` on the service's graph, against this script's exact truth."""
        if ef not in self.recall:
            found, _ = hnsw.search_many(self.graph(), self.queries, self.k, max(ef, self.k))
            self.recall[ef] = float(np.mean([np.intersect1d(f, t).size / self.k
                                             for f, t in zip(found, self.truth_labels, strict=True)]))
        return self.recall[ef]

    def find_oracle(self) -> None:
        ladder = tuning.ef_ladder(self.k, self.max_ef)
        self.oracle = next((ef for ef in ladder if self.recall_at(ef) >= self.args.target_recall), None)
        if self.oracle is None:
            raise BenchError(f"recall {self.args.target_recall} is not reached even at ef {self.max_ef} "
                             f"(recall {self.recall_at(self.max_ef):.4f}): no oracle")
        log(f"oracle ef {self.oracle} (recall {self.recall_at(self.oracle):.4f})")

    # -- neuranmon ------------------------------------------------------------------------------------

    def set_tuner(self, enabled: bool) -> None:
        self.scratch.write_conf(neuranmon_enabled="on" if enabled else "off")
        self.scratch.cli("reload")

    def observe(self, since: datetime) -> list[Cycle]:
        """The tuner's cycles evaluated after `since`, each with the ef it started from."""
        assert self.conn is not None
        history = self.conn.execute(
            "SELECT recorded_at, old_ef FROM neurondb.neurondb_tuning_history "
            "WHERE index_name = %s AND recorded_at > %s ORDER BY history_id", (INDEX, since)).fetchall()
        cycles = self._cycles
        for c in cycles:
            c.seen = c.ef
        for recorded_at, old_ef in history:     # the state row is written just before its history row
            owner = [c for c in cycles if c.at <= recorded_at]
            if owner:
                owner[-1].seen = old_ef
        return cycles

    def poll(self, since: datetime) -> None:
        assert self.conn is not None
        row = self.conn.execute("SELECT evaluated_at, state, ef_search, queries, recall, recall_low, reason "
                                "FROM neurondb.neurondb_tuning_state WHERE index_name = %s", (INDEX,)).fetchone()
        if row and row[0] > since and (not self._cycles or row[0] != self._cycles[-1].at):
            self._cycles.append(Cycle(*row))

    def converge(self, start: int, first: bool) -> Run:
        """Search until the tuner converges from `start` and holds for --settle cycles (or --timeout)."""
        assert self.conn is not None and self.client is not None
        a = self.args
        run = Run("neuranmon", start)
        self._cycles: list[Cycle] = []
        since = self.conn.execute("SELECT clock_timestamp()").fetchone()[0]
        if not first:
            self.conn.execute("UPDATE neurondb.neurondb_indexes SET ef_search = %s WHERE index_name = %s",
                              (start, INDEX))
        pid = next(w.pid for w in self.scratch.status().workers if w.kind == "neuranmon")
        cpu0 = cpu_seconds(pid)
        t0 = time.monotonic()
        next_poll = 0.0
        searches = 0
        converged_at: int | None = None
        while time.monotonic() - t0 < a.timeout:
            for q in self.queries[self.rng.integers(0, len(self.queries), 50)]:
                self.client.search(INDEX, q, k=self.k)
            searches += 50
            if time.monotonic() < next_poll:
                continue
            next_poll = time.monotonic() + POLL_S
            self.poll(since)
            cycles = self.observe(since)
            counted = next((i for i, c in enumerate(cycles) if c.seen == start), None)
            if counted is None:
                continue
            mine = cycles[counted:]
            if converged_at is None:
                converged_at = next((i for i, c in enumerate(mine) if c.state == "converged"), None)
            if converged_at is not None and len(mine) > converged_at + a.settle:
                break
        cycles = self.observe(since)
        counted = next((i for i, c in enumerate(cycles) if c.seen == start), len(cycles))
        mine = cycles[counted:]
        gaps = [(b.at - c.at).total_seconds() for c, b in itertools.pairwise(cycles)]
        run.cycle_s = median(gaps)
        cpu = cpu_seconds(pid) - cpu0
        run.cpu_s, run.searches, run.cpu_ms_per_search = cpu / max(1, len(cycles)), searches, cpu * 1000 / searches
        run.path = [start] + [c.ef for c in mine if c.ef != c.seen]
        run.ef = int(self.conn.execute("SELECT ef_search FROM neurondb.neurondb_indexes WHERE index_name = %s",
                                       (INDEX,)).fetchone()[0])
        if converged_at is None:
            run.note = f"not converged in {a.timeout:.0f} s: {[(c.state, c.ef) for c in mine]}"
            return run
        done = mine[converged_at]
        run.waiting = sum(1 for c in mine[:converged_at] if c.state == "waiting")
        run.cycles = converged_at + 1 - run.waiting
        run.seconds = (done.at - since).total_seconds()
        run.queries, run.tuner_recall, run.tuner_low = done.queries, done.recall, done.recall_low
        run.held = all(c.ef == done.ef for c in mine[converged_at:])
        if not run.held:
            run.note = f"moved after converging: {[(c.state, c.ef, c.reason) for c in mine[converged_at:]]}"
        elif run.ef != done.ef:
            run.note = f"catalog ef {run.ef} != converged ef {done.ef}"
        log(f"neuranmon from {start}: {' -> '.join(map(str, run.path))} in {run.cycles} decision cycle(s) "
            f"(+{run.waiting} waiting), {run.seconds:.1f} s, {searches} searches; decided on {done.queries} sampled "
            f"queries: recall {done.recall:.4f}, lower bound {done.recall_low:.4f}; last reason: {done.reason}")
        return run

    # -- the document's strategy ----------------------------------------------------------------------

    def fixed_factor(self, start: int, sample: int) -> Run:
        assert self.client is not None
        a = self.args
        targets = tuning.Targets(recall=a.target_recall, latency_ms=a.target_latency, priority="recall")
        run = Run("fixed-factor", start, path=[start], queries=sample)
        ef = start
        for cycle in range(1, a.max_cycles + 1):
            chosen = self.rng.choice(len(self.queries), size=sample, replace=False)
            latencies, recalls = [], []
            for i in chosen:
                t = time.perf_counter()
                hits = self.client.search(INDEX, self.queries[i], k=self.k, ef=ef)
                latencies.append((time.perf_counter() - t) * 1000)
                found = np.array([int(h.doc_id) for h in hits], np.int64)
                recalls.append(np.intersect1d(found, self.truth_rows[i]).size / self.k)
            new = tuning.fixed_factor(ef, float(np.mean(latencies)), float(np.mean(recalls)), targets,
                                      self.max_ef, self.k)
            if new == ef:
                run.cycles, run.ef = cycle, ef
                break
            ef = new
            run.path.append(ef)
        else:
            run.ef, run.note = ef, f"still moving after {a.max_cycles} cycles"
        log(f"fixed-factor from {start}: {' -> '.join(map(str, run.path))} ({run.cycles} cycles)")
        return run

    # -- QPS ------------------------------------------------------------------------------------------

    def measure_qps(self, efs: list[int]) -> None:
        assert self.client is not None
        client: dict[int, list[float]] = {ef: [] for ef in efs}
        kernel: dict[int, list[float]] = {ef: [] for ef in efs}
        for ef in efs:     # warm: numba, the connection's plans, the pages of the graph
            self.recall_at(ef)
            for q in self.queries[:20]:
                self.client.search(INDEX, q, k=self.k, ef=ef)
        for _ in range(self.args.repeats):
            for ef in efs:
                t = time.perf_counter()
                for q in self.queries:
                    self.client.search(INDEX, q, k=self.k, ef=ef)
                client[ef].append(len(self.queries) / (time.perf_counter() - t))
                t, done = time.perf_counter(), 0
                while done == 0 or time.perf_counter() - t < KERNEL_S:    # one batch is too short to time
                    hnsw.search_many(self.graph(), self.queries, self.k, max(ef, self.k))
                    done += len(self.queries)
                kernel[ef].append(done / (time.perf_counter() - t))
        self.qps = {ef: {"client": median(client[ef]), "kernel": median(kernel[ef])} for ef in efs}

    # -- the whole run --------------------------------------------------------------------------------

    def body(self) -> None:
        self.setup()
        self.find_oracle()
        for i, start in enumerate(self.args.starts):
            self.runs.append(self.converge(start, first=i == 0))
        sampled = [r.queries for r in self.runs if r.queries]
        sample = min(len(self.queries), int(median(sampled)) if sampled else tuning.MIN_QUERIES)
        self.set_tuner(False)
        for start in self.args.starts:
            self.runs.append(self.fixed_factor(start, sample))
        assert self.oracle is not None
        efs = sorted({self.oracle, *(r.ef for r in self.runs if r.ef is not None)})
        log(f"QPS at ef {efs}, median of {self.args.repeats}")
        self.measure_qps(efs)

    def cleanup(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.conn is not None:
            self.conn.close()
        if self.index is not None:
            self.index.close()
        if self.shared is not None:
            self.shared.close()
        self.scratch.cleanup(keep=self.args.keep)

    # -- report ---------------------------------------------------------------------------------------

    def ratio(self, ef: int | None, kind: str) -> float | None:
        if ef is None or ef not in self.qps or self.oracle not in self.qps:
            return None
        return self.qps[ef][kind] / self.qps[self.oracle][kind]

    def report(self, code: int) -> dict:
        a = self.args
        fmt = lambda v, spec: "-" if v is None else format(v, spec)   # noqa: E731
        print(f"# bench_tuner: {a.n} x {a.dim} clustered (noise {a.noise:g}, seed {a.seed}), {a.queries} held queries, "
              f"k {self.k}, M {a.m}, ef_construction {a.ef_construction}; target recall {a.target_recall}, "
              f"target latency {a.target_latency:g} ms, naptime {a.naptime} s, max ef {self.max_ef}")
        print(f"# code: {code_version()}; outcome: {OUTCOMES.get(code, code)}")
        if self.recall:
            print("\n## oracle curve (mean recall@k of the held queries on the service's graph)")
            print("  ".join(f"ef {ef}: {r:.4f}" for ef, r in sorted(self.recall.items())))
            print(f"oracle ef: {self.oracle}")
        if self.runs:
            print(f"\n## convergence and QPS (QPS median of {a.repeats}; ratio = QPS at the final ef / QPS at the "
                  f"oracle ef {self.oracle}; n = sampled queries per decision; recall = the oracle curve's)")
            print(f"{'strategy':13} {'start':>5} {'cycles':>6} {'waiting':>7} {'wall s':>6} {'n':>5} {'final ef':>8} "
                  f"{'oracle':>6} {'recall':>7} {'client QPS':>10} {'ratio':>6} {'kernel QPS':>10} {'ratio':>6}  path")
            for r in self.runs:
                qps = self.qps.get(r.ef or -1, {})
                print(f"{r.strategy:13} {r.start:5d} {fmt(r.cycles, 'd'):>6} "
                      f"{r.waiting if r.strategy == 'neuranmon' else '-':>7} {fmt(r.seconds, '.1f'):>6} "
                      f"{fmt(r.queries, 'd'):>5} {fmt(r.ef, 'd'):>8} {fmt(self.oracle, 'd'):>6} "
                      f"{fmt(self.recall.get(r.ef or -1), '.4f'):>7} {fmt(qps.get('client'), '.0f'):>10} "
                      f"{fmt(self.ratio(r.ef, 'client'), '.3f'):>6} {fmt(qps.get('kernel'), '.0f'):>10} "
                      f"{fmt(self.ratio(r.ef, 'kernel'), '.3f'):>6}  {'->'.join(map(str, r.path))}"
                      + (f"  [{r.note}]" if r.note else ""))
            tuner = [r for r in self.runs if r.strategy == "neuranmon"]
            if tuner and tuner[0].cycle_s:
                print(f"(neuranmon cycles were {median([r.cycle_s for r in tuner if r.cycle_s]):.1f} s apart "
                      f"(naptime {a.naptime} s) and took {median([r.cpu_s for r in tuner if r.cpu_s]):.2f} CPU s each, "
                      f"{median([r.cpu_ms_per_search for r in tuner if r.cpu_ms_per_search]):.2f} CPU ms per client "
                      f"search (draining the ring included); fixed-factor cycles are simulated, each one naptime "
                      f"in the service, on {self.runs[-1].queries} queries per cycle)")
            print("\n## verdicts")
            for strategy in ("neuranmon", "fixed-factor"):
                runs = [r for r in self.runs if r.strategy == strategy]
                if not runs:
                    continue
                ok = all(r.cycles is not None and r.cycles <= CYCLES_TARGET and r.held is not False for r in runs)
                print(f"{strategy}: stops moving within {CYCLES_TARGET} cycles from each start: "
                      f"{'PASS' if ok else 'FAIL'} ("
                      + ", ".join(f"from {r.start}: {fmt(r.cycles, 'd')}" for r in runs) + ")")
                for kind in ("client", "kernel"):
                    ratios = [self.ratio(r.ef, kind) for r in runs]
                    ok = all(x is not None and x >= QPS_TARGET for x in ratios)
                    print(f"{strategy}: {kind} QPS at the final ef >= {QPS_TARGET} x QPS at the oracle ef: "
                          f"{'PASS' if ok else 'FAIL'} ("
                          + ", ".join(f"from {r.start}: ef {r.ef}, {fmt(x, '.3f')}" for r, x in zip(runs, ratios,
                                                                                                  strict=True))
                          + ")")
                recalls = [self.recall.get(r.ef or -1) for r in runs]
                ok = all(x is not None and x >= a.target_recall - 0.01 for x in recalls)
                print(f"{strategy}: recall at the final ef >= target - 0.01: {'PASS' if ok else 'FAIL'} ("
                      + ", ".join(f"from {r.start}: {fmt(x, '.4f')}" for r, x in zip(runs, recalls, strict=True))
                      + ")")
        return {"args": vars(a), "outcome": code, "max_ef": self.max_ef, "oracle": self.oracle,
                "curve": self.recall, "runs": [asdict(r) for r in self.runs], "qps": self.qps}



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="vectors")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000, help="held query set")
    ap.add_argument("--quick", action="store_true", help="10,000 x 64 and 400 queries (1-2 minutes)")
    ap.add_argument("--noise", type=float, default=0.1,
                    help="isotropic noise added to the clusters (bench_index's 0.1); more is harder")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--starts", default="16,512", help="starting ef values, comma-separated")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--target-latency", type=float, default=100.0, help="ms (the document's default)")
    ap.add_argument("--naptime", type=int, default=2, help="neuranmon_naptime in seconds (>= 1)")
    ap.add_argument("--settle", type=int, default=2, help="cycles after convergence that must keep the ef")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per start before giving up")
    ap.add_argument("--build-timeout", type=float, default=900.0, help="seconds for the graph build")
    ap.add_argument("--max-cycles", type=int, default=20, help="fixed-factor cycles at most")
    ap.add_argument("--repeats", type=int, default=3, help="QPS repetitions (median)")
    ap.add_argument("--seed", type=int, default=42)
    add_run_options(ap)
    args = ap.parse_args()
    if args.quick:
        args.n, args.dim, args.queries = 10_000, 64, 400
    args.starts = [int(s) for s in args.starts.split(",")]
    return run_bench(lambda: Bench(args), args.json, errors=(BenchError, SearchError, psycopg.Error))


if __name__ == "__main__":
    sys.exit(main())
