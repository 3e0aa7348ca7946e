"""Every SQL statement of the source document runs unchanged against a freshly initialised database.

Two statements query PostgreSQL's own catalogs (pg_settings, pg_stat_activity as 'background worker'),
where an external service cannot appear: they run against neurondb.settings and neurondb.workers instead,
with nothing else changed. The fragmentation queries select a `tablename` column pg_stat_user_tables does
not have: they run against neurondb.pg_stat_user_tables, which adds it. `ALTER SYSTEM SET neurondb.*` lines
are tested through `neurondb config set` in test_settings.py.
"""

from __future__ import annotations

import re

import psycopg
import pytest

from neurondb.migrate import migrate

CATALOG_EQUIVALENTS = {
    "FROM pg_settings": "FROM neurondb.settings",
    "FROM pg_stat_activity": "FROM neurondb.workers",
    "pg_reload_conf()": "neurondb.reload_conf()",
    # The document's own bug: pg_stat_user_tables has `relname`, not `tablename`.
    "FROM pg_stat_user_tables": "FROM neurondb.pg_stat_user_tables",
}


def document_statements(text: str) -> list[str]:
    """The statements of the document's ```sql blocks, comments removed, split on semicolons."""
    statements = []
    for block in re.findall(r"```sql\n(.*?)```", text, flags=re.S):
        code = "\n".join(line.split("--", 1)[0] for line in block.splitlines())
        statements.extend(s.strip() for s in code.split(";") if s.strip())
    return statements


def runnable(statement: str) -> str | None:
    """The statement as it runs against neurondb, or None for lines that are settings, not SQL."""
    if statement.upper().startswith("ALTER SYSTEM") or re.match(r"^neurondb\.\w+\s*=", statement):
        return None
    for catalog, ours in CATALOG_EQUIVALENTS.items():
        statement = statement.replace(catalog, ours)
    return statement


def test_document_has_the_expected_queries(document_text: str) -> None:
    queries = [s for s in document_statements(document_text) if runnable(s)]
    assert len(queries) >= 15, queries
    assert any("neurondb.neurondb_job_queue" in q for q in queries)
    assert any("neurondb.vector_stats" in q for q in queries)


def test_every_document_query_runs(fresh_dsn: str, document_text: str) -> None:
    queries = [q for q in map(runnable, document_statements(document_text)) if q]
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        for query in queries:
            try:
                cur = conn.execute(query)
            except psycopg.Error as exc:  # pragma: no cover - the failure message is the point
                pytest.fail(f"document query failed: {query!r}: {exc}")
            assert cur.description, f"no result columns from {query!r}"


def test_queue_status_query_counts_jobs(fresh_dsn: str, document_text: str) -> None:
    """The document's 'check queue status' query returns real counts, not just columns."""
    query = next(q for q in document_statements(document_text)
                 if "GROUP BY status" in q and "neurondb_job_queue" in q)
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO neurondb.neurondb_job_queue (job_type, payload) "
                     "SELECT 'embed', '{}' FROM generate_series(1, 3)")
        conn.execute("UPDATE neurondb.neurondb_job_queue SET status = 'completed', completed_at = now() "
                     "WHERE job_id = (SELECT min(job_id) FROM neurondb.neurondb_job_queue)")
        assert dict(conn.execute(query).fetchall()) == {"pending": 2, "completed": 1}


def test_llm_aliases_and_status_view(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO neurondb.neurondb_llm_jobs (operation, input_text) "
                     "VALUES ('complete', 'hi'), ('embed', 'x'), ('rerank', 'q'), ('embedding', 'y')")
        rows = conn.execute("SELECT operation, status, jobs FROM neurondb.llm_job_status "
                            "ORDER BY operation").fetchall()
        assert rows == [("completion", "pending", 1), ("embedding", "pending", 2), ("reranking", "pending", 1)]


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("INSERT INTO neurondb.neurondb_job_queue (job_type, status) VALUES ('x', 'done')",
         "status: 'done' must be one of pending"),
        ("INSERT INTO neurondb.neurondb_job_queue (job_type, retry_count) VALUES ('x', -1)", "retry_count"),
        ("INSERT INTO neurondb.neurondb_llm_jobs (operation) VALUES ('summarise')",
         "operation: 'summarise' must be one of"),
        ("INSERT INTO neurondb.neurondb_query_metrics (index_name, k, latency_ms, recall) "
         "VALUES ('i', 10, 1, 1.5)", "recall"),
    ],
)
def test_constraints_reject_impossible_values(fresh_dsn: str, sql: str, message: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn, pytest.raises(psycopg.errors.CheckViolation) as err:
        conn.execute(sql)
    assert message in str(err.value)


def test_vectors_rejected_at_the_door(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO neurondb.neurondb_indexes (index_name, dim, metric) VALUES ('docs', 3, 'l2')")
        for bad, message in [("{1,2}", "has 2 dimensions, index docs expects 3"),
                             ("{1,NaN,3}", "NaN or infinity"),
                             ("{1,NULL,3}", "contains NULL")]:
            with pytest.raises(psycopg.errors.DataException, match=message):
                conn.execute("INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, embedding) "
                             "VALUES ('docs', 'd', %s)", (bad,))
        conn.execute("INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, content, embedding) "
                     "VALUES ('docs', 'd', 'hello', '{1,2,3}')")
        assert conn.execute("SELECT index_name, doc_id, op FROM neurondb.neurondb_vector_changes").fetchall() \
            == [("docs", "d", "I")]


def test_migrate_is_idempotent_and_detects_edits(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        assert migrate(conn) == []
        conn.execute("UPDATE neurondb.schema_migrations SET checksum = 'x' WHERE version = '001_schema'")
        with pytest.raises(Exception, match="changed after it was applied"):
            migrate(conn)
