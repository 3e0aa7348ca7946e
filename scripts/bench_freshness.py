#!/usr/bin/env python3
"""How long a row written by plain SQL takes to become searchable (issue 5: "within 1 s, p95").

Starts a service on a temporary data directory (embedded PostgreSQL, or `--dsn`), creates an index, then
for `--seconds` inserts `--rate` rows per second, each in its own transaction as an application would,
while a second process searches the index continuously (the "normal load"). A poller reads the graph in
shared memory and notes when each row's id is published; freshness = publish time - commit time.

    .venv/bin/python scripts/bench_freshness.py [--rate 50] [--seconds 10] [--dim 128] [--dsn DSN] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import threading
import time

import numpy as np
import psycopg
from benchlib import Scratch

import neurondb
from neurondb.index.store import SharedIndex
from neurondb.shm.control import SharedState


def searcher(data_dir: str, dsn: str, dim: int, stop: multiprocessing.Event, counter: multiprocessing.Value) -> None:
    """The background load: back-to-back searches from another process."""
    rng = np.random.default_rng(1)
    with neurondb.connect(data_dir, dsn) as client:
        while not stop.is_set():
            try:
                client.search("fresh", rng.standard_normal(dim).astype(np.float32), k=10)
                counter.value += 1
            except neurondb.client.SearchError:
                time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=50.0, help="rows inserted per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--preload", type=int, default=10_000, help="rows in the index before measuring")
    ap.add_argument("--dsn")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    scratch = Scratch("neurondb-fresh-", args.dsn, owner="scripts/bench_freshness.py")
    data_dir = scratch.root
    stop = multiprocessing.Event()
    load = None
    try:
        scratch.cli("init", timeout=300)
        dsn = scratch.cli("dsn").strip()
        rng = np.random.default_rng(0)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT neurondb.create_index('fresh', %s, 'cosine')", (args.dim,))
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, embedding) "
                                "VALUES ('fresh', %s, %s)",
                                [(f"p{i}", v.tolist()) for i, v in
                                 enumerate(rng.standard_normal((args.preload, args.dim)).astype(np.float32))])
        scratch.cli("start", timeout=300)
        shared = SharedState.attach(scratch.prefix)
        index = SharedIndex(shared, "fresh")
        deadline = time.monotonic() + 120
        while (a := index.arrays()) is None or a.count < args.preload:
            if time.monotonic() > deadline:
                raise RuntimeError("the index did not load within 120 s")
            time.sleep(0.05)

        searches = multiprocessing.Value("l", 0)
        load = multiprocessing.get_context("fork").Process(
            target=searcher, args=(str(data_dir), dsn, args.dim, stop, searches), daemon=True)
        load.start()

        committed: dict[int, float] = {}
        seen: dict[int, float] = {}
        done = threading.Event()

        def poll() -> None:
            start = index.arrays().count
            while not done.is_set() or len(seen) < len(committed):
                a = index.arrays()
                n = a.count
                if n > start:
                    now = time.perf_counter()
                    for label in a.labels[start:n].tolist():
                        seen.setdefault(label, now)
                    start = n
                time.sleep(0.001)
                if done.is_set() and time.perf_counter() - last_commit[0] > 10:
                    return

        last_commit = [time.perf_counter()]
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        interval = 1.0 / args.rate
        t0 = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True) as conn:
            i = 0
            while time.perf_counter() - t0 < args.seconds:
                v = rng.standard_normal(args.dim).astype(np.float32)
                row_id = conn.execute("INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, embedding) "
                                      "VALUES ('fresh', %s, %s) RETURNING id", (f"f{i}", v.tolist())).fetchone()[0]
                committed[row_id] = last_commit[0] = time.perf_counter()
                i += 1
                time.sleep(max(0.0, t0 + i * interval - time.perf_counter()))
        done.set()
        poller.join(15)
        index.close()
        shared.close()
        lat = sorted((seen[r] - t) * 1000 for r, t in committed.items() if r in seen)
        missing = len(committed) - len(lat)
        if not lat:
            raise RuntimeError(f"no inserted row reached the graph; {scratch.log_tail(15)}")
        result = {
            "rows": len(committed), "rate_per_s": args.rate, "dim": args.dim, "preloaded": args.preload,
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
    finally:
        stop.set()
        if load is not None:
            load.join(5)
        scratch.cleanup(keep=False)


if __name__ == "__main__":
    sys.exit(main())
