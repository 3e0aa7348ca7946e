"""The index writer under chaos: killed while it grows the graph, failing on every batch, and two
installations (two data directories) sharing one database's change log."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

import neurondb
from neurondb.index import hnsw
from neurondb.index.store import IndexSpec, IndexWriter, index_key
from neurondb.shm import names
from neurondb.shm.control import SharedState
from neurondb.shm.names import instance_prefix, unlink_all
from neurondb.shm.segment import Segment, generation_name
from tests.service import Service, index_connection, wait_for
from tests.test_index import DIM, LOAD, graph_labels, insert, table_ids


@pytest.fixture
def conn(fresh_dsn: str) -> Iterator[psycopg.Connection]:
    with index_connection(fresh_dsn, DIM) as c:
        yield c


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Services a test starts; all closed at the end, whatever state the test left them in."""
    started: list[Service] = []
    try:
        yield started
    finally:
        for svc in started:
            svc.close()


def wait_logged(svc: Service, predicate, timeout: float, what: str) -> None:
    """wait_for, with the service's log tail in the failure message (read when it fails, not before)."""
    try:
        wait_for(predicate, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{svc.log_tail(30)}") from None


def index_segments(svc: Service) -> list[str]:
    """The /dev/shm entries of the generations of index 'docs'."""
    base = names.object_name(svc.prefix, index_key("docs"))
    return [e for e in svc.shm_objects() if e.startswith(base.lstrip("/") + ".g")]


def all_found_by_own_vector(svc: Service, dsn: str, conn: psycopg.Connection) -> list[str]:
    """doc_ids of the table that a k=1 search with their own vector does not return (empty: all found)."""
    rows = conn.execute("SELECT doc_id, embedding FROM neurondb.neurondb_vectors WHERE index_name = 'docs'").fetchall()
    with neurondb.connect(str(svc.datadir.root), dsn) as client:
        return [doc for doc, vec in rows if client.search("docs", np.asarray(vec), k=1, ef=64)[0].doc_id != doc]


def test_writer_killed_while_growing_does_not_jam_the_index(tmp_path: Path, fresh_dsn: str,
                                                            conn: psycopg.Connection, services) -> None:
    """Defect 1: SIGKILL the writer between creating generation N+1 and publishing it. The restarted writer
    must not fail forever on "segment ... already exists": it grows, catches up, and leaks no segment."""
    svc = Service(tmp_path / "data", fresh_dsn,
                  env={"NEURONDB_INJECTION_POINTS": "neurandefrag:index-grow=sleep:2"})
    services.append(svc)
    svc.start()
    rng = np.random.default_rng(11)
    insert(conn, rng.standard_normal((100, DIM)).astype(np.float32))
    wait_for(lambda: graph_labels(svc) == table_ids(conn), LOAD, "the graph to load")
    shared = SharedState.attach(svc.prefix)
    try:
        counter = shared.generation(index_key("docs"))
        published = int(counter)
        unpublished = names.segment_path(generation_name(names.object_name(svc.prefix, index_key("docs")),
                                                         published + 1))
        insert(conn, rng.standard_normal((1500, DIM)).astype(np.float32), start=100)   # past capacity 1024
        wait_for(lambda: unpublished.exists() and int(counter) == published, 20.0,
                 "the writer to create the next generation", interval=0.002)
        os.kill(svc.worker("neurandefrag").pid, signal.SIGKILL)
        wait_logged(svc, lambda: graph_labels(svc) == table_ids(conn), 30.0,
                    "the restarted writer to grow the graph and catch up")
        assert int(counter) > published
        assert all_found_by_own_vector(svc, fresh_dsn, conn) == []
        base = names.object_name(svc.prefix, index_key("docs"))
        assert index_segments(svc) == [generation_name(base, int(counter)).lstrip("/")]
        # The same leftover in front of a rebuild (a writer killed mid-rebuild leaves one): no failure.
        Segment.create(generation_name(base, int(counter) + 1), 4096).close()
        svc.cli("index", "rebuild", "docs", "--now")
        assert index_segments(svc) == [generation_name(base, int(counter)).lstrip("/")]
        assert graph_labels(svc) == table_ids(conn)
    finally:
        shared.close()


def test_failing_writer_shows_its_lag_and_error(tmp_path: Path, fresh_dsn: str, conn: psycopg.Connection,
                                                services) -> None:
    """Defect 1, "the lag must be visible": while applying fails on every batch, vector_stats counts the
    pending changes and status shows the writer's error."""
    svc = Service(tmp_path / "data", fresh_dsn, env={"NEURONDB_INJECTION_POINTS": "neurandefrag:index-apply=error"})
    services.append(svc)
    svc.start()
    insert(conn, np.ones((30, DIM), np.float32))

    def pending() -> int | None:
        row = conn.execute("SELECT pending_changes FROM neurondb.vector_stats WHERE index_name = 'docs'").fetchone()
        return row[0] if row else None

    wait_logged(svc, lambda: pending() == 30, 10.0, "vector_stats to show 30 pending changes")
    assert "injected failure at neurandefrag:index-apply" in svc.worker("neurandefrag").last_error
    assert graph_labels(svc) == set()


def test_two_installations_on_one_database_each_see_every_change(tmp_path: Path, fresh_dsn: str,
                                                                 conn: psycopg.Connection, services) -> None:
    """Defect 7: B is stopped while rows are written; A applies them, snapshots and prunes the change log.
    B restarted still finds every row. A position dropped after a long absence means a rebuild."""
    a = Service(tmp_path / "a", fresh_dsn)
    b = Service(tmp_path / "b", fresh_dsn)
    services.extend([a, b])
    a.start()
    b.start()
    rng = np.random.default_rng(12)
    insert(conn, rng.standard_normal((100, DIM)).astype(np.float32))
    for svc in (a, b):
        wait_for(lambda svc=svc: graph_labels(svc) == table_ids(conn), LOAD, f"{svc.datadir.root.name} to load")
    b.cli("stop")
    insert(conn, rng.standard_normal((200, DIM)).astype(np.float32), start=100)
    wait_for(lambda: graph_labels(a) == table_ids(conn), 10.0, "A to apply the 200 rows")
    a.cli("stop")                                  # a clean stop snapshots, then prunes the change log
    b.start()
    wait_logged(b, lambda: graph_labels(b) == table_ids(conn), 20.0, "B to find all 300 rows")
    assert "loaded snapshot" in b.log_tail(100)

    # B away for longer than the change log keeps a position: A drops it and prunes; B rebuilds on return.
    b.cli("stop")
    insert(conn, rng.standard_normal((50, DIM)).astype(np.float32), start=300)
    a.start()
    wait_for(lambda: graph_labels(a) == table_ids(conn), LOAD, "A to catch up")
    assert conn.execute("UPDATE neurondb.neurondb_index_consumers SET seen_at = now() - interval '2 days' "
                        "WHERE host LIKE %s", (f"%{b.datadir.root}",)).rowcount == 1
    a.cli("stop")
    assert "dropped the change-log position of" in a.log_tail(50)
    assert conn.execute("SELECT count(*) FROM neurondb.neurondb_vector_changes").fetchone()[0] == 0   # pruned
    b.start()
    wait_logged(b, lambda: graph_labels(b) == table_ids(conn), LOAD, "B to rebuild")
    assert "rebuilding from PostgreSQL" in b.log_tail(100)


def test_writer_repairs_what_its_own_failed_write_left(tmp_path: Path) -> None:
    """A write that raises half-way (a bug, an OverflowError) leaves the lock dirty and maybe the writer flag
    set, as a death there would; the same writer process repairs it before its next write instead of going on
    with a half-written graph and a label map out of step."""
    prefix = instance_prefix(tmp_path)
    state = SharedState.create(prefix, 1)
    try:
        writer = IndexWriter(state, IndexSpec("t", 8, "l2"))
        vectors = np.random.default_rng(1).standard_normal((100, 8)).astype(np.float32)
        with writer.lock, writer.lock.writing():
            writer.upsert(np.arange(100), vectors, np.full(100, -1, np.int32),
                          np.stack([hnsw.encode_key(f"d{i}", "default") for i in range(100)]))
        with writer.lock:
            with pytest.raises(RuntimeError), writer.lock.writing():
                writer.arrays.header[hnsw.H_WRITER] = writer.arrays.count + 1     # an insert in progress
                writer.ids.pop(5)                                               # the map half-updated
                raise RuntimeError("failed half-way")
            assert writer.lock.dirty
            writer.refresh()
            assert not writer.lock.dirty and not hnsw.needs_repair(writer.arrays) and writer.ids[5] >= 0
            labels, _ = hnsw.search(writer.arrays, vectors[5], 1)
            assert labels.tolist() == [5]
        writer.close()
    finally:
        state.close()
        unlink_all(prefix)
