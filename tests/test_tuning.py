"""The tuner's measure-then-decide logic (neurondb/tuning.py) on a real graph, against an exact ef ladder
computed here independently."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from neurondb import tuning
from neurondb.index import hnsw
from tests.test_hnsw import exact

N, DIM, K = 6000, 32, 10


@pytest.fixture(scope="module")
def graph() -> hnsw.HnswArrays:
    """Gaussian data: hard enough for HNSW that neither ef 16 nor ef 512 is the right answer."""
    a = hnsw.HnswArrays.allocate(N, DIM, m=8, ef_construction=60, metric="l2")
    hnsw.add_items(a, np.random.default_rng(1).standard_normal((N, DIM)).astype(np.float32), np.arange(N))
    return a


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return np.random.default_rng(2).standard_normal((300, DIM)).astype(np.float32)


def window_of(queries: np.ndarray, latency_ms: float = 1.0, ef: int = 40) -> tuning.Window:
    w = tuning.Window(size=1000)
    for q in queries:
        w.add(q, K, None, latency_ms, ef, "vector")
    return w


def oracle_ef(graph: hnsw.HnswArrays, queries: np.ndarray, target: float) -> int:
    """The smallest ef of the tuner's ladder whose mean recall@k meets the target: computed with the test's
    own exact search (tests/test_hnsw.exact), not the tuner's."""
    base = graph.vectors[:N]
    truth = graph.labels[exact(base, queries, K, "l2")]
    for ef in tuning.ef_ladder(K, 1024):
        found, _ = hnsw.search_many(graph, queries, K, ef)
        r = np.mean([np.intersect1d(f, t).size / K for f, t in zip(found, truth, strict=True)])
        if r >= target:
            return ef
    raise AssertionError("the target is not reachable on this graph")


def curve_of(graph: hnsw.HnswArrays, w: tuning.Window, target: float) -> tuning.Curve:
    qs = list(w.queries)
    return tuning.Curve(graph, qs, tuning.exact_truth(graph, qs), target)


def test_ladder_is_within_bounds_and_fine() -> None:
    ladder = tuning.ef_ladder(10, 512)
    assert ladder[0] == 10 and ladder[-1] == 512 and 16 in ladder and 136 not in ladder and 144 in ladder
    assert all(b / a <= 1.8 for a, b in itertools.pairwise(ladder))


def test_exact_truth_matches_an_independent_exact_search(graph, queries) -> None:
    w = window_of(queries[:20])
    truth = tuning.exact_truth(graph, list(w.queries))
    independent = graph.labels[exact(graph.vectors[:N], queries[:20], K, "l2")]
    for mine, theirs in zip(truth, independent, strict=True):
        assert set(mine.tolist()) == set(theirs.tolist())


@pytest.mark.parametrize("start", [16, 512])
def test_converges_in_one_decision_from_either_extreme_and_stays(graph, queries, start) -> None:
    target = 0.95
    oracle = oracle_ef(graph, queries, target)
    assert 16 < oracle < 512, f"the data should make both extremes wrong (oracle ef {oracle})"
    targets = tuning.Targets(recall=target, latency_ms=1000.0, priority="recall")
    w = window_of(queries)
    first = tuning.decide(curve_of(graph, w, target), w, start, targets, 1024)
    # The lower confidence bound may ask for a rung or two more than the mean does, never less.
    assert oracle <= first.ef <= oracle * 1.3, (oracle, first)
    assert first.state == "exploring" and first.point.low >= target
    second = tuning.decide(curve_of(graph, w, target), w, first.ef, targets, 1024)
    assert second.ef == first.ef and second.state == "converged", second


def test_latency_priority_lowers_ef_and_reports_the_conflict(graph, queries) -> None:
    w = window_of(queries, latency_ms=0.05, ef=512)
    recall_first = tuning.decide(curve_of(graph, w, 0.99), w, 512,
                                 tuning.Targets(0.99, 0.06, "recall"), 1024)
    latency_first = tuning.decide(curve_of(graph, w, 0.99), w, 512,
                                  tuning.Targets(0.99, 0.06, "latency"), 1024)
    assert recall_first.state == latency_first.state == "unattainable"
    assert "SLO unattainable: recall 0.990 needs ef >= " in latency_first.reason and "p95" in latency_first.reason
    assert latency_first.ef < recall_first.ef, (latency_first, recall_first)


def test_recall_out_of_reach_takes_the_maximum_ef(graph, queries) -> None:
    w = window_of(queries)
    d = tuning.decide(curve_of(graph, w, 1.0), w, 40, tuning.Targets(1.0, 1000.0, "recall"), 24)
    assert d.ef == 24 and d.state == "unattainable" and "not reached at the maximum ef 24" in d.reason


def test_tenant_filtered_queries_are_measured_against_their_tenant(graph, queries) -> None:
    tenants = np.arange(N) % 5
    a = hnsw.HnswArrays.allocate(N, DIM, m=8, ef_construction=60, metric="l2")
    codes = np.array([tuning.tenant_code(f"t{t}") for t in tenants], np.int32)
    hnsw.add_items(a, graph.vectors[:N], np.arange(N), codes)
    w = tuning.Window(size=1000)
    for q in queries:
        w.add(q, K, "t3", 1.0, 40, "vector")
    truth = tuning.exact_truth(a, list(w.queries))
    assert all(np.all(tenants[t] == 3) for t in truth)
    filtered = tuning.decide(tuning.Curve(a, list(w.queries), truth, 0.95), w, 16,
                             tuning.Targets(0.95, 1000.0, "recall"), 1024)
    assert filtered.ef > 16 and filtered.point.low >= 0.95


def test_fixed_factor_baseline_is_the_documents_rule() -> None:
    t = tuning.Targets(0.95, 10.0, "recall")
    assert tuning.fixed_factor(64, 20.0, 0.97, t, 512, 10) == 42      # latency over, recall met: down
    assert tuning.fixed_factor(64, 5.0, 0.90, t, 512, 10) == 96       # recall under, latency met: up
    assert tuning.fixed_factor(64, 20.0, 0.90, t, 512, 10) == 64      # both missed: the document does nothing


def test_combine_and_ndcg_of_the_hybrid_rule() -> None:
    from neurondb import hybrid

    ids, scores = hybrid.combine([1, 2, 3], np.array([0.9, 0.5, 0.1]), [3, 4], np.array([2.0, 1.0]), 0.5)
    # min-max per list: vector 1 -> 1, 2 -> 0.5, 3 -> 0; text 3 -> 1, 4 -> 0; a missing side scores 0.
    assert dict(zip(ids.tolist(), scores.tolist(), strict=True)) == {1: 0.5, 2: 0.25, 3: 0.5, 4: 0.0}
    assert ids.tolist()[:2] == [1, 3]                       # ties keep the vector list's order
    q = hybrid.JudgedQuery(k=2, vector_ids=[1, 2, 3], vector_scores=np.array([0.9, 0.5, 0.1]), text_ids=[3, 4],
                           text_ranks=np.array([2.0, 1.0]), relevance={3: 1.0, 9: 1.0})
    assert hybrid.ndcg(q, 0.0) == 1.0                       # doc 9 is no candidate: not counted against a weight
    assert hybrid.ndcg(q, 1.0) < 1.0
    few = hybrid.best_weight([q] * (hybrid.MIN_JUDGED - 1), 1.0)
    assert few.weight == 1.0 and "judged hybrid queries" in few.reason
    enough = hybrid.best_weight([q] * hybrid.MIN_JUDGED, 1.0)
    assert enough.weight < 1.0 and enough.after > enough.before
