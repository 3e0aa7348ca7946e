-- neuranllm: submitting LLM jobs from SQL, checking their inputs at the door, the cache's LRU order.

-- Whether a job's inputs can run; raises with a message that says what is missing otherwise. Used by
-- neurondb.llm_submit() and the Python API, so a submitter learns it at once instead of from a failed job.
-- (A plain INSERT is not checked here: such a job fails at once, with the same message, when the worker
-- picks it up.) `operation` may be an alias.
CREATE FUNCTION neurondb.llm_check_inputs(operation text, input_text text, input_texts text[], documents text[],
                                          parameters jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    op text := CASE lower(operation) WHEN 'complete' THEN 'completion' WHEN 'embed' THEN 'embedding'
                                     WHEN 'rerank' THEN 'reranking' ELSE lower(operation) END;
BEGIN
    IF op IS NULL OR op NOT IN ('completion', 'embedding', 'reranking') THEN
        RAISE EXCEPTION 'unknown LLM operation "%"', operation
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'operations are completion, embedding and reranking (aliases complete, embed, rerank)';
    END IF;
    IF jsonb_typeof(parameters) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'LLM job parameters must be a JSON object, got %', coalesce(jsonb_typeof(parameters), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF op = 'completion' AND input_text IS NULL THEN
        RAISE EXCEPTION 'a completion job needs input_text (the prompt)' USING ERRCODE = 'invalid_parameter_value';
    ELSIF op = 'embedding' AND (input_text IS NULL) = (input_texts IS NULL) THEN
        RAISE EXCEPTION 'an embedding job needs either input_text or input_texts (not both)'
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF op = 'embedding' AND (cardinality(input_texts) = 0 OR array_position(input_texts, NULL) IS NOT NULL) THEN
        RAISE EXCEPTION 'input_texts of an embedding job must be a non-empty array without NULLs'
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF op = 'reranking' AND (input_text IS NULL OR documents IS NULL
                                OR array_position(documents, NULL) IS NOT NULL) THEN
        RAISE EXCEPTION 'a reranking job needs input_text (the query) and documents (without NULLs)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN true;
END $$;

-- Submit one LLM job; returns its id. `operation` is completion, embedding or reranking (or complete,
-- embed, rerank). `model_name` NULL uses neurondb.llm_model; `provider` NULL lets neurondb.llm_routes /
-- neurondb.llm_provider choose. Completion: input_text is the prompt, system_prompt and parameters
-- (temperature, max_tokens, top_p, stop, seed, presence_penalty, frequency_penalty) optional. Embedding:
-- input_text, or input_texts for several texts in one job. Reranking: input_text is the query, documents
-- the candidates, parameters {"top_n": N} optional.
CREATE FUNCTION neurondb.llm_submit(
    operation text,
    model_name text DEFAULT NULL,
    input_text text DEFAULT NULL,
    system_prompt text DEFAULT NULL,
    input_texts text[] DEFAULT NULL,
    documents text[] DEFAULT NULL,
    parameters jsonb DEFAULT '{}'::jsonb,
    tenant_id text DEFAULT 'default',
    priority smallint DEFAULT 0,
    run_at timestamptz DEFAULT now(),
    max_retries integer DEFAULT NULL,
    provider text DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    id bigint;
BEGIN
    PERFORM neurondb.llm_check_inputs(llm_submit.operation, llm_submit.input_text, llm_submit.input_texts,
                                      llm_submit.documents, coalesce(llm_submit.parameters, '{}'::jsonb));
    INSERT INTO neurondb.neurondb_llm_jobs
        (operation, model_name, provider, tenant_id, priority, input_text, system_prompt, input_texts, documents,
         parameters, run_at, max_retries)
    VALUES (llm_submit.operation, llm_submit.model_name, llm_submit.provider,
            coalesce(llm_submit.tenant_id, 'default'), coalesce(llm_submit.priority, 0), llm_submit.input_text,
            llm_submit.system_prompt, llm_submit.input_texts, llm_submit.documents,
            coalesce(llm_submit.parameters, '{}'::jsonb), coalesce(llm_submit.run_at, now()), llm_submit.max_retries)
    RETURNING job_id INTO id;
    RETURN id;
END $$;

-- The cache is bounded (neurondb.llm_cache_max_entries): the worker evicts the least recently used
-- entries, found in this order without sorting the table.
CREATE INDEX neurondb_llm_cache_lru ON neurondb.neurondb_llm_cache ((coalesce(last_hit_at, created_at)));

-- When the next delayed job (a retry's backoff) becomes runnable: the worker sleeps until then, not a
-- whole naptime.
CREATE INDEX neurondb_llm_jobs_delayed ON neurondb.neurondb_llm_jobs (run_at) WHERE status = 'pending';
