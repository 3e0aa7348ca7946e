"""An HNSW index in shared memory: one segment per generation, published through the control block.

Readers (any process: workers, the Python client, the CLI) map the current generation and search it
without a lock. The one writer of an index (the index-sync worker) holds the index's RobustLock while it
changes the graph; growing past capacity copies the graph into a new, larger segment and publishes it by
bumping the generation, so readers switch at their next query while the old mapping stays valid for
searches already running.

Each index is known in shared memory by a short key (`idx.` + 12 hex digits of its name's hash), because
lock and generation names are limited to 32 bytes while index names may have 63 characters.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np

from neurondb import inject
from neurondb.index import hnsw
from neurondb.shm.control import SharedState
from neurondb.shm.lock import RobustLock
from neurondb.shm.names import object_name
from neurondb.shm.segment import (
    GenerationReader,
    Segment,
    generation_name,
    publish_generation,
    unlink_stale_generations,
)

log = logging.getLogger(__name__)

MIN_CAPACITY = 1024
GROWTH = 2.0


def index_key(name: str) -> str:
    return "idx." + hashlib.blake2b(name.encode(), digest_size=6).hexdigest()


def tenant_code(tenant_id: str | None) -> int:
    """The int32 a tenant is stored as in the graph (-1 = any). A stable hash: collisions are possible but
    harmless, since results are checked against the tenant in PostgreSQL before they are returned."""
    if tenant_id is None:
        return -1
    return int.from_bytes(hashlib.blake2b(tenant_id.encode(), digest_size=4).digest(), "little") & 0x7FFF_FFFF


@dataclass(frozen=True)
class IndexSpec:
    """An index's parameters, as in neurondb.neurondb_indexes."""

    name: str
    dim: int
    metric: str
    m: int = 16
    ef_construction: int = 200
    # Not part of the index's identity: the tuner changes it all the time, and a graph must not be released and
    # re-attached for that (the header follows the catalog through neuranmon; a new graph starts with it).
    ef_search: int = field(default=hnsw.DEFAULT_EF_SEARCH, compare=False)


class SharedIndex:
    """Reader side: the arrays of the current generation, re-attached whenever it moves."""

    def __init__(self, shared: SharedState, name: str) -> None:
        key = index_key(name)
        self.name = name
        self._reader = GenerationReader(object_name(shared.prefix, key), shared.generation(key))
        self._arrays: hnsw.HnswArrays | None = None
        self._segment: Segment | None = None

    @property
    def generation(self) -> int:
        return self._reader.generation

    def arrays(self) -> hnsw.HnswArrays | None:
        """The current graph, or None while the index has not been loaded into memory yet."""
        segment = self._reader.current()
        if segment is None:
            return None
        if segment is not self._segment:
            self._segment = segment
            self._arrays = hnsw.HnswArrays.from_buffer(segment.ndarray(np.uint8, segment.size))
        return self._arrays

    def close(self) -> None:
        self._arrays = self._segment = None
        self._reader.close()


class IndexWriter:
    """The single writer of one index. Every mutating call must run with `lock` held."""

    def __init__(self, shared: SharedState, spec: IndexSpec) -> None:
        self.spec = spec
        self.key = index_key(spec.name)
        self.base = object_name(shared.prefix, self.key)
        self.counter = shared.generation(self.key)
        self.lock: RobustLock = shared.lock(self.key)
        self.arrays: hnsw.HnswArrays | None = None
        self._segment: Segment | None = None
        self._generation = 0                # the generation self.arrays belongs to
        self.ids: dict[int, int] = {}      # label (neurondb_vectors.id) -> internal id of its live node

    # -- generations ----------------------------------------------------------------------------------

    def attach_current(self) -> bool:
        """Adopt the published generation (a restarted writer process continues where the last one was).
        Repairs what a writer killed mid-insert left behind. False if nothing is published."""
        generation = int(self.counter)
        if generation == 0:
            return False
        if self._segment is not None:
            self._segment.close()
        self._segment, self._generation = Segment.attach(generation_name(self.base, generation)), generation
        self.arrays = hnsw.HnswArrays.from_buffer(self._segment.ndarray(np.uint8, self._segment.size))
        if hnsw.needs_repair(self.arrays):
            hnsw.repair(self.arrays)
        self._index_labels()
        return True

    def refresh(self) -> None:
        """Follow a generation another process published (a rebuild from the CLI) before writing again,
        remove the generations a killed writer left behind, and repair what a write of this process that
        raised half-way left (the lock stays dirty then, as if the writer had died there)."""
        if int(self.counter) != self._generation:
            self.attach_current()
        elif self.arrays is not None and (self.lock.dirty or hnsw.needs_repair(self.arrays)):
            if hnsw.needs_repair(self.arrays):
                hnsw.repair(self.arrays)
            self._index_labels()        # the label map may be ahead of or behind the graph
            self.lock.mark_clean()
        self.sweep()

    def sweep(self) -> None:
        """Unlink every generation but the published one: a writer killed between creating the next one
        and publishing it left that name taken (creating it again would fail forever) and its memory used."""
        removed = unlink_stale_generations(self.base, int(self.counter))
        if removed:
            log.warning("index %s: removed %d generation(s) a killed writer left unpublished or not unlinked: %s",
                        self.spec.name, len(removed), ", ".join(removed))

    def create(self, capacity: int) -> hnsw.HnswArrays:
        """Publish a new, empty graph of `capacity` nodes as the next generation."""
        s = self.spec
        segment = self._new_segment(capacity)
        arrays = hnsw.HnswArrays.create_in(segment.ndarray(np.uint8, segment.size), capacity, s.dim, m=s.m,
                                           ef_construction=s.ef_construction, metric=s.metric,
                                           ef_search=s.ef_search)
        self._publish(segment, arrays)
        return arrays

    def install(self, arrays: hnsw.HnswArrays) -> None:
        """Publish a graph built elsewhere (a snapshot, a rebuild) as the next generation."""
        segment = self._new_segment(arrays.capacity, arrays.pool.shape[0])
        dest = np.frombuffer(segment.ndarray(np.uint8, segment.size), dtype=np.uint8)
        src = np.frombuffer(arrays.buffer, dtype=np.uint8)
        dest[: src.size] = src[: dest.size]
        self._publish(segment, hnsw.HnswArrays.from_buffer(segment.ndarray(np.uint8, segment.size)))

    def _new_segment(self, capacity: int, pool: int | None = None) -> Segment:
        _, size = hnsw.layout(capacity, self.spec.dim, self.spec.m, pool)
        self.sweep()
        return Segment.create(generation_name(self.base, int(self.counter) + 1), size)

    def _publish(self, segment: Segment, arrays: hnsw.HnswArrays) -> None:
        publish_generation(self.counter, self.base, int(self.counter) + 1)
        if self._segment is not None:
            self._segment.close()
        self._segment, self.arrays, self._generation = segment, arrays, int(self.counter)
        self._index_labels()

    def _index_labels(self) -> None:
        a = self.arrays
        assert a is not None
        n = a.count
        live = np.flatnonzero(a.tombstones[:n] == 0)
        self.ids = dict(zip(a.labels[live].tolist(), live.tolist(), strict=True))

    def ensure_room(self, extra: int) -> None:
        """Grow (into a new generation) when `extra` more nodes would not fit."""
        a = self.arrays
        if a is None:
            self.create(max(MIN_CAPACITY, int(extra * GROWTH)))
            return
        if a.count + extra <= a.capacity:
            return
        capacity = max(int(a.capacity * GROWTH), a.count + extra)
        pool = hnsw.default_pool_capacity(capacity, a.m)
        segment = self._new_segment(capacity, pool)
        inject.point("index-grow")     # the window between creating the next generation and publishing it
        grown = hnsw.grow(a, capacity, pool, buffer=segment.ndarray(np.uint8, segment.size))
        self._publish(segment, grown)

    # -- changes --------------------------------------------------------------------------------------

    def upsert(self, labels: np.ndarray, vectors: np.ndarray, tenants: np.ndarray) -> None:
        """Insert new labels, replace the vectors of known ones (a new node; the old one is tombstoned)."""
        self.ensure_room(len(labels))
        a = self.arrays
        assert a is not None
        new = [i for i, label in enumerate(labels.tolist()) if label not in self.ids]
        stored = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30) \
            if a.metric == "cosine" else vectors
        for i, label in enumerate(labels.tolist()):
            if label in self.ids:
                node = self.ids[label]
                a.tenants[node] = tenants[i]   # a tenant change needs no new node
                if not np.allclose(a.vectors[node], stored[i], rtol=0, atol=1e-6):
                    self.ids[label] = hnsw.update(a, node, vectors[i])   # content/metadata-only updates skip
        if new:
            ids = hnsw.add_items(a, vectors[new], labels[new], tenants[new])
            self.ids.update(zip(labels[new].tolist(), np.asarray(ids).tolist(), strict=True))

    def delete(self, labels: list[int]) -> int:
        a = self.arrays
        if a is None:
            return 0
        removed = 0
        for label in labels:
            internal = self.ids.pop(label, None)
            if internal is not None and hnsw.mark_deleted(a, internal):
                removed += 1
        return removed

    def close(self) -> None:
        self.arrays = None
        if self._segment is not None:
            self._segment.close()
            self._segment = None
