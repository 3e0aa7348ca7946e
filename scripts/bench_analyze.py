"""The search's row fetch right after a bulk COPY, before and after neurandefrag's ANALYZE (issue 11).

COPY N vectors (dim 128) into a fresh database's neurondb_vectors (autovacuum off on it, so the "before"
state is the one a search meets until autovacuum wakes up), then time the client's `hits` query (10
random ids, as the client runs it: same connection, psycopg's automatic prepare) R times, run
TableMaintenance once (it ANALYZEs the table), time it again. Prints the plan and the median of each.

    .venv/bin/python scripts/bench_analyze.py                 # embedded PostgreSQL in /tmp, removed after
    .venv/bin/python scripts/bench_analyze.py --dsn 'host=... dbname=scratch'   # a scratch database of yours
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg

from neurondb.migrate import migrate
from neurondb.queries import query
from neurondb.tablemaint import TableMaintenance


def timed_hits(conn: psycopg.Connection, rng: np.random.Generator, n: int, rounds: int) -> float:
    """Median milliseconds of the `hits` query over `rounds` executions."""
    samples = []
    for _ in range(rounds):
        params = {"ids": rng.integers(1, n + 1, 10).tolist(), "index": "b", "tenant": None}
        t0 = time.perf_counter()
        conn.execute(query("index", "hits"), params).fetchall()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def plan(conn: psycopg.Connection) -> str:
    rows = conn.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + query("index", "hits"),
                        {"ids": list(range(1, 11)), "index": "b", "tenant": None}).fetchall()
    return "\n    ".join(r[0] for r in rows)


def bench(dsn: str, n: int, rounds: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn)
        conn.execute("ALTER TABLE neurondb.neurondb_vectors SET (autovacuum_enabled = false)")
        conn.execute("SELECT neurondb.create_index('b', 128, 'l2')")
        vectors = np.random.default_rng(1).standard_normal((n, 128)).astype(np.float32)
        with conn.cursor().copy("COPY neurondb.neurondb_vectors (index_name, doc_id, embedding) FROM STDIN") as copy:
            for i, v in enumerate(vectors):
                copy.write_row(("b", f"d{i}", v.tolist()))
        conn.execute("SELECT pg_stat_force_next_flush()")
        rng = np.random.default_rng(2)
        print(f"{n} vectors copied; before ANALYZE:\n    {plan(conn)}")
        before = timed_hits(conn, rng, n, rounds)
        t0 = time.monotonic()
        while not any(r.table == "neurondb.neurondb_vectors"
                      for r in TableMaintenance(logging.getLogger("bench")).run(conn, beat=lambda: None)):
            if time.monotonic() - t0 > 30:
                raise SystemExit("no ANALYZE of neurondb_vectors within 30 s (pg_stat not updated?)")
            time.sleep(0.5)
        print(f"after ANALYZE:\n    {plan(conn)}")
        after = timed_hits(conn, rng, n, rounds)
        print(f"hits query, median of {rounds}: before ANALYZE {before:.3f} ms, after {after:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a scratch database (the neurondb schema is installed there)")
    parser.add_argument("--vectors", type=int, default=29_000)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    if args.dsn:
        bench(args.dsn, args.vectors, args.rounds)
        return
    from neurondb.paths import DataDir
    from neurondb.pgserver import EmbeddedPostgres

    root = Path(tempfile.mkdtemp(prefix="neurondb-bench-analyze-", dir="/tmp"))
    try:
        datadir = DataDir(root)
        datadir.init()
        server = EmbeddedPostgres(datadir)
        server.init()
        try:
            bench(server.start(), args.vectors, args.rounds)
        finally:
            server.stop("fast")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
