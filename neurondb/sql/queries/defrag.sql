-- neurandefrag's graph maintenance (neurondb/index/maintenance.py).

-- name: record_operation
-- One finished (or failed, or abandoned) maintenance operation on an index graph, with its figures.
INSERT INTO neurondb.neurondb_index_maintenance
       (index_name, operation, status, started_at, finished_at, duration_ms, nodes_before, nodes_after,
        edges_before, edges_after, tombstones_removed, fragmentation, details, error_message)
VALUES (%(index)s, %(operation)s, %(status)s, to_timestamp(%(started)s), now(),
        1000 * (extract(epoch FROM now()) - %(started)s), %(nodes_before)s, %(nodes_after)s, %(edges_before)s,
        %(edges_after)s, %(removed)s, %(fragmentation)s, %(details)s, %(error)s)
RETURNING maintenance_id;

-- name: start_operation
-- A long operation (compaction, rebuild) is recorded when it starts, so a writer killed during it leaves a
-- 'running' row that the next writer marks interrupted.
INSERT INTO neurondb.neurondb_index_maintenance
       (index_name, operation, status, nodes_before, edges_before, fragmentation, details)
VALUES (%(index)s, %(operation)s, 'running', %(nodes_before)s, %(edges_before)s, %(fragmentation)s, %(details)s)
RETURNING maintenance_id;

-- name: end_operation
UPDATE neurondb.neurondb_index_maintenance
   SET status = %(status)s, finished_at = now(), duration_ms = 1000 * extract(epoch FROM now() - started_at),
       nodes_after = %(nodes_after)s, edges_after = %(edges_after)s, tombstones_removed = %(removed)s,
       details = details || %(details)s, error_message = %(error)s
 WHERE maintenance_id = %(id)s;

-- name: interrupted
-- Operations a killed writer of this installation left running (its pid is in details): redone by the
-- next cycle, which finds the graph as fragmented as before.
UPDATE neurondb.neurondb_index_maintenance
   SET status = 'interrupted', finished_at = now(),
       error_message = 'the writer process stopped before the operation finished; the next cycle redoes it'
 WHERE status = 'running' AND index_name IS NOT NULL AND details ->> 'host' = %(host)s
       AND (details ->> 'pid')::int <> %(pid)s
RETURNING index_name, operation;

-- name: progress
INSERT INTO neurondb.neurondb_maintenance_progress AS p
       (target, kind, operation, phase, done, total, pid)
VALUES (%(target)s, 'index', %(operation)s, %(phase)s, %(done)s, %(total)s, pg_backend_pid())
ON CONFLICT (kind, target, operation) DO UPDATE SET
       phase = EXCLUDED.phase, done = EXCLUDED.done, total = EXCLUDED.total, pid = EXCLUDED.pid,
       updated_at = now(),
       started_at = CASE WHEN p.pid = EXCLUDED.pid THEN p.started_at ELSE now() END;

-- name: progress_end
DELETE FROM neurondb.neurondb_maintenance_progress
 WHERE kind = 'index' AND target = %(target)s AND operation = %(operation)s;

-- name: progress_orphans
-- Progress rows of backends that are gone (a killed writer's).
DELETE FROM neurondb.neurondb_maintenance_progress p
 WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = p.pid);

-- name: request
SELECT maintenance_request, maintenance_now FROM neurondb.neurondb_indexes WHERE index_name = %(index)s;

-- name: clear_request
UPDATE neurondb.neurondb_indexes
   SET maintenance_request = NULL, maintenance_now = false, maintenance_requested_at = NULL
 WHERE index_name = %(index)s AND maintenance_request = %(operation)s;

-- name: tuner_unattainable
-- Whether neuranmon finds the recall target out of reach at the maximum ef (not a latency miss).
SELECT EXISTS (SELECT 1 FROM neurondb.neurondb_tuning_state
                WHERE index_name = %(index)s AND state = 'unattainable' AND reason LIKE 'SLO unattainable: recall%%'
                      AND reason LIKE '%%not reached at the maximum ef%%');

-- name: last_rebuild
SELECT extract(epoch FROM last_rebuild) FROM neurondb.neurondb_index_stats WHERE index_name = %(index)s;

-- name: finished
-- When a compaction or rebuild published its graph, for vector_stats.
UPDATE neurondb.neurondb_index_stats
   SET last_compaction = CASE WHEN %(operation)s = 'compaction' THEN now() ELSE last_compaction END,
       last_rebuild = CASE WHEN %(operation)s = 'rebuild' THEN now() ELSE last_rebuild END
 WHERE index_name = %(index)s;

-- name: ask
-- `neurondb index rebuild|compact`: ask neurandefrag (woken by the NOTIFY) for an operation on an index.
WITH asked AS (
    UPDATE neurondb.neurondb_indexes
       SET maintenance_request = %(operation)s, maintenance_now = %(now)s, maintenance_requested_at = now()
     WHERE index_name = %(index)s
    RETURNING index_name)
SELECT (SELECT count(*) FROM asked) AS asked,
       (SELECT coalesce(max(maintenance_id), 0) FROM neurondb.neurondb_index_maintenance) AS last_id,
       pg_notify('neurondb_vectors', %(index)s);

-- name: outcome
-- The operation the worker ran for a request (the first of its kind on the index after `last_id`).
SELECT status, error_message, nodes_after, duration_ms, details
  FROM neurondb.neurondb_index_maintenance
 WHERE index_name = %(index)s AND operation = %(operation)s AND maintenance_id > %(last_id)s
 ORDER BY maintenance_id LIMIT 1;

-- name: progress_of
SELECT phase, done, total FROM neurondb.maintenance_progress
 WHERE kind = 'index' AND target = %(index)s AND operation = %(operation)s;

-- name: progress_all
SELECT kind, target, operation, phase, done, total, extract(epoch FROM elapsed)::float8 AS elapsed_s
  FROM neurondb.maintenance_progress;
