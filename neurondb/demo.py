"""The demo workload of `neurondb run` (`make run`): something for the four workers to do on a fresh install.

It creates an index `demo` (384 dimensions, the built-in offline embedder), enqueues `embed` jobs for a few
hundred generated sentences across three tenants, then, while the live view runs, keeps a light trickle
going: new documents to embed, `rerank` jobs, and text searches (which feed the auto-tuner's metrics).
"""

from __future__ import annotations

import logging
import random
import threading

import psycopg

from neurondb import queue
from neurondb.client import Client, SearchError
from neurondb.instance import Instance
from neurondb.queries import query

log = logging.getLogger(__name__)

SUBJECTS = ["the database", "a queue worker", "the index", "our search service", "the auto-tuner",
            "a background job", "the cache", "an embedding model", "the supervisor", "a tenant"]
VERBS = ["restarts", "compacts", "retries", "measures", "reloads", "rebalances", "embeds", "ranks", "expires"]
OBJECTS = ["stale entries", "failed jobs", "the HNSW graph", "query latency", "recall at ten", "its settings",
           "tombstoned vectors", "dead letters", "slow requests", "shared memory"]
TENANTS = ["acme", "globex", "initech"]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"


def seed(conn: psycopg.Connection, documents: int = 300) -> bool:
    """Create the demo index and enqueue its documents; False if it already exists (nothing done)."""
    if conn.execute(query("index_cli", "demo_exists")).fetchone():
        return False
    conn.execute(query("index_cli", "create_demo"))
    rng = random.Random(7)
    for tenant in TENANTS:
        docs = [{"doc_id": f"{tenant}-{i}", "text": sentence(rng)} for i in range(documents // len(TENANTS))]
        for start in range(0, len(docs), 25):
            queue.enqueue(conn, "embed", {"index": "demo", "documents": docs[start:start + 25]}, tenant_id=tenant)
    return True


def trickle(instance: Instance, stop: threading.Event, period: float = 0.5) -> None:
    """Until `stop`: a few new documents, a rerank and some searches every `period` seconds."""
    rng = random.Random()
    n = 0
    try:
        with instance.connect("demo") as conn, Client(instance) as client:
            while not stop.wait(period):
                tenant = rng.choice(TENANTS)
                n += 1
                queue.enqueue(conn, "embed", {"index": "demo", "doc_id": f"{tenant}-live-{n}",
                                              "text": sentence(rng)}, tenant_id=tenant)
                queue.enqueue(conn, "rerank", {"query": sentence(rng), "documents": [sentence(rng) for _ in range(8)]},
                              tenant_id=tenant)
                for _ in range(5):
                    try:
                        client.search("demo", text=sentence(rng), k=5, tenant=rng.choice([None, tenant]))
                    except SearchError:
                        break   # not loaded yet
    except psycopg.Error as exc:
        log.warning("demo workload stopped: %s", exc)
