"""neurandefrag's PostgreSQL table maintenance (neurondb/tablemaint.py) against the real server: VACUUM of
a table with many dead tuples, ANALYZE after a bulk COPY, nothing when nothing is due, a lock timeout (or
any statement error) that fails fast and is recorded, the queue tables' VACUUM put off under load, no
VACUUM repeated while an old snapshot keeps the dead tuples, one process at a time, a killed one's
leftovers taken over."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import psycopg
import pytest

from neurondb import tablemaint
from neurondb.queries import query
from neurondb.tablemaint import TableMaintenance, TableResult
from tests.service import wait_for

DIM = 4
VECTORS = "neurondb.neurondb_vectors"
QUEUE = "neurondb.neurondb_job_queue"
STATS_LAG = 15.0     # a backend's counts reach pg_stat at its next flush (forced here, but polled anyway)


@pytest.fixture
def conn(fresh_dsn: str) -> Iterator[psycopg.Connection]:
    """Autovacuum off on the tables the tests fill, so that only the code under test vacuums or analyzes."""
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        for table in ("neurondb_vectors", "neurondb_vector_changes", "neurondb_job_queue"):
            c.execute(f"ALTER TABLE neurondb.{table} SET (autovacuum_enabled = false)")
        c.execute("SELECT neurondb.create_index('docs', %s, 'l2')", (DIM,))
        yield c


@pytest.fixture
def log() -> logging.Logger:
    return logging.getLogger("test.tablemaint")


def load(conn: psycopg.Connection, n: int) -> None:
    with conn.cursor().copy("COPY neurondb.neurondb_vectors (index_name, doc_id, embedding) FROM STDIN") as copy:
        for i in range(n):
            copy.write_row(("docs", f"d{i}", [float(i), 1.0, 2.0, 3.0]))


def stat(conn: psycopg.Connection, table: str, column: str) -> int:
    """A pg_stat_user_tables figure, after asking this backend to send its own pending counts."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    return conn.execute(f"SELECT {column} FROM pg_stat_user_tables WHERE schemaname || '.' || relname = %s",
                        (table,)).fetchone()[0]


def wait_stat(conn: psycopg.Connection, table: str, column: str, at_least: int) -> None:
    wait_for(lambda: stat(conn, table, column) >= at_least, STATS_LAG, f"{table}.{column} >= {at_least} in pg_stat")


def run(tm: TableMaintenance, conn: psycopg.Connection) -> tuple[list[TableResult], int]:
    beats = [0]

    def beat() -> None:
        beats[0] += 1
    return tm.run(conn, beat=beat), beats[0]


def one(results: list[TableResult], table: str) -> TableResult:
    found = [r for r in results if r.table == table]
    assert len(found) == 1, results
    return found[0]


def records(conn: psycopg.Connection, table: str) -> list[tuple]:
    return conn.execute("SELECT operation, status, duration_ms, dead_tuples_removed, details, error_message "
                        "FROM neurondb.neurondb_index_maintenance WHERE table_name = %s ORDER BY maintenance_id",
                        (table,)).fetchall()


def test_vacuum_of_a_table_with_many_dead_tuples_is_recorded(conn: psycopg.Connection, log: logging.Logger) -> None:
    load(conn, 3000)
    conn.execute("DELETE FROM neurondb.neurondb_vectors WHERE id % 3 <> 0")
    wait_stat(conn, VECTORS, "n_dead_tup", 2000)
    results, beats = run(TableMaintenance(log), conn)
    r = one(results, VECTORS)
    assert (r.operation, r.status) == ("vacuum", "completed")
    assert r.dead_tuples_removed >= 2000 and r.after.dead_ratio < 0.1 < 0.5 < r.before.dead_ratio
    assert beats == len(results)
    [(operation, status, duration, removed, details, error)] = records(conn, VECTORS)
    assert (operation, status, removed, error) == ("vacuum", "completed", r.dead_tuples_removed, None)
    assert duration > 0 and details["after"]["dead_ratio"] < details["before"]["dead_ratio"]
    assert stat(conn, VECTORS, "vacuum_count") == 1 and stat(conn, VECTORS, "n_mod_since_analyze") < 1000
    last = {row[:2]: row[2] for row in conn.execute(query("tables", "last_runs")).fetchall()}
    assert last[(VECTORS, "vacuum")] == "completed"
    assert conn.execute("SELECT count(*) FROM neurondb.maintenance_progress").fetchone()[0] == 0


def test_bulk_copy_is_analyzed_and_a_quiet_database_left_alone(conn: psycopg.Connection,
                                                               log: logging.Logger) -> None:
    load(conn, 5000)
    wait_stat(conn, VECTORS, "n_mod_since_analyze", 5000)
    results, _ = run(TableMaintenance(log), conn)
    r = one(results, VECTORS)
    assert (r.operation, r.status, r.before.n_mod_since_analyze) == ("analyze", "completed", 5000)
    assert r.after.n_mod_since_analyze == 0 and stat(conn, VECTORS, "analyze_count") == 1
    assert [row[:2] for row in records(conn, VECTORS)] == [("analyze", "completed")]
    # Nothing changed since: a new instance (no back-off state) finds nothing due and records nothing.
    total = conn.execute("SELECT count(*) FROM neurondb.neurondb_index_maintenance").fetchone()[0]
    assert run(TableMaintenance(log), conn)[0] == []
    assert conn.execute("SELECT count(*) FROM neurondb.neurondb_index_maintenance").fetchone()[0] == total


def test_analyze_skips_the_embedding_column(conn: psycopg.Connection, log: logging.Logger) -> None:
    """No planner statistics for embeddings (migration 018): computing them was most of ANALYZE's work."""
    load(conn, 2000)
    wait_stat(conn, VECTORS, "n_mod_since_analyze", 2000)
    assert one(run(TableMaintenance(log), conn)[0], VECTORS).status == "completed"
    analyzed = {row[0] for row in conn.execute(
        "SELECT attname FROM pg_stats WHERE schemaname = 'neurondb' AND tablename = 'neurondb_vectors'")}
    assert "doc_id" in analyzed and "index_name" in analyzed
    assert "embedding" not in analyzed


def test_a_held_lock_fails_fast_and_is_recorded(conn: psycopg.Connection, fresh_dsn: str,
                                               log: logging.Logger) -> None:
    load(conn, 3000)
    wait_stat(conn, VECTORS, "n_mod_since_analyze", 3000)
    conn.execute("SET statement_timeout = '10s'")     # without lock_timeout: a failure, not a hang
    with psycopg.connect(fresh_dsn) as holder:
        holder.execute("LOCK TABLE neurondb.neurondb_vectors IN ACCESS EXCLUSIVE MODE")
        t0 = time.monotonic()
        results, _ = run(TableMaintenance(log), conn)
        elapsed = time.monotonic() - t0
        holder.rollback()
    assert elapsed < 5.0
    r = one(results, VECTORS)
    assert (r.operation, r.status) == ("analyze", "failed")
    [(_, status, _, _, _, error)] = records(conn, VECTORS)
    assert status == "failed" and "\n" not in error
    assert error.startswith(f"analyze of {VECTORS}: lock not granted within {tablemaint.LOCK_TIMEOUT_MS} ms")
    # The other tables went on: the change log of the same COPY was analyzed.
    assert one(results, "neurondb.neurondb_vector_changes").status == "completed"
    assert conn.execute("SELECT count(*) FROM neurondb.maintenance_progress").fetchone()[0] == 0
    assert conn.execute("SHOW lock_timeout").fetchone()[0] == "0"


def test_any_other_statement_error_is_recorded_and_run_returns(conn: psycopg.Connection, fresh_dsn: str,
                                                               log: logging.Logger,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A statement_timeout (an OperationalError on a connection still usable) is the statement's failure."""
    load(conn, 3000)
    wait_stat(conn, VECTORS, "n_mod_since_analyze", 3000)
    monkeypatch.setattr(tablemaint, "LOCK_TIMEOUT_MS", 0)      # no lock_timeout: the statement_timeout fires
    conn.execute("SET statement_timeout = '300ms'")
    with psycopg.connect(fresh_dsn) as holder:
        holder.execute("LOCK TABLE neurondb.neurondb_vectors IN ACCESS EXCLUSIVE MODE")
        results, _ = run(TableMaintenance(log), conn)
        holder.rollback()
    assert one(results, VECTORS).status == "failed"
    [(_, status, _, _, _, error)] = records(conn, VECTORS)
    assert (status, error) == ("failed", f"analyze of {VECTORS} failed: canceling statement due to statement timeout")


def test_queue_vacuum_is_put_off_under_heavy_load(conn: psycopg.Connection, log: logging.Logger,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    conn.execute("SELECT count(*) FROM neurondb.enqueue_batch('t', array_fill('{}'::jsonb, ARRAY[3000]))")
    conn.execute("DELETE FROM neurondb.neurondb_job_queue")
    conn.execute("SELECT count(*) FROM neurondb.enqueue_batch('t', array_fill('{}'::jsonb, ARRAY[%s]))",
                 (tablemaint.HEAVY_QUEUE_READY,))
    wait_stat(conn, QUEUE, "n_dead_tup", 3000)
    tm = TableMaintenance(log)
    with caplog.at_level(logging.INFO, logger=log.name):
        results, _ = run(tm, conn)
    skipped = [r for r in results if r.table == QUEUE and r.operation == "vacuum"]
    assert [r.status for r in skipped] == ["skipped"] and "ready jobs" in skipped[0].error
    assert f"VACUUM of {QUEUE} put off" in caplog.text
    assert [row[:2] for row in records(conn, QUEUE)] == [("analyze", "completed")]    # ANALYZE still ran
    # The load gone, the VACUUM runs at the next check.
    conn.execute("DELETE FROM neurondb.neurondb_job_queue")
    wait_stat(conn, QUEUE, "n_dead_tup", 3000 + tablemaint.HEAVY_QUEUE_READY)
    r = one(run(tm, conn)[0], QUEUE)
    assert (r.operation, r.status) == ("vacuum", "completed") and r.dead_tuples_removed > 0


def test_vacuum_held_back_by_an_old_snapshot_is_not_repeated(conn: psycopg.Connection, fresh_dsn: str,
                                                             log: logging.Logger,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    load(conn, 3000)
    tm = TableMaintenance(log)
    with psycopg.connect(fresh_dsn) as holder:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT 1")     # the snapshot that still sees the rows deleted next
        conn.execute("DELETE FROM neurondb.neurondb_vectors WHERE id % 3 <> 0")
        wait_stat(conn, VECTORS, "n_dead_tup", 2000)
        with caplog.at_level(logging.WARNING, logger=log.name):
            first = one(run(tm, conn)[0], VECTORS)
            assert (first.operation, first.status, first.dead_tuples_removed) == ("vacuum", "completed", 0)
            assert [r for r in run(tm, conn)[0] if r.table == VECTORS] == []
        holder.rollback()
    assert caplog.text.count(f"VACUUM of {VECTORS} left") == 1
    assert [row[:2] for row in records(conn, VECTORS)] == [("vacuum", "completed")]



def test_one_process_at_a_time_and_a_killed_ones_leftovers_taken_over(conn: psycopg.Connection, fresh_dsn: str,
                                                                     log: logging.Logger) -> None:
    conn.execute("INSERT INTO neurondb.neurondb_maintenance_progress (target, kind, operation, phase, pid) "
                 "VALUES (%s, 'table', 'vacuum', 'vacuuming', 0)", (VECTORS,))
    conn.execute("INSERT INTO neurondb.neurondb_index_maintenance (table_name, operation) VALUES (%s, 'vacuum')",
                 (VECTORS,))
    load(conn, 3000)
    wait_stat(conn, VECTORS, "n_mod_since_analyze", 3000)
    tm = TableMaintenance(log)
    with psycopg.connect(fresh_dsn, autocommit=True) as other:
        assert other.execute(query("tables", "try_lock")).fetchone()[0]
        assert run(tm, conn)[0] == []
        assert conn.execute("SELECT count(*) FROM neurondb.maintenance_progress").fetchone()[0] == 1
    results = wait_for(lambda: run(tm, conn)[0], 5.0, "the lock to be free")    # released as `other` exits
    assert one(results, VECTORS).operation == "analyze"
    assert [row[:2] for row in records(conn, VECTORS)] == [("vacuum", "interrupted"), ("analyze", "completed")]
    assert conn.execute("SELECT count(*) FROM neurondb.maintenance_progress").fetchone()[0] == 0
