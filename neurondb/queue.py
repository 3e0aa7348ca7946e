"""The queue from the application's side: enqueue, inspect, cancel, retry, dead letters.

Thin functions over the named queries in `sql/queries/queue.sql`; the same operations exist in SQL
(`neurondb.enqueue`, `neurondb.enqueue_batch`) and on the command line (`neurondb jobs ...`)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from neurondb.queries import query

# The statuses of a job (queue and LLM tables), as their CHECK constraints allow them, in display order.
JOB_STATUSES = ("pending", "processing", "completed", "failed", "cancelled")


def enqueue(conn: psycopg.Connection, job_type: str, payload: dict | None = None, *, tenant_id: str = "default",
            priority: int = 0, run_at: datetime | None = None, max_retries: int | None = None,
            dedupe_key: str | None = None) -> int:
    """Enqueue one job; its id (with a dedupe key, the id of the pending duplicate it merged into)."""
    return conn.execute(query("queue", "enqueue"), {
        "job_type": job_type, "payload": Jsonb(payload or {}), "tenant_id": tenant_id, "priority": priority,
        "run_at": run_at, "max_retries": max_retries, "dedupe_key": dedupe_key,
    }).fetchone()[0]


def enqueue_many(conn: psycopg.Connection, job_type: str, payloads: Iterable[dict], *,
                 tenant_id: str = "default", priority: int = 0, run_at: datetime | None = None,
                 max_retries: int | None = None) -> list[int]:
    """Enqueue many jobs of one type in one statement (one round trip, one NOTIFY); ids in input order."""
    rows = conn.execute(query("queue", "enqueue_batch"), {
        "job_type": job_type, "payloads": [Jsonb(p) for p in payloads], "tenant_id": tenant_id,
        "priority": priority, "run_at": run_at, "max_retries": max_retries,
    }).fetchall()
    return [r[0] for r in rows]


def get(conn: psycopg.Connection, job_id: int) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("queue", "job"), {"job_id": job_id}).fetchone()


def list_jobs(conn: psycopg.Connection, *, status: str | None = None, job_type: str | None = None,
              tenant_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("queue", "list_jobs"), {"status": status, "job_type": job_type,
                                                         "tenant_id": tenant_id, "limit": limit}).fetchall()


def cancel(conn: psycopg.Connection, job_id: int) -> bool:
    """Cancel a pending or running job (it ends `cancelled`, 'cancelled by <role>'); False if already finished."""
    return conn.execute(query("queue", "cancel"), {"job_id": job_id}).fetchone() is not None


def retry(conn: psycopg.Connection, job_id: int) -> bool:
    """Run a failed or cancelled job again with fresh retries, a dead letter of it marked replayed; False if it
    is neither."""
    return conn.execute(query("queue", "retry_job"), {"job_id": job_id}).fetchone() is not None


def dlq_list(conn: psycopg.Connection, *, job_type: str | None = None, tenant_id: str | None = None,
             include_replayed: bool = False, limit: int = 50) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("queue", "dlq_list"), {"job_type": job_type, "tenant_id": tenant_id,
                                                        "all": include_replayed, "limit": limit}).fetchall()


def dlq_replay(conn: psycopg.Connection, *, job_type: str | None = None, tenant_id: str | None = None,
               dlq_ids: list[int] | None = None, limit: int = 1000) -> list[tuple[int, int]]:
    """Re-enqueue matching dead letters as new jobs; (dlq_id, new job_id) pairs."""
    return [tuple(r) for r in conn.execute(query("queue", "dlq_replay"), {
        "job_type": job_type, "tenant_id": tenant_id, "ids": dlq_ids, "limit": limit}).fetchall()]
