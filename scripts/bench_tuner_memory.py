#!/usr/bin/env python3
"""neuranmon's memory under a steady search load (issue 9, defect 11: "grows about 1 MB/min").

Starts a service on a temporary data directory (embedded PostgreSQL, or `--dsn`), loads `--vectors` random
vectors, then searches at `--rate` per second for `--seconds`, printing neuranmon's resident memory split
the way /proc/PID/status does: RssAnon (its private heap: what a leak would grow) and RssShmem (pages of
the shared query ring and graphs it has touched: bounded by their fixed sizes). A leak shows as RssAnon
growing between the second half's first and last reading; the ring filling up shows as RssShmem levelling
off once the ring has wrapped (8,192 samples).

    .venv/bin/python scripts/bench_tuner_memory.py [--rate 90] [--seconds 240] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from benchlib import Scratch, guarded, install_sigterm_handler, log

import neurondb

FIELDS = ("VmRSS", "RssAnon", "RssShmem")


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in FIELDS:
                out[name] = int(value.split()[0])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=90.0, help="searches per second")
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--vectors", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dsn")
    args = ap.parse_args()
    install_sigterm_handler()
    scratch = Scratch("neurondb-monmem-", args.dsn, owner="scripts/bench_tuner_memory.py")
    readings: list[tuple[float, dict[str, int]]] = []

    def body() -> None:
        scratch.cli("init", timeout=300)
        scratch.cli("start", timeout=300)
        rng = np.random.default_rng(0)
        with neurondb.connect(str(scratch.root), args.dsn) as client:
            with client.instance.connect("bench") as conn:
                conn.execute("SELECT neurondb.create_index('mem', %s)", (args.dim,))
                with conn.cursor().copy("COPY neurondb.neurondb_vectors (index_name, doc_id, embedding) "
                                        "FROM STDIN") as copy:
                    for i in range(args.vectors):
                        copy.write_row(("mem", str(i), rng.standard_normal(args.dim).astype(np.float32).tolist()))
            query = rng.standard_normal(args.dim).astype(np.float32)
            while True:
                try:
                    client.search("mem", query, k=10)
                    break
                except neurondb.client.SearchError:
                    time.sleep(0.2)
            pid = next(w.pid for w in scratch.status().workers if w.name == "neuranmon")
            log(f"searching at {args.rate:.0f}/s for {args.seconds:.0f} s; neuranmon is pid {pid}")
            start = next_reading = time.monotonic()
            searches = 0
            while (now := time.monotonic()) - start < args.seconds:
                client.search("mem", rng.standard_normal(args.dim).astype(np.float32), k=10)
                searches += 1
                if now >= next_reading:
                    next_reading += args.seconds / 12
                    readings.append((now - start, memory_kib(pid)))
                    log(f"{now - start:5.0f} s, {searches} searches: {readings[-1][1]}")
                time.sleep(max(0.0, start + searches / args.rate - time.monotonic()))
            readings.append((time.monotonic() - start, memory_kib(pid)))

    code = guarded(body, lambda: scratch.cleanup(keep=False))
    if len(readings) >= 4:
        half = readings[len(readings) // 2:]
        minutes = (half[-1][0] - half[0][0]) / 60
        print(f"{'seconds':>8} " + " ".join(f"{f + ' KiB':>14}" for f in FIELDS))
        for t, m in readings:
            print(f"{t:8.0f} " + " ".join(f"{m[f]:14,}" for f in FIELDS))
        for f in FIELDS:
            growth = (half[-1][1][f] - half[0][1][f]) / max(minutes, 1e-9)
            print(f"{f} growth over the second half: {growth:+.0f} KiB/min")
    return code


if __name__ == "__main__":
    sys.exit(main())
