"""The vector index through the real service: PostgreSQL rows -> change log -> graph in shared memory ->
search from any process; snapshots, replay, rebuild, and a writer killed mid-insert."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psycopg
import pytest

import neurondb
from neurondb.client import SearchError
from neurondb.index import hnsw
from neurondb.index.store import SharedIndex
from neurondb.shm.control import SharedState
from tests.fixtures import index_service_fixtures
from tests.service import Service, wait_for

DIM = 16
LOAD = 60.0    # first load: the workers may compile the numba kernels (cold cache, busy machine)


def count_hits(client, index: str, k: int, **kw) -> int:
    """Hits of a search, 0 while the service has not loaded the index yet."""
    try:
        return len(client.search(index, k=k, **kw))
    except SearchError as exc:
        if "not loaded yet" in str(exc):
            return 0
        raise


conn, service, client = index_service_fixtures(DIM, {"neurondb.neuranmon_naptime": "1s"})


def insert(conn: psycopg.Connection, vectors: np.ndarray, start: int = 0, tenant: str = "default",
           content: str | None = None) -> None:
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, tenant_id, content, embedding) "
                        "VALUES ('docs', %s, %s, %s, %s)",
                        [(f"d{start + i}", tenant, content, v.tolist()) for i, v in enumerate(vectors)])


def graph_labels(service: Service) -> set[int]:
    shared = SharedState.attach(service.prefix)
    try:
        idx = SharedIndex(shared, "docs")
        a = idx.arrays()
        if a is None:
            return set()      # not loaded yet
        n = a.count
        out = set(a.labels[:n][a.tombstones[:n] == 0].tolist())
        idx.close()
        return out
    finally:
        shared.close()


def table_ids(conn: psycopg.Connection) -> set[int]:
    return {r[0] for r in conn.execute("SELECT id FROM neurondb.neurondb_vectors WHERE index_name = 'docs'")}


def test_plain_sql_insert_is_searchable_within_a_second(client, conn: psycopg.Connection) -> None:
    rng = np.random.default_rng(1)
    insert(conn, rng.standard_normal((200, DIM)).astype(np.float32))
    wait_for(lambda: count_hits(client, "docs", 5, vector=np.zeros(DIM)) == 5, LOAD, "the index to load")
    target = rng.standard_normal(DIM).astype(np.float32) * 10
    t0 = time.monotonic()
    conn.execute("INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, embedding) VALUES ('docs', 'new', %s)",
                 (target.tolist(),))
    wait_for(lambda: client.search("docs", target, k=1)[0].doc_id == "new", 1.0, "the new row to be found")
    assert time.monotonic() - t0 < 1.0


def test_tenants_deletes_and_updates(client, conn: psycopg.Connection) -> None:
    rng = np.random.default_rng(2)
    insert(conn, rng.standard_normal((100, DIM)).astype(np.float32), tenant="a")
    insert(conn, rng.standard_normal((100, DIM)).astype(np.float32), start=100, tenant="b")
    wait_for(lambda: count_hits(client, "docs", 200, vector=np.zeros(DIM)) == 200, LOAD, "200 rows in the graph")
    hits = client.search("docs", np.zeros(DIM), k=50, tenant="b")
    assert len(hits) == 50 and {h.tenant_id for h in hits} == {"b"}
    conn.execute("DELETE FROM neurondb.neurondb_vectors WHERE tenant_id = 'a'")
    wait_for(lambda: len(client.search("docs", np.zeros(DIM), k=200)) == 100, 2.0, "deletes to reach the graph")
    assert {h.tenant_id for h in client.search("docs", np.zeros(DIM), k=200, ef=400)} == {"b"}
    far = np.full(DIM, 50.0, np.float32)
    conn.execute("UPDATE neurondb.neurondb_vectors SET embedding = %s WHERE doc_id = 'd150'", (far.tolist(),))
    wait_for(lambda: client.search("docs", far, k=1)[0].doc_id == "d150", 2.0, "the update to reach the graph")


def test_search_input_errors(client, conn: psycopg.Connection) -> None:
    insert(conn, np.ones((3, DIM), np.float32))
    with pytest.raises(SearchError, match="3 dimensions, index 'docs' expects 16"):
        client.search("docs", [1.0, 2.0, 3.0])
    with pytest.raises(SearchError, match="NaN"):
        client.search("docs", np.full(DIM, np.nan))
    with pytest.raises(SearchError, match="no index 'nope'"):
        client.search("nope", np.zeros(DIM))
    with pytest.raises(SearchError, match="k must be"):
        client.search("docs", np.zeros(DIM), k=0)


def test_text_and_hybrid_search_through_embed_jobs(service: Service, fresh_dsn: str) -> None:
    from neurondb import queue

    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        c.execute("SELECT neurondb.create_index('notes', 384)")
        docs = {"cat": "the cat sat on the warm mat", "stocks": "stock markets fell sharply today",
                "rain": "heavy rain is expected over the weekend", "kitten": "a small kitten sleeps on a rug"}
        job = queue.enqueue(c, "embed", {"index": "notes", "documents": [
            {"doc_id": k, "text": v} for k, v in docs.items()]})
        wait_for(lambda: c.execute("SELECT status FROM neurondb.neurondb_job_queue WHERE job_id = %s",
                                   (job,)).fetchone()[0] == "completed", 10.0, "the embed job")
    with neurondb.connect(str(service.datadir.root), fresh_dsn) as client:
        wait_for(lambda: count_hits(client, "notes", 4, text="cat", hybrid_weight=1.0) == 4, LOAD, "4 notes")
        assert client.search("notes", text="the cat on the mat", k=1, hybrid_weight=1.0)[0].doc_id == "cat"
        hybrid = client.search("notes", text="markets", k=2, hybrid_weight=0.3, with_content=True)
        assert hybrid[0].doc_id == "stocks" and "markets" in hybrid[0].content


def test_metrics_reach_the_document_queries(client, conn: psycopg.Connection, document_text: str) -> None:
    from tests.test_document_sql import document_statements

    rng = np.random.default_rng(3)
    insert(conn, rng.standard_normal((300, DIM)).astype(np.float32))
    # All 300 in the graph first: searches answered from shared memory take microseconds, and 400 of them
    # against a graph still loading would be measured (rightly) as low recall against the whole table.
    wait_for(lambda: conn.execute("SELECT graph_nodes FROM neurondb.vector_stats").fetchone()[0] == 300, LOAD,
             "the index to load")
    for q in rng.standard_normal((400, DIM)).astype(np.float32):
        client.search("docs", q, k=10, ef=32)
    client.close()          # hands over the samples it still buffers (up to neurondb.client.SAMPLE_BATCH)

    def flushed() -> int:
        return conn.execute("SELECT count(*) FROM neurondb.neurondb_query_metrics").fetchone()[0]

    wait_for(lambda: flushed() >= 400, 30.0, "the tuner to flush the samples")
    current = next(q for q in document_statements(document_text) if "GROUP BY ef_search" in q)
    rows = {ef: (lat, rec) for ef, lat, rec in conn.execute(current)}
    assert 32 in rows and rows[32][0] > 0
    recall = conn.execute("SELECT avg(recall), count(recall) FROM neurondb.neurondb_query_metrics").fetchone()
    assert recall[1] >= 5 and recall[0] >= 0.9, recall
    perf = conn.execute("SELECT queries, p95_latency_ms FROM neurondb.query_performance "
                        "WHERE index_name = 'docs' AND query_type = 'vector'").fetchone()
    assert perf[0] >= 400 and perf[1] > 0


def test_restart_from_snapshot_plus_replay_then_rebuild(service: Service, conn: psycopg.Connection,
                                                        fresh_dsn: str) -> None:
    rng = np.random.default_rng(4)
    insert(conn, rng.standard_normal((500, DIM)).astype(np.float32))
    wait_for(lambda: graph_labels(service) == table_ids(conn), LOAD, "the graph to match the table")
    service.cli("stop", "-m", "smart")                            # a clean stop writes the snapshot
    assert (service.datadir.root / "indexes" / "docs.snap").exists()
    insert(conn, rng.standard_normal((50, DIM)).astype(np.float32), start=500)    # while stopped
    conn.execute("DELETE FROM neurondb.neurondb_vectors WHERE doc_id IN ('d1', 'd2', 'd3')")
    service.start()
    wait_for(lambda: graph_labels(service) == table_ids(conn), LOAD, "snapshot + replay to match the table")
    assert "loaded snapshot" in service.log_tail(100)
    service.cli("stop")
    (service.datadir.root / "indexes" / "docs.snap").write_bytes(b"garbage")      # corrupt: rebuild
    service.start()
    wait_for(lambda: graph_labels(service) == table_ids(conn), LOAD, "the rebuild to match the table")
    assert "rebuilding from PostgreSQL" in service.log_tail(100)
    out = service.cli("index", "rebuild", "docs", "--now")
    assert "rebuild of docs done: 547 nodes" in out.stdout
    assert graph_labels(service) == table_ids(conn)


def test_writer_killed_mid_insert_leaves_a_usable_index(service: Service, client,
                                                         conn: psycopg.Connection) -> None:
    """SIGKILL the graph's writer while it inserts a large batch: searches keep working meanwhile, the
    restarted writer repairs the graph and catches up with the table."""
    rng = np.random.default_rng(5)
    insert(conn, rng.standard_normal((100, DIM)).astype(np.float32))
    wait_for(lambda: count_hits(client, "docs", 10, vector=np.zeros(DIM)) == 10, LOAD, "the index to load")
    shared = SharedState.attach(service.prefix)
    idx = SharedIndex(shared, "docs")
    try:
        insert(conn, rng.standard_normal((20_000, DIM)).astype(np.float32), start=100)
        wait_for(lambda: hnsw.needs_repair(idx.arrays()), 20.0, "the writer to be mid-insert", interval=0.001)
        os.kill(service.worker("neurandefrag").pid, signal.SIGKILL)
        for q in rng.standard_normal((50, DIM)).astype(np.float32):   # the graph is usable meanwhile
            assert len(client.search("docs", q, k=5)) == 5
        wait_for(lambda: graph_labels(service) == table_ids(conn), 60.0, "the restarted writer to catch up")
        assert not hnsw.needs_repair(idx.arrays())
        assert "died holding" in service.log_tail(300)
    finally:
        idx.close()
        shared.close()
