"""The application's handle on neurondb: `neurondb.connect()` and `Client.search()`.

Searches run in the calling process against the graph in shared memory (no lock, no round trip for the
graph walk); one query to PostgreSQL then turns the graph's labels into documents, which also guarantees
that a hit is a live row of the right tenant even when the graph lags its table by a moment.

Hybrid search: with `text`, candidates come from the vector index (the text's embedding, or `vector` when
given) and from PostgreSQL full-text search (`ts_rank_cd` over `content_tsv`), 4 x k of each. Each list's
scores are min-max normalised over its candidates to [0, 1] (vector similarity is 1 - distance for cosine
and ip, 1 / (1 + distance) for l2; a candidate missing from a list scores 0 there), and a candidate's
score is `w * vector + (1 - w) * text` with w = `hybrid_weight` (default: the index's). w = 1 is a pure
vector search of the text's embedding.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg

from neurondb import db
from neurondb.index import hnsw
from neurondb.index.store import SharedIndex, tenant_code
from neurondb.instance import Instance
from neurondb.paths import DataDir, resolve_data_dir
from neurondb.queries import query
from neurondb.settings import Config
from neurondb.shm import names
from neurondb.shm.control import SharedState
from neurondb.shm.ring import QueryRing, Sample

VECTOR_SAMPLE_RATE = 0.05     # fraction of searches whose vector and results are kept to measure recall
CANDIDATES = 4                # hybrid: candidates per list, as a multiple of k
CATALOG_TTL = 5.0


class SearchError(ValueError):
    """Bad search input (unknown index, wrong dimension, NaN) or the service not running."""


@dataclass
class Hit:
    doc_id: str
    score: float
    tenant_id: str
    content: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class Client:
    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self._conn: psycopg.Connection | None = None
        self._shared: SharedState | None = None
        self._ring: QueryRing | None = None
        self._indexes: dict[str, SharedIndex] = {}
        self._catalog: dict[str, dict] = {}
        self._catalog_at = 0.0
        self._embedders: dict[str, Any] = {}

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.instance.connect("client")
        return self._conn

    def _shared_state(self) -> SharedState:
        if self._shared is None:
            try:
                self._shared = SharedState.attach(names.instance_prefix(self.instance.datadir.root))
            except FileNotFoundError:
                raise SearchError(f"neurondb is not running on {self.instance.datadir.root}: "
                                  "`neurondb start` loads the indexes into memory") from None
            try:
                self._ring = QueryRing.attach(self._shared)
            except FileNotFoundError:
                self._ring = None
        return self._shared

    def index_info(self, name: str) -> dict:
        if time.monotonic() - self._catalog_at > CATALOG_TTL or name not in self._catalog:
            with self.conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
                self._catalog = {r["index_name"]: r for r in cur.execute(query("index", "indexes"))}
            self._catalog_at = time.monotonic()
        try:
            return self._catalog[name]
        except KeyError:
            raise SearchError(f"no index {name!r} (known: {', '.join(sorted(self._catalog)) or 'none'})") from None

    def _graph(self, name: str) -> hnsw.HnswArrays:
        shared = self._shared_state()
        idx = self._indexes.get(name)
        if idx is None:
            idx = self._indexes[name] = SharedIndex(shared, name)
        arrays = idx.arrays()
        if arrays is None:
            raise SearchError(f"index {name!r} is not loaded yet (the service is building it; see `neurondb status`)")
        return arrays

    def embed_query(self, info: dict, text: str) -> np.ndarray:
        from neurondb.providers.registry import embedder_for

        key = f"{info['provider']}/{info['model_name']}"
        if key not in self._embedders:
            self._embedders[key] = embedder_for(Config.load(self.instance.datadir), model=info["model_name"],
                                                provider=info["provider"])
        return np.asarray(self._embedders[key].embed([text])[0], dtype=np.float32)

    def search(self, index: str, vector: Any = None, text: str | None = None, k: int = 10, ef: int | None = None,
               tenant: str | None = None, hybrid_weight: float | None = None,
               with_content: bool = False) -> list[Hit]:
        """The k best documents of `index` for `vector` and/or `text`, best first (see the module doc)."""
        started = time.perf_counter()
        info = self.index_info(index)
        if vector is None and text is None:
            raise SearchError("give a vector, a text, or both")
        if not 1 <= k <= 1000:
            raise SearchError(f"k must be between 1 and 1000, not {k}")
        if ef is not None and not 1 <= ef <= 10_000:
            raise SearchError(f"ef must be between 1 and 10000, not {ef}")
        weight = 1.0 if text is None else float(info["hybrid_weight"] if hybrid_weight is None else hybrid_weight)
        if not 0.0 <= weight <= 1.0:
            raise SearchError(f"hybrid_weight must be between 0 and 1, not {weight}")
        if vector is not None:
            q = np.asarray(vector, dtype=np.float32).ravel()
            if q.size != info["dim"]:
                raise SearchError(f"query vector has {q.size} dimensions, index {index!r} expects {info['dim']}")
            if not np.isfinite(q).all():
                raise SearchError("query vector contains NaN or infinite values")
        else:
            q = self.embed_query(info, text)
        arrays = self._graph(index)
        ef_used = arrays.ef_search if ef is None else ef
        pool = k if weight >= 1.0 else k * CANDIDATES
        labels, dist = hnsw.search(arrays, q, pool, max(ef_used, pool), tenant_code(tenant))
        scores = self._similarity(dist, info["metric"])
        if weight < 1.0:
            labels, scores = self._hybrid(index, labels, scores, text, tenant, weight, pool)
        hits = self._documents(index, labels, scores, tenant, k, with_content)
        query_type = "vector" if text is None else ("text" if weight >= 1.0 else "hybrid")
        self._record(Sample(index=index, query_type=query_type, k=k, ef=ef_used,
                            latency_ms=(time.perf_counter() - started) * 1000, result_count=len(hits),
                            tenant=tenant, hybrid_weight=None if text is None else weight), q, labels[:k])
        return hits

    @staticmethod
    def _similarity(dist: np.ndarray, metric: str) -> np.ndarray:
        d = dist.astype(np.float64)
        return 1.0 / (1.0 + d) if metric == "l2" else 1.0 - d

    def _hybrid(self, index: str, labels: np.ndarray, scores: np.ndarray, text: str, tenant: str | None,
                weight: float, pool: int) -> tuple[np.ndarray, np.ndarray]:
        ranked = self.conn.execute(query("index", "text_candidates"),
                                   {"text": text, "index": index, "tenant": tenant, "limit": pool}).fetchall()
        vec = dict(zip(labels.tolist(), _minmax(scores).tolist(), strict=True))
        txt = dict(zip([r[0] for r in ranked], _minmax(np.array([r[1] for r in ranked], np.float64)).tolist(),
                       strict=True))
        ids = list(vec.keys() | txt.keys())
        combined = np.array([weight * vec.get(i, 0.0) + (1 - weight) * txt.get(i, 0.0) for i in ids])
        order = np.argsort(-combined, kind="stable")
        return np.array(ids, np.int64)[order], combined[order]

    def _documents(self, index: str, labels: np.ndarray, scores: np.ndarray, tenant: str | None, k: int,
                   with_content: bool) -> list[Hit]:
        if labels.size == 0:
            return []
        rows = {r[0]: r for r in self.conn.execute(query("index", "hits"),
                                                    {"ids": labels.tolist(), "index": index, "tenant": tenant})}
        hits = []
        for label, score in zip(labels.tolist(), scores.tolist(), strict=True):
            row = rows.get(label)
            if row is None:
                continue        # deleted (or another tenant's hash twin) since the graph saw it
            hits.append(Hit(doc_id=row[1], score=float(score), tenant_id=row[2],
                            content=row[3] if with_content else None, metadata=row[4] if with_content else {}))
            if len(hits) == k:
                break
        return hits

    def _record(self, sample: Sample, q: np.ndarray, labels: np.ndarray) -> None:
        if self._ring is None:
            return
        if random.random() < VECTOR_SAMPLE_RATE:
            sample.vector, sample.labels = q, np.asarray(labels, np.int64)
        self._ring.record(sample)

    def close(self) -> None:
        for idx in self._indexes.values():
            idx.close()
        self._indexes.clear()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        db.close_quietly(self._conn)
        self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _minmax(x: np.ndarray) -> np.ndarray:
    if x.size == 0:
        return x
    lo, hi = float(x.min()), float(x.max())
    return np.ones_like(x) if hi - lo < 1e-12 else (x - lo) / (hi - lo)


def connect(data_dir: str | None = None, dsn: str | None = None) -> Client:
    """A client for the installation in `data_dir` (default: as the CLI) and its database."""
    return Client(Instance(DataDir(resolve_data_dir(data_dir)), dsn))
