-- Declarative recall (issue 16): per index, whether searches that give neither ef nor target_recall use the
-- static tuned ef or stop per query at the index's target recall; neuranmon's recall model per index; the
-- model's figures in the tuning history and the mode in tuning_status.

ALTER TABLE neurondb.neurondb_indexes
    ADD COLUMN recall_mode text NOT NULL DEFAULT 'static'
        CONSTRAINT neurondb_indexes_recall_mode_is_static_or_adaptive CHECK (recall_mode IN ('static', 'adaptive'));

ALTER TABLE neurondb.neurondb_tuning_history
    ADD COLUMN model_version integer,          -- the recall model's version (its shared-memory generation)
    ADD COLUMN model_recall double precision,  -- its mean recall@k over the sampled queries at the target
    ADD COLUMN model_below double precision;   -- the share of those queries below target - 0.05

-- The latest state of each index's recall model, rewritten every tuning cycle.
CREATE TABLE neurondb.neurondb_recall_model (
    index_name   text PRIMARY KEY REFERENCES neurondb.neurondb_indexes (index_name) ON DELETE CASCADE,
    version      integer NOT NULL,             -- 0: none yet
    state        text NOT NULL,                -- serving, withdrawn (searches use the static ef), waiting
    reason       text NOT NULL,
    recall       double precision,
    below        double precision,
    train_ms     double precision,             -- the last training's replay + fit + calibration
    evaluated_at timestamptz NOT NULL DEFAULT now()
);

-- tuning_status gains the recall mode and the model's state: the view as it stands is kept under another name
-- and wrapped (rather than its definition repeated here), so this stays right whatever earlier migrations
-- made of it.
ALTER VIEW neurondb.tuning_status RENAME TO ef_tuning_status;

CREATE VIEW neurondb.tuning_status AS
    SELECT s.*,
           i.recall_mode,
           coalesce(rm.state, 'waiting') AS model_state,
           rm.version AS model_version,
           rm.recall AS model_recall,
           rm.below AS model_below,
           rm.reason AS model_reason
      FROM neurondb.ef_tuning_status s
      JOIN neurondb.neurondb_indexes i USING (index_name)
      LEFT JOIN neurondb.neurondb_recall_model rm USING (index_name);
