-- Database figures of the metrics endpoint (neurondb.observability.dbcache), refreshed off the scrape path.

-- name: queue_figures
-- Depths and the age of the oldest job that could run now. Pending comes from the O(1) counter; running
-- and the oldest pending job from the partial indexes on pending and processing jobs.
SELECT neurondb.pending_jobs() AS pending,
       (SELECT count(*) FROM neurondb.neurondb_job_queue WHERE status = 'processing') AS running,
       (SELECT count(*) FROM neurondb.neurondb_dead_letter) AS dead_letters,
       coalesce((SELECT extract(epoch FROM now() - min(run_at))::float8 FROM neurondb.neurondb_job_queue
                  WHERE status = 'pending' AND run_at <= now()), 0) AS oldest_pending_s;

-- name: index_figures
-- Per index: the tuner's measured recall and target, neurandefrag's fragmentation and the changes not yet in
-- the graph (tables the workers write; no count over neurondb_vectors).
SELECT i.index_name,
       t.recall,
       coalesce(i.target_recall, (SELECT setting::float8 FROM neurondb.neurondb_settings
                                   WHERE name = 'neurondb.neuranmon_target_recall')) AS target_recall,
       s.fragmentation AS fragmentation_ratio,
       s.pending_changes
  FROM neurondb.neurondb_indexes i
  LEFT JOIN neurondb.neurondb_tuning_state t USING (index_name)
  LEFT JOIN neurondb.neurondb_index_stats s USING (index_name)
 ORDER BY i.index_name;
