-- Clear errors for bad rows: a violated CHECK says which column, what value and what is allowed.
--
-- PostgreSQL reports a failed CHECK by its constraint name ("neurondb_job_queue_check1") plus a DETAIL
-- with the whole row (which may hold a tenant's content). Each user-facing CHECK below is replaced by one
-- with the same condition wrapped as `CASE WHEN <condition> THEN true ELSE neurondb.check_failed(...) END`:
-- a good row costs what it cost before (the condition, no function call, no trigger: the queue's insert
-- path is unchanged), and only a bad row calls check_failed, which raises one line such as
--     tenant_id: '' must be 1 to 64 characters
-- with SQLSTATE check_violation (23514, as before) and the column in the error's COLUMN field. The
-- constraints that only the workers can violate (token counts, latency) are replaced too, so every CHECK
-- of these tables reads the same way; the meaningless table-level names (_check, _check1) get real ones.

-- Raise the violation of `field`'s rule; `value` is shown shortened (40 characters), text quoted.
-- Declared VOLATILE so that the planner never evaluates it ahead of time (it only ever raises).
CREATE FUNCTION neurondb.check_failed(field text, value anyelement, allowed text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    shown text := regexp_replace(value::text, '[[:cntrl:]]', ' ', 'g');
BEGIN
    IF length(shown) > 40 THEN
        shown := left(shown, 37) || '...';
    END IF;
    IF pg_typeof(value) IN ('text'::regtype, 'character varying'::regtype, 'character'::regtype) THEN
        shown := quote_literal(shown);
    END IF;
    RAISE EXCEPTION '%: % %', field, coalesce(shown, 'NULL'), allowed
        USING ERRCODE = 'check_violation', COLUMN = field;
END $$;

ALTER TABLE neurondb.neurondb_job_queue
    DROP CONSTRAINT neurondb_job_queue_job_type_check,
    DROP CONSTRAINT neurondb_job_queue_tenant_id_check,
    DROP CONSTRAINT neurondb_job_queue_status_check,
    DROP CONSTRAINT neurondb_job_queue_retry_count_check,
    DROP CONSTRAINT neurondb_job_queue_max_retries_check,
    DROP CONSTRAINT neurondb_job_queue_check,
    DROP CONSTRAINT neurondb_job_queue_check1,
    ADD CONSTRAINT neurondb_job_queue_job_type_check CHECK (CASE WHEN job_type <> '' AND length(job_type) <= 100
        THEN true ELSE neurondb.check_failed('job_type', job_type, 'must be 1 to 100 characters') END),
    ADD CONSTRAINT neurondb_job_queue_tenant_id_check CHECK (CASE WHEN tenant_id <> '' AND length(tenant_id) <= 64
        THEN true ELSE neurondb.check_failed('tenant_id', tenant_id, 'must be 1 to 64 characters') END),
    ADD CONSTRAINT neurondb_job_queue_status_check CHECK (CASE
        WHEN status IN ('pending', 'processing', 'completed', 'failed') THEN true
        ELSE neurondb.check_failed('status', status, 'must be one of pending, processing, completed, failed') END),
    ADD CONSTRAINT neurondb_job_queue_retry_count_check CHECK (CASE WHEN retry_count >= 0
        THEN true ELSE neurondb.check_failed('retry_count', retry_count, 'must be 0 or more') END),
    ADD CONSTRAINT neurondb_job_queue_max_retries_check CHECK (CASE
        WHEN max_retries IS NULL OR max_retries BETWEEN 0 AND 100 THEN true
        ELSE neurondb.check_failed('max_retries', max_retries,
                                   'must be between 0 and 100 (or NULL for neurondb.neuranq_max_retries)') END),
    ADD CONSTRAINT neurondb_job_queue_processing_has_lease CHECK (CASE
        WHEN status <> 'processing' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL) THEN true
        ELSE neurondb.check_failed('status', status,
                                   'needs lease_owner and lease_expires_at (set by the worker that claims it)') END),
    ADD CONSTRAINT neurondb_job_queue_finished_has_completed_at CHECK (CASE
        WHEN status NOT IN ('completed', 'failed') OR completed_at IS NOT NULL THEN true
        ELSE neurondb.check_failed('status', status, 'needs completed_at') END);

ALTER TABLE neurondb.neurondb_llm_jobs
    DROP CONSTRAINT neurondb_llm_jobs_operation_check,
    DROP CONSTRAINT neurondb_llm_jobs_tenant_id_check,
    DROP CONSTRAINT neurondb_llm_jobs_status_check,
    DROP CONSTRAINT neurondb_llm_jobs_retry_count_check,
    DROP CONSTRAINT neurondb_llm_jobs_max_retries_check,
    DROP CONSTRAINT neurondb_llm_jobs_latency_ms_check,
    DROP CONSTRAINT neurondb_llm_jobs_prompt_tokens_check,
    DROP CONSTRAINT neurondb_llm_jobs_completion_tokens_check,
    DROP CONSTRAINT neurondb_llm_jobs_check,
    DROP CONSTRAINT neurondb_llm_jobs_check1,
    ADD CONSTRAINT neurondb_llm_jobs_operation_check CHECK (CASE
        WHEN operation IN ('completion', 'embedding', 'reranking') THEN true
        ELSE neurondb.check_failed('operation', operation,
                                   'must be one of completion, embedding, reranking (or complete, embed, rerank)') END),
    ADD CONSTRAINT neurondb_llm_jobs_tenant_id_check CHECK (CASE WHEN tenant_id <> '' AND length(tenant_id) <= 64
        THEN true ELSE neurondb.check_failed('tenant_id', tenant_id, 'must be 1 to 64 characters') END),
    ADD CONSTRAINT neurondb_llm_jobs_status_check CHECK (CASE
        WHEN status IN ('pending', 'processing', 'completed', 'failed') THEN true
        ELSE neurondb.check_failed('status', status, 'must be one of pending, processing, completed, failed') END),
    ADD CONSTRAINT neurondb_llm_jobs_retry_count_check CHECK (CASE WHEN retry_count >= 0
        THEN true ELSE neurondb.check_failed('retry_count', retry_count, 'must be 0 or more') END),
    ADD CONSTRAINT neurondb_llm_jobs_max_retries_check CHECK (CASE
        WHEN max_retries IS NULL OR max_retries BETWEEN 0 AND 100 THEN true
        ELSE neurondb.check_failed('max_retries', max_retries,
                                   'must be between 0 and 100 (or NULL for neurondb.neuranllm_max_retries)') END),
    ADD CONSTRAINT neurondb_llm_jobs_latency_ms_check CHECK (CASE WHEN latency_ms IS NULL OR latency_ms >= 0
        THEN true ELSE neurondb.check_failed('latency_ms', latency_ms, 'must be 0 or more') END),
    ADD CONSTRAINT neurondb_llm_jobs_prompt_tokens_check CHECK (CASE WHEN prompt_tokens IS NULL OR prompt_tokens >= 0
        THEN true ELSE neurondb.check_failed('prompt_tokens', prompt_tokens, 'must be 0 or more') END),
    ADD CONSTRAINT neurondb_llm_jobs_completion_tokens_check CHECK (CASE
        WHEN completion_tokens IS NULL OR completion_tokens >= 0 THEN true
        ELSE neurondb.check_failed('completion_tokens', completion_tokens, 'must be 0 or more') END),
    ADD CONSTRAINT neurondb_llm_jobs_processing_has_lease CHECK (CASE
        WHEN status <> 'processing' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL) THEN true
        ELSE neurondb.check_failed('status', status,
                                   'needs lease_owner and lease_expires_at (set by the worker that claims it)') END),
    ADD CONSTRAINT neurondb_llm_jobs_finished_has_completed_at CHECK (CASE
        WHEN status NOT IN ('completed', 'failed') OR completed_at IS NOT NULL THEN true
        ELSE neurondb.check_failed('status', status, 'needs completed_at') END);

ALTER TABLE neurondb.neurondb_indexes
    DROP CONSTRAINT neurondb_indexes_index_name_check,
    DROP CONSTRAINT neurondb_indexes_dim_check,
    DROP CONSTRAINT neurondb_indexes_metric_check,
    DROP CONSTRAINT neurondb_indexes_m_check,
    DROP CONSTRAINT neurondb_indexes_ef_construction_check,
    DROP CONSTRAINT neurondb_indexes_ef_search_check,
    DROP CONSTRAINT neurondb_indexes_hybrid_weight_check,
    ADD CONSTRAINT neurondb_indexes_index_name_check CHECK (CASE WHEN index_name ~ '^[A-Za-z_][A-Za-z0-9_]{0,62}$'
        THEN true ELSE neurondb.check_failed('index_name', index_name,
            'must match ^[A-Za-z_][A-Za-z0-9_]{0,62}$ (a letter or _, then letters, digits, _; at most 63)') END),
    ADD CONSTRAINT neurondb_indexes_dim_check CHECK (CASE WHEN dim BETWEEN 1 AND 16000
        THEN true ELSE neurondb.check_failed('dim', dim, 'must be between 1 and 16000') END),
    ADD CONSTRAINT neurondb_indexes_metric_check CHECK (CASE WHEN metric IN ('l2', 'cosine', 'ip')
        THEN true ELSE neurondb.check_failed('metric', metric, 'must be one of l2, cosine, ip') END),
    ADD CONSTRAINT neurondb_indexes_m_check CHECK (CASE WHEN m BETWEEN 2 AND 128
        THEN true ELSE neurondb.check_failed('m', m, 'must be between 2 and 128') END),
    ADD CONSTRAINT neurondb_indexes_ef_construction_check CHECK (CASE WHEN ef_construction BETWEEN 4 AND 4096
        THEN true ELSE neurondb.check_failed('ef_construction', ef_construction, 'must be between 4 and 4096') END),
    ADD CONSTRAINT neurondb_indexes_ef_search_check CHECK (CASE WHEN ef_search BETWEEN 1 AND 4096
        THEN true ELSE neurondb.check_failed('ef_search', ef_search, 'must be between 1 and 4096') END),
    ADD CONSTRAINT neurondb_indexes_hybrid_weight_check CHECK (CASE WHEN hybrid_weight BETWEEN 0 AND 1
        THEN true ELSE neurondb.check_failed('hybrid_weight', hybrid_weight, 'must be between 0 and 1') END);

ALTER TABLE neurondb.neurondb_tenants
    DROP CONSTRAINT neurondb_tenants_tenant_id_check,
    DROP CONSTRAINT neurondb_tenants_rate_limit_check,
    DROP CONSTRAINT neurondb_tenants_burst_check,
    DROP CONSTRAINT neurondb_tenants_llm_share_check,
    ADD CONSTRAINT neurondb_tenants_tenant_id_check CHECK (CASE WHEN tenant_id <> '' AND length(tenant_id) <= 64
        THEN true ELSE neurondb.check_failed('tenant_id', tenant_id, 'must be 1 to 64 characters') END),
    ADD CONSTRAINT neurondb_tenants_rate_limit_check CHECK (CASE WHEN rate_limit IS NULL OR rate_limit >= 0
        THEN true ELSE neurondb.check_failed('rate_limit', rate_limit,
            'must be 0 or more jobs/s (0 = unlimited; NULL for neurondb.tenant_rate_limit)') END),
    ADD CONSTRAINT neurondb_tenants_burst_check CHECK (CASE WHEN burst IS NULL OR burst >= 1
        THEN true ELSE neurondb.check_failed('burst', burst, 'must be 1 or more (NULL for neurondb.tenant_burst)') END),
    ADD CONSTRAINT neurondb_tenants_llm_share_check CHECK (CASE
        WHEN llm_share IS NULL OR (llm_share > 0 AND llm_share <= 1) THEN true
        ELSE neurondb.check_failed('llm_share', llm_share, 'must be more than 0 and at most 1 (or NULL)') END);

ALTER TABLE neurondb.neurondb_vectors
    DROP CONSTRAINT neurondb_vectors_doc_id_check,
    ADD CONSTRAINT neurondb_vectors_doc_id_check CHECK (CASE WHEN doc_id <> ''
        THEN true ELSE neurondb.check_failed('doc_id', doc_id, 'must not be empty') END);

-- A vector row for an index that does not exist: the foreign key's name says what is required.
ALTER TABLE neurondb.neurondb_vectors
    RENAME CONSTRAINT neurondb_vectors_index_name_fkey TO neurondb_vectors_index_name_must_be_a_registered_index;
