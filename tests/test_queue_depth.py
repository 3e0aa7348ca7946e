"""neurondb.neuranq_queue_depth: an exact bound on pending jobs, checked in O(1) per statement by a counter
the queue table's triggers keep (sql/015_queue_pending_counter.sql). After every step below the counter
equals the real count of pending rows."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import orjson
import psycopg
import pytest

from neurondb import queue
from neurondb.migrate import BOOTSTRAP, RECORD, available, migrate
from neurondb.queries import query
from neurondb.status import pid_alive
from neurondb.workers import leases
from tests.service import Service, wait_for

JOBS = {"neurondb.neuranq_job_modules": "tests.jobtypes"}
TABLE = "neurondb.neurondb_job_queue"


def set_depth(conn: psycopg.Connection, depth: int) -> None:
    """What the supervisor publishes, without a supervisor."""
    conn.execute("INSERT INTO neurondb.neurondb_settings (name, setting, short_desc, context, vartype, source)"
                 " VALUES ('neurondb.neuranq_queue_depth', %s, 'test', 'sighup', 'integer', 'test')"
                 " ON CONFLICT (name) DO UPDATE SET setting = EXCLUDED.setting", (str(depth),))


def pending(conn: psycopg.Connection) -> int:
    return conn.execute(f"SELECT count(*) FROM {TABLE} WHERE status = 'pending'").fetchone()[0]


def assert_counted(conn: psycopg.Connection) -> int:
    """The counter equals the real number of pending rows; returns it."""
    real = pending(conn)
    assert conn.execute("SELECT neurondb.pending_jobs()").fetchone()[0] == real
    return real


def test_bulk_enqueue_over_the_default_fails_whole_naming_the_setting(conn: psycopg.Connection) -> None:
    """The document's default (10,000) stays: a 20k bulk enqueue is refused as a whole, and the error says
    which setting to raise and how."""
    queue.enqueue_many(conn, "test.noop", [{}] * 5)
    with pytest.raises(psycopg.errors.ProgramLimitExceeded) as refused:
        queue.enqueue_many(conn, "test.noop", [{"i": i} for i in range(20_000)])
    message = str(refused.value).splitlines()[0]
    assert "20005 pending jobs exceed neurondb.neuranq_queue_depth = 10000" in message
    assert "5 pending before this statement" in message
    assert "raise neurondb.neuranq_queue_depth" in message and "neurondb config set" in message
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match=r"raise neurondb\.neuranq_queue_depth"):
        conn.execute(f"INSERT INTO {TABLE} (job_type) SELECT 'test.noop' FROM generate_series(1, 20000)")
    assert assert_counted(conn) == 5


def test_upgrade_counts_the_jobs_already_queued(pg_admin_dsn: str) -> None:
    """Migration 015 on a database that already holds jobs starts the counter at their real count."""
    name = f"nd_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(psycopg.conninfo.make_conninfo(pg_admin_dsn, dbname=name), autocommit=True) as c:
            for statement in BOOTSTRAP:
                c.execute(statement)
            for m in (m for m in available() if m.version < "015"):
                with c.transaction():
                    c.execute(m.sql)
                    c.execute(RECORD, (m.version, m.checksum))
            c.execute(f"INSERT INTO {TABLE} (job_type, status, lease_owner, lease_expires_at, completed_at) "
                      "SELECT 'test.noop', s, 'h:1', now(), now() FROM unnest(ARRAY['pending', 'pending', "
                      "'pending', 'processing', 'completed']) AS s")
            assert "015_queue_pending_counter" in migrate(c)
            assert assert_counted(c) == 3
    finally:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_bound_is_exact_with_four_concurrent_producers(conn: psycopg.Connection, fresh_dsn: str) -> None:
    """Four producers insert batches of 10 until refused: the queue ends at the bound exactly, never above."""
    depth, batch = 600, 10
    set_depth(conn, depth)
    refused: list[str] = []
    start = threading.Barrier(4)

    def producer(k: int) -> None:
        with psycopg.connect(fresh_dsn, autocommit=True) as c:
            start.wait()
            while True:
                try:
                    if k % 2:    # plain SQL and the enqueue function: both are bounded
                        c.execute(f"INSERT INTO {TABLE} (job_type) SELECT 'test.noop' FROM generate_series(1, %s)",
                                  (batch,))
                    else:
                        queue.enqueue_many(c, "test.noop", [{"k": k}] * batch)
                except psycopg.errors.ProgramLimitExceeded as exc:
                    refused.append(str(exc))
                    return

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(refused) == 4
    assert assert_counted(conn) == depth
    assert all(f"{depth + batch} pending jobs exceed" in r for r in refused), refused


def test_counter_follows_every_change_of_status(conn: psycopg.Connection) -> None:
    """Inserts, rolled-back inserts, dedupe merges, claims, hand-backs, completions, cancel and retry,
    deletes, COPY and TRUNCATE: after each, the counter is the real count."""
    ids = queue.enqueue_many(conn, "test.noop", [{}] * 30)
    assert assert_counted(conn) == 30
    with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
        queue.enqueue_many(conn, "test.noop", [{}] * 10)
        conn.execute("SELECT 1 / 0")
    assert assert_counted(conn) == 30
    queue.enqueue(conn, "test.noop", dedupe_key="k")
    queue.enqueue(conn, "test.noop", dedupe_key="k")          # merged: ON CONFLICT DO UPDATE
    assert assert_counted(conn) == 31
    conn.execute(f"UPDATE {TABLE} SET status = 'processing', lease_owner = 'x', lease_expires_at = now() "
                 "WHERE job_id = ANY(%s)", (ids[:20],))      # a claim
    assert assert_counted(conn) == 11
    conn.execute(f"UPDATE {TABLE} SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL "
                 "WHERE job_id = ANY(%s)", (ids[:5],))       # handed back
    conn.execute(f"UPDATE {TABLE} SET status = 'completed', completed_at = now() WHERE job_id = ANY(%s)",
                 (ids[5:20],))                               # completed: pending unchanged
    conn.execute(f"UPDATE {TABLE} SET priority = 3 WHERE status = 'pending'")
    assert assert_counted(conn) == 16
    assert queue.cancel(conn, ids[0]) and queue.retry(conn, ids[0])
    assert queue.cancel(conn, ids[1])
    assert assert_counted(conn) == 15
    conn.execute(f"DELETE FROM {TABLE} WHERE job_id = ANY(%s)", (ids[2:8],))   # pending and completed ones
    assert assert_counted(conn) == 12
    with conn.cursor().copy(f"COPY {TABLE} (job_type) FROM STDIN") as copy:
        for _ in range(7):
            copy.write_row(("test.noop",))
    assert assert_counted(conn) == 19
    conn.execute(f"TRUNCATE {TABLE}")
    assert assert_counted(conn) == 0
    queue.enqueue_many(conn, "test.noop", [{}] * 3)
    assert assert_counted(conn) == 3


def test_counter_follows_neuranqs_own_status_changes(conn: psycopg.Connection) -> None:
    """The worker's and the supervisor's statements: claim, retry, fail, complete, release, hand back."""
    ids = queue.enqueue_many(conn, "test.noop", [{}] * 12)
    owner, policy = "h:1", leases.RetryPolicy(max_retries=3, delay_ms=0.0, max_delay_ms=0.0)

    def claim() -> list[int]:
        return [r[0] for r in conn.execute(query("queue", "claim"), {
            "batch": 100, "owner": owner, "lease_ms": 60000.0, "salt": "s", "capped": [], "caps": []})]

    assert sorted(claim()) == ids and assert_counted(conn) == 0
    conn.execute(query("queue", "retry"), {"owner": owner, "ids": ids[:3], "errors": ["e"] * 3,
                                           "delays_ms": [0.0] * 3})
    conn.execute(query("queue", "fail"), {"owner": owner, "ids": ids[3:5], "errors": ["e"] * 2})
    done = orjson.dumps([[i, {}] for i in ids[5:7]]).decode()
    conn.execute(query("queue", "complete"), {"owner": owner, "done": done})
    leases.hand_back(conn, TABLE, owner, ids[7:9], 0.0)
    assert assert_counted(conn) == 5
    assert leases.release(conn, TABLE, policy, owner, ids[9:10], "killed")[0] == 3   # 9 retried, 10-11 back
    assert assert_counted(conn) == 8
    assert sorted(claim()) == [*ids[:3], *ids[7:12]] and assert_counted(conn) == 0
    assert leases.hand_back_unheld(conn, TABLE, owner, []) == 8
    assert assert_counted(conn) == 8


def test_counter_exact_after_the_service_is_killed_mid_enqueue(tmp_path: Path, fresh_dsn: str,
                                                              conn: psycopg.Connection) -> None:
    """Producers insert while the workers claim and complete; the supervisor and its workers are SIGKILLed
    in the middle, the producers' own connections cut mid-transaction; after a restart the counter is the
    real count, and the restarted service drains the queue to zero on both."""
    svc = Service(tmp_path / "data", fresh_dsn, {**JOBS, "neurondb.neuranq_batch_size": "20",
                                                 "neurondb.neuranq_queue_depth": "100000"})
    svc.start()
    stop = threading.Event()
    backends: list[int] = []

    def producer() -> None:
        with psycopg.connect(fresh_dsn) as c:   # explicit transactions: some die half-done
            backends.append(c.info.backend_pid)
            while not stop.is_set():
                try:
                    queue.enqueue_many(c, "test.sleep", [{"seconds": 0.001}] * 20)
                    c.commit()
                except psycopg.OperationalError:
                    return

    threads = [threading.Thread(target=producer) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: conn.execute(f"SELECT count(*) FROM {TABLE} WHERE status = 'completed'").fetchone()[0]
                 > 100, 20.0, "the workers to complete jobs while producers insert")
        workers = [w.pid for w in svc.status().workers if w.pid]
        os.kill(svc.supervisor_pid, signal.SIGKILL)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (backends,))
        stop.set()
        for t in threads:
            t.join(10)
        wait_for(lambda: not any(pid_alive(p) for p in workers), 5.0, "the killed workers to be gone")
        assert_counted(conn)
        svc.start()
        wait_for(lambda: pending(conn) == 0 and conn.execute(
            f"SELECT count(*) = 0 FROM {TABLE} WHERE status = 'processing'").fetchone()[0], 60.0, "the drain")
        time.sleep(0.1)
        assert assert_counted(conn) == 0
    finally:
        stop.set()
        svc.close()


def test_recount_repairs_a_counter_bypassed_by_disabled_triggers(conn: psycopg.Connection) -> None:
    queue.enqueue_many(conn, "test.noop", [{}] * 4)
    conn.execute(f"ALTER TABLE {TABLE} DISABLE TRIGGER USER")
    conn.execute(f"INSERT INTO {TABLE} (job_type) SELECT 'test.noop' FROM generate_series(1, 6)")
    conn.execute(f"ALTER TABLE {TABLE} ENABLE TRIGGER USER")
    assert conn.execute("SELECT neurondb.pending_jobs()").fetchone()[0] == 4
    assert conn.execute("SELECT neurondb.recount_pending_jobs()").fetchone()[0] == 10
    assert assert_counted(conn) == 10


def test_overlapping_repeatable_read_producers_get_a_serialization_failure(conn: psycopg.Connection,
                                                                           fresh_dsn: str) -> None:
    """Exactness needs producers in turn; a snapshot transaction cannot take its turn after another one
    changed the counter, so it fails with a retryable error instead of overshooting."""
    with psycopg.connect(fresh_dsn) as first, psycopg.connect(fresh_dsn) as second:
        for c in (first, second):
            c.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            c.execute("SELECT 1")    # both snapshots taken now
        queue.enqueue_many(first, "test.noop", [{}] * 2)
        failure: list[BaseException] = []

        def enqueue_second() -> None:
            try:
                queue.enqueue_many(second, "test.noop", [{}] * 3)
            except psycopg.Error as exc:
                failure.append(exc)

        t = threading.Thread(target=enqueue_second)
        t.start()
        time.sleep(0.3)              # it waits for the first producer's turn to end
        first.commit()
        t.join(10)
        assert len(failure) == 1 and isinstance(failure[0], psycopg.errors.SerializationFailure)
    assert assert_counted(conn) == 2
