-- New indexes start with neurondb.hnsw_default_ef_search (as published in neurondb.settings) unless given.

CREATE OR REPLACE FUNCTION neurondb.create_index(
    index_name text,
    dim integer,
    metric text DEFAULT 'cosine',
    m integer DEFAULT 16,
    ef_construction integer DEFAULT 200,
    provider text DEFAULT NULL,
    model_name text DEFAULT NULL,
    ef_search integer DEFAULT NULL
) RETURNS text LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO neurondb.neurondb_indexes
        (index_name, dim, metric, m, ef_construction, provider, model_name, ef_search)
    VALUES (create_index.index_name, create_index.dim, lower(create_index.metric), create_index.m,
            create_index.ef_construction, create_index.provider, create_index.model_name,
            coalesce(create_index.ef_search,
                     neurondb.current_setting_int('neurondb.hnsw_default_ef_search', 40)::integer));
    PERFORM pg_notify('neurondb_vectors', '');
    RETURN create_index.index_name;
EXCEPTION WHEN unique_violation THEN
    RAISE EXCEPTION 'index "%" already exists', create_index.index_name USING ERRCODE = 'duplicate_object';
END $$;

-- The 7-argument form of 004 is replaced by the one above (same call, one more optional argument).
DROP FUNCTION neurondb.create_index(text, integer, text, integer, integer, text, text);
