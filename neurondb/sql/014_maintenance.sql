-- neurandefrag's maintenance (issue 11): graph figures, operation records, progress, requests.

-- One row per maintenance operation, on an index graph (index_name) or a PostgreSQL table (table_name).
ALTER TABLE neurondb.neurondb_index_maintenance
    ALTER COLUMN index_name DROP NOT NULL,
    ADD COLUMN table_name text,
    ADD COLUMN duration_ms double precision,
    ADD COLUMN dead_tuples_removed bigint,
    ADD CONSTRAINT neurondb_index_maintenance_target CHECK (index_name IS NOT NULL OR table_name IS NOT NULL),
    DROP CONSTRAINT neurondb_index_maintenance_status_check,
    ADD CONSTRAINT neurondb_index_maintenance_status_check
        CHECK (status IN ('running', 'completed', 'failed', 'interrupted'));
CREATE INDEX neurondb_index_maintenance_table ON neurondb.neurondb_index_maintenance (table_name, started_at)
    WHERE table_name IS NOT NULL;

-- The fragmentation figures of each graph (neurondb/index/hnsw.py, fragmentation()).
ALTER TABLE neurondb.neurondb_index_stats
    ADD COLUMN free_slots bigint NOT NULL DEFAULT 0,
    ADD COLUMN dead_edge_ratio double precision NOT NULL DEFAULT 0,
    ADD COLUMN no_out_edge bigint NOT NULL DEFAULT 0,
    ADD COLUMN unreachable bigint NOT NULL DEFAULT 0,
    ADD COLUMN entry_live boolean,
    ADD COLUMN top_level_live boolean,
    ADD COLUMN level_deficit double precision NOT NULL DEFAULT 0,
    ADD COLUMN invalid_links bigint NOT NULL DEFAULT 0,
    ADD COLUMN compact_bytes bigint NOT NULL DEFAULT 0,
    ADD COLUMN last_compaction timestamptz,
    ADD COLUMN last_rebuild timestamptz;

-- Asked for by `neurondb index rebuild|compact`: neurandefrag starts it at its next cycle (a rebuild waits
-- for the maintenance window unless `now`) and clears the request when the operation starts.
ALTER TABLE neurondb.neurondb_indexes
    ADD COLUMN maintenance_request text CHECK (maintenance_request IN ('rebuild', 'compaction')),
    ADD COLUMN maintenance_now boolean NOT NULL DEFAULT false,
    ADD COLUMN maintenance_requested_at timestamptz;

-- What is running now, one row per operation, in the manner of pg_stat_progress_*: written by the process
-- doing the work, deleted when it ends (a row whose pid is gone is left by a killed process; the worker that
-- takes over deletes it).
CREATE TABLE neurondb.neurondb_maintenance_progress (
    target      text NOT NULL,                    -- index name, or schema.table
    kind        text NOT NULL CHECK (kind IN ('index', 'table')),
    operation   text NOT NULL,
    phase       text NOT NULL,
    done        bigint NOT NULL DEFAULT 0,
    total       bigint,
    pid         integer NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, target, operation)
);

CREATE VIEW neurondb.maintenance_progress AS
    SELECT kind, target, operation, phase, done, total,
           CASE WHEN total > 0 THEN round(100.0 * done / total, 1) END AS percent,
           pid, started_at, now() - started_at AS elapsed, updated_at
      FROM neurondb.neurondb_maintenance_progress
     ORDER BY started_at;

-- vector_stats gains the figures NeuronDB keeps (num_nodes, num_edges, num_tombstones, fragmentation_ratio,
-- last_compaction, last_rebuild, last_stats_refresh) and the parts of the fragmentation ratio.
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
           s.pending_changes, s.capacity, s.generation, s.task, s.task_progress,
           s.graph_nodes AS num_nodes, s.edges AS num_edges, s.tombstones AS num_tombstones,
           s.fragmentation AS fragmentation_ratio, s.last_compaction, s.last_rebuild,
           s.updated_at AS last_stats_refresh,
           s.free_slots, s.dead_edge_ratio, s.no_out_edge, s.unreachable, s.entry_live, s.top_level_live,
           s.level_deficit, s.invalid_links, s.compact_bytes
    FROM neurondb.neurondb_indexes i
    LEFT JOIN (SELECT index_name, count(*) AS vectors, count(DISTINCT tenant_id) AS tenants
               FROM neurondb.neurondb_vectors GROUP BY index_name) v USING (index_name)
    LEFT JOIN neurondb.neurondb_index_stats s USING (index_name);
