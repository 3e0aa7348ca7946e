"""The metrics neurondb exports, as data: one row per family, like PostgreSQL's GUC tables.

The collector (`collector.py`), the dashboard test and the docs all read this catalogue, so a metric exists
in exactly one place. Names follow the Prometheus conventions: the `neurondb_` prefix, `_total` for counters,
base units in the name (`_seconds`, `_bytes`), histograms for latencies, and only bounded label sets: worker
names, job types, providers, models, HTTP status codes, index names and tenants. No job ids, no doc ids.
Tenants are capped: the first `TENANT_LABELS` distinct tenants seen get their own label value, later ones
are counted under `tenant="other"`.

Where a value comes from decides how fresh it is:
- `shm`: counters and histograms the workers keep in shared memory (`neurondb.shm.series`), and the worker
  slots, tenant table and graph headers: read at each scrape, so they are exact and never wait;
- `db`: figures PostgreSQL holds (queue depths, measured recall, fragmentation), refreshed by a thread of
  neuranmon every `REFRESH_SECONDS` and served from that cache, so a scrape never waits on the database.
"""

from __future__ import annotations

from dataclasses import dataclass

TENANT_LABELS = 100          # distinct tenant label values before "other"
OTHER = "other"
# Where neuranmon publishes the port its endpoint bound (index into its slot's `gauges`; 0: not listening).
PORT_GAUGE = 7
REFRESH_SECONDS = 5.0        # the database figures' cache is at most this old (plus one query's time)



@dataclass(frozen=True)
class Family:
    name: str                   # without the _total suffix of a counter (prometheus_client adds it)
    kind: str                   # counter | gauge | histogram | info
    labels: tuple[str, ...]
    help: str
    source: str                 # shm | db


def _f(name: str, kind: str, labels: tuple[str, ...], help: str, source: str = "shm") -> Family:
    return Family(name, kind, labels, help, source)


W = ("worker", "kind")
FAMILIES: tuple[Family, ...] = (
    # -- the service
    _f("neurondb_build", "info", (), "Version of neurondb and of its Python."),
    _f("neurondb_up", "gauge", (), "1 when the supervisor is running (this endpoint is served by neuranmon)."),
    _f("neurondb_supervisor_start_time_seconds", "gauge", (), "When the supervisor started (Unix time)."),
    _f("neurondb_worker_up", "gauge", W, "1 when the worker process is starting, idle or running."),
    _f("neurondb_worker_state", "gauge", (*W, "state"), "1 for the worker's current state, 0 for the others."),
    _f("neurondb_worker_restarts", "counter", W, "Restarts of the worker by the supervisor."),
    _f("neurondb_worker_crashes", "counter", W, "Unexpected exits of the worker (signal or non-zero code)."),
    _f("neurondb_worker_heartbeat_age_seconds", "gauge", W, "Seconds since the worker's last heartbeat."),
    _f("neurondb_workers_fatal", "gauge", (), "Workers marked FATAL (too many crashes, not restarted)."),
    # -- neuranq
    _f("neurondb_queue_jobs", "counter", ("type", "tenant", "outcome"),
       "Queue job attempts by outcome: completed, failed (for good: dead letter), retried."),
    _f("neurondb_queue_job_duration_seconds", "histogram", ("type",), "Time a queue job's handler ran."),
    _f("neurondb_queue_pickup_latency_seconds", "histogram", ("type",),
       "From the time a job could run (created or scheduled) to the start of its attempt."),
    _f("neurondb_queue_rate_limited", "counter", ("tenant",), "Jobs put off by the tenant's rate limit."),
    _f("neurondb_queue_jobs_in_flight", "gauge", ("worker", "type"),
       "Async queue jobs whose handler runs now, per queue process and type."),
    _f("neurondb_queue_pending_jobs", "gauge", (), "Jobs waiting to run (the O(1) pending counter).", "db"),
    _f("neurondb_queue_running_jobs", "gauge", (), "Jobs being processed now.", "db"),
    _f("neurondb_queue_dead_letters", "gauge", (), "Dead letters not replayed yet (neurondb_dead_letter).", "db"),
    _f("neurondb_queue_oldest_pending_age_seconds", "gauge", (),
       "Age of the oldest job that could run now (0 when none).", "db"),
    # -- neuranllm
    _f("neurondb_llm_requests", "counter", ("provider", "model", "code"),
       "Provider calls by HTTP status code (ok / error for calls that have none)."),
    _f("neurondb_llm_tokens", "counter", ("provider", "model", "kind"), "Tokens by kind: prompt, completion."),
    _f("neurondb_llm_request_duration_seconds", "histogram", ("provider", "model"), "Provider call latency."),
    _f("neurondb_llm_cache_requests", "counter", ("result",), "LLM cache lookups: hit, miss."),
    _f("neurondb_llm_rate_limited", "counter", ("provider",), "429 answers from the provider."),
    _f("neurondb_llm_retry_after_seconds", "counter", ("provider",), "Seconds of Retry-After waits honoured."),
    _f("neurondb_llm_jobs", "counter", ("operation", "outcome"), "LLM job attempts by outcome."),
    _f("neurondb_llm_jobs_in_flight", "gauge", (), "LLM jobs whose call is under way."),
    # -- indexes
    _f("neurondb_index_vectors", "gauge", ("index",), "Live vectors in the shared-memory graph."),
    _f("neurondb_index_tombstones", "gauge", ("index",), "Deleted nodes not yet pruned."),
    _f("neurondb_index_memory_bytes", "gauge", ("index",), "Size of the graph's current segment."),
    _f("neurondb_index_ef_search", "gauge", ("index",), "The ef searches use when they give none."),
    _f("neurondb_index_freshness_lag_seconds", "gauge", ("index",),
       "Seconds since the writer last found the graph caught up with its table."),
    _f("neurondb_index_recall", "gauge", ("index",), "Recall@k the auto-tuner measured at the current ef.", "db"),
    _f("neurondb_index_target_recall", "gauge", ("index",), "The index's recall target.", "db"),
    _f("neurondb_index_fragmentation_ratio", "gauge", ("index",), "neurandefrag's fragmentation ratio.", "db"),
    _f("neurondb_index_pending_changes", "gauge", ("index",), "Table changes not yet in the graph.", "db"),
    _f("neurondb_search_duration_seconds", "histogram", ("index", "type"),
       "Search latency as the client saw it, from the query ring (searches in every process)."),
    _f("neurondb_search_samples_dropped", "counter", (), "Search samples the query ring had to drop."),
    # -- neuranmon and neurandefrag
    _f("neurondb_tuner_decisions", "counter", ("index", "state"), "Auto-tuner decisions by resulting state."),
    _f("neurondb_tuner_last_cycle_timestamp_seconds", "gauge", (), "When neuranmon last finished a cycle."),
    _f("neurondb_maintenance_operations", "counter", ("index", "operation", "status"),
       "Index maintenance operations: prune, cleanup, compaction, rebuild; completed, failed, interrupted."),
    _f("neurondb_maintenance_duration_seconds", "histogram", ("operation",), "Duration of index maintenance."),
    _f("neurondb_table_maintenance", "counter", ("table", "operation"), "VACUUM (ANALYZE) and ANALYZE runs."),
    # -- the endpoint itself
    _f("neurondb_metrics_series_dropped", "counter", (),
       "Updates lost because the shared series table was full (a fixed cap of shm.series.CAPACITY rows)."),
    _f("neurondb_metrics_refresh_age_seconds", "gauge", (), "Age of the cached database figures."),
    _f("neurondb_metrics_refresh_errors", "counter", (), "Failed refreshes of the database figures."),
)

BY_NAME = {f.name: f for f in FAMILIES}


def exported_names() -> set[str]:
    """Every sample name a scrape can contain (a counter's `_total`, a histogram's `_bucket/_sum/_count`,
    an info's `_info`): what dashboards and alert rules may refer to."""
    out: set[str] = set()
    for f in FAMILIES:
        if f.kind == "counter":
            out |= {f.name + "_total", f.name + "_created"}
        elif f.kind == "histogram":
            out |= {f.name + "_bucket", f.name + "_sum", f.name + "_count", f.name + "_created"}
        elif f.kind == "info":
            out.add(f.name + "_info")
        else:
            out.add(f.name)
    return out
