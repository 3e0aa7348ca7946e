"""The HNSW kernels: recall against exact search, filters, deletes, lock-free readers in another process
while a writer inserts, buffers (shared, read-only), growing, repair and rebuild.

Small data (5,000 x 32) so that the whole file, numba compilation included, runs in seconds.
"""

from __future__ import annotations

import mmap
import os
import tempfile

import numpy as np
import pytest

from neurondb.index import hnsw
from neurondb.index.hnsw import H_COUNT, H_WRITER, HnswArrays

N, DIM, K = 5000, 32, 10
EFC = 100  # ef_construction where the test is not about default-settings recall: halves build time


def clustered(n: int, dim: int, seed: int, n_clusters: int = 24) -> np.ndarray:
    """Clusters on random low-dimensional subspaces plus noise (like scripts/bench_index.py)."""
    rng = np.random.default_rng(1234)  # the mixture is fixed; `seed` draws the points
    centers = rng.standard_normal((n_clusters, dim))
    bases = [np.linalg.qr(rng.standard_normal((dim, 6)))[0] for _ in range(n_clusters)]
    pr = np.random.default_rng(seed)
    cl = pr.integers(0, n_clusters, n)
    z = pr.standard_normal((n, 6)) * np.array([1.0, 0.8, 0.6, 0.5, 0.4, 0.3])
    x = centers[cl] + np.einsum("nij,nj->ni", np.stack(bases)[cl], z) + 0.05 * pr.standard_normal((n, dim))
    return x.astype(np.float32)


def exact(base: np.ndarray, queries: np.ndarray, k: int, metric: str, mask: np.ndarray | None = None) -> np.ndarray:
    if metric == "l2":
        d = (queries**2).sum(1)[:, None] - 2 * queries @ base.T + (base**2).sum(1)[None, :]
    elif metric == "ip":
        d = -(queries @ base.T)
    else:
        bn = base / np.linalg.norm(base, axis=1, keepdims=True)
        qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        d = -(qn @ bn.T)
    if mask is not None:
        d = np.where(mask[None, :], d, np.inf)
    return np.argsort(d, axis=1)[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(N, DIM, seed=1), clustered(200, DIM, seed=2)


@pytest.fixture(scope="module")
def l2_index(data) -> HnswArrays:
    base, _ = data
    a = HnswArrays.allocate(N, DIM, metric="l2", ef_construction=EFC)
    hnsw.add_items(a, base, np.arange(N) + 10_000, tenants=np.arange(N) % 5)
    return a


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_recall_at_default_ef(data, metric):
    base, queries = data
    a = HnswArrays.allocate(N, DIM, metric=metric)
    ids = hnsw.add_items(a, base, np.arange(N) + 10_000)
    assert list(ids) == list(range(N)) and a.count == N
    labels, dists = hnsw.search_many(a, queries, K)  # ef = the index's ef_search (default)
    truth = exact(base, queries, K, metric)
    r = recall(labels - 10_000, truth)
    assert r > 0.95, f"{metric}: recall@10 {r:.3f}"
    low = recall(hnsw.search_many(a, queries, K, ef=K)[0] - 10_000, truth)
    assert low > 0.9, f"{metric}: recall@10 at ef=10 {low:.3f}"  # a weak graph shows at low ef
    assert np.all(np.diff(dists, axis=1) >= 0), "results are best first"
    # single-query search agrees with the batched one
    one_labels, one_dists = hnsw.search(a, queries[0], K)
    assert list(one_labels) == list(labels[0])
    np.testing.assert_allclose(one_dists, dists[0], rtol=1e-6)
    if metric == "l2":  # distances are squared l2, like hnswlib's
        np.testing.assert_allclose(dists[0, 0], ((base[labels[0, 0] - 10_000] - queries[0]) ** 2).sum(), rtol=1e-4)


def test_same_graph_as_hnswlib(data, tmp_path):
    """Same algorithm as hnswlib's: the same level-0 degree distribution and recall at low ef."""
    hnswlib = pytest.importorskip("hnswlib")
    base, queries = data
    ref = hnswlib.Index(space="l2", dim=DIM)
    ref.init_index(max_elements=N, M=16, ef_construction=EFC, random_seed=100)
    ref.add_items(base, np.arange(N), num_threads=1)
    ours = HnswArrays.allocate(N, DIM, ef_construction=EFC)
    hnsw.add_items(ours, base, np.arange(N))
    truth = exact(base, queries, K, "l2")
    ref.set_ef(K)
    r_ref = recall(ref.knn_query(queries, k=K, num_threads=1)[0], truth)
    r_ours = recall(hnsw.search_many(ours, queries, K, ef=K)[0], truth)
    assert r_ours > r_ref - 0.02, (r_ours, r_ref)
    # hnswlib's file: a 96-byte header, then per node [uint32 level-0 count | 2M ids | vector | label]
    ref.save_index(str(tmp_path / "ref.bin"))
    raw = np.fromfile(tmp_path / "ref.bin", dtype=np.uint8)
    row = 4 * (1 + 32) + 4 * DIM + 8
    degree_ref = raw[96 : 96 + N * row].reshape(N, row)[:, :4].copy().view(np.uint32)[:, 0] & 0xFFFF
    degree = ours.links0[:N, 0]
    assert abs(degree.mean() - degree_ref.mean()) < 0.3, (degree.mean(), degree_ref.mean())
    assert abs(np.median(degree) - np.median(degree_ref)) <= 1


def test_graph_shape(l2_index):
    s = hnsw.stats(l2_index)
    assert s["count"] == s["live"] == N and s["deleted"] == 0
    assert sum(s["level_histogram"]) == N and s["level_histogram"][0] > 0.9 * N  # P(level >= 1) = 1/M
    assert N * 8 < s["edges_level0"] <= N * 32
    assert s["max_level"] == len(s["level_histogram"]) - 1 and s["levels_clamped"] == 0
    assert s["memory_bytes"] == hnsw.layout(N, DIM, 16)[1] and not s["writer_busy"]
    assert hnsw.edge_count(l2_index) == s["edges_level0"] + s["edges_upper"]


def test_tenant_filter(data, l2_index):
    base, queries = data
    tenants = np.arange(N) % 5
    for t in (0, 3):
        labels, _dists, ids = hnsw.search_many(l2_index, queries, K, tenant=t, return_ids=True)
        assert np.all(ids >= 0)
        assert np.all(tenants[ids] == t)
        assert np.all(l2_index.tenants[ids] == t)
        assert recall(ids, exact(base, queries, K, "l2", mask=tenants == t)) > 0.9
    # a tenant with no nodes: nothing
    labels, _ = hnsw.search(l2_index, queries[0], K, tenant=77)
    assert len(labels) == 0


def test_deleted_never_returned(data):
    base, queries = data
    a = HnswArrays.allocate(N, DIM, ef_construction=EFC)
    hnsw.add_items(a, base, np.arange(N))
    dead = np.random.default_rng(5).choice(N, N // 4, replace=False)
    for i in dead:
        assert hnsw.mark_deleted(a, int(i))
    assert not hnsw.mark_deleted(a, int(dead[0]))
    assert a.deleted_count == hnsw.tombstone_count(a) == len(dead)
    # the nearest neighbours of deleted vectors are searched for: the deleted ones must not come back
    labels, _ = hnsw.search_many(a, np.concatenate([queries, base[dead[:200]]]), K, ef=32)
    assert not np.isin(labels, dead).any()
    live = np.ones(N, bool)
    live[dead] = False
    assert recall(labels[: len(queries)], exact(base, queries, K, "l2", mask=live)) > 0.9
    # inserts after deletes still link well
    more = clustered(500, DIM, seed=9)
    b = grown = hnsw.grow(a, N + 500)
    hnsw.add_items(b, more, np.arange(N, N + 500))
    labels, _ = hnsw.search_many(grown, more[:50], 1)
    assert list(labels[:, 0]) == list(range(N, N + 50))


def test_update_moves_the_vector(data):
    base, _ = data
    a = HnswArrays.allocate(N + 10, DIM, ef_construction=EFC)
    hnsw.add_items(a, base, np.arange(N) + 1, tenants=7)
    target = base[1234] + 0.001  # move node 0 (label 1) right next to vector 1234
    new_id = hnsw.update(a, 0, target)
    assert new_id == N and a.labels[new_id] == 1 and a.tenants[new_id] == 7 and a.tombstones[0] == 1
    labels, _ = hnsw.search(a, target, 2)
    assert set(labels) == {1, 1235}
    _, _, ids = hnsw.search(a, base[0], 50, return_ids=True)
    assert 0 not in ids and list(a.labels[ids]).count(1) <= 1
    assert list(hnsw.find_labels(a, [1, 1235, 999_999])) == [new_id, 1234, -1]


def test_rejects_bad_input(l2_index):
    a = HnswArrays.allocate(10, 4)
    with pytest.raises(ValueError, match="NaN"):
        hnsw.add_items(a, np.array([[1, 2, np.nan, 4]], np.float32), [1])
    with pytest.raises(ValueError, match="dimension"):
        hnsw.add_items(a, np.zeros((1, 5), np.float32), [1])
    with pytest.raises(ValueError, match="infinite"):
        hnsw.search(a, np.array([1, 2, np.inf, 4], np.float32))
    hnsw.add_items(a, np.ones((10, 4), np.float32), np.arange(10))
    with pytest.raises(OverflowError, match="grow"):
        hnsw.add_items(a, np.ones((1, 4), np.float32), [11])
    assert a.count == 10
    empty = HnswArrays.allocate(10, 4)
    labels, _dists = hnsw.search(empty, np.ones(4, np.float32))
    assert len(labels) == 0


def test_layout_is_one_aligned_buffer():
    spec, total = hnsw.layout(1000, 48, 12, 100)
    names = [s[0] for s in spec]
    assert names == list(hnsw.ARRAY_NAMES)
    end = 0
    for name, dtype, shape, offset in spec:
        assert offset % 64 == 0 and offset >= end, name
        end = offset + dtype.itemsize * int(np.prod(shape))
    assert end == total
    d = dict((s[0], s) for s in spec)
    assert d["links0"][2] == (1000, 1 + 24) and d["pool"][2] == (100, 1 + 12)
    with pytest.raises(ValueError, match="magic"):
        HnswArrays.from_buffer(bytearray(total))


def test_from_buffer_bytearray_mmap_and_readonly(data, l2_index):
    base, queries = data
    spec, total = hnsw.layout(N, DIM, 16)
    ba = bytearray(total)
    a = HnswArrays.create_in(ba, N, DIM, metric="l2", ef_construction=EFC)
    hnsw.add_items(a, base, np.arange(N) + 10_000, tenants=np.arange(N) % 5)
    ref_labels, _ref_dists = hnsw.search_many(l2_index, queries, K)
    labels, _dists = hnsw.search_many(a, queries, K)
    # same data, same seed, same insertion order: the same graph as the private index
    np.testing.assert_array_equal(labels, ref_labels)
    assert bytes(ba[spec[2][3]:]) == l2_index.buffer.tobytes()[spec[2][3]:]

    with tempfile.TemporaryFile() as f:  # a file-backed mmap, attached from its bytes alone
        f.write(ba)
        f.flush()
        mm = mmap.mmap(f.fileno(), total)
        b = HnswArrays.from_buffer(mm)
        assert b.count == N and b.metric == "l2" and b.m == 16
        np.testing.assert_array_equal(hnsw.search_many(b, queries, K)[0], ref_labels)
        del b
        mm.close()

    ro = HnswArrays.from_buffer(bytes(ba))  # read-only, like a client that maps the segment read-only
    assert not ro.writable
    np.testing.assert_array_equal(hnsw.search_many(ro, queries, K)[0], ref_labels)
    np.testing.assert_array_equal(hnsw.search(ro, queries[3], K, tenant=2)[0],
                                  hnsw.search(l2_index, queries[3], K, tenant=2)[0])


def test_grow_gives_equal_results(data, l2_index):
    base, queries = data
    ref = hnsw.search_many(l2_index, queries, K, tenant=1)
    _spec, total = hnsw.layout(3 * N, DIM, 16)
    g = hnsw.grow(l2_index, 3 * N, buffer=bytearray(total))
    assert g.capacity == 3 * N and g.count == N and g.generation == l2_index.generation + 1
    got = hnsw.search_many(g, queries, K, tenant=1)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    more = clustered(N, DIM, seed=3)
    hnsw.add_items(g, more, np.arange(N) + 50_000)
    assert g.count == 2 * N and l2_index.count == N
    both = np.concatenate([base, more])
    found = hnsw.search_many(g, queries, K)[0]
    found = np.where(found >= 50_000, found - 50_000 + N, found - 10_000)
    assert recall(found, exact(both, queries, K, "l2")) > 0.95


def test_rebuild_compacts(data):
    base, queries = data
    a = HnswArrays.allocate(N, DIM, metric="cosine", ef_construction=EFC)
    hnsw.add_items(a, base, np.arange(N), tenants=np.arange(N) % 3)
    dead = np.arange(0, N, 2)
    for i in dead:
        hnsw.mark_deleted(a, int(i))
    b = hnsw.rebuild(a)
    assert b.count == N // 2 and b.deleted_count == 0 and b.capacity == N // 2 and b.metric == "cosine"
    assert set(b.labels[: b.count]) == set(range(1, N, 2))
    assert np.array_equal(b.tenants[: b.count], (np.arange(1, N, 2) % 3).astype(np.int32))
    labels = hnsw.search_many(b, queries, K)[0]
    live = np.arange(N) % 2 == 1
    assert recall(labels, exact(base, queries, K, "cosine", mask=live)) > 0.95


def test_repair_after_writer_death(data):
    base, queries = data
    a = HnswArrays.allocate(2000, DIM)
    hnsw.add_items(a, base[:1000], np.arange(1000))
    # what a writer killed inside add_items leaves: the flag set and back-links to the unpublished row
    n = a.count
    a.header[H_WRITER] = n + 1
    for i in (3, 10, 500):
        c = a.links0[i, 0]
        a.links0[i, min(c + 1, 32)] = n
        a.links0[i, 0] = min(c + 1, 32)
    a.links0[7, 2] = a.links0[7, 1]  # a list caught half-rewritten: one id twice
    entry, top = int(a.header[hnsw.H_ENTRY]), int(a.header[hnsw.H_MAX_LEVEL])
    a.header[hnsw.H_ENTRY] = int(np.flatnonzero(a.levels[:n] == 0)[0])  # died before moving the entry point
    # readers are unaffected meanwhile
    _labels, _, ids = hnsw.search_many(a, queries, K, return_ids=True)
    assert np.all((ids >= 0) & (ids < n))
    assert hnsw.needs_repair(a)
    with pytest.raises(RuntimeError, match="repair"):
        hnsw.add_items(a, base[1000:1001], [1000])
    assert hnsw.repair(a) == 4
    active = np.arange(32)[None, :] < a.links0[:n, :1]  # entries past a list's count are ignored
    assert not hnsw.needs_repair(a) and not ((a.links0[:n, 1:] == n) & active).any()
    assert len(set(a.links0[7, 1 : 1 + a.links0[7, 0]])) == a.links0[7, 0]
    assert a.header[hnsw.H_MAX_LEVEL] == top and a.levels[a.header[hnsw.H_ENTRY]] == top
    assert a.header[hnsw.H_ENTRY] == entry or a.levels[entry] == top
    hnsw.add_items(a, base[1000:2000], np.arange(1000, 2000))
    assert recall(hnsw.search_many(a, queries, K)[0], exact(base[:2000], queries, K, "l2")) > 0.95


def _reader(mm: mmap.mmap, queries: np.ndarray, stop: mmap.mmap, report_fd: int) -> None:
    """Searches while the parent inserts; every result is checked against the arrays themselves."""
    searches = errors = 0
    counts = set()
    first_error = ""
    a = HnswArrays.from_buffer(mm)
    qi = 0
    while stop[0] == 0 or searches < 50:
        q = queries[qi % len(queries)]
        qi += 1
        tenant = 2 if qi % 3 == 0 else -1
        count_before = a.count
        dead_before = a.tombstones[:count_before].copy()
        try:
            labels, dists, ids = hnsw.search(a, q, K, ef=32, tenant=tenant, return_ids=True)
            count_after = a.count
            problems = []
            if count_before > 0 and len(ids) == 0 and tenant < 0:
                problems.append("no result")
            if len(set(ids.tolist())) != len(ids):
                problems.append("duplicate ids")
            if np.any(ids < 0) or np.any(ids >= count_after):
                problems.append(f"unpublished id {ids.max()} (count {count_after})")
            else:
                if np.any(ids < count_before) and dead_before[ids[ids < count_before]].any():
                    problems.append("deleted node returned")
                if not np.array_equal(labels, a.labels[ids]) or np.any(labels - 1_000_000 >= count_after):
                    problems.append("label mismatch")
                if tenant >= 0 and np.any(a.tenants[ids] != tenant):
                    problems.append("other tenant")
                d = ((a.vectors[ids] - q) ** 2).sum(1)
                if not np.allclose(d, dists, rtol=1e-3, atol=1e-3):
                    problems.append("distance mismatch")
            if np.any(np.diff(dists) < 0):
                problems.append("not sorted")
            if problems:
                errors += 1
                first_error = first_error or "; ".join(problems)
        except Exception as exc:
            errors += 1
            first_error = first_error or repr(exc)
        searches += 1
        counts.add(count_before)
    os.write(report_fd, f"{searches} {errors} {len(counts)} {first_error}".encode())


def test_concurrent_reader_while_writer_inserts():
    n = 4000
    base = clustered(n, DIM, seed=11)
    queries = clustered(100, DIM, seed=12)
    _, total = hnsw.layout(n + 20, DIM, 16)
    mm = mmap.mmap(-1, total)  # MAP_SHARED | MAP_ANONYMOUS: the child sees the parent's writes
    stop = mmap.mmap(-1, 1)
    a = HnswArrays.create_in(mm, n + 20, DIM, ef_construction=64)
    labels = np.arange(n) + 1_000_000
    hnsw.add_items(a, base[:200], labels[:200], tenants=np.arange(200) % 4)
    hnsw.search(a, queries[0], K, ef=32, tenant=2, return_ids=True)  # compiled before the fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            _reader(mm, queries, stop, w)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        for s in range(200, n, 20):  # many small publications
            hnsw.add_items(a, base[s : s + 20], labels[s : s + 20], tenants=np.arange(s, s + 20) % 4)
            hnsw.mark_deleted(a, s - 7)
            if s % 400 == 0:
                hnsw.update(a, s - 3, base[s - 3] + 0.01)
    finally:
        stop[0] = 1
        out = b""
        while chunk := os.read(r, 4096):
            out += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"reader died: status {status}"
    searches, errors, distinct_counts, *first = out.decode().split(" ", 3)
    assert int(errors) == 0, f"{errors} bad results out of {searches}: {first}"
    assert int(distinct_counts) > 5, "the reader should have searched while the index grew"
    assert a.count > 3900 and not hnsw.needs_repair(a)


def test_ef_search_lives_in_the_header(l2_index, data):
    _, _queries = data
    old = l2_index.ef_search
    try:
        l2_index.ef_search = 10
        assert l2_index.header[hnsw.H_EF_SEARCH] == 10
        view = HnswArrays.from_buffer(l2_index.buffer)
        assert view.ef_search == 10
        with pytest.raises(ValueError):
            l2_index.ef_search = 0
    finally:
        l2_index.ef_search = old
    assert HnswArrays.from_buffer(l2_index.buffer).header[H_COUNT] == N


def test_writer_sigkilled_mid_batch():
    """A real writer process killed inside add_items: what it published stays searchable, and after
    repair() the next writer continues."""
    import signal
    import time

    n = 6000
    base = clustered(n, DIM, seed=21)
    queries = clustered(50, DIM, seed=22)
    _, total = hnsw.layout(n, DIM, 16)
    mm = mmap.mmap(-1, total)
    a = HnswArrays.create_in(mm, n, DIM, ef_construction=EFC)
    hnsw.add_items(a, base[:500], np.arange(500))
    pid = os.fork()
    if pid == 0:
        try:
            hnsw.add_items(a, base[500:], np.arange(500, n))  # one long batch, killed midway
        finally:
            os._exit(0)
    deadline = time.monotonic() + 10
    while a.count < 1500 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), "the writer finished before it could be killed"
    count = a.count
    assert 1500 <= count < n
    labels, _, ids = hnsw.search_many(a, queries, K, return_ids=True)
    assert np.all((ids >= 0) & (ids < count)) and np.array_equal(labels, ids)
    if hnsw.needs_repair(a):  # killed inside an insert (almost always)
        hnsw.repair(a)
    assert not hnsw.needs_repair(a)
    assert not ((a.links0[:count, 1:] >= count) & (np.arange(32)[None, :] < a.links0[:count, :1])).any()
    hnsw.add_items(a, base[count:], np.arange(count, n))
    assert a.count == n
    assert recall(hnsw.search_many(a, queries, K)[0], exact(base, queries, K, "l2")) > 0.95


def test_numba_cache_falls_back_when_package_dir_is_read_only(tmp_path):
    """Installed read-only (and NUMBA_CACHE_DIR unset), the kernels cache under $XDG_CACHE_HOME."""
    import subprocess
    import sys

    code = """if True:
        import tempfile
        real = tempfile.NamedTemporaryFile
        def read_only(*args, **kwargs):  # what a read-only __pycache__ looks like to the probe
            if "numba-probe" in kwargs.get("prefix", ""):
                raise PermissionError("read-only file system")
            return real(*args, **kwargs)
        tempfile.NamedTemporaryFile = read_only
        from neurondb.index import hnsw
        print(hnsw._add_kernel._cache._cache_path)
    """
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(tmp_path / "neurondb" / "numba")), out.stdout


def test_prune_free_and_reuse(data):
    """Consolidation repairs every list that pointed at a deleted node, free_deleted unlinks and frees the
    deleted rows (never the entry point), and inserts reuse exactly those rows: the row count does not grow,
    a row that is not free is refused, and recall over the live set stays at a fresh build's."""
    base, queries = data
    a = HnswArrays.allocate(N, DIM, ef_construction=EFC)
    hnsw.add_items(a, base, np.arange(N))
    entry = int(a.header[hnsw.H_ENTRY])
    dead = np.argsort(((base - base[entry]) ** 2).sum(1))[: N // 4]       # a region, the entry point in it
    for i in dead:
        hnsw.mark_deleted(a, int(i))
    before = hnsw.fragmentation(a)
    assert before["tombstone_ratio"] == pytest.approx(0.25) and before["dead_edges"] > 0 and not before["entry_live"]
    hnsw.fix_entry(a)
    pos, slices = 0, 0
    while pos < a.count:
        pos, _, _ = hnsw.consolidate(a, pos, 20_000)
        slices += 1
    assert slices > 1                                     # the budget bounds a slice
    freed = hnsw.free_deleted(a)
    after = hnsw.fragmentation(a)
    assert sorted(freed.tolist()) == sorted(dead.tolist()) and after["deleted"] == 0 and after["free"] == N // 4
    assert after["dead_edges"] == 0 and after["invalid_links"] == 0 and after["entry_live"]
    assert after["unreachable"] <= 2, after               # relink handles stragglers
    assert a.tombstones[int(a.header[hnsw.H_ENTRY])] == hnsw.LIVE
    live = np.setdiff1d(np.arange(N), dead)
    fresh = HnswArrays.allocate(N, DIM, ef_construction=EFC)
    hnsw.add_items(fresh, base[live], live)
    truth = live[exact(base[live], queries, K, "l2")]
    assert recall(hnsw.search_many(a, queries, K, 64)[0], truth) >= \
        recall(hnsw.search_many(fresh, queries, K, 64)[0], truth) - 0.01
    with pytest.raises(ValueError, match="not a free row"):
        hnsw.add_items(a, base[:1], [N], slots=[int(live[0])])
    new = clustered(len(freed), DIM, seed=9)
    ids = hnsw.add_items(a, new, np.arange(N, N + len(new)), slots=freed)
    assert a.count == N and sorted(ids.tolist()) == sorted(freed.tolist()) and hnsw.free_slots(a).size == 0
    labels, _ = hnsw.search_many(a, new[:50], 1, 64)
    assert np.mean(labels[:, 0] == np.arange(N, N + 50)) >= 0.95


def test_compaction_copy_and_rebalance(data):
    """A compact copy holds the live nodes only, renumbered, and answers as the original; rebalancing
    promotes nodes where deletes emptied the upper levels."""
    base, queries = data
    a = HnswArrays.allocate(N, DIM, ef_construction=EFC)
    hnsw.add_items(a, base, np.arange(N))
    upper = np.flatnonzero(a.levels[:N] >= 1)
    for i in upper:                                       # every node above level 0
        hnsw.mark_deleted(a, int(i))
    hnsw.fix_entry(a)
    hnsw.consolidate(a)
    hnsw.free_deleted(a)
    assert hnsw.fragmentation(a)["level_deficit"] == pytest.approx(1.0)
    promoted = hnsw.rebalance(a)
    assert promoted > 0 and hnsw.fragmentation(a)["level_deficit"] < 0.5
    live, remap = hnsw.compact_plan(a)
    b = HnswArrays.allocate(len(live), DIM, ef_construction=EFC)
    for lo in range(0, len(live), 1000):                  # in slices, as the maintenance worker copies
        hnsw.compact_rows(a, b, live, remap, lo, min(lo + 1000, len(live)))
    hnsw.compact_finish(a, b, remap, len(live))
    assert b.count == len(live) and hnsw.fragmentation(b)["row_waste"] == 0 and b.generation == a.generation + 1
    la, _ = hnsw.search_many(a, queries, K, 64)
    lb, _ = hnsw.search_many(b, queries, K, 64)
    assert np.array_equal(la, lb)


def test_churn_keeps_the_level_distribution(data):
    """Rows freed by maintenance hand their upper-level rows on to the inserts that reuse rows: under rounds of
    delete 10 % + insert 10 % into the freed rows, the upper pool does not fill up, no new node has its level
    cut (H_LEVEL_CLAMPED), and level 1 keeps the live nodes the level distribution expects (live / M)."""
    base, _ = data
    a = HnswArrays.allocate(N, DIM, ef_construction=EFC)
    hnsw.add_items(a, base, np.arange(N))
    rng = np.random.default_rng(5)
    live = np.arange(N)
    pool_used = int(a.header[hnsw.H_POOL_USED])
    for rnd in range(12):
        gone = rng.choice(live, N // 10, replace=False)
        for i in gone:
            hnsw.mark_deleted(a, int(i))
        hnsw.fix_entry(a)
        hnsw.consolidate(a)
        freed = hnsw.free_deleted(a)
        hnsw.add_items(a, clustered(len(freed), DIM, seed=100 + rnd), freed, slots=freed)
        live = np.union1d(np.setdiff1d(live, gone), freed)
    level1 = int(np.count_nonzero(a.levels[: a.count][a.tombstones[: a.count] == hnsw.LIVE] >= 1))
    assert int(a.header[hnsw.H_LEVEL_CLAMPED]) == 0
    assert int(a.header[hnsw.H_POOL_USED]) <= pool_used * 1.25 + 16, (pool_used, int(a.header[hnsw.H_POOL_USED]))
    assert level1 >= 0.8 * N / 16, level1
