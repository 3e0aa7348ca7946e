"""Search from shared memory alone (issue 12): deleted documents, tenants (hash twins included), keys too long
for the graph, a stopped writer, and the batch API."""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import time

import numpy as np
import psycopg
import pytest

import neurondb
from neurondb.client import SearchError
from neurondb.index.store import tenant_code
from tests.fixtures import index_service_fixtures
from tests.service import Service, wait_for

DIM = 8


conn, service, client = index_service_fixtures(DIM, {"neurondb.neuranmon_enabled": "off"})


def insert(conn: psycopg.Connection, rows: list[tuple[str, str, np.ndarray]]) -> None:
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, tenant_id, embedding) "
                        "VALUES ('docs', %s, %s, %s)", [(d, t, v.tolist()) for d, t, v in rows])


def in_graph(client: neurondb.client.Client, conn: psycopg.Connection) -> None:
    n = conn.execute("SELECT count(*) FROM neurondb.neurondb_vectors").fetchone()[0]
    wait_for(lambda: conn.execute("SELECT graph_nodes, pending_changes FROM neurondb.vector_stats").fetchone()
             == (n, 0), 60.0, "the graph to hold the table")


def test_deleted_documents_and_read_your_writes(client, conn: psycopg.Connection) -> None:
    """A consistent search never returns a deleted document; a default one never once a second has passed,
    and answers without PostgreSQL (same hits as the consistent search on a quiet table)."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((300, DIM)).astype(np.float32)
    insert(conn, [(f"d{i}", "default", v) for i, v in enumerate(vectors)])
    in_graph(client, conn)
    for v in vectors[:20]:
        assert client.search("docs", v, k=5) == client.search("docs", v, k=5, consistent=True)
    gone = {f"d{i}" for i in range(0, 300, 3)}
    conn.execute("DELETE FROM neurondb.neurondb_vectors WHERE doc_id = ANY(%s)", (sorted(gone),))
    for i in range(0, 300, 3):                                 # at once: the consistent search
        assert gone.isdisjoint(h.doc_id for h in client.search("docs", vectors[i], k=3, consistent=True))
    time.sleep(1.0)
    for i in range(0, 300, 3):
        hits = client.search("docs", vectors[i], k=3)
        assert len(hits) == 3 and gone.isdisjoint(h.doc_id for h in hits), hits


def test_tenants_are_exact_even_for_hash_twins(client, conn: psycopg.Connection) -> None:
    """Two tenants whose names hash to the same graph code, with identical vectors: a search for one never
    returns the other's documents; a doc id too long for the graph's key is looked up and still returned."""
    seen: dict[int, str] = {}
    for i in itertools.count():
        name = hashlib.sha1(str(i).encode()).hexdigest()[:10]
        code = tenant_code(name)
        if code in seen:
            a, b = seen[code], name
            break
        seen[code] = name
    assert tenant_code(a) == tenant_code(b) and a != b
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((50, DIM)).astype(np.float32)
    long_id = "x" * 100                                       # does not fit the 64-byte key
    insert(conn, [(f"{a}-{i}", a, v) for i, v in enumerate(vectors)] +
           [(f"{b}-{i}", b, v) for i, v in enumerate(vectors)] + [(long_id, a, vectors[0] + 0.001)])
    in_graph(client, conn)
    for v in vectors:
        for tenant, other in ((a, b), (b, a)):
            hits = client.search("docs", v, k=4, tenant=tenant)
            assert len(hits) == 4 and all((h.tenant_id == tenant and h.doc_id.startswith(tenant)) or
                                          h.doc_id == long_id for h in hits), hits
            assert not any(h.doc_id.startswith(other) for h in hits)
    assert long_id in [h.doc_id for h in client.search("docs", vectors[0], k=2, tenant=a)]
    conn.execute("UPDATE neurondb.neurondb_vectors SET doc_id = 'renamed' WHERE doc_id = %s", (f"{a}-7",))
    wait_for(lambda: client.search("docs", vectors[7], k=1, tenant=a)[0].doc_id == "renamed", 5.0,
             "a renamed document to show its new doc id")


def test_a_stopped_writer_falls_back_to_postgresql(service: Service, client, conn: psycopg.Connection) -> None:
    """With neurandefrag stopped (SIGSTOP) deletes are not applied to the graph; once the graph has not been
    caught up for a second, searches check PostgreSQL, so the deleted document is still never returned."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((100, DIM)).astype(np.float32)
    insert(conn, [(f"d{i}", "default", v) for i, v in enumerate(vectors)])
    in_graph(client, conn)
    pid = service.worker("neurandefrag").pid
    os.kill(pid, signal.SIGSTOP)
    try:
        conn.execute("DELETE FROM neurondb.neurondb_vectors WHERE doc_id = 'd5'")
        time.sleep(1.2)
        assert "d5" not in [h.doc_id for h in client.search("docs", vectors[5], k=3)]
    finally:
        os.kill(pid, signal.SIGCONT)


def test_search_many(client, conn: psycopg.Connection) -> None:
    """One call for a matrix of queries: arrays of ids and scores, or the same hits as one search per query;
    bad matrices are refused with a message naming the problem."""
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((200, DIM)).astype(np.float32)
    insert(conn, [(f"d{i}", "default", v) for i, v in enumerate(vectors)])
    in_graph(client, conn)
    ids, scores = client.search_many("docs", vectors[:30], k=5, ef=64, as_arrays=True)
    assert ids.shape == scores.shape == (30, 5)
    by_id = dict(conn.execute("SELECT id, doc_id FROM neurondb.neurondb_vectors").fetchall())
    assert [by_id[i] for i in ids[:, 0]] == [f"d{i}" for i in range(30)]     # each finds itself first
    assert np.all(np.diff(scores, axis=1) <= 1e-6)                           # best first
    many = client.search_many("docs", vectors[:30], k=5, ef=64)
    assert [[h.doc_id for h in hits] for hits in many] == \
        [[h.doc_id for h in client.search("docs", v, k=5, ef=64)] for v in vectors[:30]]
    for bad, message in ((vectors[0], "matrix"), (np.ones((2, DIM + 1)), "dimensions"),
                         (np.vstack([vectors[:2], np.full(DIM, np.nan)]), "query vector 2 contains NaN")):
        with pytest.raises(SearchError, match=message):
            client.search_many("docs", bad)
