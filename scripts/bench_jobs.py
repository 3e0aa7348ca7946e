"""The no-op job of `scripts/bench_queue.py`, for both systems it compares.

- neurondb: the job type `bench.noop`, loaded by the real queue worker through
  `neurondb.neuranq_job_modules = 'bench_jobs'` (the benchmark puts this directory on the service's
  PYTHONPATH). A handler that does nothing, so the figures are the queue's own cost: claim, bookkeeping,
  completion.
- PGQueuer: `python scripts/bench_jobs.py pgq-worker --dsn DSN --batch N`, one PGQueuer worker process
  (a `QueueManager` over the psycopg async driver, as `pgq run` would start it) with a no-op entrypoint
  `bench_noop`. It connects and registers first, prints `ready`, and only starts dequeueing when it reads
  a line on stdin: the benchmark starts the clock at that line, so neither system's process start-up or
  imports are timed, only its reaction to "work is there" and the work itself. SIGTERM stops it cleanly.

A separate process for PGQueuer (rather than a task inside the benchmark) because neurondb's queue
workers are separate processes too: neither system shares a core or a GIL with the measuring loop.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from neurondb.jobs import JobContext, job_type

PGQ_ENTRYPOINT = "bench_noop"


@job_type("bench.noop")
def noop(ctx: JobContext, payload: dict) -> dict:
    """Does nothing: the benchmark measures the queue, not a handler."""
    return {}


async def pgq_worker(dsn: str, batch: int) -> None:
    """One PGQueuer worker: ready -> wait for `go` on stdin -> dequeue with `batch` until SIGTERM.

    The QueueManager alone, not `PgQueuer` (which also runs the cron scheduler on the same connection):
    the benchmark compares queues, and leaving the scheduler out can only make PGQueuer faster."""
    import psycopg
    from pgqueuer import PsycopgDriver, Queries, QueueManager
    from pgqueuer.models import Job

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, application_name="bench pgqueuer worker")
    qm = QueueManager(Queries(PsycopgDriver(conn)))

    @qm.entrypoint(PGQ_ENTRYPOINT)
    async def bench_noop(job: Job) -> None:
        """Does nothing, like neurondb's `bench.noop`."""

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, qm.shutdown.set)
    print("ready", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() == "go" and not qm.shutdown.is_set():
        await qm.run(batch_size=batch)
    await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="PGQueuer worker for scripts/bench_queue.py")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("pgq-worker", help="one PGQueuer worker process with a no-op entrypoint")
    worker.add_argument("--dsn", required=True)
    worker.add_argument("--batch", type=int, required=True)
    args = parser.parse_args(argv)
    runner: Any = asyncio.run
    try:
        import uvloop  # what `pgq run` uses when it is installed (a PGQueuer dependency)

        runner = uvloop.run
    except ImportError:
        pass
    runner(pgq_worker(args.dsn, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
