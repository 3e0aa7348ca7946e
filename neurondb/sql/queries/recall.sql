-- Queries of neuranmon's recall model (neurondb/recall.py) and of the search client's declarative recall.

-- name: modes
-- Each index's recall mode and its own target recall (NULL: the setting neurondb.neuranmon_target_recall).
SELECT index_name, recall_mode, target_recall FROM neurondb.neurondb_indexes ORDER BY index_name;

-- name: upsert_model
INSERT INTO neurondb.neurondb_recall_model AS m
       (index_name, version, state, reason, recall, below, train_ms, evaluated_at)
SELECT %(index)s, %(version)s, %(state)s, %(reason)s, %(recall)s, %(below)s, %(train_ms)s, now()
 WHERE EXISTS (SELECT 1 FROM neurondb.neurondb_indexes WHERE index_name = %(index)s)
ON CONFLICT (index_name) DO UPDATE SET
       version = EXCLUDED.version, state = EXCLUDED.state, reason = EXCLUDED.reason, recall = EXCLUDED.recall,
       below = EXCLUDED.below, train_ms = coalesce(EXCLUDED.train_ms, m.train_ms), evaluated_at = now();

-- name: model_history
-- A model trained or withdrawn: one history row (ef unchanged) with the model's figures.
INSERT INTO neurondb.neurondb_tuning_history
       (index_name, old_ef, new_ef, queries, state, reason, model_version, model_recall, model_below)
VALUES (%(index)s, %(ef)s, %(ef)s, %(queries)s, %(state)s, %(reason)s, %(version)s, %(recall)s, %(below)s);
