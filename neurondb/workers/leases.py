"""Lease recovery shared by the two job workers: a job whose lease expired belongs to a process that is gone
(a machine lost with its supervisor), so it goes back to pending and the lost run counts as an attempt."""

from __future__ import annotations

import psycopg

RECOVER_SQL = """
UPDATE {table}
   SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL, run_at = now(),
       retry_count = retry_count + 1,
       attempts = attempts || jsonb_build_array(jsonb_build_object(
           'owner', lease_owner, 'started_at', started_at, 'finished_at', now(),
           'error', 'lease expired: ' || lease_owner || ' stopped renewing it'))
 WHERE status = 'processing' AND lease_expires_at < now()
"""


def recover_expired(conn: psycopg.Connection, table: str) -> int:
    """Return expired leases of `table` to pending; the number recovered."""
    return conn.execute(RECOVER_SQL.format(table=table)).rowcount
