-- Queries of neuranmon (the auto-tuner).

-- name: insert_metrics
-- The samples drained from the shared-memory query ring, one row each.
INSERT INTO neurondb.neurondb_query_metrics
       (index_name, query_type, k, ef_search, latency_ms, recall, hybrid_weight, tenant_id, result_count,
        recorded_at)
SELECT * FROM unnest(%(index)s::text[], %(type)s::text[], %(k)s::int[], %(ef)s::int[], %(latency)s::float8[],
                     %(recall)s::float8[], %(weight)s::float8[], %(tenant)s::text[], %(count)s::int[],
                     %(at)s::timestamptz[]);

-- name: delete_old_metrics
-- Retention: samples older than %(retention_s)s seconds, oldest first, %(limit)s at a time (the recorded_at
-- index finds them without a scan; small batches keep locks and dead-tuple bursts short).
DELETE FROM neurondb.neurondb_query_metrics
 WHERE metric_id IN (SELECT metric_id FROM neurondb.neurondb_query_metrics
                      WHERE recorded_at < now() - %(retention_s)s * interval '1 second'
                      ORDER BY recorded_at LIMIT %(limit)s);
