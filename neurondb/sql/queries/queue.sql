-- Queries of the queue worker and of the queue API. Each starts with `-- name: NAME`.
-- Parameters are psycopg named placeholders.

-- name: claim
-- Claim up to %(batch)s runnable jobs in one round trip, fairly across tenants: the distinct tenants with
-- pending work come from a loose index scan, in an order shuffled per claim by %(salt)s; each gets an equal
-- share of the batch (its head of line by priority, then age), at most its rate-limit allowance
-- (%(capped)s / %(caps)s). SKIP LOCKED inside each tenant's scan lets concurrent claimers take the next
-- jobs instead of colliding on the same ones. Run on its own (autocommit), it commits asynchronously: the
-- set_config below is local to its transaction, and a transaction that claims anything has evaluated it
-- (`eligible` joins it). A claim lost in a server crash leaves its jobs pending; at-least-once holds.
WITH RECURSIVE async_commit AS (
    SELECT set_config('synchronous_commit', 'off', true)
),
tenants AS (
    (SELECT tenant_id FROM neurondb.neurondb_job_queue WHERE status = 'pending' ORDER BY tenant_id LIMIT 1)
    UNION ALL
    SELECT (SELECT q.tenant_id FROM neurondb.neurondb_job_queue q
             WHERE q.status = 'pending' AND q.tenant_id > t.tenant_id ORDER BY q.tenant_id LIMIT 1)
      FROM tenants t WHERE t.tenant_id IS NOT NULL
),
eligible AS (
    SELECT t.tenant_id, coalesce(c.cap, %(batch)s) AS cap
      FROM tenants t
     CROSS JOIN async_commit
      LEFT JOIN unnest(%(capped)s::text[], %(caps)s::int[]) AS c(tenant_id, cap) USING (tenant_id)
     WHERE t.tenant_id IS NOT NULL AND coalesce(c.cap, 1) > 0
     ORDER BY md5(t.tenant_id || %(salt)s)
     LIMIT %(batch)s
),
share AS (
    SELECT greatest(1, %(batch)s / greatest(count(*), 1))::int AS n FROM eligible
),
claimed AS (
    SELECT h.job_id
      FROM eligible e CROSS JOIN share s
     CROSS JOIN LATERAL (
        SELECT q.job_id FROM neurondb.neurondb_job_queue q
         WHERE q.status = 'pending' AND q.tenant_id = e.tenant_id AND q.run_at <= now()
         ORDER BY q.priority DESC, q.run_at, q.job_id
         LIMIT least(e.cap, s.n)
           FOR UPDATE SKIP LOCKED
     ) h
)
-- `= ANY(ARRAY(...))`, not a join with `claimed`: the planner cannot know the CTE yields at most a batch
-- and would hash-join it against a scan of the whole table (finished jobs included).
UPDATE neurondb.neurondb_job_queue q
   SET status = 'processing', lease_owner = %(owner)s, started_at = now(),
       lease_expires_at = now() + %(lease_ms)s * interval '1 millisecond'
 WHERE q.job_id = ANY(ARRAY(SELECT job_id FROM claimed))
-- The payload comes back as text, decoded row by row in the worker: one value the decoder refuses then
-- fails its own job instead of the whole fetch. The last column is the pickup latency (seconds since the job
-- could first run: created, scheduled or backed off until then), for the metrics.
RETURNING q.job_id, q.job_type, q.payload::text, q.tenant_id, q.retry_count, q.max_retries, q.error_message,
          extract(epoch FROM now() - q.run_at)::float8;

-- name: lock_owned
-- At completion: the jobs of the batch that are still ours (not cancelled, not re-claimed after a lease
-- expiry), locked so their side effects and their status change commit together.
SELECT job_id FROM neurondb.neurondb_job_queue
 WHERE job_id = ANY(%(ids)s) AND status = 'processing' AND lease_owner = %(owner)s
   FOR UPDATE;

-- name: complete
-- Also the whole recording step of a batch whose outcomes are all plain completions: the WHERE clause checks
-- the lease, and RETURNING says which jobs were still ours. %(done)s is one JSON array of [job_id, result]
-- pairs: one parameter the worker serialises with orjson, where a bigint[] and a jsonb[] cost psycopg
-- about 5 us per job to adapt element by element.
UPDATE neurondb.neurondb_job_queue q
   SET status = 'completed', result = v.result, completed_at = now(), lease_expires_at = NULL,
       error_message = NULL
  FROM (SELECT (e ->> 0)::bigint, e -> 1 FROM jsonb_array_elements(%(done)s::jsonb) AS e) AS v(job_id, result)
 WHERE q.job_id = v.job_id AND q.status = 'processing' AND q.lease_owner = %(owner)s
RETURNING q.job_id;

-- name: retry
-- A failed attempt with retries left: back to pending after its backoff, the attempt kept in history.
UPDATE neurondb.neurondb_job_queue q
   SET status = 'pending', retry_count = q.retry_count + 1, error_message = v.error,
       run_at = now() + v.delay_ms * interval '1 millisecond',
       lease_owner = NULL, lease_expires_at = NULL,
       attempts = q.attempts || jsonb_build_array(jsonb_build_object(
           'attempt', q.retry_count + 1, 'owner', q.lease_owner, 'started_at', q.started_at,
           'finished_at', now(), 'error', v.error))
  FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(delays_ms)s::float8[]) AS v(job_id, error, delay_ms)
 WHERE q.job_id = v.job_id AND q.status = 'processing' AND q.lease_owner = %(owner)s;

-- name: fail
-- A job that exhausted its retries, or can never succeed: status failed, and a dead-letter row carrying
-- its whole attempt history.
WITH failed AS (
    UPDATE neurondb.neurondb_job_queue q
       SET status = 'failed', error_message = v.error, completed_at = now(), lease_expires_at = NULL,
           attempts = q.attempts || jsonb_build_array(jsonb_build_object(
               'attempt', q.retry_count + 1, 'owner', q.lease_owner, 'started_at', q.started_at,
               'finished_at', now(), 'error', v.error))
      FROM unnest(%(ids)s::bigint[], %(errors)s::text[]) AS v(job_id, error)
     WHERE q.job_id = v.job_id AND q.status = 'processing' AND q.lease_owner = %(owner)s
    RETURNING q.job_id, q.job_type, q.payload, q.tenant_id, q.priority, q.retry_count, q.error_message,
              q.attempts, q.created_at
)
INSERT INTO neurondb.neurondb_dead_letter
       (job_id, job_type, payload, tenant_id, priority, retry_count, error_message, attempts, created_at)
SELECT job_id, job_type, payload, tenant_id, priority, retry_count, error_message, attempts, created_at
  FROM failed;

-- name: delete_finished
-- Retention: remove finished jobs older than %(retention_s)s seconds, a small batch at a time so the
-- queue never sees a long lock or a big burst of dead tuples.
DELETE FROM neurondb.neurondb_job_queue
 WHERE job_id IN (SELECT job_id FROM neurondb.neurondb_job_queue
                   WHERE status IN ('completed', 'failed', 'cancelled')
                     AND completed_at < now() - %(retention_s)s * interval '1 second'
                   ORDER BY completed_at LIMIT %(limit)s);

-- name: tenant_limits
SELECT tenant_id, rate_limit, burst FROM neurondb.neurondb_tenants
 WHERE rate_limit IS NOT NULL OR burst IS NOT NULL;

-- name: pending_tenants
-- Tenants with runnable work now, for the rate limiter's wake-up time.
SELECT DISTINCT tenant_id FROM neurondb.neurondb_job_queue
 WHERE status = 'pending' AND run_at <= now() AND tenant_id = ANY(%(tenants)s);

-- name: next_run_at
-- When the earliest not-yet-runnable pending job becomes runnable (retry backoff, scheduled jobs).
SELECT min(run_at) FROM neurondb.neurondb_job_queue WHERE status = 'pending' AND run_at > now();

-- name: enqueue
SELECT neurondb.enqueue(%(job_type)s, %(payload)s, %(tenant_id)s, %(priority)s::smallint,
                        coalesce(%(run_at)s::timestamptz, now()), %(max_retries)s, %(dedupe_key)s);

-- name: enqueue_batch
SELECT neurondb.enqueue_batch(%(job_type)s, %(payloads)s::jsonb[], %(tenant_id)s, %(priority)s::smallint,
                              coalesce(%(run_at)s::timestamptz, now()), %(max_retries)s);

-- name: job
SELECT job_id, job_type, payload, tenant_id, priority, status, run_at, retry_count, max_retries, dedupe_key,
       lease_owner, lease_expires_at, result, error_message, attempts, created_at, started_at, completed_at
  FROM neurondb.neurondb_job_queue WHERE job_id = %(job_id)s;

-- name: list_jobs
SELECT job_id, job_type, tenant_id, priority, status, retry_count, created_at, completed_at, error_message
  FROM neurondb.neurondb_job_queue
 WHERE (%(status)s::text IS NULL OR status = %(status)s)
   AND (%(job_type)s::text IS NULL OR job_type = %(job_type)s)
   AND (%(tenant_id)s::text IS NULL OR tenant_id = %(tenant_id)s)
 ORDER BY job_id DESC LIMIT %(limit)s;

-- name: cancel
-- A pending job ends cancelled at once; a running one too, and its worker's outcome is then dropped (the
-- worker only records outcomes of jobs still leased to it). Finished jobs are left as they are.
UPDATE neurondb.neurondb_job_queue
   SET status = 'cancelled', error_message = 'cancelled by ' || current_user, completed_at = now(),
       lease_expires_at = NULL, lease_owner = coalesce(lease_owner, 'cancelled')
 WHERE job_id = %(job_id)s AND status IN ('pending', 'processing')
RETURNING job_id;

-- name: retry_job
-- Run a failed or cancelled job again from scratch: its retries start over, its attempt history stays.
-- A failed job's dead letter is marked replayed by this same job: a later `dlq replay` must not run it a
-- second time, and if it fails again its new dead letter is then the only one.
WITH retried AS (
    UPDATE neurondb.neurondb_job_queue
       SET status = 'pending', retry_count = 0, run_at = now(), lease_owner = NULL, lease_expires_at = NULL,
           completed_at = NULL, started_at = NULL
     WHERE job_id = %(job_id)s AND status IN ('failed', 'cancelled')
    RETURNING job_id
),
replayed AS (
    UPDATE neurondb.neurondb_dead_letter d
       SET replayed_at = now(), replayed_job_id = r.job_id
      FROM retried r
     WHERE d.job_id = r.job_id AND d.replayed_at IS NULL
)
SELECT job_id FROM retried;

-- name: dlq_list
SELECT dlq_id, job_id, job_type, tenant_id, retry_count, error_message, failed_at, replayed_at, replayed_job_id
  FROM neurondb.neurondb_dead_letter
 WHERE (%(all)s OR replayed_at IS NULL)
   AND (%(job_type)s::text IS NULL OR job_type = %(job_type)s)
   AND (%(tenant_id)s::text IS NULL OR tenant_id = %(tenant_id)s)
 ORDER BY dlq_id DESC LIMIT %(limit)s;

-- name: dlq_replay
-- Re-enqueue dead letters as new jobs (same type, payload, tenant, priority) and mark them replayed.
WITH picked AS (
    SELECT dlq_id, job_type, payload, tenant_id, priority FROM neurondb.neurondb_dead_letter
     WHERE replayed_at IS NULL
       AND (%(job_type)s::text IS NULL OR job_type = %(job_type)s)
       AND (%(tenant_id)s::text IS NULL OR tenant_id = %(tenant_id)s)
       AND (%(ids)s::bigint[] IS NULL OR dlq_id = ANY(%(ids)s::bigint[]))
     ORDER BY dlq_id LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
),
enqueued AS (
    INSERT INTO neurondb.neurondb_job_queue (job_type, payload, tenant_id, priority)
    SELECT job_type, payload, tenant_id, priority FROM picked ORDER BY dlq_id
    RETURNING job_id, payload
),
paired AS (
    SELECT p.dlq_id, e.job_id
      FROM (SELECT dlq_id, row_number() OVER (ORDER BY dlq_id) AS n FROM picked) p
      JOIN (SELECT job_id, row_number() OVER (ORDER BY job_id) AS n FROM enqueued) e USING (n)
)
UPDATE neurondb.neurondb_dead_letter d
   SET replayed_at = now(), replayed_job_id = paired.job_id
  FROM paired WHERE d.dlq_id = paired.dlq_id
RETURNING d.dlq_id, d.replayed_job_id;

-- name: dead_letter
-- Jobs ended failed by a lease release (their worker died on their last attempt, or their lease expired):
-- their dead-letter rows, as the `fail` query writes them.
INSERT INTO neurondb.neurondb_dead_letter
       (job_id, job_type, payload, tenant_id, priority, retry_count, error_message, attempts, created_at)
SELECT job_id, job_type, payload, tenant_id, priority, retry_count, error_message, attempts, created_at
  FROM neurondb.neurondb_job_queue
 WHERE job_id = ANY(%(ids)s) AND status = 'failed';
