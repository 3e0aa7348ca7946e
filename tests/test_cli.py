"""The `neurondb` command as an operator uses it: exit codes and messages, DSN mode, config commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest


def neurondb(*args: str, data_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "neurondb", *args, "-D", str(data_dir)], capture_output=True,
                          text=True, timeout=120, env=env)


def postgres_under(path: Path) -> list[str]:
    """Command lines of postgres processes whose arguments mention `path` (their -D data directory)."""
    out = subprocess.run(["pgrep", "-a", "-x", "postgres"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line]


def test_dsn_mode_starts_nothing(tmp_path: Path, fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA neurondb CASCADE")
    result = neurondb("init", "--dsn", fresh_dsn, data_dir=tmp_path / "d")
    assert result.returncode == 0, result.stderr
    assert "(external)" in result.stdout and "001_schema" in result.stdout
    assert not (tmp_path / "d" / "pgdata").exists()
    assert postgres_under(tmp_path) == [], "a PostgreSQL was started in --dsn mode"
    # The DSN is recorded (owner-only) so later commands need no --dsn.
    assert (tmp_path / "d" / "dsn").stat().st_mode & 0o077 == 0
    assert neurondb("dsn", data_dir=tmp_path / "d").stdout.strip() == fresh_dsn
    with psycopg.connect(fresh_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM neurondb.settings").fetchone()[0] > 40


def test_not_initialised_says_what_to_do(tmp_path: Path) -> None:
    result = neurondb("jobs", "list", data_dir=tmp_path / "empty")
    assert result.returncode == 1
    assert "run `neurondb init" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("config", "set", "neurondb.neuranq_batch_size", "0"), "outside the valid range 1 .. "),
    (("config", "set", "neurondb.neuranq_naptime", "soon"), "neurondb.neuranq_naptime"),
    (("config", "set", "neurondb.neuranq_enabeld", "on"), "did you mean"),
    (("config", "set", "neurondb.neuranq_enabled", "maybe"), "neurondb.neuranq_enabled"),
    (("config", "reset", "neurondb.nope"), "unrecognized"),
])
def test_config_errors_are_clear(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = neurondb(*args, data_dir=tmp_path / "d")
    assert result.returncode == 1, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr


def test_config_set_show_reset(tmp_path: Path) -> None:
    d = tmp_path / "d"
    out = neurondb("config", "set", "neurondb.neuronmon_target_latency", "50", data_dir=d)
    assert out.returncode == 0 and "neurondb.neuranmon_target_latency" in out.stdout and "reload" in out.stdout
    out = neurondb("config", "set", "neurondb.neuranq_workers", "2", data_dir=d)
    assert "next `neurondb start`" in out.stdout
    shown = neurondb("config", "show", "target_latency", "--json", data_dir=d).stdout
    assert '"setting": "50"' in shown
    assert neurondb("config", "reset", "neurondb.neuranmon_target_latency", data_dir=d).returncode == 0
    assert '"setting": "100"' in neurondb("config", "show", "target_latency", "--json", data_dir=d).stdout


def test_bad_config_file_refuses_to_start(tmp_path: Path, fresh_dsn: str) -> None:
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    (d / "neurondb.conf").write_text("neurondb.neuranq_naptime = 5\nneurondb.bogus = 1\n")
    result = neurondb("start", "--dsn", fresh_dsn, data_dir=d)
    assert result.returncode == 1
    assert "neurondb.conf:1" in result.stderr and "neurondb.conf:2" in result.stderr
    assert not (d / "neurondb.pid").exists(), "a supervisor started despite the bad file"


def test_jobs_commands_validate_input(tmp_path: Path, fresh_dsn: str) -> None:
    d = tmp_path / "d"
    assert neurondb("init", "--dsn", fresh_dsn, data_dir=d).returncode == 0
    bad = neurondb("jobs", "enqueue", "test.noop", "{not json", data_dir=d)
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    job_id = neurondb("jobs", "enqueue", "test.noop", '{"a": 1}', "--tenant", "acme", data_dir=d).stdout.strip()
    assert job_id.isdigit()
    assert '"tenant_id": "acme"' in neurondb("jobs", "show", job_id, data_dir=d).stdout
    missing = neurondb("jobs", "show", "999999", data_dir=d)
    assert missing.returncode == 1 and "no job 999999" in missing.stderr
