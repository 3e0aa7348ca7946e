-- ALTER SYSTEM / pg_reload_conf() for neurondb, from SQL.
-- neurondb.alter_system(name, value) queues a request; the supervisor validates it at the next reload
-- (neurondb.reload_conf(), `neurondb reload` or SIGHUP), writes valid values to neurondb.auto.conf and shows
-- rejected ones in neurondb.settings (rejected_value, rejected_reason) and in its log.

CREATE TABLE neurondb.neurondb_settings_requests (
    request_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text NOT NULL,
    value         text,                 -- NULL: reset to the default (ALTER SYSTEM RESET)
    requested_by  text NOT NULL DEFAULT current_user,
    requested_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION neurondb.alter_system(setting_name text, setting_value text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    -- Unknown names fail now, like ALTER SYSTEM; values are checked by the supervisor, which knows units.
    IF NOT EXISTS (SELECT 1 FROM neurondb.neurondb_settings WHERE name = setting_name)
       AND setting_name <> 'neurondb.neuronmon_target_latency' THEN
        RAISE EXCEPTION 'unrecognized configuration parameter "%"', setting_name
            USING ERRCODE = 'undefined_object';
    END IF;
    INSERT INTO neurondb.neurondb_settings_requests (name, value) VALUES (setting_name, setting_value);
    RETURN format('%s = %L queued; SELECT neurondb.reload_conf() applies it', setting_name, setting_value);
END $$;

CREATE FUNCTION neurondb.alter_system_reset(setting_name text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO neurondb.neurondb_settings_requests (name, value) VALUES (setting_name, NULL);
    RETURN format('reset of %s queued; SELECT neurondb.reload_conf() applies it', setting_name);
END $$;
