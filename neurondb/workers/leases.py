"""Leases of the job tables, shared by the queue and LLM workers and the supervisor (sql/queries/leases.sql).

A claimed job carries its owner (`host:pid`) and an expiry. It comes back to pending when the supervisor
reaps its owner (at once) or when the expiry passes (a machine lost with its supervisor). The owner itself
extends the leases of the jobs it still holds and hands back the claimed jobs it will not run.

`hand_back` and `extend_leases` take the queue worker's connection or the LLM worker's async one: they
return what `conn.execute` returns, a cursor or an awaitable to await.
"""

from __future__ import annotations

from typing import Any

import psycopg

from neurondb.queries import query

JOB_TABLES = ("neurondb.neurondb_job_queue", "neurondb.neurondb_llm_jobs")


def recover_expired(conn: psycopg.Connection, table: str) -> int:
    """Return expired leases of `table` to pending; the number recovered."""
    return conn.execute(query("leases", "recover_expired").format(table=table)).rowcount


def hand_back_owner(conn: psycopg.Connection, table: str, owner: str, reason: str) -> int:
    """Return the jobs `owner` had claimed in `table` to pending, recording `reason` as the attempt's error."""
    return conn.execute(query("leases", "hand_back_owner").format(table=table),
                        {"owner": owner, "reason": reason}).rowcount


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
