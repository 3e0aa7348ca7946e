"""The application's handle on neurondb: `neurondb.connect()` and `Client.search()`.

Searches run in the calling process against the graph in shared memory, with no lock and, by default, no
round trip at all: the graph keeps beside each node what a hit needs (its doc id and tenant, hnsw.py's
keys), so `search()` answers from shared memory alone. The graph follows its table within milliseconds
(a deleted row is tombstoned as soon as neurandefrag applies the delete, p95 about 5 ms), and its header
says when the writer last found it caught up (every 0.5 s at least): a search of a graph not caught up
within the last second checks its hits in PostgreSQL, so a default search never returns a document deleted
more than a second ago. `consistent=True` (or the setting
`neurondb.search_consistent`) checks every hit in PostgreSQL, for callers that need read-your-writes;
`with_content=True` fetches content and metadata with one query for the k hits (which checks them too).
A row whose doc id and tenant do not fit in the graph's 64-byte key (`hnsw.KEY_BYTES`) is looked up in
PostgreSQL. With a tenant, hits are the tenant's own: the graph filters by a hash of the tenant and every
hit's tenant is compared exactly.

Hybrid search: with `text`, candidates come from the vector index (the text's embedding, or `vector` when
given) and from PostgreSQL full-text search (`ts_rank_cd` over `content_tsv`), 4 x k of each, combined by
`neurondb.hybrid.combine` (min-max normalised scores, `w * vector + (1 - w) * text`, w = `hybrid_weight`,
default the index's). The full-text query also records both candidate lists under the search's query id
(`hits.query_id`), so that `feedback()` on its results lets neuranmon learn the index's weight. w = 1 is a
pure vector search of the text's embedding.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg

from neurondb import caches, db, hybrid, recall
from neurondb.index import hnsw
from neurondb.index.store import SharedIndex, tenant_code
from neurondb.instance import Instance
from neurondb.paths import DataDir, resolve_data_dir
from neurondb.queries import query
from neurondb.redaction import shorten
from neurondb.settings import Config
from neurondb.shm import names
from neurondb.shm.control import SharedState
from neurondb.shm.ring import QueryRing, Sample

VECTOR_SAMPLE_RATE = 0.05     # fraction of searches whose vector and results are kept to measure recall
CANDIDATES = 4                # hybrid: candidates per list, as a multiple of k
CATALOG_TTL = 5.0
FRESH_MS = 1000               # a graph not caught up this recently is checked in PostgreSQL instead
SAMPLE_BATCH = 16             # search samples handed to the ring at once...
SAMPLE_FLUSH = 0.1            # ...or after this many seconds
MAX_K = 1000
MAX_EF = 10_000


class SearchError(ValueError):
    """Bad search input (unknown index, an argument of the wrong type or range, wrong dimension, NaN) or
    the service not running. The message names the argument, the value given and what is allowed."""


@dataclass
class Hit:
    doc_id: str
    score: float
    tenant_id: str
    content: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class Hits(list):
    """The hits of one search, best first, with the search's `query_id`: pass it to `Client.feedback` (or
    INSERT it into neurondb.neurondb_feedback) to say which documents were relevant."""

    def __init__(self, hits: list[Hit], query_id: int) -> None:
        super().__init__(hits)
        self.query_id = query_id


class Client:
    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self._conn: psycopg.Connection | None = None
        self._shared: SharedState | None = None
        self._ring: QueryRing | None = None
        self._indexes: dict[str, SharedIndex] = {}
        self._models: dict[str, recall.ModelReader] = {}
        self._catalog: dict[str, dict] = {}
        self._catalog_at = 0.0
        self._embedders: dict[str, Any] = {}
        self._config: Config | None = None
        self._consistent_default: bool | None = None
        self._samples: list[Sample] = []        # search samples not yet in the ring
        self._flush_at = 0.0

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
            known = ", ".join(shorten(n, 64) for n in sorted(self._catalog)[:20]) or "none"
            raise SearchError(f"no index {shorten(repr(name), 80)} (known: {known})") from None

    def _graph(self, name: str) -> hnsw.HnswArrays:
        shared = self._shared_state()
        idx = self._indexes.get(name)
        if idx is None:
            idx = self._indexes[name] = SharedIndex(shared, name)
        arrays = idx.arrays()
        if arrays is None:
            raise SearchError(f"index {name!r} is not loaded yet (the service is building it; see `neurondb status`)")
        return arrays

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = Config.load(self.instance.datadir)
        return self._config

    def embed_query(self, info: dict, text: str) -> np.ndarray:
        """The query text's embedding by the index's provider; through the query-embedding cache
        (neurondb/caches.py) when that provider is a remote one, so a repeated query costs no provider call."""
        from neurondb.providers.registry import LOCAL, embedder_for, resolve

        key = f"{info['provider']}/{info['model_name']}"
        if key not in self._embedders:
            config = self.config
            route = resolve(config, "embed", info["model_name"], info["provider"])
            self._embedders[key] = (embedder_for(config, model=info["model_name"], provider=info["provider"]),
                                    route, config.get_seconds("llm_cache_ttl"),
                                    config.get_int("llm_cache_max_entries") > 0)
        embedder, route, ttl_s, cache_on = self._embedders[key]

        def embed(t: str) -> np.ndarray:
            return np.asarray(embedder.embed([t])[0], dtype=np.float32)

        if route.provider == LOCAL or not cache_on:
            return embed(text)
        return caches.query_embedding(self.conn, route.provider, route.model, text, embed, ttl_s)

    def search(self, index: str, vector: Any = None, text: str | None = None, k: int = 10, ef: int | None = None,
               tenant: str | None = None, hybrid_weight: float | None = None,
               with_content: bool = False, consistent: bool | None = None,
               target_recall: float | None = None) -> Hits:
        """The k best documents of `index` for `vector` and/or `text`, best first (see the module doc).
        `consistent`: check every hit in PostgreSQL (default: the setting neurondb.search_consistent, off).
        `target_recall` (instead of `ef`): the search stops as soon as neuranmon's recall model says its top
        k reached that recall@k (the index's target when neither is given and its recall_mode is 'adaptive');
        without a usable model it searches at the tuned static ef.

        Arguments are checked before anything is searched: a wrong type or range raises SearchError
        naming the argument, the value and what is allowed (never a numpy ValueError or TypeError), and a
        2-D `vector` is refused rather than flattened into one long query."""
        started = time.perf_counter()
        if not isinstance(index, str):
            raise SearchError(f"index must be a string, not {_shown(index)}")
        info = self.index_info(index)
        if vector is None and text is None:
            raise SearchError("give a vector, a text, or both")
        k = _count("k", k, MAX_K)
        ef = None if ef is None else _count("ef", ef, MAX_EF, "None or ")
        stop = self._early_stop(index, info, ef, target_recall)
        if tenant is not None and not isinstance(tenant, str):
            raise SearchError(f"tenant must be a string or None, not {_shown(tenant)}")
        if text is not None and not isinstance(text, str):
            raise SearchError(f"text must be a string or None, not {_shown(text)}")
        if hybrid_weight is not None and not (_is_real(hybrid_weight) and 0.0 <= hybrid_weight <= 1.0):
            raise SearchError(f"hybrid_weight must be None or a number between 0 and 1, not {_shown(hybrid_weight)}")
        consistent = self._consistent(consistent)
        weight = 1.0 if text is None else float(info["hybrid_weight"] if hybrid_weight is None else hybrid_weight)
        q = self.embed_query(info, text) if vector is None else _query_vector(vector, index, info["dim"])
        arrays = self._graph(index)
        pool = k if weight >= 1.0 else k * CANDIDATES
        query_id = random.getrandbits(63)
        while True:
            ef_used = max(arrays.ef_search if ef is None else ef, pool)
            try:
                # the model was trained on searches for k results: a hybrid search's wider pool walks statically
                labels, dist, block = hnsw.search_lists(arrays, q, pool, ef_used, tenant_code(tenant),
                                                        stop if pool == k else None)
            except ValueError:
                raise SearchError("query vector contains NaN or infinite values") from None
            vector_labels = labels[:k]       # what the graph found: the tuner measures its recall
            scores = _similarity(dist, info["metric"])
            if consistent or with_content or not _fresh(arrays):
                if weight < 1.0:
                    labels, scores = self._hybrid(index, labels, scores, text, tenant, weight, pool, k, query_id, {})
                found = self._documents(index, labels, scores, tenant, k, with_content)
            else:
                found = _hits_from_keys(block, scores, tenant, k) if weight >= 1.0 else None
                if found is None:       # hybrid, or a key that did not fit: the general path
                    known = _keys(block, labels)
                    if weight < 1.0:
                        labels, scores = self._hybrid(index, labels, scores, text, tenant, weight, pool, k,
                                                      query_id, known)
                    found = self._from_keys(index, labels, scores, tenant, k, known)
            # Another tenant whose name hashes like this one's shares its graph code: its nodes filled some of
            # the k places and were dropped. Rare; search wider until k are the tenant's own or none are left.
            if tenant is None or weight < 1.0 or len(found) >= k or len(labels) < pool or pool >= MAX_K:
                break
            pool = min(pool * 4, MAX_K)
        hits = Hits(found, query_id)
        query_type = "vector" if text is None else ("text" if weight >= 1.0 else "hybrid")
        self._record(Sample(index=index, query_type=query_type, k=k, ef=ef_used,
                            latency_ms=(time.perf_counter() - started) * 1000, result_count=len(hits),
                            tenant=tenant, hybrid_weight=None if text is None else weight), q, vector_labels)
        return hits

    def search_many(self, index: str, vectors: Any, k: int = 10, ef: int | None = None, tenant: str | None = None,
                    as_arrays: bool = False, consistent: bool | None = None, target_recall: float | None = None
                    ) -> list[Hits] | tuple[np.ndarray, np.ndarray]:
        """Search a matrix of query vectors (n, dim) in one kernel call. With `as_arrays`: (ids, scores),
        arrays of shape (n, k) of neurondb_vectors ids and similarities (-1 and NaN where fewer than k
        qualify), straight from the graph; otherwise one Hits per query, as `search` gives them.
        `target_recall`: as in `search`."""
        started = time.perf_counter()
        if not isinstance(index, str):
            raise SearchError(f"index must be a string, not {_shown(index)}")
        info = self.index_info(index)
        k = _count("k", k, MAX_K)
        ef = None if ef is None else _count("ef", ef, MAX_EF, "None or ")
        stop = self._early_stop(index, info, ef, target_recall)
        if tenant is not None and not isinstance(tenant, str):
            raise SearchError(f"tenant must be a string or None, not {_shown(tenant)}")
        queries = _query_matrix(vectors, index, info["dim"])
        consistent = self._consistent(consistent)
        arrays = self._graph(index)
        ef_used = max(arrays.ef_search if ef is None else ef, k)
        labels, dist, rows = hnsw.search_many(arrays, queries, k, ef_used, tenant_code(tenant), return_ids=True,
                                              stop=stop)
        scores = np.where(labels >= 0, 1.0 / (1.0 + dist.astype(np.float64)) if info["metric"] == "l2" else
                          1.0 - dist.astype(np.float64), np.nan)
        if as_arrays:
            out: list[Hits] | tuple[np.ndarray, np.ndarray] = (labels, scores)
        else:
            hits = []
            for i in range(len(queries)):
                n = int(np.count_nonzero(labels[i] >= 0))
                lab, sc = labels[i, :n].tolist(), scores[i, :n].tolist()
                found = (self._documents(index, lab, sc, tenant, k, False) if consistent or not _fresh(arrays) else
                         self._from_keys(index, lab, sc, tenant, k, _keys(arrays.keys[rows[i, :n]].tobytes(), lab)))
                hits.append(Hits(found, random.getrandbits(63)))
            out = hits
        per_query = (time.perf_counter() - started) * 1000 / max(len(queries), 1)
        for i in range(len(queries)):
            self._record(Sample(index=index, query_type="vector", k=k, ef=ef_used, latency_ms=per_query,
                                result_count=int(np.count_nonzero(labels[i] >= 0)), tenant=tenant), queries[i],
                         labels[i][labels[i] >= 0])
        return out

    def _early_stop(self, index: str, info: dict, ef: int | None, target_recall: Any) -> hnsw.EarlyStop | None:
        """The per-query early stop a search uses, or None: the static ef (`ef`, else the tuned one)."""
        if target_recall is not None:
            if not (_is_real(target_recall) and 0.0 < target_recall <= 1.0):
                raise SearchError(f"target_recall must be None or a number in (0, 1], not {_shown(target_recall)}")
            if ef is not None:
                raise SearchError(f"give ef or target_recall, not both (ef {ef}, target_recall {target_recall})")
        elif ef is None and info.get("recall_mode") == "adaptive":
            target_recall = info["target_recall"] or self.config.get_float("neuranmon_target_recall")
        if target_recall is None:
            return None
        reader = self._models.get(index)
        if reader is None:
            reader = self._models[index] = recall.ModelReader(self._shared_state(), index)
        return reader.stop(float(target_recall))

    def _consistent(self, consistent: bool | None) -> bool:
        if consistent is None:
            if self._consistent_default is None:       # read once: the client's settings are its connect's
                self._consistent_default = self.config.get_bool("search_consistent")
            return self._consistent_default
        if not isinstance(consistent, bool):
            raise SearchError(f"consistent must be True, False or None, not {_shown(consistent)}")
        return consistent

    def _from_keys(self, index: str, labels: list[int], scores: list[float], tenant: str | None, k: int,
                   known: dict[int, tuple[str, str] | None]) -> list[Hit]:
        """Hits from the graph's keys alone; rows whose key was not stored are looked up (one query)."""
        missing = [label for label in labels if known.get(label) is None]
        if missing:
            for r in self.conn.execute(query("index", "hits"), {"ids": missing, "index": index, "tenant": tenant}):
                known[r[0]] = (r[1], r[2])
        hits = []
        for label, score in zip(labels, scores, strict=True):
            key = known.get(label)
            if key is None or (tenant is not None and key[1] != tenant):
                continue        # deleted (it was looked up), or another tenant's hash twin
            hits.append(Hit(key[0], score, key[1]))
            if len(hits) == k:
                break
        return hits

    def _hybrid(self, index: str, labels: list[int], scores: list[float], text: str, tenant: str | None,
                weight: float, pool: int, k: int, query_id: int, known: dict[int, tuple[str, str] | None]
                ) -> tuple[list[int], list[float]]:
        """Combine with the full-text candidates (the one query of a hybrid search, which also names its
        candidates' documents, added to `known`)."""
        ranked = self.conn.execute(query("index", "text_candidates_recorded"), {
            "text": text, "index": index, "tenant": tenant, "limit": pool, "query_id": query_id, "k": k,
            "weight": weight, "vector_ids": labels, "vector_scores": scores}).fetchall()
        known.update((r[0], (r[2], r[3])) for r in ranked)
        ids, combined = hybrid.combine(labels, np.asarray(scores, np.float64), [r[0] for r in ranked],
                                       np.array([r[1] for r in ranked], np.float64), weight)
        return ids.tolist(), combined.tolist()

    def feedback(self, query_id: int, doc_id: str, relevance: float = 1.0) -> None:
        """Report how relevant `doc_id` was for the search that returned `query_id` (0 = not relevant, up to
        10; 1 = relevant). neuranmon learns each index's hybrid weight from these (neurondb/hybrid.py)."""
        if not isinstance(query_id, int) or isinstance(query_id, bool):
            raise SearchError(f"query_id must be the integer a search returned (hits.query_id), not {_shown(query_id)}")
        if not isinstance(doc_id, str) or not doc_id:
            raise SearchError(f"doc_id must be a non-empty string, not {_shown(doc_id)}")
        if not (_is_real(relevance) and 0.0 <= relevance <= 10.0):
            raise SearchError(f"relevance must be a number between 0 and 10, not {_shown(relevance)}")
        self.conn.execute(query("index", "feedback"), {"query_id": query_id, "doc_id": doc_id,
                                                       "relevance": float(relevance)})

    def _documents(self, index: str, labels: list[int], scores: list[float], tenant: str | None, k: int,
                   with_content: bool) -> list[Hit]:
        """Hits checked in PostgreSQL (one query): live rows of the index and tenant, with content if asked."""
        if not labels:
            return []
        rows = {r[0]: r for r in self.conn.execute(query("index", "hits"),
                                                    {"ids": labels, "index": index, "tenant": tenant})}
        hits = []
        for label, score in zip(labels, scores, strict=True):
            row = rows.get(label)
            if row is None:
                continue        # deleted (or another tenant's hash twin) since the graph saw it
            hits.append(Hit(doc_id=row[1], score=float(score), tenant_id=row[2],
                            content=row[3] if with_content else None, metadata=row[4] if with_content else {}))
            if len(hits) == k:
                break
        return hits

    def _record(self, sample: Sample, q: np.ndarray, labels: Any) -> None:
        """Keep the search's sample; they go to the shared ring SAMPLE_BATCH at a time (or after
        SAMPLE_FLUSH seconds, and at close): taking the ring's lock cost more than a sample."""
        if self._ring is None:
            return
        if random.random() < VECTOR_SAMPLE_RATE:
            sample.vector, sample.labels = np.array(q, np.float32), np.asarray(labels, np.int64)
        self._samples.append(sample)
        now = time.monotonic()
        if len(self._samples) >= SAMPLE_BATCH or now >= self._flush_at:
            self._flush_samples(now)

    def _flush_samples(self, now: float) -> None:
        if self._ring is not None and self._samples:
            self._ring.record_many(self._samples)
        self._samples = []
        self._flush_at = now + SAMPLE_FLUSH

    def close(self) -> None:
        self._flush_samples(time.monotonic())
        for idx in self._indexes.values():
            idx.close()
        self._indexes.clear()
        for reader in self._models.values():
            reader.close()
        self._models.clear()
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


def _shown(value: Any) -> str:
    """A bad argument as the error quotes it: an array by its shape, anything else by a short repr."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    return shorten(repr(value), 60)


def _is_real(value: Any) -> bool:
    """An int or a finite float (numpy's too), not a bool: what a weight may be."""
    if isinstance(value, (bool, np.bool_)):
        return False
    return isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating)) and math.isfinite(value))


def _count(name: str, value: Any, high: int, prefix: str = "") -> int:
    """`value` as an int in 1..high, or a SearchError naming `name`: 1.5, "3" and True are not counts."""
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and 1 <= value <= high):
        raise SearchError(f"{name} must be {prefix}an integer between 1 and {high}, not {_shown(value)}")
    return int(value)


def _fresh(arrays: hnsw.HnswArrays) -> bool:
    """Whether the graph's writer found it caught up within FRESH_MS: every row deleted before then is
    tombstoned. If not (neurandefrag down, stuck or far behind), hits are checked in PostgreSQL."""
    return time.time() * 1000 - int(arrays.header[hnsw.H_SYNCED_MS]) <= FRESH_MS


def _similarity(dist: list[float], metric: str) -> list[float]:
    """Scores from distances: 1 / (1 + d) for l2, 1 - d for cosine and ip."""
    return [1.0 / (1.0 + d) for d in dist] if metric == "l2" else [1.0 - d for d in dist]


def _hits_from_keys(block: bytes, scores: list[float], tenant: str | None, k: int) -> list[Hit] | None:
    """The hits of a vector search straight from its keys (the common case, in one pass), or None when a key
    was not stored (NO_KEY: the caller looks it up)."""
    hits = []
    for i, score in enumerate(scores):
        key = hnsw.decode_key(block, i)
        if key is None:
            return None
        if tenant is not None and key[1] != tenant:
            continue            # another tenant's hash twin
        hits.append(Hit(key[0], score, key[1]))
        if len(hits) == k:
            break
    return hits


def _keys(block: bytes, labels: list[int]) -> dict[int, tuple[str, str] | None]:
    """label -> (doc id, tenant) from the graph's keys of the results (None where none was stored)."""
    return {label: hnsw.decode_key(block, i) for i, label in enumerate(labels)}


def _query_matrix(vectors: Any, index: str, dim: int) -> np.ndarray:
    """`vectors` as float32 (n, dim), or a SearchError naming the problem (and the first bad row)."""
    rule = f"vectors must be a matrix of rows of {dim} finite numbers"
    if isinstance(vectors, (str, bytes, Mapping)):
        raise SearchError(f"{rule}, not {_shown(vectors)}")
    try:
        array = np.asarray(vectors)
    except (ValueError, TypeError):
        raise SearchError(f"{rule}, not {_shown(vectors)}") from None
    if array.ndim != 2 or array.dtype.kind not in "iuf" or array.shape[0] == 0:
        raise SearchError(f"{rule}, not {_shown(array)}")
    if array.shape[1] != dim:
        raise SearchError(f"query vectors have {array.shape[1]} dimensions, index {index!r} expects {dim}")
    q = np.ascontiguousarray(array, dtype=np.float32)
    bad = ~np.isfinite(q).all(axis=1)
    if bad.any():
        raise SearchError(f"query vector {int(np.flatnonzero(bad)[0])} contains NaN or infinite values")
    return q


def _query_vector(vector: Any, index: str, dim: int) -> np.ndarray:
    """`vector` as float32 of shape (dim,), or a SearchError: a string, a mapping, a 2-D array (several
    queries: one call searches one vector), text or None elements, wrong length, NaN or infinity."""
    if type(vector) is np.ndarray and vector.dtype == np.float32 and vector.shape == (dim,):
        return vector         # the common case, checked cheaply (NaN and infinity: by the kernel)
    rule = f"vector must be one vector of {dim} finite numbers"
    if isinstance(vector, (str, bytes, Mapping)):
        raise SearchError(f"{rule}, not {_shown(vector)}")
    try:
        array = np.asarray(vector)
    except (ValueError, TypeError):       # ragged nesting
        raise SearchError(f"{rule}, not {_shown(vector)}") from None
    if array.ndim > 1:
        raise SearchError(f"{rule}, not {_shown(array)} (search one vector per call)")
    if array.ndim == 0 or array.dtype.kind not in "iuf":
        raise SearchError(f"{rule}, not {_shown(vector)}")
    if array.size != dim:
        raise SearchError(f"query vector has {array.size} dimensions, index {index!r} expects {dim}")
    q = array.astype(np.float32)
    if not np.isfinite(q).all():
        raise SearchError("query vector contains NaN or infinite values")
    return q


def connect(data_dir: str | None = None, dsn: str | None = None) -> Client:
    """A client for the installation in `data_dir` (default: as the CLI) and its database."""
    return Client(Instance(DataDir(resolve_data_dir(data_dir)), dsn))
