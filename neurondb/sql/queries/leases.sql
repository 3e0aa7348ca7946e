-- Leases of the two job tables (neurondb_job_queue, neurondb_llm_jobs): {table} is one of them.

-- name: release
-- Claimed jobs whose owner is gone come back: those of the process %(owner)s (the supervisor just reaped
-- it) or, when %(owner)s is NULL, every job whose lease expired (a machine lost with its supervisor).
-- A job in %(ran)s (NULL: any of them, the owner did not say) was running: that attempt counts, with the
-- error %(reason)s (NULL: the expired lease); past the job's limit (its max_retries, else %(max_retries)s)
-- it ends failed, else it is pending again after the retry backoff (equal jitter, as the queue's
-- retries). The others never started: pending again at once, no attempt counted. Returns each job with
-- its new status (the queue dead-letters the failed ones in the same transaction).
WITH gone AS (
    SELECT job_id, ran, ran AND retry_count + 1 > coalesce(max_retries, %(max_retries)s::int) AS last,
           coalesce(%(reason)s::text, 'lease expired: ' || lease_owner || ' stopped renewing it') AS error
      FROM (SELECT job_id, retry_count, max_retries, lease_owner,
                   %(ran)s::bigint[] IS NULL OR job_id = ANY(%(ran)s::bigint[]) AS ran
              FROM {table}
             WHERE status = 'processing'
               AND (lease_owner = %(owner)s::text OR (%(owner)s::text IS NULL AND lease_expires_at < now()))
               FOR UPDATE) AS held
)
UPDATE {table} t
   SET status = CASE WHEN g.last THEN 'failed' ELSE 'pending' END,
       lease_owner = CASE WHEN g.last THEN t.lease_owner END,
       lease_expires_at = NULL,
       started_at = CASE WHEN g.ran THEN t.started_at END,
       completed_at = CASE WHEN g.last THEN now() END,
       run_at = CASE WHEN g.ran AND NOT g.last
                     THEN now() + least(%(max_delay_ms)s::float8, %(delay_ms)s::float8 * 2 ^ t.retry_count) * (0.5 + random() / 2)
                                  * interval '1 millisecond'
                     ELSE t.run_at END,
       retry_count = t.retry_count + g.ran::int,
       error_message = CASE WHEN g.ran THEN g.error ELSE t.error_message END,
       attempts = CASE WHEN g.ran THEN t.attempts || jsonb_build_array(jsonb_build_object(
           'attempt', t.retry_count + 1, 'owner', t.lease_owner, 'started_at', t.started_at, 'finished_at', now(),
           'error', g.error)) ELSE t.attempts END
  FROM gone g
 WHERE t.job_id = g.job_id
RETURNING t.job_id, t.status;

-- name: hand_back_unheld
-- After a lost connection: jobs still leased to %(owner)s that it no longer holds (a claim whose answer
-- was lost, a batch it gave up) go back to pending at once, no attempt counted.
UPDATE {table}
   SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL, started_at = NULL
 WHERE status = 'processing' AND lease_owner = %(owner)s AND job_id <> ALL(%(held)s::bigint[]);

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

-- name: local_owners
-- Owners on this host (%(prefix)s: the host name, ":" and a LIKE wildcard) that still hold claimed jobs:
-- at start, the supervisor hands back those of processes that no longer exist (the workers of a
-- predecessor that was killed).
SELECT DISTINCT lease_owner FROM {table} WHERE status = 'processing' AND lease_owner LIKE %(prefix)s;
