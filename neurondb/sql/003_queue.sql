-- neuranq: enqueueing from SQL, the queue depth bound, per-tenant fairness.

-- A setting in force as published by the supervisor (neurondb.settings), or a fallback before any start.
CREATE FUNCTION neurondb.current_setting_int(setting_name text, fallback bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT setting::bigint FROM neurondb.neurondb_settings WHERE name = setting_name), fallback);
$$;

-- Bound the number of pending jobs (neurondb.neuranq_queue_depth). Checked once per statement after the
-- insert, so a statement that would overflow the queue fails as a whole and leaves every queued job as it
-- was. Concurrent inserters can overshoot by what they insert at the same instant: the bound is a guard
-- against runaway producers, not an exact quota.
CREATE FUNCTION neurondb.check_queue_depth() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    depth bigint := neurondb.current_setting_int('neurondb.neuranq_queue_depth', 10000);
    pending bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE status = 'pending') THEN
        RETURN NULL;
    END IF;
    SELECT count(*) INTO pending FROM neurondb.neurondb_job_queue WHERE status = 'pending';
    IF pending > depth THEN
        RAISE EXCEPTION 'neurondb job queue is full: % pending jobs exceed neurondb.neuranq_queue_depth = %',
            pending, depth
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'wait for the queue to drain, or raise neurondb.neuranq_queue_depth';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER neurondb_job_queue_depth AFTER INSERT ON neurondb.neurondb_job_queue
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION neurondb.check_queue_depth();

-- Distinct tenants with pending work, found by a loose index scan on this index (cheap even with a large
-- backlog), then each tenant's head of line: the claim takes round-robin across tenants.
CREATE INDEX neurondb_job_queue_tenant_runnable
    ON neurondb.neurondb_job_queue (tenant_id, priority DESC, run_at, job_id) WHERE status = 'pending';

-- Enqueue one job; returns its id. With a dedupe key, a duplicate of a job still pending or processing is
-- merged into it: no new row, the existing id is returned, its priority raised and run_at brought forward
-- to the duplicate's if those are more urgent (its payload is kept).
CREATE FUNCTION neurondb.enqueue(
    job_type text,
    payload jsonb DEFAULT '{}'::jsonb,
    tenant_id text DEFAULT 'default',
    priority smallint DEFAULT 0,
    run_at timestamptz DEFAULT now(),
    max_retries integer DEFAULT NULL,
    dedupe_key text DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    id bigint;
BEGIN
    INSERT INTO neurondb.neurondb_job_queue AS q
        (job_type, payload, tenant_id, priority, run_at, max_retries, dedupe_key)
    VALUES (enqueue.job_type, coalesce(enqueue.payload, '{}'::jsonb), coalesce(enqueue.tenant_id, 'default'),
            coalesce(enqueue.priority, 0), coalesce(enqueue.run_at, now()), enqueue.max_retries, enqueue.dedupe_key)
    ON CONFLICT (job_type, dedupe_key) WHERE dedupe_key IS NOT NULL AND status IN ('pending', 'processing')
    DO UPDATE SET priority = greatest(q.priority, EXCLUDED.priority),
                  run_at = CASE WHEN q.status = 'pending' THEN least(q.run_at, EXCLUDED.run_at) ELSE q.run_at END
    RETURNING q.job_id INTO id;
    RETURN id;
END $$;

-- Enqueue many jobs of one type in one statement (one NOTIFY); returns their ids in input order.
-- Each element of `payloads` is one job's payload.
CREATE FUNCTION neurondb.enqueue_batch(
    job_type text,
    payloads jsonb[],
    tenant_id text DEFAULT 'default',
    priority smallint DEFAULT 0,
    run_at timestamptz DEFAULT now(),
    max_retries integer DEFAULT NULL
) RETURNS SETOF bigint LANGUAGE sql AS $$
    INSERT INTO neurondb.neurondb_job_queue (job_type, payload, tenant_id, priority, run_at, max_retries)
    SELECT enqueue_batch.job_type, p, coalesce(enqueue_batch.tenant_id, 'default'), coalesce(enqueue_batch.priority, 0),
           coalesce(enqueue_batch.run_at, now()), enqueue_batch.max_retries
    FROM unnest(payloads) WITH ORDINALITY AS u(p, n)
    ORDER BY n
    RETURNING job_id;
$$;
