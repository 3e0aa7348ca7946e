"""neuranmon: the auto-tuner (the document's section 2).

Every search in any process leaves a sample in the shared-memory query ring. This worker drains the ring
into neurondb.neurondb_query_metrics (so the document's "current performance" query and
neurondb.query_performance show real searches), measuring recall@k for the samples that kept their query
vector: the hits the index returned against an exact search over the same graph's live vectors (of the
same tenant). The naptime paces the tuning cycle built on these metrics.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from neurondb.index import hnsw
from neurondb.index.store import SharedIndex, tenant_code
from neurondb.shm.ring import QueryRing, Sample
from neurondb.workers.base import BatchResult, Worker

FLUSH_EVERY = 2.0

INSERT_METRICS = """
INSERT INTO neurondb.neurondb_query_metrics
       (index_name, query_type, k, ef_search, latency_ms, recall, hybrid_weight, tenant_id, result_count,
        recorded_at)
SELECT * FROM unnest(%(index)s::text[], %(type)s::text[], %(k)s::int[], %(ef)s::int[], %(latency)s::float8[],
                     %(recall)s::float8[], %(weight)s::float8[], %(tenant)s::text[], %(count)s::int[],
                     %(at)s::timestamptz[])
"""


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

    def idle_nap(self) -> float:
        return min(self.naptime, FLUSH_EVERY)

    def run_batch(self) -> BatchResult:
        samples = self.ring.drain()
        if not samples:
            return BatchResult()
        recalls = [self._recall(s) if s.vector is not None else None for s in samples]
        self.conn.execute(INSERT_METRICS, {
            "index": [s.index for s in samples], "type": [s.query_type for s in samples],
            "k": [s.k for s in samples], "ef": [s.ef for s in samples],
            "latency": [s.latency_ms for s in samples], "recall": recalls,
            "weight": [s.hybrid_weight for s in samples], "tenant": [s.tenant for s in samples],
            "count": [s.result_count for s in samples],
            "at": [datetime.fromtimestamp(s.recorded_at, timezone.utc) for s in samples],
        })
        return BatchResult(processed=len(samples), more=len(samples) >= 1000)

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
