-- Who may change what, like PostgreSQL's superuser-only GUCs: settings that name files, hosts, modules,
-- providers or network permissions (sql_settable = false) can be changed only by the owner of the data
-- directory (neurondb.conf, `neurondb config set`), never through neurondb.alter_system(). The function
-- refuses them at once; the supervisor refuses them again when it applies the requests, because the
-- request table can be written without the function and this table can be edited from SQL.

ALTER TABLE neurondb.neurondb_settings ADD COLUMN sql_settable boolean NOT NULL DEFAULT false;

CREATE OR REPLACE VIEW neurondb.settings AS
    SELECT name, setting, unit, short_desc, context, vartype, source, min_val, max_val, enumvals, boot_val,
           sourcefile, sourceline, pending_restart, rejected_value, rejected_reason, sql_settable
    FROM neurondb.neurondb_settings;

CREATE FUNCTION neurondb.check_sql_settable(setting_name text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    settable boolean;
BEGIN
    SELECT s.sql_settable INTO settable FROM neurondb.neurondb_settings s
     WHERE s.name = CASE setting_name WHEN 'neurondb.neuronmon_target_latency'
                                      THEN 'neurondb.neuranmon_target_latency' ELSE setting_name END;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unrecognized configuration parameter "%"', setting_name
            USING ERRCODE = 'undefined_object';
    END IF;
    IF NOT settable THEN
        RAISE EXCEPTION 'parameter "%" cannot be set from SQL: it names files, hosts, modules or network '
                        'permissions; set it in neurondb.conf or with `neurondb config set` (data directory owner)',
                        setting_name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
END $$;

CREATE OR REPLACE FUNCTION neurondb.alter_system(setting_name text, setting_value text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    -- Unknown and owner-only names fail now, like ALTER SYSTEM; values are checked by the supervisor,
    -- which knows units.
    PERFORM neurondb.check_sql_settable(setting_name);
    INSERT INTO neurondb.neurondb_settings_requests (name, value) VALUES (setting_name, setting_value);
    RETURN format('%s = %L queued; SELECT neurondb.reload_conf() applies it', setting_name, setting_value);
END $$;

CREATE OR REPLACE FUNCTION neurondb.alter_system_reset(setting_name text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM neurondb.check_sql_settable(setting_name);
    INSERT INTO neurondb.neurondb_settings_requests (name, value) VALUES (setting_name, NULL);
    RETURN format('reset of %s queued; SELECT neurondb.reload_conf() applies it', setting_name);
END $$;
