"""neuranmon: the auto-tuner (the document's section 2).

Every search in any process leaves a sample in the shared-memory query ring. This worker drains the ring
into neurondb.neurondb_query_metrics (so the document's "current performance" query and
neurondb.query_performance show real searches), measuring recall@k for the samples that kept their query
vector: the hits the index returned against an exact search over the same graph's live vectors (of the
same tenant). The naptime paces the tuning cycle built on these metrics.

The table is bounded: samples older than `neurondb.query_metrics_retention` are deleted, a batch at a time,
soon after start and then every tenth of the retention (at most every minute). The worker's own memory is
bounded too: the ring is a fixed-size segment and samples are dropped once written. (Its RSS grows for the
first minutes under load only because the ring's shared pages are touched for the first time, up to the
ring's size; `scripts/bench_tuner_memory.py` shows it level off.)
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import numpy as np

from neurondb.index import hnsw
from neurondb.index.store import SharedIndex, tenant_code
from neurondb.queries import query
from neurondb.shm.ring import QueryRing, Sample
from neurondb.workers.base import BatchResult, Worker

FLUSH_EVERY = 2.0
RETENTION_EVERY = 60.0       # at most; a short retention is enforced more often (a tenth of it, >= 1 s)
RETENTION_FIRST = 5.0        # the first sweep after start: a restarted service catches up at once
RETENTION_BATCH = 5000


def exact_recall(arrays: hnsw.HnswArrays, s: Sample) -> float | None:
    """recall@k of the labels a search returned, against brute force over the live nodes it could return."""
    assert s.vector is not None and s.labels is not None
    n = arrays.count
    live = arrays.tombstones[:n] == 0
    if s.tenant is not None:
        live &= arrays.tenants[:n] == tenant_code(s.tenant)
    ids = np.flatnonzero(live)
    if ids.size == 0 or s.vector.size != arrays.dim:
        return None
    q = s.vector.astype(np.float32)
    vectors = arrays.vectors[ids]
    if arrays.metric == "l2":
        dist = ((vectors - q) ** 2).sum(axis=1)
    else:
        if arrays.metric == "cosine":
            q = q / (np.linalg.norm(q) or 1.0)
        dist = 1.0 - vectors @ q
    k = min(s.k, ids.size)
    truth = set(arrays.labels[ids[np.argpartition(dist, k - 1)[:k]]].tolist())
    return len(truth & set(s.labels[:k].tolist())) / k


class TunerWorker(Worker):
    kind = "neuranmon"

    def on_start(self) -> None:
        self.ring = QueryRing.attach(self.ctx.shared)
        self.indexes: dict[str, SharedIndex] = {}
        self._next_retention = time.monotonic() + RETENTION_FIRST

    def idle_nap(self) -> float:
        return min(self.naptime, FLUSH_EVERY)

    def run_batch(self) -> BatchResult:
        if time.monotonic() >= self._next_retention:
            self._retention()
        samples = self.ring.drain()
        if not samples:
            return BatchResult()
        recalls = [self._recall(s) if s.vector is not None else None for s in samples]
        self.conn.execute(query("tuner", "insert_metrics"), {
            "index": [s.index for s in samples], "type": [s.query_type for s in samples],
            "k": [s.k for s in samples], "ef": [s.ef for s in samples],
            "latency": [s.latency_ms for s in samples], "recall": recalls,
            "weight": [s.hybrid_weight for s in samples], "tenant": [s.tenant for s in samples],
            "count": [s.result_count for s in samples],
            "at": [datetime.fromtimestamp(s.recorded_at, timezone.utc) for s in samples],
        })
        return BatchResult(processed=len(samples), more=len(samples) >= 1000)

    def _retention(self) -> None:
        """Delete query samples older than neurondb.query_metrics_retention (0 keeps them)."""
        retention = float(self.config.get("neurondb.query_metrics_retention"))
        self._next_retention = time.monotonic() + min(RETENTION_EVERY, max(1.0, retention / 10))
        if retention <= 0:
            return
        total = 0
        while not self.shutdown:
            n = self.conn.execute(query("tuner", "delete_old_metrics"),
                                  {"retention_s": retention, "limit": RETENTION_BATCH}).rowcount
            total += n
            self._beat()
            if n < RETENTION_BATCH:
                break
        if total:
            self.log.info("retention: removed %d query samples older than %.0f s", total, retention)

    def _recall(self, s: Sample) -> float | None:
        idx = self.indexes.get(s.index)
        if idx is None:
            idx = self.indexes[s.index] = SharedIndex(self.ctx.shared, s.index)
        arrays = idx.arrays()
        return exact_recall(arrays, s) if arrays is not None else None

    def on_stop(self) -> None:
        for idx in self.indexes.values():
            idx.close()
        self.ring.close()
