#!/usr/bin/env python3
"""Benchmark neuranq's async lane: `http_call` jobs against a server answering after 50 ms (issue 17).

Prints, per round (`--rounds`, default 3), and their medians:

- queue: `--jobs` (default 2,000) `http_call` jobs inserted by one plain SQL INSERT with the queue worker
  off, then one queue process (`neurondb.neuranq_workers = 1`) at `neurondb.neuranq_concurrency`
  `--concurrency` (default 16) turned on (settings file + SIGHUP): jobs/s from "worker on" to "every job
  completed";
- ceiling: a plain `httpx.AsyncClient` (keep-alive, httpx's default pool) in a process of its own, with
  `--concurrency` requests in flight, making `--jobs` GET requests to the same server: requests/s;
- the ratio queue / ceiling (target >= 0.85), per round and of the medians.

The server is tests/fakeprovider.py (HTTP/1.1, one thread per connection), in this process, answering
every request after `--delay-ms` (default 50). The http_call jobs go through everything a job's request
does: the SSRF guard (127.0.0.1 is allowlisted for the run; every request checked, on keep-alive
connections kept per name and checked address), the response size limit, the job's lease, outcome and
result row. Rounds alternate the two measures so that the machine's noise falls on both.

    .venv/bin/python scripts/bench_http_jobs.py [--jobs 2000] [--concurrency 16] [--delay-ms 50] [--rounds 3]
        [--dsn DSN] [--json]

The embedded PostgreSQL (`neurondb init`) and the service on it (`neurondb start`, through tests/service.py)
live in fresh directories under /tmp, removed at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # tests.fakeprovider, tests.service

import benchlib  # noqa: E402

from neurondb import db  # noqa: E402
from neurondb.status import pid_alive  # noqa: E402
from tests.fakeprovider import FakeProvider  # noqa: E402
from tests.service import FAST_SETTINGS, Service  # noqa: E402

TARGET = 0.85
DRAIN_TIMEOUT_S = 600.0
INSERT = ("INSERT INTO neurondb.neurondb_job_queue (job_type, payload) "
          "SELECT 'http_call', jsonb_build_object('url', %s || '/item/' || n) FROM generate_series(1, %s) n")
UNFINISHED = ("SELECT EXISTS (SELECT 1 FROM neurondb.neurondb_job_queue "
              "WHERE status IN ('pending', 'processing'))")


async def _ceiling(url: str, jobs: int, concurrency: int) -> float:
    """Requests/s of a plain httpx.AsyncClient with `concurrency` requests in flight."""
    import httpx

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency,
                                                     max_keepalive_connections=concurrency)) as client:
        todo = iter(range(jobs))

        async def one_lane() -> None:
            for n in todo:
                (await client.get(f"{url}/item/{n}")).raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(one_lane() for _ in range(concurrency)))
        return jobs / (time.perf_counter() - t0)


def ceiling(url: str, jobs: int, concurrency: int) -> float:
    """The ceiling, measured in a process of its own (the server's threads here would share its GIL)."""
    out = subprocess.run([sys.executable, __file__, "ceiling", url, str(jobs), str(concurrency)],
                         capture_output=True, text=True, timeout=600, env=benchlib.clean_env())
    if out.returncode != 0:
        raise benchlib.BenchError(f"ceiling client failed: {out.stderr.strip()[-500:]}")
    return float(out.stdout.strip())


class QueueBench:
    def __init__(self, service: Service, concurrency: int) -> None:
        self.service = service
        self.settings = {**FAST_SETTINGS, "neurondb.neuranq_workers": "1",
                         "neurondb.neuranq_concurrency": str(concurrency), "neurondb.http_allowlist": "127.0.0.1",
                         "neurondb.job_retention": "0"}
        self.conn: psycopg.Connection | None = None

    def start(self) -> None:
        self.switch(False)
        self.service.cli("init")
        self.service.start()
        assert self.service.dsn is not None
        self.conn = psycopg.connect(self.service.dsn, autocommit=True, application_name="bench_http_jobs client")

    def switch(self, on: bool) -> None:
        """The queue worker on or off, by settings file + SIGHUP (what `neurondb reload` does)."""
        self.settings["neurondb.neuranq_enabled"] = "on" if on else "off"
        self.service.write_settings(self.settings)
        if pid_alive(self.service.supervisor_pid):
            os.kill(self.service.supervisor_pid, signal.SIGHUP)

    def drain(self, url: str, jobs: int) -> float:
        conn = self.conn
        assert conn is not None
        self.switch(False)
        time.sleep(0.6)                          # the worker has applied it (its slice is 0.5 s)
        conn.execute("TRUNCATE neurondb.neurondb_job_queue")
        conn.execute(INSERT, (url, jobs))
        conn.execute("ANALYZE neurondb.neurondb_job_queue")
        t0 = time.monotonic()
        self.switch(True)
        while conn.execute(UNFINISHED).fetchone()[0]:
            if time.monotonic() - t0 > DRAIN_TIMEOUT_S:
                raise benchlib.BenchError(f"not drained after {DRAIN_TIMEOUT_S:g} s\n{self.service.log_tail()}")
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        counts = dict(conn.execute("SELECT status, count(*) FROM neurondb.neurondb_job_queue GROUP BY 1").fetchall())
        if counts != {"completed": jobs}:
            errors = conn.execute("SELECT error_message, count(*) FROM neurondb.neurondb_job_queue "
                                  "WHERE status <> 'completed' GROUP BY 1 ORDER BY 2 DESC LIMIT 3").fetchall()
            raise benchlib.BenchError(f"ended with {counts}, errors {errors}\n{self.service.log_tail()}")
        return jobs / elapsed

    def close(self) -> None:
        if self.conn is not None:
            db.close_quietly(self.conn)
        self.service.close()


def report(results: dict[str, Any]) -> str:
    lines = [f"http_call jobs: {results['jobs']} per round, server delay {results['delay_ms']:g} ms, "
             f"concurrency {results['concurrency']}, {results['cpus']} CPUs, "
             f"load {results['load_before']:.1f} -> {results['load_after']:.1f}"]
    for i, r in enumerate(results["rounds"], 1):
        lines.append(f"  round {i}: queue {r['queue']:7.1f} jobs/s   ceiling {r['ceiling']:7.1f} req/s   "
                     f"ratio {r['queue'] / r['ceiling']:.3f}")
    q, c = results["queue_median"], results["ceiling_median"]
    verdict = "PASS" if q / c >= TARGET else "MISS"
    lines.append(f"  median: queue {q:.1f} jobs/s, ceiling {c:.1f} req/s, ratio {q / c:.3f} "
                 f"(target >= {TARGET}) {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ceiling"]:                  # the child process of `ceiling()`
        url, jobs, concurrency = argv[1], int(argv[2]), int(argv[3])
        print(f"{asyncio.run(_ceiling(url, jobs, concurrency)):.3f}")
        return 0
    parser = benchlib.server_bench_parser(__doc__, "neuranq_concurrency")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of queue + ceiling (default 3)")
    args = parser.parse_args(argv)

    benchlib.install_sigterm_handler()
    env = benchlib.clean_env()
    pg_root = benchlib.scratch_dir("neurondb-bench-http-pg-")
    root = benchlib.scratch_dir("neurondb-bench-http-")
    fake = FakeProvider(record=False)
    results: dict[str, Any] = {"jobs": args.jobs, "delay_ms": args.delay_ms, "concurrency": args.concurrency,
                               "cpus": os.cpu_count(), "load_before": os.getloadavg()[0], "rounds": []}
    benches: list[QueueBench] = []

    def run() -> None:
        dsn = benchlib.embedded_dsn(pg_root, env, args.dsn)
        fake.start()
        fake.set_delay(args.delay_ms)
        bench = QueueBench(Service(root / "service", dsn), args.concurrency)
        benches.append(bench)
        bench.start()
        for i in range(args.rounds):
            measures = [("queue", lambda: bench.drain(fake.url, args.jobs)),
                        ("ceiling", lambda: ceiling(fake.url, args.jobs, args.concurrency))]
            row = {}
            for name, measure in measures if i % 2 == 0 else measures[::-1]:
                row[name] = measure()
                benchlib.log(f"round {i + 1}: {name} {row[name]:.1f}/s")
            results["rounds"].append(row)
        results["queue_median"] = statistics.median(r["queue"] for r in results["rounds"])
        results["ceiling_median"] = statistics.median(r["ceiling"] for r in results["rounds"])
        results["ratio"] = results["queue_median"] / results["ceiling_median"]
        results["load_after"] = os.getloadavg()[0]
        print(json.dumps(results, indent=2) if args.json else report(results))

    def cleanup() -> None:
        for bench in benches:
            bench.close()
        fake.stop()
        benchlib.remove_embedded(pg_root, env, root)

    # AssertionError: tests/service.py's harness reports a service that misbehaved that way.
    return benchlib.guarded(run, cleanup, errors=(benchlib.BenchError, AssertionError))


if __name__ == "__main__":
    sys.exit(main())
