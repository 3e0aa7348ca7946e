"""neuranllm: the LLM job worker (document section 4). This module holds its lifecycle; provider calls,
retries, rate limits and the result cache are built on it."""

from __future__ import annotations

from neurondb.workers.base import BatchResult, Worker
from neurondb.workers.leases import recover_expired


class LLMWorker(Worker):
    kind = "neuranllm"
    listen_channels = ("neurondb_llm_jobs",)

    def run_batch(self) -> BatchResult:
        recovered = recover_expired(self.conn, "neurondb.neurondb_llm_jobs")
        if recovered:
            self.log.warning("recovered %d LLM jobs whose lease expired", recovered)
        return BatchResult()
