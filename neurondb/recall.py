"""Declarative recall in the service: the per-index recall model in shared memory, and how neuranmon keeps it.

The model (neurondb/index/adaptive.py says what it is) lives in its own small segment per index, published
as a generation of the structure `<index key>.rm` (neurondb/shm/segment.py): the generation number is the
model's version. neuranmon is its only writer. A search maps the current generation (no copy, no lock, never
waiting for a training) and checks it once per version (`hnsw.early_stop`); a generation whose model is
empty means "withdrawn": searches then use the static, tuned ef, as they do before the first model.

Each tuning cycle neuranmon (`Keeper.cycle`) measures the published model on the window of sampled queries
whose exact results it already has: the mean recall@k the early stop reaches at the index's target, and the
share of queries below target - 0.05. It trains a new model when there is none, or when that recall has
fallen more than `BAND` below the target (the data drifted: new clusters, deletions); a new model that does
not meet the target on the window either is withdrawn, so searches fall back to the static ef.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from neurondb.index import adaptive, hnsw
from neurondb.index.store import index_key, tenant_code
from neurondb.shm.control import SharedState
from neurondb.shm.names import object_name
from neurondb.shm.segment import (
    GenerationReader,
    Segment,
    generation_name,
    publish_generation,
    unlink_stale_generations,
)
from neurondb.tuning import SampledQuery

BAND = 0.005               # measured recall this far below the target: retrain
EF_MAX_FACTOR = 4          # the adaptive search's limit: this many times the static ef ...
EF_MAX_FLOOR = 64          # ... but at least this, and at most hnsw_max_ef_search (a larger limit lets hard
                           # queries go further, but every search then keeps more candidates: slower per step)
WITHDRAWN = np.zeros(hnsw.MODEL_HEADER, np.float64)    # a model no search uses (magic 0)


def _base(shared: SharedState, index: str) -> tuple[str, np.ndarray]:
    name = index_key(index) + ".rm"
    return object_name(shared.prefix, name), shared.generation(name)


class ModelReader:
    """A search's view of an index's model: `stop(target)` is the early stop, or None (static ef)."""

    def __init__(self, shared: SharedState, index: str) -> None:
        base, counter = _base(shared, index)
        self._reader = GenerationReader(base, counter)
        self._segment: Segment | None = None
        self._stops: dict[float, hnsw.EarlyStop | None] = {}

    @property
    def version(self) -> int:
        return self._reader.generation

    def stop(self, target: float) -> hnsw.EarlyStop | None:
        segment = self._reader.current()
        if segment is None:
            return None
        if segment is not self._segment:
            self._segment = segment
            self._stops = {}
        if target not in self._stops:
            self._stops[target] = hnsw.early_stop(segment.ndarray(np.float64, segment.size // 8), target)
        return self._stops[target]

    def withdrawn(self) -> bool:
        """Whether the current generation is the withdrawn (empty) model."""
        segment = self._reader.current()
        return segment is not None and segment.size == WITHDRAWN.nbytes

    def close(self) -> None:
        self._segment = None
        self._stops = {}
        self._reader.close()


class ModelWriter:
    """neuranmon's side: publish a model (or the withdrawn one) as the next generation."""

    def __init__(self, shared: SharedState, index: str) -> None:
        self.base, self.counter = _base(shared, index)
        unlink_stale_generations(self.base, int(self.counter))     # a dead predecessor's unpublished work

    @property
    def version(self) -> int:
        return int(self.counter)

    def publish(self, model: np.ndarray) -> int:
        """Write `model` into a new segment and make it current; returns its version."""
        version = int(self.counter) + 1
        model = model.copy()
        if model[0] == hnsw.MODEL_MAGIC:
            model[4] = version
        segment = Segment.create(generation_name(self.base, version), model.nbytes)
        segment.ndarray(np.float64, model.size)[:] = model
        segment.close()
        publish_generation(self.counter, self.base, version)
        return version

    def unlink(self) -> None:
        """The index was dropped: remove its current model segment."""
        unlink_stale_generations(self.base, -1)


@dataclass(frozen=True)
class Measured:
    """The published model on the window: mean recall@k and the share below target - 0.05 at the target."""

    recall: float
    below: float
    queries: int


@dataclass(frozen=True)
class Outcome:
    """What a cycle did: `event` None (nothing changed), 'trained', 'withdrawn'; figures for the history."""

    event: str | None
    version: int
    recall: float | None
    below: float | None
    reason: str
    train_ms: float | None = None


def _groups(queries: list[SampledQuery], truth: list[np.ndarray]) -> dict[tuple[int, int], list[int]]:
    out: dict[tuple[int, int], list[int]] = {}
    for i, (q, t) in enumerate(zip(queries, truth, strict=True)):
        if t.size:
            out.setdefault((q.k, tenant_code(q.tenant)), []).append(i)
    return out


def measure(arrays: hnsw.HnswArrays, stop: hnsw.EarlyStop, queries: list[SampledQuery], truth: list[np.ndarray],
            target: float) -> Measured | None:
    """Replay the window's queries with `stop`: the recall the model really reaches on today's data."""
    rec: list[float] = []
    for (k, tenant), idx in _groups(queries, truth).items():
        found = hnsw.search_many(arrays, np.stack([queries[i].vector for i in idx]), k, tenant=tenant, stop=stop)[0]
        rec.extend(np.intersect1d(f, truth[i]).size / truth[i].size for f, i in zip(found, idx, strict=True))
    if not rec:
        return None
    r = np.array(rec)
    return Measured(float(r.mean()), float(np.mean(r < target - 0.05)), r.size)


def train(arrays: hnsw.HnswArrays, queries: list[SampledQuery], truth: list[np.ndarray], ef_max: int
          ) -> adaptive.Trained | None:
    parts = [adaptive.replay(arrays, np.stack([queries[i].vector for i in idx]), [truth[i] for i in idx], k, ef_max,
                             tenant) for (k, tenant), idx in _groups(queries, truth).items()]
    return adaptive.train(parts, ef_max, version=0) if parts else None


def ef_limit(static_ef: int, max_ef: int) -> int:
    return max(1, min(max_ef, max(EF_MAX_FLOOR, EF_MAX_FACTOR * static_ef)))


class Keeper:
    """One index's model in neuranmon: measured every cycle, retrained on drift, withdrawn when it fails."""

    def __init__(self, shared: SharedState, index: str) -> None:
        self.writer = ModelWriter(shared, index)
        self.reader = ModelReader(shared, index)
        self._failed: tuple | None = None      # what a training that failed saw: not tried again on the same

    def cycle(self, arrays: hnsw.HnswArrays, queries: list[SampledQuery], truth: list[np.ndarray], target: float,
              static_ef: int, max_ef: int) -> Outcome:
        stop = self.reader.stop(target)
        version = self.writer.version
        if stop is not None:
            m = measure(arrays, stop, queries, truth, target)
            if m is None or m.recall >= target - BAND:
                return Outcome(None, version, m.recall if m else None, m.below if m else None, "model meets the target")
            why = f"model v{version} reached {m.recall:.3f} < target {target:.3f} - {BAND}: retrained"
        else:
            why = "no model yet" if version == 0 else f"model v{version} not usable at {target:.3f}: retrained"
        seen = (int(arrays.header[hnsw.H_GENERATION]), int(arrays.header[hnsw.H_MUTATIONS]), len(queries), target)
        if stop is None and seen == self._failed:
            return Outcome(None, version, None, None, "withdrawn; static ef (nothing changed since the last try)")
        started = time.perf_counter()
        trained = train(arrays, queries, truth, ef_limit(static_ef, max_ef))
        train_ms = (time.perf_counter() - started) * 1000
        new = None if trained is None else hnsw.early_stop(trained.model, target)
        m = None if new is None else measure(arrays, new, queries, truth, target)
        if trained is None or m is None or m.recall < target - BAND:
            self._failed = seen
            if stop is None and version > 0 and self.reader.withdrawn():
                return Outcome(None, version, None, None, "withdrawn; static ef")
            version = self.writer.publish(WITHDRAWN)
            reached = "" if m is None else f" (the new model reached {m.recall:.3f})"
            return Outcome("withdrawn", version, m.recall if m else None, m.below if m else None,
                           f"{why}; no model meets {target:.3f}{reached}: searches use the static ef", train_ms)
        version = self.writer.publish(trained.model)
        return Outcome("trained", version, m.recall, m.below,
                       f"{why}; v{version} on {trained.queries} queries reaches {m.recall:.3f}", train_ms)

    def close(self) -> None:
        self.reader.close()
