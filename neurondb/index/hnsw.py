"""HNSW over plain numpy arrays, with numba kernels, designed to live in one shared memory segment.

The algorithm is hnswlib's (hnswalg.h): random levels with mult = 1/ln(M), greedy descent through the
upper levels, a best-first search with ef candidates on the target level, neighbour selection by
hnswlib's heuristic (getNeighborsByHeuristic2) for the new node and for every neighbour whose list
overflows, M links per upper level and 2*M on level 0. What differs is the storage: instead of C++
objects, the whole index is a fixed set of fixed-capacity arrays (struct of arrays) that a caller can
place in ONE buffer (a POSIX shared memory segment, an mmap, a bytearray), so any number of processes
can map it and search it.

Layout (`layout()` gives names, dtypes, shapes and byte offsets; every array starts 64-byte aligned)::

    header        int64   [32]              see the H_* indices below
    vectors       float32 [capacity, dim]   cosine: stored normalised (search = ip on the normalised query)
    links0        int32   [capacity, 1+2M]  level-0 neighbours: column 0 = count, then ids (like hnswlib)
    levels        int8    [capacity]        top level of each node
    upper_offset  int32   [capacity]        first pool row of the node, -1 if it only lives on level 0
    labels        int64   [capacity]        the caller's id (e.g. the PostgreSQL row id)
    tenants       int32   [capacity]        tenant of the node, -1 = none
    tombstones    uint8   [capacity]        0 live, 1 deleted (still traversed, never returned),
                                            2 free (unlinked by maintenance, reusable by an insert)
    pool          int32   [pool_capacity, 1+M]  upper-level neighbour lists: node i's level L >= 1
                                                  is row upper_offset[i] + L - 1 (count, then ids)
    keys          uint8   [capacity, 64]    what a hit needs besides the label: the caller's key bytes
                                            (see `encode_key`: doc id and tenant), never read by kernels

Internal ids are row numbers; a node keeps its row until the index is compacted or rebuilt. Maintenance
(`consolidate`, `free_deleted`) repairs the lists of live nodes that point at deleted ones and then frees
the deleted rows, which inserts reuse (`add_items(slots=...)`, as hnswlib's replace_deleted). A freed row
keeps its block of upper pool rows (its level says how many), and an insert above level 0 takes a free row's
block before it takes new pool rows, so the pool does not fill up under churn.

Level-0 links are not interleaved with the vectors as in hnswlib's data_level0 block: measured on
scripts/bench_index.py's data, an interleaved block (rows padded to 64 bytes) searched at 0.95-1.0x
the speed of separate arrays, because the search prefetches every cache line of a neighbour's vector
as soon as it reads the neighbour list, and the next candidate's list as soon as it is known.

Concurrency contract. Exactly one writer at a time (the caller serialises writers, e.g. with a POSIX
semaphore); readers take no lock, run in any process, and may run while the writer inserts:
- The writer fully writes a node (vector, label, tenant, level, its links and the back-links of its
  neighbours) and only then publishes it by storing count + 1 into header[H_COUNT] with release
  ordering (a single aligned int64 store behind a fence). The entry point and max level are updated
  after that, so a reader that sees a new entry point also sees a count that includes it.
- A reader loads the entry point, then the count, once per search, and ignores every neighbour id that
  is negative or >= that count. Link lists may be rewritten while a reader walks them (the reader can
  see a half-updated list): the per-list count is clamped to the list width and every id is checked,
  so a reader never indexes out of bounds and never returns an unpublished node.
- Deletion sets a tombstone byte. Tombstoned nodes (and other tenants' nodes when a tenant is given)
  are traversed for connectivity but never enter the results.
- A freed row is reused only after no list has pointed at it for a grace period the caller enforces
  (neurondb/index/store.py, REUSE_GRACE), longer than any one search takes: so a search never finds a
  reused row through a link it read before the row was freed, and never returns a new vector under the
  label it had when the search saw it. The reused row is written under a tombstone (traversed, never
  returned) and published by clearing the tombstone after a fence.
- `update` never rewrites a published vector: the new vector goes to a new row, and the old row is
  tombstoned in the same publication step (see `update`). So a reader never sees a torn vector.
- header[H_WRITER] holds (id being inserted + 1) while an insert is in progress and 0 otherwise. A writer
  killed mid-insert leaves it non-zero: the index is still safe to read (everything published is
  intact; stray back-links to the unpublished row are ignored by readers), and `repair` removes the
  stray links before the next writer continues.

Kernels are compiled with numba (`cache=True`): the machine code is cached on disk next to this file
in `neurondb/index/__pycache__/` (numba's default), so workers and clients load it instead of
recompiling. When that directory is not writable (read-only install) and NUMBA_CACHE_DIR is not set,
the cache goes to $XDG_CACHE_HOME/neurondb/numba (default ~/.cache/neurondb/numba), or to
/tmp/neurondb-numba-<uid> if that is not writable either. Setting NUMBA_CACHE_DIR always wins.

Distances (as hnswlib): l2 = squared euclidean; ip = 1 - <x, q>; cosine = 1 - <x/|x|, q/|q|>.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _setup_numba_cache() -> None:
    """Give numba a writable cache directory when its default (this package's __pycache__) is not."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    pycache = Path(__file__).resolve().parent / "__pycache__"
    try:
        pycache.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=pycache, prefix=".numba-probe-"):
            return  # numba's in-tree cache works
    except OSError:
        pass
    candidates = [Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neurondb" / "numba",
                  Path(tempfile.gettempdir()) / f"neurondb-numba-{os.getuid()}"]
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            if os.access(path, os.W_OK | os.X_OK):
                import numba.core.config

                numba.core.config.CACHE_DIR = str(path)
                os.environ["NUMBA_CACHE_DIR"] = str(path)  # for processes we start
                return
        except OSError:
            continue


_setup_numba_cache()

import numba  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit  # noqa: E402
from numba.core import cgutils, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------

MAGIC = 0x3157534E48424E44  # b"DNBHNSW1" little-endian
LAYOUT_VERSION = 2          # 2: the keys array
KEY_BYTES = 64              # per row: 2 length bytes, then the doc id and the tenant, UTF-8
NO_KEY = 255                # keys[i, 0]: the key did not fit (or none was given): look it up elsewhere
HEADER_LEN = 32

# header indices (int64 each)
H_COUNT = 0  # published nodes: rows [0, count) are readable; stored last, with release ordering
H_ENTRY = 1  # entry point (internal id), -1 when empty
H_MAX_LEVEL = 2  # level of the entry point, -1 when empty
H_EF_SEARCH = 3  # current ef for searches that do not give one (the auto-tuner writes it)
H_M = 4
H_EF_CONSTRUCTION = 5
H_DIM = 6
H_METRIC = 7  # 0 l2, 1 cosine, 2 ip
H_CAPACITY = 8
H_POOL_CAPACITY = 9  # rows in the upper-level pool
H_POOL_USED = 10
H_DELETED = 11  # tombstoned nodes
H_GENERATION = 12  # bumped by grow / rebuild (the new arrays carry old generation + 1)
H_SEED = 13
H_RNG = 14  # level generator state (splitmix64), so any writer process continues the same stream
H_WRITER = 15  # id being inserted + 1 while an insert runs, 0 when idle (non-zero after a crash)
H_LEVEL_CLAMPED = 16  # inserts whose level was cut because the pool was full
H_MUTATIONS = 17  # inserts + deletes, ever (cheap change detector for snapshots and caches)
H_MAGIC = 18
H_VERSION = 19
H_FREE = 20  # free slots (tombstone FREE): unlinked by maintenance, reused by later inserts
H_SYNCED_MS = 21  # wall clock (ms) when the writer last found the graph caught up with its source: every
                  # change committed before then is in the graph (neurondb/index/sync.py sets it)

# tombstones[i]
LIVE = 0
DELETED = 1  # deleted: still linked and traversed, never returned
FREE = 2     # deleted and unlinked by maintenance (`free_deleted`): no list points at it; inserts reuse the row

METRICS = {"l2": 0, "cosine": 1, "ip": 2}
METRIC_NAMES = {v: k for k, v in METRICS.items()}
DEFAULT_EF_SEARCH = 64
ALIGN = 64
MAX_LEVEL = 100


def default_pool_capacity(capacity: int, m: int) -> int:
    """Upper-level pool rows for `capacity` nodes. A node has level >= L with probability M^-L, so the
    expected number of rows is capacity / (M - 1); 1.25 x that plus a margin makes running out
    practically impossible (if it happens, new nodes get a lower level, counted in H_LEVEL_CLAMPED)."""
    return math.ceil(capacity / max(m - 1, 1) * 1.25) + 64


def layout(capacity: int, dim: int, m: int, upper_pool_capacity: int | None = None
           ) -> tuple[list[tuple[str, np.dtype, tuple[int, ...], int]], int]:
    """The arrays of an index and where they lie in its buffer: ([(name, dtype, shape, offset)], total_bytes)."""
    if capacity < 1 or capacity >= 2**31 - 1:
        raise ValueError(f"capacity must be in [1, 2^31 - 1), not {capacity}")
    if dim < 1:
        raise ValueError(f"dim must be positive, not {dim}")
    if m < 2 or m > 10_000:
        raise ValueError(f"m must be in [2, 10000], not {m}")
    pool = default_pool_capacity(capacity, m) if upper_pool_capacity is None else int(upper_pool_capacity)
    if pool < 1:
        raise ValueError(f"upper_pool_capacity must be positive, not {pool}")
    spec = [
        ("header", np.dtype(np.int64), (HEADER_LEN,)),
        ("vectors", np.dtype(np.float32), (capacity, dim)),
        ("links0", np.dtype(np.int32), (capacity, 1 + 2 * m)),
        ("levels", np.dtype(np.int8), (capacity,)),
        ("upper_offset", np.dtype(np.int32), (capacity,)),
        ("labels", np.dtype(np.int64), (capacity,)),
        ("tenants", np.dtype(np.int32), (capacity,)),
        ("tombstones", np.dtype(np.uint8), (capacity,)),
        ("pool", np.dtype(np.int32), (pool, 1 + m)),
        ("keys", np.dtype(np.uint8), (capacity, KEY_BYTES)),
    ]
    out = []
    offset = 0
    for name, dtype, shape in spec:
        offset = (offset + ALIGN - 1) // ALIGN * ALIGN
        out.append((name, dtype, shape, offset))
        offset += dtype.itemsize * int(np.prod(shape))
    return out, offset


ARRAY_NAMES = ("header", "vectors", "links0", "levels", "upper_offset", "labels", "tenants", "tombstones", "pool",
               "keys")


def _header_int(slot: int, doc: str) -> property:
    """A read-only property: header[slot] as an int."""
    return property(lambda self: int(self.header[slot]), doc=doc)


@dataclass(eq=False)
class HnswArrays:
    """The arrays of one index (views into one buffer, or private numpy memory)."""

    header: np.ndarray
    vectors: np.ndarray
    links0: np.ndarray
    levels: np.ndarray
    upper_offset: np.ndarray
    labels: np.ndarray
    tenants: np.ndarray
    tombstones: np.ndarray
    pool: np.ndarray
    keys: np.ndarray
    buffer: object = None  # what the views point into (kept alive with them)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def allocate(cls, capacity: int, dim: int, *, m: int = 16, ef_construction: int = 200, metric: str = "l2",
                 upper_pool_capacity: int | None = None, ef_search: int = DEFAULT_EF_SEARCH,
                 seed: int = 100) -> HnswArrays:
        """A new empty index in private memory."""
        _, total = layout(capacity, dim, m, upper_pool_capacity)
        buf = np.zeros(total, dtype=np.uint8)
        return cls.create_in(buf, capacity, dim, m=m, ef_construction=ef_construction, metric=metric,
                             upper_pool_capacity=upper_pool_capacity, ef_search=ef_search, seed=seed)

    @classmethod
    def create_in(cls, buf, capacity: int, dim: int, *, m: int = 16, ef_construction: int = 200,
                  metric: str = "l2", upper_pool_capacity: int | None = None,
                  ef_search: int = DEFAULT_EF_SEARCH, seed: int = 100) -> HnswArrays:
        """Initialise a new empty index in `buf` (any writable buffer of at least layout()[1] bytes,
        e.g. a fresh shared memory segment) and return views on it."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, not {metric!r}")
        if ef_construction < 1 or ef_search < 1:
            raise ValueError("ef_construction and ef_search must be positive")
        spec, _ = layout(capacity, dim, m, upper_pool_capacity)
        a = cls._views(buf, spec)
        h = a.header
        h[:] = 0
        a.links0[:, 0] = 0
        a.levels[:] = 0
        a.upper_offset[:] = -1
        a.labels[:] = -1
        a.tenants[:] = -1
        a.tombstones[:] = 0
        a.pool[:, 0] = 0
        a.keys[:, 0] = NO_KEY
        h[H_ENTRY] = -1
        h[H_MAX_LEVEL] = -1
        h[H_EF_SEARCH] = ef_search
        h[H_M] = m
        h[H_EF_CONSTRUCTION] = ef_construction
        h[H_DIM] = dim
        h[H_METRIC] = METRICS[metric]
        h[H_CAPACITY] = capacity
        h[H_POOL_CAPACITY] = a.pool.shape[0]
        h[H_SEED] = seed
        h[H_RNG] = np.uint64(seed & (2**64 - 1)).view(np.int64)
        h[H_VERSION] = LAYOUT_VERSION
        h[H_MAGIC] = MAGIC  # last: a buffer with a magic is fully initialised
        return a

    @classmethod
    def from_buffer(cls, buf) -> HnswArrays:
        """Views on an index already initialised in `buf` (by `create_in`, possibly in another process).
        A read-only buffer gives read-only arrays (searching works; writing does not)."""
        head = np.frombuffer(buf, dtype=np.int64, count=HEADER_LEN)
        if int(head[H_MAGIC]) != MAGIC:
            raise ValueError("buffer does not hold an HNSW index (bad magic)")
        if int(head[H_VERSION]) != LAYOUT_VERSION:
            raise ValueError(f"HNSW layout version {int(head[H_VERSION])} is not supported ({LAYOUT_VERSION} is)")
        capacity, dim, m, pool = (int(head[i]) for i in (H_CAPACITY, H_DIM, H_M, H_POOL_CAPACITY))
        spec, total = layout(capacity, dim, m, pool)
        if memoryview(buf).nbytes < total:
            raise ValueError(f"buffer of {memoryview(buf).nbytes} bytes is smaller than the index ({total})")
        return cls._views(buf, spec)

    @classmethod
    def _views(cls, buf, spec) -> HnswArrays:
        mv = memoryview(buf)
        if mv.nbytes < spec[-1][3]:
            raise ValueError("buffer too small for this layout")
        arrays = {}
        for name, dtype, shape, offset in spec:
            count = int(np.prod(shape))
            arrays[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)
        return cls(buffer=buf, **arrays)

    # -- properties ----------------------------------------------------------------------------------

    @property
    def kernel_args(self) -> tuple[np.ndarray, ...]:
        return (self.header, self.vectors, self.links0, self.levels, self.upper_offset, self.labels,
                self.tenants, self.tombstones, self.pool)

    count = _header_int(H_COUNT, "Published nodes: rows [0, count) are readable.")
    ef_construction = _header_int(H_EF_CONSTRUCTION, "The candidate list size of inserts.")
    deleted_count = _header_int(H_DELETED, "Tombstoned nodes.")
    generation = _header_int(H_GENERATION, "Bumped by grow / rebuild (the new arrays carry the old generation + 1).")

    @property
    def capacity(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def m(self) -> int:
        return self.pool.shape[1] - 1

    @property
    def metric(self) -> str:
        return METRIC_NAMES[int(self.header[H_METRIC])]

    @property
    def ef_search(self) -> int:
        return int(self.header[H_EF_SEARCH])

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"ef_search must be positive, not {value}")
        self.header[H_EF_SEARCH] = int(value)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole index (all arrays at full capacity, as laid out in one buffer)."""
        return layout(self.capacity, self.dim, self.m, self.pool.shape[0])[1]

    @property
    def writable(self) -> bool:
        return bool(self.header.flags.writeable)

    def layout(self):
        return layout(self.capacity, self.dim, self.m, self.pool.shape[0])


# ---------------------------------------------------------------------------------------------------
# Low-level intrinsics: ordered loads/stores for publication, and prefetch
# ---------------------------------------------------------------------------------------------------


def _item_pointer(context, builder, aryty, aryval, idx, idxty):
    ary = context.make_array(aryty)(context, builder, aryval)
    i = context.cast(builder, idx, idxty, types.intp)
    return cgutils.get_item_pointer(context, builder, aryty, ary, [i], wraparound=False)


@intrinsic
def _load_acquire(typingctx, arr, idx):
    """arr[idx] as an atomic load with acquire ordering (arr: 1-d int64)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ptr = _item_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return builder.load_atomic(ptr, "acquire", 8, typ=ir.IntType(64))

    return types.int64(arr, idx), codegen


@intrinsic
def _store_release(typingctx, arr, idx, val):
    """arr[idx] = val as an atomic store with release ordering (arr: 1-d int64), after a full fence."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ptr = _item_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.fence("seq_cst")
        builder.store_atomic(v, ptr, "release", 8)
        return context.get_dummy_value()

    return types.void(arr, idx, val), codegen


@intrinsic
def _prefetch(typingctx, arr, row, byte_offset):
    """Prefetch (for reading, into all cache levels) the line holding byte `byte_offset` of row `row`."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        strides = cgutils.unpack_tuple(builder, ary.strides, aryty.ndim)
        r = context.cast(builder, args[1], sig.args[1], types.intp)
        off = builder.add(builder.mul(r, strides[0]), context.cast(builder, args[2], sig.args[2], types.intp))
        i8p = ir.IntType(8).as_pointer()
        base = builder.bitcast(ary.data, i8p)
        p = builder.gep(base, [off])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [p, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, row, byte_offset), codegen


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------

# Reassociation (for SIMD sums) and FMA contraction; no nnan/ninf: garbage read from a list being
# rewritten must never turn into undefined behaviour.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_JIT = dict(cache=True, nogil=True, fastmath=_FASTMATH, boundscheck=False, error_model="numpy")
# Small helpers of the maintenance kernels, inlined by numba itself (before LLVM sees them).
_JIT_INLINE = dict(_JIT, inline="always")
_INF = np.float32(np.inf)


@njit(**_JIT)
def _dist(vectors, i, q, metric):
    """Distance between stored row i and query q (metric 0: squared l2, else 1 - dot)."""
    dim = q.shape[0]
    s = np.float32(0.0)
    if metric == 0:
        for j in range(dim):
            t = vectors[i, j] - q[j]
            s += t * t
        return s
    for j in range(dim):
        s += vectors[i, j] * q[j]
    return np.float32(1.0) - s


@njit(**_JIT)
def _dist2(vectors, a, b, metric):
    """Distance between stored rows a and b."""
    return _dist(vectors, a, vectors[b], metric)


@njit(**_JIT)
def _prefetch_vector(vectors, i):
    nbytes = vectors.shape[1] * 4
    for off in range(0, nbytes, 64):
        _prefetch(vectors, i, off)


@njit(**_JIT)
def _heap_push(hd, hi, n, d, i):
    """Push (d, i) on the max-heap (hd, hi) of size n; returns the new size."""
    j = n
    while j > 0:
        p = (j - 1) >> 1
        if hd[p] >= d:
            break
        hd[j] = hd[p]
        hi[j] = hi[p]
        j = p
    hd[j] = d
    hi[j] = i
    return n + 1


@njit(**_JIT)
def _heap_sift_down(hd, hi, n, d, i):
    """Place (d, i) at the root of the max-heap of size n and sift it down."""
    j = 0
    while True:
        c = 2 * j + 1
        if c >= n:
            break
        if c + 1 < n and hd[c + 1] > hd[c]:
            c += 1
        if hd[c] <= d:
            break
        hd[j] = hd[c]
        hi[j] = hi[c]
        j = c
    hd[j] = d
    hi[j] = i


@njit(**_JIT)
def _keep(hd, hi, n, cap, d, i):
    """Offer (d, i) to the max-heap of at most `cap` best: pushed while it has room, else it replaces the
    top (the caller checked d beats it); returns the new size."""
    if n < cap:
        return _heap_push(hd, hi, n, d, i)
    _heap_sift_down(hd, hi, n, d, i)
    return n


@njit(**_JIT)
def _heap_pop(hd, hi, n):
    """Remove the top of the max-heap of size n; returns the new size."""
    n -= 1
    if n > 0:
        _heap_sift_down(hd, hi, n, hd[n], hi[n])
    return n


@njit(**_JIT)
def _next_tag(visited):
    """Start a new search on a generation-stamped visited array (the stamp lives in its last slot)."""
    last = visited.shape[0] - 1
    t = np.int64(visited[last]) + 1
    if t > 65535:
        visited[:] = 0
        t = 1
    visited[last] = t
    return t


@njit(**_JIT)
def _list_of(level, node, links0, upper_offset, levels, pool):
    """The neighbour list (count, ids...) of `node` on `level`, or an empty view if it has none."""
    if level == 0:
        return links0[node]
    if levels[node] < level:
        return pool[0, 0:0]
    off = upper_offset[node]
    row = np.int64(off) + level - 1
    if off < 0 or row >= pool.shape[0]:
        return pool[0, 0:0]
    return pool[row]


@njit(**_JIT)
def _greedy(vectors, levels, upper_offset, pool, q, metric, n_pub, cur, cur_d, top_level, stop_level):
    """hnswlib's greedy descent from `top_level` down to `stop_level` + 1; returns (node, distance)."""
    maxm = pool.shape[1] - 1
    for level in range(top_level, stop_level, -1):
        changed = True
        while changed:
            changed = False
            if levels[cur] < level:
                break
            off = upper_offset[cur]
            row = np.int64(off) + level - 1
            if off < 0 or row >= pool.shape[0]:
                break
            cnt = np.int64(pool[row, 0])
            if cnt > maxm:
                cnt = maxm
            for j in range(1, cnt + 1):
                nb = np.int64(pool[row, j])
                if nb < 0 or nb >= n_pub:
                    continue
                d = _dist(vectors, nb, q, metric)
                if d < cur_d:
                    cur_d = d
                    cur = nb
                    changed = True
    return cur, cur_d


@njit(**_JIT_INLINE)
def _gather(vectors, lst, n_pub, visited, tag, nbuf):
    """The unvisited neighbours of a list (count, ids...) into nbuf, marking them visited and prefetching
    their vectors; returns how many. The count is clamped to the list (it may be mid-rewrite). Inlined by
    numba: called (not inlined) from `_search_layer` it measured 3-13 % fewer QPS; inlined, 0.99-1.03 x the
    loop written out in place (ef 32, 64, 128; six in-process A/B runs on 20,000 x 128, chunks of 100
    queries alternating, medians of 11-15 rounds)."""
    cnt = np.int64(lst[0])
    if cnt > lst.shape[0] - 1:
        cnt = lst.shape[0] - 1
    nn = 0
    for j in range(1, cnt + 1):
        nb = np.int64(lst[j])
        if nb < 0 or nb >= n_pub:
            continue
        if visited[nb] == tag:
            continue
        visited[nb] = tag
        _prefetch_vector(vectors, nb)
        nbuf[nn] = nb
        nn += 1
    return nn


@njit(**_JIT)
def _allowed(tombstones, tenants, i, tenant):
    """Whether node i may be a result: live, and of `tenant` when tenant >= 0."""
    return tombstones[i] == 0 and (tenant < 0 or tenants[i] == tenant)


@njit(**_JIT)
def _start(visited, tombstones, tenants, tenant, ep, ep_d, top_d, top_i, cand_d, cand_i):
    """A layer search's first step: a new visited stamp, the entry point as the first candidate (and first
    result if allowed); returns (tag, candidates, results, bound)."""
    tag = _next_tag(visited)
    ntop = np.int64(0)  # np.int64(): a literal 0 would make numba compile extra specialisations
    lower = _INF
    visited[ep] = tag
    if _allowed(tombstones, tenants, ep, tenant):
        ntop = _heap_push(top_d, top_i, ntop, ep_d, ep)
        lower = ep_d
    ncand = _heap_push(cand_d, cand_i, np.int64(0), -ep_d, ep)
    return tag, ncand, ntop, lower


@njit(**_JIT)
def _search_layer(vectors, links0, levels, upper_offset, pool, tenants, tombstones, q, metric, n_pub,
                  ep, ep_d, level, ef, tenant, filtering, visited, cand_d, cand_i, top_d, top_i, nbuf):
    """hnswlib's searchBaseLayer(ST): best-first search on `level` from `ep` with `ef` results.

    Candidates: a max-heap on -distance (cand_d, cand_i); results: a max-heap on distance (top_d, top_i)
    holding only allowed nodes (not tombstoned, and of `tenant` when tenant >= 0). Neighbour ids are
    checked against n_pub. Returns the number of results in the top heap."""
    tag = _next_tag(visited)
    ncand = np.int64(0)  # np.int64(): a literal 0 would make numba compile extra specialisations
    ntop = np.int64(0)
    lower = _INF
    visited[ep] = tag
    if tombstones[ep] == 0 and (tenant < 0 or tenants[ep] == tenant):
        ntop = _heap_push(top_d, top_i, ntop, ep_d, ep)
        lower = ep_d
    ncand = _heap_push(cand_d, cand_i, ncand, -ep_d, ep)
    while ncand > 0:
        cd = -cand_d[0]
        c = np.int64(cand_i[0])
        if cd > lower and (ntop >= ef or not filtering):
            break
        ncand = _heap_pop(cand_d, cand_i, ncand)
        lst = _list_of(level, c, links0, upper_offset, levels, pool)
        if lst.shape[0] == 0:
            continue
        nn = _gather(vectors, lst, n_pub, visited, tag, nbuf)   # then the distances, the vectors prefetched
        for t in range(nn):
            nb = np.int64(nbuf[t])
            d = _dist(vectors, nb, q, metric)
            if ntop < ef or d < lower:
                ncand = _heap_push(cand_d, cand_i, ncand, -d, nb)
                if tombstones[nb] == 0 and (tenant < 0 or tenants[nb] == tenant):
                    if ntop < ef:
                        ntop = _heap_push(top_d, top_i, ntop, d, nb)
                    else:
                        _heap_sift_down(top_d, top_i, ntop, d, nb)
                    lower = top_d[0]
        if ncand > 0:
            _prefetch(links0, cand_i[0], 0)
    return ntop

# Per-query early termination (declarative recall, neurondb/index/adaptive.py trains the model). The level-0
# search runs with a large ef and, every so many distance computations, computes these features of its state
# and asks the model for the recall of its current top k; it stops when the prediction reaches the threshold
# the caller derived from the declared recall.
NF = 12            # features: see _features
MODEL_HEADER = 8   # model[0..7]: MODEL_MAGIC, trees, depth, base prediction, version, ef_max, interval, calibration
                   # pairs; then the trees (`_predict`), then the pairs (declared recall, threshold), ascending
MODEL_MAGIC = 0x52434C31   # "RCL1"


@njit(**_JIT)
def _predict(model, f):
    """A gradient-boosted ensemble of complete binary trees (depth D): per tree 2^D - 1 split features,
    2^D - 1 thresholds, 2^D leaf values, after the header; base + the sum of the leaves reached."""
    trees = np.int64(model[1])
    depth = np.int64(model[2])
    inner = (np.int64(1) << depth) - 1
    width = 3 * inner + 1
    y = model[3]
    for t in range(trees):
        off = MODEL_HEADER + t * width
        node = np.int64(0)
        for _ in range(depth):
            fi = np.int64(model[off + node])
            node = 2 * node + 1 + (f[fi] > model[off + inner + node])
        y += model[off + 2 * inner + node - inner]
    return y


@njit(**_JIT)
def _features(f, ndis, hops, kd, nk, ep_d, frontier, inserts, stale):
    """The search's state at a checkpoint: effort so far, the best and the k-th distance found, how far the
    closest unexpanded candidate lies beyond the k-th, and how recently the top k changed."""
    d1 = kd[0]
    for j in range(1, nk):
        if kd[j] < d1:
            d1 = kd[j]
    dk = kd[0]
    eps = 1e-9
    f[0] = ndis
    f[1] = hops
    f[2] = d1
    f[3] = dk
    f[4] = dk / (abs(ep_d) + eps)
    f[5] = d1 / (abs(dk) + eps)
    f[6] = frontier / (abs(dk) + eps)
    f[7] = inserts
    f[8] = stale
    f[9] = stale / ndis
    f[10] = frontier - dk
    f[11] = dk - d1


@njit(**_JIT)
def _search_layer_adaptive(vectors, links0, tenants, tombstones, q, metric, n_pub, ep, ep_d, k, ef, tenant,
                           filtering, visited, cand_d, cand_i, top_d, top_i, nbuf, kd, ki, model, tau, interval,
                           trace_f, trace_i, labels):
    """`_search_layer` on level 0 with `ef` as the limit, stopped early once `_predict` says the top k reached
    `tau`; every checkpoint's features and top k (labels) go to trace_f / trace_i while they have room (the
    training's record; a final row when the search ends by itself). Returns (results, checkpoints)."""
    tag, ncand, ntop, lower = _start(visited, tombstones, tenants, tenant, ep, ep_d, top_d, top_i, cand_d, cand_i)
    nk = _keep(kd, ki, np.int64(0), k, ep_d, ep) if ntop else np.int64(0)
    predict = model.shape[0] > 0
    f = np.empty(NF, np.float64)
    ndis = np.int64(1)
    hops = np.int64(0)
    inserts = np.int64(0)
    last_insert = np.int64(0)
    next_check = np.int64(interval)
    nck = np.int64(0)
    while ncand > 0:
        cd = -cand_d[0]
        c = np.int64(cand_i[0])
        if cd > lower and (ntop >= ef or not filtering):
            break
        if nk >= k and ndis >= next_check:
            _features(f, ndis, hops, kd, nk, ep_d, cd, inserts, ndis - last_insert)
            inserts = 0
            next_check = ndis + max(interval, ndis >> 4)
            if nck < trace_f.shape[0]:
                trace_f[nck] = f
                for j in range(k):
                    trace_i[nck, j] = labels[ki[j]]
            nck += 1
            if predict and _predict(model, f) >= tau:
                return ntop, nck
        ncand = _heap_pop(cand_d, cand_i, ncand)
        hops += 1
        nn = _gather(vectors, links0[c], n_pub, visited, tag, nbuf)
        ndis += nn
        for t in range(nn):
            nb = np.int64(nbuf[t])
            d = _dist(vectors, nb, q, metric)
            if not (ntop < ef or d < lower):
                continue
            ncand = _heap_push(cand_d, cand_i, ncand, -d, nb)
            if _allowed(tombstones, tenants, nb, tenant):
                ntop = _keep(top_d, top_i, ntop, ef, d, nb)
                lower = top_d[0]
                if nk < k or d < kd[0]:           # the top k (kd, ki) the features and the trace read
                    nk = _keep(kd, ki, nk, k, d, nb)
                    inserts += 1
                    last_insert = ndis
        if ncand > 0:
            _prefetch(links0, cand_i[0], 0)
    if nk >= k and nck < trace_f.shape[0]:      # the search ended by itself: its final state
        _features(f, ndis, hops, kd, nk, ep_d, _INF, inserts, ndis - last_insert)
        trace_f[nck] = f
        for j in range(k):
            trace_i[nck, j] = labels[ki[j]]
        nck += 1
    return ntop, nck


@njit(**_JIT)
def _search_one(header, vectors, links0, levels, upper_offset, labels, tenants, tombstones, pool, q, k, ef,
                tenant, visited, cand_d, cand_i, top_d, top_i, nbuf, out_labels, out_dist, out_ids, adaptive, kd, ki,
                model, tau, interval, trace_f, trace_i):
    """One query; writes up to k results best first and returns (how many, checkpoints). `adaptive`: level 0 is
    searched by `_search_layer_adaptive` (ef is then its limit), else by `_search_layer`."""
    ep = _load_acquire(header, H_ENTRY)
    n_pub = _load_acquire(header, H_COUNT)
    if n_pub > vectors.shape[0]:
        n_pub = vectors.shape[0]
    if n_pub <= 0 or ep < 0 or ep >= n_pub:
        return 0, 0
    metric = header[H_METRIC]
    filtering = tenant >= 0 or header[H_DELETED] > 0
    if ef < k:
        ef = k
    ep_d = _dist(vectors, ep, q, metric)
    level0 = np.int64(0)
    cur, cur_d = _greedy(vectors, levels, upper_offset, pool, q, metric, n_pub, ep, ep_d, np.int64(levels[ep]),
                         level0)
    nck = np.int64(0)
    if adaptive:
        ntop, nck = _search_layer_adaptive(vectors, links0, tenants, tombstones, q, metric, n_pub, cur, cur_d, k, ef,
                                           tenant, filtering, visited, cand_d, cand_i, top_d, top_i, nbuf, kd, ki,
                                           model, tau, interval, trace_f, trace_i, labels)
    else:
        ntop = _search_layer(vectors, links0, levels, upper_offset, pool, tenants, tombstones, q, metric, n_pub,
                             cur, cur_d, level0, ef, tenant, filtering, visited, cand_d, cand_i, top_d, top_i, nbuf)
    while ntop > k:
        ntop = _heap_pop(top_d, top_i, ntop)
    n = ntop
    while ntop > 0:
        i = top_i[0]
        out_labels[ntop - 1] = labels[i]
        out_dist[ntop - 1] = top_d[0]
        out_ids[ntop - 1] = i
        ntop = _heap_pop(top_d, top_i, ntop)
    return n, nck


@njit(**_JIT)
def _search_many_kernel(header, vectors, links0, levels, upper_offset, labels, tenants, tombstones, pool, queries,
                        k, ef, tenant, visited, cand_d, cand_i, out_labels, out_dist, out_ids, out_n, model, tau,
                        interval, trace_f, trace_i, trace_n):
    """Every query at `ef`; with `interval` > 0 adaptively (`_search_layer_adaptive`: `ef` is the limit, `model`
    and `tau` stop it, trace_f / trace_i (nq, checkpoints, ...) record it, trace_n counts its checkpoints)."""
    ef2 = max(ef, k)
    adaptive = interval > 0
    kd = np.empty(k + 1, np.float32)
    ki = np.empty(k + 1, np.int32)
    top_d = np.empty(ef2 + 1, np.float32)
    top_i = np.empty(ef2 + 1, np.int32)
    nbuf = np.empty(links0.shape[1] + pool.shape[1], np.int32)
    cosine = header[H_METRIC] == 1
    qn = np.empty(queries.shape[1], np.float32)     # a cosine query, normalised here (cheaper than numpy's)
    bad = 0
    for qi in range(queries.shape[0]):
        finite = True
        norm2 = 0.0
        for j in range(queries.shape[1]):
            x = queries[qi, j]
            if not math.isfinite(x):
                finite = False
            norm2 += x * x
        if not finite:
            out_n[qi] = -1
            bad += 1
            continue
        q = queries[qi]
        if cosine:
            scale = 1.0 / math.sqrt(norm2) if norm2 > 0.0 else 0.0
            for j in range(queries.shape[1]):
                qn[j] = queries[qi, j] * scale
            q = qn
        n, nck = _search_one(header, vectors, links0, levels, upper_offset, labels, tenants, tombstones, pool,
                             q, k, ef, tenant, visited, cand_d, cand_i, top_d, top_i, nbuf,
                             out_labels[qi], out_dist[qi], out_ids[qi], adaptive, kd, ki, model, tau, interval,
                             trace_f[qi], trace_i[qi])
        out_n[qi] = n
        trace_n[qi] = nck
        for j in range(n, k):  # padding: no result
            out_labels[qi, j] = -1
            out_dist[qi, j] = _INF
            out_ids[qi, j] = -1
    return bad  # queries with NaN or inf (the caller raises)


@njit(**_JIT)
def _splitmix64(header):
    s = np.uint64(header[H_RNG]) + np.uint64(0x9E3779B97F4A7C15)
    header[H_RNG] = np.int64(s)
    z = s
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(**_JIT)
def _random_level(header, mult):
    u = (np.float64(_splitmix64(header) >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0)  # (0, 1)
    lv = np.int64(-math.log(u) * mult)
    return min(lv, MAX_LEVEL)


@njit(**_JIT)
def _sort_pairs(d, i, n):
    """Insertion sort of (d, i)[:n] by d ascending (n is small: a neighbour list)."""
    for a in range(1, n):
        kd = d[a]
        ki = i[a]
        b = a - 1
        while b >= 0 and d[b] > kd:
            d[b + 1] = d[b]
            i[b + 1] = i[b]
            b -= 1
        d[b + 1] = kd
        i[b + 1] = ki


@njit(**_JIT)
def _heuristic(vectors, metric, cd, ci, n, m, out_d, out_i):
    """hnswlib's getNeighborsByHeuristic2 over candidates (cd, ci)[:n] sorted by distance ascending:
    keep a candidate only if it is closer to the base than to every candidate already kept."""
    if n <= m:
        for t in range(n):
            out_d[t] = cd[t]
            out_i[t] = ci[t]
        return n
    nret = 0
    for t in range(n):
        if nret >= m:
            break
        cur = ci[t]
        dcur = cd[t]
        good = True
        for r in range(nret):
            if _dist2(vectors, out_i[r], cur, metric) < dcur:
                good = False
                break
        if good:
            out_d[nret] = dcur
            out_i[nret] = cur
            nret += 1
    return nret


@njit(**_JIT)
def _connect(vectors, metric, lst, width, c, s, d_cs, tmp_d, tmp_i, sel_d, sel_i):
    """Add c to the list `lst` of node s (hnswlib's mutuallyConnectNewElement, other side): append if
    there is room, else re-select the list with the heuristic over its members plus c."""
    sz = np.int64(lst[0])
    if sz < 0:
        sz = 0
    if sz > width:
        sz = width
    for j in range(1, sz + 1):
        if lst[j] == c:
            return
    if sz < width:
        lst[1 + sz] = c  # the id first, then the count: readers see either the old or the new list
        lst[0] = sz + 1
        return
    tmp_d[0] = d_cs
    tmp_i[0] = c
    for j in range(sz):
        o = lst[1 + j]
        tmp_d[1 + j] = _dist2(vectors, o, s, metric)
        tmp_i[1 + j] = o
    _sort_pairs(tmp_d, tmp_i, sz + 1)
    nret = _heuristic(vectors, metric, tmp_d, tmp_i, sz + 1, width, sel_d, sel_i)
    for r in range(nret):
        lst[1 + r] = sel_i[r]
    lst[0] = nret


@njit(**_JIT)
def _link_level(vectors, links0, levels, upper_offset, pool, tenants, tombstones, metric, n_pub, c, q, cur, cur_d,
                lv, efc, visited, cand_d, cand_i, bufs):
    """Connect node c on level lv (hnswlib's insert step for one level): best-first search from (cur, cur_d)
    with efc candidates, c's list chosen by the heuristic, back-links added to each chosen neighbour (whose
    list is re-selected if full). Returns the closest neighbour found, where the next level down starts."""
    top_d, top_i, sd, si, sel_d, sel_i, tmp_d, tmp_i, sel2_d, sel2_i, nbuf = bufs
    m = pool.shape[1] - 1
    maxm0 = links0.shape[1] - 1
    filtering = True      # link to live nodes only, however many tombstones the walk passes
    ntop = _search_layer(vectors, links0, levels, upper_offset, pool, tenants, tombstones, q, metric, n_pub,
                         cur, cur_d, lv, efc, np.int64(-1), filtering, visited, cand_d, cand_i, top_d, top_i, nbuf)
    nsorted = 0
    while ntop > 0:           # ascending, skipping c itself (found when c is re-linked by maintenance)
        if top_i[0] != c:
            sd[nsorted] = top_d[0]
            si[nsorted] = top_i[0]
            nsorted += 1
        ntop = _heap_pop(top_d, top_i, ntop)
    for a in range(nsorted // 2):
        b = nsorted - 1 - a
        sd[a], sd[b] = sd[b], sd[a]
        si[a], si[b] = si[b], si[a]
    if nsorted == 0:          # everything reachable is deleted: link to where we are
        if cur == c:
            return cur, cur_d
        sd[0] = cur_d
        si[0] = cur
        nsorted = 1
    nsel = _heuristic(vectors, metric, sd, si, nsorted, m, sel_d, sel_i)
    width = maxm0 if lv == 0 else m
    own = _list_of(lv, c, links0, upper_offset, levels, pool)
    for r in range(nsel):
        own[1 + r] = sel_i[r]
    own[0] = nsel
    for r in range(nsel):
        s = np.int64(sel_i[r])
        other = _list_of(lv, s, links0, upper_offset, levels, pool)
        if other.shape[0] == 0:
            continue
        _connect(vectors, metric, other, width, c, s, sel_d[r], tmp_d, tmp_i, sel2_d, sel2_i)
    return np.int64(sel_i[0]), sel_d[0]


@njit(**_JIT)
def _link_buffers(efc, m, maxm0):
    return (np.empty(efc + 1, np.float32), np.empty(efc + 1, np.int32), np.empty(efc + 1, np.float32),
            np.empty(efc + 1, np.int32), np.empty(maxm0 + 1, np.float32), np.empty(maxm0 + 1, np.int32),
            np.empty(maxm0 + 2, np.float32), np.empty(maxm0 + 2, np.int32), np.empty(maxm0 + 2, np.float32),
            np.empty(maxm0 + 2, np.int32), np.empty(maxm0 + m + 2, np.int32))


@njit(**_JIT_INLINE)
def _linker(header, links0, pool):
    """What a kernel that re-links published nodes reads first: (published count, metric, M, level-0 width,
    ef_construction, its link buffers)."""
    m = pool.shape[1] - 1
    maxm0 = links0.shape[1] - 1
    efc = max(header[H_EF_CONSTRUCTION], 1)
    return min(header[H_COUNT], links0.shape[0]), header[H_METRIC], m, maxm0, efc, _link_buffers(efc, m, maxm0)


@njit(**_JIT)
def _block_donor(free, tombstones, levels, upper_offset, c, level):
    """The free row (other than c) whose block of upper rows is the smallest that holds `level` levels, or -1.
    A freed row keeps its block (its lists cleared), and its level says the block's size."""
    best = np.int64(-1)
    for t in range(free.shape[0]):
        d = np.int64(free[t])
        if d == c or tombstones[d] != FREE or upper_offset[d] < 0 or levels[d] < level:
            continue
        if best < 0 or levels[d] < levels[best]:
            best = d
            if levels[d] == level:
                break
    return best


@njit(**_JIT)
def _block_receive(free, tombstones, levels, upper_offset, c, off, level):
    """Give the block of `level` upper rows at `off` to a free row (other than c) without one, so that a later
    insert can take it (`_block_donor`); with no such row the rows stay unused until a compaction."""
    for t in range(free.shape[0]):
        e = np.int64(free[t])
        if e != c and tombstones[e] == FREE and upper_offset[e] < 0:
            levels[e] = level       # the level first, then the offset: a reader on a stale link to e reads
            upper_offset[e] = off   # either no block or this one, whose lists are empty
            return


@njit(**_JIT)
def _add_kernel(header, vectors, links0, levels, upper_offset, labels, tenants, tombstones, pool,
                new_vecs, new_labels, new_tenants, replace_ids, slots, free, visited, cand_d, cand_i, out_ids):
    """Insert new_vecs[t] (already normalised for cosine) one by one; returns how many were inserted.

    slots[t] >= 0 reuses that free slot (tombstone FREE: unlinked by maintenance, see `free_deleted`) instead
    of appending a row. Such a row is below the published count, so it is written under a tombstone (traversed,
    never returned) and published by clearing the tombstone once its vector, label and links are complete.
    A node above level 0 takes its upper rows from its own row's block if that fits, else from another free
    row's (`free`: the FREE rows), else from the pool's end; a block it does not use goes to a free row. So
    churn reuses upper rows as it reuses rows, and the pool does not fill up (which would cut new levels)."""
    n = new_vecs.shape[0]
    cap = vectors.shape[0]
    dim = vectors.shape[1]
    metric = header[H_METRIC]
    m = pool.shape[1] - 1
    maxm0 = links0.shape[1] - 1
    efc = max(header[H_EF_CONSTRUCTION], 1)
    mult = 1.0 / math.log(max(m, 2))
    pool_cap = pool.shape[0]
    bufs = _link_buffers(efc, m, maxm0)
    for t in range(n):
        count = header[H_COUNT]
        c = slots[t]
        reuse = c >= 0
        if not reuse:
            c = count
            if c >= cap:
                return t
        elif c >= count or tombstones[c] != FREE:
            return t
        header[H_WRITER] = c + 1
        level = _random_level(header, mult)
        old_level = np.int64(levels[c]) if reuse else np.int64(0)
        old_off = upper_offset[c] if reuse else -1
        if reuse:             # from now on a deleted node (what repair assumes if we die here)
            tombstones[c] = DELETED
            header[H_FREE] -= 1
            header[H_DELETED] += 1
        pool_used = header[H_POOL_USED]
        off = np.int64(old_off) if level > 0 and old_off >= 0 and level <= old_level else np.int64(-1)
        if level > 0 and off < 0:             # the row's own upper rows (if any) do not fit
            d = _block_donor(free, tombstones, levels, upper_offset, c, level)
            if d >= 0:                        # a free row's block: taken, the donor left without one
                off = np.int64(upper_offset[d])
                upper_offset[d] = -1
                levels[d] = 0
            elif level <= pool_cap - pool_used:
                off = pool_used
                header[H_POOL_USED] = pool_used + level
            else:                             # the pool is full: a lower level
                header[H_LEVEL_CLAMPED] += 1
                if old_off >= 0:
                    level = old_level
                    off = np.int64(old_off)
                else:
                    level = pool_cap - pool_used
                    off = pool_used
                    header[H_POOL_USED] = pool_cap
        if old_off >= 0 and off != old_off:  # the row's own block goes to a free row without one
            upper_offset[c] = -1              # first: a crash here leaks a block, never shares one
            levels[c] = 0
            _block_receive(free, tombstones, levels, upper_offset, c, old_off, old_level)
        # write the node (unpublished: readers ignore ids >= count, and never return a tombstoned node)
        for j in range(dim):
            vectors[c, j] = new_vecs[t, j]
        labels[c] = new_labels[t]
        tenants[c] = new_tenants[t]
        links0[c, 0] = 0
        for lv in range(level):
            pool[off + lv, 0] = 0
        upper_offset[c] = off if level > 0 else -1
        levels[c] = level
        if not reuse:
            tombstones[c] = 0
        ep = header[H_ENTRY]
        maxl = header[H_MAX_LEVEL]
        q = vectors[c]
        if ep >= 0:
            cur = ep
            cur_d = _dist(vectors, ep, q, metric)
            if level < maxl:
                cur, cur_d = _greedy(vectors, levels, upper_offset, pool, q, metric, count, cur, cur_d, maxl, level)
            for lv in range(min(level, maxl), -1, -1):
                cur, cur_d = _link_level(vectors, links0, levels, upper_offset, pool, tenants, tombstones, metric,
                                         count, c, q, cur, cur_d, lv, efc, visited, cand_d, cand_i, bufs)
        r = replace_ids[t]
        if r >= 0 and r < count and tombstones[r] == 0:
            tombstones[r] = DELETED
            header[H_DELETED] += 1
        out_ids[t] = c
        if reuse:
            _store_release(header, H_MUTATIONS, header[H_MUTATIONS] + 1)   # a fence: the node is complete
            tombstones[c] = 0                                               # publish
            header[H_DELETED] -= 1
        else:
            _store_release(header, H_COUNT, c + 1)  # publish
            header[H_MUTATIONS] += 1
        if ep < 0 or level > maxl:
            _store_release(header, H_MAX_LEVEL, level)
            _store_release(header, H_ENTRY, c)
        header[H_WRITER] = 0
    return n


@njit(**_JIT)
def _fix_entry(header, levels, tombstones, n_pub):
    """Make the entry point a live node of the highest level among live nodes (a deleted one if none is live;
    none if every row is free), and the max level its level. Returns whether it changed."""
    ep = header[H_ENTRY]
    best = np.int64(-1)
    for want in (LIVE, DELETED):
        for i in range(n_pub):
            if tombstones[i] == want and (best < 0 or levels[i] > levels[best]):
                best = i
        if best >= 0:
            break
    if 0 <= ep < n_pub and best >= 0 and tombstones[ep] == tombstones[best] and levels[ep] >= levels[best] \
            and header[H_MAX_LEVEL] == np.int64(levels[ep]):
        return False
    if best < 0:
        if ep < 0:
            return False
        _store_release(header, H_ENTRY, -1)
        _store_release(header, H_MAX_LEVEL, -1)
        return True
    _store_release(header, H_MAX_LEVEL, np.int64(levels[best]))
    _store_release(header, H_ENTRY, best)
    return True


@njit(**_JIT)
def _recount(header, tombstones, n_pub):
    deleted = 0
    free = 0
    for i in range(n_pub):
        if tombstones[i] == DELETED:
            deleted += 1
        elif tombstones[i] == FREE:
            free += 1
    header[H_DELETED] = deleted
    header[H_FREE] = free


@njit(**_JIT)
def _repair_kernel(header, links0, levels, upper_offset, pool, tombstones):
    """After a writer died mid-insert: drop links to unpublished or invalid ids and duplicates (a list
    the heuristic was rewriting can hold one id twice), make the entry point the highest published
    node, recount tombstones. Lists are compacted in place, which readers tolerate."""
    n_pub = min(header[H_COUNT], links0.shape[0])
    removed = 0
    maxm0 = links0.shape[1] - 1
    maxm = pool.shape[1] - 1
    for i in range(n_pub):
        lvl = np.int64(levels[i])
        for lv in range(lvl + 1):
            lst = _list_of(lv, i, links0, upper_offset, levels, pool)
            if lst.shape[0] == 0:
                continue
            width = maxm0 if lv == 0 else maxm
            cnt = min(max(np.int64(lst[0]), 0), width)
            w = 0
            for j in range(1, cnt + 1):
                nb = lst[j]
                keep = 0 <= nb < n_pub and nb != i and tombstones[nb] != FREE
                for x in range(1, w + 1):
                    if lst[x] == nb:
                        keep = False
                        break
                if not keep:
                    removed += 1
                    continue
                lst[1 + w] = nb
                w += 1
            lst[0] = w
    _fix_entry(header, levels, tombstones, n_pub)
    _recount(header, tombstones, n_pub)
    header[H_WRITER] = 0
    return removed


@njit(**_JIT)
def _edge_counts(header, links0, levels, upper_offset, pool):
    n_pub = min(header[H_COUNT], links0.shape[0])
    maxm0 = links0.shape[1] - 1
    maxm = pool.shape[1] - 1
    e0 = 0
    eu = 0
    for i in range(n_pub):
        e0 += min(max(np.int64(links0[i, 0]), 0), maxm0)
        for lv in range(1, np.int64(levels[i]) + 1):
            lst = _list_of(lv, i, links0, upper_offset, levels, pool)
            if lst.shape[0] > 0:
                eu += min(max(np.int64(lst[0]), 0), maxm)
    return e0, eu


# ---------------------------------------------------------------------------------------------------
# Maintenance kernels (neurondb/index/maintenance.py drives them, in bounded slices, as the one writer)
# ---------------------------------------------------------------------------------------------------


@njit(**_JIT)
def _list_is_dirty(lst, width, i, n_pub, tombstones):
    cnt = min(max(np.int64(lst[0]), 0), width)
    for j in range(1, cnt + 1):
        nb = np.int64(lst[j])
        if nb < 0 or nb >= n_pub or nb == i or tombstones[nb] != LIVE:
            return True
    return False


@njit(**_JIT)
def _repair_list(header, vectors, links0, levels, upper_offset, pool, tenants, tombstones, metric, n_pub, p, lv,
                 lst, width, efc, visited, cand_d, cand_i, bufs, cd, ci, sel_d, sel_i):
    """Delete consolidation for one list: p's new neighbours on level lv are chosen by the HNSW heuristic
    from its live neighbours, the live neighbours of its deleted ones (FreshDiskANN's candidates), and what
    a search for p on that level finds (pgvector's repair: across a deleted region, p's best live neighbours
    are often neither). Returns the distance computations (the work done)."""
    top_d, top_i = bufs[0], bufs[1]
    nbuf = bufs[10]
    n = 0
    work = 0
    q = vectors[p]
    ep = _load_acquire(header, H_ENTRY)     # live: maintenance moves it off deleted nodes first (fix_entry)
    if 0 <= ep < n_pub and ep != p and tombstones[ep] == LIVE and np.int64(levels[ep]) >= lv:
        cur_d = _dist(vectors, ep, q, metric)
        cur, cur_d = _greedy(vectors, levels, upper_offset, pool, q, metric, n_pub, ep, cur_d,
                             np.int64(levels[ep]), lv)
        ntop = _search_layer(vectors, links0, levels, upper_offset, pool, tenants, tombstones, q, metric, n_pub,
                             cur, cur_d, lv, efc, np.int64(-1), True, visited, cand_d, cand_i, top_d, top_i, nbuf)
        work += efc * width
        while ntop > 0:
            if top_i[0] != p:
                cd[n] = top_d[0]
                ci[n] = top_i[0]
                n += 1
            ntop = _heap_pop(top_d, top_i, ntop)
    tag = _next_tag(visited)
    visited[p] = tag
    for t in range(n):
        visited[ci[t]] = tag
    cnt = min(max(np.int64(lst[0]), 0), width)
    for j in range(1, cnt + 1):
        nb = np.int64(lst[j])
        if nb < 0 or nb >= n_pub or visited[nb] == tag:
            continue
        visited[nb] = tag
        if tombstones[nb] == LIVE:
            cd[n] = _dist2(vectors, p, nb, metric)
            ci[n] = nb
            n += 1
        elif tombstones[nb] == DELETED:
            other = _list_of(lv, nb, links0, upper_offset, levels, pool)
            if other.shape[0] == 0:
                continue
            c2 = min(max(np.int64(other[0]), 0), other.shape[0] - 1)
            for j2 in range(1, c2 + 1):
                x = np.int64(other[j2])
                if 0 <= x < n_pub and visited[x] != tag and tombstones[x] == LIVE:
                    visited[x] = tag
                    cd[n] = _dist2(vectors, p, x, metric)
                    ci[n] = x
                    n += 1
    work += n
    order = np.argsort(cd[:n])
    sd = cd[:n][order]
    si = ci[:n][order]
    nret = _heuristic(vectors, metric, sd, si, n, width, sel_d, sel_i)
    # Fill the list up to M with the nearest candidates the heuristic passed over: in a graph built by inserts,
    # lists grow past the heuristic's choice with back-links (appended while there is room), and a repaired
    # list as sparse as the heuristic alone leaves it costs recall at a given ef. Not up to 2M on level 0:
    # a full list prunes itself with the heuristic at the next back-link, and lists filled to 2M ended up
    # sparser and slower (0.85 x a fresh build's QPS at recall 0.95 after 8 rounds of 10 % churn, against
    # 0.98 x when filled to M; 20,000 x 128 of scripts/bench_index.py's data).
    fill = min(width, pool.shape[1] - 1)
    if nret < fill:
        tag = _next_tag(visited)
        for r in range(nret):
            visited[sel_i[r]] = tag
        for t in range(n):
            if nret >= fill:
                break
            if visited[si[t]] != tag:
                sel_d[nret] = sd[t]
                sel_i[nret] = si[t]
                nret += 1
    for r in range(nret):
        lst[1 + r] = sel_i[r]
    lst[0] = nret
    tmp_d, tmp_i, sel2_d, sel2_i = bufs[6], bufs[7], bufs[8], bufs[9]
    for r in range(nret):       # and back-links, as an insert makes them: the new neighbours point back at p
        s = np.int64(lst[1 + r])
        other = _list_of(lv, s, links0, upper_offset, levels, pool)
        if other.shape[0] > 0:
            _connect(vectors, metric, other, width, p, s, _dist2(vectors, p, s, metric), tmp_d, tmp_i, sel2_d,
                     sel2_i)
            work += width
    return work


@njit(**_JIT)
def _consolidate_kernel(header, vectors, links0, levels, upper_offset, pool, tenants, tombstones, start, budget,
                        visited, cand_d, cand_i):
    """Repair every list of the live nodes from `start` on that points at a deleted, free or invalid id,
    until `budget` distance computations have been spent. Returns (next node, lists repaired, work)."""
    n_pub, metric, m, maxm0, efc, bufs = _linker(header, links0, pool)
    size = efc + 2 + maxm0 * (maxm0 + 1)
    cd = np.empty(size, np.float32)
    ci = np.empty(size, np.int32)
    sel_d = np.empty(maxm0 + 1, np.float32)
    sel_i = np.empty(maxm0 + 1, np.int32)
    work = np.int64(0)
    repaired = np.int64(0)
    i = np.int64(start)
    while i < n_pub and work < budget:
        if tombstones[i] == LIVE:
            for lv in range(np.int64(levels[i]) + 1):
                lst = _list_of(lv, i, links0, upper_offset, levels, pool)
                width = maxm0 if lv == 0 else m
                if lst.shape[0] > 0 and _list_is_dirty(lst, width, i, n_pub, tombstones):
                    work += _repair_list(header, vectors, links0, levels, upper_offset, pool, tenants, tombstones,
                                         metric, n_pub, i, lv, lst, width, efc, visited, cand_d, cand_i, bufs, cd,
                                         ci, sel_d, sel_i) + 1
                    repaired += 1
        work += 1
        i += 1
    return i, repaired, work


@njit(**_JIT_INLINE)
def _clamped(lv, i, links0, upper_offset, levels, pool):
    """Node i's list on level lv and its count clamped to 0 .. the level's width (an empty list: count 0)."""
    lst = _list_of(lv, i, links0, upper_offset, levels, pool)
    if lst.shape[0] == 0:
        return lst, np.int64(0)
    return lst, min(max(np.int64(lst[0]), np.int64(0)), np.int64(lst.shape[0] - 1))


@njit(**_JIT)
def _free_kernel(header, links0, levels, upper_offset, pool, tombstones, out_freed):
    """Free every deleted node no live list points at (and that is not the entry point): clear its lists and
    make it FREE; links other deleted nodes still have to it are dropped. Returns how many were freed."""
    n_pub = min(header[H_COUNT], links0.shape[0])
    held = np.zeros(n_pub, np.uint8)
    for i in range(n_pub):
        if tombstones[i] != LIVE:
            continue
        for lv in range(np.int64(levels[i]) + 1):
            lst, cnt = _clamped(lv, i, links0, upper_offset, levels, pool)
            for j in range(1, cnt + 1):
                nb = np.int64(lst[j])
                if 0 <= nb < n_pub:
                    held[nb] = 1
    ep = header[H_ENTRY]
    if 0 <= ep < n_pub:
        held[ep] = 1
    nfree = 0
    for i in range(n_pub):
        if tombstones[i] == DELETED and held[i] == 0:
            out_freed[nfree] = i
            nfree += 1
            held[i] = 2
    for i in range(n_pub):           # deleted nodes that stay: forget the freed ones
        if tombstones[i] != DELETED or held[i] == 2:
            continue
        for lv in range(np.int64(levels[i]) + 1):
            lst, cnt = _clamped(lv, i, links0, upper_offset, levels, pool)
            w = 0
            for j in range(1, cnt + 1):
                nb = np.int64(lst[j])
                if 0 <= nb < n_pub and held[nb] != 2:
                    lst[1 + w] = nb
                    w += 1
            if lst.shape[0] > 0:
                lst[0] = w
    for t in range(nfree):
        i = out_freed[t]
        links0[i, 0] = 0
        for lv in range(1, np.int64(levels[i]) + 1):
            lst = _list_of(lv, i, links0, upper_offset, levels, pool)
            if lst.shape[0] > 0:
                lst[0] = 0
        tombstones[i] = FREE
    _recount(header, tombstones, n_pub)
    header[H_MUTATIONS] += 1
    return nfree


@njit(**_JIT)
def _fragmentation_kernel(header, links0, levels, upper_offset, pool, tombstones, level_live, out_nodes):
    """The graph's health figures (see `fragmentation`): returns (live edges on level 0, of them to non-live
    nodes, live nodes without a live out-edge, live nodes unreachable from the entry point over live
    level-0 edges, invalid links (out of range, self, duplicate, to a free row) of live nodes, entry point
    live, a live node on the top level, nodes written to out_nodes (unreachable or without out-edge)).
    level_live[L] counts live nodes whose top level is L."""
    n_pub = min(header[H_COUNT], links0.shape[0])
    maxm0 = links0.shape[1] - 1
    edges = np.int64(0)
    dead = np.int64(0)
    no_out = np.int64(0)
    invalid = np.int64(0)
    nout = np.int64(0)
    for i in range(n_pub):
        if tombstones[i] != LIVE:
            continue
        lvl = np.int64(levels[i])
        if lvl < level_live.shape[0]:
            level_live[lvl] += 1
        for lv in range(lvl + 1):
            lst, cnt = _clamped(lv, i, links0, upper_offset, levels, pool)
            live_out = 0
            for j in range(1, cnt + 1):
                nb = np.int64(lst[j])
                bad = nb < 0 or nb >= n_pub or nb == i
                if not bad:
                    if tombstones[nb] == FREE:
                        bad = True
                    for x in range(1, j):
                        if lst[x] == nb:
                            bad = True
                            break
                if bad:
                    invalid += 1
                    continue
                if lv == 0:
                    edges += 1
                    if tombstones[nb] != LIVE:
                        dead += 1
                    else:
                        live_out += 1
            if lv == 0 and live_out == 0:
                no_out += 1
                if nout < out_nodes.shape[0]:
                    out_nodes[nout] = i
                    nout += 1
    # BFS from the entry point over live level-0 edges
    ep = header[H_ENTRY]
    seen = np.zeros(n_pub, np.uint8)
    queue = np.empty(n_pub + 1, np.int64)
    reached = np.int64(0)
    entry_live = 0 <= ep < n_pub and tombstones[ep] == LIVE
    if 0 <= ep < n_pub:
        head = 0
        tail = 1
        queue[0] = ep
        seen[ep] = 1
        while head < tail:
            c = queue[head]
            head += 1
            if tombstones[c] == LIVE:
                reached += 1
            cnt = min(max(np.int64(links0[c, 0]), 0), maxm0)
            for j in range(1, cnt + 1):
                nb = np.int64(links0[c, j])
                if 0 <= nb < n_pub and seen[nb] == 0 and tombstones[nb] == LIVE:
                    seen[nb] = 1
                    queue[tail] = nb
                    tail += 1
    unreachable = np.int64(0)
    for i in range(n_pub):
        if tombstones[i] == LIVE and seen[i] == 0:
            unreachable += 1
            if nout < out_nodes.shape[0] and links0[i, 0] > 0:   # (no out-edge: already listed)
                out_nodes[nout] = i
                nout += 1
    maxl = header[H_MAX_LEVEL]
    top_live = False
    for i in range(n_pub):
        if tombstones[i] == LIVE and np.int64(levels[i]) >= maxl:
            top_live = True
            break
    return edges, dead, no_out, unreachable, invalid, entry_live, top_live, nout


@njit(**_JIT)
def _relink_kernel(header, vectors, links0, levels, upper_offset, tenants, tombstones, pool, nodes, top, visited,
                   cand_d, cand_i):
    """Give each live node of `nodes` new links on levels 0..its top level, or only on levels above `top`
    when top >= 0 (a promoted node), found as an insert finds them: greedy descent from the entry point, a
    best-first search per level, the heuristic, back-links. A node none of its new neighbours keeps a link to
    (the heuristic dropped it from their full lists) gets one by force in its nearest neighbour's list, in
    place of that list's farthest member, so it is reachable. Returns the forced links."""
    n_pub, metric, _, maxm0, efc, bufs = _linker(header, links0, pool)
    forced = 0
    for t in range(nodes.shape[0]):
        c = np.int64(nodes[t])
        ep = header[H_ENTRY]
        if not (0 <= c < n_pub) or tombstones[c] != LIVE or ep < 0 or ep == c:
            continue
        maxl = header[H_MAX_LEVEL]
        level = np.int64(levels[c])
        low = top + 1 if top >= 0 else 0
        q = vectors[c]
        cur = ep
        cur_d = _dist(vectors, ep, q, metric)
        if level < maxl:
            cur, cur_d = _greedy(vectors, levels, upper_offset, pool, q, metric, n_pub, cur, cur_d, maxl, level)
        for lv in range(min(level, maxl), low - 1, -1):
            cur, cur_d = _link_level(vectors, links0, levels, upper_offset, pool, tenants, tombstones, metric,
                                     n_pub, c, q, cur, cur_d, lv, efc, visited, cand_d, cand_i, bufs)
        if low == 0:
            cnt = min(max(np.int64(links0[c, 0]), 0), maxm0)
            kept = False
            for j in range(1, cnt + 1):
                s = np.int64(links0[c, j])
                sc = min(max(np.int64(links0[s, 0]), 0), maxm0)
                for x in range(1, sc + 1):
                    if links0[s, x] == c:
                        kept = True
                        break
                if kept:
                    break
            if not kept and cnt > 0:
                s = np.int64(links0[c, 1])
                sc = min(max(np.int64(links0[s, 0]), 0), maxm0)
                if sc < maxm0:
                    links0[s, 1 + sc] = c
                    links0[s, 0] = sc + 1
                else:
                    links0[s, sc] = c
                forced += 1
        if level > maxl:
            _store_release(header, H_MAX_LEVEL, level)
            _store_release(header, H_ENTRY, c)
    header[H_MUTATIONS] += 1
    return forced


@njit(**_JIT)
def _promote_kernel(header, levels, upper_offset, pool, tombstones, level_live, target, mult, donors):
    """Level rebalancing: while level L >= 1 holds fewer than half the live nodes the level distribution
    expects (live * M^-L), promote live nodes of level L-1 to L (a new block of upper rows, the old lists
    copied, the new level's list empty until `_relink_kernel` links it). Nodes are picked with the index's
    level generator. When the pool is full, the blocks of free rows (`donors`, a free row keeps its block
    for an insert to reuse) are taken instead. Returns the number of nodes written to target (node ids;
    their old top level is levels - 1)."""
    n_pub = min(header[H_COUNT], levels.shape[0])
    live = np.int64(0)
    for L in range(level_live.shape[0]):
        live += level_live[L]
    at_least = np.zeros(level_live.shape[0] + 1, np.int64)
    for L in range(level_live.shape[0] - 1, -1, -1):
        at_least[L] = at_least[L + 1] + level_live[L]
    done = 0
    pool_cap = pool.shape[0]
    for L in range(1, level_live.shape[0]):
        expected = live * math.exp(-L / mult)
        if expected < 8 or at_least[L] >= expected * 0.5:
            continue
        want = np.int64(expected * 0.75) - at_least[L]
        tries = 0
        while want > 0 and tries < 50 * n_pub and done < target.shape[0]:
            tries += 1
            i = np.int64(_splitmix64(header) % np.uint64(n_pub))
            if tombstones[i] != LIVE or np.int64(levels[i]) != L - 1:
                continue
            used = header[H_POOL_USED]
            if used + L <= pool_cap:
                block = used
                header[H_POOL_USED] = used + L
            else:
                block = -1
                for t in range(donors.shape[0]):
                    d = donors[t]
                    if d >= 0 and tombstones[d] == FREE and upper_offset[d] >= 0 and np.int64(levels[d]) >= L:
                        block = np.int64(upper_offset[d])
                        upper_offset[d] = -1
                        levels[d] = 0
                        donors[t] = -1
                        break
                if block < 0:
                    return done
            old = upper_offset[i]
            for lv in range(L - 1):
                for j in range(pool.shape[1]):
                    pool[block + lv, j] = pool[old + lv, j]
            pool[block + L - 1, 0] = 0
            upper_offset[i] = block    # the copy first, then the offset, then the level (readers read the
            levels[i] = L              # level first: an old level with the new offset reads the same lists)
            target[done] = i
            done += 1
            want -= 1
            at_least[L] += 1
    return done


@njit(**_JIT)
def _compact_kernel(src_vectors, src_links0, src_levels, src_upper, src_labels, src_tenants, src_tombstones,
                    src_pool, live, remap, lo, hi, dst_header, dst_vectors, dst_links0, dst_levels, dst_upper,
                    dst_labels, dst_tenants, dst_tombstones, dst_pool):
    """Copy live[lo:hi] into rows lo..hi of a compact index, their links renumbered by `remap` (old id ->
    new id, -1 for rows not copied, whose links are dropped). dst_header[H_POOL_USED] is the pool cursor."""
    maxm0 = src_links0.shape[1] - 1
    m = src_pool.shape[1] - 1
    for j in range(lo, hi):
        i = live[j]
        for x in range(src_vectors.shape[1]):
            dst_vectors[j, x] = src_vectors[i, x]
        dst_labels[j] = src_labels[i]
        dst_tenants[j] = src_tenants[i]
        dst_tombstones[j] = LIVE if src_tombstones[i] == LIVE else DELETED
        lvl = np.int64(src_levels[i])
        dst_levels[j] = lvl
        cnt = min(max(np.int64(src_links0[i, 0]), 0), maxm0)
        w = 0
        for k in range(1, cnt + 1):
            nb = np.int64(src_links0[i, k])
            if 0 <= nb < remap.shape[0] and remap[nb] >= 0 and remap[nb] != j:
                dst_links0[j, 1 + w] = remap[nb]
                w += 1
        dst_links0[j, 0] = w
        if lvl == 0 or src_upper[i] < 0:
            dst_upper[j] = -1
            dst_levels[j] = 0 if src_upper[i] < 0 else lvl
            continue
        off = dst_header[H_POOL_USED]
        dst_upper[j] = off
        dst_header[H_POOL_USED] = off + lvl
        for lv in range(1, lvl + 1):
            row = np.int64(src_upper[i]) + lv - 1
            cnt = min(max(np.int64(src_pool[row, 0]), 0), m)
            w = 0
            for k in range(1, cnt + 1):
                nb = np.int64(src_pool[row, k])
                if 0 <= nb < remap.shape[0] and remap[nb] >= 0 and remap[nb] != j:
                    dst_pool[off + lv - 1, 1 + w] = remap[nb]
                    w += 1
            dst_pool[off + lv - 1, 0] = w
    return hi


# ---------------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------------


class _Scratch:
    """Per-thread search buffers: the visited array (uint16 generation stamps, the current stamp in
    its last slot) and the candidate heap. Sized by capacity, but np.empty/np.zeros memory is only
    backed by RAM where touched: the heap uses a small prefix."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.visited = np.zeros(capacity + 1, np.uint16)
        self.cand_d = np.empty(capacity + 1, np.float32)
        self.cand_i = np.empty(capacity + 1, np.int32)
        self.out: tuple[np.ndarray, ...] = ()       # search_lists' result buffers, grown to the largest k
        self.fixed = _mode(None, 1)                 # search_lists' kernel mode arguments (the kernel writes one)

    def outputs(self, k: int) -> tuple[np.ndarray, ...]:
        if not self.out or self.out[0].shape[1] < k:
            self.out = (np.empty((1, k), np.int64), np.empty((1, k), np.float32), np.empty((1, k), np.int64),
                        np.empty(1, np.int64))
        return self.out


_tls = threading.local()


def _scratch(capacity: int) -> _Scratch:
    s = getattr(_tls, "scratch", None)
    if s is None or s.capacity < capacity:
        s = _Scratch(capacity)
        _tls.scratch = s
    return s


def _prepare(arrays: HnswArrays, x: np.ndarray, what: str, check_finite: bool = True) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2 or x.shape[1] != arrays.vectors.shape[1]:
        raise ValueError(f"{what} must have dimension {arrays.dim}, got shape {x.shape}")
    if check_finite and not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    if arrays.header[H_METRIC] == 1:  # cosine
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0).astype(np.float32, copy=False)
    return x


def add_items(arrays: HnswArrays, vectors: np.ndarray, labels, tenants=None, *, slots=None, keys=None,
              replace=None) -> np.ndarray:
    """Insert vectors (n, dim) with the caller's labels (n,) and optional tenants (n,) (-1 = none);
    returns their internal ids. `slots` (n,): a FREE row to reuse for each vector, or -1 to append one
    (the caller enforces the reuse grace period; see the module doc). Single-threaded; the caller must be
    the only writer. `keys` (n, KEY_BYTES) uint8: each row's key (`encode_key`), written before the row is
    published. `replace` (n,): a live node each new one replaces (tombstoned as the new one is published;
    -1: none). Raises if the index is full (grow it first), if a slot is not free, or if a vector is not
    finite."""
    vecs = _prepare(arrays, vectors, "vectors")
    n = vecs.shape[0]
    labels = np.ascontiguousarray(np.broadcast_to(np.asarray(labels, dtype=np.int64), (n,)))
    tenants = np.full(n, -1, np.int32) if tenants is None else np.ascontiguousarray(
        np.broadcast_to(np.asarray(tenants, dtype=np.int32), (n,)))
    replace = np.full(n, -1, np.int64) if replace is None else np.ascontiguousarray(replace, dtype=np.int64)
    slots = np.full(n, -1, np.int64) if slots is None else np.ascontiguousarray(slots, dtype=np.int64)
    if arrays.count + int(np.count_nonzero(slots < 0)) > arrays.capacity:
        raise OverflowError(f"index full: {arrays.count} + {n} > capacity {arrays.capacity}; grow it first")
    if int(arrays.header[H_WRITER]) != 0:
        raise RuntimeError("a previous insert did not finish (writer died?); call repair() first")
    if keys is not None:      # rows appended take count, count + 1, ... in order; reused ones are their slot
        rows = slots.copy()
        appended = rows < 0
        rows[appended] = arrays.count + np.arange(int(appended.sum()))
        fits = rows < arrays.capacity
        arrays.keys[rows[fits]] = np.asarray(keys, np.uint8).reshape(n, KEY_BYTES)[fits]
    out = np.full(n, -1, np.int64)
    s = _scratch(arrays.capacity)
    done = _add_kernel(*arrays.kernel_args, vecs, labels, tenants, replace, slots, free_slots(arrays), s.visited,
                       s.cand_d, s.cand_i, out)
    if done != n:
        if slots[done] >= 0:
            raise ValueError(f"slot {int(slots[done])} is not a free row (inserted {done} of {n})")
        raise OverflowError(f"index full after {done} of {n} inserts")
    return out


@dataclass(frozen=True)
class EarlyStop:
    """How an adaptive search stops: the model (checked by `early_stop`), the threshold its prediction must
    reach, the ef that bounds the search and the distance computations between checkpoints."""

    model: np.ndarray
    tau: float
    ef_max: int
    interval: int


def early_stop(model: np.ndarray | None, target_recall: float) -> EarlyStop | None:
    """The early stop that meets `target_recall` with `model` (a float64 array laid out as MODEL_HEADER says),
    or None when there is no model, it is malformed (wrong magic or size, a split on a feature that does not
    exist, a value that is not finite) or it was not calibrated up to that recall: the caller then searches at
    its static ef. The threshold is the one calibrated for the smallest declared recall >= the target."""
    if model is None or model.dtype != np.float64 or model.ndim != 1 or model.shape[0] < MODEL_HEADER:
        return None
    h = model[:MODEL_HEADER]
    if not np.isfinite(h).all() or h[0] != MODEL_MAGIC or not (1 <= h[2] <= 8) or h[1] < 0 or h[7] < 1:
        return None
    trees, depth, ncal = int(h[1]), int(h[2]), int(h[7])
    inner = (1 << depth) - 1
    width = 3 * inner + 1
    if model.shape[0] != MODEL_HEADER + trees * width + 2 * ncal or not np.isfinite(model).all():
        return None
    body = model[MODEL_HEADER:MODEL_HEADER + trees * width].reshape(trees, width)
    feats = body[:, :inner]
    if ((feats < 0) | (feats >= NF) | (feats != np.floor(feats))).any() or h[5] < 1 or h[6] < 1:
        return None
    cal = model[MODEL_HEADER + trees * width:].reshape(ncal, 2)
    ok = np.flatnonzero(cal[:, 0] >= target_recall - 1e-12)
    if ok.size == 0:
        return None
    return EarlyStop(np.ascontiguousarray(model), float(cal[ok[0], 1]), int(h[5]), int(h[6]))


_NO_MODEL = np.zeros(0, np.float64)


def _mode(stop: EarlyStop | None, nq: int, trace: int = 0, k: int = 1) -> tuple:
    """The kernel's mode arguments: fixed ef (stop None, no trace), adaptive, or tracing `trace` checkpoints."""
    trace_f = np.empty((nq, trace, NF), np.float64)
    trace_i = np.empty((nq, trace, k if trace else 1), np.int64)
    trace_n = np.empty(nq, np.int64)
    if stop is None:
        return _NO_MODEL, 0.0, np.int64(0), trace_f, trace_i, trace_n
    return stop.model, stop.tau, np.int64(stop.interval), trace_f, trace_i, trace_n



def search(arrays: HnswArrays, query: np.ndarray, k: int = 10, ef: int | None = None, tenant: int | None = -1,
           return_ids: bool = False, stop: EarlyStop | None = None):
    """The k nearest published, live nodes (of `tenant` if >= 0) to `query`: (labels, distances) best
    first, fewer than k if fewer qualify; with return_ids also their internal ids. Lock-free: may run
    in any process while a writer inserts. ef=None: the index's current ef_search (header); tenant
    -1 or None: no tenant filter. `stop` (from `early_stop`): the query decides how far it searches."""
    out = search_many(arrays, query, k, ef, tenant, return_ids=True, _counts=True, stop=stop)
    n = int(out[3][0])
    if return_ids:
        return out[0][0, :n], out[1][0, :n], out[2][0, :n]
    return out[0][0, :n], out[1][0, :n]


def search_lists(arrays: HnswArrays, query: np.ndarray, k: int, ef: int, tenant: int, stop: EarlyStop | None = None
                 ) -> tuple[list[int], list[float], bytes]:
    """One float32 query of the index's dimension, as `search`, with results as lists (labels, distances)
    and the results' keys as one bytes object (KEY_BYTES each), the result buffers reused: the path of
    neurondb's client, where a search's Python work around the kernel call is most of what it costs beyond
    the walk. ValueError for NaN or infinity. With `stop`, ef is stop.ef_max."""
    s = _scratch(arrays.capacity)
    out_labels, out_dist, out_ids, out_n = s.outputs(k)
    mode = s.fixed if stop is None else _mode(stop, 1)
    ef = ef if stop is None else max(stop.ef_max, k)
    if _search_many_kernel(*arrays.kernel_args, query.reshape(1, -1), k, max(ef, 1), tenant, s.visited, s.cand_d,
                           s.cand_i, out_labels, out_dist, out_ids, out_n, *mode):
        raise ValueError("the query contains NaN or infinite values")
    n = int(out_n[0])
    return out_labels[0, :n].tolist(), out_dist[0, :n].tolist(), arrays.keys[out_ids[0, :n]].tobytes()


def search_many(arrays: HnswArrays, queries: np.ndarray, k: int = 10, ef: int | None = None,
                tenant: int | None = -1, return_ids: bool = False, _counts: bool = False,
                stop: EarlyStop | None = None, trace: int = 0, interval: int = 0):
    """Batched `search`, one numba call for all queries: (labels (nq, k), distances (nq, k)); missing
    results are label -1 and distance inf. `stop`: adaptive, each query stops when its predicted recall
    reaches stop.tau (ef is then stop.ef_max). `trace` > 0 (the training's replay, neurondb/index/adaptive.py):
    the search runs to ef without stopping, recording up to `trace` checkpoints every `interval` distance
    computations, and (trace_f (nq, trace, NF), trace_i (nq, trace, k) labels, trace_n (nq,)) is appended to
    what is returned."""
    if k < 1:
        raise ValueError(f"k must be positive, not {k}")
    qs = np.ascontiguousarray(queries, dtype=np.float32)    # finite and normalised (cosine) in the kernel
    if qs.ndim == 1:
        qs = qs.reshape(1, -1)
    if qs.ndim != 2 or qs.shape[1] != arrays.vectors.shape[1]:
        raise ValueError(f"queries must have dimension {arrays.dim}, got shape {qs.shape}")
    ef = int(arrays.header[H_EF_SEARCH]) if ef is None else int(ef)
    s = _scratch(arrays.capacity)
    nq = qs.shape[0]
    out_labels = np.empty((nq, k), np.int64)  # the kernel pads missing results with -1 / inf
    out_dist = np.empty((nq, k), np.float32)
    out_ids = np.empty((nq, k), np.int64)
    out_n = np.empty(nq, np.int64)
    tenant = -1 if tenant is None else int(tenant)
    if trace and stop is None:
        stop = EarlyStop(_NO_MODEL, math.inf, ef, max(int(interval), 1))
    elif stop is not None and not trace:
        ef = max(stop.ef_max, k)
    mode = _mode(stop, nq, trace, k)
    bad = _search_many_kernel(*arrays.kernel_args, qs, int(k), max(int(ef), 1), tenant, s.visited, s.cand_d,
                              s.cand_i, out_labels, out_dist, out_ids, out_n, *mode)
    if bad:
        raise ValueError(f"{bad} of the queries contain NaN or infinite values")
    if trace:
        return out_labels, out_dist, mode[3], mode[4], mode[5]
    if _counts:
        return out_labels, out_dist, out_ids, out_n
    if return_ids:
        return out_labels, out_dist, out_ids
    return out_labels, out_dist


def mark_deleted(arrays: HnswArrays, internal_id: int) -> bool:
    """Tombstone a node (writer only). Returns False if it was already deleted."""
    i = int(internal_id)
    if not 0 <= i < arrays.count:
        raise IndexError(f"internal id {i} is not a published node (count {arrays.count})")
    if arrays.tombstones[i]:
        return False
    arrays.tombstones[i] = 1
    arrays.header[H_DELETED] += 1
    arrays.header[H_MUTATIONS] += 1
    return True


def update(arrays: HnswArrays, internal_id: int, vector: np.ndarray, slot: int = -1) -> int:
    """Change a node's vector: delete + insert into a new row (hnswlib's updatePoint rewrites the vector
    in place, which a lock-free reader in another process could see half-written). The new row gets the
    same label and tenant; the old row is tombstoned in the same step that publishes the new one, so a
    reader sees exactly one of them. Returns the new internal id. `slot`: a free row to reuse (-1: append)."""
    i = int(internal_id)
    if not 0 <= i < arrays.count:
        raise IndexError(f"internal id {i} is not a published node (count {arrays.count})")
    if arrays.tombstones[i]:
        raise KeyError(f"internal id {i} is deleted")
    return int(add_items(arrays, vector, arrays.labels[i], arrays.tenants[i], slots=[slot],
                         keys=arrays.keys[i: i + 1].copy(), replace=[i])[0])


def find_labels(arrays: HnswArrays, labels) -> np.ndarray:
    """Internal ids of the live nodes with these labels (-1 where there is none)."""
    labels = np.atleast_1d(np.asarray(labels, dtype=np.int64))
    n = arrays.count
    live = np.flatnonzero(arrays.tombstones[:n] == 0)
    live_labels = arrays.labels[live]
    order = np.argsort(live_labels, kind="stable")
    sorted_labels = live_labels[order]
    pos = np.searchsorted(sorted_labels, labels)
    pos_c = np.minimum(pos, max(len(sorted_labels) - 1, 0))
    found = (pos < len(sorted_labels)) & (sorted_labels[pos_c] == labels) if len(sorted_labels) else \
        np.zeros(len(labels), bool)
    out = np.full(len(labels), -1, np.int64)
    out[found] = live[order[pos_c[found]]]
    return out


def needs_repair(arrays: HnswArrays) -> bool:
    """True when a writer died mid-insert (the writer flag is still set)."""
    return int(arrays.header[H_WRITER]) != 0


def repair(arrays: HnswArrays) -> int:
    """After a writer died mid-insert: drop links to unpublished rows, fix the entry point and the
    deleted count, clear the writer flag. Safe while readers search. Returns the links removed."""
    a = arrays
    return int(_repair_kernel(a.header, a.links0, a.levels, a.upper_offset, a.pool, a.tombstones))


def stats(arrays: HnswArrays) -> dict:
    """Counts for status screens and the maintenance worker."""
    a = arrays
    n = a.count
    e0, eu = _edge_counts(a.header, a.links0, a.levels, a.upper_offset, a.pool)
    hist = np.bincount(a.levels[:n].astype(np.int64), minlength=1) if n else np.zeros(1, np.int64)
    deleted = tombstone_count(a)
    free = int(np.count_nonzero(a.tombstones[:n] == FREE))
    return {
        "count": n,
        "live": n - deleted - free,
        "deleted": deleted,
        "free": free,
        "capacity": a.capacity,
        "dim": a.dim,
        "m": a.m,
        "metric": a.metric,
        "ef_construction": a.ef_construction,
        "ef_search": a.ef_search,
        "entry_point": int(a.header[H_ENTRY]),
        "max_level": int(a.header[H_MAX_LEVEL]),
        "level_histogram": [int(x) for x in hist],
        "edges_level0": int(e0),
        "edges_upper": int(eu),
        "pool_used": int(a.header[H_POOL_USED]),
        "pool_capacity": a.pool.shape[0],
        "levels_clamped": int(a.header[H_LEVEL_CLAMPED]),
        "generation": a.generation,
        "mutations": int(a.header[H_MUTATIONS]),
        "writer_busy": needs_repair(a),
        "memory_bytes": a.nbytes,
    }


def edge_count(arrays: HnswArrays) -> int:
    e0, eu = _edge_counts(arrays.header, arrays.links0, arrays.levels, arrays.upper_offset, arrays.pool)
    return int(e0 + eu)


def tombstone_count(arrays: HnswArrays) -> int:
    """Deleted nodes still in the graph (not yet freed by maintenance)."""
    return int(np.count_nonzero(arrays.tombstones[: arrays.count] == DELETED))


def _new_like(arrays: HnswArrays, capacity: int, upper_pool_capacity: int | None, buffer, **over) -> HnswArrays:
    kw = dict(m=arrays.m, ef_construction=arrays.ef_construction, metric=arrays.metric,
              upper_pool_capacity=upper_pool_capacity, ef_search=arrays.ef_search,
              seed=int(arrays.header[H_SEED]))
    kw.update({k: v for k, v in over.items() if v is not None})
    if buffer is None:
        return HnswArrays.allocate(capacity, arrays.dim, **kw)
    return HnswArrays.create_in(buffer, capacity, arrays.dim, **kw)


def grow(arrays: HnswArrays, new_capacity: int, upper_pool_capacity: int | None = None, buffer=None) -> HnswArrays:
    """A copy of the index with room for new_capacity nodes (in private memory, or in `buffer`, e.g. a
    new shared memory segment of layout(...)[1] bytes). Internal ids, links and results are unchanged.
    The caller publishes it (generation + 1) and retires the old one; the source must not be written
    meanwhile."""
    a = arrays
    n = a.count
    if new_capacity < n:
        raise ValueError(f"new capacity {new_capacity} is below the node count {n}")
    used = int(a.header[H_POOL_USED])
    if upper_pool_capacity is None:
        upper_pool_capacity = max(default_pool_capacity(new_capacity, a.m), a.pool.shape[0])
    if upper_pool_capacity < used:
        raise ValueError(f"upper pool capacity {upper_pool_capacity} is below the rows in use {used}")
    b = _new_like(a, new_capacity, upper_pool_capacity, buffer)
    b.vectors[:n] = a.vectors[:n]
    b.links0[:n] = a.links0[:n]
    b.levels[:n] = a.levels[:n]
    b.upper_offset[:n] = a.upper_offset[:n]
    b.labels[:n] = a.labels[:n]
    b.keys[:n] = a.keys[:n]
    b.tenants[:n] = a.tenants[:n]
    b.tombstones[:n] = a.tombstones[:n]
    b.pool[:used] = a.pool[:used]
    for h in (H_ENTRY, H_MAX_LEVEL, H_POOL_USED, H_DELETED, H_RNG, H_LEVEL_CLAMPED, H_MUTATIONS):
        b.header[h] = a.header[h]
    b.header[H_GENERATION] = a.header[H_GENERATION] + 1
    b.header[H_COUNT] = n
    return b


def rebuild(arrays: HnswArrays, capacity: int | None = None, upper_pool_capacity: int | None = None, buffer=None,
            *, m: int | None = None, ef_construction: int | None = None) -> HnswArrays:
    """Compaction: a new index holding only the live nodes (re-inserted in internal-id order, so they get
    new, dense internal ids), tombstones and stale rows gone. Labels and tenants are kept."""
    a = arrays
    n = a.count
    live = np.flatnonzero(a.tombstones[:n] == 0)
    cap = max(len(live), 1) if capacity is None else capacity
    if cap < len(live):
        raise ValueError(f"capacity {cap} is below the live node count {len(live)}")
    b = _new_like(a, cap, upper_pool_capacity, buffer, m=m, ef_construction=ef_construction)
    b.header[H_GENERATION] = a.header[H_GENERATION] + 1
    if len(live):
        add_items(b, a.vectors[live], a.labels[live], a.tenants[live], keys=a.keys[live])
    return b


def encode_key(doc_id: str, tenant: str) -> np.ndarray:
    """A row's key: [len(doc), len(tenant), doc..., tenant...] in KEY_BYTES, or NO_KEY when it does not fit."""
    key = np.zeros(KEY_BYTES, np.uint8)
    doc, ten = doc_id.encode(), tenant.encode()
    if 2 + len(doc) + len(ten) > KEY_BYTES:
        key[0] = NO_KEY
        return key
    key[0], key[1] = len(doc), len(ten)
    key[2: 2 + len(doc)] = np.frombuffer(doc, np.uint8)
    key[2 + len(doc): 2 + len(doc) + len(ten)] = np.frombuffer(ten, np.uint8)
    return key


def decode_key(block: bytes, i: int = 0) -> tuple[str, str] | None:
    """(doc id, tenant) of the i-th key in `block` (rows of `keys` as one bytes object, KEY_BYTES each: the
    reader takes the hits' keys at once, e.g. `search_lists`), or None when it was not stored (NO_KEY)."""
    at = i * KEY_BYTES
    ld, lt = block[at], block[at + 1]
    if ld == NO_KEY:
        return None
    return block[at + 2: at + 2 + ld].decode(), block[at + 2 + ld: at + 2 + ld + lt].decode()


# -- maintenance -------------------------------------------------------------------------------------


def consolidate(arrays: HnswArrays, start: int = 0, budget: int = 2**62) -> tuple[int, int, int]:
    """Delete consolidation from node `start` on, until about `budget` distance computations are spent:
    every list of a live node that points at a deleted (or free, or invalid) id gets new neighbours chosen
    by the heuristic from its live neighbours and those of its deleted ones. Safe while readers search
    (lists are rewritten in place, ids first). Returns (next node to start from, lists repaired, work);
    next == count when the pass is complete."""
    a = arrays
    s = _scratch(a.capacity)
    nxt, repaired, work = _consolidate_kernel(a.header, a.vectors, a.links0, a.levels, a.upper_offset, a.pool,
                                              a.tenants, a.tombstones, int(start), int(budget), s.visited,
                                              s.cand_d, s.cand_i)
    return int(nxt), int(repaired), int(work)


def free_deleted(arrays: HnswArrays) -> np.ndarray:
    """After a complete `consolidate` pass: move the entry point off deleted nodes, then free every deleted
    node no live list points at (its lists cleared, tombstone FREE). Returns the freed internal ids, whose
    rows `add_items(slots=...)` may reuse once the grace period has passed."""
    a = arrays
    n = a.count
    _fix_entry(a.header, a.levels, a.tombstones, n)
    out = np.empty(n, np.int64)
    k = _free_kernel(a.header, a.links0, a.levels, a.upper_offset, a.pool, a.tombstones, out)
    return out[:k].copy()


def free_slots(arrays: HnswArrays) -> np.ndarray:
    """Internal ids of the FREE rows."""
    return np.flatnonzero(arrays.tombstones[: arrays.count] == FREE)


def fix_entry(arrays: HnswArrays) -> bool:
    """Entry-point repair: a live node of the highest live level. True if it moved."""
    return bool(_fix_entry(arrays.header, arrays.levels, arrays.tombstones, arrays.count))


# How much each part weighs in fragmentation_ratio: all are shares in [0, 1]; the ratio is their maximum,
# so any one kind of damage is enough to call for maintenance.
FRAGMENTATION_PARTS = ("tombstone_ratio", "dead_edge_ratio", "disconnected_ratio", "row_waste")
MAX_RELINK = 100_000


def fragmentation(arrays: HnswArrays) -> dict:
    """How far the graph is from a fresh build of its live nodes (the maintenance worker's measure).

    - tombstone_ratio: deleted nodes (still linked, walked by searches) / (live + deleted);
    - dead_edge_ratio: level-0 edges of live nodes that point at non-live nodes / all of them;
    - disconnected_ratio: live nodes with no live level-0 out-edge or not reachable from the entry point
      (a BFS over live level-0 edges) / live nodes;
    - row_waste: rows not holding a live node (deleted or free) / rows in use;
    fragmentation_ratio is the maximum of the four. Also: free slots, invalid links (out of range, self,
    duplicate, to a free row), whether the entry point and the top level are live, level_deficit (the
    largest shortfall 1 - actual / expected of live nodes at level >= L, over levels where the geometric
    distribution expects at least 8), the segment's bytes and those a compact copy would need."""
    a = arrays
    n = a.count
    level_live = np.zeros(MAX_LEVEL + 1, np.int64)
    nodes = np.empty(MAX_RELINK, np.int64)
    edges, dead, no_out, unreachable, invalid, entry_live, top_live, nout = _fragmentation_kernel(
        a.header, a.links0, a.levels, a.upper_offset, a.pool, a.tombstones, level_live, nodes)
    deleted = tombstone_count(a)
    free = int(np.count_nonzero(a.tombstones[:n] == FREE))
    live = n - deleted - free
    at_least = np.cumsum(level_live[::-1])[::-1]
    mult = 1.0 / math.log(max(a.m, 2))
    deficit = 0.0
    for level in range(1, MAX_LEVEL + 1):
        expected = live * math.exp(-level / mult)
        if expected < 8:
            break
        deficit = max(deficit, 1.0 - at_least[level] / expected)
    parts = {
        "tombstone_ratio": deleted / (live + deleted) if live + deleted else 0.0,
        "dead_edge_ratio": dead / edges if edges else 0.0,
        "disconnected_ratio": min(1.0, (no_out + unreachable) / live) if live > 1 else 0.0,
        "row_waste": (n - live) / n if n else 0.0,
    }
    compact_capacity = max(1024, int(live * 1.25) + 1)
    return {
        **parts,
        "fragmentation_ratio": max(parts.values()),
        "live": live, "deleted": deleted, "free": free, "count": n,
        "edges_level0": int(edges), "dead_edges": int(dead), "no_out_edge": int(no_out),
        "unreachable": int(unreachable), "invalid_links": int(invalid),
        "entry_live": bool(entry_live) or live == 0, "top_level_live": bool(top_live) or live == 0,
        "level_deficit": max(deficit, 0.0),
        "memory_bytes": a.nbytes,
        "compact_bytes": layout(compact_capacity, a.dim, a.m, default_pool_capacity(compact_capacity, a.m))[1],
        "relink": nodes[:nout].copy(),
    }


def relink(arrays: HnswArrays, nodes: np.ndarray) -> int:
    """Reconnect live nodes (unreachable, or without a live out-edge): new links found as an insert finds
    them, and an in-link forced when no new neighbour keeps one. Returns the forced links."""
    a = arrays
    s = _scratch(a.capacity)
    return int(_relink_kernel(a.header, a.vectors, a.links0, a.levels, a.upper_offset, a.tenants, a.tombstones,
                              a.pool, np.ascontiguousarray(nodes, np.int64), np.int64(-1), s.visited, s.cand_d,
                              s.cand_i))


def rebalance(arrays: HnswArrays, limit: int = 10_000) -> int:
    """Level rebalancing: where deletes thinned a level L >= 1 below half of what the level distribution
    expects, promote live nodes of level L-1 (at most `limit`) and link them on their new level. Returns the
    nodes promoted."""
    a = arrays
    n = a.count
    level_live = np.bincount(a.levels[:n][a.tombstones[:n] == LIVE].astype(np.int64),
                             minlength=MAX_LEVEL + 1)[: MAX_LEVEL + 1].astype(np.int64)
    target = np.empty(limit, np.int64)
    free = free_slots(a)
    donors = free[a.upper_offset[free] >= 0].astype(np.int64)
    k = _promote_kernel(a.header, a.levels, a.upper_offset, a.pool, a.tombstones, level_live, target,
                        1.0 / math.log(max(a.m, 2)), donors)
    s = _scratch(a.capacity)
    for node in target[:k]:       # each on its new level only (the level below it had is linked already)
        _relink_kernel(a.header, a.vectors, a.links0, a.levels, a.upper_offset, a.tenants, a.tombstones, a.pool,
                       np.array([node], np.int64), np.int64(a.levels[node] - 1), s.visited, s.cand_d, s.cand_i)
    return int(k)


def compact_plan(arrays: HnswArrays) -> tuple[np.ndarray, np.ndarray]:
    """The rows a compact copy keeps (live nodes, in row order) and the old -> new id map (-1: dropped)."""
    n = arrays.count
    live = np.flatnonzero(arrays.tombstones[:n] == LIVE).astype(np.int64)
    remap = np.full(n, -1, np.int64)
    remap[live] = np.arange(len(live))
    return live, remap


def compact_rows(src: HnswArrays, dst: HnswArrays, live: np.ndarray, remap: np.ndarray, lo: int, hi: int) -> None:
    """Copy live[lo:hi] into rows lo..hi of `dst` (a new, unpublished index of the same dim and M), links
    renumbered; rows may be copied in slices while `src` keeps changing (the caller replays the changes)."""
    _compact_kernel(src.vectors, src.links0, src.levels, src.upper_offset, src.labels, src.tenants, src.tombstones,
                    src.pool, live, remap, int(lo), int(hi), dst.header, dst.vectors, dst.links0, dst.levels,
                    dst.upper_offset, dst.labels, dst.tenants, dst.tombstones, dst.pool)
    dst.keys[lo:hi] = src.keys[live[lo:hi]]


def compact_finish(src: HnswArrays, dst: HnswArrays, remap: np.ndarray, rows: int) -> None:
    """Make the copied rows of `dst` an index: entry point, counts, the level generator and ef of `src`."""
    h, g = dst.header, src.header
    entry = int(g[H_ENTRY])
    new_entry = int(remap[entry]) if 0 <= entry < len(remap) else -1
    for key in (H_RNG, H_LEVEL_CLAMPED, H_EF_SEARCH):
        h[key] = g[key]
    h[H_MUTATIONS] = g[H_MUTATIONS] + 1
    h[H_GENERATION] = g[H_GENERATION] + 1
    h[H_ENTRY] = new_entry
    h[H_MAX_LEVEL] = int(dst.levels[new_entry]) if new_entry >= 0 else -1
    h[H_COUNT] = rows
    _fix_entry(h, dst.levels, dst.tombstones, rows)
    _recount(h, dst.tombstones, rows)


def kernels_cached() -> bool:
    """Whether numba's disk cache holds machine code for this version of the kernels, i.e. `warmup` will
    load (under a second) rather than compile (about 12 s): false after an install or an upgrade. Reads
    numba's cache index (private attributes); if those ever change, says true rather than guess."""
    try:
        return any(obj._cache._cache_file._load_index() for obj in globals().values()
                   if isinstance(obj, numba.core.registry.CPUDispatcher))
    except AttributeError:
        return True


def warmup(dim: int = 8, readonly: bool = False) -> None:
    """Load (or compile, the first time) every kernel, e.g. in the supervisor before it forks workers:
    the children then inherit the machine code and never compile. `readonly` also prepares searches
    over read-only mappings (a separate numba specialisation)."""
    rng = np.random.default_rng(0)
    a = HnswArrays.allocate(64, dim, ef_construction=16)
    add_items(a, rng.standard_normal((40, dim)).astype(np.float32), np.arange(40))
    update(a, 0, rng.standard_normal(dim).astype(np.float32))
    search(a, rng.standard_normal(dim).astype(np.float32), 5)
    stats(a)
    repair(a)
    for i in range(0, 40, 3):
        mark_deleted(a, i)
    consolidate(a)
    freed = free_deleted(a)
    add_items(a, rng.standard_normal((2, dim)).astype(np.float32), [40, 41], slots=freed[:2])
    relink(a, fragmentation(a)["relink"])
    rebalance(a)
    live, remap = compact_plan(a)
    b = HnswArrays.allocate(64, dim, ef_construction=16)
    compact_rows(a, b, live, remap, 0, len(live))
    compact_finish(a, b, remap, len(live))
    if readonly:
        search(HnswArrays.from_buffer(bytes(a.buffer)), rng.standard_normal(dim).astype(np.float32), 5)


__all__ = [
    "DEFAULT_EF_SEARCH",
    "METRICS",
    "EarlyStop",
    "HnswArrays",
    "add_items",
    "compact_finish",
    "compact_plan",
    "compact_rows",
    "consolidate",
    "decode_key",
    "default_pool_capacity",
    "early_stop",
    "edge_count",
    "encode_key",
    "find_labels",
    "fix_entry",
    "fragmentation",
    "free_deleted",
    "free_slots",
    "grow",
    "layout",
    "mark_deleted",
    "needs_repair",
    "rebalance",
    "rebuild",
    "relink",
    "repair",
    "search",
    "search_lists",
    "search_many",
    "stats",
    "tombstone_count",
    "update",
    "warmup",
]

_ = numba  # the package is imported above for its config (cache dir); keep the name used
