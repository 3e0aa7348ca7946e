"""The Prometheus collector: shared memory read at each scrape, database figures from the cache.

A custom collector (prometheus_client's `Collector` protocol) rather than metric objects updated in this
process: the figures belong to other processes, in the worker slots, the series table, the tenant table and
the graph headers, and a scrape turns them into families without taking a lock or querying PostgreSQL. Each
`collect()` yields every family of `families.FAMILIES` (empty when it has no sample yet), so the set of
names a dashboard may use is always the same.
"""

from __future__ import annotations

import platform
import time
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from neurondb import __version__
from neurondb.index import hnsw
from neurondb.index.store import SharedIndex
from neurondb.observability.dbcache import DbCache
from neurondb.observability.families import FAMILIES, OTHER, Family
from neurondb.shm.control import WORKER_STATES, SharedState, get_text, state_name
from neurondb.shm.ring import QueryRing
from neurondb.shm.series import BUCKETS, SeriesTable

_ALIVE = ("starting", "idle", "running")
_LE = (*(f"{b:g}" for b in BUCKETS), "+Inf")


class Collector:
    def __init__(self, shared: SharedState, series: SeriesTable, ring: QueryRing, cache: DbCache) -> None:
        self.shared, self.series, self.ring, self.cache = shared, series, ring, cache
        self._graphs: dict[str, SharedIndex] = {}

    def close(self) -> None:
        for graph in self._graphs.values():
            graph.close()
        self._graphs = {}

    def collect(self) -> Iterator[Metric]:
        out = {f.name: _family(f) for f in FAMILIES}
        now = time.time()
        self._service(out, now)
        self._series(out)
        self._tenants(out)
        self._queue(out)
        self._indexes(out, now)
        out["neurondb_search_samples_dropped"].add_metric([], self.ring.dropped)
        out["neurondb_metrics_series_dropped"].add_metric([], self.series.dropped)
        age = self.cache.age()
        if age is not None:
            out["neurondb_metrics_refresh_age_seconds"].add_metric([], age)
        out["neurondb_metrics_refresh_errors"].add_metric([], self.cache.errors)
        yield from out.values()

    # -- the supervisor and the workers: slots and control block --------------------------------------

    def _service(self, out: dict[str, Metric], now: float) -> None:
        control = self.shared.control
        out["neurondb_build"].add_metric([], {"version": __version__, "python": platform.python_version()})
        out["neurondb_up"].add_metric([], 1)
        out["neurondb_supervisor_start_time_seconds"].add_metric([], float(control["supervisor_started_at"]))
        fatal, last_cycle = 0, 0.0
        for i in range(self.shared.n_slots):
            slot = self.shared.slot(i)
            name, kind = get_text(slot, "name"), get_text(slot, "kind")
            state = state_name(int(slot["state"]))
            fatal += state == "fatal"
            out["neurondb_worker_up"].add_metric([name, kind], float(state in _ALIVE))
            for s in WORKER_STATES[1:]:
                out["neurondb_worker_state"].add_metric([name, kind, s], float(s == state))
            out["neurondb_worker_restarts"].add_metric([name, kind], int(slot["restarts"]))
            beat = float(slot["heartbeat"])
            if beat and state in _ALIVE:
                out["neurondb_worker_heartbeat_age_seconds"].add_metric([name, kind], max(0.0, now - beat))
            if kind == "neuranmon":
                last_cycle = max(last_cycle, float(slot["last_batch_at"]))
            if kind == "neuranllm" and state in _ALIVE:
                out["neurondb_llm_jobs_in_flight"].add_metric([], float(slot["gauges"][0]))
        out["neurondb_workers_fatal"].add_metric([], fatal)
        if last_cycle:
            out["neurondb_tuner_last_cycle_timestamp_seconds"].add_metric([], last_cycle)

    # -- what the workers counted: the series table, summed over writers ------------------------------

    def _series(self, out: dict[str, Metric]) -> None:
        values: defaultdict[tuple[str, tuple[str, ...]], float] = defaultdict(float)
        hists: dict[tuple[str, tuple[str, ...]], list] = {}
        for row in self.series.rows():
            metric = out.get(row.family)
            if metric is None:
                continue                   # a family a newer writer knows and this code does not
            key = (row.family, row.labels)
            if metric.type == "histogram":
                acc = hists.setdefault(key, [[0] * len(row.buckets), 0.0])
                acc[0] = [a + b for a, b in zip(acc[0], row.buckets, strict=True)]
                acc[1] += row.total
            else:
                values[key] += row.value
        for (family, labels), value in values.items():
            out[family].add_metric(list(labels), value)
        for (family, labels), (counts, total) in hists.items():
            running, buckets = 0, []
            for le, n in zip(_LE, counts, strict=True):
                running += n
                buckets.append((le, running))
            out[family].add_metric(list(labels), buckets, total)

    def _tenants(self, out: dict[str, Metric]) -> None:
        """Rate-limit refusals per tenant from the tenant table, under the label values the workers use (a
        tenant without one of its own counts as "other")."""
        labelled = self.series.labelled_tenants()
        limited: defaultdict[str, int] = defaultdict(int)
        for t in self.shared.tenants[self.shared.tenants["ready"] == 1]:
            name = t["tenant"].decode(errors="replace")
            limited[name if name in labelled else OTHER] += int(t["rate_limited"])
        for tenant, n in limited.items():
            out["neurondb_queue_rate_limited"].add_metric([tenant], n)

    # -- from the database cache, and the graphs ------------------------------------------------------

    def _queue(self, out: dict[str, Metric]) -> None:
        q = self.cache.figures.queue
        for family, key in (("neurondb_queue_pending_jobs", "pending"), ("neurondb_queue_running_jobs", "running"),
                            ("neurondb_queue_dead_letters", "dead_letters"),
                            ("neurondb_queue_oldest_pending_age_seconds", "oldest_pending_s")):
            if key in q:
                out[family].add_metric([], q[key])

    def _indexes(self, out: dict[str, Metric], now: float) -> None:
        names = set()
        for row in self.cache.figures.indexes:
            name = row["index_name"]
            names.add(name)
            for family, key in (("neurondb_index_recall", "recall"), ("neurondb_index_target_recall", "target_recall"),
                                ("neurondb_index_fragmentation_ratio", "fragmentation_ratio"),
                                ("neurondb_index_pending_changes", "pending_changes")):
                if row.get(key) is not None:
                    out[family].add_metric([name], float(row[key]))
            arrays = self._graph(name)
            if arrays is None:
                continue
            h = arrays.header
            out["neurondb_index_vectors"].add_metric([name], int(h[hnsw.H_COUNT] - h[hnsw.H_DELETED] - h[hnsw.H_FREE]))
            out["neurondb_index_tombstones"].add_metric([name], int(h[hnsw.H_DELETED]))
            out["neurondb_index_memory_bytes"].add_metric([name], arrays.nbytes)
            out["neurondb_index_ef_search"].add_metric([name], int(h[hnsw.H_EF_SEARCH]))
            synced = int(h[hnsw.H_SYNCED_MS])
            if synced:
                out["neurondb_index_freshness_lag_seconds"].add_metric([name], max(0.0, now - synced / 1000))
        for gone in set(self._graphs) - names:           # dropped indexes
            self._graphs.pop(gone).close()

    def _graph(self, name: str) -> hnsw.HnswArrays | None:
        graph = self._graphs.get(name)
        if graph is None:
            graph = self._graphs[name] = SharedIndex(self.shared, name)
        return graph.arrays()


def _family(f: Family) -> Metric:
    help_text = f.help
    labels = list(f.labels)
    if f.kind == "counter":
        return CounterMetricFamily(f.name, help_text, labels=labels)
    if f.kind == "histogram":
        return HistogramMetricFamily(f.name, help_text, labels=labels, unit="")
    if f.kind == "info":
        return InfoMetricFamily(f.name, help_text, labels=labels)
    return GaugeMetricFamily(f.name, help_text, labels=labels)
