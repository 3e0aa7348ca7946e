"""neuranmon's history of the headline figures: pictures of the service without Prometheus.

Every `neurondb.metrics_history_interval` neuranmon (workers/tuner.py) calls `HistorySampler.tick`, which
inserts one row per figure into neurondb.neurondb_metrics_history, in one statement (sql/queries/history.sql,
`sample`). `neurondb report` (observability/report.py) draws them. The figures, by `metric` (and what
`subject` holds):

- `queue_depth` (pending, processing, dead_letter): jobs in each state; pending is the O(1) counter
  `neurondb.pending_jobs()`, dead letters those not replayed;
- `jobs_per_second`, `jobs_failed_per_second` (''): jobs the queue workers completed, and failed for good,
  per second since the previous sample, from their shared-memory slots (`jobs_processed`, `jobs_failed`,
  which span worker restarts). A rate rather than a count of failed rows, which would read up to
  `neurondb.job_retention`'s finished jobs every sample;
- `search_p50_ms`, `search_p99_ms` (index): client-observed latency of the searches recorded in
  neurondb_query_metrics during the last interval (no searches: no row);
- `recall`, `ef_search` (index): the auto-tuner's view, neurondb.tuning_status (no recall measured yet: no
  row);
- `llm_attempts_per_second`, `llm_errors_per_second` (''): LLM job attempts per second (completed, retried
  and failed) and the part of them that failed or is retried, from the neuranllm slot.

The rates need two samples, so the first sample after a start has none. Rows older than
`neurondb.metrics_history_retention` are deleted `RETENTION_BATCH` at a time, at most `RETENTION_BATCHES`
batches a tick (so a tick stays short whatever the backlog), soon after start and then every tenth of the
retention (at most every minute).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import psycopg

from neurondb.queries import query
from neurondb.settings import Config
from neurondb.shm.control import SharedState

MIN_INTERVAL = 0.1           # seconds; a shorter interval (but 0, which disables) counts as this
RETENTION_EVERY = 60.0       # at most; a short retention is enforced more often (a tenth of it, >= 1 s)
RETENTION_FIRST = 5.0
RETENTION_BATCH = 5000
RETENTION_BATCHES = 20       # per tick at most (100,000 rows); a longer backlog goes on at the next tick

# metric -> (worker kind, slot counters summed): the rates computed from shared memory.
RATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "jobs_per_second": ("neuranq", ("jobs_processed",)),
    "jobs_failed_per_second": ("neuranq", ("jobs_failed",)),
    "llm_attempts_per_second": ("neuranllm", ("jobs_processed", "jobs_retried", "jobs_failed")),
    "llm_errors_per_second": ("neuranllm", ("jobs_retried", "jobs_failed")),
}
# Every metric a sample can hold, in the order the report draws them.
METRICS = ("queue_depth", "jobs_per_second", "jobs_failed_per_second", "search_p50_ms", "search_p99_ms", "recall",
           "ef_search", "llm_attempts_per_second", "llm_errors_per_second")


class HistorySampler:
    """Owned by neuranmon; `tick` is cheap when nothing is due, so the worker may call it every batch."""

    def __init__(self, config: Config, shared: SharedState, beat: Callable[[], None]) -> None:
        self.config = config
        self.shared = shared
        self.beat = beat
        self._last_sample = -math.inf                                  # monotonic
        self._next_retention = time.monotonic() + RETENTION_FIRST
        self._previous: tuple[float, dict[str, int]] | None = None   # (monotonic time, counter totals)

    def interval(self) -> float:
        """Seconds between samples; 0 when sampling is off."""
        seconds = self.config.get_seconds("metrics_history_interval")
        return max(seconds, MIN_INTERVAL) if seconds > 0 else 0.0

    def due_in(self) -> float:
        """Seconds until the next sample is due (infinite when sampling is off): the worker's nap is no
        longer than this."""
        interval = self.interval()
        if interval == 0:
            return math.inf
        return max(0.0, self._last_sample + interval - time.monotonic())

    def tick(self, conn: psycopg.Connection) -> None:
        now = time.monotonic()
        if now >= self._next_retention:
            self._retention(conn)
        interval = self.interval()
        if interval == 0:
            self._previous = None          # a rate over the time sampling was off would mislead
            return
        if now - self._last_sample < interval:     # from the last sample: a reloaded interval applies at once
            return
        self._last_sample = now
        self.sample(conn, interval)

    def sample(self, conn: psycopg.Connection, window_s: float) -> None:
        """Insert one sample of every figure; search percentiles over the last `window_s` seconds."""
        now, totals = time.monotonic(), self._counters()
        rates: dict[str, float] = {}
        if self._previous is not None and now > self._previous[0]:
            then, before = self._previous
            rates = {metric: (totals[metric] - before[metric]) / (now - then) for metric in RATES}
        self._previous = (now, totals)
        conn.execute(query("history", "sample"), {
            "window_s": window_s, "metric": list(rates), "subject": [""] * len(rates),
            "value": list(rates.values())})

    def _counters(self) -> dict[str, int]:
        """Each rate's counters summed over the slots of its worker kind."""
        slots = self.shared.slots
        out = {}
        for metric, (kind, fields) in RATES.items():
            mine = slots["kind"] == kind.encode()
            out[metric] = int(sum(np.sum(slots[field][mine]) for field in fields))
        return out

    def _retention(self, conn: psycopg.Connection) -> None:
        retention = self.config.get_seconds("metrics_history_retention")
        self._next_retention = time.monotonic() + min(RETENTION_EVERY, max(1.0, retention / 10))
        if retention <= 0:
            return
        for _ in range(RETENTION_BATCHES):
            deleted = conn.execute(query("history", "delete_old"), {"retention_s": retention,
                                                                    "limit": RETENTION_BATCH}).rowcount
            self.beat()
            if deleted < RETENTION_BATCH:
                return
        self._next_retention = time.monotonic()      # more to delete: go on at the next tick
