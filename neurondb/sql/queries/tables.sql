-- PostgreSQL table maintenance by neurandefrag (neurondb/tablemaint.py): what is due, and the records of
-- what was done. A table is named schema-qualified ('neurondb.neurondb_vectors') in the records and in
-- the progress rows.

-- name: table_stats
-- The document's fragmentation query (section 3, Monitoring: the dead ratio from pg_stat_user_tables),
-- with the changes since the last analyze; one table (%(table)s, its relname) or, when NULL, every table
-- of the neurondb schema.
SELECT 'neurondb.' || relname AS target, relname, n_live_tup, n_dead_tup,
       coalesce(n_dead_tup::float8 / NULLIF(n_live_tup + n_dead_tup, 0), 0) AS dead_ratio,
       n_mod_since_analyze
  FROM pg_stat_user_tables
 WHERE schemaname = 'neurondb' AND (%(table)s::text IS NULL OR relname = %(table)s)
 ORDER BY dead_ratio DESC, relname;

-- name: ready_jobs
-- Jobs ready to run now in both queues, counted up to %(limit)s (a bounded scan of the partial indexes on
-- pending jobs, however long the backlog).
SELECT (SELECT count(*) FROM (SELECT 1 FROM neurondb.neurondb_job_queue
                               WHERE status = 'pending' AND run_at <= now() LIMIT %(limit)s) q)
     + (SELECT count(*) FROM (SELECT 1 FROM neurondb.neurondb_llm_jobs
                               WHERE status = 'pending' AND run_at <= now() LIMIT %(limit)s) l);

-- name: try_lock
-- One process at a time maintains the tables of a database (several installations may share it).
SELECT pg_try_advisory_lock(hashtext('neurondb.table_maintenance'));

-- name: unlock
SELECT pg_advisory_unlock(hashtext('neurondb.table_maintenance'));

-- name: take_over
-- Under the lock: what a killed predecessor left, its progress rows and the operations they belong to,
-- still 'running' (a record is started after its progress row and finished before it is deleted).
WITH gone AS (
    DELETE FROM neurondb.neurondb_maintenance_progress WHERE kind = 'table' RETURNING target, operation
)
UPDATE neurondb.neurondb_index_maintenance m
   SET status = 'interrupted', finished_at = now(),
       error_message = 'interrupted: the process running it stopped before it finished'
  FROM gone
 WHERE m.table_name = gone.target AND m.operation = gone.operation AND m.status = 'running';

-- name: set_lock_timeout
SELECT set_config('lock_timeout', %(timeout)s, false);

-- name: reset_lock_timeout
RESET lock_timeout;

-- name: start_operation
INSERT INTO neurondb.neurondb_index_maintenance (table_name, operation, status, details)
VALUES (%(table)s, %(operation)s, 'running', %(details)s)
RETURNING maintenance_id;

-- name: finish_operation
UPDATE neurondb.neurondb_index_maintenance
   SET status = %(status)s, finished_at = now(), duration_ms = %(duration_ms)s,
       dead_tuples_removed = %(dead_tuples_removed)s, details = details || %(details)s,
       error_message = %(error)s
 WHERE maintenance_id = %(id)s;

-- name: progress_start
-- A row of neurondb.maintenance_progress while the statement runs. The statement cannot update it (one
-- connection), so done/total stay 0/NULL; its pid is the backend running the statement, whose
-- pg_stat_progress_vacuum / pg_stat_progress_analyze row (same pid) shows the blocks scanned meanwhile.
INSERT INTO neurondb.neurondb_maintenance_progress (target, kind, operation, phase, pid)
VALUES (%(table)s, 'table', %(operation)s, %(phase)s, pg_backend_pid())
ON CONFLICT (kind, target, operation) DO UPDATE
   SET phase = EXCLUDED.phase, done = 0, total = NULL, pid = EXCLUDED.pid,
       started_at = now(), updated_at = now();

-- name: progress_end
DELETE FROM neurondb.neurondb_maintenance_progress
 WHERE kind = 'table' AND target = %(table)s AND operation = %(operation)s;

-- name: last_runs
-- The last operation of each kind on each table, whatever its outcome.
SELECT DISTINCT ON (table_name, operation)
       table_name, operation, status, started_at, finished_at, duration_ms, dead_tuples_removed,
       details, error_message
  FROM neurondb.neurondb_index_maintenance
 WHERE table_name IS NOT NULL
 ORDER BY table_name, operation, started_at DESC, maintenance_id DESC;
