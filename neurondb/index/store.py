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
import time
from collections import deque
from collections.abc import Callable
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
# A freed row is reused only after this long: far longer than one search takes, so no search still walking
# from a link it read before maintenance unlinked the row can meet the row's new vector (hnsw.py's module
# doc, concurrency contract).
REUSE_GRACE = 2.0


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
        self.free: deque[tuple[float, int]] = deque()   # (freed at, row) of FREE rows, oldest first
        self.build: Build | None = None    # a compact copy or rebuild being written into the next generation

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
        self._index_labels(fresh_free=True)
        return True

    def refresh(self) -> None:
        """Follow a generation another process published (a rebuild from the CLI) before writing again,
        remove the generations a killed writer left behind, and repair what a write of this process that
        raised half-way left (the lock stays dirty then, as if the writer had died there)."""
        if int(self.counter) != self._generation:
            self.abort_build("another process published a graph")     # it took the generation number
            self.attach_current()
        elif self.arrays is not None and (self.lock.dirty or hnsw.needs_repair(self.arrays)):
            hnsw.repair(self.arrays)      # also after a maintenance slice that raised half-way
            self._index_labels(fresh_free=True)   # the label map may be ahead of or behind the graph
            self.lock.mark_clean()
        self.sweep()

    def sweep(self) -> None:
        """Unlink every generation but the published one (and the one this process is building): a writer
        killed between creating the next one and publishing it left that name taken (creating it again would
        fail forever) and its memory used."""
        building = self.build.generation if self.build is not None else None
        removed = unlink_stale_generations(self.base, int(self.counter), building)
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
        self._publish(segment, arrays, fresh_free=True)
        return arrays

    def install(self, arrays: hnsw.HnswArrays) -> None:
        """Publish a graph built elsewhere (a snapshot, a rebuild) as the next generation."""
        self.abort_build("the graph was replaced")
        segment = self._new_segment(arrays.capacity, arrays.pool.shape[0])
        dest = np.frombuffer(segment.ndarray(np.uint8, segment.size), dtype=np.uint8)
        src = np.frombuffer(arrays.buffer, dtype=np.uint8)
        dest[: src.size] = src[: dest.size]
        self._publish(segment, hnsw.HnswArrays.from_buffer(segment.ndarray(np.uint8, segment.size)), fresh_free=True)

    def _new_segment(self, capacity: int, pool: int | None = None) -> Segment:
        _, size = hnsw.layout(capacity, self.spec.dim, self.spec.m, pool)
        self.sweep()
        return Segment.create(generation_name(self.base, int(self.counter) + 1), size)

    def _publish(self, segment: Segment, arrays: hnsw.HnswArrays, fresh_free: bool) -> None:
        publish_generation(self.counter, self.base, int(self.counter) + 1)
        if self._segment is not None:
            self._segment.close()
        self._segment, self.arrays, self._generation = segment, arrays, int(self.counter)
        self._index_labels(fresh_free)

    def _index_labels(self, fresh_free: bool) -> None:
        """The label map from the graph; with `fresh_free` also the free rows, each starting its grace period
        now (a graph this process did not free itself may have been freed a moment ago). A grown copy keeps
        its rows, so it keeps the free list as it was."""
        a = self.arrays
        assert a is not None
        n = a.count
        live = np.flatnonzero(a.tombstones[:n] == 0)
        self.ids = dict(zip(a.labels[live].tolist(), live.tolist(), strict=True))
        if fresh_free:
            now = time.monotonic()
            self.free = deque((now, int(row)) for row in hnsw.free_slots(a))

    def freed(self, rows: np.ndarray) -> None:
        """Rows maintenance just freed: reusable after REUSE_GRACE."""
        now = time.monotonic()
        self.free.extend((now, int(row)) for row in rows)

    def _reusable(self, needed: int) -> int:
        """How many of `needed` new rows free rows past their grace can take (counting stops at `needed`:
        after a large delete the free list holds millions)."""
        if self.build is not None:      # a row reused under a compaction's copy would change beneath it
            return 0
        limit = time.monotonic() - REUSE_GRACE
        n = 0
        for at, _ in self.free:         # oldest first: the first young one ends the usable ones
            if n >= needed or at > limit:
                break
            n += 1
        return n

    def _take(self, n: int) -> list[int]:
        limit = time.monotonic() - REUSE_GRACE
        out = []
        while self.build is None and self.free and len(out) < n and self.free[0][0] <= limit:
            out.append(self.free.popleft()[1])
        return out

    def ensure_room(self, extra: int) -> None:
        """Grow (into a new generation) when `extra` more nodes would not fit."""
        a = self.arrays
        if a is None:
            self.create(max(MIN_CAPACITY, int(extra * GROWTH)))
            return
        if a.count + extra <= a.capacity:
            return
        self.abort_build("the graph had to grow")     # its generation number is the one growing takes
        capacity = max(int(a.capacity * GROWTH), a.count + extra)
        pool = hnsw.default_pool_capacity(capacity, a.m)
        segment = self._new_segment(capacity, pool)
        inject.point("index-grow")     # the window between creating the next generation and publishing it
        grown = hnsw.grow(a, capacity, pool, buffer=segment.ndarray(np.uint8, segment.size))
        self._publish(segment, grown, fresh_free=False)

    # -- changes --------------------------------------------------------------------------------------

    def upsert(self, labels: np.ndarray, vectors: np.ndarray, tenants: np.ndarray, keys: np.ndarray) -> None:
        """Insert new labels, replace the vectors or keys of known ones (a new node; the old one is
        tombstoned). New nodes take free rows past their grace period first, and append only for the rest."""
        if self.arrays is not None:
            self.ensure_room(len(labels) - self._reusable(len(labels)))
        else:
            self.ensure_room(len(labels))
        a = self.arrays
        assert a is not None
        if self.build is not None:
            self.build.journal.update(labels.tolist())
        _upsert(a, self.ids, labels, vectors, tenants, keys, self._take)

    def delete(self, labels: list[int]) -> int:
        a = self.arrays
        if a is None:
            return 0
        if self.build is not None:
            self.build.journal.update(labels)
        removed = 0
        for label in labels:
            internal = self.ids.pop(label, None)
            if internal is not None and hnsw.mark_deleted(a, internal):
                removed += 1
        return removed

    # -- background builds (compaction, rebuild) ----------------------------------------------------------

    def begin_build(self, kind: str, capacity: int, pool: int | None = None) -> Build:
        """Create the next generation's segment for a new graph written in the background while searches use
        the current one; from now on every label this writer changes is journaled, for `finish_build`."""
        self.abort_build("a new one began")
        s = self.spec
        _, size = hnsw.layout(capacity, s.dim, s.m, pool)
        self.sweep()
        generation = int(self.counter) + 1
        segment = Segment.create(generation_name(self.base, generation), size)
        arrays = hnsw.HnswArrays.create_in(segment.ndarray(np.uint8, segment.size), capacity, s.dim, m=s.m,
                                           ef_construction=s.ef_construction, metric=s.metric,
                                           upper_pool_capacity=pool, ef_search=s.ef_search)
        self.build = Build(kind, generation, segment, arrays)
        return self.build

    def abort_build(self, why: str) -> None:
        """Drop a background build (its segment unlinked); its owner sees build.aborted and may start again."""
        b = self.build
        if b is None:
            return
        self.build = None
        b.aborted = why
        b.segment.close()
        b.segment.unlink()
        log.info("index %s: %s abandoned: %s", self.spec.name, b.kind, why)

    def finish_build(self) -> tuple[int, int]:
        """Catch the built graph up with the changes journaled since it began (each changed label made to
        hold what the current graph holds, read from it) and publish it. Returns (labels replayed, nodes).
        Raises OverflowError (the build is abandoned) when the catch-up does not fit its capacity."""
        b = self.build
        a = self.arrays
        assert b is not None and a is not None and int(self.counter) + 1 == b.generation
        dst = b.arrays
        n = dst.count
        live = np.flatnonzero(dst.tombstones[:n] == 0)
        ids = dict(zip(dst.labels[live].tolist(), live.tolist(), strict=True))
        changed = sorted(b.journal)
        present = [label for label in changed if label in self.ids]
        adds = sum(1 for label in present if label not in ids) + len(present)   # updates take a row too
        if dst.count + adds > dst.capacity:
            self.abort_build(f"{adds} changes made meanwhile do not fit its capacity {dst.capacity}")
            raise OverflowError("the changes made during the build do not fit; it is retried")
        if present:
            rows = [self.ids[label] for label in present]
            _upsert(dst, ids, np.array(present, np.int64), a.vectors[rows], a.tenants[rows], a.keys[rows],
                    lambda _n: [])
        for label in changed:
            if label not in self.ids and label in ids:
                hnsw.mark_deleted(dst, ids.pop(label))
        dst.header[hnsw.H_EF_SEARCH] = a.header[hnsw.H_EF_SEARCH]     # the tuner may have moved it meanwhile
        dst.header[hnsw.H_MUTATIONS] = max(int(dst.header[hnsw.H_MUTATIONS]), int(a.header[hnsw.H_MUTATIONS]) + 1)
        self.build = None
        self._publish(b.segment, dst, fresh_free=True)
        return len(changed), dst.count

    def close(self) -> None:
        self.abort_build("the writer closed")
        self.arrays = None
        if self._segment is not None:
            self._segment.close()
            self._segment = None


@dataclass(eq=False)
class Build:
    """A graph being written into the next generation's segment (unpublished: readers never see it)."""

    kind: str                       # "compaction" or "rebuild"
    generation: int
    segment: Segment
    arrays: hnsw.HnswArrays
    journal: set[int] = field(default_factory=set)     # labels changed in the current graph since it began
    aborted: str | None = None


def _upsert(a: hnsw.HnswArrays, ids: dict[int, int], labels: np.ndarray, vectors: np.ndarray, tenants: np.ndarray,
            keys: np.ndarray, take: Callable[[int], list[int]]) -> None:
    """Make graph `a` (label map `ids`) hold these labels' vectors, tenants and keys; `take(n)` gives up to n
    free rows to reuse. A changed vector or key (doc id, tenant) is a new node, the old one tombstoned as it
    is published: a row's key is never rewritten under a reader. Only the tenant code of a row whose key
    did not fit (NO_KEY: hits of such rows are looked up in PostgreSQL) changes in place."""
    new = [i for i, label in enumerate(labels.tolist()) if label not in ids]
    stored = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30) \
        if a.metric == "cosine" else vectors
    for i, label in enumerate(labels.tolist()):
        if label in ids:
            node = ids[label]
            same_key = np.array_equal(a.keys[node], keys[i])
            if same_key and np.allclose(a.vectors[node], stored[i], rtol=0, atol=1e-6):
                a.tenants[node] = tenants[i]      # content or metadata only, or a tenant change of a NO_KEY row
                continue
            slot = take(1)
            ids[label] = int(hnsw.add_items(a, vectors[i: i + 1], label, tenants[i: i + 1],
                                            slots=[slot[0] if slot else -1], keys=keys[i: i + 1], replace=[node])[0])
    if new:
        rows = take(len(new))
        slots = np.full(len(new), -1, np.int64)
        slots[: len(rows)] = rows
        out = hnsw.add_items(a, vectors[new], labels[new], tenants[new], slots=slots, keys=keys[new])
        ids.update(zip(labels[new].tolist(), np.asarray(out).tolist(), strict=True))
