"""neuranmon: the auto-tuner (document section 2). This module holds its lifecycle; sampling query metrics,
ef_search tuning and the metrics endpoint are built on it."""

from __future__ import annotations

from neurondb.workers.base import BatchResult, Worker


class TunerWorker(Worker):
    kind = "neuranmon"

    def run_batch(self) -> BatchResult:
        self.conn.execute("SELECT 1")   # keeps the connection checked each cycle until tuning lands
        return BatchResult()
