-- Queries of the index sync (the graph's writer) and of the search client.

-- name: indexes
SELECT index_name, dim, metric, m, ef_construction, ef_search, hybrid_weight, provider, model_name, recall_mode,
       target_recall
  FROM neurondb.neurondb_indexes ORDER BY index_name;

-- name: pending_changes
-- A page of the changes this installation's graph lacks: not visible in its position, visible in the
-- target (the statement's own snapshot on a replay's first page, then that same one for the following
-- pages, so the set paged through does not move), in (xid, change_id) order for keyset paging. The first
-- page starts at the position's xmin (every older change is visible in it), as the index scan's start key.
SELECT c.change_id, c.vector_id, c.xid::text, t.target::text
  FROM (SELECT coalesce(%(target)s::pg_snapshot, pg_current_snapshot()) AS target) t,
       neurondb.neurondb_vector_changes c
 WHERE c.index_name = %(index)s
   AND (c.xid, c.change_id) > (coalesce(%(from_xid)s::xid8, pg_snapshot_xmin(%(position)s::pg_snapshot)),
                               %(from_id)s::bigint)
   AND NOT pg_visible_in_snapshot(c.xid, %(position)s::pg_snapshot)
   AND pg_visible_in_snapshot(c.xid, t.target)
 ORDER BY c.xid, c.change_id LIMIT %(limit)s;

-- name: rows_by_id
-- By primary key alone, as `hits` (below) and for the same reason: right after a bulk COPY.
WITH rows AS MATERIALIZED (
    SELECT id, tenant_id, embedding, doc_id, index_name FROM neurondb.neurondb_vectors WHERE id = ANY(%(ids)s))
SELECT id, tenant_id, embedding, doc_id FROM rows WHERE index_name = %(index)s;

-- name: consumer
-- This installation's positions; `sane` is false for positions from another cluster (a restored dump:
-- its xids mean nothing here), which are treated as no position at all.
SELECT applied::text, durable::text,
       coalesce(pg_snapshot_xmax(applied), '0'::xid8) <= pg_snapshot_xmax(pg_current_snapshot()) AS sane
  FROM neurondb.neurondb_index_consumers WHERE consumer = %(consumer)s AND index_name = %(index)s;

-- name: register_consumer
-- Before a rebuild reads the table: from this commit on, no installation deletes a change newer than the
-- rebuild's snapshot. An existing row keeps its durable position (the file on disk still holds only
-- that), unless it comes from another cluster.
INSERT INTO neurondb.neurondb_index_consumers AS c (consumer, index_name, host, applied, durable)
VALUES (%(consumer)s, %(index)s, %(host)s, NULL, pg_current_snapshot())
ON CONFLICT (consumer, index_name) DO UPDATE SET
       host = EXCLUDED.host, seen_at = now(),
       durable = CASE WHEN pg_snapshot_xmax(c.durable) <= pg_snapshot_xmax(EXCLUDED.durable) THEN c.durable
                      ELSE EXCLUDED.durable END;

-- name: advance_consumer
-- The graph now holds every change visible in %(applied)s (NULL: unchanged, only "still alive").
-- No row returned: the position was dropped (unseen too long), the change log may lack changes.
UPDATE neurondb.neurondb_index_consumers
   SET applied = coalesce(%(applied)s::pg_snapshot, applied), seen_at = now()
 WHERE consumer = %(consumer)s AND index_name = %(index)s
RETURNING 1;

-- name: snapshot_written
UPDATE neurondb.neurondb_index_consumers SET durable = %(durable)s::pg_snapshot, seen_at = now()
 WHERE consumer = %(consumer)s AND index_name = %(index)s;

-- name: snapshot_covers
-- A snapshot file at %(position)s still finds every change it lacks in the log: nothing newer than its
-- position was deleted (deletion stays below this installation's durable xmin), and it is of this cluster.
SELECT pg_snapshot_xmin(%(position)s::pg_snapshot) >= pg_snapshot_xmin(%(durable)s::pg_snapshot)
   AND pg_snapshot_xmax(%(position)s::pg_snapshot) <= pg_snapshot_xmax(pg_current_snapshot());

-- name: drop_stale_consumers
DELETE FROM neurondb.neurondb_index_consumers
 WHERE index_name = %(index)s AND seen_at < now() - %(expiry)s::interval
RETURNING host, seen_at;

-- name: forget_changes
-- Changes every registered installation has in its snapshot file (below the oldest durable xmin); with
-- no installation registered, none.
DELETE FROM neurondb.neurondb_vector_changes
 WHERE index_name = %(index)s
   AND xid < (SELECT pg_snapshot_xmin(durable) FROM neurondb.neurondb_index_consumers
               WHERE index_name = %(index)s ORDER BY 1 LIMIT 1);

-- name: current_position
SELECT pg_current_snapshot()::text;

-- name: count_vectors
SELECT count(*) FROM neurondb.neurondb_vectors WHERE index_name = %(index)s;

-- name: all_vectors
SELECT id, tenant_id, embedding, doc_id FROM neurondb.neurondb_vectors WHERE index_name = %(index)s ORDER BY id;

-- name: count_pending
-- Changes this installation's graph lacks (all of the index's, while it has no position).
SELECT count(*) FROM neurondb.neurondb_vector_changes c
 WHERE c.index_name = %(index)s
   AND (%(position)s::pg_snapshot IS NULL
        OR (c.xid >= pg_snapshot_xmin(%(position)s::pg_snapshot)
            AND NOT pg_visible_in_snapshot(c.xid, %(position)s::pg_snapshot)));

-- name: publish_stats
INSERT INTO neurondb.neurondb_index_stats AS s
       (index_name, graph_nodes, tombstones, edges, levels, entry_point, memory_bytes, fragmentation, snapshot_at,
        task, task_progress, pending_changes, generation, capacity, ef_search, free_slots, dead_edge_ratio,
        no_out_edge, unreachable, entry_live, top_level_live, level_deficit, invalid_links, compact_bytes,
        updated_at)
VALUES (%(index)s, %(nodes)s, %(tombstones)s, %(edges)s, %(levels)s, %(entry_point)s, %(memory)s,
        %(fragmentation)s, to_timestamp(%(snapshot_at)s), %(task)s, %(progress)s, %(pending)s, %(generation)s,
        %(capacity)s, %(ef_search)s, %(free)s, %(dead_edge_ratio)s, %(no_out_edge)s, %(unreachable)s,
        %(entry_live)s, %(top_level_live)s, %(level_deficit)s, %(invalid_links)s, %(compact_bytes)s, now())
ON CONFLICT (index_name) DO UPDATE SET
       graph_nodes = EXCLUDED.graph_nodes, tombstones = EXCLUDED.tombstones, edges = EXCLUDED.edges,
       levels = EXCLUDED.levels, entry_point = EXCLUDED.entry_point, memory_bytes = EXCLUDED.memory_bytes,
       fragmentation = EXCLUDED.fragmentation, snapshot_at = EXCLUDED.snapshot_at, task = EXCLUDED.task,
       task_progress = EXCLUDED.task_progress, pending_changes = EXCLUDED.pending_changes,
       generation = EXCLUDED.generation, capacity = EXCLUDED.capacity, ef_search = EXCLUDED.ef_search,
       free_slots = EXCLUDED.free_slots, dead_edge_ratio = EXCLUDED.dead_edge_ratio,
       no_out_edge = EXCLUDED.no_out_edge, unreachable = EXCLUDED.unreachable, entry_live = EXCLUDED.entry_live,
       top_level_live = EXCLUDED.top_level_live, level_deficit = EXCLUDED.level_deficit,
       invalid_links = EXCLUDED.invalid_links, compact_bytes = EXCLUDED.compact_bytes,
       updated_at = now();

-- name: hits
-- By primary key alone, then the index and tenant checked on those rows: with index_name in the same WHERE, a
-- table without statistics yet (right after a bulk COPY, until ANALYZE) got a BitmapAnd that read the
-- whole (index_name, doc_id) index, 3 ms instead of 0.2 ms per search at 29k rows.
WITH rows AS MATERIALIZED (
    SELECT id, doc_id, tenant_id, content, metadata, index_name FROM neurondb.neurondb_vectors
     WHERE id = ANY(%(ids)s))
SELECT id, doc_id, tenant_id, content, metadata FROM rows
 WHERE index_name = %(index)s AND (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s);

-- name: text_candidates_recorded
-- Full-text candidates for hybrid search, best first by ts_rank_cd; in the same round trip, both raw
-- candidate lists are recorded under the search's query id, so that neuranmon can re-score this search at
-- any hybrid weight once the application judges its results.
WITH ranked AS (
    SELECT id, ts_rank_cd(content_tsv, q) AS rank, doc_id, tenant_id
      FROM neurondb.neurondb_vectors, plainto_tsquery('english', %(text)s) AS q
     WHERE index_name = %(index)s AND content_tsv @@ q AND (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s)
     ORDER BY rank DESC LIMIT %(limit)s
), recorded AS (
    INSERT INTO neurondb.neurondb_hybrid_queries
           (query_id, index_name, k, hybrid_weight, vector_ids, vector_scores, text_ids, text_ranks)
    SELECT %(query_id)s, %(index)s, %(k)s, %(weight)s, %(vector_ids)s::bigint[], %(vector_scores)s::float8[],
           coalesce(array_agg(id ORDER BY rank DESC), '{}'), coalesce(array_agg(rank ORDER BY rank DESC), '{}')
      FROM ranked
    ON CONFLICT (query_id) DO NOTHING
)
SELECT id, rank, doc_id, tenant_id FROM ranked ORDER BY rank DESC;

-- name: feedback
INSERT INTO neurondb.neurondb_feedback (query_id, doc_id, relevance) VALUES (%(query_id)s, %(doc_id)s, %(relevance)s);

-- name: vectors_by_id
SELECT id, embedding FROM neurondb.neurondb_vectors WHERE id = ANY(%(ids)s) AND index_name = %(index)s;

-- name: publish_task
-- Only what the index is busy with (a rebuild's progress), leaving the graph's figures as they are.
INSERT INTO neurondb.neurondb_index_stats AS s (index_name, task, task_progress, updated_at)
VALUES (%(index)s, %(task)s, %(progress)s, now())
ON CONFLICT (index_name) DO UPDATE SET task = EXCLUDED.task, task_progress = EXCLUDED.task_progress,
       updated_at = now();
