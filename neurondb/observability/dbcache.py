"""The database figures of the metrics endpoint, refreshed by a thread so a scrape never waits on PostgreSQL.

Every REFRESH_SECONDS the thread runs the two `metrics.sql` queries on its own connection (with a statement
timeout) and swaps in the new figures at once; a scrape reads whatever was swapped in last. A failed refresh
keeps the previous figures, counts an error and logs one line; their age is exported, so a stale cache shows.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import psycopg
from psycopg.rows import dict_row

from neurondb import db
from neurondb.observability.families import REFRESH_SECONDS
from neurondb.queries import query

STATEMENT_TIMEOUT_MS = 2000
log = logging.getLogger("neurondb.metrics")


@dataclass(frozen=True)
class Figures:
    queue: dict[str, float] = field(default_factory=dict)          # pending, running, dead_letters, oldest_pending_s
    indexes: list[dict] = field(default_factory=list)                # index_figures rows
    at: float = 0.0                                                  # time.monotonic() of the refresh, 0: never


class DbCache:
    def __init__(self, dsn: str, interval: float = REFRESH_SECONDS) -> None:
        self.dsn = dsn
        self.interval = interval
        self.figures = Figures()
        self.errors = 0
        self.reachable: bool | None = None        # None until the first refresh ends
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-db", daemon=True)
        self._conn: psycopg.Connection | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def age(self) -> float | None:
        """Seconds since the last successful refresh, None before the first."""
        return None if not self.figures.at else time.monotonic() - self.figures.at

    def refresh(self) -> None:
        """One refresh (the thread's body; also called directly by tests)."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = db.connect(self.dsn, "metrics", connect_timeout=3)
                self._conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
            with self._conn.cursor(row_factory=dict_row) as cur:
                queue = cur.execute(query("metrics", "queue_figures")).fetchone() or {}
                indexes = cur.execute(query("metrics", "index_figures")).fetchall()
            self.figures = Figures({k: float(v or 0) for k, v in queue.items()}, indexes, time.monotonic())
            self.reachable = True
        except (psycopg.Error, db.NotInitialized) as exc:
            self.errors += 1
            if self.reachable is not False:
                log.warning("metrics: database figures not refreshed: %s", db.first_line(exc))
            self.reachable = False
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.interval)
        if self._conn is not None:
            self._conn.close()
