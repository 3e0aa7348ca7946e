"""How neuranmon chooses an index's ef_search: measure a recall curve, then decide (the document's section 2).

The document's strategy steps ef up or down by a fixed factor and does nothing when both targets are
missed. Here each decision is computed from measurements instead:

1. **The queries.** The last `neuranmon_sample_size` sampled searches that kept their query vector (a
   fixed fraction of all searches, see `client.VECTOR_SAMPLE_RATE`), with their k and tenant.
2. **The truth.** Their exact k nearest neighbours among the graph's live vectors (of the same tenant),
   by brute force; recomputed only when the graph changed (its mutation counter moved).
3. **The curve.** The same queries replayed against the graph at ef values of a ladder (multiples of 8
   up to 128, of 16 up to 256, then 32, 64, 128), off the request path: recall@k per query at each ef,
   its mean and a one-sided 95 % lower confidence bound (mean - 1.645 sd / sqrt(n), a normal approximation
   of the mean of n per-query recalls), and the kernel's time per query.
4. **The decision.** The smallest ef whose lower bound meets the target recall. Its latency is predicted
   from the real searches: each sample's client-observed latency minus the kernel time at the ef it used
   is the overhead outside the graph walk (database round trip, Python); the p95 of that overhead plus
   the kernel time at the candidate ef is the predicted p95. When the target latency cannot be met at
   the ef the recall needs, `neuranmon_priority` decides (recall: keep the recall; latency: the largest
   ef whose predicted p95 meets the latency target) and the decision says "SLO unattainable: ...".

No flapping: ef moves to the smallest ef whose lower bound meets the target, but only on evidence beyond
noise: up when the lower bound at the current ef has fallen more than `BAND` below the target, down only
when that saves at least 10 % of the ef. Going back after a move needs the lower bound of the ef just left
to swing by more than `BAND` between two cycles, which the measurement noise of a cycle (the same sliding
window of queries, re-measured) does not do. (The band sits below the target rather than above it, so an
index coming down from a large ef lands where one coming up does, at the smallest ef meeting the target.)
The first decision jumps straight to the computed ef (no stepping), so from any starting point one cycle
with enough samples suffices. ef always stays within [largest k sampled, hnsw_max_ef_search].

A decision needs at least `MIN_QUERIES` (100) sampled queries: the lower bound's half-width is
1.645 sd / sqrt(n), about 0.016 for 100 queries whose recall@10 varies by 0.1 between queries (typical),
which costs a rung or two of ef above what the mean alone would choose; with fewer queries it is so wide
that it would only push ef up, with more it tightens as 1/sqrt(n). At the default sampling rate (5 % of
searches keep their vector) 100 sampled queries take 2,000 searches.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from neurondb.index import hnsw
from neurondb.index.store import tenant_code

Z_95 = 1.645           # one-sided 95 % normal quantile
BAND = 0.005           # how far below the target the lower bound may sag before ef goes up (hysteresis)
MIN_SAVING = 0.9       # lower only to an ef at most this fraction of the current one
MIN_QUERIES = 100      # sampled queries (with vectors) needed for a decision
MIN_LATENCIES = 20     # latency samples needed to predict the p95
EXACT_CHUNK = 64       # queries per brute-force distance block (bounds memory: 64 x live vectors)
CURVE_DISPLAY = (16, 32, 64, 128, 256, 512, 1024)   # always measured, for the history and the report


def ef_ladder(low: int, high: int) -> list[int]:
    """The ef values the tuner may choose between `low` and `high` (both included): steps of 8 up to 128,
    16 up to 256, 32 up to 512, 64 up to 1024, then 128; about 12 % apart above 64."""
    values = {low, high}
    ef = 8
    while ef < high:
        values.add(ef)
        ef += 8 if ef < 128 else 16 if ef < 256 else 32 if ef < 512 else 64 if ef < 1024 else 128
    return sorted(v for v in values if low <= v <= high)


@dataclass(frozen=True)
class SampledQuery:
    vector: np.ndarray
    k: int
    tenant: str | None
    seq: int = 0         # unique per window: the key of its cached exact result


@dataclass(frozen=True)
class Point:
    """The curve at one ef: recall over the replayed queries and the kernel's time per query."""

    ef: int
    recall: float
    low: float           # one-sided 95 % lower confidence bound of the mean recall
    high: float          # the symmetric upper bound, for display
    below: float         # share of queries whose recall is below the mean target - 0.05
    kernel_ms: float


@dataclass(frozen=True)
class Targets:
    recall: float
    latency_ms: float
    priority: str        # "recall" or "latency"


@dataclass(frozen=True)
class Decision:
    ef: int
    state: str           # "converged", "exploring", "unattainable", "pinned", "waiting"
    reason: str
    point: Point | None = None
    p95_ms: float | None = None   # predicted p95 at the chosen ef


@dataclass
class Window:
    """What the tuner keeps of one index's recent searches: sampled query vectors and latencies."""

    size: int
    queries: deque[SampledQuery] = field(default_factory=deque)
    latencies: deque[tuple[float, int, str]] = field(default_factory=deque)   # (ms, ef, query type)
    recalls: deque[float] = field(default_factory=deque)   # recall@k of real searches' own results
    added: int = 0

    def add(self, vector: np.ndarray | None, k: int, tenant: str | None, latency_ms: float, ef: int,
            query_type: str, recall: float | None = None) -> SampledQuery | None:
        """Add one search; the SampledQuery kept for replay when it has a vector."""
        added = None
        if vector is not None:
            self.added += 1
            added = SampledQuery(vector.astype(np.float32), k, tenant, self.added)
            self.queries.append(added)
        if recall is not None:
            self.recalls.append(recall)
        self.latencies.append((latency_ms, ef, query_type))
        self.resize(self.size)
        return added

    def resize(self, size: int) -> None:
        self.size = size
        while len(self.queries) > size:
            self.queries.popleft()
        while len(self.latencies) > size:
            self.latencies.popleft()
        while len(self.recalls) > size:
            self.recalls.popleft()

    def percentiles(self, query_type: str | None = None) -> dict[str, float]:
        ms = [m for m, _, t in self.latencies if query_type is None or t == query_type]
        if not ms:
            return {}
        p = np.percentile(np.array(ms), [50, 90, 95, 99])
        return {"p50": float(p[0]), "p90": float(p[1]), "p95": float(p[2]), "p99": float(p[3])}


class Curve:
    """Recall and kernel time against ef for one graph and one set of sampled queries, measured lazily:
    `at(ef)` replays the queries at that ef the first time it is asked for."""

    def __init__(self, arrays: hnsw.HnswArrays, queries: Iterable[SampledQuery], truth: list[np.ndarray],
                 target: float) -> None:
        self.arrays = arrays
        self.queries = list(queries)
        self.truth = truth
        self.target = target
        self.points: dict[int, Point] = {}
        # Queries grouped by (tenant, k): one batched kernel call per group and ef.
        groups: dict[tuple[str | None, int], list[int]] = {}
        for i, q in enumerate(self.queries):
            groups.setdefault((q.tenant, q.k), []).append(i)
        self.groups = [(tenant, k, np.array(ids), np.stack([self.queries[i].vector for i in ids]))
                       for (tenant, k), ids in groups.items()]

    def at(self, ef: int) -> Point:
        if ef not in self.points:
            self.points[ef] = self._measure(ef)
        return self.points[ef]

    def _measure(self, ef: int) -> Point:
        recalls = np.zeros(len(self.queries))
        elapsed = 0.0
        for tenant, k, ids, matrix in self.groups:
            started = time.perf_counter()
            labels, _ = hnsw.search_many(self.arrays, matrix, k, max(ef, k), tenant_code(tenant))
            elapsed += time.perf_counter() - started
            for row, i in enumerate(ids.tolist()):
                truth = self.truth[i]
                if truth.size:
                    recalls[i] = np.intersect1d(labels[row], truth, assume_unique=False).size / truth.size
                else:
                    recalls[i] = 1.0
        n = len(recalls)
        mean = float(recalls.mean())
        half = Z_95 * float(recalls.std(ddof=1)) / math.sqrt(n) if n > 1 else 1.0
        return Point(ef=ef, recall=mean, low=mean - half, high=min(1.0, mean + half),
                     below=float((recalls < self.target - 0.05).mean()), kernel_ms=elapsed * 1000 / max(n, 1))

    def kernel_ms(self, ef: float) -> float:
        """Kernel time per query at `ef`, interpolated (in log ef) between the points measured so far."""
        efs = sorted(self.points)
        return float(np.interp(math.log(ef), [math.log(e) for e in efs], [self.points[e].kernel_ms for e in efs]))

    def measured(self) -> list[Point]:
        return [self.points[ef] for ef in sorted(self.points)]


def exact_truth(arrays: hnsw.HnswArrays, queries: list[SampledQuery]) -> list[np.ndarray]:
    """The labels of each query's exact k nearest live neighbours (of its tenant), by brute force."""
    n = arrays.count
    live = arrays.tombstones[:n] == 0
    out: list[np.ndarray] = [np.empty(0, np.int64)] * len(queries)
    by_tenant: dict[str | None, list[int]] = {}
    for i, q in enumerate(queries):
        by_tenant.setdefault(q.tenant, []).append(i)
    for tenant, idxs in by_tenant.items():
        mask = live if tenant is None else live & (arrays.tenants[:n] == tenant_code(tenant))
        ids = np.flatnonzero(mask)
        if ids.size == 0:
            continue
        vectors = arrays.vectors[ids]
        norms = (vectors * vectors).sum(axis=1) if arrays.metric == "l2" else None
        for start in range(0, len(idxs), EXACT_CHUNK):
            chunk = idxs[start:start + EXACT_CHUNK]
            q = np.stack([queries[i].vector for i in chunk]).astype(np.float32)
            if arrays.metric == "cosine":
                q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
            dot = q @ vectors.T
            dist = norms[None, :] - 2 * dot if norms is not None else -dot
            for row, i in enumerate(chunk):
                k = min(queries[i].k, ids.size)
                top = np.argpartition(dist[row], k - 1)[:k]
                out[i] = arrays.labels[ids[top]].astype(np.int64)
    return out


def smallest_meeting(curve: Curve, ladder: list[int], goal: float) -> int | None:
    """The smallest ef of `ladder` whose lower bound reaches `goal` (None if even the largest does not),
    by bisection: recall grows with ef, so about log2(len(ladder)) replays instead of one per rung."""
    if curve.at(ladder[-1]).low < goal:
        return None
    lo, hi = 0, len(ladder) - 1           # invariant: ladder[hi] meets the goal
    while lo < hi:
        mid = (lo + hi) // 2
        if curve.at(ladder[mid]).low >= goal:
            hi = mid
        else:
            lo = mid + 1
    return ladder[hi]


def predict_p95(curve: Curve, latencies: Iterable[tuple[float, int, str]], ef: int) -> float | None:
    """Predicted client-observed p95 latency at `ef`: the p95 of each real search's overhead outside the
    kernel (its latency minus the kernel time at its own ef), plus the kernel time at `ef`."""
    overheads = [ms - curve.kernel_ms(max(e, 1)) for ms, e, _ in latencies]
    if len(overheads) < MIN_LATENCIES:
        return None
    return max(0.0, float(np.percentile(np.array(overheads), 95))) + curve.kernel_ms(ef)


def decide(curve: Curve, window: Window, current: int, targets: Targets, max_ef: int) -> Decision:
    """The ef for the next period, from the curve and the latencies (see the module doc)."""
    k_floor = max(q.k for q in curve.queries)
    low, high = min(k_floor, max_ef), max_ef
    ladder = ef_ladder(low, high)
    current = min(max(current, low), high)
    for ef in (current, *[e for e in CURVE_DISPLAY if low <= e <= high]):
        curve.at(ef)
    needed = smallest_meeting(curve, ladder, targets.recall)
    state = "converged"
    if needed is None:
        best = curve.at(high)
        choice, state = high, "unattainable"
        reason = (f"SLO unattainable: recall {targets.recall:.3f} not reached at the maximum ef {high} "
                  f"(recall {best.recall:.3f}, lower bound {best.low:.3f})")
    elif curve.at(current).low < targets.recall - BAND:
        choice = needed if needed > current else next((e for e in ladder if e > current), high)
        reason = (f"recall {curve.at(current).recall:.3f} (lower bound {curve.at(current).low:.3f}) below target "
                  f"{targets.recall:.3f} at ef {current}")
    elif needed <= current * MIN_SAVING:
        choice = needed
        reason = (f"recall target {targets.recall:.3f} met at ef {needed} "
                  f"(lower bound {curve.at(needed).low:.3f}); ef {current} searched further than needed")
    else:
        choice, reason = current, "recall and latency on target"
    p95 = predict_p95(curve, window.latencies, choice)
    if p95 is not None and p95 > targets.latency_ms:
        needs = f">= {needed}" if needed is not None else f"> {high}"
        reason = (f"SLO unattainable: recall {targets.recall:.3f} needs ef {needs}, "
                  f"p95 {p95:.2f} ms > target {targets.latency_ms:g} ms")
        state = "unattainable"
        if targets.priority == "latency":
            fits = [e for e in ladder if (predict_p95(curve, window.latencies, e) or 0.0) <= targets.latency_ms]
            choice = fits[-1] if fits else low
            reason += f"; latency has priority: ef {choice} (recall {curve.at(choice).recall:.3f})"
        else:
            reason += "; recall has priority"
    if state != "unattainable" and choice != current:
        state = "exploring"
    return _finish(curve, window, choice, state, reason)


def _finish(curve: Curve, window: Window, ef: int, state: str, reason: str) -> Decision:
    return Decision(ef=ef, state=state, reason=reason, point=curve.at(ef),
                    p95_ms=predict_p95(curve, window.latencies, ef))


def fixed_factor(current: int, latency_ms: float, recall: float, targets: Targets, max_ef: int,
                 k: int, factor: float = 1.5) -> int:
    """The document's own strategy, as the baseline `scripts/bench_tuner.py` compares against: latency
    over target with recall met -> ef / factor; recall under target with latency met -> ef x factor;
    otherwise (both met, or both missed) unchanged."""
    if latency_ms > targets.latency_ms and recall >= targets.recall:
        return max(k, int(current / factor))
    if recall < targets.recall and latency_ms <= targets.latency_ms:
        return min(max_ef, math.ceil(current * factor))
    return current
