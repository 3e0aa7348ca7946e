-- `neurondb status` (neurondb/status.py): the database's side of the picture.

-- name: queue_counts
-- Jobs of the queue by status.
SELECT status, count(*) FROM neurondb.neurondb_job_queue GROUP BY status;

-- name: llm_job_counts
-- LLM jobs by status.
SELECT status, count(*) FROM neurondb.neurondb_llm_jobs GROUP BY status;
