-- The neurondb.settings view's table (neurondb/instance.py publish_settings): the values in force, as the
-- supervisor last loaded them, replaced whole in one transaction.

-- name: clear_settings
DELETE FROM neurondb.neurondb_settings;

-- name: insert_setting
-- One row of Config.rows() (extra keys of the row are ignored).
INSERT INTO neurondb.neurondb_settings (name, setting, unit, short_desc, context, vartype, source, min_val,
                                        max_val, enumvals, boot_val, sourcefile, sourceline, pending_restart,
                                        rejected_value, rejected_reason, sql_settable)
VALUES (%(name)s, %(setting)s, %(unit)s, %(short_desc)s, %(context)s, %(vartype)s, %(source)s, %(min_val)s,
        %(max_val)s, %(enumvals)s, %(boot_val)s, %(sourcefile)s, %(sourceline)s, %(pending_restart)s,
        %(rejected_value)s, %(rejected_reason)s, %(sql_settable)s);
