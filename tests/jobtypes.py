"""Job types for the queue tests, loaded by the real queue worker through neurondb.neuranq_job_modules."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from neurondb.jobs import JobContext, JobError, job_type, require


@job_type("test.noop")
def noop(ctx: JobContext, payload: dict) -> dict:
    return {"ok": True}


@job_type("test.record")
def record(ctx: JobContext, payload: dict) -> dict:
    """An outside side effect (not transactional): one line per run, to count re-runs after crashes;
    `seconds` of work first, so a test can make a backlog last."""
    time.sleep(require(payload, "seconds", float, default=0.0))
    fd = os.open(require(payload, "file", str), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{ctx.job_id}\n".encode())
    finally:
        os.close(fd)
    return {"ok": True}


@job_type("test.fail")
def fail(ctx: JobContext, payload: dict) -> dict:
    """Fails its first `fail_times` attempts (all of them by default), then succeeds."""
    if ctx.attempt <= require(payload, "fail_times", int, default=10**9):
        raise JobError(f"planned failure {ctx.attempt}")
    return {"attempt": ctx.attempt}


@job_type("test.sleep")
def sleep(ctx: JobContext, payload: dict) -> dict:
    """Sleeps `seconds` in its first `attempts` attempts (all by default)."""
    if ctx.attempt <= require(payload, "attempts", int, default=10**9):
        time.sleep(require(payload, "seconds", float))
    return {"slept": True}


@job_type("test.effect")
def effect(ctx: JobContext, payload: dict) -> dict:
    """A transactional effect: committed with the completion, or not at all."""
    ctx.defer("INSERT INTO public.test_effects (job_id) VALUES (%s)", (ctx.job_id,))
    return {"ok": True}


@job_type("test.crash")
def crash(ctx: JobContext, payload: dict) -> dict:
    """A poison job: SIGKILLs its own worker in its first `attempts` attempts (all by default), like a
    segfault or the OOM killer would."""
    if ctx.attempt <= require(payload, "attempts", int, default=10**9):
        os.kill(os.getpid(), signal.SIGKILL)
    return {"survived": True}


_IN_FLIGHT: dict[str, int] = {}


async def _sleep_and_log(ctx: JobContext, payload: dict) -> dict:
    """Awaits `seconds` in its first `attempts` attempts (all by default). With `file`, appends a line
    "job_id in_flight" as it starts, in_flight being the jobs of its type running in this process then
    (itself included): what the per-type cap and the SIGKILL test measure."""
    running = _IN_FLIGHT[ctx.job_type] = _IN_FLIGHT.get(ctx.job_type, 0) + 1
    try:
        if "file" in payload:
            fd = os.open(require(payload, "file", str), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, f"{ctx.job_id} {running}\n".encode())
            finally:
                os.close(fd)
        if ctx.attempt <= require(payload, "attempts", int, default=10**9):
            await asyncio.sleep(require(payload, "seconds", float))
        return {"attempt": ctx.attempt}
    finally:
        _IN_FLIGHT[ctx.job_type] -= 1


@job_type("test.async_sleep")
async def async_sleep(ctx: JobContext, payload: dict) -> dict:
    return await _sleep_and_log(ctx, payload)


@job_type("test.async_capped", concurrency=3)
async def async_capped(ctx: JobContext, payload: dict) -> dict:
    return await _sleep_and_log(ctx, payload)
