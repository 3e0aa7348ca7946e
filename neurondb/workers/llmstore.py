"""The LLM worker's database side, on its own async connection: claims, cache lookups, lease renewals, and
the writes that wait to be flushed (outcomes, hand-backs, cache entries), all of a flush in one transaction.

The connection is in autocommit (a claim commits at once) and runs in the worker's event loop, so answers
keep arriving while a statement waits for the server; no transaction is ever open across a provider call.
Outcomes are written only for jobs still leased to this worker (`owner`): the statements check the lease.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg.types.json import set_json_loads

from neurondb.db import json_loads
from neurondb.queries import query
from neurondb.workers import leases
from neurondb.workers.leases import MAX_ERROR, Status
from neurondb.workers.llmjobs import Job, Outcome, as_int

TABLE = leases.LLM_TABLE


def json_rows(rows: list[dict[str, Any]]) -> str:
    """A batch of rows as one JSON array for jsonb_to_recordset; numpy vectors as arrays of float32 digits."""
    return orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY).decode()


@dataclass
class Flushed:
    """What one flush wrote, for the worker's books."""

    outcomes: list[Outcome]
    hand_backs: dict[int, float]    # job_id -> delay_ms
    cache_entries: int
    at: float                       # time.monotonic() when it began


class LLMStore:
    def __init__(self, dsn: str, application_name: str, owner: str, log: logging.Logger) -> None:
        self.dsn = dsn
        self.application_name = application_name[:63]
        self.owner = owner
        self.log = log
        self.outcomes: list[Outcome] = []              # decided, not yet written (in order)
        self.hand_backs: dict[int, float] = {}          # job_id -> delay_ms: claimed jobs going back unrun
        self._cache_puts: dict[str, dict[str, Any]] = {}
        self._conn: psycopg.AsyncConnection | None = None

    # -- the connection -------------------------------------------------------------------------------

    async def connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, application_name=self.application_name)
            # No server-side prepared statements: psycopg prepares a query after 5 runs, and PostgreSQL's
            # generic plan for the batch updates (a join with unnest() of any length) was a nested loop
            # that took 7 s for 2,000 outcomes where the custom plan takes 0.5 s.
            self._conn.prepare_threshold = None
            set_json_loads(json_loads, self._conn)    # cached vectors come back as JSON
        return self._conn

    async def close(self) -> None:
        """Close the connection (a lost one, or at stop); the next statement opens a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):    # it is gone either way
                await conn.close()

    # -- reads and lease renewals ---------------------------------------------------------------------

    async def claim(self, batch: int, lease_ms: float, throttled: list[str]) -> list[tuple]:
        """Up to `batch` runnable jobs leased to us for `lease_ms`, none of the `throttled` tenants."""
        conn = await self.connection()
        cur = await conn.execute(query("llm", "claim"), {"batch": batch, "owner": self.owner, "lease_ms": lease_ms,
                                                         "throttled": throttled})
        return await cur.fetchall()

    async def cache_get(self, keys: list[str]) -> dict[str, tuple]:
        """The cache rows of `keys` found, by key."""
        conn = await self.connection()
        cur = await conn.execute(query("llm", "cache_get"), {"keys": keys})
        return {r[0]: r for r in await cur.fetchall()}

    async def extend_leases(self, ids: list[int], lease_ms: float) -> None:
        conn = await self.connection()
        await leases.extend_leases(conn, TABLE, self.owner, ids, lease_ms)

    # -- writes waiting for the next flush ------------------------------------------------------------

    @property
    def pending(self) -> bool:
        return bool(self.outcomes or self.hand_backs or self._cache_puts)

    def put_cache(self, job: Job, key: str, *, text: str | None = None, vector: Any = None, json: Any = None,
                  prompt_tokens: float | None = None, completion_tokens: int | None = None) -> None:
        if job.route is None:
            return
        self._cache_puts[key] = {
            "cache_key": key, "operation": job.operation, "provider": job.route.provider,
            "model_name": job.route.model, "result_text": text, "result_vector": vector, "result_json": json,
            "prompt_tokens": as_int(prompt_tokens), "completion_tokens": as_int(completion_tokens)}

    async def flush(self, cache_ttl_s: float) -> Flushed | None:
        """Every waiting outcome, hand-back and cache entry in one transaction (None: nothing waited). On a
        lost connection nothing was written: everything waits for the flush after the reconnection."""
        if not self.pending:
            return None
        outcomes, self.outcomes = self.outcomes, []
        hand_backs, self.hand_backs = self.hand_backs, {}
        puts, self._cache_puts = list(self._cache_puts.values()), {}
        conn = await self.connection()
        now = time.monotonic()
        try:
            async with conn.transaction():
                await self._write(conn, outcomes, hand_backs, puts, now, cache_ttl_s)
        except psycopg.OperationalError:
            self.outcomes = outcomes + self.outcomes
            self._cache_puts = {p["cache_key"]: p for p in puts} | self._cache_puts
            self.hand_backs.update(hand_backs)
            raise
        except psycopg.Error as exc:
            # A value the database refuses (it should not happen): record each job on its own, so only
            # the one at fault fails, with the reason.
            self.log.error("writing %d LLM outcomes failed, writing them one by one: %s", len(outcomes), exc)
            for o in outcomes:
                try:
                    async with conn.transaction():
                        await self._write(conn, [o], {}, [], now, cache_ttl_s)
                except psycopg.OperationalError:
                    raise
                except psycopg.Error as one:
                    o2 = Outcome(o.job, Status.FAILED, o.at, error=f"storing the result failed: {one}"[:MAX_ERROR],
                                 latency_ms=o.latency_ms)
                    async with conn.transaction():
                        await self._write(conn, [o2], {}, [], now, cache_ttl_s)
            if hand_backs:
                async with conn.transaction():
                    await self._write(conn, [], hand_backs, [], now, cache_ttl_s)
        return Flushed(outcomes, hand_backs, len(puts), now)

    async def _write(self, conn: psycopg.AsyncConnection, outcomes: list[Outcome], hand_backs: dict[int, float],
                     puts: list[dict[str, Any]], now: float, cache_ttl_s: float) -> None:
        split = leases.partition(outcomes)
        if split.completed:
            await conn.execute(query("llm", "complete"), {"owner": self.owner, "rows": json_rows([{
                "job_id": o.job.job_id, "provider": o.job.route.provider if o.job.route else None,
                "model": o.job.route.model if o.job.route else None, "result_text": o.text,
                "result_vector": o.vector, "result_json": o.json, "cache_hit": o.cache_hit,
                "latency_ms": o.latency_ms, "prompt_tokens": as_int(o.prompt_tokens),
                "completion_tokens": as_int(o.completion_tokens)} for o in split.completed])})
        if split.retry:
            await conn.execute(query("llm", "retry"), {"owner": self.owner, "rows": json_rows([{
                "job_id": o.job.job_id, "error": o.error, "delay_ms": o.delay_ms, "ago_ms": (now - o.at) * 1000}
                for o in split.retry])})
        if split.failed:
            await conn.execute(query("llm", "fail"), {"owner": self.owner, "rows": json_rows([{
                "job_id": o.job.job_id, "error": o.error, "provider": o.job.route.provider if o.job.route else None,
                "latency_ms": o.latency_ms if o.job.calls else None, "ago_ms": (now - o.at) * 1000}
                for o in split.failed])})
        for delay in sorted(set(hand_backs.values())):
            await leases.hand_back(conn, TABLE, self.owner, [j for j, d in hand_backs.items() if d == delay], delay)
        if puts:
            await conn.execute(query("llm", "cache_put"), {"ttl_s": cache_ttl_s, "rows": json_rows(puts)})
