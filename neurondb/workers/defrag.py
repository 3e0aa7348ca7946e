"""neurandefrag: index maintenance (document section 3). This module holds its lifecycle; compaction,
tombstone pruning, VACUUM/ANALYZE and maintenance windows are built on it."""

from __future__ import annotations

from neurondb.workers.base import BatchResult, Worker


class DefragWorker(Worker):
    kind = "neurandefrag"

    def run_batch(self) -> BatchResult:
        self.conn.execute("SELECT 1")   # keeps the connection checked each cycle until maintenance lands
        return BatchResult()
