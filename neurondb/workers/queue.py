"""neuranq: the queue worker (the document's section 1).

One batch = claim up to `neuranq_batch_size` runnable jobs with SKIP LOCKED in one round trip (fair across
tenants, within their rate limits), commit, run them outside any transaction, then record every outcome in
one transaction: completions with their deferred effects, retries with their backoff, final failures with
their dead-letter rows. While claims come back non-empty the next batch starts at once; the naptime is the
sleep when there is nothing to do, shortened to the next retry or rate-limit token.

Blocking handlers run one by one in this thread. Jobs whose handler is `async def` go to the async lane
(workers/asyncjobs.py: an event loop in a thread of this process), which runs up to `neuranq_concurrency`
of them at once, at most a type's cap of one type. While the lane holds jobs, a batch claims only what
tops it up to twice the concurrency (its slots full and as many jobs waiting, so no slot idles while a
claim is under way), once a quarter of the slots' worth is missing; and it records the lane's outcomes in
batches: it waits for a quarter of the slots to finish, or LINGER after the first.

Semantics are at-least-once: a job whose worker dies before its outcome is recorded runs again (the
supervisor hands it back the moment it reaps the worker; lease expiry covers a lost machine). Only the job
whose handler was running then counts an attempt: the worker lists it in its shared-memory slot, and past
its limit it is dead-lettered instead (workers/leases.py). A batch cut short by a lost connection is
settled by the next one: the outcomes computed are recorded, the jobs not started handed back. Effects made
through `ctx.defer` commit only with the completion, so they happen exactly once; outside effects (an
HTTP call) can repeat, at most once per crash per job in flight.

Retries: attempt n (1-based) that fails with retries left waits
    delay = min(neuranq_retry_max_delay, neuranq_retry_delay * 2^(n-1)) * uniform(0.5, 1.0)
("equal jitter", leases.equal_jitter_ms: never less than half the exponential step, so the backoff stays a
backoff, and spread so that jobs failing together do not retry together).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from neurondb.db import UndecodableJson, decode_json, first_line
from neurondb.jobs import REGISTRY, JobContext, JobError, JobTimeout, PermanentJobError, load_job_types, resolve
from neurondb.queries import query
from neurondb.settings import parse_module_list, parse_type_limits
from neurondb.shm.buckets import Claim
from neurondb.shm.control import RunningJobs, tenant_bucket
from neurondb.workers import leases
from neurondb.workers.asyncjobs import AsyncLane, ReadyJob
from neurondb.workers.base import BatchResult, Worker
from neurondb.workers.leases import MAX_ERROR, Status

TABLE = leases.QUEUE_TABLE
MAINTENANCE_EVERY = 5.0      # seconds between lease-expiry sweeps and tenant-limit refreshes
RETENTION_EVERY = 60.0       # at most; a short retention is enforced more often (a tenth of it, >= 1 s)
RETENTION_BATCH = 1000
FLUSH_EVERY = 1.0            # record outcomes of a long batch at least this often (bounds re-runs on a crash)
ABORT_CHECK_EVERY = 0.005    # seconds between checks for a lost supervisor within a batch (a syscall each)
LANE_WAIT = 0.1              # longest wait for the async lane within a batch (heartbeats, signals go on)
LINGER = 0.02                # after an async job finishes, how long to wait for more before recording


@dataclass
class Outcome:
    job_id: int
    tenant_id: str
    status: Status
    result: orjson.Fragment | None = None   # a completion's result, already serialised
    error: str = ""
    delay_ms: float = 0.0
    effects: list[tuple[str, Any]] | None = None
    ms: float = 0.0
    job_type: str = ""                   # for the metrics (jobs by type)


class QueueWorker(Worker):
    kind = "neuranq"
    listen_channels = ("neurondb_jobs",)

    def on_start(self) -> None:
        """Import the job types first: a typo in neuranq_job_modules stops the worker loudly at start (and
        turns FATAL after repeated crashes) instead of failing every job later."""
        load_job_types(parse_module_list(self.config.get_str("neuranq_job_modules")))
        self.owner = leases.lease_owner()
        self.tenant_limits: dict[str, tuple[float | None, int | None]] = {}
        self._next_maintenance = 0.0
        self._next_retention = time.monotonic() + random.uniform(0, self._retention_every())
        self._wake_at: float | None = None
        self._outcomes: list[Outcome] = []    # computed, not yet recorded
        self._unsettled = False               # a batch ended abnormally: see _settle
        self._summary: Counter = Counter()    # outcomes recorded since the last summary line
        self._summary_since = time.monotonic()
        self.running = RunningJobs(self.slot)
        self._running_lock = threading.Lock()   # the async lane lists its jobs in self.running too
        self.lane: AsyncLane | None = None      # started with the first async job
        self._next_extend = 0.0
        self._read_limits()
        self._type_names = sorted({jt.name for jt in REGISTRY.values() if jt.is_async})
        self._in_flight_zeroed = False
        self._publish_in_flight()
        signal.signal(signal.SIGALRM, self._on_alarm)

    def _read_limits(self) -> None:
        self.concurrency = self.config.get_int("neuranq_concurrency")
        self.type_limits = parse_type_limits(self.config.get_str("neuranq_type_concurrency"))
        if self.lane is not None:
            self.lane.limit = self.concurrency

    def on_reload(self, result: object) -> None:
        """New limits apply to the jobs started from now on. Turned off (neuranq_enabled), the worker stays
        idle: its async jobs finish and are recorded first, the waiting ones go back, as at a smart stop."""
        self._read_limits()
        if self.lane is not None and not self.enabled:
            self._stop_lane()

    # -- settings -------------------------------------------------------------------------------------

    def rate_of(self, tenant: str) -> tuple[float, float]:
        """(jobs/s, burst) for `tenant`: its row in neurondb_tenants, else the defaults; rate 0 = unlimited."""
        rate, burst = self.tenant_limits.get(tenant, (None, None))
        if rate is None:
            rate = self.config.get_float("tenant_rate_limit")
        if burst is None:
            burst = self.config.get_int("tenant_burst")
        return rate, float(burst)

    # -- the batch ------------------------------------------------------------------------------------

    def run_batch(self) -> BatchResult:
        result = BatchResult()
        try:
            if self._unsettled:
                self._settle(result)
            self._maintenance()
            self._run_claimed(result)
            self._log_summary()
        except BaseException:
            # The connection went away (a PostgreSQL restart), or worse, in the middle of a batch: the
            # outcomes computed so far stay in self._outcomes, and the next batch settles what we hold.
            self._unsettled = True
            raise
        return result

    def _settle(self, result: BatchResult) -> None:
        """After a batch that did not end normally: record the outcomes it computed (only for jobs still
        leased to us), then hand back at once every other job leased to us, no attempt counted: the ones
        it had not started, and any claimed by a claim whose answer was lost. They would otherwise wait
        for their lease (neuranq_lease_time) and then run again."""
        self._collect()
        self._flush(result)
        n = leases.hand_back_unheld(self.conn, TABLE, self.owner, self.lane.held() if self.lane else [])
        self._unsettled = False
        if n:
            self.log.warning("handed back %d claimed jobs that had not run before the batch was interrupted", n)

    def _run_claimed(self, result: BatchResult) -> None:
        held = self.lane.load if self.lane else 0
        if held and self.should_abort():
            self._hand_back(self.lane.abandon(), delay_ms=0)
            self._record_lane(result)
            return
        rows = self._claim(held) if held <= 2 * self.concurrency - self._claim_step else []
        if not rows and not held:
            self._record_lane(result)
            self._plan_wakeup()
            return
        result.more = True
        blocking = self._dispatch(rows)
        if blocking:
            self._run_blocking(blocking, result)
        elif self.lane is not None and (not rows or self.lane.load >= self.concurrency):
            self.lane.wait(LANE_WAIT, at_least=self._claim_step, linger=LINGER)
        self._extend_held()
        self._record_lane(result)

    def _record_lane(self, result: BatchResult) -> None:
        """Record the outcomes waiting (the lane's finished ones too) and publish the lane's jobs in flight."""
        self._collect()
        self._flush(result)
        self._publish_in_flight()

    @property
    def _claim_step(self) -> int:
        """While the lane holds jobs, claims bring at least this many (a quarter of its slots)."""
        return max(1, self.concurrency // 4)

    def _claim(self, held: int) -> list[tuple]:
        """Claim runnable jobs: a full batch when the lane is empty, else what tops it up to twice its
        concurrency (its slots full, as many waiting). Jobs over their tenant's tokens go back at once
        (see _take_tokens)."""
        batch_size = self.config.get_int("neuranq_batch_size")
        if held:
            batch_size = min(batch_size, 2 * self.concurrency - held)
        capped, caps = self._allowances(batch_size)
        # The claim alone commits asynchronously (one statement, its own transaction: see the query): if the
        # server crashes before it reaches disk, the job is simply pending again (at-least-once holds).
        # Completions stay synchronous, and their WAL flush covers the claim before it anyway.
        rows = self.conn.execute(query("queue", "claim"), {
            "batch": batch_size, "owner": self.owner, "lease_ms": self.config.get_float("neuranq_lease_time"),
            "salt": str(random.random()), "capped": list(capped), "caps": caps,
        }).fetchall()
        return self._take_tokens(rows) if rows else rows

    def _dispatch(self, rows: list[tuple]) -> list[tuple]:
        """Check each claimed job: a job that cannot run gets its outcome now, an async one goes to the lane;
        the blocking ones are returned, with what they need to run, in claim order."""
        # Read once per batch, not per job: a reload applies between batches anyway.
        default_limit = self.config.get_int("neuranq_max_retries")
        timeout_s = self.config.get_seconds("neuranq_timeout")
        blocking, lane = [], []
        for row in rows:
            job = self._prepare(row, default_limit, timeout_s)
            if isinstance(job, Outcome):
                self._outcomes.append(job)
            elif isinstance(job, ReadyJob):
                lane.append(job)
            else:
                blocking.append(job)
        if lane:
            if self.lane is None:
                self.lane = AsyncLane(self.ctx.dsn, self.ctx.name, self.running, self._running_lock,
                                      self._outcome, self.concurrency)
            self.lane.submit(lane)
        return blocking

    def _run_blocking(self, jobs: list[tuple], result: BatchResult) -> None:
        """Run the blocking jobs one by one, recording outcomes (the lane's too) at least every FLUSH_EVERY."""
        last_flush = next_abort_check = time.monotonic()
        for i, job in enumerate(jobs):
            # A fast shutdown is seen before every job, a lost supervisor within a few ms (or one job).
            now = time.monotonic()
            if self.shutdown == "fast" or now >= next_abort_check:
                next_abort_check = now + ABORT_CHECK_EVERY
                if self.should_abort():
                    self._hand_back([j[0].job_id for j in jobs[i:]], delay_ms=0)
                    break
            self._run_one(*job)
            if time.monotonic() - last_flush > FLUSH_EVERY:
                self._collect()
                self._flush(result)
                self._extend_leases([j[0].job_id for j in jobs[i + 1:]] + (self.lane.held() if self.lane else []))
                last_flush = time.monotonic()

    def _prepare(self, row: tuple, default_limit: int, timeout_s: float) -> Outcome | ReadyJob | tuple:
        """One claimed job (a row of the claim) made ready to run: an ReadyJob for an async handler, a
        (job, handler, started) tuple for a blocking one, or its Outcome when it cannot run (out of retries,
        undecodable payload, unknown type). The payload comes as text and is decoded here, so a value the
        decoder refuses fails this job alone."""
        job_id, job_type, payload_text, tenant, retry_count, max_retries, last_error, pickup_s = row
        self.metrics.observe("neurondb_queue_pickup_latency_seconds", job_type, seconds=max(0.0, pickup_s))
        started = time.perf_counter()
        attempt = retry_count + 1
        limit = default_limit if max_retries is None else max_retries
        if retry_count > limit:
            error = f"gave up after {retry_count} attempts (limit: {limit} retries); the last one: " \
                    f"{last_error or 'interrupted'}"[:MAX_ERROR]
            self.log.warning("job %d (%s) failed: %s", job_id, job_type, error)
            return Outcome(job_id, tenant, Status.FAILED, error=error, job_type=job_type)
        ctx = JobContext(job_id=job_id, job_type=job_type, tenant_id=tenant, attempt=attempt,
                         config=self.config, conn=self.conn, log=self.log, dsn=self.ctx.dsn,
                         buckets=self.ctx.shared.buckets)
        try:
            try:
                payload = decode_json(payload_text, "payload")
            except UndecodableJson as exc:
                raise PermanentJobError(str(exc)) from None
            if not isinstance(payload, dict):
                raise PermanentJobError(f"payload must be a JSON object, got {type(payload).__name__}")
            jt = resolve(job_type)
        except PermanentJobError as exc:
            return self._failed(job_id, job_type, tenant, attempt, limit, exc, started)
        job = ReadyJob(job_id, job_type, tenant, jt.handler, ctx, payload, attempt, limit,
                       self.type_limits.get(jt.name) or jt.concurrency or self.concurrency, timeout_s)
        return job if jt.is_async else (job, started)

    def _run_one(self, job: ReadyJob, started: float) -> None:
        """Run one blocking job and add its outcome to self._outcomes. While the handler runs, the job is
        listed as running in our slot: if it kills the process, the supervisor charges it alone."""
        value: object = None
        error: BaseException | None = None
        with self._running_lock:
            self.running.add(job.job_id)
        try:
            value = self._with_timeout(job.handler, job.ctx, job.payload, job.timeout_s)
        except (psycopg.OperationalError, MemoryError) as exc:
            # The database went away (or memory ran out) during the attempt: it counts as a failed one,
            # and the batch stops here; the next batch records it and hands back the rest (_settle).
            self._outcomes.append(self._outcome(job, None, exc, started))
            raise
        except Exception as exc:
            error = exc
        finally:
            with self._running_lock:
                self.running.discard(job.job_id)
        self._outcomes.append(self._outcome(job, value, error, started))

    def _outcome(self, job: ReadyJob, value: object, error: BaseException | None, started: float) -> Outcome:
        """A finished attempt's outcome; its result is serialised here once, as it will be stored."""
        if error is None:
            try:
                result = orjson.Fragment(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY))
            except TypeError as exc:
                error = exc
            else:
                return Outcome(job.job_id, job.tenant, Status.COMPLETED, result=result, effects=job.ctx.effects,
                               ms=(time.perf_counter() - started) * 1000, job_type=job.job_type)
        return self._failed(job.job_id, job.job_type, job.tenant, job.attempt, job.limit, error, started)

    def _collect(self, lane: AsyncLane | None = None) -> None:
        """Move the outcomes the async lane (ours, or `lane` being stopped) finished into self._outcomes."""
        lane = lane or self.lane
        if lane is not None:
            self._outcomes.extend(lane.take())

    def _extend_held(self) -> None:
        """Renew the leases of the jobs the lane holds, every quarter of the lease time."""
        now = time.monotonic()
        if self.lane is None or now < self._next_extend:
            return
        lease_s = self.config.get_seconds("neuranq_lease_time")
        self._next_extend = now + lease_s / 4
        self._extend_leases(self.lane.held())

    def _publish_in_flight(self) -> None:
        """The lane's jobs in flight per type, for /metrics; nothing to write while no lane ran since the last
        zeros (the no-op drain's batches pay nothing for it)."""
        if self.lane is None and self._in_flight_zeroed:
            return
        self._in_flight_zeroed = self.lane is None
        running = self.lane.in_flight() if self.lane is not None else {}
        for name in self._type_names:
            self.metrics.set("neurondb_queue_jobs_in_flight", self.ctx.name, name, value=running.get(name, 0))

    def _failed(self, job_id: int, job_type: str, tenant: str, attempt: int, limit: int, exc: BaseException,
                started: float) -> Outcome:
        """The outcome of a failed attempt: a retry after its backoff while retries remain, else failed."""
        error = leases.describe(exc, (JobError,))
        ms = (time.perf_counter() - started) * 1000
        retryable = getattr(exc, "retryable", True) and not isinstance(exc, (TypeError, orjson.JSONEncodeError))
        if retryable and attempt <= limit:
            delay = leases.equal_jitter_ms(attempt, self.config.get_float("neuranq_retry_delay"),
                                           self.config.get_float("neuranq_retry_max_delay"))
            self.log.info("job %d (%s) attempt %d failed, retrying in %.0f ms: %s", job_id, job_type, attempt,
                          delay, error)
            return Outcome(job_id, tenant, Status.RETRY, error=error, delay_ms=delay, ms=ms, job_type=job_type)
        why = "not retryable" if not retryable else f"after {attempt} attempts"
        self.log.warning("job %d (%s) failed %s: %s", job_id, job_type, why, error)
        return Outcome(job_id, tenant, Status.FAILED, error=error, ms=ms, job_type=job_type)

    # -- timeouts -------------------------------------------------------------------------------------

    def _on_alarm(self, signum: int, frame: object) -> None:
        raise JobTimeout(f"job exceeded neurondb.neuranq_timeout ({self.config.get_float('neuranq_timeout'):.0f} ms)")

    @staticmethod
    def _with_timeout(handler: Any, ctx: JobContext, payload: dict, timeout_s: float) -> Any:
        """Run the handler under an interval timer: SIGALRM raises JobTimeout inside it when it overruns
        (Python code and sleeps are interrupted; blocking C calls end at their own timeouts)."""
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return handler(ctx, payload)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    # -- recording outcomes ---------------------------------------------------------------------------

    def _flush(self, result: BatchResult) -> None:
        """All waiting outcomes in one transaction: lock the jobs still ours, apply each completion's effects
        under a savepoint (a failing effect fails that job alone), then one statement per kind of outcome.
        They leave self._outcomes only once written: a lost connection keeps them for the next try."""
        outcomes = self._outcomes
        if not outcomes:
            return
        conn = self.conn
        if all(o.status == Status.COMPLETED and not o.effects for o in outcomes):
            # The common case in one statement, no explicit transaction: the lease check is in its WHERE.
            ours = {r[0] for r in conn.execute(query("queue", "complete"),
                                               {"owner": self.owner, "done": self._completions(outcomes)})}
            self._outcomes = []
            self._account([o for o in outcomes if o.job_id in ours], len(outcomes), result)
            return
        with conn.transaction():
            owned = {r[0] for r in conn.execute(query("queue", "lock_owned"),
                                                {"ids": [o.job_id for o in outcomes], "owner": self.owner})}
            for o in outcomes:
                if o.job_id in owned and o.status == Status.COMPLETED and o.effects:
                    try:
                        with conn.transaction():
                            for sql, params in o.effects:
                                conn.execute(sql, params)
                    except psycopg.OperationalError:
                        raise
                    except psycopg.Error as exc:
                        o.status, o.error = Status.FAILED, f"storing the result failed: {first_line(exc)[:MAX_ERROR]}"
            mine = [o for o in outcomes if o.job_id in owned]
            split = leases.partition(mine)
            done, retry, failed = split.completed, split.retry, split.failed
            if done:
                conn.execute(query("queue", "complete"), {"owner": self.owner, "done": self._completions(done)})
            if retry:
                conn.execute(query("queue", "retry"), {"owner": self.owner, "ids": [o.job_id for o in retry],
                                                       "errors": [o.error for o in retry],
                                                       "delays_ms": [o.delay_ms for o in retry]})
            if failed:
                conn.execute(query("queue", "fail"), {"owner": self.owner, "ids": [o.job_id for o in failed],
                                                      "errors": [o.error for o in failed]})
        self._outcomes = []
        self._account(mine, len(outcomes), result)

    @staticmethod
    def _completions(outcomes: list[Outcome]) -> str:
        """The `complete` query's parameter: [[job_id, result], ...] as JSON text."""
        return orjson.dumps([[o.job_id, o.result] for o in outcomes]).decode()

    def _account(self, mine: list[Outcome], total: int, result: BatchResult) -> None:
        """Counters for the outcomes recorded (`mine`); the rest were cancelled or taken over meanwhile."""
        if total > len(mine):
            self.log.warning("%d jobs were cancelled or taken over while they ran; their outcome is dropped",
                             total - len(mine))
        statuses = Counter(o.status for o in mine)
        self._summary.update(statuses)
        result.processed += statuses[Status.COMPLETED]
        result.failed += statuses[Status.FAILED]
        result.retried += statuses[Status.RETRY]
        result.latency_ms += sum(o.ms for o in mine)
        self._count_tenants(mine)
        self._count_metrics(mine)

    def _count_metrics(self, outcomes: list[Outcome]) -> None:
        """Attempts by type, tenant and outcome, and the handlers' durations, for the metrics endpoint."""
        for o in outcomes:
            self.metrics.inc("neurondb_queue_jobs", o.job_type, self.metrics.tenant(o.tenant_id), o.status.label)
            if o.ms:
                self.metrics.observe("neurondb_queue_job_duration_seconds", o.job_type, seconds=o.ms / 1000)

    def _count_tenants(self, outcomes: list[Outcome]) -> None:
        """One pass over the outcomes, one update of shared memory per tenant."""
        per: defaultdict[str, Counter] = defaultdict(Counter)
        latency: defaultdict[str, float] = defaultdict(float)
        for o in outcomes:
            per[o.tenant_id][o.status] += 1
            latency[o.tenant_id] += o.ms
        for tenant, c in per.items():
            self.ctx.shared.tenant_add(tenant, processed=c[Status.COMPLETED], failed=c[Status.FAILED],
                                       retried=c[Status.RETRY],
                                       latency_ms=latency[tenant])

    def _hand_back(self, ids: list[int], delay_ms: float) -> None:
        if ids:
            leases.hand_back(self.conn, TABLE, self.owner, ids, delay_ms)

    def _extend_leases(self, ids: list[int]) -> None:
        if ids:
            leases.extend_leases(self.conn, TABLE, self.owner, ids, self.config.get_float("neuranq_lease_time"))

    def _log_summary(self) -> None:
        """Once per neuranq_log_summary_interval, one INFO line with the outcomes recorded since the last
        one, so that a busy queue shows in the log without a line per job; nothing when nothing happened."""
        interval = self.config.get_seconds("neuranq_log_summary_interval")
        now = time.monotonic()
        if interval > 0 and now - self._summary_since < interval:
            return
        if interval > 0 and self._summary:
            c = self._summary
            self.log.info("in the last %.0f s: %d jobs completed, %d failed, %d retried",
                          now - self._summary_since, c[Status.COMPLETED], c[Status.FAILED], c[Status.RETRY])
        self._summary = Counter()
        self._summary_since = now

    # -- rate limits ----------------------------------------------------------------------------------

    def _allowances(self, batch_size: int) -> tuple[list[str], list[int]]:
        """Tenants the claim must cap, with how many jobs each may start now (whole tokens in its bucket).
        Tenants seen for the first time start with a full bucket: the claim's default share covers them."""
        capped, caps = [], []
        for tenant in self._known_tenants():
            rate, burst = self.rate_of(tenant)
            if rate > 0:
                capped.append(tenant)
                caps.append(min(int(self._tokens(tenant, rate, burst)), batch_size))
        return capped, caps

    def _tokens(self, tenant: str, rate: float, burst: float) -> float:
        return self.ctx.shared.buckets.level(tenant_bucket(tenant), rate, burst)

    def _take_tokens(self, rows: list[tuple]) -> list[tuple]:
        """Spend one token per claimed job; jobs over their tenant's allowance (another process spent it
        first) go back to pending for when the next token is due."""
        keep, over = [], []
        limits: dict[str, tuple[float, float]] = {}   # per tenant of the batch, looked up once
        for row in rows:
            rate, burst = limits.get(row[3]) or limits.setdefault(row[3], self.rate_of(row[3]))
            if rate <= 0 or self.ctx.shared.tenant_take_token(row[3], rate, burst):
                keep.append(row)
            else:
                over.append((row[0], 1000.0 / rate))
        if over:
            self._hand_back([job_id for job_id, _ in over], delay_ms=max(d for _, d in over))
        return keep

    def _plan_wakeup(self) -> None:
        """Nothing runnable now: wake up for the next token of a throttled tenant with work, or the next
        retry, if either comes before the naptime does."""
        waits = []
        throttled = [t for t in self._known_tenants()
                     if self.rate_of(t)[0] > 0 and self._tokens(t, *self.rate_of(t)) < 1]
        if throttled:
            waiting = [r[0] for r in self.conn.execute(query("queue", "pending_tenants"), {"tenants": throttled})]
            waits += [self._refill_wait(t) for t in waiting]
        next_run = self.conn.execute(query("queue", "next_run_at")).fetchone()[0]
        if next_run is not None:
            waits.append(max(next_run.timestamp() - time.time(), 0.0))
        self._wake_at = time.monotonic() + min(waits) if waits else None

    def _refill_wait(self, tenant: str) -> float:
        """Seconds until `tenant` can start a worthwhile batch: about 0.1 s of its rate (within its burst),
        at least one job. Waking for every single token would cost a claim per job and, on a busy machine,
        lose tokens to scheduling delays once the bucket is full."""
        rate, burst = self.rate_of(tenant)
        want = min(burst, max(1.0, rate * 0.1))
        return self.ctx.shared.buckets.peek([Claim(tenant_bucket(tenant), want, rate, burst)])

    def _known_tenants(self) -> set[str]:
        """Tenants seen by any process on this machine (shared memory) or with limits of their own."""
        t = self.ctx.shared.tenants
        return {name.decode() for name in t["tenant"][t["ready"] == 1]} | set(self.tenant_limits)

    def idle_nap(self) -> float:
        nap = self.naptime
        if self._wake_at is not None:
            nap = min(nap, max(self._wake_at - time.monotonic(), 0.001))
            self._wake_at = None
        return nap

    # -- housekeeping ---------------------------------------------------------------------------------

    def _maintenance(self) -> None:
        now = time.monotonic()
        if now < self._next_maintenance:
            return
        self._next_maintenance = now + MAINTENANCE_EVERY
        recovered, failed = leases.recover_expired(self.conn, TABLE, leases.RetryPolicy.of(self.config, TABLE))
        if recovered:
            self.log.warning("recovered %d jobs whose lease expired%s", recovered,
                             f"; {len(failed)} out of retries failed: {failed}" if failed else "")
        self.tenant_limits = {t: (r, b) for t, r, b in self.conn.execute(query("queue", "tenant_limits"))}
        if now >= self._next_retention:
            self._next_retention = now + self._retention_every()
            self._retention()

    def _retention_every(self) -> float:
        return min(RETENTION_EVERY, max(1.0, self.config.get_seconds("job_retention") / 10))

    def _retention(self) -> None:
        """Delete finished jobs past neurondb.job_retention in small batches; one queue process at a time."""
        retention = self.config.get_seconds("job_retention")
        if retention <= 0:
            return
        if not self.conn.execute(query("queue", "retention_lock")).fetchone()[0]:
            return
        try:
            total = 0
            while not self.shutdown:
                n = self.conn.execute(query("queue", "delete_finished"),
                                      {"retention_s": retention, "limit": RETENTION_BATCH}).rowcount
                total += n
                if n < RETENTION_BATCH:
                    break
            if total:
                self.log.info("retention: removed %d finished jobs older than %.0f s", total, retention)
        finally:
            self.conn.execute(query("queue", "retention_unlock"))

    def on_stop(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if self.lane is not None:
            self._stop_lane()
        if self._unsettled:
            try:
                self._settle(BatchResult())
            except psycopg.Error as exc:   # still unreachable: the supervisor hands our jobs back at exit
                self.log.warning("could not record the interrupted batch before stopping: %s", exc)

    def _stop_lane(self) -> None:
        """Stop the async lane (at exit, or when neuranq is turned off). Its waiting jobs go back to pending.
        A smart shutdown lets the running ones finish (each within its timeout; a SIGINT meanwhile cuts it
        short) and records them; a fast one cancels them and hands them back (no attempt counted: we stopped
        them, they did not fail)."""
        lane, self.lane = self.lane, None
        assert lane is not None
        try:
            ids = lane.stop_waiting()
            deadline = time.monotonic() + self.config.get_seconds("neuranq_timeout") + 1.0
            while lane.load and self.shutdown != "fast" and time.monotonic() < deadline:
                lane.wait(LANE_WAIT)
                self._beat()
            ids += lane.abandon()
            self._collect(lane)
            self._hand_back(ids, delay_ms=0)
            self._flush(BatchResult())
        except psycopg.Error as exc:   # unreachable: settled by the next batch, or handed back by the supervisor
            self.log.warning("could not record the async jobs before stopping: %s", exc)
            self._unsettled = True
        finally:
            lane.close()
            self._publish_in_flight()

