"""The CLI's one error handler: an expected failure is one line `error: ...` with a hint, exit 1 (2 for a
usage error), never a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_cli import neurondb

DOWN_DSN = "host=127.0.0.1 port=1 dbname=x user=y password=hunter2 connect_timeout=5"


def error_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The one line the command printed, after checking it failed with `code` and nothing else."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def stopped_embedded() -> Iterator[Path]:
    """An initialised embedded installation whose PostgreSQL was stopped afterwards (under /tmp: the
    server's system user must reach it)."""
    d = Path(tempfile.mkdtemp(prefix="neurondb-clierr-", dir="/tmp"))
    try:
        assert neurondb("init", data_dir=d).returncode == 0
        assert neurondb("db", "stop", data_dir=d).returncode == 0
        yield d
    finally:
        neurondb("db", "stop", "-m", "immediate", data_dir=d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("args", [("jobs", "list"), ("index", "list"), ("llm", "list"),
                                  ("search", "demo", "--vector", "[1, 2]")])
def test_embedded_server_stopped_says_how_to_start_it(stopped_embedded: Path, args: tuple[str, ...]) -> None:
    line = error_line(neurondb(*args, data_dir=stopped_embedded))
    assert "embedded PostgreSQL" in line and "is stopped" in line
    assert f"neurondb db start -D {stopped_embedded}" in line and f"neurondb start -D {stopped_embedded}" in line


def test_external_server_down_names_it_without_the_password(tmp_path: Path) -> None:
    line = error_line(neurondb("jobs", "list", "--dsn", DOWN_DSN, data_dir=tmp_path / "d"))
    assert line.startswith("error: cannot reach the PostgreSQL server at ") and "Connection refused" in line
    assert "host=127.0.0.1" in line and "port=1" in line
    assert "hunter2" not in line


def test_full_queue_names_the_setting_and_the_depth(tmp_path: Path, fresh_dsn: str) -> None:
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    (d / "neurondb.conf").write_text("neurondb.neuranq_queue_depth = 1\n")
    assert neurondb("init", "--dsn", fresh_dsn, data_dir=d).returncode == 0
    assert neurondb("jobs", "enqueue", "test.noop", data_dir=d).returncode == 0
    line = error_line(neurondb("jobs", "enqueue", "test.noop", data_dir=d))
    assert "2 pending jobs exceed neurondb.neuranq_queue_depth = 1" in line
    assert "raise neurondb.neuranq_queue_depth" in line


def test_click_errors_are_one_line(tmp_path: Path, fresh_dsn: str) -> None:
    line = error_line(neurondb("jobs", "list", "--limit", "0", data_dir=tmp_path / "d"), code=2)
    assert "--limit" in line and "neurondb jobs list --help" in line
    bare = subprocess.run([sys.executable, "-m", "neurondb", "jobs"], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and "Commands:" in bare.stderr and "error:" not in bare.stderr
    line = error_line(neurondb("jobs", "show", "999", "--dsn", fresh_dsn, data_dir=tmp_path / "d"))
    assert line == "error: no job 999"


def test_config_commands_take_a_name_without_the_prefix(tmp_path: Path) -> None:
    d = tmp_path / "d"
    described = subprocess.run([sys.executable, "-m", "neurondb", "config", "describe", "NeuranQ_Naptime"],
                               capture_output=True, text=True, timeout=60)
    assert described.returncode == 0, described.stderr
    assert described.stdout.startswith("neurondb.neuranq_naptime (integer, unit ms")
    written = neurondb("config", "set", "neuranq_naptime", "500", data_dir=d)
    assert written.returncode == 0, written.stderr
    assert "neurondb.neuranq_naptime = '500'" in (d / "neurondb.auto.conf").read_text()
    assert neurondb("config", "reset", "neuranq_naptime", data_dir=d).returncode == 0
    assert "neuranq_naptime" not in (d / "neurondb.auto.conf").read_text()
    line = error_line(neurondb("config", "reset", "neuranq_naptme", data_dir=d))
    assert line == 'error: unrecognized configuration parameter "neuranq_naptme"'


def test_init_with_a_dead_dsn_leaves_a_working_installation_alone(tmp_path: Path, fresh_dsn: str) -> None:
    d = tmp_path / "d"
    assert neurondb("init", "--dsn", fresh_dsn, data_dir=d).returncode == 0
    recorded = (d / "dsn").read_text()
    line = error_line(neurondb("init", "--dsn", DOWN_DSN, data_dir=d))
    assert "cannot reach the PostgreSQL server" in line and "hunter2" not in line
    assert (d / "dsn").read_text() == recorded
    after = neurondb("jobs", "list", data_dir=d)
    assert after.returncode == 0 and after.stdout.strip() == "(none)", after.stderr
