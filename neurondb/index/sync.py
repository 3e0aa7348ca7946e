"""Keeping an index's graph in shared memory in step with its rows in PostgreSQL.

PostgreSQL is the truth; the graph is derived. Every insert, update or delete of neurondb_vectors logs a
change (a trigger) and NOTIFYs; the writer applies pending changes by re-reading the rows they name, so a
change applied twice, or out of order, leaves the same graph.

Several installations may share one database, so each keeps its own position in the change log, per
index, in neurondb_index_consumers (see sql/008_index_consumers.sql): a pg_snapshot whose visible
changes its graph holds (`applied`), and the one its snapshot file on disk holds (`durable`). Changes
are deleted only below every installation's durable position. A restart attaches the graph still in
shared memory (at `applied`), or loads the newest snapshot and replays every change not visible in its
position, or, with no usable snapshot or no position (a new installation, or one away for longer than
CONSUMER_EXPIRY, whose position the others dropped), rebuilds from the table (with progress reported).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psycopg

from neurondb import db, inject
from neurondb.index import hnsw, snapshot
from neurondb.index.store import IndexSpec, IndexWriter, tenant_code
from neurondb.paths import ensure_private_dir, write_private_file
from neurondb.queries import query
from neurondb.shm.control import SharedState

log = logging.getLogger(__name__)

APPLY_BATCH = 5000
REBUILD_CHUNK = 2000
CONSUMER_EXPIRY = "1 day"    # an installation unseen this long loses its position; it rebuilds on return
Progress = Callable[[int, int], None]
# The fragmentation figures published per index (neurondb_index_stats columns), with their value before the
# first measurement.
_FIGURES = {"dead_edge_ratio": 0.0, "no_out_edge": 0, "unreachable": 0, "entry_live": None,
            "top_level_live": None, "level_deficit": 0.0, "invalid_links": 0, "compact_bytes": 0}


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


def row_arrays(rows: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, tenant codes and keys of rows (id, tenant_id, embedding, doc_id) as add_items takes them."""
    return (np.array([r[0] for r in rows], np.int64), np.array([tenant_code(r[1]) for r in rows], np.int32),
            np.stack([hnsw.encode_key(r[3], r[1]) for r in rows]) if rows else
            np.empty((0, hnsw.KEY_BYTES), np.uint8))


def installation_id(snapshot_dir: Path) -> str:
    """This installation's name in the change log: a random id kept next to its snapshots
    (`indexes/installation.id`), so it lasts as long as they do, and differs between machines even when
    their data directories have the same path. A copy of a data directory must get its own: delete the
    file in the copy."""
    path = snapshot_dir / "installation.id"
    if not path.exists():
        ensure_private_dir(snapshot_dir)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        write_private_file(tmp, uuid.uuid4().hex + "\n")
        try:
            os.link(tmp, path)      # exclusive: a concurrent first start keeps whichever id was first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def installation_host(snapshot_dir: Path) -> str:
    """How this installation names itself to the others sharing the database: host and data directory."""
    return f"{socket.gethostname()}:{snapshot_dir.parent}"


class IndexSync:
    """The writer side of one index; one instance per index in the process that owns the graph."""

    def __init__(self, shared: SharedState, snapshot_dir: Path, spec: IndexSpec, dsn: str) -> None:
        self.spec = spec
        self.dsn = dsn                     # a rebuild reads through a connection of its own
        self.writer = IndexWriter(shared, spec)
        self.snapshot_path = snapshot_dir / f"{spec.name}.snap"
        self.consumer = {"consumer": installation_id(snapshot_dir), "index": spec.name}
        self.host = installation_host(snapshot_dir)
        self.position: str | None = None   # every change visible in it is in the graph; None: no graph yet
        self._page: tuple[str, str, int] | None = None   # (target, xid, change_id) a paged replay is at
        self.progress: Progress | None = None            # for a rebuild started by apply_pending
        self.snapshot_at: float | None = None
        self.snapshot_position: str | None = None
        self.snapshot_mutations = -1
        self.task: tuple[str, float] | None = None

    # -- start ----------------------------------------------------------------------------------------

    def start(self, conn: psycopg.Connection, progress: Progress | None = None) -> str:
        """Bring the graph up: 'attached' (still in shared memory), 'snapshot' (loaded; the changes it lacks
        are replayed by the next apply_pending calls) or 'rebuilt'."""
        self.progress = progress
        with self.writer.lock:
            self._snapshot_meta()
            row = self._consumer_row(conn)
            if self.writer.attach_current():
                if row is not None and row[0] is not None:
                    self.position = row[0]
                    return "attached"
                log.warning("index %s: no position of the graph in shared memory in the change log; "
                            "rebuilding from PostgreSQL", self.spec.name)
                self.rebuild(conn, progress, locked=True)
                return "rebuilt"
            if not self.snapshot_path.exists():
                # The normal case of a new index (or installation): nothing is wrong, hence INFO.
                log.info("index %s: no snapshot yet; building from PostgreSQL", self.spec.name)
                self.rebuild(conn, progress, locked=True)
                return "rebuilt"
            try:
                arrays, meta = snapshot.load(self.snapshot_path)
                self._check_matches(arrays)
                position = self._check_covered(conn, meta, row)
            except snapshot.SnapshotError as exc:
                log.warning("index %s: %s; rebuilding from PostgreSQL", self.spec.name, exc)
                self.rebuild(conn, progress, locked=True)
                return "rebuilt"
            self._advance(conn, position)      # first: the recorded position never runs ahead of the graph
            self.writer.install(arrays)
            self.position = self.snapshot_position = position
            self.snapshot_mutations = int(self.writer.arrays.header[hnsw.H_MUTATIONS])
            log.info("index %s: loaded snapshot of %s; replaying the changes after it", self.spec.name,
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.snapshot_at or 0)))
            return "snapshot"

    def _snapshot_meta(self) -> None:
        """When the snapshot on disk was written, for the statistics of a restarted writer."""
        try:
            self.snapshot_at = float(snapshot.read_meta(self.snapshot_path)["created_at"])
        except (snapshot.SnapshotError, KeyError, TypeError, ValueError):
            self.snapshot_at = None

    def _consumer_row(self, conn: psycopg.Connection) -> tuple[str | None, str] | None:
        """(applied, durable) of this installation, None without a position (or one of another cluster)."""
        row = conn.execute(query("index", "consumer"), self.consumer).fetchone()
        return (row[0], row[1]) if row is not None and row[2] else None

    def _check_matches(self, arrays: hnsw.HnswArrays) -> None:
        s = self.spec
        if (arrays.dim, arrays.metric, arrays.m) != (s.dim, s.metric, s.m):
            raise snapshot.SnapshotError(f"{self.snapshot_path}: made for dim {arrays.dim}, {arrays.metric}, "
                                         f"m {arrays.m}; the index is dim {s.dim}, {s.metric}, m {s.m}")

    def _check_covered(self, conn: psycopg.Connection, meta: dict, row: tuple[str | None, str] | None) -> str:
        """The snapshot's position, if every change it lacks is still in the log; else SnapshotError."""
        if row is None:
            raise snapshot.SnapshotError(
                f"no position of this installation in the change log (new, or away for longer than "
                f"{CONSUMER_EXPIRY}: the other installations dropped it and pruned the log)")
        position = meta.get("position")
        if not isinstance(position, str):
            raise snapshot.SnapshotError(f"{self.snapshot_path}: written by an older version (no change-log position)")
        try:
            covered = conn.execute(query("index", "snapshot_covers"),
                                   {"position": position, "durable": row[1]}).fetchone()[0]
        except psycopg.DataError as exc:
            raise snapshot.SnapshotError(f"{self.snapshot_path}: bad position {position[:40]!r}: "
                                         f"{str(exc).strip()[:100]}") from None
        if not covered:
            raise snapshot.SnapshotError(f"{self.snapshot_path}: older than this installation's last snapshot "
                                         "recorded in the database (changes it lacks may be deleted)")
        return position

    def _advance(self, conn: psycopg.Connection, applied: str | None) -> bool:
        """Record that the graph holds `applied` (None: only that we are alive). False, and the position
        forgotten (the next apply_pending rebuilds), when the other installations dropped ours."""
        if conn.execute(query("index", "advance_consumer"), {**self.consumer, "applied": applied}).fetchone():
            return True
        if self.position is not None:
            log.warning("index %s: this installation's position in the change log was dropped (unseen for "
                        "longer than %s); rebuilding from PostgreSQL", self.spec.name, CONSUMER_EXPIRY)
        self.position = self._page = None
        return False

    def rebuild(self, conn: psycopg.Connection, progress: Progress | None = None, locked: bool = False) -> int:
        """A new graph from every row of the index; returns the number of vectors. Holds the index lock for
        the whole build, so no change is applied to the old graph meanwhile (they wait in the log)."""
        if not locked:
            with self.writer.lock:
                return self.rebuild(conn, progress, locked=True)
        s = self.spec
        done = 0
        self.task = ("rebuilding", 0.0)
        # Registered (committed) before the build's snapshot is taken, so that no installation deletes a
        # change the build does not contain; see register_consumer.
        conn.execute(query("index", "register_consumer"), {**self.consumer, "host": self.host})
        # One REPEATABLE READ snapshot for the rows and for the position: the changes visible in it are
        # exactly those the rows reflect; later ones (committed during the build) are replayed.
        with db.connect(self.dsn, "index rebuild", autocommit=False) as snap:
            snap.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            position = snap.execute(query("index", "current_position")).fetchone()[0]
            total = snap.execute(query("index", "count_vectors"), {"index": s.name}).fetchone()[0]
            arrays = hnsw.HnswArrays.allocate(max(1024, int(total * 1.25) + 1), s.dim, m=s.m,
                                              ef_construction=s.ef_construction, metric=s.metric,
                                              ef_search=s.ef_search)
            with snap.cursor(name=f"rebuild_{s.name}") as cur:
                cur.execute(query("index", "all_vectors"), {"index": s.name})
                while rows := cur.fetchmany(REBUILD_CHUNK):
                    labels, tenants, keys = row_arrays(rows)
                    hnsw.add_items(arrays, to_matrix(rows, s.dim), labels, tenants, keys=keys)
                    done += len(rows)
                    self.task = ("rebuilding", done / max(total, 1))
                    if progress:
                        progress(done, total)
        self.writer.install(arrays)
        self.position, self._page = position, None
        self._advance(conn, position)
        self.task = None
        self.publish_task(conn)
        log.info("index %s: rebuilt from %d rows", s.name, done)
        return done

    # -- changes --------------------------------------------------------------------------------------

    def apply_pending(self, conn: psycopg.Connection, locked: bool = False) -> int:
        """Apply up to APPLY_BATCH of the changes the graph lacks; returns how many were applied (APPLY_BATCH:
        call again, the rest of that replay follows). The position advances once a replay is complete."""
        if not locked:
            if not self.writer.lock.acquire(timeout=0.05):
                return 0     # a rebuild or a snapshot holds the graph; the changes wait, they are durable
            try:
                return self.apply_pending(conn, locked=True)
            finally:
                self.writer.lock.release()
        self.writer.refresh()
        if self.position is None:       # dropped while we were away or stuck: the log may lack changes
            self.rebuild(conn, self.progress, locked=True)
            return 0
        checked_at = time.time()        # before the query: every change committed before it is seen
        target, from_xid, from_id = self._page or (None, None, 0)
        rows = conn.execute(query("index", "pending_changes"), {
            "index": self.spec.name, "position": self.position, "target": target, "from_xid": from_xid,
            "from_id": from_id, "limit": APPLY_BATCH}).fetchall()
        if rows:
            target = rows[0][3]
            self._apply(conn, sorted({r[1] for r in rows if r[1] is not None}))
        if len(rows) == APPLY_BATCH:
            self._page = (target, rows[-1][2], rows[-1][0])
            return len(rows)
        self._page = None
        if target is not None and self._advance(conn, target):
            self.position = target
        if from_id == 0 and self.writer.arrays is not None:      # a whole replay: caught up as of checked_at
            self.writer.arrays.header[hnsw.H_SYNCED_MS] = int(checked_at * 1000)
        return len(rows)

    def _apply(self, conn: psycopg.Connection, vector_ids: list[int]) -> None:
        """Make the graph match the current rows of `vector_ids` (a row gone is a delete)."""
        current = conn.execute(query("index", "rows_by_id"), {"ids": vector_ids, "index": self.spec.name}).fetchall()
        present = {r[0] for r in current}
        inject.point("index-apply")
        with self.writer.lock.writing():
            if current:
                labels, tenants, keys = row_arrays(current)
                self.writer.upsert(labels, to_matrix(current, self.spec.dim), tenants, keys)
            elif self.writer.arrays is None:
                self.writer.ensure_room(0)
            self.writer.delete([v for v in vector_ids if v not in present])

    # -- snapshots and stats --------------------------------------------------------------------------

    def snapshot_if_changed(self, conn: psycopg.Connection) -> bool:
        """Write a snapshot when the graph or its position changed since the last one; then record it as
        this installation's durable position, drop installations unseen for CONSUMER_EXPIRY, and delete the
        changes every remaining installation has on disk."""
        a = self.writer.arrays
        if a is None or self.position is None or (int(a.header[hnsw.H_MUTATIONS]) == self.snapshot_mutations
                                                  and self.position == self.snapshot_position):
            return False
        with self.writer.lock:
            self.writer.refresh()
            a = self.writer.arrays
            copy = hnsw.HnswArrays.from_buffer(np.array(np.frombuffer(a.buffer, np.uint8)[: a.nbytes]))
            position, mutations = self.position, int(a.header[hnsw.H_MUTATIONS])
        if position is None:
            return False
        self.snapshot_path.parent.mkdir(mode=0o700, exist_ok=True)
        created = time.time()
        snapshot.save(self.snapshot_path, copy, {"index": self.spec.name, "position": position, "created_at": created})
        conn.execute(query("index", "snapshot_written"), {**self.consumer, "durable": position})
        for host, seen_at in conn.execute(query("index", "drop_stale_consumers"),
                                          {"index": self.spec.name, "expiry": CONSUMER_EXPIRY}):
            log.warning("index %s: dropped the change-log position of %s (unseen since %s); it rebuilds from "
                        "the table when it returns", self.spec.name, host, f"{seen_at:%Y-%m-%d %H:%M:%S %Z}")
        conn.execute(query("index", "forget_changes"), {"index": self.spec.name})
        self.snapshot_at, self.snapshot_mutations, self.snapshot_position = created, mutations, position
        return True

    def publish_task(self, conn: psycopg.Connection) -> None:
        """What the index is busy with, for `neurondb status` (from any process, e.g. a CLI rebuild)."""
        conn.execute(query("index", "publish_task"), {"index": self.spec.name, "task": self.task[0] if self.task
                                                      else None, "progress": self.task[1] if self.task else None})

    def publish_stats(self, conn: psycopg.Connection, figures: dict | None = None) -> None:
        """The graph's figures and the changes it lacks, for vector_stats; and, to the other installations
        sharing the database, that this one is alive (so its position is not dropped). `figures`: the last
        fragmentation measurement of maintenance (hnsw.fragmentation), if there is one."""
        if self.position is not None:
            self._advance(conn, None)
        a = self.writer.arrays
        st = hnsw.stats(a) if a is not None else {}
        pending = conn.execute(query("index", "count_pending"),
                               {"index": self.spec.name, "position": self.position}).fetchone()[0]
        nodes = int(st.get("count", 0)) - int(st.get("free", 0))
        tombstones = int(st.get("deleted", 0))
        entry = int(st.get("entry_point", -1))
        conn.execute(query("index", "publish_stats"), {
            "index": self.spec.name, "nodes": nodes - tombstones, "tombstones": tombstones,
            "edges": int(st.get("edges_level0", 0)) + int(st.get("edges_upper", 0)),
            "levels": int(st.get("max_level", -1)) + 1,
            "entry_point": int(a.labels[entry]) if a is not None and entry >= 0 else None,
            "memory": a.nbytes if a is not None else 0,
            # the last cycle's measure, but never below the tombstone share now (deletes since are counted)
            "fragmentation": max(figures["fragmentation_ratio"] if figures else 0.0,
                                 tombstones / nodes if nodes else 0.0),
            "snapshot_at": self.snapshot_at, "task": self.task[0] if self.task else None,
            "progress": self.task[1] if self.task else None, "pending": pending,
            "generation": int(self.writer.counter), "capacity": a.capacity if a is not None else 0,
            "ef_search": a.ef_search if a is not None else None,
            **{key: (figures or {}).get(key, default) for key, default in _FIGURES.items()},
            "free": int(st.get("free", 0)),
        })

    def close(self) -> None:
        self.writer.close()
