-- neuranmon's history of the headline figures (issue 13): what `neurondb report` draws without Prometheus.
--
-- One row per figure per sample: every neurondb.metrics_history_interval neuranmon inserts the queue depth
-- by status, jobs/s, search p50/p99, recall and ef per index, LLM attempts/s and errors/s (the metric
-- names are listed in neurondb/observability/history.py). `subject` says what the figure is of: '' for the
-- whole service, a status for queue_depth, an index name for the per-index figures. Rows older than
-- neurondb.metrics_history_retention are deleted in bounded batches.

CREATE TABLE neurondb.neurondb_metrics_history (
    sampled_at  timestamptz NOT NULL,
    metric      text NOT NULL,
    subject     text NOT NULL DEFAULT '',
    value       double precision NOT NULL
);
-- The report reads a time range of every metric; retention deletes the oldest rows first.
CREATE INDEX neurondb_metrics_history_time ON neurondb.neurondb_metrics_history (sampled_at);
CREATE INDEX neurondb_metrics_history_metric ON neurondb.neurondb_metrics_history (metric, sampled_at);
