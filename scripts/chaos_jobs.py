"""Job types of `scripts/chaos.py`, loaded by the real queue workers through
`neurondb.neuranq_job_modules = 'chaos_jobs'` (the script puts this directory on the service's PYTHONPATH).

- `chaos.record`: an outside side effect, not transactional, so that re-runs after crashes can be counted:
  it appends `S <job> <pid>` to the payload's `file` when it starts and `E <job> <pid>` when its work
  (`ms` milliseconds of sleep) is done. Appends of one short line with O_APPEND are atomic and survive a
  SIGKILL of the writer, so the file is the truth about what ran, whatever the job table says.
- `chaos.arecord`: the same as an async handler, run by the queue worker's async lane, many at once: the
  queue phase mixes both, so the kills land on blocking and concurrent jobs alike.
- `chaos.suicide`: SIGKILLs its own worker on every run (after an `S` line): a job that can never finish
  must end in the dead letters after its retries, not loop forever.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from neurondb.jobs import JobContext, job_type, require


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@job_type("chaos.record")
def record(ctx: JobContext, payload: dict) -> dict:
    """`S` line, `ms` of work, `E` line: the E lines count executions, the S lines started runs."""
    path = require(payload, "file", str)
    _append(path, f"S {ctx.job_id} {os.getpid()}\n")
    time.sleep(require(payload, "ms", float, default=0.0) / 1000.0)
    _append(path, f"E {ctx.job_id} {os.getpid()}\n")
    return {"ok": True}


@job_type("chaos.arecord")
async def arecord(ctx: JobContext, payload: dict) -> dict:
    """chaos.record, awaiting its work instead of blocking."""
    path = require(payload, "file", str)
    _append(path, f"S {ctx.job_id} {os.getpid()}\n")
    await asyncio.sleep(require(payload, "ms", float, default=0.0) / 1000.0)
    _append(path, f"E {ctx.job_id} {os.getpid()}\n")
    return {"ok": True}


@job_type("chaos.suicide")
def suicide(ctx: JobContext, payload: dict) -> dict:
    """Kill the worker running it, every time."""
    _append(require(payload, "file", str), f"S {ctx.job_id} {os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)
    return {}
