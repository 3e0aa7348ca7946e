-- Operator-facing checks (issue 14).

-- neurondb.alter_system() validates the value at once, as `neurondb config set` does (neurondb/settings.py
-- parse_value), from the setting's published type, unit, range and enum values in neurondb.neurondb_settings:
-- a bad value fails the call with the same one-line message instead of being queued and rejected only at
-- the next reload. What only Python knows (a string setting's own syntax, such as a maintenance window) is
-- still checked by the supervisor when it applies the request.

-- The unit factors of neurondb/settings.py: time in ms, memory in kB.
CREATE FUNCTION neurondb.unit_factor(unit text) RETURNS float8 LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE unit WHEN 'us' THEN 0.001 WHEN 'ms' THEN 1 WHEN 's' THEN 1000 WHEN 'min' THEN 60000
                     WHEN 'h' THEN 3600000 WHEN 'd' THEN 86400000
                     WHEN 'B' THEN 1.0 / 1024 WHEN 'kB' THEN 1 WHEN 'MB' THEN 1024 WHEN 'GB' THEN 1048576
                     WHEN 'TB' THEN 1073741824 END;
$$;

-- The units a setting of unit `unit` accepts, in the order settings.py lists them (NULL: no unit).
CREATE FUNCTION neurondb.unit_family(unit text) RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN unit IN ('us', 'ms', 's', 'min', 'h', 'd') THEN ARRAY['us', 'ms', 's', 'min', 'h', 'd']
                WHEN unit IN ('B', 'kB', 'MB', 'GB', 'TB') THEN ARRAY['B', 'kB', 'MB', 'GB', 'TB'] END;
$$;

-- Raise SettingError's message for `raw` given to setting `s`: why it is refused.
CREATE FUNCTION neurondb.setting_invalid(setting_name text, raw text, why text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'invalid value for parameter "%": "%": %', setting_name,
        CASE WHEN length(raw) <= 80 THEN raw ELSE left(raw, 77) || '...' END, why
        USING ERRCODE = 'invalid_parameter_value';
END $$;

-- Refuse `raw` for the setting named `setting_name` (already known to exist) unless parse_value would accept it.
CREATE FUNCTION neurondb.check_setting_value(setting_name text, raw text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    s neurondb.neurondb_settings;
    allowed text;
    t text := regexp_replace(raw, '^\s+|\s+$', '', 'g');   -- Python's str.strip()
    v text := lower(t);
    m text[];
    number float8;
    units text[];
BEGIN
    SELECT * INTO STRICT s FROM neurondb.neurondb_settings
     WHERE name = CASE setting_name WHEN 'neurondb.neuronmon_target_latency'
                                    THEN 'neurondb.neuranmon_target_latency' ELSE setting_name END;
    units := neurondb.unit_family(s.unit);
    allowed := CASE s.vartype
        WHEN 'bool' THEN 'a Boolean: on, off, true, false, yes, no, 1, 0'
        WHEN 'enum' THEN 'one of: ' || array_to_string(s.enumvals, ', ')
        WHEN 'integer' THEN 'an integer in '
        ELSE 'a number in ' END;
    IF s.vartype IN ('integer', 'real') THEN
        allowed := allowed || s.min_val || ' .. ' || s.max_val || coalesce(' ' || s.unit, '')
                   || coalesce(' (units: ' || array_to_string(units, ', ') || ')', '');
    END IF;
    IF s.vartype = 'bool' THEN
        IF v = '' OR NOT (left('true', length(v)) = v OR left('yes', length(v)) = v OR v = '1'
                          OR (length(v) > 1 AND left('on', length(v)) = v)
                          OR left('false', length(v)) = v OR left('no', length(v)) = v OR v = '0'
                          OR (length(v) > 1 AND left('off', length(v)) = v)) THEN
            PERFORM neurondb.setting_invalid(s.name, raw, 'expected ' || allowed);
        END IF;
    ELSIF s.vartype = 'enum' THEN
        IF NOT v = ANY(s.enumvals) THEN
            PERFORM neurondb.setting_invalid(s.name, raw, 'expected ' || allowed);
        END IF;
    ELSIF s.vartype = 'string' THEN
        IF raw ~ '[\r\n]' THEN
            PERFORM neurondb.setting_invalid(s.name, raw, 'the value must be a single line of text');
        END IF;
    ELSIF s.vartype IN ('integer', 'real') THEN
        m := regexp_match(t, '^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)$');
        IF m IS NULL THEN
            PERFORM neurondb.setting_invalid(s.name, raw, 'expected ' || allowed);
        END IF;
        BEGIN
            number := m[1]::float8;
        EXCEPTION WHEN numeric_value_out_of_range THEN
            PERFORM neurondb.setting_invalid(s.name, raw, 'expected ' || allowed);
        END;
        IF m[2] <> '' THEN
            IF units IS NULL THEN
                PERFORM neurondb.setting_invalid(s.name, raw, 'this parameter takes no unit; expected ' || allowed);
            ELSIF NOT m[2] = ANY(units) THEN
                PERFORM neurondb.setting_invalid(s.name, raw,
                    format('invalid unit "%s"; expected %s', m[2], allowed));
            END IF;
            number := number * neurondb.unit_factor(m[2]) / neurondb.unit_factor(s.unit);
        END IF;
        IF number IN ('Infinity', '-Infinity') THEN
            PERFORM neurondb.setting_invalid(s.name, raw, 'expected ' || allowed);
        END IF;
        IF s.vartype = 'integer' THEN
            IF m[2] = '' AND number <> trunc(number) THEN
                PERFORM neurondb.setting_invalid(s.name, raw, 'expected ' || allowed);
            END IF;
            number := round(number);   -- rint(): half to even, as Python's round()
        END IF;
        IF NOT number BETWEEN s.min_val::float8 AND s.max_val::float8 THEN
            PERFORM neurondb.setting_invalid(s.name, raw, format('%s%s is outside the valid range %s .. %s%s',
                CASE WHEN s.vartype = 'integer' THEN number::numeric::text ELSE number::text END,
                coalesce(' ' || s.unit, ''), s.min_val, s.max_val, coalesce(' ' || s.unit, '')));
        END IF;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION neurondb.alter_system(setting_name text, setting_value text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    -- Unknown and owner-only names fail now, like ALTER SYSTEM, and so do values `config set` would refuse.
    PERFORM neurondb.check_sql_settable(setting_name);
    IF setting_value IS NOT NULL THEN
        PERFORM neurondb.check_setting_value(setting_name, setting_value);
    END IF;
    INSERT INTO neurondb.neurondb_settings_requests (name, value) VALUES (setting_name, setting_value);
    RETURN format('%s = %L queued; SELECT neurondb.reload_conf() applies it', setting_name, setting_value);
END $$;

-- `jobs retry N` marks job N's dead letter replayed (sql/queries/queue.sql retry_job): found by job id.
CREATE INDEX neurondb_dead_letter_job ON neurondb.neurondb_dead_letter (job_id) WHERE replayed_at IS NULL;

-- A cancelled job ends `cancelled`, no longer `failed`: it did not fail, and counts of failures (status,
-- llm_job_status, the document's failed-jobs query) must not include what an operator stopped on purpose.
-- Jobs cancelled before this migration (failed with 'cancelled by <role>') take the new status; a cancelled
-- job never had a dead letter.
ALTER TABLE neurondb.neurondb_job_queue
    DROP CONSTRAINT neurondb_job_queue_status_check,
    DROP CONSTRAINT neurondb_job_queue_finished_has_completed_at,
    ADD CONSTRAINT neurondb_job_queue_status_check CHECK (CASE
        WHEN status IN ('pending', 'processing', 'completed', 'failed', 'cancelled') THEN true
        ELSE neurondb.check_failed('status', status,
                                   'must be one of pending, processing, completed, failed, cancelled') END),
    ADD CONSTRAINT neurondb_job_queue_finished_has_completed_at CHECK (CASE
        WHEN status NOT IN ('completed', 'failed', 'cancelled') OR completed_at IS NOT NULL THEN true
        ELSE neurondb.check_failed('status', status, 'needs completed_at') END);

ALTER TABLE neurondb.neurondb_llm_jobs
    DROP CONSTRAINT neurondb_llm_jobs_status_check,
    DROP CONSTRAINT neurondb_llm_jobs_finished_has_completed_at,
    ADD CONSTRAINT neurondb_llm_jobs_status_check CHECK (CASE
        WHEN status IN ('pending', 'processing', 'completed', 'failed', 'cancelled') THEN true
        ELSE neurondb.check_failed('status', status,
                                   'must be one of pending, processing, completed, failed, cancelled') END),
    ADD CONSTRAINT neurondb_llm_jobs_finished_has_completed_at CHECK (CASE
        WHEN status NOT IN ('completed', 'failed', 'cancelled') OR completed_at IS NOT NULL THEN true
        ELSE neurondb.check_failed('status', status, 'needs completed_at') END);

UPDATE neurondb.neurondb_job_queue SET status = 'cancelled'
 WHERE status = 'failed' AND error_message LIKE 'cancelled by %'
   AND NOT EXISTS (SELECT 1 FROM neurondb.neurondb_dead_letter d WHERE d.job_id = neurondb_job_queue.job_id);

-- Retention (sql/queries/queue.sql delete_finished) removes cancelled jobs with the other finished ones.
DROP INDEX neurondb.neurondb_job_queue_finished;
CREATE INDEX neurondb_job_queue_finished ON neurondb.neurondb_job_queue (completed_at)
    WHERE status IN ('completed', 'failed', 'cancelled');
