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

-- name: catalog
-- What the tuner needs of each index: its current ef (the truth, which the graph's header follows), its
-- mode and its own targets (NULL: the global settings).
SELECT index_name, ef_search, tuning, target_recall, target_latency_ms, hybrid_weight
  FROM neurondb.neurondb_indexes ORDER BY index_name;

-- name: set_ef
-- Compare-and-set: an operator's UPDATE (or pin) made since the tuner read the catalog wins.
UPDATE neurondb.neurondb_indexes SET ef_search = %(new)s
 WHERE index_name = %(index)s AND ef_search = %(old)s AND tuning = 'auto'
RETURNING index_name;

-- name: insert_history
INSERT INTO neurondb.neurondb_tuning_history
       (index_name, old_ef, new_ef, recall, recall_low, recall_high, p50_ms, p95_ms, p99_ms, predicted_p95_ms,
        old_hybrid_weight, new_hybrid_weight, ndcg_before, ndcg_after, queries, state, reason)
VALUES (%(index)s, %(old_ef)s, %(new_ef)s, %(recall)s, %(recall_low)s, %(recall_high)s, %(p50)s, %(p95)s,
        %(p99)s, %(predicted_p95)s, %(old_weight)s, %(new_weight)s, %(ndcg_before)s, %(ndcg_after)s,
        %(queries)s, %(state)s, %(reason)s);

-- name: upsert_state
INSERT INTO neurondb.neurondb_tuning_state AS s
       (index_name, state, reason, ef_search, recall, recall_low, measured_recall, p50_ms, p90_ms, p95_ms, p99_ms,
        predicted_p95_ms, queries, curve, ndcg, judged, weight_decision, evaluated_at)
SELECT %(index)s, %(state)s, %(reason)s, %(ef)s, %(recall)s, %(recall_low)s, %(measured_recall)s, %(p50)s,
       %(p90)s, %(p95)s, %(p99)s, %(predicted_p95)s, %(queries)s, %(curve)s, %(ndcg)s, %(judged)s,
       %(weight_decision)s, now()
 WHERE EXISTS (SELECT 1 FROM neurondb.neurondb_indexes WHERE index_name = %(index)s)
ON CONFLICT (index_name) DO UPDATE SET
       state = EXCLUDED.state, reason = EXCLUDED.reason, ef_search = EXCLUDED.ef_search, recall = EXCLUDED.recall,
       recall_low = EXCLUDED.recall_low, measured_recall = EXCLUDED.measured_recall, p50_ms = EXCLUDED.p50_ms,
       p90_ms = EXCLUDED.p90_ms, p95_ms = EXCLUDED.p95_ms, p99_ms = EXCLUDED.p99_ms,
       predicted_p95_ms = EXCLUDED.predicted_p95_ms, queries = EXCLUDED.queries, curve = EXCLUDED.curve,
       ndcg = EXCLUDED.ndcg, judged = EXCLUDED.judged, weight_decision = EXCLUDED.weight_decision,
       evaluated_at = now();

-- name: judged_hybrid_queries
-- The index's most recent hybrid searches that have feedback, each with its raw candidate lists and the
-- relevance of its judged documents (by vector row id; several judgements of one document: the highest).
SELECT q.k, q.vector_ids, q.vector_scores, q.text_ids, q.text_ranks,
       array_agg(j.id) AS judged_ids, array_agg(j.relevance) AS relevances
  FROM neurondb.neurondb_hybrid_queries q
  JOIN LATERAL (SELECT v.id, max(f.relevance) AS relevance
                  FROM neurondb.neurondb_feedback f
                  JOIN neurondb.neurondb_vectors v ON v.index_name = q.index_name AND v.doc_id = f.doc_id
                 WHERE f.query_id = q.query_id
                 GROUP BY v.id) j ON true
 WHERE q.index_name = %(index)s
 GROUP BY q.query_id
 ORDER BY q.recorded_at DESC
 LIMIT %(limit)s;

-- name: set_weight
-- Compare-and-set, like set_ef: an operator's change made meanwhile wins.
UPDATE neurondb.neurondb_indexes SET hybrid_weight = %(new)s
 WHERE index_name = %(index)s AND hybrid_weight = %(old)s AND tuning = 'auto'
RETURNING index_name;

-- name: delete_old_hybrid_queries
DELETE FROM neurondb.neurondb_hybrid_queries
 WHERE query_id IN (SELECT query_id FROM neurondb.neurondb_hybrid_queries
                     WHERE recorded_at < now() - %(retention_s)s * interval '1 second'
                     ORDER BY recorded_at LIMIT %(limit)s);

-- name: delete_old_feedback
DELETE FROM neurondb.neurondb_feedback
 WHERE feedback_id IN (SELECT feedback_id FROM neurondb.neurondb_feedback
                        WHERE recorded_at < now() - %(retention_s)s * interval '1 second'
                        ORDER BY recorded_at LIMIT %(limit)s);

-- name: record_rotation
INSERT INTO neurondb.neurondb_cache_rotation (cache_name, expired, evicted, entries, max_entries)
VALUES (%(cache)s, %(expired)s, %(evicted)s, %(entries)s, %(max_entries)s);

-- name: delete_old_rotations
DELETE FROM neurondb.neurondb_cache_rotation
 WHERE rotation_id IN (SELECT rotation_id FROM neurondb.neurondb_cache_rotation
                        WHERE rotated_at < now() - %(retention_s)s * interval '1 second'
                        ORDER BY rotated_at LIMIT %(limit)s);
