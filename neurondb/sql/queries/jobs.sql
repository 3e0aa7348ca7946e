-- The built-in job types (neurondb/jobs/builtin.py): embed's upsert of the vectors it computed, and
-- cache_refresh's expiry and recomputation of cache entries.

-- name: index_of
-- The dimension, provider and model an embed job embeds with.
SELECT dim, provider, model_name FROM neurondb.neurondb_indexes WHERE index_name = %s;

-- name: upsert_vectors
-- An embed job's documents with their vectors (deferred: it commits with the job's completion). Arrays in
-- step, one element per document; embeddings as PostgreSQL array literals.
INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, tenant_id, content, embedding, metadata)
SELECT %(index)s, u.doc_id, u.tenant_id, u.content, u.embedding::real[], u.metadata
  FROM unnest(%(doc_ids)s::text[], %(tenants)s::text[], %(contents)s::text[], %(embeddings)s::text[],
              %(metadata)s::jsonb[]) AS u(doc_id, tenant_id, content, embedding, metadata)
ON CONFLICT (index_name, doc_id) DO UPDATE
   SET tenant_id = EXCLUDED.tenant_id, content = EXCLUDED.content, embedding = EXCLUDED.embedding,
       metadata = EXCLUDED.metadata;

-- name: expire_llm
-- LLM (or, with %(operation)s 'embedding', embedding) cache entries: those of %(keys)s, or older than
-- %(older_than)s seconds, or all when neither is given; and every entry past its expiry.
DELETE FROM neurondb.neurondb_llm_cache
 WHERE (%(operation)s::text IS NULL OR operation = %(operation)s)
   AND ((%(keys)s::text[] IS NULL AND %(older_than)s::float8 IS NULL)
        OR cache_key = ANY(%(keys)s::text[])
        OR created_at < now() - %(older_than)s * interval '1 second'
        OR expires_at < now());

-- name: expire_results
-- The same for the result cache %(name)s.
DELETE FROM neurondb.neurondb_result_cache
 WHERE cache_name = %(name)s
   AND ((%(keys)s::text[] IS NULL AND %(older_than)s::float8 IS NULL)
        OR cache_key = ANY(%(keys)s::text[])
        OR refreshed_at < now() - %(older_than)s * interval '1 second'
        OR expires_at < now());

-- name: stale_results
-- Result cache entries to recompute from their recorded source, oldest first, 1000 per job.
SELECT cache_key, source FROM neurondb.neurondb_result_cache
 WHERE cache_name = %(name)s AND source IS NOT NULL
   AND ((%(keys)s::text[] IS NULL AND %(older_than)s::float8 IS NULL)
        OR cache_key = ANY(%(keys)s::text[])
        OR refreshed_at < now() - %(older_than)s * interval '1 second')
 ORDER BY refreshed_at LIMIT 1000;

-- name: store_result
-- A recomputed result cache entry.
UPDATE neurondb.neurondb_result_cache SET value = %(value)s, refreshed_at = now()
 WHERE cache_name = %(name)s AND cache_key = %(key)s;
