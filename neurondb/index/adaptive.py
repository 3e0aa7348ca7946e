"""Declarative recall: the model that tells a search when its top k has reached the declared recall.

The method is DARTH's (early termination with a learned recall predictor), made small enough to train in
neuranmon in a second and to evaluate inside the numba search kernel:

1. **Replay.** The sampled queries (whose exact results are known) are searched once each with a large ef
   (`ef_max`), never stopping early, and every `interval` distance computations (then every 1/16 of those
   done so far) the kernel records the state of the search (`hnsw._features`: distance computations and
   hops so far, the best and the k-th distance found and their ratios to the entry distance, how far the
   closest unexpanded candidate lies beyond the k-th result, how many top-k changes happened since the last
   checkpoint and how long ago the last one was) and its current top k, whose recall against the exact
   result is then known.
2. **Model.** Gradient-boosted regression trees (`TREES` complete trees of depth `DEPTH`, squared loss,
   splits on `BINS` quantile bins per feature) predict that recall from the features, fitted on all
   the queries (and, for the calibration, on each half of them).
3. **Calibration.** On out-of-fold predictions, each candidate threshold tau is applied as the kernel would apply
   it (a query stops at its first checkpoint whose prediction reaches tau, else where its search ends by
   itself) and the mean recall it reaches is computed; for every declared recall of `TARGETS` the model
   keeps the smallest tau whose mean recall meets it (plus `MARGIN`). A declared recall above what the
   replay reached at ef_max gets no tau: such searches use the static ef.

The model is a float64 array (layout in hnsw.MODEL_HEADER) that a search reads without copying; a search
given a declared recall stops as soon as the prediction reaches that recall's threshold. What it costs and
when it helps: see the README ("Declarative recall").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurondb.index import hnsw

TREES = 40
DEPTH = 4
BINS = 32
LEARNING_RATE = 0.2
MIN_LEAF = 20              # rows on each side of a split
INTERVAL = 32              # distance computations between the first checkpoints
TRACE = 256                # checkpoints recorded per replayed query (about 90 reach past 30,000 distances)
MARGIN = 0.002             # calibrated mean recall above the declared one
MIN_QUERIES = 50           # replayed queries a model needs
TARGETS = (0.80, 0.85, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995)
_BIG = 1e30                # features are clamped to +-this (a search that ended by itself has no frontier: inf)
_NO_SPLIT = _BIG           # threshold of a node that sends everything left


@dataclass(frozen=True)
class Calibration:
    """What the calibration queries reached at one declared recall with its threshold."""

    target: float
    tau: float
    recall: float          # mean recall@k
    below: float           # share of queries below target - 0.05
    distances: float       # mean distance computations per query


@dataclass(frozen=True)
class Trained:
    model: np.ndarray
    calibration: list[Calibration]
    queries: int

    def at(self, target: float) -> Calibration | None:
        """The calibration row a search declaring `target` uses (as hnsw.early_stop picks it)."""
        return next((c for c in self.calibration if c.target >= target - 1e-12), None)


@dataclass(frozen=True)
class Replay:
    """Per replayed query, its checkpoints: features (n, NF), recall of the top k there, and which query."""

    features: np.ndarray
    recall: np.ndarray
    query: np.ndarray


def replay(arrays: hnsw.HnswArrays, queries: np.ndarray, truth: list[np.ndarray], k: int, ef_max: int,
           tenant: int = -1, interval: int = INTERVAL) -> Replay:
    """Search `queries` (nq, dim) with ef_max, recording every checkpoint (step 1 of the module doc)."""
    _, _, tf, ti, tn = hnsw.search_many(arrays, queries, k, ef_max, tenant, trace=TRACE, interval=interval)
    feats, recall, qid = [], [], []
    for q, t in enumerate(truth):
        n = int(min(tn[q], TRACE))
        if n == 0 or t.size == 0:
            continue
        hits = np.isin(ti[q, :n], t).sum(axis=1)
        feats.append(np.clip(np.nan_to_num(tf[q, :n], nan=0.0, posinf=_BIG, neginf=-_BIG), -_BIG, _BIG))
        recall.append(hits / t.size)
        qid.append(np.full(n, q))
    if not feats:
        return Replay(np.empty((0, hnsw.NF)), np.empty(0), np.empty(0, np.int64))
    return Replay(np.concatenate(feats), np.concatenate(recall), np.concatenate(qid))


def join(parts: list[Replay]) -> Replay:
    """Replays of several groups (k, tenant) as one, their query numbers kept apart."""
    offset, qids = 0, []
    for p in parts:
        qids.append(p.query + offset)
        offset += int(p.query.max()) + 1 if p.query.size else 0
    return Replay(np.concatenate([p.features for p in parts]), np.concatenate([p.recall for p in parts]),
                  np.concatenate(qids))


def _bin_edges(x: np.ndarray) -> list[np.ndarray]:
    qs = np.linspace(0, 1, BINS + 1)[1:-1]
    return [np.unique(np.quantile(x[:, j], qs)) for j in range(x.shape[1])]


def _fit_tree(binned: np.ndarray, edges: list[np.ndarray], resid: np.ndarray) -> tuple[np.ndarray, ...]:
    """One complete regression tree of depth DEPTH on the residuals, level by level."""
    n, nf = binned.shape
    inner = (1 << DEPTH) - 1
    feat = np.zeros(inner, np.float64)
    thr = np.full(inner, _NO_SPLIT)
    node = np.zeros(n, np.int64)
    for level in range(DEPTH):
        first = (1 << level) - 1
        width = 1 << level
        local = node - first
        best_gain = np.zeros(width)
        for j in range(nf):
            idx = local * BINS + binned[:, j]
            s = np.bincount(idx, resid, width * BINS).reshape(width, BINS)
            c = np.bincount(idx, None, width * BINS).reshape(width, BINS)
            sl, cl = np.cumsum(s, axis=1)[:, :-1], np.cumsum(c, axis=1)[:, :-1]
            st, ct = s.sum(axis=1, keepdims=True), c.sum(axis=1, keepdims=True)
            sr, cr = st - sl, ct - cl
            ok = (cl >= MIN_LEAF) & (cr >= MIN_LEAF)
            with np.errstate(divide="ignore", invalid="ignore"):
                gain = np.where(ok, sl * sl / cl + sr * sr / cr - st * st / np.maximum(ct, 1), 0.0)
            gain[:, len(edges[j]):] = 0.0          # no edge there (fewer distinct values than bins)
            pos = gain.argmax(axis=1)
            g = gain[np.arange(width), pos]
            better = g > best_gain
            best_gain[better] = g[better]
            feat[first + np.flatnonzero(better)] = j
            thr[first + np.flatnonzero(better)] = edges[j][pos[better]]
        fnode = feat[node].astype(np.int64)
        right = binned[np.arange(n), fnode] > _bin_of(edges, fnode, thr[node])
        node = 2 * node + 1 + right
    leaf = node - inner
    sums = np.bincount(leaf, resid, inner + 1)
    counts = np.bincount(leaf, None, inner + 1)
    values = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0) * LEARNING_RATE
    return feat, thr, values, values[leaf]


def _bin_of(edges: list[np.ndarray], feat: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """The bin index a threshold stands for (rows in bins above it go right); the no-split threshold: all left."""
    out = np.full(feat.shape, BINS, np.int64)
    for j in np.unique(feat):
        m = (feat == j) & (thr < _NO_SPLIT)
        out[m] = np.searchsorted(edges[j], thr[m], side="left")
    return out


def fit(features: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """The boosted trees (step 2): (base prediction, body as hnsw._predict reads it)."""
    edges = _bin_edges(features)
    binned = np.stack([np.searchsorted(edges[j], features[:, j], side="left") for j in range(features.shape[1])],
                      axis=1)
    base = float(target.mean())
    pred = np.full(target.shape, base)
    body = []
    for _ in range(TREES):
        feat, thr, values, step = _fit_tree(binned, edges, target - pred)
        pred += step
        body.append(np.concatenate([feat, thr, values]))
    return base, np.concatenate(body)


def predict(model: np.ndarray, features: np.ndarray) -> np.ndarray:
    """hnsw._predict over rows of features, vectorised (training and calibration)."""
    trees, depth = int(model[1]), int(model[2])
    inner = (1 << depth) - 1
    width = 3 * inner + 1
    y = np.full(features.shape[0], model[3])
    rows = np.arange(features.shape[0])
    for t in range(trees):
        off = hnsw.MODEL_HEADER + t * width
        node = np.zeros(features.shape[0], np.int64)
        for _ in range(depth):
            fi = model[off + node].astype(np.int64)
            node = 2 * node + 1 + (features[rows, fi] > model[off + inner + node])
        y += model[off + 2 * inner + node - inner]
    return y


def _stops(pred: np.ndarray, qid: np.ndarray, tau: float) -> np.ndarray:
    """Row index where each query stops under tau: its first checkpoint predicted >= tau, else its last."""
    starts = np.flatnonzero(np.r_[True, qid[1:] != qid[:-1]])
    ends = np.r_[starts[1:], qid.size] - 1
    hit = np.flatnonzero(pred >= tau)
    first = np.searchsorted(hit, starts)
    cand = np.where(first < hit.size, hit[np.minimum(first, hit.size - 1)], ends)
    return np.where(cand <= ends, cand, ends)


def calibrate(pred: np.ndarray, cal: Replay) -> list[Calibration]:
    """Step 3: per declared recall, the smallest threshold meeting it on the calibration queries, whose
    checkpoints `cal` are predicted `pred`."""
    taus = np.unique(np.quantile(pred, np.linspace(0, 1, 201)))
    rows = [_stops(pred, cal.query, tau) for tau in taus]
    recalls = np.array([cal.recall[r].mean() for r in rows])
    out = []
    for target in TARGETS:
        ok = np.flatnonzero(recalls >= target + MARGIN)
        if ok.size == 0:
            break
        i = int(ok[0])
        r = rows[i]
        out.append(Calibration(target, float(taus[i]), float(recalls[i]),
                               float(np.mean(cal.recall[r] < target - 0.05)), float(cal.features[r, 0].mean())))
    return out


def train(parts: list[Replay], ef_max: int, version: int, seed: int = 0, interval: int = INTERVAL
          ) -> Trained | None:
    """A model from replays (one per group of queries with the same k and tenant), or None with fewer than
    MIN_QUERIES queries or when not even the lowest declared recall can be calibrated. Thresholds are
    calibrated on out-of-fold predictions (two halves, each predicted by trees fitted on the other), so that
    every query calibrates and none is judged by trees that saw it; the model shipped is fitted on all."""
    rep = join(parts)
    nq = int(rep.query.max()) + 1 if rep.query.size else 0
    if nq < MIN_QUERIES:
        return None
    fold = np.zeros(nq, np.int64)
    fold[np.random.default_rng(seed).permutation(nq)[: nq // 2]] = 1
    rows = fold[rep.query]
    oof = np.empty(rep.recall.shape)
    for f in (0, 1):
        part = _model(*fit(rep.features[rows == f], rep.recall[rows == f]), ef_max, version, interval)
        oof[rows != f] = predict(part, rep.features[rows != f])
    model = _model(*fit(rep.features, rep.recall), ef_max, version, interval)
    cal = calibrate(oof, rep)
    if not cal:
        return None
    model[7] = len(cal)
    model = np.concatenate([model, np.array([(c.target, c.tau) for c in cal], np.float64).ravel()])
    return Trained(model, cal, nq)


def _model(base: float, body: np.ndarray, ef_max: int, version: int, interval: int) -> np.ndarray:
    header = np.array([hnsw.MODEL_MAGIC, TREES, DEPTH, base, version, ef_max, interval, 0], np.float64)
    return np.concatenate([header, body])
