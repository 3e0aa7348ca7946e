"""neuranq's async lane: an event loop in a thread of the queue worker, running the jobs whose handlers are
`async def`, many at once.

Why a thread: blocking handlers keep running in the worker's main thread exactly as before (one at a time,
stopped at their timeout by SIGALRM, which only the main thread receives), while this loop waits on the
network for up to `neuranq_concurrency` async jobs beside them. The main thread stays the only one that
claims, records outcomes and counts metrics; the lane only runs handlers and hands back their Outcomes.

Scheduling: jobs wait in claim order (the claim is fair across tenants and spends their rate-limit tokens
before any job starts). The first waiting job whose type is under its cap starts whenever fewer than
`limit` jobs run, so one slow type cannot take every slot while others wait. Each job runs under
asyncio.wait_for(neuranq_timeout): past it the handler is cancelled and the attempt fails with JobTimeout.
While its handler runs, a job is listed in the worker's RunningJobs (under a lock shared with the main
thread, which lists its blocking job there too), so a SIGKILL charges an attempt to exactly the jobs that
were running. Handlers share one async connection (autocommit, for reads) and one pooled HTTP client
(the LLM worker's keep-alive transport, providers/transport.py) for provider calls.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg

from neurondb.jobs import Handler, JobContext, JobTimeout, close_loop_local
from neurondb.providers.transport import make_client
from neurondb.shm.control import RunningJobs

STOP_TIMEOUT = 10.0    # seconds to wait for the loop to cancel its jobs and close


@dataclass
class ReadyJob:
    """A claimed job the main thread has checked: everything its attempt needs (blocking jobs use it too)."""

    job_id: int
    job_type: str
    tenant: str
    handler: Handler
    ctx: JobContext
    payload: dict
    attempt: int
    limit: int           # retries allowed
    cap: int             # jobs of its type in flight at most
    timeout_s: float


Finish = Callable[[ReadyJob, Any, BaseException | None, float], Any]
"""(job, value, error, started perf_counter) -> the job's Outcome; runs in the lane's thread."""


class AsyncLane:
    def __init__(self, dsn: str, name: str, running: RunningJobs, running_lock: threading.Lock,
                 finish: Finish, limit: int) -> None:
        self.dsn, self.name = dsn, name
        self.limit = limit                    # set again by the worker at each reload
        self._running, self._running_lock = running, running_lock
        self._finish = finish
        self._waiting: deque[ReadyJob] = deque()
        self._tasks: dict[int, asyncio.Task] = {}
        self._by_type: Counter[str] = Counter()
        self._conn: psycopg.AsyncConnection | None = None
        self._http: httpx.AsyncClient | None = None     # pooled, for provider calls (embed)
        # Shared with the main thread, under _lock: the jobs handed over and not finished, and the outcomes
        # finished and not taken yet.
        self._lock = threading.Lock()
        self._held: set[int] = set()
        self._done: list[Any] = []
        self._finished = threading.Event()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="async-jobs", daemon=True)
        self._thread.start()

    # -- the main thread's side ------------------------------------------------------------------------

    def submit(self, jobs: list[ReadyJob]) -> None:
        with self._lock:
            self._held.update(j.job_id for j in jobs)
        self.loop.call_soon_threadsafe(self._enqueue, jobs)

    def held(self) -> list[int]:
        """Jobs handed over whose outcome is not finished yet (waiting or running): still leased to us."""
        with self._lock:
            return list(self._held)

    @property
    def load(self) -> int:
        return len(self._held)

    def in_flight(self) -> dict[str, int]:
        """Jobs running now, per type."""
        return {t: n for t, n in list(self._by_type.items()) if n}

    def take(self) -> list[Any]:
        """The outcomes finished since the last call."""
        with self._lock:
            done, self._done = self._done, []
            self._finished.clear()
        return done

    def wait(self, timeout: float, at_least: int = 1, linger: float = 0.0) -> None:
        """Until `at_least` outcomes are ready (or nothing is held), at most `timeout` seconds; after the first
        one, at most `linger` more, so that outcomes are recorded in batches rather than one by one."""
        deadline = time.monotonic() + timeout
        if not self._finished.wait(timeout):
            return
        first = time.monotonic()
        while len(self._done) < at_least and self._held:
            left = min(deadline, first + linger) - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.001))

    def stop_waiting(self) -> list[int]:
        """Drop the jobs not started yet (a shutdown hands them back); the running ones go on."""
        return self._call(self._drop_waiting())

    def abandon(self) -> list[int]:
        """Cancel every job, waiting or running (a fast shutdown): the ids to hand back, no outcome for them."""
        return self._call(self._cancel_all())

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self._cancel_all())
            self._call(self._close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(STOP_TIMEOUT)
        if not self._thread.is_alive():
            self.loop.close()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(STOP_TIMEOUT)

    # -- the loop's side -------------------------------------------------------------------------------

    def _enqueue(self, jobs: list[ReadyJob]) -> None:
        self._waiting.extend(jobs)
        self._pump()

    def _pump(self) -> None:
        """Start waiting jobs, in order, while slots are free; a job whose type is at its cap lets later
        jobs of other types go first."""
        if len(self._tasks) >= self.limit or not self._waiting:
            return
        kept: deque[ReadyJob] = deque()
        while self._waiting and len(self._tasks) < self.limit:
            job = self._waiting.popleft()
            if self._by_type[job.job_type] >= job.cap:
                kept.append(job)
                continue
            self._by_type[job.job_type] += 1
            self._tasks[job.job_id] = self.loop.create_task(self._run(job))
        kept.extend(self._waiting)
        self._waiting = kept

    async def _run(self, job: ReadyJob) -> None:
        started = time.perf_counter()
        value: Any = None
        error: BaseException | None = None
        with self._running_lock:
            self._running.add(job.job_id)
        try:
            job.ctx.conn = await self._connection()
            if self._http is None:
                self._http = make_client(self.limit)
            job.ctx.http = self._http
            try:
                value = await asyncio.wait_for(job.handler(job.ctx, job.payload), job.timeout_s)
            except asyncio.TimeoutError:
                if time.perf_counter() - started < job.timeout_s:
                    raise                    # the handler's own timeout, not ours
                raise JobTimeout(f"job exceeded neurondb.neuranq_timeout ({job.timeout_s * 1000:.0f} ms)") from None
        except asyncio.CancelledError:
            self._forget(job)
            raise
        except Exception as exc:
            error = exc
            if isinstance(exc, psycopg.OperationalError):
                await self._close_connection()      # reopened for the next job
        finally:
            with self._running_lock:
                self._running.discard(job.job_id)
        try:
            outcome = self._finish(job, value, error, started)
        except Exception as exc:     # a result that cannot be recorded fails this attempt, never the lane
            outcome = self._finish(job, None, exc, started)
        with self._lock:
            self._held.discard(job.job_id)
            self._done.append(outcome)
            self._finished.set()
        self._forget(job)
        self._pump()

    def _forget(self, job: ReadyJob) -> None:
        if self._tasks.pop(job.job_id, None) is not None:
            self._by_type[job.job_type] -= 1

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=10, application_name=f"neurondb {self.name} async jobs")
        return self._conn

    async def _close(self) -> None:
        await close_loop_local()
        await self._close_connection()
        if self._http is not None:
            client, self._http = self._http, None
            await client.aclose()

    async def _close_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close()
            except psycopg.Error:
                pass

    async def _drop_waiting(self) -> list[int]:
        ids = [j.job_id for j in self._waiting]
        self._waiting.clear()
        with self._lock:
            self._held.difference_update(ids)
        return ids

    async def _cancel_all(self) -> list[int]:
        ids = await self._drop_waiting()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with self._lock:
            ids += list(self._held)       # cancelled: they ran, but we stopped them, so no outcome
            self._held.clear()
        return ids
