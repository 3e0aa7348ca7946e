#!/usr/bin/env python3
"""Issue 2's figures: cold `neurondb init` (new data directory: initdb, start, schema) and warm start of
the embedded PostgreSQL (`neurondb db start` after `neurondb db stop`), as an operator runs them: the
real CLI in a subprocess, so interpreter start-up and imports are included. Medians of `--runs`.

    .venv/bin/python scripts/bench_init.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from benchlib import Scratch


def timed(scratch: Scratch, *args: str) -> float:
    """Seconds for `neurondb ARGS -D DIR`, interpreter start-up included: what an operator waits."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "neurondb", *scratch.command(*args)], check=True,
                   capture_output=True, timeout=300, env=scratch.env)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cold, warm, stop = [], [], []
    for _ in range(args.runs):
        scratch = Scratch("neurondb-init-", owner="scripts/bench_init.py")   # a new, empty data directory
        try:
            cold.append(timed(scratch, "init"))
            stop.append(timed(scratch, "db", "stop"))
            warm.append(timed(scratch, "db", "start"))
        finally:
            scratch.cleanup(keep=False)
    result = {name: {"median_s": round(statistics.median(v), 3), "min_s": round(min(v), 3), "n": len(v)}
              for name, v in (("cold_init", cold), ("warm_start", warm), ("stop", stop))}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, r in result.items():
            print(f"{name:11} median {r['median_s']:.3f} s   min {r['min_s']:.3f} s   (n={r['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
