"""neuranmon through the real service: the query-metrics table stays bounded by its retention."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.service import Service, wait_for


@pytest.fixture
def conn(fresh_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        yield c


def test_query_metrics_older_than_the_retention_are_deleted(tmp_path: Path, fresh_dsn: str,
                                                           conn: psycopg.Connection) -> None:
    """Issue 9, defect 11: neurondb_query_metrics grew without bound (175 bytes per search)."""
    insert = ("INSERT INTO neurondb.neurondb_query_metrics (index_name, k, latency_ms, recorded_at) "
              "SELECT 'docs', 10, 1.0, now() - %s * interval '1 hour' FROM generate_series(1, %s)")
    conn.execute(insert, (30, 12_000))    # older than the retention: more than two delete batches
    conn.execute(insert, (1, 50))         # recent: kept
    svc = Service(tmp_path / "data", fresh_dsn, {"neurondb.query_metrics_retention": "1d"})
    svc.start()
    try:
        def remaining() -> int:
            return conn.execute("SELECT count(*) FROM neurondb.neurondb_query_metrics").fetchone()[0]

        wait_for(lambda: remaining() == 50, 30.0, "neuranmon to delete the old samples")
        assert "removed 12000 query samples" in svc.datadir.log_file.read_text()
    finally:
        svc.close()
