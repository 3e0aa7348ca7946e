-- neuranq: the queue depth bound (neurondb.neuranq_queue_depth) without counting the backlog.
--
-- 003 counted every pending job on every insert statement: O(backlog) per enqueue, and inexact under
-- concurrent producers (each saw only the others' committed jobs). Here the queue table's own statement
-- triggers keep the number of pending jobs in neurondb_queue_pending, so the check reads a few rows:
--   - slot 0 takes what insert statements add, and only they check the bound. Every inserting statement
--     updates that one row and holds its lock until it commits, so producers take turns from their insert
--     to their commit and each checks against every earlier producer's committed jobs: the bound is exact.
--     (A producer that keeps its transaction open after enqueueing makes the next producer wait for it;
--     under REPEATABLE READ or SERIALIZABLE the second of two overlapping producers gets a serialization
--     failure, to be retried like any other.)
--   - slots 1..16 take what updates and deletes move in or out of pending (claims, completions, retries,
--     hand-backs, cancels, plain SQL), in a slot chosen by the backend's pid: queue workers and the
--     supervisor do not queue up behind producers or each other. These are never refused, as before.
-- The sum of the rows is the number of pending jobs; a slot alone may be negative. It is transactional
-- like the rows it counts: a rolled-back statement, a killed client or a server crash leaves both as they
-- were. TRUNCATE sets it to zero. Triggers that do not fire (ALTER TABLE ... DISABLE TRIGGER,
-- session_replication_role = replica) leave it wrong: neurondb.recount_pending_jobs() counts it again.

CREATE TABLE neurondb.neurondb_queue_pending (
    slot     smallint PRIMARY KEY CHECK (slot BETWEEN 0 AND 16),
    pending  bigint NOT NULL
) WITH (fillfactor = 50);   -- room on the page for HOT versions: it is updated by every claim

INSERT INTO neurondb.neurondb_queue_pending (slot, pending) SELECT s, 0 FROM generate_series(0, 16) AS s;

-- The number of pending jobs, from the counter.
CREATE FUNCTION neurondb.pending_jobs() RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT sum(pending)::bigint FROM neurondb.neurondb_queue_pending;
$$;

-- Count the pending jobs again from the rows (the migration's start value; a repair after the triggers
-- were bypassed). Writers of the queue wait meanwhile, so the count is exact.
CREATE FUNCTION neurondb.recount_pending_jobs() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    LOCK TABLE neurondb.neurondb_job_queue IN SHARE ROW EXCLUSIVE MODE;
    SELECT count(*) INTO n FROM neurondb.neurondb_job_queue WHERE status = 'pending';
    UPDATE neurondb.neurondb_queue_pending SET pending = CASE WHEN slot = 0 THEN n ELSE 0 END;
    RETURN n;
END $$;

DROP TRIGGER neurondb_job_queue_depth ON neurondb.neurondb_job_queue;
DROP FUNCTION neurondb.check_queue_depth();

-- After an insert statement: count its pending jobs in slot 0 and refuse the whole statement if the
-- queue would then hold more than neurondb.neuranq_queue_depth.
CREATE FUNCTION neurondb.queue_pending_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    added bigint;
    total bigint;
    depth bigint;
BEGIN
    SELECT count(*) INTO added FROM new_rows WHERE status = 'pending';
    IF added = 0 THEN
        RETURN NULL;
    END IF;
    UPDATE neurondb.neurondb_queue_pending SET pending = pending + added WHERE slot = 0;
    -- A statement of its own, hence (READ COMMITTED) a snapshot taken after the wait for slot 0's lock.
    SELECT sum(pending) INTO total FROM neurondb.neurondb_queue_pending;
    depth := neurondb.current_setting_int('neurondb.neuranq_queue_depth', 10000);
    IF total > depth THEN
        RAISE EXCEPTION 'neurondb job queue is full: % pending jobs exceed neurondb.neuranq_queue_depth = % '
                        '(% pending before this statement, % in it); wait for the queue to drain, or raise '
                        'neurondb.neuranq_queue_depth (neurondb config set neurondb.neuranq_queue_depth N and '
                        'neurondb reload, or from SQL neurondb.alter_system() and neurondb.reload_conf())',
                        total, depth, total - added, added
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'raise neurondb.neuranq_queue_depth, or wait for the queue to drain';
    END IF;
    RETURN NULL;
END $$;

-- After an update or delete statement: what it moved into pending minus what it moved out, in this
-- backend's slot; nothing at all (no row written) for the statements that leave pending as it was, such
-- as completions and lease renewals.
CREATE FUNCTION neurondb.queue_pending_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta bigint;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        SELECT (SELECT count(*) FROM new_rows WHERE status = 'pending')
             - (SELECT count(*) FROM old_rows WHERE status = 'pending') INTO delta;
    ELSE
        SELECT -count(*) INTO delta FROM old_rows WHERE status = 'pending';
    END IF;
    IF delta <> 0 THEN
        UPDATE neurondb.neurondb_queue_pending SET pending = pending + delta
         WHERE slot = 1 + pg_backend_pid() % 16;
    END IF;
    RETURN NULL;
END $$;

-- TRUNCATE holds the queue table exclusively, so no other transaction has uncommitted counts in flight.
CREATE FUNCTION neurondb.queue_pending_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE neurondb.neurondb_queue_pending SET pending = 0 WHERE pending <> 0;
    RETURN NULL;
END $$;

CREATE TRIGGER neurondb_job_queue_depth AFTER INSERT ON neurondb.neurondb_job_queue
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION neurondb.queue_pending_inserted();
CREATE TRIGGER neurondb_job_queue_pending_update AFTER UPDATE ON neurondb.neurondb_job_queue
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION neurondb.queue_pending_changed();
CREATE TRIGGER neurondb_job_queue_pending_delete AFTER DELETE ON neurondb.neurondb_job_queue
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION neurondb.queue_pending_changed();
CREATE TRIGGER neurondb_job_queue_pending_truncate AFTER TRUNCATE ON neurondb.neurondb_job_queue
    FOR EACH STATEMENT EXECUTE FUNCTION neurondb.queue_pending_truncated();

SELECT neurondb.recount_pending_jobs();
