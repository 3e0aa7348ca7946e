-- Queries of neuranmon's metrics history (neurondb/observability/history.py) and `neurondb report`.

-- name: sample
-- One sample of every headline figure in one statement: what PostgreSQL holds is read here, the rates
-- neuranmon computed from shared memory come in as arrays (%(metric)s, %(subject)s, %(value)s). Search
-- percentiles are over the samples recorded in the last %(window_s)s seconds (none: no row for that index).
-- Failed jobs are not counted here (that would scan up to neurondb.job_retention's finished jobs every
-- sample): they come in as a rate, jobs_failed_per_second.
INSERT INTO neurondb.neurondb_metrics_history (sampled_at, metric, subject, value)
SELECT now(), metric, subject, value FROM (
    SELECT 'queue_depth', 'pending', neurondb.pending_jobs()::float8
    UNION ALL
    SELECT 'queue_depth', 'processing', count(*)::float8
      FROM neurondb.neurondb_job_queue WHERE status = 'processing'
    UNION ALL
    SELECT 'queue_depth', 'dead_letter', count(*)::float8
      FROM neurondb.neurondb_dead_letter WHERE replayed_at IS NULL
    UNION ALL
    SELECT p.metric, q.index_name, p.value
      FROM (SELECT index_name, percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY latency_ms) AS pct
              FROM neurondb.neurondb_query_metrics
             WHERE recorded_at > now() - %(window_s)s * interval '1 second'
             GROUP BY index_name) q
     CROSS JOIN LATERAL (VALUES ('search_p50_ms', q.pct[1]), ('search_p99_ms', q.pct[2])) p (metric, value)
    UNION ALL
    SELECT f.metric, t.index_name, f.value
      FROM neurondb.tuning_status t
     CROSS JOIN LATERAL (VALUES ('recall', t.recall), ('ef_search', t.ef_search::float8)) f (metric, value)
    UNION ALL
    SELECT * FROM unnest(%(metric)s::text[], %(subject)s::text[], %(value)s::float8[])
) s (metric, subject, value)
WHERE value IS NOT NULL;

-- name: delete_old
-- Retention: rows older than %(retention_s)s seconds, oldest first, %(limit)s at a time (the sampled_at
-- index finds them; the table has no key, the rows are addressed by ctid).
DELETE FROM neurondb.neurondb_metrics_history
 WHERE ctid = ANY (ARRAY(SELECT ctid FROM neurondb.neurondb_metrics_history
                          WHERE sampled_at < now() - %(retention_s)s * interval '1 second'
                          ORDER BY sampled_at LIMIT %(limit)s));

-- name: series
-- The history since %(since_s)s seconds ago, for the report: every row, in time order per series.
SELECT metric, subject, sampled_at, value
  FROM neurondb.neurondb_metrics_history
 WHERE sampled_at > now() - %(since_s)s * interval '1 second'
 ORDER BY metric, subject, sampled_at;

-- name: curves
-- The tuner's latest recall-vs-ef and latency-vs-ef measurements per index (neurondb_tuning_state.curve:
-- [{ef, recall, low, high, kernel_ms}, ...]), one row per point.
SELECT s.index_name, (p ->> 'ef')::int AS ef, (p ->> 'recall')::float8 AS recall,
       (p ->> 'kernel_ms')::float8 AS kernel_ms
  FROM neurondb.neurondb_tuning_state s
 CROSS JOIN LATERAL jsonb_array_elements(s.curve) p
 WHERE jsonb_typeof(s.curve) = 'array'
 ORDER BY s.index_name, ef;
