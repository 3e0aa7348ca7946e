-- Queries of the index sync (the graph's writer) and of the search client.

-- name: indexes
SELECT index_name, dim, metric, m, ef_construction, ef_search, hybrid_weight, provider, model_name
  FROM neurondb.neurondb_indexes ORDER BY index_name;

-- name: pending_changes
SELECT change_id, vector_id FROM neurondb.neurondb_vector_changes
 WHERE index_name = %(index)s AND change_id > %(from_id)s
   AND (applied_snapshot IS NULL OR applied_snapshot > %(after)s)
 ORDER BY change_id LIMIT %(limit)s;

-- name: rows_by_id
SELECT id, tenant_id, embedding FROM neurondb.neurondb_vectors
 WHERE id = ANY(%(ids)s) AND index_name = %(index)s;

-- name: mark_applied
UPDATE neurondb.neurondb_vector_changes SET applied_snapshot = %(snapshot)s WHERE change_id = ANY(%(ids)s);

-- name: forget_applied
-- Changes contained in snapshot %(snapshot)s (now on disk) are no longer needed for a replay.
DELETE FROM neurondb.neurondb_vector_changes
 WHERE index_name = %(index)s AND applied_snapshot <= %(snapshot)s;

-- name: count_vectors
SELECT count(*) FROM neurondb.neurondb_vectors WHERE index_name = %(index)s;

-- name: all_vectors
SELECT id, tenant_id, embedding FROM neurondb.neurondb_vectors WHERE index_name = %(index)s ORDER BY id;

-- name: count_pending
SELECT count(*) FROM neurondb.neurondb_vector_changes WHERE index_name = %(index)s AND applied_snapshot IS NULL;

-- name: publish_stats
INSERT INTO neurondb.neurondb_index_stats AS s
       (index_name, graph_nodes, tombstones, edges, levels, entry_point, memory_bytes, fragmentation, snapshot_at,
        task, task_progress, pending_changes, generation, capacity, ef_search, updated_at)
VALUES (%(index)s, %(nodes)s, %(tombstones)s, %(edges)s, %(levels)s, %(entry_point)s, %(memory)s,
        %(fragmentation)s, to_timestamp(%(snapshot_at)s), %(task)s, %(progress)s, %(pending)s, %(generation)s,
        %(capacity)s, %(ef_search)s, now())
ON CONFLICT (index_name) DO UPDATE SET
       graph_nodes = EXCLUDED.graph_nodes, tombstones = EXCLUDED.tombstones, edges = EXCLUDED.edges,
       levels = EXCLUDED.levels, entry_point = EXCLUDED.entry_point, memory_bytes = EXCLUDED.memory_bytes,
       fragmentation = EXCLUDED.fragmentation, snapshot_at = EXCLUDED.snapshot_at, task = EXCLUDED.task,
       task_progress = EXCLUDED.task_progress, pending_changes = EXCLUDED.pending_changes,
       generation = EXCLUDED.generation, capacity = EXCLUDED.capacity, ef_search = EXCLUDED.ef_search,
       updated_at = now();

-- name: hits
SELECT id, doc_id, tenant_id, content, metadata FROM neurondb.neurondb_vectors
 WHERE id = ANY(%(ids)s) AND index_name = %(index)s AND (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s);

-- name: text_candidates
-- Full-text candidates for hybrid search, best first by ts_rank_cd.
SELECT id, ts_rank_cd(content_tsv, q) AS rank
  FROM neurondb.neurondb_vectors, plainto_tsquery('english', %(text)s) AS q
 WHERE index_name = %(index)s AND content_tsv @@ q AND (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s)
 ORDER BY rank DESC LIMIT %(limit)s;

-- name: vectors_by_id
SELECT id, embedding FROM neurondb.neurondb_vectors WHERE id = ANY(%(ids)s) AND index_name = %(index)s;

-- name: publish_task
-- Only what the index is busy with (a rebuild's progress), leaving the graph's figures as they are.
INSERT INTO neurondb.neurondb_index_stats AS s (index_name, task, task_progress, updated_at)
VALUES (%(index)s, %(task)s, %(progress)s, now())
ON CONFLICT (index_name) DO UPDATE SET task = EXCLUDED.task, task_progress = EXCLUDED.task_progress,
       updated_at = now();

-- name: unapplied_ids
SELECT change_id FROM neurondb.neurondb_vector_changes WHERE index_name = %(index)s AND applied_snapshot IS NULL;
