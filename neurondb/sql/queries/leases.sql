-- Leases of the two job tables (neurondb_job_queue, neurondb_llm_jobs): {table} is one of them.

-- name: recover_expired
-- Jobs whose lease expired belong to a process that is gone (a machine lost with its supervisor): back to
-- pending; the lost run counts as an attempt, so a job that kills its worker every time ends failed.
UPDATE {table}
   SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL, run_at = now(),
       retry_count = retry_count + 1,
       attempts = attempts || jsonb_build_array(jsonb_build_object(
           'attempt', retry_count + 1, 'owner', lease_owner, 'started_at', started_at, 'finished_at', now(),
           'error', 'lease expired: ' || lease_owner || ' stopped renewing it'))
 WHERE status = 'processing' AND lease_expires_at < now();

-- name: hand_back_owner
-- The supervisor saw the process %(owner)s die: its claimed jobs return at once, each run counted.
UPDATE {table}
   SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL, run_at = now(),
       retry_count = retry_count + 1,
       attempts = attempts || jsonb_build_array(jsonb_build_object(
           'attempt', retry_count + 1, 'owner', lease_owner, 'started_at', started_at, 'finished_at', now(),
           'error', %(reason)s::text))
 WHERE status = 'processing' AND lease_owner = %(owner)s;

-- name: hand_back
-- Claimed jobs that never ran (fast shutdown, a rate limit overshot, a tenant over its share): pending
-- again, no attempt counted, not before %(delay_ms)s ms from now. Only jobs still leased to %(owner)s.
UPDATE {table}
   SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL, started_at = NULL,
       run_at = greatest(run_at, now() + %(delay_ms)s * interval '1 millisecond')
 WHERE job_id = ANY(%(ids)s) AND status = 'processing' AND lease_owner = %(owner)s;

-- name: extend_leases
-- The jobs %(owner)s still holds stay its own for another %(lease_ms)s ms.
UPDATE {table}
   SET lease_expires_at = now() + %(lease_ms)s * interval '1 millisecond'
 WHERE job_id = ANY(%(ids)s) AND status = 'processing' AND lease_owner = %(owner)s;
