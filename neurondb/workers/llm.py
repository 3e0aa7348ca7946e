"""neuranllm: the LLM job worker (the document's section 4): completions, embeddings, rerankings.

Provider calls take tens of milliseconds to minutes and the worker has one process, so it runs them
concurrently: an asyncio loop, one pooled httpx.AsyncClient, at most `neuranllm_concurrency` calls in
flight. The loop is the process's own; `run_batch` runs it for a slice (SESSION_S) at a time so the
base lifecycle (heartbeat, SIGHUP, SIGTERM, supervisor death) keeps its rhythm, and calls in flight just
wait in the loop between slices.

One slice ("session"), repeated until there is nothing to do:
  - claim: up to `neuranllm_batch_size` runnable jobs with SKIP LOCKED in one statement (autocommit:
    the claim commits at once), whenever a call slot is free and no claimed job waits for one; and
    again, while jobs wait in the database, to fill an embedding request up to its input bound;
  - cache: one lookup for the claimed jobs' keys; a hit completes the job without a provider call;
  - dispatch: each completion and reranking is one call; embedding texts of one (model, tenant) are sent
    together, up to `llm_embedding_batch_size` texts and EMBED_MAX_TOKENS estimated tokens per request;
    a call starts only when the provider's rate limits (shared memory, neurondb/shm/buckets.py) allow;
  - record: outcomes are written in batches, all of a flush in one transaction, never while a provider
    call holds anything in the database: no transaction is ever open across a call.
The database work runs on an async connection in the same loop, so answers keep arriving while a claim
or a flush waits for the server.

Retries: a retryable failure (timeout, connection error, 429, 5xx) with retries left makes the job pending
again after min(neuranllm_retry_max_delay, neuranllm_retry_delay * 2^(n-1)) * uniform(0, 1) ("full
jitter": failures that happened together retry spread over the whole window), or after the provider's
Retry-After when that is longer. The worker wakes up for it, not at the next naptime. Other failures
(4xx, context too long, invalid input or parameters) fail the job at once with the provider's message.

Crash safety is the queue's: claimed jobs carry a lease (`host:pid`); the supervisor hands a dead
worker's jobs back at once (the jobs with a call in flight, listed in the worker's shared-memory slot,
count an attempt; the others do not), and an expired lease (machine lost) brings them back too. Outcomes
are recorded only for jobs still leased to us; after a lost connection they are written once it is back,
and jobs leased to us that we never received (a claim whose answer was lost) are handed back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg.types.json import set_json_loads

from neurondb import caches
from neurondb.db import UndecodableJson, decode_json, json_loads
from neurondb.llm import PROVIDER_OPERATIONS as OPERATIONS
from neurondb.llm import cache_key
from neurondb.providers import ProviderError, Route, resolve
from neurondb.providers.base import invalid_input
from neurondb.providers.http import check_params
from neurondb.providers.registry import completer_for, embedder_for, reranker_for
from neurondb.providers.transport import make_client
from neurondb.queries import query
from neurondb.settings import ReloadResult
from neurondb.shm.buckets import Buckets, Claim
from neurondb.shm.control import RunningJobs
from neurondb.workers import leases
from neurondb.workers.base import BatchResult, Worker

TABLE = leases.LLM_TABLE
SESSION_S = 0.5              # longest run of the event loop before the base lifecycle gets control back
POLL_S = 0.02                # while a slot is free, look for new work (NOTIFY via the latch) this often
FLUSH_DELAY_S = 0.02         # outcomes wait at most this long to be written with others
FLUSH_MAX = 128              # ... or until this many are waiting
MAINTENANCE_EVERY = 5.0      # lease-expiry sweep, tenant shares
EMBED_MAX_TOKENS = 50_000    # estimated tokens per embedding request
RPS_BURST_S = 0.1            # a requests/s bucket holds this many seconds of requests
TPM_BURST_S = 10.0           # a tokens/min bucket holds this many seconds of tokens
HAND_BACK_S = 2.0            # a job that must wait longer for its tenant's tokens goes back to the table
MIN_LEASE_MS = 60_000.0
MAX_ERROR = 2000
RERANK_PARAMS = ("top_n",)


def estimate_tokens(text: str) -> int:
    """Tokens of `text` for rate limiting and batching before any tokenizer has seen it: ~4 characters per
    token for English with BPE tokenizers, rounded up; the real count corrects the bucket afterwards."""
    return len(text) // 4 + 1


def json_rows(rows: list[dict[str, Any]]) -> str:
    """A batch of rows as one JSON array for jsonb_to_recordset; numpy vectors as arrays of float32 digits."""
    return orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def backoff_ms(attempt: int, base_ms: float, max_ms: float, retry_after_s: float | None = None) -> float:
    """Full jitter: uniform over [0, min(max, base * 2^(attempt-1))], and never before the provider's
    Retry-After."""
    delay = random.uniform(0.0, min(max_ms, base_ms * 2 ** (attempt - 1)))
    if retry_after_s is not None:
        delay = max(delay, retry_after_s * 1000.0)
    return delay


class InvalidJob(Exception):
    """A job whose inputs can never run (a plain INSERT without a prompt ...): it fails at once."""


def describe(exc: BaseException) -> str:
    """The error_message of a failed attempt: a ProviderError's own text (provider, status, provider's
    message; redacted), anything else with its type. Never includes request headers."""
    text = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, (ProviderError, InvalidJob)):
        text = f"{type(exc).__name__}: {text}"
    return text[:MAX_ERROR]


@dataclass(eq=False)
class Job:
    """A claimed job while this worker holds it."""

    job_id: int
    operation: str
    model: str | None
    provider: str | None          # asked for by the submitter (None: routing decides)
    tenant: str
    input_text: str | None
    system_prompt: str | None
    input_texts: list[str] | None
    documents: list[str] | None
    parameters: dict[str, Any]
    retry_count: int
    limit: int
    route: Route | None = None
    keys: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)      # embedding: the texts, one cache key each
    vectors: list[Any] = field(default_factory=list)
    unsent: int = 0                                      # embedding texts not yet in a request
    prompt_tokens: float | None = 0.0
    completion_tokens: int | None = None
    calls: int = 0
    latency_ms: float = 0.0
    done: bool = False
    solo: bool = False                                   # embed alone (after its batch was refused)


def input_problem(job: Job) -> str | None:
    """What makes the job's inputs unusable (neurondb.llm_check_inputs' messages), or None."""
    if not isinstance(job.parameters, dict):
        return f"LLM job parameters must be a JSON object, got {type(job.parameters).__name__}"
    if job.operation == "completion" and job.input_text is None:
        return "a completion job needs input_text (the prompt)"
    if job.operation == "embedding":
        if (job.input_text is None) == (job.input_texts is None):
            return "an embedding job needs either input_text or input_texts (not both)"
        if job.input_texts is not None and (not job.input_texts or any(t is None for t in job.input_texts)):
            return "input_texts of an embedding job must be a non-empty array without NULLs"
    if job.operation == "reranking" and (job.input_text is None or job.documents is None
                                         or any(d is None for d in job.documents)):
        return "a reranking job needs input_text (the query) and documents (without NULLs)"
    return None


@dataclass
class Outcome:
    job: Job
    status: str                   # "completed", "retry" or "failed"
    at: float                     # time.monotonic() when it was decided
    text: str | None = None
    vector: Any = None            # np.ndarray from a provider, list from the cache
    json: Any = None
    cache_hit: bool = False
    error: str = ""
    delay_ms: float = 0.0


@dataclass(eq=False)
class Call:
    """One provider request: a completion, a reranking, or a batch of embedding texts (job, index)."""

    route: Route
    tenant: str
    jobs: list[Job]
    items: list[tuple[Job, int]] = field(default_factory=list)
    tokens: int = 0               # estimated, taken from the tokens/min bucket


class LLMWorker(Worker):
    kind = "neuranllm"
    listen_channels = ("neurondb_llm_jobs",)

    # -- lifecycle ------------------------------------------------------------------------------------

    def on_start(self) -> None:
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.concurrency = int(self.config.get("neurondb.neuranllm_concurrency"))
        self.loop = asyncio.new_event_loop()
        # One pool for every call: keep-alive connections are reused across jobs (no TCP/TLS handshake
        # per call); as many as calls may be in flight, so no call ever waits for a connection.
        self.client = make_client(self.concurrency)
        self.buckets = Buckets.open(self.ctx.shared)
        # httpx logs every request at INFO: hundreds of lines a second here, and URLs are for our own log.
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self._aconn: psycopg.AsyncConnection | None = None
        self._providers: dict[tuple[str, str | None, str | None], tuple[Route, Any]] = {}
        self._tenant_shares: dict[str, float] = {}
        self._held: dict[int, Job] = {}                   # claimed, outcome not yet written
        self._ready: list[Job] = []                       # claimed, waiting for a call slot (FIFO)
        self._groups: dict[tuple[Route, str, int], deque[tuple[Job, int]]] = {}
        self._outcomes: list[Outcome] = []
        self._cache_puts: dict[str, tuple] = {}
        self._tasks: set[asyncio.Task] = set()
        self._in_flight = 0
        self._in_flight_by: dict[str, int] = {}
        self._exhausted = False          # the last claim came back short: wait for a NOTIFY or a due time
        self._stopping = False           # draining: no new calls
        self._due_at: float | None = None          # earliest known retry or delayed job
        self._blocked_until: float | None = None   # earliest time a rate-limited call may go
        self._hand_back: dict[int, float] = {}     # job_id -> delay_ms (tenant over its share)
        self._throttled: set[str] = set()          # tenants over their share at the last dispatch
        self._waiter: asyncio.Future | None = None
        self._result = BatchResult()
        self._next_maintenance = 0.0
        self._next_lease = 0.0
        self._cache_estimate: int | None = None   # entries, as last counted plus what we added since
        self._unsettled = False           # a batch ended abnormally: see _settle
        self.running = RunningJobs(self.slot)   # jobs with a call in flight, for the supervisor

    def on_reload(self, result: ReloadResult) -> None:
        """Providers hold the endpoint, model, key and timeout they were built with: rebuild them. When the
        worker was just disabled, its loop stops running: calls in flight finish now (each bounded by
        neuranllm_timeout) and claimed jobs that did not start go back to the table."""
        self._providers.clear()
        if not self.enabled and (self._held or self._tasks):
            try:
                self.loop.run_until_complete(self._drain(fast=False))
            except psycopg.Error as exc:
                self.log.warning("could not record the LLM jobs in hand while disabling: %s (their leases "
                                 "bring them back)", exc)

    def on_stop(self) -> None:
        """Smart stop: calls in flight finish (each is bounded by neuranllm_timeout) and are recorded.
        Fast stop: they are abandoned. Either way jobs not started go back to pending, no attempt counted."""
        try:
            self.loop.run_until_complete(self._drain(fast=self.shutdown == "fast"))
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.client.aclose())
            if self._aconn is not None:
                with contextlib.suppress(Exception):
                    self.loop.run_until_complete(self._aconn.close())
            self.loop.close()
            self.buckets.close()

    async def _drain(self, fast: bool) -> None:
        """Leave no job in hand: finish (or, fast, abandon) calls in flight, hand back what did not start."""
        self._exhausted = True
        self._stopping = True
        try:
            await self._drain_now(fast)
        finally:
            self._stopping = False    # a reload that disabled the worker may enable it again

    async def _drain_now(self, fast: bool) -> None:
        for job in self._ready:
            if not job.done and job.calls == 0:
                self._hand_back[job.job_id] = 0.0
                job.done = True
        self._ready.clear()
        if fast:
            for task in list(self._tasks):
                task.cancel()
            for job in self._held.values():
                if not job.done:
                    self._hand_back[job.job_id] = 0.0
                    job.done = True
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in self._held.values():    # embedding jobs with texts left unsent when the rest stopped
            if not job.done:
                self._hand_back[job.job_id] = 0.0
                job.done = True
        await self._flush()

    # -- settings -------------------------------------------------------------------------------------

    def _setting(self, name: str) -> Any:
        return self.config.get(f"neurondb.{name}")

    @property
    def timeout_s(self) -> float:
        return float(self._setting("neuranllm_timeout")) / 1000.0

    @property
    def lease_ms(self) -> float:
        """A lease must outlast a call and its wait for a slot; it is renewed every third of it while held."""
        return max(MIN_LEASE_MS, 4 * float(self._setting("neuranllm_timeout")))

    @property
    def cache_on(self) -> bool:
        return int(self._setting("llm_cache_max_entries")) > 0

    # -- the batch ------------------------------------------------------------------------------------

    def run_batch(self) -> BatchResult:
        try:
            if self._unsettled:
                self._settle()
            self._maintenance()
            result = self.loop.run_until_complete(self._session())
        except BaseException as exc:
            # Outcomes not written stay in self._outcomes (see _flush); a claim whose answer was lost left
            # jobs leased to us that we do not know: the next batch settles them.
            self._unsettled = True
            if isinstance(exc, psycopg.OperationalError):
                self._drop_async_connection()
            raise
        if not result.more:
            self._plan_wakeup()
        return result

    def _settle(self) -> None:
        """After a batch that did not end normally (a lost connection): jobs leased to us that we do not
        hold, claimed by a claim whose answer never came, go back to pending at once, no attempt counted,
        instead of waiting for their lease. The jobs we hold stay ours: their outcomes are written as usual."""
        n = leases.hand_back_unheld(self.conn, TABLE, self.owner, list(self._held))
        self._unsettled = False
        if n:
            self.log.warning("handed back %d LLM jobs claimed when the connection was lost", n)

    def idle_nap(self) -> float:
        nap = self.naptime
        if self._due_at is not None:
            nap = min(nap, max(self._due_at - time.monotonic(), 0.001))
        return nap

    async def _session(self) -> BatchResult:
        """Claim, dispatch and record until idle or for SESSION_S; see the module docstring."""
        result = self._result = BatchResult()
        end = time.monotonic() + SESSION_S
        self._exhausted = False     # every slice looks at the table at least once (the naptime's poll)
        while True:
            now = time.monotonic()
            if self.ctx.latch.wait(0):
                self._exhausted = False
            if self._due_at is not None and now >= self._due_at:
                self._due_at = None
                self._exhausted = False
            self._dispatch()           # slots freed since the last round are served from claimed jobs at once
            await self._database_round()
            self._dispatch()
            self._publish_gauges()
            if not self._tasks and not self._ready and self._exhausted and not self._pending_writes():
                return result
            if self.shutdown or self.reload_requested or time.monotonic() >= end:
                await self._flush()
                result.more = True
                return result
            await self._sleep(self._next_wake(end) - time.monotonic())

    def _next_wake(self, end: float) -> float:
        wake = end
        if self._outcomes or self._hand_back:
            wake = min(wake, self._outcomes[0].at + FLUSH_DELAY_S if self._outcomes else time.monotonic())
        if self._in_flight < self.concurrency:
            wake = min(wake, time.monotonic() + POLL_S)
        for t in (self._due_at, self._blocked_until):
            if t is not None:
                wake = min(wake, t)
        return wake

    async def _sleep(self, seconds: float) -> None:
        """Sleep until `seconds` pass or a call finishes (`_wake`)."""
        if seconds <= 0:
            return
        waiter = self._waiter = self.loop.create_future()
        handle = self.loop.call_later(seconds, _resolve, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)

    def _pending_writes(self) -> bool:
        return bool(self._outcomes or self._hand_back or self._cache_puts)

    def _publish_gauges(self) -> None:
        """For `neurondb status` readers of the slot: calls in flight, jobs waiting for a slot."""
        gauges = self.slot["gauges"]
        gauges[0] = self._in_flight
        gauges[1] = len(self._ready)

    # -- database rounds ------------------------------------------------------------------------------

    async def _db(self) -> psycopg.AsyncConnection:
        if self._aconn is None or self._aconn.closed:
            self._aconn = await psycopg.AsyncConnection.connect(
                self.ctx.dsn, autocommit=True, application_name=f"neurondb {self.ctx.name} async"[:63])
            # No server-side prepared statements: psycopg prepares a query after 5 runs, and PostgreSQL's
            # generic plan for the batch updates (a join with unnest() of any length) was a nested loop
            # that took 7 s for 2,000 outcomes where the custom plan takes 0.5 s.
            self._aconn.prepare_threshold = None
            set_json_loads(json_loads, self._aconn)    # cached vectors come back as JSON
        return self._aconn

    def _drop_async_connection(self) -> None:
        if self._aconn is not None:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self._aconn.close())
            self._aconn = None

    async def _database_round(self) -> None:
        """Write what is due, then claim while there is room; new claims go through the cache first."""
        now = time.monotonic()
        if (self._outcomes and (len(self._outcomes) >= FLUSH_MAX or now - self._outcomes[0].at >= FLUSH_DELAY_S
                                or not self._tasks)) or self._hand_back:
            await self._flush()
        if self._held and now >= self._next_lease:
            await self._extend_leases()
        while self._want_claim():
            if len(self._outcomes) >= FLUSH_MAX:      # cache hits pile up while claims go on
                await self._flush()
            if not await self._claim():
                break

    def _want_claim(self) -> bool:
        if self._exhausted or self.shutdown or not self.enabled:
            return False
        free = self.concurrency - self._in_flight
        if free <= 0:
            return False
        # Jobs of a tenant over its share cannot use a free slot: they do not count, or a throttled tenant's
        # backlog would stop the claims that bring everyone else's jobs.
        waiting = sum(1 for j in self._ready if not j.done and j.tenant not in self._throttled)
        # Half a batch ahead of the free slots: a call that ends finds its successor already claimed and
        # starts it at once (see _run_call), instead of idling for a claim's round trip.
        if waiting < free + int(self._setting("neuranllm_batch_size")) // 2:
            return True
        if waiting >= 2 * max(self.concurrency, int(self._setting("llm_embedding_batch_size"))):
            return False
        # Fill embedding requests before sending them: texts of a group below the bound wait for more
        # while the table still has jobs (the last claim was full).
        limit = int(self._setting("llm_embedding_batch_size"))
        return any(0 < len(g) < limit for k, g in self._groups.items() if not k[2])

    async def _claim(self) -> bool:
        """One claim; False when it came back short (the table has no more runnable jobs for now)."""
        batch = int(self._setting("neuranllm_batch_size"))
        conn = await self._db()
        cur = await conn.execute(query("llm", "claim"), {"batch": batch, "owner": self.owner,
                                                         "lease_ms": self.lease_ms,
                                                         "throttled": sorted(self._throttled)})
        rows = await cur.fetchall()
        if len(rows) < batch:
            self._exhausted = True
        if not rows:
            return False
        if not self._held:
            self._next_lease = time.monotonic() + self.lease_ms / 3000.0
        default_limit = int(self._setting("neuranllm_max_retries"))
        jobs = []
        for (job_id, operation, model, provider, tenant, input_text, system_prompt, input_texts, documents,
             parameters_text, retry_count, max_retries, last_error) in rows:
            try:   # per row: one value the decoder refuses fails its own job, not the claim
                parameters, undecodable = decode_json(parameters_text, "parameters"), None
            except UndecodableJson as exc:
                parameters, undecodable = {}, str(exc)
            job = Job(job_id, operation, model, provider, tenant, input_text, system_prompt, input_texts,
                      documents, parameters, retry_count,
                      default_limit if max_retries is None else max_retries)
            self._held[job_id] = job
            if undecodable:
                self._fail(job, undecodable)
                continue
            if retry_count > job.limit:
                self._fail(job, f"gave up after {retry_count} attempts (neurondb.neuranllm_max_retries "
                                f"{job.limit}); the last one: {last_error or 'interrupted'}")
                continue
            try:
                self._prepare(job)
            except (ProviderError, InvalidJob) as exc:
                self._fail(job, describe(exc))
                continue
            jobs.append(job)
        if self.cache_on and jobs:
            await self._cache_lookup(jobs)
        for job in jobs:
            if not job.done:
                self._enqueue(job)
        return not self._exhausted

    def _prepare(self, job: Job) -> None:
        """Check the job's inputs, route it, compute its cache keys. Inputs are checked here too because a
        plain INSERT skips neurondb.llm_check_inputs; the messages are the same."""
        problem = input_problem(job)
        if problem:
            raise InvalidJob(problem)
        route, _ = self._provider(job.operation, job.model, job.provider)
        job.route = route
        params = job.parameters
        if job.operation == "completion":
            check_params(route.provider, params)      # a bad parameter fails now, before any request
            job.keys = [cache_key("completion", route.provider, route.model, [job.system_prompt or "", job.input_text],
                                  params)]
        elif job.operation == "embedding":
            if params:
                raise invalid_input(route.provider, f"embedding jobs take no parameters, got {sorted(params)}")
            job.texts = list(job.input_texts) if job.input_texts is not None else [job.input_text or ""]
            job.keys = [cache_key("embedding", route.provider, route.model, t) for t in job.texts]
            job.vectors = [None] * len(job.texts)
            job.unsent = len(job.texts)
        else:
            unknown = sorted(set(params) - set(RERANK_PARAMS))
            if unknown:
                raise invalid_input(route.provider, f"unknown reranking parameters {unknown}; allowed: top_n")
            job.keys = [cache_key("reranking", route.provider, route.model, [job.input_text, job.documents or []],
                                  params)]

    def _provider(self, operation: str, model: str | None, provider: str | None) -> tuple[Route, Any]:
        """(route, provider object) for a job, built once per distinct request and kept until a reload."""
        key = (operation, model, provider)
        found = self._providers.get(key)
        if found is None:
            op = OPERATIONS[operation]
            route = resolve(self.config, op, model, provider)
            build: Callable[..., Any] = {"embed": embedder_for, "complete": completer_for,
                                         "rerank": reranker_for}[op]
            found = self._providers[key] = (route, build(self.config, route.model, route.provider,
                                                         timeout=self.timeout_s))
        return found

    async def _cache_lookup(self, jobs: list[Job]) -> None:
        """Complete the jobs whose results are cached (every text, for an embedding) without a call."""
        keys = list({k for j in jobs for k in j.keys})
        conn = await self._db()
        started = time.monotonic()
        cur = await conn.execute(query("llm", "cache_get"), {"keys": keys})
        found = {r[0]: r for r in await cur.fetchall()}
        if not found:
            return
        ms = (time.monotonic() - started) * 1000
        now = time.monotonic()
        for job in jobs:
            hits = [found.get(k) for k in job.keys]
            if job.operation == "embedding":
                for i, hit in enumerate(hits):
                    if hit is not None and hit[4] is not None:
                        job.vectors[i] = hit[4]
                        job.unsent -= 1
                        job.prompt_tokens = _add(job.prompt_tokens, hit[6])
                if job.unsent == 0:
                    job.latency_ms = ms
                    self._complete_embedding(job, now, cache_hit=True)
                continue
            hit = hits[0]
            if hit is None:
                continue
            job.prompt_tokens, job.completion_tokens, job.latency_ms = hit[6], hit[7], ms
            self._finish(Outcome(job, "completed", now, text=hit[3], json=hit[5], cache_hit=True))

    def _enqueue(self, job: Job) -> None:
        if job not in self._ready:
            self._ready.append(job)
        if job.operation == "embedding":
            group = self._groups.setdefault(self._group_key(job), deque())
            group.extend((job, i) for i, v in enumerate(job.vectors) if v is None)
            job.unsent = sum(1 for v in job.vectors if v is None)

    @staticmethod
    def _group_key(job: Job) -> tuple[Route, str, int]:
        """Embedding texts travel together when they share a model (route) and a tenant (whose share of
        the rate limits the request is charged to); an isolated job's texts only with each other."""
        return (job.route, job.tenant, job.job_id if job.solo else 0)

    async def _extend_leases(self) -> None:
        self._next_lease = time.monotonic() + self.lease_ms / 3000.0
        ids = [j for j, job in self._held.items() if not job.done]
        if ids:
            conn = await self._db()
            await leases.extend_leases(conn, TABLE, self.owner, ids, self.lease_ms)

    # -- dispatch -------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start calls for waiting jobs, in claim order, while slots are free and the limits allow."""
        self._blocked_until = None
        if not self._ready or self.shutdown or self._stopping:
            self._throttled = set()
            return
        keep: list[Job] = []
        blocked: set[tuple[str, str]] = set()
        now = time.monotonic()
        for job in self._ready:
            if job.done or (job.operation == "embedding" and job.unsent == 0):
                continue
            provider = job.route.provider
            if self._in_flight >= self.concurrency or (provider, job.tenant) in blocked or (provider, "") in blocked:
                keep.append(job)
                continue
            if job.operation == "embedding" and self._filling(job):
                keep.append(job)
                continue
            call = self._build_call(job)
            if not call.jobs:
                continue               # its texts went with another job's request meanwhile
            wait, whole_provider = self._admit(call, now)
            if wait > 0:
                self._unbuild(call)
                blocked.add((provider, "" if whole_provider else job.tenant))
                if wait > HAND_BACK_S and not whole_provider and self._hand_back_job(job, wait):
                    continue
                if not math.isinf(wait):
                    until = now + wait
                    self._blocked_until = until if self._blocked_until is None else min(self._blocked_until, until)
                keep.append(job)
                continue
            self._start(call)
            if job.operation == "embedding" and job.unsent > 0:
                keep.append(job)
        self._ready = keep
        self._throttled = {tenant for _, tenant in blocked if tenant}

    def _filling(self, job: Job) -> bool:
        """Whether the job's embedding group is below a full request while claims are about to add to it:
        it then waits for them (one claim's round trip) instead of going as a small request."""
        if job.solo or self._exhausted:
            return False
        group = self._groups.get(self._group_key(job))
        return group is not None and len(group) < int(self._setting("llm_embedding_batch_size")) and \
            self._want_claim()

    def _build_call(self, job: Job) -> Call:
        call = Call(job.route, job.tenant, [job])
        if job.operation != "embedding":
            call.tokens = estimate_tokens((job.system_prompt or "") + (job.input_text or "") +
                                          "".join(job.documents or ())) + int(job.parameters.get("max_tokens") or 0)
            return call
        key = self._group_key(job)
        group = self._groups[key]
        limit = int(self._setting("llm_embedding_batch_size"))
        max_tokens = EMBED_MAX_TOKENS
        tpm = float(self._setting("llm_tokens_per_minute"))
        if tpm > 0:
            max_tokens = min(max_tokens, max(1, int(tpm / 60 * TPM_BURST_S)))
        jobs: dict[int, Job] = {}
        while group and len(call.items) < limit:
            item_job, index = group[0]
            if item_job.done:
                group.popleft()
                continue
            cost = estimate_tokens(item_job.texts[index])
            if call.items and call.tokens + cost > max_tokens:
                break
            group.popleft()
            call.items.append((item_job, index))
            call.tokens += cost
            item_job.unsent -= 1
            jobs[item_job.job_id] = item_job
        if not group:
            del self._groups[key]      # groups come and go with tenants and isolated jobs
        call.jobs = list(jobs.values())
        return call

    def _unbuild(self, call: Call) -> None:
        """Put a call's embedding texts back at the head of their group (the call did not go)."""
        if not call.items:
            return
        group = self._groups.setdefault(self._group_key(call.items[0][0]), deque())
        for item_job, index in reversed(call.items):
            group.appendleft((item_job, index))
            item_job.unsent += 1

    def _admit(self, call: Call, now: float) -> tuple[float, bool]:
        """(0, _) if the call may start now (its tokens are taken), else (seconds to wait, whether the
        whole provider is held back rather than this tenant)."""
        provider = call.route.provider
        if provider == "local":
            return 0.0, False
        paused = self.buckets.paused(provider, now)
        if paused > 0:
            return paused, True
        factor = self.buckets.factor(provider, now)
        if self._in_flight_by.get(provider, 0) >= max(1, int(self.concurrency * factor)):
            return math.inf, True      # until one of its calls finishes (which wakes the session)
        rps = float(self._setting("llm_requests_per_second")) * factor
        tpm = float(self._setting("llm_tokens_per_minute")) / 60.0 * factor
        share = self._share(call.tenant)
        own = self._claims(provider, "", 1.0, rps, tpm, call.tokens)
        tenant = self._claims(provider, f":{call.tenant}", share, rps, tpm, call.tokens) if share < 1.0 else []
        if not own and not tenant:
            return 0.0, False
        wait = self.buckets.take(own + tenant, now)
        if wait <= 0:
            return 0.0, False
        # Held back by the provider's own limits (everyone waits), or only by this tenant's share?
        return wait, not tenant or self.buckets.peek(own, now) > 0

    @staticmethod
    def _claims(provider: str, scope: str, share: float, rps: float, tpm: float, tokens: int) -> list[Claim]:
        """The bucket claims of one call: a request, and its estimated tokens, at `share` of the limits."""
        claims = []
        if rps > 0:
            claims.append(Claim(f"rps:{provider}{scope}", 1.0, rps * share, max(1.0, rps * share * RPS_BURST_S)))
        if tpm > 0:
            claims.append(Claim(f"tpm:{provider}{scope}", float(tokens), tpm * share,
                                max(1.0, tpm * share * TPM_BURST_S)))
        return claims

    def _share(self, tenant: str) -> float:
        """The tenant's share of the provider limits: its neurondb_tenants.llm_share, else the setting."""
        return self._tenant_shares.get(tenant, float(self._setting("llm_tenant_share")))

    def _start(self, call: Call) -> None:
        provider = call.route.provider
        self._in_flight += 1
        self._in_flight_by[provider] = self._in_flight_by.get(provider, 0) + 1
        for job in call.jobs:
            job.calls += 1
            self.running.add(job.job_id)
        task = self.loop.create_task(self._run_call(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _hand_back_job(self, job: Job, wait_s: float) -> bool:
        """A tenant over its share for longer than HAND_BACK_S: its job goes back to the table until its
        tokens are due, so the slot (and later claims) serve other tenants meanwhile. Not a job with a
        call already made (an embedding partly sent): that one waits here."""
        if job.calls:
            return False
        job.done = True
        self._hand_back[job.job_id] = wait_s * 1000.0
        return True

    # -- calls ----------------------------------------------------------------------------------------

    async def _run_call(self, call: Call) -> None:
        provider = call.route.provider
        started = time.monotonic()
        try:
            value = await asyncio.wait_for(self._invoke(call), self.timeout_s)
            error: BaseException | None = None
        except asyncio.TimeoutError:
            value, error = None, ProviderError(
                f"timed out after {self.timeout_s:g}s (neurondb.neuranllm_timeout)", retryable=True,
                provider=provider, code="timeout")
        except asyncio.CancelledError:
            raise
        except Exception as exc:     # ProviderError, or a bug: either way this call's jobs get an outcome
            value, error = None, exc
        finally:
            self._in_flight -= 1
            self._in_flight_by[provider] -= 1
            self._wake()
        ms = (time.monotonic() - started) * 1000
        if error is not None:
            self._call_failed(call, error, ms)
        else:
            self._call_succeeded(call, value, ms)
        if self._ready and not self._stopping:
            # The freed slot takes the next claimed job now, not when the session loop comes round
            # (it may be waiting on the database for a few ms).
            self._dispatch()

    async def _invoke(self, call: Call) -> Any:
        client = self.client
        job = call.jobs[0]
        _, provider = self._provider(job.operation, job.model, job.provider)
        if job.operation == "completion":
            return await provider.acomplete(job.input_text or "", job.system_prompt, job.parameters, client=client)
        if job.operation == "reranking":
            return await provider.arerank(job.input_text or "", list(job.documents or []),
                                          job.parameters.get("top_n"), client=client)
        texts = [j.texts[i] for j, i in call.items]
        if hasattr(provider, "build_embed_request"):     # HTTP: the pieces, for the batch's token count
            raw = await provider.asend(provider.build_embed_request(texts), client)
            batch = provider.parse_embed_response(*raw, count=len(texts))
            return batch.vectors, batch.prompt_tokens
        return await provider.aembed(texts), None

    def _call_succeeded(self, call: Call, value: Any, ms: float) -> None:
        now = time.monotonic()
        job = call.jobs[0]
        if job.operation == "completion":
            job.prompt_tokens, job.completion_tokens, job.latency_ms = (value.prompt_tokens, value.completion_tokens,
                                                                          ms)
            self._correct_tokens(call, (value.prompt_tokens or 0) + (value.completion_tokens or 0))
            self._put_cache(job, job.keys[0], text=value.text)
            self._finish(Outcome(job, "completed", now, text=value.text))
            return
        if job.operation == "reranking":
            ranking = [{"index": i, "doc": (job.documents or [])[i], "score": float(s)} for i, s in value]
            job.latency_ms = ms
            self._put_cache(job, job.keys[0], json=ranking)
            self._finish(Outcome(job, "completed", now, json=ranking))
            return
        vectors, tokens = value
        if tokens is not None:
            self._correct_tokens(call, tokens)
        estimates = [estimate_tokens(j.texts[i]) for j, i in call.items]
        total = sum(estimates) or 1
        for (item_job, index), vector, estimate in zip(call.items, vectors, estimates, strict=True):
            if item_job.done:
                continue
            item_job.vectors[index] = vector
            item_job.prompt_tokens = _add(item_job.prompt_tokens, None if tokens is None else tokens * estimate / total)
            item_job.latency_ms = max(item_job.latency_ms, ms)
            self._put_cache(item_job, item_job.keys[index], vector=vector,
                            tokens=None if tokens is None else round(tokens * estimate / total))
        for item_job in call.jobs:
            if not item_job.done and all(v is not None for v in item_job.vectors):
                self._complete_embedding(item_job, now, cache_hit=False)

    def _complete_embedding(self, job: Job, now: float, cache_hit: bool) -> None:
        if job.input_texts is not None:
            out = Outcome(job, "completed", now, json=list(job.vectors), cache_hit=cache_hit)
        else:
            out = Outcome(job, "completed", now, vector=job.vectors[0], cache_hit=cache_hit)
        if job.prompt_tokens is not None:
            job.prompt_tokens = round(job.prompt_tokens)
        self._finish(out)

    def _call_failed(self, call: Call, error: BaseException, ms: float) -> None:
        now = time.monotonic()
        provider = call.route.provider
        retryable = isinstance(error, ProviderError) and error.retryable
        retry_after = error.retry_after if isinstance(error, ProviderError) else None
        if isinstance(error, ProviderError) and error.status == 429:
            factor = self.buckets.throttle(provider, retry_after)
            self.log.info("%s answered 429: its rate is at %.0f%% for a while", provider, factor * 100)
        if self._correctable(call):
            self._correct_tokens(call, 0)
        live = [j for j in call.jobs if not j.done]
        if not retryable and len(live) > 1:
            # One bad input must not fail the others sent with it: each job is sent again on its own,
            # without counting an attempt, and only the guilty one fails.
            for job in live:
                self._isolate(job)
            return
        message = describe(error)
        for job in live:
            job.latency_ms = ms
            attempt = job.retry_count + 1
            if retryable and job.retry_count < job.limit:
                delay = backoff_ms(attempt, float(self._setting("neuranllm_retry_delay")),
                                   float(self._setting("neuranllm_retry_max_delay")), retry_after)
                self.log.info("LLM job %d (%s) attempt %d failed, retrying in %.0f ms: %s", job.job_id,
                              job.operation, attempt, delay, message)
                self._finish(Outcome(job, "retry", now, error=message, delay_ms=delay))
            else:
                why = "not retryable" if not retryable else f"after {attempt} attempts"
                self.log.warning("LLM job %d (%s) failed %s: %s", job.job_id, job.operation, why, message)
                self._fail(job, message)

    def _isolate(self, job: Job) -> None:
        """Send an embedding job's texts in requests of their own from now on."""
        old = self._groups.get(self._group_key(job))
        if old is not None:
            kept = [item for item in old if item[0] is not job]
            old.clear()
            old.extend(kept)
        job.solo = True
        job.calls -= 1
        self._enqueue(job)

    def _correctable(self, call: Call) -> bool:
        return call.route.provider != "local" and float(self._setting("llm_tokens_per_minute")) > 0

    def _correct_tokens(self, call: Call, actual: int) -> None:
        """The tokens/min buckets were charged an estimate; charge the difference now that it is known
        (a failed call is charged nothing: `actual` 0)."""
        delta = float(actual - call.tokens)
        if not self._correctable(call) or delta == 0:
            return
        provider = call.route.provider
        tpm = float(self._setting("llm_tokens_per_minute")) / 60.0 * self.buckets.factor(provider)
        share = self._share(call.tenant)
        self.buckets.adjust(f"tpm:{provider}", delta, tpm, max(1.0, tpm * TPM_BURST_S))
        if share < 1.0:
            self.buckets.adjust(f"tpm:{provider}:{call.tenant}", delta, tpm * share,
                                max(1.0, tpm * share * TPM_BURST_S))

    # -- outcomes -------------------------------------------------------------------------------------

    def _finish(self, outcome: Outcome) -> None:
        outcome.job.done = True
        self.running.discard(outcome.job.job_id)
        self._outcomes.append(outcome)

    def _fail(self, job: Job, message: str) -> None:
        self._finish(Outcome(job, "failed", time.monotonic(), error=message[:MAX_ERROR]))

    def _put_cache(self, job: Job, key: str, *, text: str | None = None, vector: Any = None,
                   json: Any = None, tokens: int | None = None) -> None:
        if not self.cache_on or job.route is None:
            return
        self._cache_puts[key] = {
            "cache_key": key, "operation": job.operation, "provider": job.route.provider,
            "model_name": job.route.model, "result_text": text, "result_vector": vector, "result_json": json,
            "prompt_tokens": _int(tokens if job.operation == "embedding" else job.prompt_tokens),
            "completion_tokens": _int(job.completion_tokens) if job.operation == "completion" else None}

    async def _flush(self) -> None:
        """Every waiting outcome, hand-back and cache entry in one transaction."""
        if not self._pending_writes():
            return
        outcomes, self._outcomes = self._outcomes, []
        hand_back, self._hand_back = self._hand_back, {}
        puts, self._cache_puts = list(self._cache_puts.values()), {}
        conn = await self._db()
        now = time.monotonic()
        try:
            async with conn.transaction():
                await self._write(conn, outcomes, hand_back, puts, now)
        except psycopg.OperationalError:
            # Nothing was written: keep everything for the flush after the reconnection.
            self._outcomes = outcomes + self._outcomes
            self._cache_puts = {p["cache_key"]: p for p in puts} | self._cache_puts
            self._hand_back.update(hand_back)
            raise
        except psycopg.Error as exc:
            # A value the database refuses (it should not happen): record each job on its own, so only
            # the one at fault fails, with the reason.
            self.log.error("writing %d LLM outcomes failed, writing them one by one: %s", len(outcomes), exc)
            for o in outcomes:
                try:
                    async with conn.transaction():
                        await self._write(conn, [o], {}, [], now)
                except psycopg.OperationalError:
                    raise
                except psycopg.Error as one:
                    o2 = Outcome(o.job, "failed", o.at, error=f"storing the result failed: {one}"[:MAX_ERROR])
                    async with conn.transaction():
                        await self._write(conn, [o2], {}, [], now)
            if hand_back:
                async with conn.transaction():
                    await self._write(conn, [], hand_back, [], now)
        self._count(outcomes)
        # Retries and hand-backs are runnable again once their delay has passed, and visible only now:
        # wake up for the first of them (not for the naptime).
        dues = [o.at + o.delay_ms / 1000.0 for o in outcomes if o.status == "retry"]
        dues += [now + delay / 1000.0 for delay in hand_back.values()]
        if dues:
            due = min(dues)
            self._due_at = due if self._due_at is None else min(self._due_at, due)
        for o in outcomes:
            self._held.pop(o.job.job_id, None)
        for job_id in hand_back:
            self._held.pop(job_id, None)
            self.running.discard(job_id)
        self._cache_estimate = (self._cache_estimate or 0) + len(puts)

    async def _write(self, conn: psycopg.AsyncConnection, outcomes: list[Outcome], hand_back: dict[int, float],
                     puts: list[dict[str, Any]], now: float) -> None:
        done = [o for o in outcomes if o.status == "completed"]
        retry = [o for o in outcomes if o.status == "retry"]
        failed = [o for o in outcomes if o.status == "failed"]
        if done:
            await conn.execute(query("llm", "complete"), {"owner": self.owner, "rows": json_rows([{
                "job_id": o.job.job_id, "provider": o.job.route.provider if o.job.route else None,
                "model": o.job.route.model if o.job.route else None, "result_text": o.text,
                "result_vector": o.vector, "result_json": o.json, "cache_hit": o.cache_hit,
                "latency_ms": o.job.latency_ms, "prompt_tokens": _int(o.job.prompt_tokens),
                "completion_tokens": _int(o.job.completion_tokens)} for o in done])})
        if retry:
            await conn.execute(query("llm", "retry"), {"owner": self.owner, "rows": json_rows([{
                "job_id": o.job.job_id, "error": o.error, "delay_ms": o.delay_ms, "ago_ms": (now - o.at) * 1000}
                for o in retry])})
        if failed:
            await conn.execute(query("llm", "fail"), {"owner": self.owner, "rows": json_rows([{
                "job_id": o.job.job_id, "error": o.error, "provider": o.job.route.provider if o.job.route else None,
                "latency_ms": o.job.latency_ms if o.job.calls else None, "ago_ms": (now - o.at) * 1000}
                for o in failed])})
        for delay in sorted(set(hand_back.values())):
            await leases.hand_back(conn, TABLE, self.owner, [j for j, d in hand_back.items() if d == delay], delay)
        if puts:
            await conn.execute(query("llm", "cache_put"), {"ttl_s": float(self._setting("llm_cache_ttl")),
                                                           "rows": json_rows(puts)})

    def _count(self, outcomes: list[Outcome]) -> None:
        result = self._result
        for o in outcomes:
            if o.status == "completed":
                result.processed += 1
            elif o.status == "retry":
                result.retried += 1
            else:
                result.failed += 1
            result.latency_ms += o.job.latency_ms

    # -- housekeeping (synchronous connection, between sessions) --------------------------------------

    def _maintenance(self) -> None:
        now = time.monotonic()
        if now >= self._next_maintenance:
            self._next_maintenance = now + MAINTENANCE_EVERY
            recovered, failed = leases.recover_expired(self.conn, TABLE, leases.RetryPolicy.of(self.config, TABLE))
            if recovered:
                self.log.warning("recovered %d LLM jobs whose lease expired%s", recovered,
                                 f"; {len(failed)} out of retries failed: {failed}" if failed else "")
            self._tenant_shares = {t: float(s) for t, s in self.conn.execute(query("llm", "tenant_shares"))}
        limit = int(self._setting("llm_cache_max_entries"))
        if self._cache_estimate is None or (limit > 0 and self._cache_estimate > limit):
            self._cache_maintenance(limit)

    def _cache_maintenance(self, limit: int) -> None:
        """Enforce the cache's bounds now (neurondb/caches.py): neuranmon does it every cycle; this worker at
        start and when its own writes took the cache past its bound in between."""
        rotation = caches.rotate(self.conn, limit, lambda: bool(self.shutdown))
        if rotation.evicted:
            self.log.info("LLM cache: evicted %d least recently used entries (bound %d)", rotation.evicted, limit)
        self._cache_estimate = rotation.entries

    def _plan_wakeup(self) -> None:
        """Idle: wake for the next delayed job (a retry, maybe another worker's) before the naptime ends."""
        seconds = self.conn.execute(query("llm", "next_run_at")).fetchone()[0]
        if seconds is not None:
            due = time.monotonic() + max(0.0, float(seconds))
            self._due_at = due if self._due_at is None else min(self._due_at, due)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _add(total: float | None, value: float | None) -> float | None:
    """Token counts add up while every part is known; one unknown part makes the sum unknown."""
    if total is None or value is None:
        return None
    return total + value


def _int(value: float | None) -> int | None:
    return None if value is None else round(value)
