"""The caches neuranmon keeps fresh (the document's "Cache Rotation: keep embeddings and results fresh").

One table holds them: `neurondb_llm_cache`, the LLM worker's result cache, whose embedding entries are also
the query-embedding cache: a text search on an index served by a remote provider looks its query up there
(by the same key an embedding job of that text would use, `neurondb.llm.cache_key`) before it calls the
provider, and stores what the provider answered, so repeated queries pay no provider call and an embedding
job of the same text hits too. Entries live `neurondb.llm_cache_ttl` seconds and the table holds at most
`neurondb.llm_cache_max_entries` (least recently used evicted first), for both uses together.

`rotate` enforces both bounds, in small batches: neuranmon runs it every cycle and records what it removed;
the LLM worker runs it too when its own writes have taken the cache past its bound between two cycles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import orjson
import psycopg

from neurondb.llm import cache_key
from neurondb.queries import query

EVICT_BATCH = 500            # entries deleted per statement


@dataclass(frozen=True)
class Rotation:
    expired: int
    evicted: int
    entries: int             # left in the cache


def rotate(conn: psycopg.Connection, limit: int, stop: Callable[[], bool] = lambda: False) -> Rotation:
    """Expired entries out, then the least recently used ones while over `limit` (0: no bound); each batch
    a short statement of its own, so the processes using the cache never wait long."""
    expired = 0
    while True:
        n = conn.execute(query("llm", "cache_expire"), {"limit": EVICT_BATCH}).rowcount
        expired += n
        if n < EVICT_BATCH or stop():
            break
    count = conn.execute(query("llm", "cache_count")).fetchone()[0]
    evicted = 0
    while limit > 0 and count > limit and not stop():
        n = conn.execute(query("llm", "cache_evict"), {"limit": min(EVICT_BATCH, count - limit)}).rowcount
        if n == 0:
            break
        count -= n
        evicted += n
    return Rotation(expired, evicted, count)


def query_embedding(conn: psycopg.Connection, provider: str, model: str, text: str,
                    embed: Callable[[str], np.ndarray], ttl_s: float) -> np.ndarray:
    """The embedding of a search's query text from the cache, else from `embed` (stored for next time)."""
    key = cache_key("embedding", provider, model, text)
    row = conn.execute(query("llm", "cache_get"), {"keys": [key]}).fetchone()
    if row is not None and row[4] is not None:
        return np.asarray(row[4], dtype=np.float32)
    vector = np.asarray(embed(text), dtype=np.float32)
    conn.execute(query("llm", "cache_put"), {"ttl_s": ttl_s, "rows": orjson.dumps([{
        "cache_key": key, "operation": "embedding", "provider": provider, "model_name": model,
        "result_text": None, "result_vector": vector.tolist(), "result_json": None, "prompt_tokens": None,
        "completion_tokens": None}]).decode()})
    return vector
