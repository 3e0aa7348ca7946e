-- neuranmon's tuning (issue 10): per-index mode and targets, the state of each index, the history of
-- decisions, and the view that shows them.

ALTER TABLE neurondb.neurondb_indexes
    ADD COLUMN tuning text NOT NULL DEFAULT 'auto'
        CONSTRAINT neurondb_indexes_tuning_is_auto_or_pinned CHECK (tuning IN ('auto', 'pinned')),
    ADD COLUMN target_recall double precision
        CONSTRAINT neurondb_indexes_target_recall_in_0_1
        CHECK (target_recall IS NULL OR (target_recall > 0 AND target_recall <= 1)),
    ADD COLUMN target_latency_ms double precision
        CONSTRAINT neurondb_indexes_target_latency_ms_positive
        CHECK (target_latency_ms IS NULL OR target_latency_ms > 0);

-- One row per decision that changed something (ef, hybrid weight, or the index's state).
CREATE TABLE neurondb.neurondb_tuning_history (
    history_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    index_name        text NOT NULL,
    old_ef            integer,
    new_ef            integer,
    recall            double precision,     -- replayed recall@k at new_ef (mean over the sampled queries)
    recall_low        double precision,     -- its one-sided 95 % lower confidence bound
    recall_high       double precision,
    p50_ms            double precision,     -- real searches, client-observed, over the tuner's window
    p95_ms            double precision,
    p99_ms            double precision,
    predicted_p95_ms  double precision,     -- at new_ef
    old_hybrid_weight double precision,
    new_hybrid_weight double precision,
    ndcg_before       double precision,
    ndcg_after        double precision,
    queries           integer,              -- sampled queries the decision was measured on
    state             text NOT NULL,
    reason            text NOT NULL
);
CREATE INDEX neurondb_tuning_history_index ON neurondb.neurondb_tuning_history (index_name, recorded_at);

-- The latest evaluation of each index, rewritten every cycle.
CREATE TABLE neurondb.neurondb_tuning_state (
    index_name        text PRIMARY KEY REFERENCES neurondb.neurondb_indexes (index_name) ON DELETE CASCADE,
    state             text NOT NULL,        -- waiting, exploring, converged, unattainable, pinned
    reason            text,
    ef_search         integer,
    recall            double precision,
    recall_low        double precision,
    measured_recall   double precision,     -- recall@k of the real searches' own results (the ring's samples)
    p50_ms            double precision,
    p90_ms            double precision,
    p95_ms            double precision,
    p99_ms            double precision,
    predicted_p95_ms  double precision,
    queries           integer,
    curve             jsonb,                -- [{ef, recall, low, high, kernel_ms}, ...] measured this cycle
    ndcg              double precision,     -- mean nDCG@k of the judged hybrid queries at the current weight
    judged            integer,              -- judged hybrid queries that counted
    weight_decision   text,
    evaluated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE VIEW neurondb.tuning_status AS
    SELECT i.index_name,
           coalesce(st.ef_search, i.ef_search) AS ef_search,
           i.tuning,
           coalesce(i.target_recall,
                    (SELECT setting::float8 FROM neurondb.neurondb_settings
                      WHERE name = 'neurondb.neuranmon_target_recall')) AS target_recall,
           coalesce(i.target_latency_ms,
                    (SELECT setting::float8 FROM neurondb.neurondb_settings
                      WHERE name = 'neurondb.neuranmon_target_latency')) AS target_latency_ms,
           coalesce(t.state, 'waiting') AS state,
           t.reason AS last_decision,
           t.recall, t.recall_low, t.measured_recall, t.p50_ms, t.p95_ms, t.p99_ms, t.predicted_p95_ms,
           t.queries, t.evaluated_at,
           i.hybrid_weight, t.ndcg, t.judged, t.weight_decision,
           (SELECT max(h.recorded_at) FROM neurondb.neurondb_tuning_history h
             WHERE h.index_name = i.index_name) AS last_change_at
      FROM neurondb.neurondb_indexes i
      LEFT JOIN neurondb.neurondb_tuning_state t USING (index_name)
      LEFT JOIN neurondb.neurondb_index_stats st USING (index_name);
