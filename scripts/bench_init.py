#!/usr/bin/env python3
"""Issue 2's figures: cold `neurondb init` (new data directory: initdb, start, schema) and warm start of
the embedded PostgreSQL (`neurondb db start` after `neurondb db stop`), as an operator runs them: the
real CLI in a subprocess, so interpreter start-up and imports are included. Medians of `--runs`.

    .venv/bin/python scripts/bench_init.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(*args: str, data_dir: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "neurondb", *args, "-D", str(data_dir)], check=True,
                   capture_output=True, timeout=300)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cold, warm, stop = [], [], []
    for _ in range(args.runs):
        root = Path(tempfile.mkdtemp(prefix="neurondb-init-", dir="/tmp"))   # /tmp: the server user traverses it
        try:
            cold.append(timed("init", data_dir=root))
            stop.append(timed("db", "stop", data_dir=root))
            warm.append(timed("db", "start", data_dir=root))
        finally:
            subprocess.run([sys.executable, "-m", "neurondb", "db", "stop", "-D", str(root)], capture_output=True)
            shutil.rmtree(root, ignore_errors=True)
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
