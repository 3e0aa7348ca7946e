-- The operator's commands on indexes (neurondb/cli.py `neurondb index ...`) and the demo's index
-- (neurondb/demo.py).

-- name: create_index
-- name, dim, metric, m, ef_construction, provider, model, ef_search (NULL: the defaults).
SELECT neurondb.create_index(%s, %s, %s, %s, %s, %s, %s, %s);

-- name: list_indexes
SELECT index_name, dim, metric, vectors, graph_nodes, tombstones, memory, ef_search, pending_changes, task
  FROM neurondb.vector_stats ORDER BY index_name;

-- name: index_stats
SELECT * FROM neurondb.vector_stats WHERE index_name = %s;

-- name: drop_index
-- False when there is no such index.
SELECT neurondb.drop_index(%s);

-- name: maintenance_window
-- The window the service has in force (as it last published its settings), for the message of a request.
SELECT setting FROM neurondb.neurondb_settings WHERE name = 'neurondb.neurandefrag_maintenance_window';

-- name: demo_exists
SELECT 1 FROM neurondb.neurondb_indexes WHERE index_name = 'demo';

-- name: create_demo
SELECT neurondb.create_index('demo', 384);
