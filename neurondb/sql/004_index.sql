-- Vector indexes: registration from SQL, and the change log as the graph's durable feed.
--
-- Why `applied_snapshot` instead of a change_id watermark: change ids are handed out when a row is
-- written, not when its transaction commits, so a slow transaction can commit an id lower than ones
-- already consumed; a watermark would skip it forever. Instead the graph's writer marks each change it
-- applied with the number of the snapshot that will first contain it, and deletes changes only once that
-- snapshot is safely on disk. After a restart it loads the newest snapshot and replays every change not
-- covered by it. Applying a change re-reads the row's current state, so replaying one twice is harmless.

ALTER TABLE neurondb.neurondb_vector_changes ADD COLUMN applied_snapshot bigint;
CREATE INDEX neurondb_vector_changes_unapplied ON neurondb.neurondb_vector_changes (index_name, change_id)
    WHERE applied_snapshot IS NULL;
CREATE INDEX neurondb_vector_changes_applied ON neurondb.neurondb_vector_changes (index_name, applied_snapshot)
    WHERE applied_snapshot IS NOT NULL;

-- Register an index (`neurondb index create` does the same). Returns the name.
CREATE FUNCTION neurondb.create_index(
    index_name text,
    dim integer,
    metric text DEFAULT 'cosine',
    m integer DEFAULT 16,
    ef_construction integer DEFAULT 200,
    provider text DEFAULT NULL,
    model_name text DEFAULT NULL
) RETURNS text LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO neurondb.neurondb_indexes (index_name, dim, metric, m, ef_construction, provider, model_name)
    VALUES (create_index.index_name, create_index.dim, lower(create_index.metric), create_index.m,
            create_index.ef_construction, create_index.provider, create_index.model_name);
    PERFORM pg_notify('neurondb_vectors', '');
    RETURN create_index.index_name;
EXCEPTION WHEN unique_violation THEN
    RAISE EXCEPTION 'index "%" already exists', create_index.index_name USING ERRCODE = 'duplicate_object';
END $$;

-- Drop an index with its vectors (the graph is removed by the writer on its next cycle).
CREATE FUNCTION neurondb.drop_index(index_name text) RETURNS boolean LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    existed boolean;
BEGIN
    DELETE FROM neurondb.neurondb_indexes i WHERE i.index_name = drop_index.index_name;   -- cascades to vectors
    existed := FOUND;
    DELETE FROM neurondb.neurondb_vector_changes c WHERE c.index_name = drop_index.index_name;
    PERFORM pg_notify('neurondb_vectors', '');
    RETURN existed;
END $$;

-- Every change names the vector row it concerns, so applying it means "make the graph match that row's
-- current state": order-independent and idempotent. A row moved to another index or doc_id logs a
-- delete for the old (index, doc) and an insert for the new one, both with its id.
ALTER TABLE neurondb.neurondb_vector_changes ADD COLUMN vector_id bigint;

CREATE OR REPLACE FUNCTION neurondb.log_vector_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO neurondb.neurondb_vector_changes (index_name, doc_id, op, vector_id)
        VALUES (OLD.index_name, OLD.doc_id, 'D', OLD.id);
    ELSIF TG_OP = 'UPDATE' AND (OLD.index_name, OLD.doc_id) IS DISTINCT FROM (NEW.index_name, NEW.doc_id) THEN
        INSERT INTO neurondb.neurondb_vector_changes (index_name, doc_id, op, vector_id)
        VALUES (OLD.index_name, OLD.doc_id, 'D', OLD.id), (NEW.index_name, NEW.doc_id, 'I', NEW.id);
    ELSE
        INSERT INTO neurondb.neurondb_vector_changes (index_name, doc_id, op, vector_id)
        VALUES (NEW.index_name, NEW.doc_id, CASE TG_OP WHEN 'INSERT' THEN 'I' ELSE 'U' END, NEW.id);
    END IF;
    RETURN NULL;
END $$;

-- What the index-sync worker is doing, for `neurondb status` and `neurondb index stats`.
ALTER TABLE neurondb.neurondb_index_stats
    ADD COLUMN task text,                      -- 'loading snapshot', 'rebuilding', NULL when idle
    ADD COLUMN task_progress double precision, -- 0..1
    ADD COLUMN pending_changes bigint NOT NULL DEFAULT 0,
    ADD COLUMN generation bigint NOT NULL DEFAULT 0,
    ADD COLUMN capacity bigint NOT NULL DEFAULT 0,
    ADD COLUMN ef_search integer;

CREATE OR REPLACE VIEW neurondb.vector_stats AS
    SELECT i.index_name, i.dim, i.metric, i.m, i.ef_construction,
           coalesce(s.ef_search, i.ef_search) AS ef_search, i.hybrid_weight,
           coalesce(v.vectors, 0) AS vectors,
           coalesce(v.tenants, 0) AS tenants,
           s.graph_nodes, s.tombstones, s.edges, s.levels, s.entry_point, s.memory_bytes,
           pg_size_pretty(s.memory_bytes) AS memory,
           s.fragmentation,
           s.snapshot_at,
           now() - s.snapshot_at AS snapshot_age,
           s.updated_at AS stats_updated_at,
           s.pending_changes, s.capacity, s.generation, s.task, s.task_progress
    FROM neurondb.neurondb_indexes i
    LEFT JOIN (SELECT index_name, count(*) AS vectors, count(DISTINCT tenant_id) AS tenants
               FROM neurondb.neurondb_vectors GROUP BY index_name) v USING (index_name)
    LEFT JOIN neurondb.neurondb_index_stats s USING (index_name);
