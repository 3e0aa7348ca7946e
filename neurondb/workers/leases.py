"""Leases of the job tables, shared by the queue and LLM workers and the supervisor (sql/queries/leases.sql).

A claimed job carries its owner (`host:pid`) and an expiry. It comes back when the supervisor reaps its
owner (at once) or when the expiry passes (a machine lost with its supervisor): `release`. Only the attempt
that was under way counts then (the worker lists it in its shared-memory slot, see shm.control.RunningJobs),
and a job past its retry limit ends failed (the queue's with a dead-letter row) instead of running again:
a job that kills its worker every time stops after its retries. The owner itself extends the leases of
the jobs it still holds and hands back the claimed jobs it will not run.

`hand_back` and `extend_leases` take the queue worker's connection or the LLM worker's async one: they
return what `conn.execute` returns, a cursor or an awaitable to await.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from neurondb.queries import query
from neurondb.settings import Config

QUEUE_TABLE = "neurondb.neurondb_job_queue"
LLM_TABLE = "neurondb.neurondb_llm_jobs"
JOB_TABLES = (QUEUE_TABLE, LLM_TABLE)
_SETTINGS = {QUEUE_TABLE: "neuranq", LLM_TABLE: "neuranllm"}   # prefix of each table's retry settings


@dataclass(frozen=True)
class RetryPolicy:
    """What a released attempt is measured against: the default limit (a job's max_retries overrides it)
    and the backoff before it runs again."""

    max_retries: int
    delay_ms: float
    max_delay_ms: float

    @classmethod
    def of(cls, config: Config, table: str) -> RetryPolicy:
        prefix = f"neurondb.{_SETTINGS[table]}"
        return cls(int(config.get(f"{prefix}_max_retries")), float(config.get(f"{prefix}_retry_delay")),
                   float(config.get(f"{prefix}_retry_max_delay")))


def release(conn: psycopg.Connection, table: str, policy: RetryPolicy, owner: str | None,
            ran: list[int] | None, reason: str | None) -> tuple[int, list[int]]:
    """Bring back the jobs of `owner` (None: every job whose lease expired); those in `ran` (None: all)
    count an attempt with error `reason` (None: the expired lease). Returns (jobs released, ids of those
    that ended failed, past their limit); the queue's failed jobs get their dead-letter rows at once."""
    with conn.transaction():
        rows = conn.execute(query("leases", "release").format(table=table), {
            "owner": owner, "ran": ran, "reason": reason, "max_retries": policy.max_retries,
            "delay_ms": policy.delay_ms, "max_delay_ms": policy.max_delay_ms}).fetchall()
        failed = [job_id for job_id, status in rows if status == "failed"]
        if failed and table == QUEUE_TABLE:
            conn.execute(query("queue", "dead_letter"), {"ids": failed})
    return len(rows), failed


def recover_expired(conn: psycopg.Connection, table: str, policy: RetryPolicy) -> tuple[int, list[int]]:
    """Expired leases of `table` back to pending, each counting its lost attempt; see `release`."""
    return release(conn, table, policy, None, None, None)


def hand_back_unheld(conn: psycopg.Connection, table: str, owner: str, held: list[int]) -> int:
    """After a lost connection: return the jobs leased to `owner` that it does not hold (`held`) to pending,
    no attempt counted; the number returned."""
    return conn.execute(query("leases", "hand_back_unheld").format(table=table),
                        {"owner": owner, "held": held}).rowcount


def hand_back(conn: psycopg.Connection | psycopg.AsyncConnection, table: str, owner: str, ids: list[int],
              delay_ms: float) -> Any:
    """Return claimed jobs `ids` that never ran to pending, no attempt counted, not before `delay_ms` from now."""
    return conn.execute(query("leases", "hand_back").format(table=table),
                        {"ids": ids, "owner": owner, "delay_ms": delay_ms})


def extend_leases(conn: psycopg.Connection | psycopg.AsyncConnection, table: str, owner: str, ids: list[int],
                  lease_ms: float) -> Any:
    """Keep the jobs `ids` that `owner` still holds for another `lease_ms`."""
    return conn.execute(query("leases", "extend_leases").format(table=table),
                        {"ids": ids, "owner": owner, "lease_ms": lease_ms})
