-- The operator's view of the auto-tuner: `neurondb index tune` and the per-index rows of `neurondb status`.

-- name: tuning_of
-- One index's tuning state (neurondb.tuning_status), with what the view folds away: the ef_search the
-- catalog holds (the graph's header follows it within a second or two while the service runs; the view's
-- is the header as last published), the ef the last evaluation's recall was replayed at, and whether each
-- target is the index's own or the global setting.
SELECT s.*, i.ef_search AS catalog_ef_search, t.ef_search AS evaluated_ef_search,
       i.target_recall IS NOT NULL AS own_target_recall,
       i.target_latency_ms IS NOT NULL AS own_target_latency
  FROM neurondb.tuning_status s
  JOIN neurondb.neurondb_indexes i USING (index_name)
  LEFT JOIN neurondb.neurondb_tuning_state t USING (index_name)
 WHERE index_name = %(index)s;

-- name: tune
-- `neurondb index tune NAME --ef/--pin/--unpin/--target-*`: NULL leaves a column as it is; set_recall /
-- set_latency with a NULL value clear the index's own target (back to the global setting). Returns the
-- values before and after (the self-join on the locked row), no row for an unknown index.
UPDATE neurondb.neurondb_indexes i
   SET ef_search = coalesce(%(ef)s::integer, i.ef_search),
       tuning = coalesce(%(tuning)s::text, i.tuning),
       target_recall = CASE WHEN %(set_recall)s THEN %(recall)s::float8 ELSE i.target_recall END,
       target_latency_ms = CASE WHEN %(set_latency)s THEN %(latency_ms)s::float8 ELSE i.target_latency_ms END
  FROM (SELECT index_name, ef_search, tuning, target_recall, target_latency_ms
          FROM neurondb.neurondb_indexes WHERE index_name = %(index)s FOR UPDATE) old
 WHERE i.index_name = old.index_name
RETURNING old.ef_search AS old_ef_search, i.ef_search, old.tuning AS old_tuning, i.tuning,
          old.target_recall AS old_target_recall, i.target_recall,
          old.target_latency_ms AS old_target_latency_ms, i.target_latency_ms;

-- name: index_status
-- Per index for `neurondb status`: sizes and the writer's task (vector_stats), the tuner's view
-- (tuning_status: ef in effect, mode, state, recall, latency).
SELECT v.index_name AS name, v.vectors, v.graph_nodes, v.pending_changes, t.ef_search, v.task, v.task_progress,
       t.tuning, t.state AS tuning_state, t.target_recall, t.target_latency_ms, t.recall, t.recall_low,
       t.measured_recall, t.p95_ms, t.last_decision
  FROM neurondb.vector_stats v
  JOIN neurondb.tuning_status t USING (index_name)
 ORDER BY v.index_name;

-- name: cache_status
-- The LLM / query-embedding cache as neuranmon last rotated it (`neurondb status`).
SELECT cache_name, entries, max_entries, expired, evicted FROM neurondb.cache_status ORDER BY cache_name;
