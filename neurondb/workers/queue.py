"""neuranq: the queue worker (document section 1). This module holds its lifecycle; job processing
(claiming with SKIP LOCKED, retries, dead letters, rate limits, job types) is built on it."""

from __future__ import annotations

import importlib

from neurondb.workers.base import BatchResult, Worker
from neurondb.workers.leases import recover_expired


class QueueWorker(Worker):
    kind = "neuranq"
    listen_channels = ("neurondb_jobs",)

    def on_start(self) -> None:
        """Import the user's job-type modules first: a typo there should stop the worker loudly at start
        (and turn FATAL after repeated crashes), not fail every job later."""
        modules = str(self.config.get("neurondb.neuranq_job_modules") or "")
        for name in filter(None, (m.strip() for m in modules.split(","))):
            importlib.import_module(name)

    def run_batch(self) -> BatchResult:
        recovered = recover_expired(self.conn, "neurondb.neurondb_job_queue")
        if recovered:
            self.log.warning("recovered %d jobs whose lease expired", recovered)
        return BatchResult()
