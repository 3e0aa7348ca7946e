"""A ring of recent query samples in shared memory: searches in any process write, the auto-tuner drains.

Writers never block a search: they take the ring's lock with a zero timeout and, when it is busy or the
ring is full, drop the sample and count it (`dropped`). A fraction of samples also keep the query vector
and result labels (in a smaller pool of vector slots) so the tuner can measure recall against an exact
search. Layout: header [head, tail, dropped, kept_vectors], entries SAMPLE x capacity, vector slots
(float32 x max_dim and int64 x max_k each) with the sequence number of the entry that owns them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from neurondb.shm.control import SharedState
from neurondb.shm.names import object_name
from neurondb.shm.segment import Layout, Segment, pack

CAPACITY = 8192
VECTOR_SLOTS = 512
MAX_DIM = 4096
MAX_K = 256
QUERY_TYPES = ("vector", "text", "hybrid")
LOCK = "qring"

SAMPLE = np.dtype([
    ("seq", "<i8"),
    ("recorded_at", "<f8"),
    ("index", "S64"),
    ("tenant", "S64"),
    ("latency_ms", "<f8"),
    ("hybrid_weight", "<f8"),
    ("k", "<i4"),
    ("ef", "<i4"),
    ("result_count", "<i4"),
    ("query_type", "<i1"),
    ("vslot", "<i4"),                 # -1: no vector kept
], align=True)


@dataclass
class Sample:
    index: str
    query_type: str
    k: int
    ef: int
    latency_ms: float
    result_count: int
    tenant: str | None = None
    hybrid_weight: float | None = None
    recorded_at: float = 0.0
    vector: np.ndarray | None = None
    labels: np.ndarray | None = None


def _layout() -> tuple[Layout, int]:
    spec = [("header", np.dtype("<i8"), (8,)), ("entries", SAMPLE, (CAPACITY,)),
            ("owners", np.dtype("<i8"), (VECTOR_SLOTS,)), ("dims", np.dtype("<i4"), (VECTOR_SLOTS,)),
            ("nlabels", np.dtype("<i4"), (VECTOR_SLOTS,)),
            ("vectors", np.dtype("<f4"), (VECTOR_SLOTS, MAX_DIM)), ("labels", np.dtype("<i8"), (VECTOR_SLOTS, MAX_K))]
    return pack(spec)


class QueryRing:
    def __init__(self, shared: SharedState, segment: Segment) -> None:
        self.segment = segment
        spec, _ = _layout()
        v = {name: segment.ndarray(dt, shape, off) for name, (dt, shape, off) in spec.items()}
        self.header, self.entries, self.owners = v["header"], v["entries"], v["owners"]
        self.dims, self.nlabels, self.vectors, self.labels = v["dims"], v["nlabels"], v["vectors"], v["labels"]
        self.lock = shared.lock(LOCK)

    @staticmethod
    def name(shared: SharedState) -> str:
        return object_name(shared.prefix, "qring")

    @classmethod
    def create(cls, shared: SharedState) -> QueryRing:
        ring = cls(shared, Segment.create(cls.name(shared), _layout()[1]))
        ring.owners[:] = -1
        return ring

    @classmethod
    def attach(cls, shared: SharedState) -> QueryRing:
        return cls(shared, Segment.attach(cls.name(shared)))

    @property
    def dropped(self) -> int:
        return int(self.header[2])

    def record(self, s: Sample) -> bool:
        """Append a sample, keeping its vector and labels when given and a slot is free; never waits."""
        return self.record_many([s]) == 1

    def record_many(self, samples: list[Sample]) -> int:
        """Append samples under one take of the lock (a client buffers a few searches' samples: the lock
        costs more than writing one); never waits. Returns how many were kept; the rest count as dropped."""
        if not self.lock.acquire(timeout=0):
            self.header[2] += len(samples)   # racy without the lock, but only a counter of lost samples
            return 0
        try:
            head, tail = int(self.header[0]), int(self.header[1])
            kept = 0
            for s in samples:
                if head - tail >= CAPACITY:
                    self.header[2] += len(samples) - kept
                    break
                # One assignment of the whole record (in SAMPLE's field order): field by field cost 10 us.
                self.entries[head % CAPACITY] = (
                    head, s.recorded_at or time.time(), s.index.encode()[:64], (s.tenant or "").encode()[:64],
                    s.latency_ms, np.nan if s.hybrid_weight is None else s.hybrid_weight, s.k, s.ef,
                    s.result_count, QUERY_TYPES.index(s.query_type), self._keep_vector(head, tail, s))
                head += 1
                kept += 1
            self.header[0] = head
            return kept
        finally:
            self.lock.release()

    def _keep_vector(self, seq: int, tail: int, s: Sample) -> int:
        if s.vector is None or s.labels is None or s.vector.size > MAX_DIM or s.labels.size > MAX_K:
            return -1
        slot = seq % VECTOR_SLOTS
        if self.owners[slot] >= tail:        # still owned by an undrained sample
            return -1
        self.vectors[slot, : s.vector.size] = s.vector
        self.labels[slot, : s.labels.size] = s.labels
        self.dims[slot], self.nlabels[slot] = s.vector.size, s.labels.size
        self.owners[slot] = seq
        self.header[3] += 1
        return slot

    def drain(self, limit: int = CAPACITY) -> list[Sample]:
        """Take up to `limit` samples, oldest first (the tuner; waits for the lock briefly)."""
        if not self.lock.acquire(timeout=1.0):
            return []
        try:
            head, tail = int(self.header[0]), int(self.header[1])
            out = []
            for seq in range(tail, min(head, tail + limit)):
                e = self.entries[seq % CAPACITY]
                slot = int(e["vslot"])
                keep = slot >= 0 and int(self.owners[slot]) == seq
                hw = float(e["hybrid_weight"])
                out.append(Sample(
                    index=e["index"].decode(), query_type=QUERY_TYPES[int(e["query_type"])], k=int(e["k"]),
                    ef=int(e["ef"]), latency_ms=float(e["latency_ms"]), result_count=int(e["result_count"]),
                    tenant=e["tenant"].decode() or None, hybrid_weight=None if np.isnan(hw) else hw,
                    recorded_at=float(e["recorded_at"]),
                    vector=self.vectors[slot, : self.dims[slot]].copy() if keep else None,
                    labels=self.labels[slot, : self.nlabels[slot]].copy() if keep else None,
                ))
            self.header[1] = tail + len(out)
            return out
        finally:
            self.lock.release()

    def close(self) -> None:
        self.segment.close()
