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
jitter", leases.full_jitter_ms: failures that happened together retry spread over the whole window), or
after the provider's Retry-After when that is longer. The worker wakes up for it, not at the next naptime.
Other failures (4xx, context too long, invalid input or parameters) fail the job at once with the
provider's message.

This module is the scheduling loop; its parts live beside it: llmjobs.py (job, call and outcome records),
batching.py (which embedding texts share a request), admission.py (call slots, rate limits, tenant
shares), llmstore.py (the async connection: claims, cache, outcomes), llmsettings.py (the settings as
one value, rebuilt at each reload).

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
import time
from collections.abc import Callable
from typing import Any

import psycopg

from neurondb import caches
from neurondb.db import UndecodableJson, decode_json
from neurondb.llm import PROVIDER_OPERATIONS as OPERATIONS
from neurondb.providers import ProviderError, Route, resolve
from neurondb.providers.base import estimate_tokens
from neurondb.providers.registry import completer_for, embedder_for, reranker_for
from neurondb.providers.transport import make_client
from neurondb.queries import query
from neurondb.settings import ReloadResult
from neurondb.shm.buckets import Buckets
from neurondb.shm.control import RunningJobs
from neurondb.workers import leases
from neurondb.workers.admission import Admission
from neurondb.workers.base import BatchResult, Worker
from neurondb.workers.batching import EmbeddingBatcher
from neurondb.workers.leases import Status
from neurondb.workers.llmjobs import Call, InvalidJob, Job, Outcome, prepare
from neurondb.workers.llmmetrics import LLMMetrics
from neurondb.workers.llmsettings import LLMSettings
from neurondb.workers.llmstore import LLMStore

TABLE = leases.LLM_TABLE
SESSION_S = 0.5              # longest run of the event loop before the base lifecycle gets control back
POLL_S = 0.02                # while a slot is free, look for new work (NOTIFY via the latch) this often
FLUSH_DELAY_S = 0.02         # outcomes wait at most this long to be written with others
FLUSH_MAX = 128              # ... or until this many are waiting
MAINTENANCE_EVERY = 5.0      # lease-expiry sweep, tenant shares
HAND_BACK_S = 2.0            # a job that must wait longer for its tenant's tokens goes back to the table
SHOWN_ERRORS = (ProviderError, InvalidJob)    # raised to be shown as they are (leases.describe)


def describe(exc: BaseException) -> str:
    """The error_message of a failed attempt: a ProviderError's own text (provider, status, provider's
    message; redacted), anything else with its type. Never includes request headers."""
    return leases.describe(exc, SHOWN_ERRORS)


class LLMWorker(Worker):
    kind = "neuranllm"
    listen_channels = ("neurondb_llm_jobs",)

    # -- lifecycle ------------------------------------------------------------------------------------

    def on_start(self) -> None:
        self.settings = LLMSettings.of(self.config)
        self.llm_metrics = LLMMetrics(self.metrics)
        self.owner = leases.lease_owner()
        self.concurrency = self.settings.concurrency     # postmaster: fixed for the process's life
        self.loop = asyncio.new_event_loop()
        # One pool for every call: keep-alive connections are reused across jobs (no TCP/TLS handshake
        # per call); as many as calls may be in flight, so no call ever waits for a connection.
        self.client = make_client(self.concurrency)
        self.buckets = Buckets.open(self.ctx.shared)
        self.admission = Admission(self.buckets, self.settings)
        self.batcher = EmbeddingBatcher()
        self.store = LLMStore(self.ctx.dsn, f"neurondb {self.ctx.name} async", self.owner, self.log)
        # httpx logs every request at INFO: hundreds of lines a second here, and URLs are for our own log.
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self._providers: dict[tuple[str, str | None, str | None], tuple[Route, Any]] = {}
        self._held: dict[int, Job] = {}                   # claimed, outcome not yet written
        self._ready: list[Job] = []                       # claimed, waiting for a call slot (FIFO)
        self._tasks: set[asyncio.Task] = set()
        self._exhausted = False          # the last claim came back short: wait for a NOTIFY or a due time
        self._stopping = False           # draining: no new calls
        self._due_at: float | None = None          # earliest known retry or delayed job
        self._blocked_until: float | None = None   # earliest time a rate-limited call may go
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
        self.settings = self.admission.settings = LLMSettings.of(self.config)
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
            self.loop.run_until_complete(self.store.close())
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
                self._hand_back(job, 0.0)
        self._ready.clear()
        if fast:
            for task in list(self._tasks):
                task.cancel()
            for job in self._held.values():
                if not job.done:
                    self._hand_back(job, 0.0)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in self._held.values():    # embedding jobs with texts left unsent when the rest stopped
            if not job.done:
                self._hand_back(job, 0.0)
        await self._flush()

    # -- the batch ------------------------------------------------------------------------------------

    def run_batch(self) -> BatchResult:
        try:
            if self._unsettled:
                self._settle()
            self._maintenance()
            result = self.loop.run_until_complete(self._session())
        except BaseException as exc:
            # Outcomes not written stay in the store (see LLMStore.flush); a claim whose answer was lost left
            # jobs leased to us that we do not know: the next batch settles them.
            self._unsettled = True
            if isinstance(exc, psycopg.OperationalError):
                self.loop.run_until_complete(self.store.close())
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
            if not self._tasks and not self._ready and self._exhausted and not self.store.pending:
                return result
            if self.shutdown or self.reload_requested or time.monotonic() >= end:
                await self._flush()
                result.more = True
                return result
            await self._sleep(self._next_wake(end) - time.monotonic())

    def _next_wake(self, end: float) -> float:
        wake = end
        outcomes = self.store.outcomes
        if outcomes or self.store.hand_backs:
            wake = min(wake, outcomes[0].at + FLUSH_DELAY_S if outcomes else time.monotonic())
        if self.admission.in_flight < self.concurrency:
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

    def _publish_gauges(self) -> None:
        """For `neurondb status` readers of the slot: calls in flight, jobs waiting for a slot."""
        gauges = self.slot["gauges"]
        gauges[0] = self.admission.in_flight
        gauges[1] = len(self._ready)

    # -- database rounds ------------------------------------------------------------------------------

    async def _database_round(self) -> None:
        """Write what is due, then claim while there is room; new claims go through the cache first."""
        now = time.monotonic()
        outcomes = self.store.outcomes
        if (outcomes and (len(outcomes) >= FLUSH_MAX or now - outcomes[0].at >= FLUSH_DELAY_S
                          or not self._tasks)) or self.store.hand_backs:
            await self._flush()
        if self._held and now >= self._next_lease:
            await self._extend_leases()
        while self._want_claim():
            if len(self.store.outcomes) >= FLUSH_MAX:      # cache hits pile up while claims go on
                await self._flush()
            if not await self._claim():
                break

    def _want_claim(self) -> bool:
        if self._exhausted or self.shutdown or not self.enabled:
            return False
        free = self.concurrency - self.admission.in_flight
        if free <= 0:
            return False
        # Jobs of a tenant over its share cannot use a free slot: they do not count, or a throttled tenant's
        # backlog would stop the claims that bring everyone else's jobs.
        waiting = sum(1 for j in self._ready if not j.done and j.tenant not in self._throttled)
        # Half a batch ahead of the free slots: a call that ends finds its successor already claimed and
        # starts it at once (see _run_call), instead of idling for a claim's round trip.
        if waiting < free + self.settings.batch_size // 2:
            return True
        if waiting >= 2 * max(self.concurrency, self.settings.embedding_batch_size):
            return False
        # Fill embedding requests before sending them: texts of a group below the bound wait for more
        # while the table still has jobs (the last claim was full).
        return self.batcher.any_filling(self.settings.embedding_batch_size)

    async def _claim(self) -> bool:
        """One claim; False when it came back short (the table has no more runnable jobs for now)."""
        settings = self.settings
        rows = await self.store.claim(settings.batch_size, settings.lease_ms, sorted(self._throttled))
        if len(rows) < settings.batch_size:
            self._exhausted = True
        if not rows:
            return False
        if not self._held:
            self._next_lease = time.monotonic() + settings.lease_ms / 3000.0
        jobs = []
        for (job_id, operation, model, provider, tenant, input_text, system_prompt, input_texts, documents,
             parameters_text, retry_count, max_retries, last_error) in rows:
            try:   # per row: one value the decoder refuses fails its own job, not the claim
                parameters, undecodable = decode_json(parameters_text, "parameters"), None
            except UndecodableJson as exc:
                parameters, undecodable = {}, str(exc)
            job = Job(job_id, operation, model, provider, tenant, input_text, system_prompt, input_texts,
                      documents, parameters, retry_count,
                      settings.retry.max_retries if max_retries is None else max_retries)
            self._held[job_id] = job
            if undecodable:
                self._fail(job, undecodable)
                continue
            if retry_count > job.limit:
                self._fail(job, f"gave up after {retry_count} attempts (neurondb.neuranllm_max_retries "
                                f"{job.limit}); the last one: {last_error or 'interrupted'}")
                continue
            try:
                prepare(job, lambda j: self._provider(j.operation, j.model, j.provider)[0])
            except SHOWN_ERRORS as exc:
                self._fail(job, describe(exc))
                continue
            jobs.append(job)
        if settings.cache_on and jobs:
            await self._cache_lookup(jobs)
        for job in jobs:
            if not job.done:
                self._ready.append(job)
                if job.operation == "embedding":
                    self.batcher.add(job)
        return not self._exhausted

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
                                                         timeout=self.settings.timeout_s))
        return found

    async def _cache_lookup(self, jobs: list[Job]) -> None:
        """Complete the jobs whose results are cached (every text, for an embedding) without a call."""
        started = time.monotonic()
        found = await self.store.cache_get(list({k for j in jobs for k in j.keys}))
        if not found:
            self.llm_metrics.cache_lookups(0, len(jobs))
            return
        ms = (time.monotonic() - started) * 1000
        now = time.monotonic()
        for job in jobs:
            hits = [found.get(k) for k in job.keys]
            if job.operation == "embedding":
                for i, hit in enumerate(hits):
                    if hit is not None and hit[4] is not None:
                        job.fill(i, hit[4], hit[6])
                if job.filled():
                    self._complete_embedding(job, now, cache_hit=True, latency_ms=ms)
                continue
            hit = hits[0]
            if hit is None:
                continue
            self._finish(Outcome(job, Status.COMPLETED, now, text=hit[3], json=hit[5], cache_hit=True, latency_ms=ms,
                                 prompt_tokens=hit[6], completion_tokens=hit[7]))
        hits = sum(job.done for job in jobs)
        self.llm_metrics.cache_lookups(hits, len(jobs) - hits)

    async def _extend_leases(self) -> None:
        self._next_lease = time.monotonic() + self.settings.lease_ms / 3000.0
        ids = [j for j, job in self._held.items() if not job.done]
        if ids:
            await self.store.extend_leases(ids, self.settings.lease_ms)

    # -- dispatch -------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start calls for waiting jobs, in claim order, while slots are free and the limits allow. An
        embedding request is looked at (`peek`) before it is admitted and its texts taken only once it is."""
        self._blocked_until = None
        if not self._ready or self.shutdown or self._stopping:
            self._throttled = set()
            return
        keep: list[Job] = []
        blocked: set[tuple[str, str]] = set()
        now = time.monotonic()
        max_texts = self.settings.embedding_batch_size
        max_tokens = self.admission.request_tokens()
        for job in self._ready:
            embedding = job.operation == "embedding"
            if job.done or (embedding and not self.batcher.waiting(job)):
                continue
            provider = job.route.provider
            full = self.admission.in_flight >= self.concurrency
            if full or (provider, job.tenant) in blocked or (provider, "") in blocked:
                keep.append(job)
                continue
            if embedding and self._filling(job, max_texts):
                keep.append(job)
                continue
            call = self.batcher.peek(job, max_texts, max_tokens) if embedding else Call.single(job)
            if call is None:
                continue               # its texts went with another job's request meanwhile
            wait, whole_provider = self.admission.admit(call, now)
            if wait > 0:
                blocked.add((provider, "" if whole_provider else job.tenant))
                if wait > HAND_BACK_S and not whole_provider and self._hand_back_job(job, wait):
                    continue
                if not math.isinf(wait):
                    until = now + wait
                    self._blocked_until = until if self._blocked_until is None else min(self._blocked_until, until)
                keep.append(job)
                continue
            if embedding:
                self.batcher.take(call)
            self._start(call)
            if embedding and self.batcher.waiting(job):
                keep.append(job)
        self._ready = keep
        self._throttled = {tenant for _, tenant in blocked if tenant}

    def _filling(self, job: Job, max_texts: int) -> bool:
        """Whether the job's embedding group is below a full request while claims are about to add to it:
        it then waits for them (one claim's round trip) instead of going as a small request."""
        return not self._exhausted and self.batcher.filling(job, max_texts) and self._want_claim()

    def _start(self, call: Call) -> None:
        self.admission.started(call)
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
        self._hand_back(job, wait_s * 1000.0)
        return True

    # -- calls ----------------------------------------------------------------------------------------

    async def _run_call(self, call: Call) -> None:
        provider = call.route.provider
        timeout_s = self.settings.timeout_s
        started = time.monotonic()
        try:
            value = await asyncio.wait_for(self._invoke(call), timeout_s)
            error: BaseException | None = None
        except asyncio.TimeoutError:
            value, error = None, ProviderError(
                f"timed out after {timeout_s:g}s (neurondb.neuranllm_timeout)", retryable=True,
                provider=provider, code="timeout")
        except asyncio.CancelledError:
            raise
        except Exception as exc:     # ProviderError, or a bug: either way this call's jobs get an outcome
            value, error = None, exc
        finally:
            self.admission.finished(call)
            self._wake()
        ms = (time.monotonic() - started) * 1000
        if error is not None:
            self.llm_metrics.call_failed(call.route, ms / 1000, error)
            self._call_failed(call, error, ms)
        else:
            self.llm_metrics.call_succeeded(call.route, ms / 1000, call.jobs[0].operation, value)
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
            prompt, completion = value.prompt_tokens, value.completion_tokens
            self.admission.correct_tokens(call, (prompt or 0) + (completion or 0))
            self._put_cache(job, job.keys[0], text=value.text, prompt_tokens=prompt, completion_tokens=completion)
            self._finish(Outcome(job, Status.COMPLETED, now, text=value.text, latency_ms=ms, prompt_tokens=prompt,
                                 completion_tokens=completion))
            return
        if job.operation == "reranking":
            ranking = [{"index": i, "doc": (job.documents or [])[i], "score": float(s)} for i, s in value]
            self._put_cache(job, job.keys[0], json=ranking, prompt_tokens=0)
            self._finish(Outcome(job, Status.COMPLETED, now, json=ranking, latency_ms=ms, prompt_tokens=0))
            return
        vectors, tokens = value
        if tokens is not None:
            self.admission.correct_tokens(call, tokens)
        estimates = [estimate_tokens(j.texts[i]) for j, i in call.items]
        total = sum(estimates) or 1
        for (item_job, index), vector, estimate in zip(call.items, vectors, estimates, strict=True):
            if item_job.done:
                continue
            share = None if tokens is None else tokens * estimate / total
            item_job.fill(index, vector, share, ms)
            self._put_cache(item_job, item_job.keys[index], vector=vector,
                            prompt_tokens=None if share is None else round(share))
        for item_job in call.jobs:
            if not item_job.done and item_job.filled():
                self._complete_embedding(item_job, now, cache_hit=False, latency_ms=item_job.latency_ms)

    def _complete_embedding(self, job: Job, now: float, cache_hit: bool, latency_ms: float) -> None:
        tokens = None if job.tokens is None else round(job.tokens)
        if job.input_texts is not None:
            self._finish(Outcome(job, Status.COMPLETED, now, json=list(job.vectors), cache_hit=cache_hit,
                                 latency_ms=latency_ms, prompt_tokens=tokens))
        else:
            self._finish(Outcome(job, Status.COMPLETED, now, vector=job.vectors[0], cache_hit=cache_hit,
                                 latency_ms=latency_ms, prompt_tokens=tokens))

    def _call_failed(self, call: Call, error: BaseException, ms: float) -> None:
        now = time.monotonic()
        provider = call.route.provider
        retryable = isinstance(error, ProviderError) and error.retryable
        retry_after = error.retry_after if isinstance(error, ProviderError) else None
        if isinstance(error, ProviderError) and error.status == 429:
            factor = self.admission.throttled(provider, retry_after)
            self.log.info("%s answered 429: its rate is at %.0f%% for a while", provider, factor * 100)
        self.admission.correct_tokens(call, 0)
        live = [j for j in call.jobs if not j.done]
        if not retryable and len(live) > 1:
            # One bad input must not fail the others sent with it: each job is sent again on its own,
            # without counting an attempt, and only the guilty one fails.
            for job in live:
                job.calls -= 1
                self.batcher.isolate(job)
                if job not in self._ready:
                    self._ready.append(job)
            return
        message = describe(error)
        retry = self.settings.retry
        for job in live:
            attempt = job.retry_count + 1
            if retryable and job.retry_count < job.limit:
                delay = leases.full_jitter_ms(attempt, retry.delay_ms, retry.max_delay_ms, retry_after)
                self.log.info("LLM job %d (%s) attempt %d failed, retrying in %.0f ms: %s", job.job_id,
                              job.operation, attempt, delay, message)
                self._finish(Outcome(job, Status.RETRY, now, error=message, delay_ms=delay, latency_ms=ms))
            else:
                why = "not retryable" if not retryable else f"after {attempt} attempts"
                self.log.warning("LLM job %d (%s) failed %s: %s", job.job_id, job.operation, why, message)
                self._finish(Outcome(job, Status.FAILED, now, error=message, latency_ms=ms))

    # -- outcomes -------------------------------------------------------------------------------------

    def _finish(self, outcome: Outcome) -> None:
        outcome.job.done = True
        self.running.discard(outcome.job.job_id)
        self.store.outcomes.append(outcome)

    def _fail(self, job: Job, message: str) -> None:
        """Fail a job that made no call (its inputs, its attempts used up)."""
        self._finish(Outcome(job, Status.FAILED, time.monotonic(), error=message[:leases.MAX_ERROR]))

    def _hand_back(self, job: Job, delay_ms: float) -> None:
        """A claimed job goes back to the table unrun, no attempt counted, runnable after `delay_ms`."""
        job.done = True
        self.store.hand_backs[job.job_id] = delay_ms

    def _put_cache(self, job: Job, key: str, **result: Any) -> None:
        if self.settings.cache_on:
            self.store.put_cache(job, key, **result)

    async def _flush(self) -> None:
        """Write what waits (LLMStore.flush), then settle the books: counters, jobs no longer held, and
        the wake-up for the retries and hand-backs, which are runnable again once their delay has passed
        and visible only now (not at the naptime)."""
        flushed = await self.store.flush(self.settings.cache_ttl_s)
        if flushed is None:
            return
        self._count(flushed.outcomes)
        dues = [o.at + o.delay_ms / 1000.0 for o in flushed.outcomes if o.status == Status.RETRY]
        dues += [flushed.at + delay / 1000.0 for delay in flushed.hand_backs.values()]
        if dues:
            due = min(dues)
            self._due_at = due if self._due_at is None else min(self._due_at, due)
        for o in flushed.outcomes:
            self._held.pop(o.job.job_id, None)
        for job_id in flushed.hand_backs:
            self._held.pop(job_id, None)
            self.running.discard(job_id)
        self._cache_estimate = (self._cache_estimate or 0) + flushed.cache_entries

    def _count(self, outcomes: list[Outcome]) -> None:
        result = self._result
        split = leases.partition(outcomes)
        result.processed += len(split.completed)
        result.retried += len(split.retry)
        result.failed += len(split.failed)
        result.latency_ms += sum(o.latency_ms for o in outcomes)
        self.llm_metrics.outcomes(outcomes)

    # -- housekeeping (synchronous connection, between sessions) --------------------------------------

    def _maintenance(self) -> None:
        now = time.monotonic()
        if now >= self._next_maintenance:
            self._next_maintenance = now + MAINTENANCE_EVERY
            recovered, failed = leases.recover_expired(self.conn, TABLE, self.settings.retry)
            if recovered:
                self.log.warning("recovered %d LLM jobs whose lease expired%s", recovered,
                                 f"; {len(failed)} out of retries failed: {failed}" if failed else "")
            self.admission.tenant_shares = {t: float(s) for t, s in self.conn.execute(query("llm", "tenant_shares"))}
        limit = self.settings.cache_max_entries
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
