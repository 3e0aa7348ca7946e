"""Maintenance of one index's graph (the document's section 3): what neurandefrag does between change batches.

A cycle, every `neurandefrag_naptime` (or at once when `neurondb index rebuild|compact` asks, or when
deletes have left a tenth of the graph as tombstones, which slow searches down until they are pruned):

1. Measure (`hnsw.fragmentation`): tombstones, dead edges, disconnected nodes, row waste, levels.
2. Pruning (delete consolidation): every list of a live node that points at a deleted node is re-chosen
   from its live neighbours and theirs (`hnsw.consolidate`), in slices of bounded work; then the deleted
   nodes are unlinked and their rows freed (`hnsw.free_deleted`), for inserts to reuse after a grace period
   (store.REUSE_GRACE), so memory stops growing under churn.
3. Cleanup: invalid links dropped (`hnsw.repair`), the entry point moved to a live node of the top live
   level, unreachable live nodes and live nodes without a live out-edge re-linked (`hnsw.relink`).
4. Rebalancing: when deletes thinned an upper level below half of what the level distribution expects,
   live nodes are promoted (`hnsw.rebalance`).
5. Compaction or rebuild, when the graph has at least `neurandefrag_compact_threshold` edges and its
   fragmentation_ratio exceeds `neurandefrag_fragmentation_threshold` (or on request): a new graph is written
   into the next generation's segment in slices while searches use the current one; the labels changed
   meanwhile are journaled and replayed into it; then it is published and the old segment released.
   Compaction copies the live nodes with their (repaired) links, renumbered: it needs no distance
   computation. A rebuild re-inserts every row from PostgreSQL (new random levels, a fresh graph); it runs
   only inside `neurandefrag_maintenance_window`, unless fragmentation is above twice the threshold, the
   tuner reports recall it cannot reach at the maximum ef (at most once a day for that), or it was asked
   for with `--now`.

Every step holds the index lock for one slice only (a few milliseconds), so the writer applies new changes
between slices and searches (lock-free, other processes) never wait. Each operation that changed something is
recorded in neurondb_index_maintenance; long ones show in neurondb.maintenance_progress while they run.

Crash safety: slices that rewrite lists run inside the lock's `writing()` section, so a writer killed in one
leaves the lock dirty and the next writer repairs the lists (`hnsw.repair`) before it continues; a killed
build leaves an unpublished segment the next writer's sweep removes, a 'running' row it marks interrupted,
and the published graph serving searches; the next cycle measures again and redoes what is still needed.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import psycopg

from neurondb import db, inject
from neurondb.index import hnsw
from neurondb.index.store import MIN_CAPACITY, Build
from neurondb.index.sync import IndexSync, row_arrays, to_matrix
from neurondb.queries import query

log = logging.getLogger(__name__)

CONSOLIDATE_BUDGET = 100_000   # candidate distances per pruning slice: about 5 ms at dim 128
COPY_CHUNK = 1_000             # rows a compaction copies between two looks at the clock
REBUILD_FETCH = 128            # rows a rebuild reads from its cursor at a time, outside the lock
REBUILD_CHUNK = 16             # vectors inserted between two looks at the clock
SLICE_SECONDS = 0.005          # how long a build slice holds the lock (fixed row counts took 50-100 ms under load)
REBALANCE_DEFICIT = 0.5        # promote nodes when a level has less than half its expected live nodes
PROGRESS_EVERY = 0.5           # seconds between progress rows of one operation
TUNER_REBUILD_EVERY = 86_400.0  # a rebuild for an unreachable recall target at most once a day
RETRY_AFTER = 5.0              # seconds before a new cycle when a build was abandoned
PRUNE_EARLY = 0.1              # a tombstone share that starts a cycle at once: deletes slow searches down


@dataclass(frozen=True)
class Policy:
    """The maintenance settings in force (neurandefrag_*), as values."""

    cycle: float                      # seconds between cycles
    compact_threshold: int            # minimum edges for a compaction or rebuild
    fragmentation_threshold: float
    window: tuple[int, int]           # minutes after local midnight; end < start wraps midnight

    def in_window(self, now: datetime.datetime | None = None) -> bool:
        now = now or datetime.datetime.now()
        minute = now.hour * 60 + now.minute
        start, end = self.window
        return start <= minute < end if start < end else minute >= start or minute < end


@dataclass
class _Op:
    """An operation in progress: what it is, since when, the figures before it."""

    name: str
    started: float
    before: dict
    record_id: int | None = None
    details: dict = field(default_factory=dict)
    last_progress: float = 0.0


class IndexMaintenance:
    """The maintenance state machine of one index: idle -> pruning -> (building) -> idle."""

    def __init__(self, sync: IndexSync) -> None:
        self.sync = sync
        self.writer = sync.writer
        self.name = sync.spec.name
        self.phase = "idle"
        self.next_cycle = 0.0            # monotonic; the first cycle comes soon after start
        self.ended_at = 0.0              # monotonic time the last cycle ended
        self.position = 0                # next node of the pruning pass
        self.op: _Op | None = None
        self.build: Build | None = None
        self._rows: psycopg.Connection | None = None   # a rebuild's REPEATABLE READ connection
        self._cursor: psycopg.Cursor | None = None
        self._total = 0
        self._plan: tuple[np.ndarray, np.ndarray] | None = None
        self._pending: list[tuple] = []          # rows a rebuild has read and not inserted yet
        self._copied = 0
        self.figures: dict | None = None          # the last measurement, for vector_stats
        self.request: tuple[str, bool] | None = None   # (operation, now) asked for by the CLI
        self._next_request_check = 0.0
        self.host = sync.host
        # Told of every operation that ends (operation, status, seconds): the worker counts them for /metrics.
        self.on_operation: Callable[[str, str, float], None] = lambda operation, status, seconds: None

    # -- the cycle ---------------------------------------------------------------------------------------

    def busy(self) -> bool:
        return self.phase != "idle"

    def step(self, conn: psycopg.Connection, policy: Policy) -> bool:
        """Do one bounded slice of maintenance if any is due; True when more is waiting right now. If a slice
        fails, whatever was in progress is dropped (a build's segment too) and the cycle is retried soon;
        the error propagates, for the worker to log."""
        if self.writer.arrays is None:
            return False
        try:
            return self._step(conn, policy)
        except BaseException:
            self.writer.abort_build("its maintenance step failed")
            self._close_rows()
            self.build = self.op = None
            self._plan = None
            self._end_cycle(policy, retry=True)
            raise

    def _step(self, conn: psycopg.Connection, policy: Policy) -> bool:
        if self.phase == "idle":
            now = time.monotonic()
            if now >= self._next_request_check:      # a NOTIFY wakes us; once a second is soon enough
                self._next_request_check = now + 1.0
                self.request = self._request(conn)
            runnable = self.request is not None and (self.request[0] == "compaction" or self.request[1]
                                                     or policy.in_window())
            early = now - self.ended_at >= 1.0 and self._many_tombstones()   # (never a busy loop)
            if not runnable and now < self.next_cycle and not early:
                return False
            self._begin_cycle(conn, policy)
        if self.phase == "pruning":
            self._prune_slice(conn, policy)
        elif self.phase == "building":
            self._build_slice(conn, policy)
        return self.phase != "idle"

    def _begin_cycle(self, conn: psycopg.Connection, policy: Policy) -> None:
        figures = self._measure(conn)
        if figures["deleted"] or figures["dead_edges"] or figures["invalid_links"]:
            self.phase, self.position = "pruning", 0
            self.op = _Op("prune", time.time(), figures)
        else:
            self._after_pruning(conn, policy)

    def _end_cycle(self, policy: Policy, retry: bool = False) -> None:
        self.phase = "idle"
        self.ended_at = time.monotonic()
        self.next_cycle = time.monotonic() + (RETRY_AFTER if retry else policy.cycle)

    # -- pruning ----------------------------------------------------------------------------------------

    def _prune_slice(self, conn: psycopg.Connection, policy: Policy) -> None:
        assert self.op is not None
        with self._locked() as a:
            if a is None:
                return
            with self.writer.lock.writing():
                if self.position == 0:
                    hnsw.fix_entry(a)       # repair searches start from the entry point: a live one
                self.position, _, _ = hnsw.consolidate(a, self.position, CONSOLIDATE_BUDGET)
                inject.point("defrag-prune")
                done = self.position >= a.count
                if done:      # lists changed by inserts since their slice, then free the deleted rows
                    hnsw.consolidate(a, 0)
                    freed = hnsw.free_deleted(a)
                    self.writer.freed(freed)
            total = a.count
        if not done:
            self._progress(conn, "pruning", self.position, total)
            return
        self._progress_end(conn)
        after = self._measure(conn)
        self._record(conn, self.op, after, removed=len(freed))
        self.op = None
        self._after_pruning(conn, policy)

    # -- cleanup, rebalancing, and the decision to compact or rebuild ---------------------------------------

    def _after_pruning(self, conn: psycopg.Connection, policy: Policy) -> None:
        request = self.request
        with self._locked() as a:
            if a is None:
                self._end_cycle(policy, retry=True)
                return
            before = self.figures or hnsw.fragmentation(a)
            started = time.time()
            with self.writer.lock.writing():
                invalid = hnsw.repair(a) if before["invalid_links"] else 0
                moved = hnsw.fix_entry(a)
                relinked = len(before["relink"])
                forced = hnsw.relink(a, before["relink"]) if relinked else 0
                promoted = hnsw.rebalance(a) if before["level_deficit"] > REBALANCE_DEFICIT else 0
        figures = self._measure(conn) if invalid or relinked or moved or promoted else before
        if invalid or relinked:
            self._record(conn, _Op("cleanup", started, before), figures,
                         details={"invalid_links_removed": invalid, "relinked": relinked, "forced_links": forced})
        if moved:
            self._record(conn, _Op("repair", started, before), figures, details={"entry_point_moved": True})
        if promoted:
            self._record(conn, _Op("rebalance", started, before), figures,
                         details={"promoted": promoted, "level_deficit_before": before["level_deficit"]})
        kind = self._decide(conn, policy, figures, request)
        if kind is None:
            self._end_cycle(policy)
            return
        self._begin_build(conn, kind, figures, request)

    def _decide(self, conn: psycopg.Connection, policy: Policy, f: dict, request: tuple[str, bool] | None
                ) -> str | None:
        in_window = policy.in_window()
        if request is not None:
            operation, now = request
            if operation == "compaction" or now or in_window:
                return operation
        edges = f["edges_level0"]
        fragmented = f["fragmentation_ratio"] > policy.fragmentation_threshold
        if edges >= policy.compact_threshold and fragmented:
            if in_window or f["fragmentation_ratio"] > 2 * policy.fragmentation_threshold:
                return "rebuild"
            return "compaction"
        if conn.execute(query("defrag", "tuner_unattainable"), {"index": self.name}).fetchone()[0]:
            last = conn.execute(query("defrag", "last_rebuild"), {"index": self.name}).fetchone()
            if last is None or last[0] is None or time.time() - float(last[0]) > TUNER_REBUILD_EVERY:
                return "rebuild"
        return None

    # -- compaction and rebuild -------------------------------------------------------------------------------

    def _begin_build(self, conn: psycopg.Connection, kind: str, figures: dict, request: tuple[str, bool] | None
                     ) -> None:
        self.op = _Op(kind, time.time(), figures, details={"pid": os.getpid(), "host": self.host,
                                                            "requested": request is not None})
        self.op.record_id = conn.execute(query("defrag", "start_operation"), {
            "index": self.name, "operation": kind, "nodes_before": figures["live"],
            "edges_before": figures["edges_level0"], "fragmentation": figures["fragmentation_ratio"],
            "details": orjson.dumps(self.op.details).decode()}).fetchone()[0]
        if request is not None and request[0] == kind:
            conn.execute(query("defrag", "clear_request"), {"index": self.name, "operation": request[0]})
            self.request = None
        with self.writer.lock:
            self.writer.refresh()
            a = self.writer.arrays
            assert a is not None
            if kind == "compaction":
                live, remap = hnsw.compact_plan(a)
                capacity = max(MIN_CAPACITY, int(len(live) * 1.25) + 1)
                upper = int(a.levels[live].astype(np.int64).sum())
                pool = max(hnsw.default_pool_capacity(capacity, a.m), upper + 64)
                self.build = self.writer.begin_build(kind, capacity, pool)
                self._plan, self._copied, self._total = (live, remap), 0, len(live)
            else:
                # The journal starts before the rows' snapshot: every change not in the snapshot is replayed.
                s = self.sync.spec
                self._rows = db.connect(self.sync.dsn, "index rebuild", autocommit=False)
                self._rows.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                total = self._rows.execute(query("index", "count_vectors"), {"index": s.name}).fetchone()[0]
                capacity = max(MIN_CAPACITY, int(total * 1.25) + 1)
                self.build = self.writer.begin_build(kind, capacity)
                self._cursor = self._rows.cursor(name=f"rebuild_{s.name}")
                self._cursor.execute(query("index", "all_vectors"), {"index": s.name})
                self._total, self._copied, self._pending = total, 0, []
        self.phase = "building"
        log.info("index %s: %s started (fragmentation %.3f, %d live nodes)", self.name, kind,
                 figures["fragmentation_ratio"], figures["live"])

    def _build_slice(self, conn: psycopg.Connection, policy: Policy) -> None:
        build, op = self.build, self.op
        assert build is not None and op is not None
        if build.aborted is not None or self.writer.build is not build:
            self._fail(conn, policy, f"abandoned: {build.aborted or 'the graph was replaced'}")
            return
        dst = build.arrays
        exhausted = False
        if build.kind == "rebuild" and not self._pending:      # read the table outside the lock
            assert self._cursor is not None
            self._pending = self._cursor.fetchmany(REBUILD_FETCH)
            exhausted = not self._pending
        with self._locked() as a:
            if a is None:
                return
            deadline = time.monotonic() + SLICE_SECONDS
            if build.kind == "compaction":
                assert self._plan is not None
                live, remap = self._plan
                while self._copied < len(live) and time.monotonic() < deadline:
                    hi = min(self._copied + COPY_CHUNK, len(live))
                    hnsw.compact_rows(a, dst, live, remap, self._copied, hi)
                    self._copied = hi
                inject.point("defrag-build")
                complete = self._copied >= len(live)
                if complete:
                    hnsw.compact_finish(a, dst, remap, len(live))
            else:
                complete = exhausted
                if not exhausted:
                    self._insert_rows(dst, deadline)
                inject.point("defrag-build")
            if complete and self.writer.build is build:
                try:
                    with self.writer.lock.writing():
                        replayed, _ = self.writer.finish_build()
                except OverflowError as exc:
                    complete, op.details["error"] = False, str(exc)
                else:
                    op.details["replayed"] = replayed
        if self.writer.build is not build and not complete:
            self._fail(conn, policy, f"abandoned: {build.aborted or op.details.get('error', 'unknown')}")
            return
        if not complete:
            self._progress(conn, "copying rows" if build.kind == "compaction" else "inserting rows",
                           self._copied, self._total)
            return
        self._close_rows()
        self._progress_end(conn)
        after = self._measure(conn)
        conn.execute(query("defrag", "end_operation"), {
            "id": op.record_id, "status": "completed", "nodes_after": after["live"],
            "edges_after": after["edges_level0"], "removed": op.before["count"] - after["count"],
            "details": orjson.dumps({**op.details, "fragmentation_after": after["fragmentation_ratio"],
                                     "memory_before": op.before["memory_bytes"],
                                     "memory_after": after["memory_bytes"]}).decode(), "error": None})
        conn.execute(query("defrag", "finished"), {"index": self.name, "operation": build.kind})
        self.on_operation(build.kind, "completed", time.time() - op.started)
        log.info("index %s: %s done: %d live nodes, fragmentation %.3f -> %.3f, memory %d -> %d bytes", self.name,
                 build.kind, after["live"], op.before["fragmentation_ratio"], after["fragmentation_ratio"],
                 op.before["memory_bytes"], after["memory_bytes"])
        self.build = self.op = None
        self._plan = None
        self._end_cycle(policy)

    def _insert_rows(self, dst: hnsw.HnswArrays, deadline: float) -> None:
        """A rebuild slice: insert the rows read from the cursor until `deadline`."""
        while self._pending and time.monotonic() < deadline:
            rows, self._pending = self._pending[:REBUILD_CHUNK], self._pending[REBUILD_CHUNK:]
            if dst.count + len(rows) > dst.capacity:
                self.writer.abort_build("the table grew past the capacity the rebuild was sized for")
                return
            labels, tenants, keys = row_arrays(rows)
            hnsw.add_items(dst, to_matrix(rows, self.sync.spec.dim), labels, tenants, keys=keys)
            self._copied += len(rows)

    def _fail(self, conn: psycopg.Connection, policy: Policy, error: str) -> None:
        op = self.op
        self._close_rows()
        self._progress_end(conn)
        if op is not None and op.record_id is not None:
            conn.execute(query("defrag", "end_operation"), {
                "id": op.record_id, "status": "failed", "nodes_after": None, "edges_after": None, "removed": None,
                "details": "{}", "error": error[:300]})
            self.on_operation(op.name, "failed", time.time() - op.started)
        log.warning("index %s: %s %s; the next cycle tries again", self.name, op.name if op else "maintenance", error)
        self.build = self.op = None
        self._plan = None
        self._end_cycle(policy, retry=True)

    def close(self, conn: psycopg.Connection | None = None) -> None:
        """Stop whatever is in progress (a clean stop: the build is dropped, its record says so)."""
        if self.build is not None:
            self.writer.abort_build("the worker stopped")
            if conn is not None and self.op is not None and self.op.record_id is not None:
                try:
                    conn.execute(query("defrag", "end_operation"), {
                        "id": self.op.record_id, "status": "interrupted", "nodes_after": None,
                        "edges_after": None, "removed": None, "details": "{}",
                        "error": "the worker stopped before the operation finished; the next cycle redoes it"})
                    self._progress_end(conn)
                    self.on_operation(self.op.name, "interrupted", time.time() - self.op.started)
                except psycopg.Error:
                    pass
        self._close_rows()

    # -- helpers ----------------------------------------------------------------------------------------

    def _close_rows(self) -> None:
        if self._rows is not None:
            try:
                self._rows.close()
            except psycopg.Error:
                pass
        self._rows = self._cursor = None
        self._pending = []

    def _many_tombstones(self) -> bool:
        """Whether deletes since the last cycle left at least PRUNE_EARLY of the graph as tombstones, which
        searches walk through (two header words: no scan)."""
        a = self.writer.arrays
        assert a is not None
        live_or_deleted = a.count - int(a.header[hnsw.H_FREE])
        return live_or_deleted > 0 and a.deleted_count >= PRUNE_EARLY * live_or_deleted

    def _locked(self) -> _Locked:
        return _Locked(self)

    def _request(self, conn: psycopg.Connection) -> tuple[str, bool] | None:
        row = conn.execute(query("defrag", "request"), {"index": self.name}).fetchone()
        if row is None or row[0] is None:
            return None
        return row[0], bool(row[1])

    def _measure(self, conn: psycopg.Connection) -> dict:
        """hnsw.fragmentation of the current graph. The lock only to follow the graph: the measurement reads,
        and this thread is the graph's only writer, so nothing changes it meanwhile."""
        with self.writer.lock:
            self.writer.refresh()
            a = self.writer.arrays
        assert a is not None
        self.figures = hnsw.fragmentation(a)
        return self.figures

    def _progress(self, conn: psycopg.Connection, phase: str, done: int, total: int) -> None:
        op = self.op
        now = time.monotonic()
        if op is None or now - op.last_progress < PROGRESS_EVERY:
            return
        op.last_progress = now
        conn.execute(query("defrag", "progress"), {"target": self.name, "operation": op.name, "phase": phase,
                                                    "done": done, "total": total})

    def _progress_end(self, conn: psycopg.Connection) -> None:
        if self.op is not None:
            conn.execute(query("defrag", "progress_end"), {"target": self.name, "operation": self.op.name})

    def _record(self, conn: psycopg.Connection, op: _Op, after: dict, removed: int | None = None,
                details: dict | None = None) -> None:
        b = op.before
        conn.execute(query("defrag", "record_operation"), {
            "index": self.name, "operation": op.name, "status": "completed", "started": op.started,
            "nodes_before": b["live"], "nodes_after": after["live"], "edges_before": b["edges_level0"],
            "edges_after": after["edges_level0"], "removed": removed, "fragmentation": after["fragmentation_ratio"],
            "details": orjson.dumps({**(details or {}), **_figures(b, "before"), **_figures(after, "after")}).decode(),
            "error": None})
        self.on_operation(op.name, "completed", time.time() - op.started)
        log.info("index %s: %s: fragmentation %.3f -> %.3f%s", self.name, op.name, b["fragmentation_ratio"],
                 after["fragmentation_ratio"], f", {removed} rows freed" if removed else "")


class _Locked:
    """`with maintenance._locked() as arrays`: the index lock for one slice (None if it is busy: a snapshot
    or another process holds it; the slice is retried at the next step), after following the graph."""

    def __init__(self, m: IndexMaintenance) -> None:
        self.m = m
        self.held = False

    def __enter__(self) -> hnsw.HnswArrays | None:
        if not self.m.writer.lock.acquire(timeout=0.05):
            return None
        self.held = True
        self.m.writer.refresh()
        return self.m.writer.arrays

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            self.m.writer.lock.release()


def _figures(f: dict, suffix: str) -> dict:
    keys = ("fragmentation_ratio", "tombstone_ratio", "dead_edge_ratio", "disconnected_ratio", "row_waste",
            "deleted", "free", "unreachable", "no_out_edge", "invalid_links", "level_deficit", "memory_bytes")
    return {f"{k}_{suffix}": (float(f[k]) if isinstance(f[k], float | np.floating) else int(f[k])) for k in keys}


def interrupted(conn: psycopg.Connection, host: str) -> list[tuple[str, str]]:
    """Mark the operations a killed writer of this installation left 'running' as interrupted, and drop
    progress rows of gone backends; returns (index, operation) of each."""
    rows = conn.execute(query("defrag", "interrupted"), {"host": host, "pid": os.getpid()}).fetchall()
    conn.execute(query("defrag", "progress_orphans"))
    return [(r[0], r[1]) for r in rows]
