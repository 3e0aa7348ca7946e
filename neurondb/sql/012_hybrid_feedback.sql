-- Hybrid weight learning (issue 10): each hybrid search's two raw candidate lists under its query id, and
-- the relevance the application reports for the documents of a search.

CREATE TABLE neurondb.neurondb_hybrid_queries (
    query_id       bigint PRIMARY KEY,
    index_name     text NOT NULL,
    k              integer NOT NULL,
    hybrid_weight  double precision NOT NULL,
    vector_ids     bigint[] NOT NULL,             -- neurondb_vectors.id, best first
    vector_scores  double precision[] NOT NULL,   -- raw similarities
    text_ids       bigint[] NOT NULL,
    text_ranks     double precision[] NOT NULL,   -- raw ts_rank_cd
    recorded_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX neurondb_hybrid_queries_index ON neurondb.neurondb_hybrid_queries (index_name, recorded_at);
CREATE INDEX neurondb_hybrid_queries_time ON neurondb.neurondb_hybrid_queries (recorded_at);

-- Relevance feedback: `client.feedback(query_id, doc_id, relevance)` or a plain INSERT. The query id is the
-- one a search returned (`hits.query_id`); relevance 0 means judged not relevant.
CREATE TABLE neurondb.neurondb_feedback (
    feedback_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    query_id     bigint NOT NULL,
    doc_id       text NOT NULL,
    relevance    double precision NOT NULL DEFAULT 1.0
        CONSTRAINT neurondb_feedback_relevance_in_0_10 CHECK (relevance >= 0 AND relevance <= 10),
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX neurondb_feedback_query ON neurondb.neurondb_feedback (query_id);
CREATE INDEX neurondb_feedback_time ON neurondb.neurondb_feedback (recorded_at);

-- Cache rotation (neurondb/caches.py): what neuranmon removed from the LLM / query-embedding cache, one row
-- per cycle that removed something or whose entry count changed; cache_status shows the latest.
CREATE TABLE neurondb.neurondb_cache_rotation (
    rotation_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rotated_at   timestamptz NOT NULL DEFAULT now(),
    cache_name   text NOT NULL,
    expired      integer NOT NULL,
    evicted      integer NOT NULL,
    entries      bigint NOT NULL,
    max_entries  bigint NOT NULL
);
CREATE INDEX neurondb_cache_rotation_time ON neurondb.neurondb_cache_rotation (rotated_at);

CREATE VIEW neurondb.cache_status AS
    SELECT DISTINCT ON (cache_name) cache_name, entries, max_entries, expired AS last_expired,
           evicted AS last_evicted, rotated_at AS last_rotation_at,
           (SELECT sum(expired) FROM neurondb.neurondb_cache_rotation r WHERE r.cache_name = c.cache_name) AS expired,
           (SELECT sum(evicted) FROM neurondb.neurondb_cache_rotation r WHERE r.cache_name = c.cache_name) AS evicted
      FROM neurondb.neurondb_cache_rotation c
     ORDER BY cache_name, rotated_at DESC, rotation_id DESC;
