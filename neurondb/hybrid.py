"""Hybrid scoring, and learning its weight from relevance feedback (the document's "Hybrid Weight
Optimization: balance vector vs keyword search").

A hybrid search has two candidate lists: the vector index's (similarity: 1 - distance for cosine and ip,
1 / (1 + distance) for l2) and PostgreSQL full-text search's (ts_rank_cd). Each list's scores are min-max
normalised over its candidates to [0, 1]; a candidate missing from a list scores 0 there; a candidate's
score is `w * vector + (1 - w) * text`. `combine` is that rule, used by the client to answer a search and
by neuranmon to re-score a past search at any other weight.

Learning w: the client records every hybrid search's two raw candidate lists under its query id
(`neurondb_hybrid_queries`); the application reports which documents were relevant
(`client.feedback(query_id, doc_id, relevance)`, or an INSERT into `neurondb_feedback`). For an index with
at least `MIN_JUDGED` judged queries, `best_weight` re-ranks each of them at every weight of a grid (0,
0.05, ..., 1) and takes the weight with the highest mean nDCG@k, where a query's ideal DCG is that of its
judged documents found among its candidates (a relevant document neither list returned cannot be reached
by any weight, so it does not count against one). The weight moves only when that beats the current
weight's mean nDCG by `MIN_GAIN`: feedback is sparse and noisy, and a weight that flips on a tie would
change every user's results for nothing.

Limits: only documents the candidate lists held can be rewarded, so the learned weight is the best mix of
these two lists, not a better retriever; judgements apply to the searches they were given for (recent
ones, within `neurondb.query_metrics_retention`), so a weight learned from one kind of query carries over
to others only as far as the workload is alike; with no feedback the weight stays where the operator put it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GRID = tuple(round(i * 0.05, 2) for i in range(21))
MIN_JUDGED = 20      # judged queries needed before the weight moves
MIN_GAIN = 0.01      # mean nDCG improvement needed to move it


def minmax(x: np.ndarray) -> np.ndarray:
    if x.size == 0:
        return x
    lo, hi = float(x.min()), float(x.max())
    return np.ones_like(x) if hi - lo < 1e-12 else (x - lo) / (hi - lo)


def combine(vector_ids: Sequence[int], vector_scores: np.ndarray, text_ids: Sequence[int], text_ranks: np.ndarray,
            weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidate ids and combined scores, best first (ties keep the vector list's order, then the text's)."""
    vec = dict(zip(list(vector_ids), minmax(np.asarray(vector_scores, np.float64)).tolist(), strict=True))
    txt = dict(zip(list(text_ids), minmax(np.asarray(text_ranks, np.float64)).tolist(), strict=True))
    ids = list(dict.fromkeys([*vec, *txt]))
    combined = np.array([weight * vec.get(i, 0.0) + (1 - weight) * txt.get(i, 0.0) for i in ids])
    order = np.argsort(-combined, kind="stable")
    return np.array(ids, np.int64)[order], combined[order]


@dataclass(frozen=True)
class JudgedQuery:
    """A past hybrid search with the relevance the application reported for some of its documents."""

    k: int
    vector_ids: list[int]
    vector_scores: np.ndarray
    text_ids: list[int]
    text_ranks: np.ndarray
    relevance: dict[int, float]      # vector row id -> relevance (> 0 relevant)


def ndcg(q: JudgedQuery, weight: float) -> float | None:
    """nDCG@k of the query re-ranked at `weight`; None when none of its relevant documents is a candidate."""
    ids, _ = combine(q.vector_ids, q.vector_scores, q.text_ids, q.text_ranks, weight)
    candidates = set(ids.tolist())
    ideal = sorted((r for i, r in q.relevance.items() if r > 0 and i in candidates), reverse=True)[: q.k]
    if not ideal:
        return None
    dcg = sum(q.relevance.get(i, 0.0) / math.log2(rank + 2) for rank, i in enumerate(ids[: q.k].tolist()))
    return dcg / sum(r / math.log2(rank + 2) for rank, r in enumerate(ideal))


@dataclass(frozen=True)
class WeightChoice:
    weight: float
    before: float | None     # mean nDCG at the current weight
    after: float | None      # at the chosen one
    judged: int              # queries that counted
    reason: str


def best_weight(queries: Sequence[JudgedQuery], current: float) -> WeightChoice:
    """The grid weight with the best mean nDCG@k over `queries`, or `current` (see the module doc)."""
    usable = [q for q in queries if ndcg(q, current) is not None]
    if len(usable) < MIN_JUDGED:
        return WeightChoice(current, None, None, len(usable),
                            f"{len(usable)} of the {MIN_JUDGED} judged hybrid queries the weight needs")
    before = float(np.mean([ndcg(q, current) for q in usable]))
    scores = {w: float(np.mean([ndcg(q, w) for q in usable])) for w in GRID}
    best = max(GRID, key=lambda w: (scores[w], -abs(w - current)))     # ties: the weight nearest the current
    if scores[best] < before + MIN_GAIN:
        return WeightChoice(current, before, before, len(usable),
                            f"hybrid weight {current:g} within {MIN_GAIN} nDCG of the best ({best:g})")
    return WeightChoice(best, before, scores[best], len(usable),
                        f"hybrid weight {current:g} -> {best:g}: nDCG@k {before:.3f} -> {scores[best]:.3f} "
                        f"over {len(usable)} judged queries")
