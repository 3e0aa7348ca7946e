"""`neurondb schema --print`: the SQL `init` would apply, printed and never applied; applied by hand, it leaves
`init` nothing to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg

from neurondb.migrate import available, migrate


def schema_print(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "neurondb", "schema", "--print", *args, "-D", str(data_dir)],
                          capture_output=True, text=True, timeout=60)


def empty_database(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA neurondb CASCADE")


def has_schema(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT to_regnamespace('neurondb') IS NOT NULL").fetchone()[0]


def test_schema_print_applies_nothing_and_is_what_init_applies(tmp_path: Path, fresh_dsn: str) -> None:
    empty_database(fresh_dsn)
    result = schema_print(tmp_path / "d", "--dsn", fresh_dsn)
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE neurondb.neurondb_job_queue (" in result.stdout
    assert [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("-- migration ")] == \
        [m.version for m in available()]
    assert not has_schema(fresh_dsn), "schema --print applied something"
    pending = schema_print(tmp_path / "d", "--pending", "--dsn", fresh_dsn)
    assert pending.returncode == 0, pending.stderr
    assert pending.stdout == result.stdout          # nothing applied yet: every migration is pending
    assert not has_schema(fresh_dsn), "schema --print --pending applied something"
    # A DBA applies the script by hand: init then finds every migration applied, with matching checksums.
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute(result.stdout)
        assert migrate(conn) == []
    after = schema_print(tmp_path / "d", "--pending", "--dsn", fresh_dsn)
    assert after.returncode == 0 and "-- migration" not in after.stdout, after.stdout


def test_schema_print_pending_without_a_database_is_one_clear_line(tmp_path: Path) -> None:
    result = schema_print(tmp_path / "d", "--pending", "--dsn", "host=127.0.0.1 port=1 dbname=x user=y")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach the PostgreSQL server at "), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
