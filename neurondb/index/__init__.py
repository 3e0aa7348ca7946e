"""Vector indexes: `hnsw` is the graph (plain numpy arrays in one shared memory segment + numba kernels),
`store` puts it in shared memory, `sync` keeps it in step with PostgreSQL, `snapshot` persists it."""
