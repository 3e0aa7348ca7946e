"""neuranmon through the real service: ef_search tuned to the recall target from either extreme, pinned
indexes left alone, operator updates and restarts honoured, and the query-metrics table bounded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psycopg
import pytest

import neurondb
from neurondb import tuning
from neurondb.client import SearchError
from neurondb.index import hnsw
from neurondb.index.store import SharedIndex
from neurondb.shm.control import SharedState
from tests.service import Service, running_service, wait_for
from tests.test_hnsw import exact

N, DIM, K = 4000, 32, 10
TARGET = 0.95
TUNER = {"neurondb.neuranmon_naptime": "1s", "neurondb.neuranmon_target_recall": str(TARGET)}


def load(conn: psycopg.Connection, ef: int, tenants: int = 1) -> np.ndarray:
    """A hard index (Gaussian data, m 8, ef_construction 40) starting at `ef`; its vectors."""
    conn.execute("SELECT neurondb.create_index('docs', %s, 'l2', 8, 40, ef_search => %s)", (DIM, ef))
    base = np.random.default_rng(1).standard_normal((N, DIM)).astype(np.float32)
    with conn.cursor().copy("COPY neurondb.neurondb_vectors (index_name, doc_id, tenant_id, embedding) FROM STDIN") \
            as copy:
        for i, v in enumerate(base):
            copy.write_row(("docs", f"d{i}", f"t{i % tenants}", v.tolist()))
    return base


def ef_of(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT ef_search FROM neurondb.neurondb_indexes WHERE index_name = 'docs'").fetchone()[0]


def header_ef(service: Service) -> int | None:
    shared = SharedState.attach(service.prefix)
    try:
        idx = SharedIndex(shared, "docs")
        a = idx.arrays()
        ef = a.ef_search if a is not None else None
        idx.close()
        return ef
    finally:
        shared.close()


def recall_curve(service: Service, base: np.ndarray, queries: np.ndarray) -> dict[int, float]:
    """Mean recall@k at every ef of the tuner's ladder on the service's own graph, with this test's exact
    search (not the tuner's)."""
    shared = SharedState.attach(service.prefix)
    idx = SharedIndex(shared, "docs")
    try:
        a = idx.arrays()
        order = np.argsort(a.labels[:N])          # label -> row of the table's insertion order
        truth = a.labels[:N][order][exact(base, queries, K, "l2")]
        curve = {}
        for ef in tuning.ef_ladder(K, 1024):
            found, _ = hnsw.search_many(a, queries, K, ef)
            curve[ef] = float(np.mean([np.intersect1d(f, t).size / K for f, t in zip(found, truth, strict=True)]))
        return curve
    finally:
        idx.close()
        shared.close()


def search_load(client: neurondb.client.Client, queries: np.ndarray, rounds: int, **kw) -> None:
    for _ in range(rounds):
        for q in queries:
            client.search("docs", q, k=K, **kw)


def wait_loaded(client: neurondb.client.Client) -> None:
    def loaded() -> bool:
        try:
            return len(client.search("docs", np.zeros(DIM), k=K)) == K
        except SearchError:
            return False
    wait_for(loaded, 60.0, "the index to load")


@pytest.mark.parametrize("start", [16, 512])
def test_ef_converges_to_the_smallest_ef_meeting_the_target(tmp_path: Path, fresh_dsn: str,
                                                           conn: psycopg.Connection, start: int) -> None:
    base = load(conn, start)
    queries = np.random.default_rng(2).standard_normal((400, DIM)).astype(np.float32)
    with (running_service(tmp_path / "data", fresh_dsn, TUNER) as svc,
          neurondb.connect(str(svc.datadir.root), fresh_dsn) as client):
        wait_loaded(client)
        curve = recall_curve(svc, base, queries)
        best = min(ef for ef, r in curve.items() if r >= TARGET)     # the oracle ef
        assert 16 < best < 512, best

        def converged() -> bool:
            search_load(client, queries, 4)       # ~80 sampled queries per round of 1,600 searches
            row = conn.execute("SELECT state, queries FROM neurondb.tuning_status").fetchone()
            return row[0] == "converged" and row[1] >= 200
        wait_for(converged, 90.0, "the tuner to converge")
        decided = ef_of(conn)
        changes = conn.execute("SELECT old_ef, new_ef, reason FROM neurondb.neurondb_tuning_history "
                               "WHERE index_name = 'docs' AND new_ef <> old_ef").fetchall()
        assert 1 <= len(changes) <= 3, changes          # within 3 decisions
        # The tuner measures a 5 % sample of these queries with a lower confidence bound: a rung or two above
        # the oracle, or by sampling luck one rung below it, never far below the target.
        assert curve[decided] >= TARGET - 0.01 and decided <= best * 1.35, (best, decided, curve, changes)
        # Steady state: further cycles keep it (no flapping).
        search_load(client, queries, 4)
        assert ef_of(conn) == decided, conn.execute("SELECT old_ef, new_ef, reason "
                                                     "FROM neurondb.neurondb_tuning_history").fetchall()
        assert header_ef(svc) == ef_of(conn)
        status = conn.execute("SELECT state, recall_low, measured_recall FROM neurondb.tuning_status "
                              "WHERE index_name = 'docs'").fetchone()
        # Converged holds ef while the lower bound stays within the hysteresis band below the target.
        assert status[0] == "converged" and status[1] >= TARGET - tuning.BAND, status
        recent = conn.execute("SELECT avg(recall) FROM neurondb.neurondb_query_metrics "
                              "WHERE ef_search = %s AND recall IS NOT NULL", (ef_of(conn),)).fetchone()[0]
        assert recent is None or recent >= TARGET - 0.03, recent


def test_tenant_filtered_workload_below_target_raises_ef(tmp_path: Path, fresh_dsn: str,
                                                         conn: psycopg.Connection) -> None:
    """Searches filtered to one of five tenants find fewer of their true neighbours at a given ef (the walk
    passes other tenants' nodes): at ef 16 their recall is far below target, and the tuner, which replays them
    with their tenant against that tenant's exact neighbours, raises ef until the lower bound meets it."""
    load(conn, 16, tenants=5)
    queries = np.random.default_rng(5).standard_normal((400, DIM)).astype(np.float32)
    with (running_service(tmp_path / "data", fresh_dsn, TUNER) as svc,
          neurondb.connect(str(svc.datadir.root), fresh_dsn) as client):
        wait_loaded(client)
        wait_for(lambda: (search_load(client, queries, 2, tenant="t3"), ef_of(conn))[1] > 16, 60.0,
                 "the tuner to raise ef for the tenant's searches")
        low = conn.execute("SELECT recall_low FROM neurondb.neurondb_tuning_state").fetchone()[0]
        assert low >= TARGET - tuning.BAND, low      # a later cycle may hold it within the band


def test_pinned_operator_updates_and_restart(tmp_path: Path, fresh_dsn: str, conn: psycopg.Connection) -> None:
    load(conn, 16)
    queries = np.random.default_rng(3).standard_normal((400, DIM)).astype(np.float32)
    with running_service(tmp_path / "data", fresh_dsn, TUNER) as svc:
        with neurondb.connect(str(svc.datadir.root), fresh_dsn) as client:
            wait_loaded(client)
            conn.execute("UPDATE neurondb.neurondb_indexes SET ef_search = 24, tuning = 'pinned'")
            wait_for(lambda: header_ef(svc) == 24, 3.0, "the pinned ef to reach the graph's header")
            search_load(client, queries, 4)
            wait_for(lambda: conn.execute("SELECT state FROM neurondb.tuning_status").fetchone()[0] == "pinned",
                     10.0, "the tuner to see the pin")
            search_load(client, queries, 2)
            assert ef_of(conn) == 24 and header_ef(svc) == 24     # pinned: never changed
            conn.execute("UPDATE neurondb.neurondb_indexes SET tuning = 'auto'")
            wait_for(lambda: (search_load(client, queries, 2), ef_of(conn))[1] > 24, 30.0,
                     "the unpinned index to be tuned up")
            tuned = ef_of(conn)
        svc.cli("stop")
        svc.start()
        with neurondb.connect(str(svc.datadir.root), fresh_dsn) as client:
            wait_loaded(client)
            wait_for(lambda: header_ef(svc) == tuned, 3.0, "the tuned ef to survive the restart")


def test_latency_priority_lowers_ef_and_reports_the_conflict(tmp_path: Path, fresh_dsn: str,
                                                            conn: psycopg.Connection) -> None:
    load(conn, 512)
    conn.execute("UPDATE neurondb.neurondb_indexes SET target_recall = 0.999, target_latency_ms = 0.01")
    queries = np.random.default_rng(4).standard_normal((400, DIM)).astype(np.float32)
    with (running_service(tmp_path / "data", fresh_dsn, {**TUNER, "neurondb.neuranmon_priority": "latency"}) as svc,
          neurondb.connect(str(svc.datadir.root), fresh_dsn) as client):
        wait_loaded(client)
        wait_for(lambda: (search_load(client, queries, 2), ef_of(conn))[1] < 512, 30.0, "ef to go down")
        state, reason = conn.execute("SELECT state, last_decision FROM neurondb.tuning_status").fetchone()
        assert state == "unattainable" and reason.startswith("SLO unattainable: recall 0.999 needs ef ")
        assert "latency has priority" in reason
        assert "SLO unattainable" in svc.datadir.log_file.read_text()


def test_query_metrics_older_than_the_retention_are_deleted(tmp_path: Path, fresh_dsn: str,
                                                           conn: psycopg.Connection) -> None:
    """Issue 9, defect 11: neurondb_query_metrics grew without bound (175 bytes per search)."""
    insert = ("INSERT INTO neurondb.neurondb_query_metrics (index_name, k, latency_ms, recorded_at) "
              "SELECT 'docs', 10, 1.0, now() - %s * interval '1 hour' FROM generate_series(1, %s)")
    conn.execute(insert, (30, 12_000))    # older than the retention: more than two delete batches
    conn.execute(insert, (1, 50))         # recent: kept
    with running_service(tmp_path / "data", fresh_dsn, {"neurondb.query_metrics_retention": "1d"}) as svc:
        def remaining() -> int:
            return conn.execute("SELECT count(*) FROM neurondb.neurondb_query_metrics").fetchone()[0]

        wait_for(lambda: remaining() == 50, 30.0, "neuranmon to delete the old samples")
        assert "removed 12000 query samples" in svc.datadir.log_file.read_text()


def test_hybrid_weight_moves_to_what_the_feedback_favours(tmp_path: Path, fresh_dsn: str,
                                                         conn: psycopg.Connection) -> None:
    """Labelled so that the best weight is known: the relevant documents of each query are its vector's nearest
    neighbours and never contain the query's word, while the word matches only distractors. Feedback on the
    searches' results should move the weight from 0.5 up towards pure vector search, with nDCG rising."""
    dim, queries = 16, 25
    rng = np.random.default_rng(7)
    conn.execute("SELECT neurondb.create_index('notes', %s, 'l2')", (dim,))
    centres = rng.standard_normal((queries, dim)).astype(np.float32) * 3
    rows = [(f"rel{j}_{i}", "alpha beta", (c + 0.01 * rng.standard_normal(dim)).tolist())
            for j, c in enumerate(centres) for i in range(3)]
    words = [" ".join(["zebra"] * (1 + i % 7) + ["gamma"] * (i % 5)) for i in range(300)]   # varied ts_rank
    rows += [(f"noise{i}", w, (rng.standard_normal(dim) * 3).tolist()) for i, w in enumerate(words)]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, content, embedding) "
                        "VALUES ('notes', %s, %s, %s)", rows)
    with (running_service(tmp_path / "data", fresh_dsn, TUNER) as svc,
          neurondb.connect(str(svc.datadir.root), fresh_dsn) as client):
        wait_for(lambda: _searchable(client, "notes", centres[0]), 60.0, "the index to load")
        for j, c in enumerate(centres):
            hits = client.search("notes", vector=c, text="zebra", k=5)
            assert isinstance(hits.query_id, int)
            for i in range(3):
                client.feedback(hits.query_id, f"rel{j}_{i}", 1.0)
        with pytest.raises(SearchError, match="relevance must be a number between 0 and 10"):
            client.feedback(hits.query_id, "rel0_0", 11)

        def moved() -> tuple | None:
            return conn.execute("SELECT old_hybrid_weight, new_hybrid_weight, ndcg_before, ndcg_after "
                                "FROM neurondb.neurondb_tuning_history WHERE index_name = 'notes' "
                                "AND new_hybrid_weight <> old_hybrid_weight").fetchone()
        old, new, before, after = wait_for(moved, 30.0, "the hybrid weight to move")
        assert old == 0.5 and new > 0.5 and after > before, (old, new, before, after)
        assert conn.execute("SELECT hybrid_weight FROM neurondb.neurondb_indexes "
                            "WHERE index_name = 'notes'").fetchone()[0] == new


def _searchable(client: neurondb.client.Client, index: str, vector: np.ndarray) -> bool:
    try:
        return len(client.search(index, vector, k=1)) == 1
    except SearchError:
        return False


def test_query_embeddings_are_cached_and_the_cache_rotated(tmp_path: Path, fresh_dsn: str,
                                                          conn: psycopg.Connection) -> None:
    """A text search on an index served by a remote provider calls the provider once per distinct query; the
    entries expire with llm_cache_ttl and neuranmon removes them, recording it in neurondb.cache_status."""
    from tests.fakeprovider import FakeProvider

    with FakeProvider(dim=8) as fake:
        conn.execute("SELECT neurondb.create_index('remote', 8, 'cosine', provider => 'openai', "
                     "model_name => 'emb-test')")
        conn.execute("INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, content, embedding) "
                     "SELECT 'remote', 'd' || i, 'doc ' || i, array_fill(i::real, ARRAY[8]) "
                     "FROM generate_series(1, 20) i")
        settings = {**TUNER, "neurondb.llm_provider": "openai", "neurondb.llm_endpoint": fake.url,
                    "neurondb.llm_cache_ttl": "2s"}
        with (running_service(tmp_path / "data", fresh_dsn, settings) as svc,
              neurondb.connect(str(svc.datadir.root), fresh_dsn) as client):
            wait_for(lambda: _searchable(client, "remote", np.ones(8)), 60.0, "the index to load")
            before = fake.count("/v1/embeddings")
            for _ in range(5):
                assert len(client.search("remote", text="the same question", k=3, hybrid_weight=1.0)) == 3
            client.search("remote", text="another question", k=3, hybrid_weight=1.0)
            assert fake.count("/v1/embeddings") - before == 2
            def expired() -> bool:
                row = conn.execute("SELECT expired FROM neurondb.cache_status WHERE cache_name = 'llm'").fetchone()
                return row is not None and row[0] >= 2
            wait_for(expired, 20.0, "neuranmon to expire the cached query embeddings")
            status = json.loads(svc.cli("status", "--json").stdout)
            assert status["caches"]["llm"]["expired"] >= 2, status["caches"]
            assert "llm cache" in svc.cli("status").stdout
            client.search("remote", text="the same question", k=3, hybrid_weight=1.0)
            assert fake.count("/v1/embeddings") - before == 3       # expired: asked again
