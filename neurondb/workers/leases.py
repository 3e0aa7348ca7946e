"""Leases of the job tables, shared by the queue and LLM workers and the supervisor (sql/queries/leases.sql).

A claimed job carries its owner (`host:pid`) and an expiry. It comes back to pending when the supervisor
reaps its owner (at once) or when the expiry passes (a machine lost with its supervisor).
"""

from __future__ import annotations

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
