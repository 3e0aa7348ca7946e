"""neurandefrag's PostgreSQL table maintenance (the document's VACUUM and ANALYZE, issue 11): decide from
pg_stat_user_tables which tables of the `neurondb` schema need a VACUUM (ANALYZE) or an ANALYZE, run it
without ever waiting long for a lock, and record each operation in neurondb_index_maintenance.

Autovacuum does the same work, but it looks at a table at most once per autovacuum_naptime (1 min) and with
its own thresholds; a bulk COPY into a new index's neurondb_vectors rows then leaves searches on a plan made
without statistics until it wakes up (scripts/bench_analyze.py: the `hits` fetch of 10 rows after a
29k-vector COPY, 1.0 ms before ANALYZE, 0.13 ms after). Checked every CHECK_EVERY seconds instead, with
these thresholds:

- VACUUM (ANALYZE) when the dead ratio (n_dead_tup / (n_live_tup + n_dead_tup), the document's fragmentation
  query) is at least VACUUM_DEAD_RATIO (0.2, autovacuum's default scale factor: below it dead rows cost
  scans little) and there are at least VACUUM_MIN_DEAD dead tuples (1000: a small table is cheap to scan
  whatever its ratio, and autovacuum covers it).
- ANALYZE when n_mod_since_analyze is at least max(ANALYZE_MIN_CHANGES, ANALYZE_FRACTION * n_live_tup): a
  tenth of the table changed (autovacuum's default analyze scale factor) and at least 1000 rows, so small
  hot tables (settings, worker status) are left to autovacuum.
- Not the same operation on the same table again within REPEAT_AFTER (60 s), also after a lock timeout: a
  hot queue table, whose own autovacuum settings are aggressive, would else be processed every check.
- A VACUUM that leaves the table as due as before (its dead tuples are still needed by an older snapshot: a
  long transaction, an idle-in-transaction session, a replication slot) is not repeated before
  VACUUM_BACKOFF (5 min), and this is logged once until a VACUUM succeeds on that table again.
- Heavy queue load: while at least HEAVY_QUEUE_READY jobs are ready to run (pending, run_at passed) in
  neurondb_job_queue and neurondb_llm_jobs together (1000: ten claims of the default neuranq_batch_size
  behind), the queue workers are behind and a VACUUM scanning those two tables' heap and indexes would
  compete with their claims for I/O and buffers: it is put off (an ANALYZE, cheap, still runs if due). Put
  off is not recorded in neurondb_index_maintenance (nothing ran): it is logged once per episode and
  returned as a 'skipped' TableResult.

Each statement runs with lock_timeout = LOCK_TIMEOUT_MS (200 ms): VACUUM and ANALYZE take a SHARE UPDATE
EXCLUSIVE lock, which no job claim or insert conflicts with, but a DDL statement, another VACUUM
(autovacuum's) or an explicit LOCK TABLE does; then the operation fails fast, is recorded as failed with a
one-line message (so is any other error of the statement), and the other tables go on. lock_timeout bounds
only the wait for the lock: the statement itself runs in the caller's process, on its connection, for as
long as the table takes. While it runs, its row in neurondb.maintenance_progress (kind 'table') names the
backend pid, whose pg_stat_progress_vacuum / pg_stat_progress_analyze row shows the blocks done. pg_stat
figures lag: a backend sends its counts at transaction end, at most once a second (up to 10 s later when it
goes idle in between), so a change shows here a little late. One process per database maintains the tables
at a time (an advisory lock: several installations may share the database); the one that takes over marks a
killed predecessor's operations 'interrupted'.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from neurondb.queries import query

CHECK_EVERY = 10.0
VACUUM_DEAD_RATIO = 0.2
VACUUM_MIN_DEAD = 1000
ANALYZE_MIN_CHANGES = 1000
ANALYZE_FRACTION = 0.1
LOCK_TIMEOUT_MS = 200
REPEAT_AFTER = 60.0
VACUUM_BACKOFF = 300.0
HEAVY_QUEUE_READY = 1000
QUEUE_TABLES = frozenset({"neurondb_job_queue", "neurondb_llm_jobs"})

STATEMENTS = {"vacuum": sql.SQL("VACUUM (ANALYZE) {}"), "analyze": sql.SQL("ANALYZE {}")}


@dataclass
class TableStats:
    """One row of pg_stat_user_tables (query tables.table_stats)."""

    target: str              # schema-qualified name
    relname: str
    n_live_tup: int
    n_dead_tup: int
    dead_ratio: float
    n_mod_since_analyze: int

    def figures(self) -> dict[str, float]:
        return {"n_live_tup": self.n_live_tup, "n_dead_tup": self.n_dead_tup, "dead_ratio": self.dead_ratio,
                "n_mod_since_analyze": self.n_mod_since_analyze}

    def vacuum_due(self) -> bool:
        return self.n_dead_tup >= VACUUM_MIN_DEAD and self.dead_ratio >= VACUUM_DEAD_RATIO

    def analyze_due(self) -> bool:
        return self.n_mod_since_analyze >= max(ANALYZE_MIN_CHANGES, ANALYZE_FRACTION * self.n_live_tup)


@dataclass
class TableResult:
    """What run() did to one table. status: 'completed' or 'failed' (recorded), or 'skipped' (a VACUUM put
    off for queue load: not recorded). operation 'vacuum' is a VACUUM (ANALYZE)."""

    table: str
    operation: str
    status: str
    before: TableStats
    after: TableStats | None = None
    duration_ms: float | None = None
    dead_tuples_removed: int | None = None
    error: str | None = None


def first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class TableMaintenance:
    """The table part of neurandefrag's cycle: call run() when due(); keeps only back-off state between
    runs (per process: a new worker starts with none, which costs at most one extra operation per table)."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._next_check = 0.0
        self._not_before: dict[tuple[str, str], float] = {}    # (table, operation) -> time.monotonic()
        self._stuck_logged: set[str] = set()
        self._put_off_logged: set[str] = set()

    def due(self, now: float) -> bool:
        """Time for a check; `now` is time.monotonic()."""
        return now >= self._next_check

    def run(self, conn: psycopg.Connection, *, beat: Callable[[], None]) -> list[TableResult]:
        """Check the tables and run what is due, calling beat() after each operation. `conn` must be in
        autocommit mode (VACUUM cannot run in a transaction block). A lock timeout is recorded and
        returned, never raised, and so is any other error of the statement itself (a statement_timeout,
        say); a lost connection (psycopg.OperationalError with the connection broken) propagates."""
        self._next_check = time.monotonic() + CHECK_EVERY
        if not conn.execute(query("tables", "try_lock")).fetchone()[0]:
            return []       # another process maintains this database's tables
        try:
            conn.execute(query("tables", "take_over"))
            return self._check(conn, beat)
        finally:
            if not conn.broken:
                conn.execute(query("tables", "unlock"))

    def _check(self, conn: psycopg.Connection, beat: Callable[[], None]) -> list[TableResult]:
        results: list[TableResult] = []
        ready: int | None = None          # jobs ready in the queues, counted once per run if needed
        for stats in self._stats(conn, None):
            now = time.monotonic()
            operation = None
            if stats.vacuum_due() and now >= self._not_before.get((stats.target, "vacuum"), 0.0):
                if stats.relname in QUEUE_TABLES:
                    if ready is None:
                        ready = conn.execute(query("tables", "ready_jobs"), {"limit": HEAVY_QUEUE_READY}).fetchone()[0]
                    if ready >= HEAVY_QUEUE_READY:
                        results.append(self._put_off(stats, ready))
                    else:
                        operation = "vacuum"
                        self._put_off_logged.discard(stats.target)
                else:
                    operation = "vacuum"
            if operation is None and stats.analyze_due() \
                    and now >= self._not_before.get((stats.target, "analyze"), 0.0):
                operation = "analyze"
            if operation:
                results.append(self._execute(conn, stats, operation))
                beat()
        return results

    def _put_off(self, stats: TableStats, ready: int) -> TableResult:
        reason = f"queue busy: {ready} or more ready jobs (threshold {HEAVY_QUEUE_READY})"
        if stats.target not in self._put_off_logged:
            self._put_off_logged.add(stats.target)
            self.log.info("VACUUM of %s put off while the %s (dead ratio %.2f)", stats.target, reason, stats.dead_ratio)
        return TableResult(stats.target, "vacuum", "skipped", stats, error=reason)

    @staticmethod
    def _stats(conn: psycopg.Connection, relname: str | None) -> list[TableStats]:
        with conn.cursor(row_factory=class_row(TableStats)) as cur:
            return cur.execute(query("tables", "table_stats"), {"table": relname}).fetchall()

    def _execute(self, conn: psycopg.Connection, before: TableStats, operation: str) -> TableResult:
        """Run one VACUUM (ANALYZE) or ANALYZE with its progress row and its record."""
        target = {"table": before.target, "operation": operation}
        conn.execute(query("tables", "progress_start"),
                     {**target, "phase": "vacuuming" if operation == "vacuum" else "analyzing"})
        record = conn.execute(query("tables", "start_operation"),
                              {**target, "details": Jsonb({"before": before.figures()})}).fetchone()[0]
        started = time.monotonic()
        result = TableResult(before.target, operation, "completed", before)
        try:
            self._statement(conn, STATEMENTS[operation].format(sql.Identifier("neurondb", before.relname)))
        except psycopg.Error as exc:
            if conn.broken:
                raise       # the connection is lost: the next run's take_over marks the record interrupted
            result.status = "failed"
            if isinstance(exc, psycopg.errors.LockNotAvailable):
                result.error = (f"{operation} of {before.target}: lock not granted within {LOCK_TIMEOUT_MS} ms "
                                f"(another session holds a conflicting lock): {first_line(exc)}")
            else:
                result.error = f"{operation} of {before.target} failed: {first_line(exc)}"
        if result.status == "completed":
            result.after = self._stats(conn, before.relname)[0]
            if operation == "vacuum":
                result.dead_tuples_removed = max(0, before.n_dead_tup - result.after.n_dead_tup)
        self._finish(conn, record, result, started)
        self._back_off(result)
        return result

    @staticmethod
    def _statement(conn: psycopg.Connection, statement: sql.Composed) -> None:
        conn.execute(query("tables", "set_lock_timeout"), {"timeout": f"{LOCK_TIMEOUT_MS}ms"})
        try:
            conn.execute(statement)
        finally:
            if not conn.broken:
                conn.execute(query("tables", "reset_lock_timeout"))

    def _finish(self, conn: psycopg.Connection, record: int, result: TableResult, started: float) -> None:
        result.duration_ms = (time.monotonic() - started) * 1000
        conn.execute(query("tables", "finish_operation"),
                     {"id": record, "status": result.status, "duration_ms": result.duration_ms,
                      "dead_tuples_removed": result.dead_tuples_removed, "error": result.error,
                      "details": Jsonb({"after": result.after.figures()} if result.after else {})})
        conn.execute(query("tables", "progress_end"), {"table": result.table, "operation": result.operation})

    def _back_off(self, result: TableResult) -> None:
        """Log the outcome and decide when this operation may run on this table again."""
        wait = REPEAT_AFTER
        if result.status == "failed":
            self.log.warning("%s; retried in %.0f s at the earliest", result.error, wait)
        elif result.operation == "analyze":
            self.log.info("ANALYZE %s: %d rows changed since the last analyze, %.0f ms", result.table,
                          result.before.n_mod_since_analyze, result.duration_ms)
        else:
            after = result.after
            self.log.info("VACUUM (ANALYZE) %s: dead ratio %.2f -> %.2f, %d dead tuples removed, %.0f ms",
                          result.table, result.before.dead_ratio, after.dead_ratio, result.dead_tuples_removed,
                          result.duration_ms)
            if after.vacuum_due():
                wait = VACUUM_BACKOFF
                if result.table not in self._stuck_logged:
                    self._stuck_logged.add(result.table)
                    self.log.warning(
                        "VACUUM of %s left %d dead tuples (dead ratio %.2f): an older snapshot still needs them "
                        "(a long or idle-in-transaction session, see pg_stat_activity.backend_xmin, or a "
                        "replication slot); not vacuumed again before %.0f s (logged once until a VACUUM "
                        "clears it)", result.table, after.n_dead_tup, after.dead_ratio, VACUUM_BACKOFF)
            else:
                self._stuck_logged.discard(result.table)
        self._not_before[(result.table, result.operation)] = time.monotonic() + wait
