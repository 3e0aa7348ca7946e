#!/usr/bin/env python3
"""What a search costs the application: `Client.search` against hnswlib, right after a bulk COPY and in
steady state (issue 12).

One run, one process, on a scratch installation (embedded PostgreSQL, or `--dsn`); neuranmon is switched
off so that its replays do not share the 2 cores with the measurements:

1. **Data.** With `--data onnx` (the default `auto` picks it when neurondb's `onnx` extra and its MiniLM
   model are installed, except with `--quick`): all-MiniLM-L6-v2 embeddings (384 dims, unit vectors,
   metric cosine) of real English text, the sentences of the docstrings of Python's standard library
   (read with `ast`, never imported), then of site-packages if more are needed, shuffled by the seed;
   held queries are other sentences. Embedding 30,000 texts takes 2-6 minutes on 2 busy cores, so the
   vectors are cached under `--cache-dir` and reused by later runs with the same figures. Otherwise
   (`--data synthetic`) `bench_index.Mixture`'s clustered data (topics on low-dimensional subspaces plus
   noise), metric l2. Default 29,000 x 384 and 1,000 queries (the issue's figures were at that size);
   exact top-10 by brute force.
2. **Load.** `create_index` (M 16, ef_construction 200), then ONE COPY of all vectors while the service
   runs, then wait until the shared-memory graph holds them all and `vector_stats.pending_changes` is 0.
   hnswlib (same M and ef_construction) is built meanwhile in a thread, single-threaded.
3. **Right after the COPY.** Until step 4, a connection of this script holds a SHARE UPDATE EXCLUSIVE lock
   on `neurondb_vectors` (taken before the COPY): no ANALYZE can run on it, neither autovacuum's nor
   neurandefrag's table maintenance (which would do it within ~10 s; it fails on its 200 ms lock_timeout
   and tries again later), so the planner still has the statistics of the empty table, which is what an
   application meets for those seconds. pg_stat_user_tables' analyze counts are printed before and after
   the phase, as a check. Single-query calls at ef 64, k 10, the same queries on every path, in blocks of
   `--block` calls rotating over the paths, `--calls` calls per path: hnswlib `knn_query(q, num_threads=1)`,
   the bare kernel `hnsw.search` on the service's graph (attached as the client does), `Client.search`
   default mode (`consistent=False`: the answer from shared memory alone; only when the client has the
   parameter) and consistent mode (`consistent=True`: every hit checked in PostgreSQL; a client without
   the parameter does this on every search, so its `search()` is measured as "consistent"). Each call is
   timed on its own: median and nearest-rank p99 in microseconds; QPS = 1e6 / median.
4. **Steady state.** The lock is released, `ANALYZE neurondb.neurondb_vectors`, the same measurement.
5. **Batch.** `Client.search_many(index, queries, k, ef, as_arrays=True)` (when the client has it), the bare
   kernel `hnsw.search_many` and hnswlib's `knn_query(queries, num_threads=1)` over the whole query set,
   each repeated for at least 1 s, median QPS of `--repeats`, the three alternating.

Recall@10 of every path against the exact ground truth is printed with its speed, so that a fast wrong
answer shows. Targets (issue 12): default mode >= 0.8 x hnswlib's QPS, both right after the COPY and in
steady state; consistent mode right after the COPY costs <= 1.5 x today's steady-state search (this run's
consistent steady state, or `--today-us` measured on the code before the change); search_many >= 0.9 x
hnswlib's batch QPS.

    PYTHONPATH=. .venv/bin/python scripts/bench_search.py --quick   # 5,000 x 384 synthetic, 500 calls: < 1 min
    PYTHONPATH=. .venv/bin/python scripts/bench_search.py           # 29,000 x 384 (ONNX if installed): ~2.5 min

PYTHONPATH chooses the checkout whose code runs, the script's and the service's (which inherits it).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import re
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from bench_index import Mixture, ground_truth
from benchlib import (
    OUTCOMES,
    BenchError,
    Scratch,
    add_run_options,
    code_version,
    copy_vectors,
    log,
    median,
    percentile,
    run_bench,
)

from neurondb.client import Client, SearchError
from neurondb.index import hnsw
from neurondb.index.store import SharedIndex
from neurondb.shm.control import SharedState

INDEX = "s"
M, EF_CONSTRUCTION = 16, 200
TARGET_DEFAULT = 0.8        # default-mode QPS / hnswlib per-call QPS, after the COPY and in steady state
TARGET_CONSISTENT = 1.5     # consistent-mode cost after the COPY / today's steady-state cost
TARGET_BATCH = 0.9          # search_many QPS / hnswlib batch QPS
BATCH_S = 1.0               # batch QPS: whole batches for at least this long per measurement
PHASES = ("after COPY", "steady state")


# -- data -------------------------------------------------------------------------------------------------


def docstring_sentences(needed: int) -> list[str]:
    """Sentences of real English prose: from the docstrings of the standard library's modules (parsed, never
    imported), then of this environment's site-packages if the standard library has fewer than `needed`;
    each sentence once, whitespace collapsed, 40-400 characters, mostly letters (no tables, no code).
    Sentences, not paragraphs: the standard library and the venv have about 22,000 distinct paragraphs,
    fewer than the default 30,000 texts; a sentence is as long as a typical query or short passage."""
    seen: set[str] = set()
    out: list[str] = []
    for key in ("stdlib", "purelib"):
        root = Path(sysconfig.get_paths()[key])
        for path in sorted(root.rglob("*.py")):
            if {"test", "tests", "site-packages"} & set(path.relative_to(root).parts):
                continue        # test code is not prose; site-packages comes second, if at all
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for text in re.split(r"(?<=[.!?])\s+", " ".join((ast.get_docstring(node) or "").split())):
                    if (40 <= len(text) <= 400 and text not in seen
                            and sum(c.isalpha() or c == " " for c in text) > 0.85 * len(text)):
                        seen.add(text)
                        out.append(text)
        if len(out) >= needed:
            break
    return out


def onnx_data(n: int, nq: int, seed: int, cache_dir: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(base, queries, description): MiniLM embeddings of `n` + `nq` docstring sentences, from the cache
    when a run with the same figures made them (the model and the corpus depend only on the installation)."""
    from neurondb.providers import onnx

    key = hashlib.sha256(f"{sys.version}|{onnx.default_files()[0]}|{n}|{nq}|{seed}".encode()).hexdigest()[:16]
    cached = cache_dir / f"minilm-{n}-{nq}-{seed}-{key}.npz"
    if cached.is_file():
        data = np.load(cached)
        log(f"ONNX MiniLM embeddings from {cached}")
        return data["base"], data["queries"], str(data["description"])
    t = time.monotonic()
    texts = docstring_sentences(n + nq)
    if len(texts) < n + nq:
        raise BenchError(f"only {len(texts)} docstring sentences found, {n + nq} needed: lower --n or --queries")
    order = np.random.default_rng(seed).permutation(len(texts))[: n + nq]
    chosen = [texts[i] for i in order]
    log(f"{len(texts)} docstring sentences in {time.monotonic() - t:.0f} s; embedding {n + nq} with MiniLM "
        "(2-6 minutes for 30,000 on 2 cores; cached for the next run)")
    t = time.monotonic()
    vectors = np.asarray(onnx.OnnxMiniLMEmbedder(batch_size=64).embed(chosen), np.float32)
    description = (f"all-MiniLM-L6-v2 (ONNX int8) embeddings of {n} + {nq} docstring sentences of "
                   f"{len(texts)} (Python {sys.version.split()[0]} standard library first), metric cosine")
    log(f"embedded in {time.monotonic() - t:.0f} s")
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cached, base=vectors[:n], queries=vectors[n:], description=description)
    return vectors[:n], vectors[n:], description


def synthetic_data(n: int, dim: int, nq: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """bench_index's clustered mixture (as bench_index.make_data, with `noise`)."""
    mix = Mixture(dim, n_clusters=max(8, round(np.sqrt(n) / 3)), seed=seed)
    mix.noise = noise
    return (mix.sample(n, seed + 1), mix.sample(nq, seed + 2),
            f"bench_index.Mixture clustered data (noise {noise:g}, seed {seed}), metric l2")


def onnx_available() -> bool:
    from neurondb.providers import onnx

    return onnx.available()


# -- figures ----------------------------------------------------------------------------------------------


@dataclass
class PathFigures:
    """One search path in one phase: per-call times and the recall of its answers."""

    name: str
    us: list[float] = field(default_factory=list)
    recall: float | None = None

    @property
    def median_us(self) -> float | None:
        return median(self.us)

    @property
    def p99_us(self) -> float | None:
        return percentile(self.us, 0.99)

    @property
    def qps(self) -> float | None:
        m = self.median_us
        return None if not m else 1e6 / m

    def summary(self) -> dict[str, Any]:
        return {"calls": len(self.us), "median_us": self.median_us, "p99_us": self.p99_us, "qps": self.qps,
                "recall": self.recall}


@dataclass
class Phase:
    name: str
    paths: dict[str, PathFigures] = field(default_factory=dict)
    seconds: float = 0.0
    analyzes_before: tuple[int, int] | None = None     # (analyze_count, autoanalyze_count) of neurondb_vectors
    analyzes_after: tuple[int, int] | None = None

    def ratio(self, path: str) -> float | None:
        mine, theirs = self.paths.get(path), self.paths.get("hnswlib")
        if mine is None or theirs is None or mine.qps is None or theirs.qps is None:
            return None
        return mine.qps / theirs.qps


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        settings = {"neurondb.neuranmon_enabled": "off"}
        self.scratch = Scratch("neurondb-benchsearch-", args.dsn, settings, owner="scripts/bench_search.py")
        self.client: Client | None = None
        self.conn: psycopg.Connection | None = None
        self.holder: psycopg.Connection | None = None          # holds the lock that keeps ANALYZE away
        self.shared: SharedState | None = None
        self.index: SharedIndex | None = None
        self.hnswlib: Any = None
        self.description = ""
        self.metric = "l2"
        self.has_consistent = "consistent" in inspect.signature(Client.search).parameters
        self.has_many = callable(getattr(Client, "search_many", None))
        self.phases: list[Phase] = []
        self.batch: dict[str, dict[str, Any]] = {}
        self.timings: dict[str, float] = {}
        self.refused: dict[str, int] = {}     # neurandefrag's table operations on neurondb_vectors while locked

    # -- set-up ---------------------------------------------------------------------------------------

    def data(self) -> None:
        a = self.args
        t = time.monotonic()
        if a.data == "onnx":
            self.base, self.queries, self.description = onnx_data(a.n, a.queries, a.seed, a.cache_dir)
            self.metric = "cosine"
        else:
            self.base, self.queries, self.description = synthetic_data(a.n, a.dim, a.queries, a.noise, a.seed)
        self.dim = self.base.shape[1]
        # Unit vectors (the embeddings) rank the same by l2 as by cosine: one exact search serves both.
        self.truth = ground_truth(self.base, self.queries, a.k)
        log(f"{self.description}: {a.n} x {self.dim}, {a.queries} queries with exact top-{a.k} "
            f"in {time.monotonic() - t:.1f} s")

    def build_hnswlib(self) -> None:
        """hnswlib on the same data, one thread (runs in a thread while the service builds its graph:
        hnswlib releases the GIL in add_items)."""
        import hnswlib

        t = time.monotonic()
        index = hnswlib.Index(space="cosine" if self.metric == "cosine" else "l2", dim=self.dim)
        index.init_index(max_elements=len(self.base), M=M, ef_construction=EF_CONSTRUCTION, random_seed=self.args.seed)
        index.add_items(self.base, np.arange(len(self.base)), num_threads=1)
        index.set_ef(self.args.ef)
        self.hnswlib = index
        self.timings["hnswlib build s"] = time.monotonic() - t

    def setup(self) -> None:
        a = self.args
        self.data()
        self.client, self.conn = self.scratch.start_connected("bench_search")
        self.conn.execute(f"SELECT neurondb.create_index('{INDEX}', %s, '{self.metric}', %s, %s, ef_search => %s)",
                          (self.dim, M, EF_CONSTRUCTION, a.ef))
        self.holder = self.client.instance.connect("bench_search lock")
        self.holder.autocommit = False           # the lock lasts until holder.commit()
        self.holder.execute("LOCK TABLE neurondb.neurondb_vectors IN SHARE UPDATE EXCLUSIVE MODE")
        t = time.monotonic()
        copy_vectors(self.conn, INDEX, self.base)
        self.timings["COPY s"] = time.monotonic() - t
        log(f"one COPY of {a.n} vectors in {self.timings['COPY s']:.1f} s; hnswlib builds while the service "
            "builds its graph")
        builder = threading.Thread(target=self.build_hnswlib, name="hnswlib build", daemon=True)
        builder.start()
        self.shared = SharedState.attach(self.scratch.prefix)
        self.index = SharedIndex(self.shared, INDEX)
        t = time.monotonic()

        def built() -> bool:
            arrays = self.index.arrays() if self.index else None
            if arrays is None or arrays.count < a.n:
                return False
            row = self.conn.execute("SELECT graph_nodes, pending_changes FROM neurondb.vector_stats "
                                    "WHERE index_name = %s", (INDEX,)).fetchone()
            return bool(row and row[0] is not None and row[0] >= a.n and row[1] == 0)

        self.scratch.wait_for(built, a.build_timeout, f"the graph to hold {a.n} vectors", interval=0.2)
        self.timings["graph build s"] = time.monotonic() - t
        log(f"graph built by neurandefrag in {self.timings['graph build s']:.1f} s")
        builder.join()
        if self.hnswlib is None:
            raise BenchError("the hnswlib build failed (see the traceback above)")
        log(f"hnswlib built in {self.timings['hnswlib build s']:.1f} s")
        ids = dict(self.conn.execute("SELECT id, doc_id FROM neurondb.neurondb_vectors WHERE index_name = %s",
                                     (INDEX,)).fetchall())
        self.row_of = np.full(max(ids) + 1, -1, np.int64)     # table id (the graph's label) -> row of base
        self.row_of[list(ids)] = [int(d) for d in ids.values()]

    # -- single-query paths -----------------------------------------------------------------------------

    def paths(self) -> dict[str, Callable[[np.ndarray], Any]]:
        """name -> one search call; each returns what `rows()` turns into rows of the base set."""
        a, client = self.args, self.client
        assert client is not None and self.index is not None
        graph = self.index.arrays()
        assert graph is not None
        paths: dict[str, Callable[[np.ndarray], Any]] = {
            "hnswlib": lambda q: self.hnswlib.knn_query(q, k=a.k, num_threads=1)[0][0],
            "kernel": lambda q: hnsw.search(graph, q, a.k, a.ef)[0],
        }
        if self.has_consistent:
            paths["default"] = lambda q: client.search(INDEX, q, k=a.k, ef=a.ef, consistent=False)
            paths["consistent"] = lambda q: client.search(INDEX, q, k=a.k, ef=a.ef, consistent=True)
        else:
            paths["consistent"] = lambda q: client.search(INDEX, q, k=a.k, ef=a.ef)
        return paths

    def labels_to_rows(self, labels: np.ndarray) -> np.ndarray:
        """The graph's labels (table ids) as rows of the base set; -1 (no result) stays -1."""
        return np.where(labels >= 0, self.row_of[np.maximum(labels, 0)], -1)

    def rows(self, name: str, result: Any) -> np.ndarray:
        if name == "hnswlib":
            return np.asarray(result, np.int64)
        if name == "kernel":
            return self.labels_to_rows(np.asarray(result, np.int64))
        return np.array([int(h.doc_id) for h in result], np.int64)

    def analyze_counts(self) -> tuple[int, int]:
        assert self.conn is not None
        row = self.conn.execute("SELECT analyze_count, autoanalyze_count FROM pg_stat_user_tables "
                                "WHERE schemaname = 'neurondb' AND relname = 'neurondb_vectors'").fetchone()
        return int(row[0]), int(row[1])

    def measure(self, name: str) -> Phase:
        a = self.args
        phase = Phase(name)
        phase.analyzes_before = self.analyze_counts()
        t0 = time.monotonic()
        paths = self.paths()
        for fn in paths.values():      # warm: numba, the connection's prepared statements, the graph's pages
            for q in self.queries[:20]:
                fn(q)
        phase.paths = {p: PathFigures(p) for p in paths}
        found: dict[str, dict[int, Any]] = {p: {} for p in paths}
        nq = len(self.queries)
        names = list(paths)
        block = 0
        while min(len(f.us) for f in phase.paths.values()) < a.calls:
            start = (block * a.block) % nq
            rotated = names[block % len(names):] + names[:block % len(names)]
            for p in rotated:
                fn, us, seen = paths[p], phase.paths[p].us, found[p]
                for i in range(start, min(start + a.block, nq)):
                    q = self.queries[i]
                    t = time.perf_counter()
                    r = fn(q)
                    us.append((time.perf_counter() - t) * 1e6)
                    if i not in seen:
                        seen[i] = r
            block += 1
        for p, seen in found.items():
            hits = [np.intersect1d(self.rows(p, r), self.truth[i]).size for i, r in seen.items()]
            phase.paths[p].recall = float(np.sum(hits)) / (len(hits) * a.k)
        phase.seconds = time.monotonic() - t0
        phase.analyzes_after = self.analyze_counts()
        log(f"{name}: " + ", ".join(f"{p} {f.median_us:.0f} us" for p, f in phase.paths.items())
            + f" ({phase.seconds:.1f} s)")
        return phase

    # -- batch ------------------------------------------------------------------------------------------

    def measure_batch(self) -> None:
        a, client = self.args, self.client
        assert client is not None and self.index is not None
        graph = self.index.arrays()
        qs = self.queries
        calls: dict[str, Callable[[], Any]] = {
            "hnswlib": lambda: self.hnswlib.knn_query(qs, k=a.k, num_threads=1),
            "kernel": lambda: hnsw.search_many(graph, qs, a.k, a.ef),
        }
        if self.has_many:
            calls["search_many"] = lambda: client.search_many(INDEX, qs, k=a.k, ef=a.ef, as_arrays=True)
        qps: dict[str, list[float]] = {p: [] for p in calls}
        recall: dict[str, float] = {}
        for p, fn in calls.items():    # warm, and the recall of one batch
            found = np.asarray(fn()[0], np.int64)
            rows = found if p == "hnswlib" else self.labels_to_rows(found)
            recall[p] = float(sum(np.intersect1d(f, t).size for f, t in zip(rows, self.truth, strict=True))
                              / self.truth.size)
        for _ in range(a.repeats):
            for p, fn in calls.items():
                t, done = time.perf_counter(), 0
                while done == 0 or time.perf_counter() - t < BATCH_S:
                    fn()
                    done += len(qs)
                qps[p].append(done / (time.perf_counter() - t))
        self.batch = {p: {"qps": median(v), "recall": recall[p]} for p, v in qps.items()}
        log("batch: " + ", ".join(f"{p} {f['qps']:.0f} QPS" for p, f in self.batch.items()))

    # -- the run ----------------------------------------------------------------------------------------

    def body(self) -> None:
        self.setup()
        self.phases.append(self.measure(PHASES[0]))
        assert self.holder is not None and self.conn is not None
        self.refused = dict(self.conn.execute(
            "SELECT operation || ' ' || status, count(*) FROM neurondb.neurondb_index_maintenance "
            "WHERE table_name LIKE '%neurondb_vectors' GROUP BY 1").fetchall())
        self.holder.commit()                      # the lock goes; ANALYZE may run from now on
        t = time.monotonic()
        self.conn.execute("ANALYZE neurondb.neurondb_vectors")
        self.timings["ANALYZE s"] = time.monotonic() - t
        self.phases.append(self.measure(PHASES[1]))
        self.measure_batch()

    def cleanup(self) -> None:
        for closeable in (self.holder, self.conn, self.client, self.index, self.shared):
            if closeable is not None:
                try:
                    closeable.close()
                except Exception as exc:     # keep cleaning
                    log(f"cleanup: {exc}")
        self.scratch.cleanup(keep=self.args.keep)

    # -- report -----------------------------------------------------------------------------------------

    def verdicts(self) -> list[tuple[str, bool | None, str]]:
        """(target, met (None: not measurable in this version), figures)."""
        a = self.args
        out: list[tuple[str, bool | None, str]] = []
        fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)   # noqa: E731
        by = {p.name: p for p in self.phases}
        for name in PHASES:
            phase = by.get(name)
            if not self.has_consistent:
                out.append((f"default mode >= {TARGET_DEFAULT} x hnswlib QPS, {name}", None,
                            "default mode: not available in this version"))
            elif phase is not None:
                r = phase.ratio("default")
                out.append((f"default mode >= {TARGET_DEFAULT} x hnswlib QPS, {name}",
                            r is not None and r >= TARGET_DEFAULT, f"{fmt(r)} x"))
        after, steady = by.get(PHASES[0]), by.get(PHASES[1])
        today = a.today_us if a.today_us else (steady.paths["consistent"].median_us if steady else None)
        source = "--today-us" if a.today_us else "this run's consistent steady state"
        if after is not None and today:
            cost = after.paths["consistent"].median_us
            r = cost / today if cost else None
            out.append((f"consistent mode after COPY <= {TARGET_CONSISTENT} x today's steady-state cost",
                        r is not None and r <= TARGET_CONSISTENT,
                        f"{fmt(cost, '.0f')} us / {today:.0f} us ({source}) = {fmt(r)} x"))
        if not self.has_many:
            out.append((f"search_many >= {TARGET_BATCH} x hnswlib batch QPS", None,
                        "search_many: not available in this version"))
        elif self.batch:
            r = self.batch["search_many"]["qps"] / self.batch["hnswlib"]["qps"]
            out.append((f"search_many >= {TARGET_BATCH} x hnswlib batch QPS", r >= TARGET_BATCH, f"{r:.3f} x"))
        return out

    def report(self, code: int) -> dict[str, Any]:
        a = self.args
        fmt = lambda v, spec: "-" if v is None else format(v, spec)   # noqa: E731
        print(f"# bench_search: {a.n} x {getattr(self, 'dim', a.dim)}, {a.queries} queries; {self.description}; "
              f"k {a.k}, ef {a.ef}, M {M}, ef_construction {EF_CONSTRUCTION}; one process, one thread")
        print(f"# code: {code_version()}; outcome: {OUTCOMES.get(code, code)}")
        print(f"# client: consistent= parameter {'present' if self.has_consistent else 'absent'}, "
              f"search_many {'present' if self.has_many else 'absent'}"
              + ("" if self.has_consistent else "; default mode: not available in this version, today's "
                 "search() measured as 'consistent'"))
        if self.timings:
            print("# " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()))
        if self.phases:
            print("# neurandefrag's table maintenance on neurondb_vectors until the end of 'after COPY' (the lock "
                  "refuses it): " + (", ".join(f"{k}: {v}" for k, v in self.refused.items()) or "none attempted"))
        for phase in self.phases:
            moved = phase.analyzes_before != phase.analyzes_after
            print(f"\n## {phase.name} ({phase.seconds:.1f} s; {a.calls} calls per path in blocks of {a.block}; "
                  f"(analyze, autoanalyze) count of neurondb_vectors {phase.analyzes_before} -> "
                  f"{phase.analyzes_after}{': ANALYZED DURING THE PHASE' if moved else ', unchanged'})")
            print(f"{'path':12} {'us/call':>9} {'p99 us':>9} {'QPS':>8} {'x hnswlib':>9} {'recall@' + str(a.k):>9}")
            for p, f in phase.paths.items():
                print(f"{p:12} {fmt(f.median_us, '.1f'):>9} {fmt(f.p99_us, '.1f'):>9} {fmt(f.qps, '.0f'):>8} "
                      f"{fmt(phase.ratio(p), '.3f'):>9} {fmt(f.recall, '.4f'):>9}")
            kernel = phase.paths.get("kernel")
            if kernel and kernel.median_us:
                over = [f"{p} {f.median_us - kernel.median_us:.0f} us" for p, f in phase.paths.items()
                        if p in ("default", "consistent") and f.median_us]
                print("overhead over the bare kernel: " + ", ".join(over))
        if self.batch:
            print(f"\n## batch ({a.queries} queries per call, one thread, median of {a.repeats} x >= {BATCH_S:g} s)")
            print(f"{'path':12} {'QPS':>8} {'x hnswlib':>9} {'recall@' + str(a.k):>9}")
            for p, f in self.batch.items():
                print(f"{p:12} {f['qps']:8.0f} {f['qps'] / self.batch['hnswlib']['qps']:9.3f} {f['recall']:9.4f}")
            if not self.has_many:
                print("search_many: not available in this version")
        verdicts = self.verdicts()
        if verdicts:
            print("\n## verdicts")
            for target, met, figures in verdicts:
                print(f"{'-' if met is None else 'PASS' if met else 'MISS':4}  {target}: {figures}")
        return {"args": {k: str(v) for k, v in vars(a).items()}, "outcome": code, "data": self.description,
                "client": {"consistent": self.has_consistent, "search_many": self.has_many},
                "timings": self.timings, "table_maintenance_while_locked": self.refused,
                "phases": [{**{k: v for k, v in asdict(p).items() if k != "paths"},
                            "paths": {n: f.summary() for n, f in p.paths.items()}} for p in self.phases],
                "batch": self.batch,
                "verdicts": [{"target": t, "met": m, "figures": f} for t, m, f in verdicts]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("auto", "onnx", "synthetic"), default="auto",
                    help="auto: onnx when neurondb's onnx extra is installed (synthetic with --quick)")
    ap.add_argument("--n", type=int, default=29_000, help="vectors")
    ap.add_argument("--dim", type=int, default=384, help="synthetic data only (MiniLM's are 384)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.1, help="synthetic data: bench_index's 0.1")
    ap.add_argument("--quick", action="store_true", help="5,000 vectors, 500 queries, 500 calls (about a minute)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--ef", type=int, default=64)
    ap.add_argument("--calls", type=int, default=2000, help="single-query calls per path and phase")
    ap.add_argument("--block", type=int, default=100, help="calls of one path before the next path's")
    ap.add_argument("--repeats", type=int, default=3, help="batch QPS repetitions (median)")
    ap.add_argument("--today-us", type=float, help="today's steady-state Client.search us/call, measured on the "
                    "code before the change (default: this run's consistent steady state)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "neurondb-bench",
                    help="where the ONNX embeddings are kept between runs")
    ap.add_argument("--build-timeout", type=float, default=600.0, help="seconds for the graph build")
    add_run_options(ap)
    args = ap.parse_args()
    if args.quick:
        args.n, args.queries, args.calls = 5_000, 500, 500
    if args.data == "auto":
        args.data = "onnx" if not args.quick and onnx_available() else "synthetic"
    elif args.data == "onnx" and not onnx_available():
        from neurondb.providers import onnx

        print(f"--data onnx: {onnx.INSTALL_HINT}", file=sys.stderr)
        return 2
    return run_bench(lambda: Bench(args), args.json, errors=(BenchError, SearchError, psycopg.Error))


if __name__ == "__main__":
    sys.exit(main())
