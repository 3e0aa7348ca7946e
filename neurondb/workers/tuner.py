"""neuranmon: the auto-tuner (the document's section 2).

Every search in any process leaves a sample in the shared-memory query ring. This worker drains the ring
into neurondb.neurondb_query_metrics (so the document's "current performance" query and
neurondb.query_performance show real searches), measuring recall@k for the samples that kept their query
vector: the hits the index returned against an exact search over the same graph's live vectors (of the
same tenant). It keeps, per index, a window of the last `neuranmon_sample_size` sampled queries and
latencies, and every `neuranmon_naptime` tunes each index's ef_search from them (neurondb/tuning.py says
how): the decision is written to `neurondb_indexes.ef_search` (the truth, kept across restarts), to the
graph's shared-memory header (which every process's next search reads), to
`neurondb_tuning_state` every cycle and to `neurondb_tuning_history` when something changed.

Every second it also makes each graph's header follow `neurondb_indexes.ef_search`, so an operator's
`UPDATE neurondb.neurondb_indexes SET ef_search = ...` (or `neurondb index tune --ef`) takes effect within
a second or two, and a graph loaded from an older snapshot gets the tuned value back.

The query-metrics table is bounded: samples older than `neurondb.query_metrics_retention` are deleted, a
batch at a time, soon after start and then every tenth of the retention (at most every minute). The
worker's own memory is bounded too: the ring is a fixed-size segment and the windows have a fixed length.
(Its RSS grows for the first minutes under load only because the ring's shared pages are touched for the
first time, up to the ring's size; `scripts/bench_tuner_memory.py` shows it level off.)

The Prometheus endpoint is served by a process of neuranmon's own (observability/process.py), which this
worker restarts when it dies and takes down when it exits.
"""

from __future__ import annotations

import dataclasses
import os
import time
from datetime import datetime, timezone

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from neurondb import caches, hybrid, recall, tuning
from neurondb.index import hnsw
from neurondb.index.store import SharedIndex
from neurondb.observability.history import HistorySampler
from neurondb.observability.process import MetricsProcess, Params
from neurondb.queries import query
from neurondb.settings import ReloadResult
from neurondb.shm.ring import QueryRing, Sample
from neurondb.workers.base import BatchResult, Worker

FLUSH_EVERY = 2.0
SYNC_EVERY = 1.0             # header ef_search follows the catalog at least this often
RETENTION_EVERY = 60.0       # at most; a short retention is enforced more often (a tenth of it, >= 1 s)
RETENTION_FIRST = 5.0        # the first sweep after start: a restarted service catches up at once
RETENTION_BATCH = 5000
# What neurondb.query_metrics_retention bounds: (query, what its rows are, for the log).
RETAINED = (("delete_old_metrics", "query samples"), ("delete_old_hybrid_queries", "hybrid candidate lists"),
            ("delete_old_feedback", "feedback rows"), ("delete_old_rotations", "cache rotation rows"))


class TunerWorker(Worker):
    kind = "neuranmon"

    def on_start(self) -> None:
        self.ring = QueryRing.attach(self.ctx.shared)
        self.indexes: dict[str, SharedIndex] = {}
        self.windows: dict[str, tuning.Window] = {}
        self.truth: dict[str, tuple[tuple[int, int], dict[int, np.ndarray]]] = {}   # per graph version
        self.states: dict[str, str] = {}
        self.keepers: dict[str, recall.Keeper] = {}
        self._cache_entries = -1
        self._next_retention = time.monotonic() + RETENTION_FIRST
        self._next_sync = 0.0
        self._next_tune = time.monotonic() + self.naptime
        self.history = HistorySampler(self.config, self.ctx.shared, self._beat)
        self.endpoint = MetricsProcess(self.ctx.shared)
        self.endpoint_params = self._endpoint_params()
        self.endpoint.ensure(self.endpoint_params)

    def idle_nap(self) -> float:
        return min(self.naptime, SYNC_EVERY, self.history.due_in())

    def run_batch(self) -> BatchResult:
        now = time.monotonic()
        if now >= self._next_retention:
            self._retention()
        self.endpoint.ensure(self.endpoint_params)
        flushed = self._flush_samples()
        if now >= self._next_sync:
            self._next_sync = now + SYNC_EVERY
            catalog = self._catalog()
            self._sync_headers(catalog)
            if now >= self._next_tune:
                self._next_tune = now + self.naptime
                self._tune(catalog)
                self._rotate_caches()
        self.history.tick(self.conn)       # last: the percentiles include this batch's samples
        return BatchResult(processed=flushed, more=flushed >= 1000)

    # -- samples --------------------------------------------------------------------------------------

    def _flush_samples(self) -> int:
        samples = self.ring.drain()
        if not samples:
            return 0
        size = self.config.get_int("neuranmon_sample_size")
        truths = self._sample_truths(samples)
        recalls: list[float | None] = []
        for s, truth in zip(samples, truths, strict=True):
            recall = None
            if truth is not None and truth.size:
                recall = np.intersect1d(truth, s.labels[: s.k]).size / truth.size
            recalls.append(recall)
            self.metrics.observe("neurondb_search_duration_seconds", s.index, s.query_type,
                                 seconds=s.latency_ms / 1000)
            window = self.windows.setdefault(s.index, tuning.Window(size=size))
            added = window.add(s.vector, s.k, s.tenant, s.latency_ms, s.ef, s.query_type, recall)
            if added is not None and truth is not None:
                self._remember(s.index, added.seq, truth)
        self.conn.execute(query("tuner", "insert_metrics"), {
            "index": [s.index for s in samples], "type": [s.query_type for s in samples],
            "k": [s.k for s in samples], "ef": [s.ef for s in samples],
            "latency": [s.latency_ms for s in samples], "recall": recalls,
            "weight": [s.hybrid_weight for s in samples], "tenant": [s.tenant for s in samples],
            "count": [s.result_count for s in samples],
            "at": [datetime.fromtimestamp(s.recorded_at, timezone.utc) for s in samples],
        })
        return len(samples)

    def _graph(self, name: str) -> hnsw.HnswArrays | None:
        idx = self.indexes.get(name)
        if idx is None:
            idx = self.indexes[name] = SharedIndex(self.ctx.shared, name)
        return idx.arrays()

    def _sample_truths(self, samples: list[Sample]) -> list[np.ndarray | None]:
        """The exact result of every sample that kept its vector, one batched brute force per index (per
        query it would copy the live vectors each time: 14 ms a query at 50k x 128 instead of 0.6 ms)."""
        out: list[np.ndarray | None] = [None] * len(samples)
        by_index: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            if s.vector is not None and s.labels is not None:
                by_index.setdefault(s.index, []).append(i)
        for name, idxs in by_index.items():
            arrays = self._graph(name)
            if arrays is None:
                continue
            ok = [i for i in idxs if samples[i].vector.size == arrays.dim]
            queries = [tuning.SampledQuery(samples[i].vector, samples[i].k, samples[i].tenant) for i in ok]
            for i, truth in zip(ok, tuning.exact_truth(arrays, queries), strict=True):
                out[i] = truth
        return out

    def _remember(self, name: str, seq: int, truth: np.ndarray) -> None:
        """Keep a sample's exact result for the tuning cycle, valid while the graph stays this version."""
        arrays = self._graph(name)
        if arrays is None:
            return
        version = self._version(arrays)
        cached_version, cache = self.truth.get(name, ((-1, -1), {}))
        if cached_version != version:
            cache = {}
        cache[seq] = truth
        self.truth[name] = (version, cache)

    @staticmethod
    def _version(arrays: hnsw.HnswArrays) -> tuple[int, int]:
        return int(arrays.header[hnsw.H_GENERATION]), int(arrays.header[hnsw.H_MUTATIONS])

    # -- ef_search ------------------------------------------------------------------------------------

    def _catalog(self) -> list[dict]:
        with self.conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            rows = cur.execute(query("tuner", "catalog")).fetchall()
        known = {r["index_name"] for r in rows}
        for name in [n for n in self.indexes if n not in known]:     # dropped: forget it
            self.indexes.pop(name).close()
            self.windows.pop(name, None)
            self.truth.pop(name, None)
            self.states.pop(name, None)
            self._forget_model(name)
        return rows

    def _sync_headers(self, catalog: list[dict]) -> None:
        """The graph's header follows the catalog: one aligned store, read by every search's next call. A
        store lost to a concurrent grow (the writer copying the old header) is repeated a second later."""
        for row in catalog:
            arrays = self._graph(row["index_name"])
            if arrays is not None and arrays.ef_search != row["ef_search"]:
                arrays.ef_search = row["ef_search"]

    def _targets(self, row: dict) -> tuning.Targets:
        recall = row["target_recall"] or self.config.get_float("neuranmon_target_recall")
        latency = row["target_latency_ms"] or self.config.get_float("neuranmon_target_latency")
        return tuning.Targets(recall=recall, latency_ms=latency,
                              priority=self.config.get_str("neuranmon_priority"))

    def _exact(self, name: str, arrays: hnsw.HnswArrays, window: tuning.Window) -> list[np.ndarray]:
        """Exact results of the window's queries, computed again only for queries new to this graph version."""
        version = self._version(arrays)
        cached_version, cache = self.truth.get(name, ((-1, -1), {}))
        if cached_version != version:
            cache = {}
        missing = [q for q in window.queries if q.seq not in cache]
        for q, t in zip(missing, tuning.exact_truth(arrays, missing), strict=True):
            cache[q.seq] = t
        keep = {q.seq for q in window.queries}
        cache = {seq: t for seq, t in cache.items() if seq in keep}
        self.truth[name] = (version, cache)
        return [cache[q.seq] for q in window.queries]

    def _tune(self, catalog: list[dict]) -> None:
        max_ef = self.config.get_int("hnsw_max_ef_search")
        size = self.config.get_int("neuranmon_sample_size")
        for row in catalog:
            name = row["index_name"]
            arrays = self._graph(name)
            window = self.windows.setdefault(name, tuning.Window(size=size))
            window.resize(size)
            if arrays is None or arrays.count == 0:
                continue
            self._beat()
            targets = self._targets(row)
            current = int(row["ef_search"])
            enough = len(window.queries) >= tuning.MIN_QUERIES
            truth = self._exact(name, arrays, window) if enough else []
            curve = tuning.Curve(arrays, list(window.queries), truth, targets.recall) if enough else None
            if row["tuning"] == "pinned":
                decision = tuning.Decision(
                    ef=current, state="pinned", reason="pinned by the operator",
                    point=curve.at(current) if curve else None,
                    p95_ms=tuning.predict_p95(curve, window.latencies, current) if curve else None)
            elif curve is None:
                decision = tuning.Decision(
                    ef=current, state="waiting",
                    reason=f"{len(window.queries)} of the {tuning.MIN_QUERIES} sampled queries a decision needs")
            else:
                decision = tuning.decide(curve, window, current, targets, max_ef)
            if decision.ef != current and not self._set_ef(name, arrays, current, decision.ef):
                continue     # the operator changed or pinned it meanwhile: their value is the new start
            self._record_decision(row, window, curve, decision, self._tune_weight(row, size))
            if enough:
                self._keep_model(name, arrays, list(window.queries), truth, targets.recall, decision.ef, max_ef)

    def _tune_weight(self, row: dict, limit: int) -> hybrid.WeightChoice | None:
        """The hybrid weight that best ranks the recent judged hybrid searches (neurondb/hybrid.py); applied
        unless the index is pinned or the operator changed the weight meanwhile. None: no judged search."""
        judged = [hybrid.JudgedQuery(k=r[0], vector_ids=r[1], vector_scores=np.array(r[2], np.float64),
                                     text_ids=r[3], text_ranks=np.array(r[4], np.float64),
                                     relevance=dict(zip(r[5], r[6], strict=True)))
                  for r in self.conn.execute(query("tuner", "judged_hybrid_queries"),
                                             {"index": row["index_name"], "limit": limit})]
        if not judged:
            return None
        current = float(row["hybrid_weight"])
        choice = hybrid.best_weight(judged, current)
        if row["tuning"] == "pinned" or choice.weight == current:
            return dataclasses.replace(choice, weight=current)
        if self.conn.execute(query("tuner", "set_weight"), {"index": row["index_name"], "old": current,
                                                            "new": choice.weight}).fetchone() is None:
            return dataclasses.replace(choice, weight=current, reason="weight changed by the operator meanwhile")
        return choice

    def _set_ef(self, name: str, arrays: hnsw.HnswArrays, old: int, new: int) -> bool:
        if self.conn.execute(query("tuner", "set_ef"), {"index": name, "old": old, "new": new}).fetchone() is None:
            self.log.info("index %s: ef_search changed by the operator meanwhile; not applying %d", name, new)
            return False
        arrays.ef_search = new
        return True

    def _record_decision(self, row: dict, window: tuning.Window, curve: tuning.Curve | None,
                         decision: tuning.Decision, weight: hybrid.WeightChoice | None = None) -> None:
        """The state row every cycle; a history row and a log line when the ef or the state changed."""
        name, old = row["index_name"], int(row["ef_search"])
        self.metrics.inc("neurondb_tuner_decisions", name, decision.state)
        lat = window.percentiles()
        point = decision.point
        recall = float(np.mean(window.recalls)) if window.recalls else None
        figures = {
            "index": name, "state": decision.state, "reason": decision.reason, "ef": decision.ef,
            "recall": point.recall if point else None, "recall_low": point.low if point else None,
            "measured_recall": recall, "p50": lat.get("p50"), "p90": lat.get("p90"), "p95": lat.get("p95"),
            "p99": lat.get("p99"), "predicted_p95": decision.p95_ms, "queries": len(window.queries),
            "curve": Jsonb([{"ef": p.ef, "recall": p.recall, "low": p.low, "high": p.high, "kernel_ms": p.kernel_ms}
                            for p in curve.measured()]) if curve else None,
            "ndcg": weight.after if weight else None, "judged": weight.judged if weight else None,
            "weight_decision": weight.reason if weight else None,
        }
        old_weight = float(row["hybrid_weight"])
        new_weight = weight.weight if weight else old_weight
        self.conn.execute(query("tuner", "upsert_state"), figures)
        if decision.ef == old and self.states.get(name) == decision.state and new_weight == old_weight:
            return
        self.states[name] = decision.state
        self.conn.execute(query("tuner", "insert_history"), {
            **figures, "old_ef": old, "new_ef": decision.ef, "recall_high": point.high if point else None,
            "old_weight": old_weight, "new_weight": new_weight, "ndcg_before": weight.before if weight else None,
            "ndcg_after": weight.after if weight else None,
            "reason": decision.reason if new_weight == old_weight else f"{decision.reason}; {weight.reason}"})
        if new_weight != old_weight:
            self.log.info("index %s: %s", name, weight.reason)
        recall_text = f"recall {point.recall:.3f} (lower bound {point.low:.3f})" if point else "no recall yet"
        p95 = f"p95 {lat['p95']:.2f} ms" if "p95" in lat else "no latency yet"
        change = f"ef_search {old} -> {decision.ef}" if decision.ef != old else f"ef_search stays {old}"
        self.log.info("index %s: %s [%s]: %s; %s, %s", name, change, decision.state, decision.reason, recall_text, p95)

    # -- declarative recall (neurondb/recall.py) -------------------------------------------------------

    def _keep_model(self, name: str, arrays: hnsw.HnswArrays, queries: list[tuning.SampledQuery],
                    truth: list[np.ndarray], target: float, ef: int, max_ef: int) -> None:
        """Measure the index's recall model on the window, retrain or withdraw it (recall.Keeper); its state
        every cycle, a history row and a log line when it changed."""
        keeper = self.keepers.get(name)
        if keeper is None:
            keeper = self.keepers[name] = recall.Keeper(self.ctx.shared, name)
        out = keeper.cycle(arrays, queries, truth, target, ef, max_ef)
        state = "serving" if keeper.reader.stop(target) is not None else "withdrawn" if out.version else "waiting"
        figures = {"index": name, "version": out.version, "state": state, "reason": out.reason,
                   "recall": out.recall, "below": out.below, "train_ms": out.train_ms}
        self.conn.execute(query("recall", "upsert_model"), figures)
        if out.event is None:
            return
        self.conn.execute(query("recall", "model_history"), {**figures, "ef": ef, "queries": len(queries),
                                                              "state": f"model {out.event}"})
        self.log.info("index %s: recall model %s (v%d, %.0f ms): %s", name, out.event, out.version,
                      out.train_ms or 0.0, out.reason)

    def _forget_model(self, name: str) -> None:
        keeper = self.keepers.pop(name, None)
        if keeper is not None:
            keeper.writer.unlink()
            keeper.close()

    # -- caches ---------------------------------------------------------------------------------------

    def _rotate_caches(self) -> None:
        """The LLM and query-embedding cache within its TTL and size (neurondb/caches.py); recorded in
        neurondb_cache_rotation (view neurondb.cache_status) when anything changed."""
        limit = self.config.get_int("llm_cache_max_entries")
        rotation = caches.rotate(self.conn, limit, lambda: bool(self.shutdown))
        if rotation.expired or rotation.evicted or rotation.entries != self._cache_entries:
            self.conn.execute(query("tuner", "record_rotation"), {
                "cache": "llm", "expired": rotation.expired, "evicted": rotation.evicted,
                "entries": rotation.entries, "max_entries": limit})
        if rotation.expired or rotation.evicted:
            self.log.info("LLM cache: %d expired and %d least recently used entries removed, %d left (bound %d)",
                          rotation.expired, rotation.evicted, rotation.entries, limit)
        self._cache_entries = rotation.entries

    # -- retention ------------------------------------------------------------------------------------

    def _retention(self) -> None:
        """Delete query samples older than neurondb.query_metrics_retention (0 keeps them)."""
        retention = self.config.get_seconds("query_metrics_retention")
        self._next_retention = time.monotonic() + min(RETENTION_EVERY, max(1.0, retention / 10))
        if retention <= 0:
            return
        for name, what in RETAINED:
            total = 0
            while not self.shutdown:
                n = self.conn.execute(query("tuner", name), {"retention_s": retention,
                                                             "limit": RETENTION_BATCH}).rowcount
                total += n
                self._beat()
                if n < RETENTION_BATCH:
                    break
            if total:
                self.log.info("retention: removed %d %s older than %.0f s", total, what, retention)

    def on_reload(self, result: ReloadResult) -> None:
        self.endpoint_params = self._endpoint_params()    # a change restarts the metrics process next batch

    def _endpoint_params(self) -> Params:
        return Params(f"{self.ctx.name}-metrics", os.getpid(), self.ctx.shared.prefix, self.ctx.slot, self.ctx.dsn,
                      self.config.get_str("metrics_listen_address"), self.config.get_int("metrics_port"),
                      self.config.get_seconds("worker_heartbeat_timeout"), str(self.ctx.datadir.log_file))

    def on_log_reopened(self) -> None:
        self.endpoint.reopen_log()

    def on_stop(self) -> None:
        self.endpoint.stop()
        for keeper in self.keepers.values():
            keeper.close()
        for idx in self.indexes.values():
            idx.close()
        self.ring.close()

