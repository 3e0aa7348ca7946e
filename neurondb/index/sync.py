"""Keeping an index's graph in shared memory in step with its rows in PostgreSQL.

PostgreSQL is the truth; the graph is derived. Every insert, update or delete of neurondb_vectors logs a
change (a trigger) and NOTIFYs; the writer applies pending changes by re-reading the rows they name, so a
change applied twice, or out of order, leaves the same graph. Each applied change is marked with the
number of the next snapshot; once that snapshot is on disk its changes are deleted. A restart attaches
the graph still in shared memory, or loads the newest snapshot and replays the changes it does not
contain, or, with no usable snapshot, rebuilds from the table (with progress reported).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psycopg

from neurondb import db, inject
from neurondb.index import hnsw, snapshot
from neurondb.index.store import IndexSpec, IndexWriter, tenant_code
from neurondb.queries import query
from neurondb.shm.control import SharedState

log = logging.getLogger(__name__)

APPLY_BATCH = 5000
REBUILD_CHUNK = 2000
Progress = Callable[[int, int], None]


def specs(conn: psycopg.Connection) -> dict[str, tuple[IndexSpec, dict]]:
    """Registered indexes: name -> (spec, catalog row)."""
    out = {}
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        for row in cur.execute(query("index", "indexes")):
            out[row["index_name"]] = (IndexSpec(row["index_name"], row["dim"], row["metric"], row["m"],
                                                row["ef_construction"], row["ef_search"]), row)
    return out


def to_matrix(rows: list[tuple], dim: int) -> np.ndarray:
    return np.asarray([r[2] for r in rows], dtype=np.float32).reshape(len(rows), dim)


class IndexSync:
    """The writer side of one index; one instance per index in the process that owns the graph."""

    def __init__(self, shared: SharedState, snapshot_dir: Path, spec: IndexSpec, dsn: str) -> None:
        self.spec = spec
        self.dsn = dsn                     # a rebuild reads through a connection of its own
        self.writer = IndexWriter(shared, spec)
        self.snapshot_path = snapshot_dir / f"{spec.name}.snap"
        self.snapshot_number = 1           # applied changes are marked with this; snapshot N contains them
        self.snapshot_at: float | None = None
        self.snapshot_mutations = -1
        self.task: tuple[str, float] | None = None

    # -- start ----------------------------------------------------------------------------------------

    def start(self, conn: psycopg.Connection, progress: Progress | None = None) -> str:
        """Bring the graph up: 'attached' (still in shared memory), 'snapshot' or 'rebuilt'."""
        with self.writer.lock:
            self._snapshot_meta()
            if self.writer.attach_current():
                return "attached"
            try:
                arrays, meta = snapshot.load(self.snapshot_path)
                self._check_matches(arrays)
            except snapshot.SnapshotError as exc:
                log.warning("index %s: %s; rebuilding from PostgreSQL", self.spec.name, exc)
                self.rebuild(conn, progress, locked=True)
                return "rebuilt"
            self.writer.install(arrays)
            self.snapshot_number = int(meta["snapshot"]) + 1
            self.snapshot_at = float(meta["created_at"])
            self.snapshot_mutations = int(self.writer.arrays.header[hnsw.H_MUTATIONS])
            replayed = self.apply_pending(conn, after=int(meta["snapshot"]), locked=True)
            log.info("index %s: loaded snapshot %d, replayed %d changes", self.spec.name, meta["snapshot"], replayed)
            return "snapshot"

    def _snapshot_meta(self) -> dict | None:
        """The header of the snapshot on disk, to continue its numbering after a worker restart."""
        try:
            meta = snapshot.read_meta(self.snapshot_path)
        except snapshot.SnapshotError:
            return None
        self.snapshot_number = int(meta["snapshot"]) + 1
        self.snapshot_at = float(meta["created_at"])
        return meta

    def _check_matches(self, arrays: hnsw.HnswArrays) -> None:
        s = self.spec
        if (arrays.dim, arrays.metric, arrays.m) != (s.dim, s.metric, s.m):
            raise snapshot.SnapshotError(f"{self.snapshot_path}: made for dim {arrays.dim}, {arrays.metric}, "
                                         f"m {arrays.m}; the index is dim {s.dim}, {s.metric}, m {s.m}")

    def rebuild(self, conn: psycopg.Connection, progress: Progress | None = None, locked: bool = False) -> int:
        """A new graph from every row of the index; returns the number of vectors. Holds the index lock for
        the whole build, so no change is applied to the old graph meanwhile (they wait, marked unapplied)."""
        if not locked:
            with self.writer.lock:
                return self.rebuild(conn, progress, locked=True)
        s = self.spec
        done = 0
        self.task = ("rebuilding", 0.0)
        # One REPEATABLE READ snapshot for the rows and for the changes they already reflect: exactly those
        # changes are marked applied afterwards; later ones (committed during the build) are replayed.
        with db.connect(self.dsn, "index rebuild", autocommit=False) as snap:
            snap.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            total = snap.execute(query("index", "count_vectors"), {"index": s.name}).fetchone()[0]
            contained = [r[0] for r in snap.execute(query("index", "unapplied_ids"), {"index": s.name})]
            arrays = hnsw.HnswArrays.allocate(max(1024, int(total * 1.25) + 1), s.dim, m=s.m,
                                              ef_construction=s.ef_construction, metric=s.metric,
                                              ef_search=s.ef_search)
            with snap.cursor(name=f"rebuild_{s.name}") as cur:
                cur.execute(query("index", "all_vectors"), {"index": s.name})
                while rows := cur.fetchmany(REBUILD_CHUNK):
                    hnsw.add_items(arrays, to_matrix(rows, s.dim), np.array([r[0] for r in rows], np.int64),
                                   np.array([tenant_code(r[1]) for r in rows], np.int32))
                    done += len(rows)
                    self.task = ("rebuilding", done / max(total, 1))
                    if progress:
                        progress(done, total)
        self.writer.install(arrays)
        conn.execute(query("index", "mark_applied"), {"snapshot": self.snapshot_number, "ids": contained})
        self.task = None
        self.publish_task(conn)
        log.info("index %s: rebuilt from %d rows", s.name, done)
        return done

    # -- changes --------------------------------------------------------------------------------------

    def apply_pending(self, conn: psycopg.Connection, after: int | None = None, locked: bool = False) -> int:
        """Apply up to APPLY_BATCH pending changes (or, after a snapshot load, every change that snapshot
        `after` does not contain); returns how many were applied."""
        if not locked:
            if not self.writer.lock.acquire(timeout=0.05):
                return 0     # a rebuild or a snapshot holds the graph; the changes wait, they are durable
            try:
                return self.apply_pending(conn, after, locked=True)
            finally:
                self.writer.lock.release()
        self.writer.refresh()
        total = 0
        from_id = 0
        while True:
            rows = conn.execute(query("index", "pending_changes"), {
                "index": self.spec.name, "after": after if after is not None else 2**62, "limit": APPLY_BATCH,
                "from_id": from_id,
            }).fetchall()
            if not rows:
                return total
            change_ids = [r[0] for r in rows]
            vector_ids = sorted({r[1] for r in rows if r[1] is not None})
            current = conn.execute(query("index", "rows_by_id"),
                                   {"ids": vector_ids, "index": self.spec.name}).fetchall()
            present = {r[0] for r in current}
            inject.point("index-apply")
            with self.writer.lock.writing():
                if current:
                    self.writer.upsert(np.array([r[0] for r in current], np.int64), to_matrix(current, self.spec.dim),
                                       np.array([tenant_code(r[1]) for r in current], np.int32))
                elif self.writer.arrays is None:
                    self.writer.ensure_room(0)
                self.writer.delete([v for v in vector_ids if v not in present])
            conn.execute(query("index", "mark_applied"), {"snapshot": self.snapshot_number, "ids": change_ids})
            total += len(rows)
            from_id = change_ids[-1]
            if after is None or len(rows) < APPLY_BATCH:
                return total

    # -- snapshots and stats --------------------------------------------------------------------------

    def snapshot_if_changed(self, conn: psycopg.Connection) -> bool:
        """Write a snapshot when the graph changed since the last one; then forget the changes it holds."""
        a = self.writer.arrays
        if a is None or int(a.header[hnsw.H_MUTATIONS]) == self.snapshot_mutations:
            return False
        with self.writer.lock:
            self.writer.refresh()
            a = self.writer.arrays
            copy = hnsw.HnswArrays.from_buffer(np.array(np.frombuffer(a.buffer, np.uint8)[: a.nbytes]))
            number, mutations = self.snapshot_number, int(a.header[hnsw.H_MUTATIONS])
            self.snapshot_number += 1    # changes applied from now on belong to the next snapshot
        self.snapshot_path.parent.mkdir(mode=0o700, exist_ok=True)
        created = time.time()
        snapshot.save(self.snapshot_path, copy, {"index": self.spec.name, "snapshot": number, "created_at": created})
        conn.execute(query("index", "forget_applied"), {"index": self.spec.name, "snapshot": number})
        self.snapshot_at, self.snapshot_mutations = created, mutations
        return True

    def publish_task(self, conn: psycopg.Connection) -> None:
        """What the index is busy with, for `neurondb status` (from any process, e.g. a CLI rebuild)."""
        conn.execute(query("index", "publish_task"), {"index": self.spec.name, "task": self.task[0] if self.task
                                                      else None, "progress": self.task[1] if self.task else None})

    def publish_stats(self, conn: psycopg.Connection) -> None:
        a = self.writer.arrays
        st = hnsw.stats(a) if a is not None else {}
        pending = conn.execute(query("index", "count_pending"), {"index": self.spec.name}).fetchone()[0]
        nodes = int(st.get("count", 0))
        tombstones = int(st.get("deleted", 0))
        entry = int(st.get("entry_point", -1))
        conn.execute(query("index", "publish_stats"), {
            "index": self.spec.name, "nodes": nodes - tombstones, "tombstones": tombstones,
            "edges": int(st.get("edges_level0", 0)) + int(st.get("edges_upper", 0)),
            "levels": int(st.get("max_level", -1)) + 1,
            "entry_point": int(a.labels[entry]) if a is not None and entry >= 0 else None,
            "memory": a.nbytes if a is not None else 0,
            "fragmentation": tombstones / nodes if nodes else 0.0,
            "snapshot_at": self.snapshot_at, "task": self.task[0] if self.task else None,
            "progress": self.task[1] if self.task else None, "pending": pending,
            "generation": int(self.writer.counter), "capacity": a.capacity if a is not None else 0,
            "ef_search": a.ef_search if a is not None else None,
        })

    def close(self) -> None:
        self.writer.close()
