-- Each installation keeps its own position in the shared change log.
--
-- Several installations (supervisors on other machines, or other data directories) may serve one
-- database, each with its own graph in its own shared memory, and each must apply every change. 004 kept
-- one installation's state in the shared change rows (`applied_snapshot`): a second installation
-- skipped the changes the first had marked, and lost those the first deleted after its snapshot.
--
-- A position is a pg_snapshot: a change is contained in it when the change's transaction is visible in
-- it (pg_visible_in_snapshot). Unlike a change_id watermark this is sound although ids are handed out at
-- write and not at commit: a slow transaction stays in the snapshot's in-progress list until it commits.
--   applied: every change visible in it is in the installation's graph in shared memory; NULL while it
--            has no graph yet (registered, rebuild under way).
--   durable: every change visible in it is in the installation's snapshot file on disk.
-- A change is deleted once its xid is below every registered installation's durable xmin. An
-- installation unseen for longer than the writer's expiry loses its row (the others prune without it)
-- and rebuilds from the table when it returns.

CREATE TABLE neurondb.neurondb_index_consumers (
    consumer    text NOT NULL,                 -- the installation's id (indexes/installation.id in its data dir)
    index_name  text NOT NULL REFERENCES neurondb.neurondb_indexes (index_name) ON DELETE CASCADE,
    host        text NOT NULL,                 -- hostname:data directory, for people
    applied     pg_snapshot,
    durable     pg_snapshot NOT NULL,
    seen_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, index_name)
);

ALTER TABLE neurondb.neurondb_vector_changes DROP COLUMN applied_snapshot;    -- and its two indexes
CREATE INDEX neurondb_vector_changes_position ON neurondb.neurondb_vector_changes (index_name, xid, change_id);
