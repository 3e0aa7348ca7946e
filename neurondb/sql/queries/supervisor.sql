-- The supervisor's own statements (neurondb/supervisor.py): the settings requested from SQL, and the
-- mirror of its worker slots in neurondb.workers.

-- name: take_settings_requests
-- Every neurondb.alter_system() request since the last reload, removed as it is read (the caller's
-- transaction: a failure leaves them for the next reload).
DELETE FROM neurondb.neurondb_settings_requests RETURNING request_id, name, value;

-- name: upsert_worker_status
-- One worker's row of neurondb.workers (executemany, positional: worker, pid, state, started_at,
-- last_heartbeat, last_batch_at as epoch seconds, restarts, jobs_processed, jobs_failed, last_error, host).
INSERT INTO neurondb.neurondb_worker_status (worker, pid, state, started_at, last_heartbeat,
                                             last_batch_at, restarts, jobs_processed, jobs_failed, last_error,
                                             host, updated_at)
VALUES (%s, %s, %s, to_timestamp(%s), to_timestamp(%s), to_timestamp(%s), %s, %s, %s, %s, %s, now())
ON CONFLICT (worker) DO UPDATE
   SET pid = EXCLUDED.pid, state = EXCLUDED.state, started_at = EXCLUDED.started_at,
       last_heartbeat = EXCLUDED.last_heartbeat, last_batch_at = EXCLUDED.last_batch_at,
       restarts = EXCLUDED.restarts, jobs_processed = EXCLUDED.jobs_processed,
       jobs_failed = EXCLUDED.jobs_failed, last_error = EXCLUDED.last_error, host = EXCLUDED.host,
       updated_at = now();
