"""neurandefrag: index maintenance (the document's section 3).

It owns the vector indexes' graphs in shared memory: it is their one writer. On every wake-up (a NOTIFY
from a write to neurondb_vectors, or at most every second) it applies pending changes to each graph; it
snapshots changed graphs to the data directory periodically and at a clean stop, so a restart loads
instead of rebuilding; it publishes each index's statistics to neurondb_index_stats.

Between change batches it maintains the graphs (neurondb/index/maintenance.py: a cycle every
`neurandefrag_naptime`: pruning of tombstones, cleanup, rebalancing, compaction or rebuild), one bounded slice
at a time so new changes are applied within milliseconds whatever maintenance is doing; and every 10 s a
thread of its own, on a connection of its own, checks the neurondb tables for VACUUM and ANALYZE
(neurondb/tablemaint.py), so a long VACUUM never holds up the graphs.

One index failing (to start, to apply its changes, to snapshot) stops neither the others nor the
statistics: its pending changes keep being counted in vector_stats and its error is the worker's
last_error in `neurondb status`, so a writer that keeps failing shows its lag instead of hiding it.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import psycopg

from neurondb import db
from neurondb.index.maintenance import IndexMaintenance, Policy, interrupted
from neurondb.index.sync import APPLY_BATCH, IndexSync, installation_host, specs
from neurondb.settings import parse_maintenance_window
from neurondb.tablemaint import TableMaintenance
from neurondb.workers.base import BatchResult, DatabaseUnavailable, Worker

T = TypeVar("T")

# Poll for changes even without a NOTIFY (a missed one costs at most this); also how often the graph's
# header says it is caught up, which a search without a PostgreSQL check relies on (neurondb/client.py).
SYNC_EVERY = 0.5
CATALOG_EVERY = 2.0
SNAPSHOT_EVERY = 60.0
STATS_EVERY = 2.0


class DefragWorker(Worker):
    kind = "neurandefrag"
    listen_channels = ("neurondb_vectors",)

    def on_start(self) -> None:
        self.syncs: dict[str, IndexSync] = {}
        self.maintenance: dict[str, IndexMaintenance] = {}
        self.tables = TableMaintenance(self.log)
        self._tables_thread: threading.Thread | None = None
        self.snapshot_dir = self.ctx.datadir.root / "indexes"
        for index, operation in interrupted(self.conn, installation_host(self.snapshot_dir)):
            self.log.warning("index %s: the %s a killed writer left running is marked interrupted; the next "
                             "cycle redoes what is still needed", index, operation)
        self._next_catalog = self._next_stats = 0.0
        self._next_snapshot = time.monotonic() + SNAPSHOT_EVERY
        self._last_failure: dict[str, str] = {}    # index -> its last error, to log a traceback once

    def idle_nap(self) -> float:
        return min(self.naptime, SYNC_EVERY)

    def run_batch(self) -> BatchResult:
        now = time.monotonic()
        if now >= self._next_catalog:
            self._next_catalog = now + CATALOG_EVERY
            self._refresh_catalog()
        applied = 0
        more = False
        for sync in self.syncs.values():
            n = self._guarded(sync.spec.name, "applying changes", lambda sync=sync: sync.apply_pending(self.conn))
            applied += n or 0
            more = more or (n or 0) >= APPLY_BATCH
        policy = self._policy()
        for name, maintenance in self.maintenance.items():
            busy = self._guarded(name, "maintenance", lambda m=maintenance: m.step(self.conn, policy))
            more = more or bool(busy)
        self._check_tables(now)
        if now >= self._next_snapshot:
            self._next_snapshot = now + SNAPSHOT_EVERY
            self._snapshot_all()
        if applied or now >= self._next_stats:
            self._next_stats = now + STATS_EVERY
            for name, sync in self.syncs.items():
                figures = self.maintenance[name].figures
                self._guarded(name, "publishing statistics", lambda s=sync, f=figures: s.publish_stats(self.conn, f))
        return BatchResult(processed=applied, more=more)

    def _policy(self) -> Policy:
        c = self.config
        return Policy(cycle=self.naptime, compact_threshold=int(c.get("neurondb.neurandefrag_compact_threshold")),
                      fragmentation_threshold=float(c.get("neurondb.neurandefrag_fragmentation_threshold")),
                      window=parse_maintenance_window(str(c.get("neurondb.neurandefrag_maintenance_window"))))

    def _check_tables(self, now: float) -> None:
        """VACUUM and ANALYZE in a thread on a connection of its own: a VACUUM of a big table takes as long
        as it takes, and the graphs' changes must not wait for it."""
        if (self._tables_thread is not None and self._tables_thread.is_alive()) or not self.tables.due(now):
            return
        self._tables_thread = threading.Thread(target=self._run_tables, name="neurandefrag-tables", daemon=True)
        self._tables_thread.start()

    def _run_tables(self) -> None:
        try:
            with db.connect(self.ctx.dsn, "neurandefrag tables") as conn:
                for result in self.tables.run(conn, beat=lambda: None):
                    if result.status != "skipped":
                        self.metrics.inc("neurondb_table_maintenance", result.table, result.operation)
        except Exception as exc:    # the next check (10 s) tries again; the error is the log's
            self.tables.log.warning("table maintenance: %s", str(exc).splitlines()[0] if str(exc) else exc)

    def _count_operation(self, index: str, operation: str, status: str, seconds: float) -> None:
        self.metrics.inc("neurondb_maintenance_operations", index, operation, status)
        self.metrics.observe("neurondb_maintenance_duration_seconds", operation, seconds=seconds)

    def _guarded(self, index: str, what: str, action: Callable[[], T]) -> T | None:
        """Run `action` for one index; a failure is logged (the traceback once per distinct error) and made
        the worker's last_error, and returns None. A lost database connection is the loop's to handle."""
        try:
            result = action()
        except (DatabaseUnavailable, psycopg.OperationalError):
            raise
        except Exception as exc:
            message = f"index {index}: {what} failed: {exc}"
            repeated = self._last_failure.get(index) == message
            self._last_failure[index] = message
            self.log.error("%s%s", message, "" if repeated else "\n" + traceback.format_exc().rstrip())
            self._record_error(message[:200])
            return None
        self._last_failure.pop(index, None)
        return result

    def _refresh_catalog(self) -> None:
        catalog = specs(self.conn)
        for name in list(self.syncs):
            if name not in catalog or catalog[name][0] != self.syncs[name].spec:
                self.log.info("index %s dropped or redefined; releasing its graph", name)
                self.maintenance.pop(name).close()
                self.syncs.pop(name).close()
        for name, (spec, _) in catalog.items():
            if name in self.syncs:
                continue
            sync = IndexSync(self.ctx.shared, self.snapshot_dir, spec, self.ctx.dsn)
            progress = self._progress(sync)
            how = self._guarded(name, "starting", lambda sync=sync, p=progress: sync.start(self.conn, progress=p))
            if how is None:
                sync.close()        # retried at the next catalog refresh
                continue
            self.log.info("index %s ready (%s)", name, how)
            self.syncs[name] = sync
            self.maintenance[name] = IndexMaintenance(sync)
            self.maintenance[name].on_operation = partial(self._count_operation, name)

    def _progress(self, sync: IndexSync):
        """Progress of a long rebuild: heartbeat (so the supervisor does not take us for hung) and stats."""
        last = [0.0]

        def report(done: int, total: int) -> None:
            self._beat()
            if time.monotonic() - last[0] > 1.0:
                last[0] = time.monotonic()
                sync.publish_task(self.conn)
                self.log.info("index %s: rebuilding, %d of %d vectors", sync.spec.name, done, total)

        return report

    def _snapshot_all(self) -> None:
        for sync in self.syncs.values():
            if self._guarded(sync.spec.name, "snapshotting", lambda sync=sync: sync.snapshot_if_changed(self.conn)):
                self.log.info("index %s: snapshot written", sync.spec.name)

    def on_stop(self) -> None:
        """A clean stop leaves fresh snapshots: the next start loads them instead of replaying. Not when the
        supervisor died: the next start waits for us to exit, and loads the last snapshot plus the changes
        since (they stay in the log until a snapshot holds them) just as well."""
        if self.shutdown in ("smart", "fast") and not self.orphaned:
            self._snapshot_all()
        for maintenance in self.maintenance.values():
            maintenance.close(self.conn)
        for sync in self.syncs.values():
            sync.close()
