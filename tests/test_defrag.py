"""neurandefrag's graph maintenance against the real service (issue 11): pruning of a deleted region, slot
reuse under churn, the rebuild window and --now, a writer SIGKILLed mid-compaction, a node cut off from the
graph reconnected."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

import neurondb
from neurondb.index import hnsw
from neurondb.index.store import REUSE_GRACE, SharedIndex, index_key
from neurondb.shm.control import SharedState
from tests.service import Service, running_service, wait_for
from tests.test_hnsw import exact

DIM = 16
N = 3000
K = 10
EF = 32
def window_not_now() -> str:
    """A maintenance window that does not contain the present hour: the tests that expect a compaction
    must not get a rebuild because they happen to run inside the default window (02:00-04:00)."""
    hour = time.localtime().tm_hour
    return f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"


FAST = {"neurondb.neurandefrag_naptime": "1s", "neurondb.neuranmon_enabled": "off",
        "neurondb.neurandefrag_compact_threshold": "0", "neurondb.neurandefrag_maintenance_window": window_not_now()}


@pytest.fixture
def conn(fresh_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        c.execute("SELECT neurondb.create_index('docs', %s, 'l2')", (DIM,))
        yield c


def data(n: int, seed: int) -> np.ndarray:
    """Clustered vectors: 20 clusters in DIM dimensions."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(0).standard_normal((20, DIM)) * 3
    return (centers[rng.integers(0, 20, n)] + rng.standard_normal((n, DIM))).astype(np.float32)


def copy_in(conn: psycopg.Connection, vectors: np.ndarray, start: int) -> None:
    with conn.cursor() as cur, cur.copy("COPY neurondb.neurondb_vectors (index_name, doc_id, embedding) "
                                        "FROM STDIN") as copy:
        for i, v in enumerate(vectors):
            copy.write_row(("docs", f"d{start + i}", "{" + ",".join(map(repr, v.tolist())) + "}"))


def stats(conn: psycopg.Connection) -> dict:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute("SELECT * FROM neurondb.vector_stats WHERE index_name = 'docs'").fetchone()


def live_rows(conn: psycopg.Connection) -> tuple[np.ndarray, np.ndarray]:
    rows = conn.execute("SELECT id, embedding FROM neurondb.neurondb_vectors WHERE index_name = 'docs' "
                        "ORDER BY id").fetchall()
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows], np.float32)


class Graph:
    """The service's graph of 'docs', attached read-only as a client would."""

    def __init__(self, svc: Service) -> None:
        self.shared = SharedState.attach(svc.prefix)
        self.index = SharedIndex(self.shared, "docs")

    def arrays(self) -> hnsw.HnswArrays:
        a = self.index.arrays()
        assert a is not None
        return a

    def recall(self, ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray) -> float:
        truth = ids[exact(vectors, queries, K, "l2")]
        found, _ = hnsw.search_many(self.arrays(), queries, K, EF)
        return float(np.mean([np.intersect1d(f, t).size / K for f, t in zip(found, truth, strict=True)]))

    def close(self) -> None:
        self.index.close()
        self.shared.close()


def fresh_recall(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray) -> float:
    a = hnsw.HnswArrays.allocate(int(len(ids) * 1.25) + 1, DIM)
    hnsw.add_items(a, vectors, ids)
    truth = ids[exact(vectors, queries, K, "l2")]
    found, _ = hnsw.search_many(a, queries, K, EF)
    return float(np.mean([np.intersect1d(f, t).size / K for f, t in zip(found, truth, strict=True)]))


def loaded(conn: psycopg.Connection, svc: Service, n: int) -> None:
    wait_for(lambda: (s := stats(conn))["graph_nodes"] == n and s["pending_changes"] == 0, 60.0,
             f"the graph to hold {n} nodes\n{svc.log_tail(20)}")


def test_region_delete_is_pruned_and_searches_never_fail(tmp_path: Path, fresh_dsn: str,
                                                         conn: psycopg.Connection) -> None:
    """Delete the 30 % of the index nearest one point: within two cycles the tombstones are gone (rows
    freed), recall at the index's ef is within 0.01 of a fresh build of the live vectors, and no search
    during the maintenance fails or returns a deleted document."""
    base = data(N, 1)
    copy_in(conn, base, 0)
    with running_service(tmp_path / "data", fresh_dsn, FAST) as svc:
        graph = None
        try:
            loaded(conn, svc, N)
            ids, vectors = live_rows(conn)
            centre = vectors[0]
            region = ids[np.argsort(((vectors - centre) ** 2).sum(1))[: N * 3 // 10]]
            queries = data(300, 2)
            queries[:100] = centre + np.random.default_rng(3).standard_normal((100, DIM)).astype(np.float32)
            failures: list[str] = []
            stop = threading.Event()
            deleted_at: list[float] = []          # when the DELETE committed
            deleted = {r[0] for r in conn.execute("SELECT doc_id FROM neurondb.neurondb_vectors WHERE id = ANY(%s)",
                                                  (region.tolist(),))}

            def search_loop() -> None:
                with neurondb.connect(str(svc.datadir.root), fresh_dsn) as client:
                    while not stop.is_set():
                        for q in queries[:100:7]:
                            started = time.monotonic()
                            try:
                                hits = client.search("docs", q, k=K)
                            except Exception as exc:
                                failures.append(repr(exc))
                                continue
                            if deleted_at and started > deleted_at[0] + 1.0:    # deleted more than a second ago
                                failures.extend(f"deleted {h.doc_id} returned" for h in hits if h.doc_id in deleted)

            searcher = threading.Thread(target=search_loop)
            searcher.start()
            conn.execute("DELETE FROM neurondb.neurondb_vectors WHERE id = ANY(%s)", (region.tolist(),))
            deleted_at.append(time.monotonic())
            wait_for(lambda: stats(conn)["tombstones"] == 0 and stats(conn)["free_slots"] == len(region), 20.0,
                     f"the tombstones to be pruned\n{svc.log_tail(20)}")
            stop.set()
            searcher.join()
            assert failures == []
            ids, vectors = live_rows(conn)
            graph = Graph(svc)
            ours, fresh = graph.recall(ids, vectors, queries), fresh_recall(ids, vectors, queries)
            assert ours >= fresh - 0.01, (ours, fresh)
            s = stats(conn)
            assert s["unreachable"] == 0 and s["entry_live"] and s["dead_edge_ratio"] == 0, s
            ops = conn.execute("SELECT operation, tombstones_removed FROM neurondb.neurondb_index_maintenance "
                               "WHERE index_name = 'docs' AND status = 'completed'").fetchall()
            assert ("prune", len(region)) in ops, ops
        finally:
            if graph is not None:
                graph.close()


def test_churn_reuses_rows(tmp_path: Path, fresh_dsn: str, conn: psycopg.Connection) -> None:
    """10 rounds of delete 10 % + insert 10 % new vectors: freed rows are reused, so the graph's rows and
    memory stay where the first round left them, and recall stays at a fresh build's. Meanwhile the table
    thread ANALYZEs the bulk-loaded table (autovacuum is off on it, so only neurandefrag can)."""
    conn.execute("ALTER TABLE neurondb.neurondb_vectors SET (autovacuum_enabled = off)")
    copy_in(conn, data(N, 1), 0)
    with running_service(tmp_path / "data", fresh_dsn, FAST) as svc:
        graph = None
        try:
            loaded(conn, svc, N)
            graph = Graph(svc)
            rng = np.random.default_rng(4)
            sizes = []
            for round_ in range(10):
                ids, _ = live_rows(conn)
                gone = rng.choice(ids, N // 10, replace=False)
                conn.execute("DELETE FROM neurondb.neurondb_vectors WHERE id = ANY(%s)", (gone.tolist(),))
                wait_for(lambda: stats(conn)["tombstones"] == 0, 20.0, f"round {round_} pruned\n{svc.log_tail(20)}")
                time.sleep(REUSE_GRACE)         # the freed rows become reusable
                copy_in(conn, data(N // 10, 100 + round_), N + round_ * N)
                loaded(conn, svc, N)
                sizes.append((graph.arrays().count, stats(conn)["memory_bytes"]))
            assert len({m for _, m in sizes}) == 1, sizes                 # no growth of the segment
            assert max(c for c, _ in sizes) <= N + N // 10, sizes   # rows reused, not appended
            ids, vectors = live_rows(conn)
            queries = data(200, 9)
            ours, fresh = graph.recall(ids, vectors, queries), fresh_recall(ids, vectors, queries)
            assert ours >= fresh - 0.01, (ours, fresh)
            ops = conn.execute("SELECT operation, status FROM neurondb.neurondb_index_maintenance "
                               "WHERE table_name = 'neurondb.neurondb_vectors'").fetchall()
            assert ("analyze", "completed") in ops or ("vacuum", "completed") in ops, ops
        finally:
            if graph is not None:
                graph.close()


def test_rebuild_waits_for_the_window_unless_now(tmp_path: Path, fresh_dsn: str, conn: psycopg.Connection) -> None:
    """Outside neurandefrag_maintenance_window a requested rebuild waits (cycles pass, none runs); --now
    runs it at once, with the new graph published and recorded; compaction needs no window."""
    copy_in(conn, data(N, 1), 0)
    window = FAST["neurondb.neurandefrag_maintenance_window"]
    with running_service(tmp_path / "data", fresh_dsn, FAST) as svc:
        loaded(conn, svc, N)
        out = svc.cli("index", "rebuild", "docs")
        assert f"runs in the maintenance window {window}" in out.stdout, out.stdout
        generation = stats(conn)["generation"]
        time.sleep(3.5)                                  # three cycles of 1 s
        ops = conn.execute("SELECT operation FROM neurondb.neurondb_index_maintenance "
                           "WHERE operation IN ('rebuild', 'compaction')").fetchall()
        assert ops == [] and stats(conn)["generation"] == generation, ops
        out = svc.cli("index", "rebuild", "docs", "--now")
        assert f"rebuild of docs done: {N} nodes" in out.stdout, out.stdout
        s = wait_for(lambda: (s := stats(conn))["generation"] > generation and s, 10.0, "the new graph's stats")
        assert s["last_rebuild"] is not None and s["graph_nodes"] == N, s
        out = svc.cli("index", "compact", "docs")
        assert f"compaction of docs done: {N} nodes" in out.stdout, out.stdout
        assert conn.execute("SELECT neurondb_indexes.maintenance_request FROM neurondb.neurondb_indexes").fetchone() \
            == (None,)
        bad = svc.cli("index", "compact", "nope", check=False)
        assert bad.returncode == 1 and "no index 'nope'" in bad.stderr, bad.stderr


def test_writer_killed_mid_compaction(tmp_path: Path, fresh_dsn: str, conn: psycopg.Connection) -> None:
    """SIGKILL neurandefrag in the middle of a compaction: searches keep working on the published graph, the
    operation is marked interrupted, the unpublished segment is removed, and the next writer compacts."""
    copy_in(conn, data(N, 1), 0)
    with running_service(tmp_path / "data", fresh_dsn, FAST,
                         env={"NEURONDB_INJECTION_POINTS": "neurandefrag:defrag-build=sleep:3"}) as svc:
        graph = None
        try:
            loaded(conn, svc, N)
            ids, vectors = live_rows(conn)
            conn.execute("DELETE FROM neurondb.neurondb_vectors WHERE id = ANY(%s)", (ids[: N // 2].tolist(),))
            conn.execute("UPDATE neurondb.neurondb_indexes SET maintenance_request = 'compaction'")
            wait_for(lambda: conn.execute("SELECT 1 FROM neurondb.neurondb_index_maintenance "
                                          "WHERE operation = 'compaction' AND status = 'running'").fetchone(), 30.0,
                     f"the compaction to start\n{svc.log_tail(20)}")
            time.sleep(0.5)                                   # inside the build's first slice
            os.kill(svc.worker("neurandefrag").pid, signal.SIGKILL)
            with neurondb.connect(str(svc.datadir.root), fresh_dsn) as client:
                for q in vectors[N // 2: N // 2 + 50]:
                    assert len(client.search("docs", q, k=K)) == K
            wait_for(lambda: conn.execute("SELECT status FROM neurondb.neurondb_index_maintenance "
                                          "WHERE operation = 'compaction' ORDER BY maintenance_id").fetchall()
                     == [("interrupted",), ("completed",)], 60.0, f"the next writer to compact\n{svc.log_tail(30)}")
            s = wait_for(lambda: (s := stats(conn))["capacity"] < N and s, 10.0, "the compact graph's stats")
            assert s["graph_nodes"] == N - N // 2 and s["free_slots"] == 0, s
            base = svc.prefix
            segments = [e for e in svc.shm_objects() if ".g" in e and e.startswith(base.lstrip("/"))]
            assert len(segments) == 1, segments
            graph = Graph(svc)
            assert graph.recall(*live_rows(conn), data(100, 7)) >= 0.9
        finally:
            if graph is not None:
                graph.close()


def test_a_node_cut_off_from_the_graph_is_reconnected(tmp_path: Path, fresh_dsn: str,
                                                     conn: psycopg.Connection) -> None:
    """Remove every link to one node (as a damaged graph would have it): the next cycle finds it unreachable,
    re-links it, and a search with its own vector finds it again."""
    copy_in(conn, data(N, 1), 0)
    with running_service(tmp_path / "data", fresh_dsn, FAST) as svc:
        shared = None
        try:
            loaded(conn, svc, N)
            shared = SharedState.attach(svc.prefix)
            index = SharedIndex(shared, "docs")
            with shared.lock(index_key("docs")):
                a = index.arrays()
                assert a is not None
                victim = int(a.labels[a.count // 2])
                node = int(hnsw.find_labels(a, [victim])[0])
                for i in range(a.count):
                    for level in range(int(a.levels[i]) + 1):
                        lst = a.links0[i] if level == 0 else a.pool[a.upper_offset[i] + level - 1]
                        kept = [x for x in lst[1: 1 + lst[0]] if x != node]
                        lst[1: 1 + len(kept)] = kept
                        lst[0] = len(kept)
                assert hnsw.fragmentation(a)["unreachable"] >= 1
            wait_for(lambda: conn.execute("SELECT details FROM neurondb.neurondb_index_maintenance "
                                          "WHERE operation = 'cleanup'").fetchone(), 20.0,
                     f"the cleanup\n{svc.log_tail(20)}")
            details = conn.execute("SELECT details FROM neurondb.neurondb_index_maintenance "
                                   "WHERE operation = 'cleanup'").fetchone()[0]
            assert details["relinked"] >= 1 and details["unreachable_after"] == 0, details
            found, _ = hnsw.search(index.arrays(), index.arrays().vectors[node], k=1, ef=EF)
            assert found[0] == victim
            index.close()
        finally:
            if shared is not None:
                shared.close()


def test_unreachable_recall_triggers_one_rebuild(tmp_path: Path, fresh_dsn: str, conn: psycopg.Connection) -> None:
    """When neuranmon reports a recall target it cannot reach at the maximum ef (its state row, written here
    as neuranmon writes it; neuranmon itself is off), the next cycle rebuilds the graph from the table, outside
    the window and with no fragmentation, and does not rebuild again for that within a day."""
    copy_in(conn, data(N, 1), 0)
    with running_service(tmp_path / "data", fresh_dsn, FAST) as svc:
        loaded(conn, svc, N)
        conn.execute("INSERT INTO neurondb.neurondb_tuning_state (index_name, state, reason) VALUES ('docs', "
                     "'unattainable', 'SLO unattainable: recall 0.999 not reached at the maximum ef 800 "
                     "(recall 0.990, lower bound 0.985)')")

        def rebuilds() -> list[tuple]:
            return conn.execute("SELECT status FROM neurondb.neurondb_index_maintenance "
                                "WHERE operation = 'rebuild'").fetchall()
        wait_for(lambda: rebuilds() == [("completed",)], 30.0, f"the rebuild\n{svc.log_tail(20)}")
        time.sleep(3.5)                                   # three more cycles: no second rebuild
        assert rebuilds() == [("completed",)]
