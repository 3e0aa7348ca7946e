-- Queries of the LLM worker (neuranllm) and of the LLM API (neurondb/llm.py). Each starts with `-- name: NAME`.
-- Parameters are psycopg named placeholders.

-- name: claim
-- Claim up to %(batch)s runnable jobs in one round trip: priority, then age. SKIP LOCKED lets another
-- claimer (a second machine) take the next jobs instead of waiting on these. Tenants in %(throttled)s are
-- over their share of the rate limits with jobs already waiting in the worker: others' jobs go first.
WITH claimed AS (
    SELECT job_id FROM neurondb.neurondb_llm_jobs
     WHERE status = 'pending' AND run_at <= now() AND tenant_id <> ALL(%(throttled)s::text[])
     ORDER BY priority DESC, run_at, job_id
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED
)
UPDATE neurondb.neurondb_llm_jobs j
   SET status = 'processing', lease_owner = %(owner)s, started_at = now(),
       lease_expires_at = now() + %(lease_ms)s * interval '1 millisecond'
  FROM claimed
 WHERE j.job_id = claimed.job_id
-- Parameters come back as text, decoded row by row in the worker: one value the decoder refuses then
-- fails its own job instead of the whole fetch (which would leave the claimed jobs processing).
RETURNING j.job_id, j.operation, j.model_name, j.provider, j.tenant_id, j.input_text, j.system_prompt,
          j.input_texts, j.documents, j.parameters::text, j.retry_count, j.max_retries,
          j.attempts -> -1 ->> 'error';

-- name: complete
-- Completions of a flush in one statement. %(rows)s is a JSON array with one object per job (orjson writes
-- it in C, far cheaper than adapting ten parallel arrays element by element); vectors are JSON arrays.
-- Only jobs still leased to us change: a job taken over after a lease expiry keeps its new owner's outcome.
UPDATE neurondb.neurondb_llm_jobs j
   SET status = 'completed', completed_at = now(), lease_expires_at = NULL, error_message = NULL,
       provider = v.provider, model_name = coalesce(j.model_name, v.model), result_text = v.result_text,
       result_vector = v.result_vector, result_json = v.result_json, cache_hit = v.cache_hit,
       latency_ms = v.latency_ms, prompt_tokens = v.prompt_tokens, completion_tokens = v.completion_tokens
  FROM jsonb_to_recordset(%(rows)s::jsonb)
       AS v(job_id bigint, provider text, model text, result_text text, result_vector real[], result_json jsonb,
            cache_hit boolean, latency_ms float8, prompt_tokens int, completion_tokens int)
 WHERE j.job_id = v.job_id AND j.status = 'processing' AND j.lease_owner = %(owner)s;

-- name: retry
-- Failed attempts with retries left: pending again once their backoff has passed. Each attempt ended
-- ago_ms before this statement (outcomes are written in batches), and its backoff counts from then.
UPDATE neurondb.neurondb_llm_jobs j
   SET status = 'pending', retry_count = j.retry_count + 1, error_message = v.error,
       run_at = now() + (v.delay_ms - v.ago_ms) * interval '1 millisecond',
       lease_owner = NULL, lease_expires_at = NULL,
       attempts = j.attempts || jsonb_build_array(jsonb_build_object(
           'attempt', j.retry_count + 1, 'owner', j.lease_owner, 'started_at', j.started_at,
           'finished_at', now() - v.ago_ms * interval '1 millisecond', 'error', v.error,
           'retry_in_ms', round(v.delay_ms)))
  FROM jsonb_to_recordset(%(rows)s::jsonb) AS v(job_id bigint, error text, delay_ms float8, ago_ms float8)
 WHERE j.job_id = v.job_id AND j.status = 'processing' AND j.lease_owner = %(owner)s;

-- name: fail
-- Jobs that can never succeed, or that ran out of retries: failed, with the provider's message.
UPDATE neurondb.neurondb_llm_jobs j
   SET status = 'failed', completed_at = now(), lease_expires_at = NULL, error_message = v.error,
       provider = coalesce(v.provider, j.provider), latency_ms = v.latency_ms,
       attempts = j.attempts || jsonb_build_array(jsonb_build_object(
           'attempt', j.retry_count + 1, 'owner', j.lease_owner, 'started_at', j.started_at,
           'finished_at', now() - v.ago_ms * interval '1 millisecond', 'error', v.error))
  FROM jsonb_to_recordset(%(rows)s::jsonb)
       AS v(job_id bigint, error text, provider text, latency_ms float8, ago_ms float8)
 WHERE j.job_id = v.job_id AND j.status = 'processing' AND j.lease_owner = %(owner)s;

-- name: next_run_at
-- Seconds until the earliest delayed pending job becomes runnable (NULL: none).
SELECT extract(epoch FROM min(run_at) - now())::float8
  FROM neurondb.neurondb_llm_jobs WHERE status = 'pending' AND run_at > now();

-- name: tenant_shares
-- Tenants whose share of the provider rate limits differs from neurondb.llm_tenant_share.
SELECT tenant_id, llm_share FROM neurondb.neurondb_tenants WHERE llm_share IS NOT NULL;

-- name: cache_get
-- Live cache entries for these keys; reading one counts as a use (hits, last_hit_at: the LRU order).
-- The vector comes back as JSON, which the worker parses with orjson instead of element by element.
UPDATE neurondb.neurondb_llm_cache
   SET hits = hits + 1, last_hit_at = now()
 WHERE cache_key = ANY(%(keys)s) AND (expires_at IS NULL OR expires_at > now())
RETURNING cache_key, provider, model_name, result_text, to_jsonb(result_vector), result_json, prompt_tokens,
          completion_tokens;

-- name: cache_put
-- New results, one JSON object each (keys unique within one call). An entry that exists (two workers
-- computed the same result) is replaced, its lifetime starting again.
INSERT INTO neurondb.neurondb_llm_cache AS c
       (cache_key, operation, provider, model_name, result_text, result_vector, result_json, prompt_tokens,
        completion_tokens, expires_at)
SELECT v.cache_key, v.operation, v.provider, v.model_name, v.result_text, v.result_vector, v.result_json,
       v.prompt_tokens, v.completion_tokens,
       CASE WHEN %(ttl_s)s > 0 THEN now() + %(ttl_s)s * interval '1 second' END
  FROM jsonb_to_recordset(%(rows)s::jsonb)
       AS v(cache_key text, operation text, provider text, model_name text, result_text text, result_vector real[],
            result_json jsonb, prompt_tokens int, completion_tokens int)
ON CONFLICT (cache_key) DO UPDATE
   SET provider = EXCLUDED.provider, model_name = EXCLUDED.model_name, result_text = EXCLUDED.result_text,
       result_vector = EXCLUDED.result_vector, result_json = EXCLUDED.result_json,
       prompt_tokens = EXCLUDED.prompt_tokens, completion_tokens = EXCLUDED.completion_tokens,
       created_at = now(), expires_at = EXCLUDED.expires_at;

-- name: cache_count
SELECT count(*) FROM neurondb.neurondb_llm_cache;

-- name: cache_expire
-- Entries past their TTL, a small batch at a time (the table is never locked for long).
DELETE FROM neurondb.neurondb_llm_cache
 WHERE cache_key IN (SELECT cache_key FROM neurondb.neurondb_llm_cache
                      WHERE expires_at < now() LIMIT %(limit)s FOR UPDATE SKIP LOCKED);

-- name: cache_evict
-- The %(limit)s least recently used entries (last hit, else creation), by the LRU index.
DELETE FROM neurondb.neurondb_llm_cache
 WHERE cache_key IN (SELECT cache_key FROM neurondb.neurondb_llm_cache
                      ORDER BY coalesce(last_hit_at, created_at) LIMIT %(limit)s FOR UPDATE SKIP LOCKED);

-- name: submit
SELECT neurondb.llm_submit(%(operation)s, %(model_name)s, %(input_text)s, %(system_prompt)s,
                           %(input_texts)s::text[], %(documents)s::text[], %(parameters)s::jsonb,
                           %(tenant_id)s, %(priority)s::smallint, coalesce(%(run_at)s::timestamptz, now()),
                           %(max_retries)s::int, %(provider)s);

-- name: submit_many
-- Many jobs in one statement (one round trip, one NOTIFY); each element of %(jobs)s is one job's fields as
-- a JSON object. Every job's inputs are checked first (neurondb.llm_check_inputs): one bad job refuses the
-- whole statement. Ids come back in input order.
WITH jobs AS (
    SELECT n, j ->> 'operation' AS operation, j ->> 'model_name' AS model_name, j ->> 'provider' AS provider,
           coalesce(j ->> 'tenant_id', 'default') AS tenant_id, coalesce((j ->> 'priority')::smallint, 0) AS priority,
           j ->> 'input_text' AS input_text, j ->> 'system_prompt' AS system_prompt,
           CASE WHEN jsonb_typeof(j -> 'input_texts') = 'array'
                THEN ARRAY(SELECT jsonb_array_elements_text(j -> 'input_texts')) END AS input_texts,
           CASE WHEN jsonb_typeof(j -> 'documents') = 'array'
                THEN ARRAY(SELECT jsonb_array_elements_text(j -> 'documents')) END AS documents,
           coalesce(j -> 'parameters', '{}'::jsonb) AS parameters,
           coalesce((j ->> 'run_at')::timestamptz, now()) AS run_at, (j ->> 'max_retries')::int AS max_retries
      FROM unnest(%(jobs)s::jsonb[]) WITH ORDINALITY AS u(j, n)
)
INSERT INTO neurondb.neurondb_llm_jobs
       (operation, model_name, provider, tenant_id, priority, input_text, system_prompt, input_texts, documents,
        parameters, run_at, max_retries)
SELECT operation, model_name, provider, tenant_id, priority, input_text, system_prompt, input_texts, documents,
       parameters, run_at, max_retries
  FROM jobs
 WHERE neurondb.llm_check_inputs(operation, input_text, input_texts, documents, parameters)
 ORDER BY n
RETURNING job_id;

-- name: job
SELECT job_id, operation, model_name, provider, tenant_id, priority, status, input_text, system_prompt,
       input_texts, documents, parameters, run_at, retry_count, max_retries, lease_owner, lease_expires_at,
       result_text, result_vector, result_json, cache_hit, latency_ms, prompt_tokens, completion_tokens,
       error_message, attempts, created_at, started_at, completed_at
  FROM neurondb.neurondb_llm_jobs WHERE job_id = ANY(%(ids)s);

-- name: unfinished
SELECT count(*) FROM neurondb.neurondb_llm_jobs
 WHERE job_id = ANY(%(ids)s) AND status NOT IN ('completed', 'failed', 'cancelled');

-- name: list_jobs
SELECT job_id, operation, model_name, provider, tenant_id, status, retry_count, cache_hit,
       round(latency_ms::numeric, 1) AS latency_ms, created_at, completed_at, error_message
  FROM neurondb.neurondb_llm_jobs
 WHERE (%(status)s::text IS NULL OR status = %(status)s)
   AND (%(operation)s::text IS NULL OR operation = %(operation)s)
   AND (%(tenant_id)s::text IS NULL OR tenant_id = %(tenant_id)s)
 ORDER BY job_id DESC LIMIT %(limit)s;
