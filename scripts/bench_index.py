#!/usr/bin/env python3
"""Benchmark of neurondb's HNSW (numpy arrays in shared memory + numba kernels) against hnswlib.

Issue 5's spec: a seeded generator of realistic data (default 100,000 x 128 float32: a mixture of
clusters, each on its own low-dimensional subspace, plus isotropic noise; 1,000 queries drawn from the
same mixture but not from the base set), exact ground truth by chunked brute force in numpy, and
hnswlib (M=16, ef_construction=200, one thread) on the same data in the same run. Printed:
- single-thread build time of each;
- QPS and recall@10 of each at ef 16, 32, 64, 128, 256. Both libraries get the whole query batch in
  one call, single-threaded: hnswlib's knn_query(num_threads=1), ours search_many (one numba call).
  Each point is the median of --repeats timed runs, the two libraries alternating;
- QPS ratio at equal recall: each QPS-vs-recall curve is interpolated (log QPS, linear in recall)
  at recall 0.95 and 0.99;
- search throughput from 2 processes at once: after the build, forked processes search the same index
  (ours: each process attaches the POSIX shared memory segment the index was built in, by name);
  total QPS of 2 processes vs 1, median of --repeats;
- index memory: ours = total bytes of the arrays (the segment size); hnswlib = its save_index file.

Targets (issue 5): build <= 1.25x hnswlib's; QPS >= 0.9x hnswlib's at recall 0.95 and 0.99; 2 processes
>= 1.7x one; memory <= 1.15x hnswlib's.

Quick smoke run: `python scripts/bench_index.py --n 5000 --dim 32 --queries 200 --repeats 1`.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from neurondb.index import hnsw

TARGETS = {"build": 1.25, "qps": 0.9, "mp": 1.7, "memory": 1.15}


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


class Mixture:
    """Clusters of different sizes, each spread over a random low-dimensional subspace (8..32 dims,
    decaying spread along its axes), plus isotropic noise: roughly what sentence embeddings look like
    (topics, each with a few directions of variation), and hard enough that recall depends on ef."""

    def __init__(self, dim: int, n_clusters: int, seed: int) -> None:
        rng = np.random.default_rng([seed, 0])
        self.dim = dim
        self.centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
        self.bases = []
        self.scales = []
        for _ in range(n_clusters):
            d = int(rng.integers(8, 33))
            d = min(d, dim)
            q, _ = np.linalg.qr(rng.standard_normal((dim, d)))
            self.bases.append(q.astype(np.float32))
            self.scales.append((rng.uniform(0.5, 1.0) / np.sqrt(1.0 + np.arange(d))).astype(np.float32))
        self.weights = rng.dirichlet(np.full(n_clusters, 1.0))
        self.noise = 0.1

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 1])
        cl = rng.choice(len(self.weights), size=n, p=self.weights)
        out = np.empty((n, self.dim), np.float32)
        for c in np.unique(cl):
            idx = np.flatnonzero(cl == c)
            z = rng.standard_normal((len(idx), len(self.scales[c]))).astype(np.float32) * self.scales[c]
            out[idx] = self.centers[c] + z @ self.bases[c].T
        out += rng.standard_normal(out.shape).astype(np.float32) * np.float32(self.noise)
        return out


def make_data(n: int, dim: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    mix = Mixture(dim, n_clusters=max(8, round(np.sqrt(n) / 3)), seed=seed)
    return mix.sample(n, seed + 1), mix.sample(n_queries, seed + 2)


def ground_truth(base: np.ndarray, queries: np.ndarray, k: int, chunk: int = 100) -> np.ndarray:
    """Exact k nearest (squared l2) by brute force, chunked over the queries."""
    norms = np.einsum("ij,ij->i", base, base)
    out = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), chunk):
        q = queries[s : s + chunk]
        d = norms[None, :] - 2.0 * (q @ base.T)
        part = np.argpartition(d, k, axis=1)[:, :k]
        pd = np.take_along_axis(d, part, axis=1)
        out[s : s + chunk] = np.take_along_axis(part, np.argsort(pd, axis=1), axis=1)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(f[:k], t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def interp_qps(points: list[tuple[float, float]], target: float) -> float | None:
    """QPS at `target` recall on a curve of (recall, qps), log-linear between the bracketing points."""
    pts = sorted(points)
    for (r0, q0), (r1, q1) in itertools.pairwise(pts):
        if r0 <= target <= r1:
            if r1 == r0:
                return max(q0, q1)
            f = (target - r0) / (r1 - r0)
            return float(np.exp(np.log(q0) + f * (np.log(q1) - np.log(q0))))
    if pts and pts[0][0] >= target:  # every point is above the target: the fastest one qualifies
        return max(q for r, q in pts)
    return None


# --------------------------------------------------------------------------------------------------
# the two indexes behind one small interface
# --------------------------------------------------------------------------------------------------


class Ours:
    name = "neurondb"

    def __init__(self, n: int, dim: int, m: int, efc: int) -> None:
        import posix_ipc

        self.spec, self.nbytes = hnsw.layout(n, dim, m)
        self.shm_name = f"/neurondb-bench-{os.getpid()}"
        shm = posix_ipc.SharedMemory(self.shm_name, posix_ipc.O_CREX, mode=0o600, size=self.nbytes)
        self.mm = mmap.mmap(shm.fd, self.nbytes)
        shm.close_fd()
        self.arrays = hnsw.HnswArrays.create_in(self.mm, n, dim, m=m, ef_construction=efc, metric="l2")

    def build(self, data: np.ndarray) -> None:
        hnsw.add_items(self.arrays, data, np.arange(len(data)))

    def search(self, queries: np.ndarray, k: int, ef: int) -> np.ndarray:
        return hnsw.search_many(self.arrays, queries, k, ef)[0]

    def attach(self) -> None:
        """In a forked child: drop the inherited mapping, attach the segment by name like a client."""
        import posix_ipc

        shm = posix_ipc.SharedMemory(self.shm_name)
        mm = mmap.mmap(shm.fd, shm.size)
        shm.close_fd()
        self.arrays = hnsw.HnswArrays.from_buffer(mm)

    def memory(self) -> int:
        return self.arrays.nbytes

    def close(self) -> None:
        import posix_ipc

        try:
            posix_ipc.unlink_shared_memory(self.shm_name)
        except posix_ipc.ExistentialError:
            pass


class Hnswlib:
    name = "hnswlib"

    def __init__(self, n: int, dim: int, m: int, efc: int) -> None:
        import hnswlib

        self.index = hnswlib.Index(space="l2", dim=dim)
        self.index.init_index(max_elements=n, M=m, ef_construction=efc, random_seed=100)
        self.index.set_num_threads(1)

    def build(self, data: np.ndarray) -> None:
        self.index.add_items(data, np.arange(len(data)), num_threads=1)

    def search(self, queries: np.ndarray, k: int, ef: int) -> np.ndarray:
        self.index.set_ef(max(ef, k))
        return self.index.knn_query(queries, k=k, num_threads=1)[0]

    def attach(self) -> None:
        pass  # the forked child shares the parent's pages copy-on-write

    def memory(self) -> int:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "index.bin")
            self.index.save_index(path)
            return os.path.getsize(path)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def multi_process_qps(lib, queries: np.ndarray, k: int, ef: int, procs: int, seconds: float) -> tuple[float, float]:
    """Total QPS of `procs` forked processes searching the same index at once for ~`seconds`:
    (queries / wall time, sum over processes of queries / own CPU time). The second figure is what
    the processes would reach if no other program competed for the cores; it still includes the
    slowdown they cause each other (shared caches, memory bandwidth)."""
    go_r, go_w = os.pipe()
    pipes = []
    pids = []
    for _ in range(procs):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.close(r)
                os.close(go_w)
                lib.attach()
                lib.search(queries[:10], k, ef)  # warm (page in)
                os.read(go_r, 1)
                t0 = time.perf_counter()
                c0 = time.process_time()
                done = 0
                while time.perf_counter() - t0 < seconds:
                    lib.search(queries, k, ef)
                    done += len(queries)
                el = time.perf_counter() - t0
                cpu = time.process_time() - c0
                os.write(w, f"{done} {t0} {t0 + el} {cpu}".encode())
                os._exit(0)
            except BaseException as exc:
                os.write(w, f"error {exc!r}".encode())
                os._exit(1)
        os.close(w)
        pipes.append(r)
        pids.append(pid)
    os.close(go_r)
    time.sleep(0.3)
    os.write(go_w, b"x" * procs)
    os.close(go_w)
    results = []
    for r in pipes:
        chunks = []
        while True:
            b = os.read(r, 4096)
            if not b:
                break
            chunks.append(b)
        os.close(r)
        results.append(b"".join(chunks).decode())
    for pid in pids:
        os.waitpid(pid, 0)
    total = 0
    cpu_qps = 0.0
    start, end = float("inf"), 0.0
    for res in results:
        if res.startswith("error"):
            raise RuntimeError(res)
        done, t0, t1, cpu = res.split()
        total += int(done)
        cpu_qps += int(done) / float(cpu)
        start, end = min(start, float(t0)), max(end, float(t1))
    return total / (end - start), cpu_qps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--efs", default="16,32,64,128,256")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per search point (median)")
    ap.add_argument("--build-repeats", type=int, default=1, help="builds per library (median)")
    ap.add_argument("--mp-ef", type=int, default=64, help="ef of the multi-process throughput test")
    ap.add_argument("--mp-seconds", type=float, default=3.0)
    ap.add_argument("--mp-repeats", type=int, default=3)
    ap.add_argument("--only", choices=["neurondb", "hnswlib"], help="benchmark one library only")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    efs = [int(x) for x in args.efs.split(",")]
    k = args.k

    print(f"# data: {args.n} x {args.dim} float32, {args.queries} queries, seed {args.seed}; "
          f"M={args.m}, ef_construction={args.ef_construction}, k={k}; pid {os.getpid()}")
    t, (base, queries) = timed(make_data, args.n, args.dim, args.queries, args.seed)
    print(f"generated in {t:.1f} s")
    t, truth = timed(ground_truth, base, queries, k)
    print(f"exact ground truth in {t:.1f} s")

    # compile (or load from the numba cache) before timing anything
    warm = hnsw.HnswArrays.allocate(64, args.dim, m=args.m, ef_construction=args.ef_construction)
    hnsw.add_items(warm, base[:64], np.arange(64))
    hnsw.search_many(warm, queries[:2], k, 16)
    hnsw.search(warm, queries[0], k, 16)

    classes = [c for c in (Hnswlib, Ours) if args.only in (None, c.name)]
    libs = {}
    build = {}
    report: dict = {"args": vars(args)}
    try:
        build_cpu: dict[str, list] = {}
        for rep in range(args.build_repeats):
            for cls in classes:
                if cls.name in libs:
                    libs[cls.name].close()
                lib = cls(args.n, args.dim, args.m, args.ef_construction)
                c0 = time.process_time()
                t, _ = timed(lib.build, base)
                c = time.process_time() - c0
                build.setdefault(cls.name, []).append(t)
                build_cpu.setdefault(cls.name, []).append(c)
                libs[cls.name] = lib
                print(f"build {cls.name:9s} run {rep + 1}: {t:7.2f} s wall, {c:7.2f} s CPU")
        print(f"\n## build (single thread, median of {args.build_repeats})")
        for name, ts in build.items():
            print(f"{name:9s} {np.median(ts):8.2f} s wall {np.median(build_cpu[name]):8.2f} s CPU")
        report["build_s"] = {name: float(np.median(ts)) for name, ts in build.items()}
        report["build_cpu_s"] = {name: float(np.median(ts)) for name, ts in build_cpu.items()}
        if len(build) == 2:
            ratio = np.median(build["neurondb"]) / np.median(build["hnswlib"])
            ratio_cpu = np.median(build_cpu["neurondb"]) / np.median(build_cpu["hnswlib"])
            print(f"ratio neurondb/hnswlib: {ratio:.3f} wall, {ratio_cpu:.3f} CPU  (target <= {TARGETS['build']})")
            report["build_ratio"] = float(ratio)
            report["build_ratio_cpu"] = float(ratio_cpu)
        if "neurondb" in libs:
            print(f"neurondb graph: {hnsw.stats(libs['neurondb'].arrays)}")

        print("\n## search, batched, single thread (whole query batch per call; median of "
              f"{args.repeats} runs)")
        curves: dict[str, list] = {name: [] for name in libs}
        curves_cpu: dict[str, list] = {name: [] for name in libs}
        print(f"{'ef':>5} " + " ".join(f"{name + ' QPS':>14} {'recall@' + str(k):>9}" for name in libs)
              + "   (QPS per CPU second: " + ", ".join(libs) + ")")
        for ef in efs:
            times: dict[str, list] = {name: [] for name in libs}
            cpu: dict[str, list] = {name: [] for name in libs}
            recall = {}
            for lib in libs.values():  # warm-up run, also the recall measurement
                recall[lib.name] = recall_at_k(lib.search(queries, k, ef), truth)
            for _ in range(args.repeats):
                for lib in libs.values():
                    c0 = time.process_time()
                    t, _ = timed(lib.search, queries, k, ef)
                    cpu[lib.name].append(time.process_time() - c0)
                    times[lib.name].append(t)
            row = f"{ef:5d} "
            extra = []
            for name in libs:
                qps = len(queries) / float(np.median(times[name]))
                qps_cpu = len(queries) / float(np.median(cpu[name]))
                curves[name].append((recall[name], qps))
                curves_cpu[name].append((recall[name], qps_cpu))
                row += f"{qps:14.0f} {recall[name]:9.4f} "
                extra.append(f"{qps_cpu:.0f}")
            print(row + "  (" + ", ".join(extra) + ")")
        report["curves"] = curves
        report["curves_cpu"] = curves_cpu
        if len(libs) == 2:
            print("\n## QPS at equal recall (interpolated on each curve; wall clock, and per CPU second)")
            report["qps_ratio"] = {}
            for target in (0.95, 0.99):
                ours = interp_qps(curves["neurondb"], target)
                theirs = interp_qps(curves["hnswlib"], target)
                if ours is None or theirs is None:
                    print(f"recall {target}: not reached by {'neurondb' if ours is None else 'hnswlib'}")
                    continue
                ours_c = interp_qps(curves_cpu["neurondb"], target)
                theirs_c = interp_qps(curves_cpu["hnswlib"], target)
                print(f"recall {target}: neurondb {ours:8.0f} QPS, hnswlib {theirs:8.0f} QPS, "
                      f"ratio {ours / theirs:.3f}  (target >= {TARGETS['qps']}); per CPU second: "
                      f"{ours_c:.0f} vs {theirs_c:.0f}, ratio {ours_c / theirs_c:.3f}")
                report["qps_ratio"][str(target)] = {"neurondb": ours, "hnswlib": theirs, "ratio": ours / theirs,
                                                    "ratio_cpu": ours_c / theirs_c}

        print(f"\n## throughput of 2 processes searching the same index at once (ef {args.mp_ef}, "
              f"~{args.mp_seconds:g} s each, median of {args.mp_repeats}; 1 and 2 processes alternate)")
        print("wall = queries / elapsed time; cpu = sum of each process's queries / its CPU time (what the "
              "processes reach when no other program takes a core)")
        report["mp"] = {}
        for lib in libs.values():
            runs: dict[int, list] = {1: [], 2: []}
            loads = []
            for _ in range(args.mp_repeats):
                for procs in (1, 2):
                    loads.append(os.getloadavg()[0])
                    runs[procs].append(multi_process_qps(lib, queries, k, args.mp_ef, procs, args.mp_seconds))
            o_wall, w_wall = (float(np.median([r[0] for r in runs[p]])) for p in (1, 2))
            o_cpu, w_cpu = (float(np.median([r[1] for r in runs[p]])) for p in (1, 2))
            print(f"{lib.name:9s} wall: 1 process {o_wall:8.0f} QPS, 2 processes {w_wall:8.0f} QPS, "
                  f"ratio {w_wall / o_wall:.2f}  (target >= {TARGETS['mp']})")
            print(f"{'':9s} cpu:  1 process {o_cpu:8.0f} QPS, 2 processes {w_cpu:8.0f} QPS, "
                  f"ratio {w_cpu / o_cpu:.2f}   (load average before the runs: {np.median(loads):.1f})")
            report["mp"][lib.name] = {"one": o_wall, "two": w_wall, "ratio": w_wall / o_wall,
                                      "one_cpu": o_cpu, "two_cpu": w_cpu, "ratio_cpu": w_cpu / o_cpu,
                                      "load": float(np.median(loads))}

        print("\n## index memory")
        mem = {name: lib.memory() for name, lib in libs.items()}
        for name, b in mem.items():
            print(f"{name:9s} {b / 2**20:8.1f} MiB ({b / args.n:.0f} bytes/vector)")
        if len(mem) == 2:
            print(f"ratio neurondb/hnswlib: {mem['neurondb'] / mem['hnswlib']:.3f}  (target <= {TARGETS['memory']})")
        report["memory_bytes"] = mem
    finally:
        for lib in libs.values():
            lib.close()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
