"""Commands that misled (issue 14): config show's patterns and bad lines, llm submit on a provider that
cannot serve the job, db status with an external database, -D help and -h, the README's own link."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from neurondb import llm
from neurondb.paths import DataDir
from neurondb.providers import ProviderError
from neurondb.settings import Config
from tests.test_cli import neurondb

REPO = Path(__file__).resolve().parent.parent
DEAD_DSN = "host=127.0.0.1 port=1 dbname=x user=y password=s3cret connect_timeout=2"


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_config_show_matches_without_prefix_and_says_when_nothing_does(tmp_path: Path) -> None:
    result = neurondb("config", "show", "neuranq_*", "--json", data_dir=tmp_path / "d")
    assert result.returncode == 0, result.stderr
    assert "neurondb.neuranq_naptime" in result.stdout and "neurondb.llm_provider" not in result.stdout
    result = neurondb("config", "show", "nosuch_*", data_dir=tmp_path / "d")
    assert result.returncode == 1
    assert one_error_line(result.stderr).startswith("error: no setting matches 'nosuch_*'")


def test_config_show_survives_a_bad_line(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    conf = d / "neurondb.conf"
    conf.write_text("neurondb.neuranq_batch_size = 17\nneurondb.neuranq_naptime = soon\n")
    result = neurondb("config", "show", "neuranq_", "--json", data_dir=d)
    assert result.returncode == 0, result.stderr
    assert '"setting": "17"' in result.stdout   # the file's valid value is shown
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {conf}:2: "), result.stderr


def test_llm_submit_refuses_what_the_provider_cannot_serve(tmp_path: Path, fresh_dsn: str) -> None:
    d = tmp_path / "d"
    assert neurondb("init", "--dsn", fresh_dsn, data_dir=d).returncode == 0
    result = neurondb("llm", "submit", "completion", "Say hello", "--wait", data_dir=d)
    assert result.returncode == 1, result.stdout
    line = one_error_line(result.stderr)
    assert "provider local does not serve completions" in line and "neurondb.llm_provider" in line
    with psycopg.connect(fresh_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM neurondb.neurondb_llm_jobs").fetchone()[0] == 0
        config = Config(DataDir(d))
        with pytest.raises(ProviderError, match="does not serve completions"):
            llm.submit(conn, "completion", None, "Say hello", config=config)
        assert llm.submit(conn, "embedding", None, "Say hello", config=config) > 0


def test_db_status_with_an_external_database(tmp_path: Path, fresh_dsn: str) -> None:
    result = neurondb("db", "status", "--dsn", fresh_dsn, data_dir=tmp_path / "d")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("external database ") and "accepts connections" in result.stdout
    result = neurondb("db", "status", "--dsn", DEAD_DSN, data_dir=tmp_path / "d")
    assert result.returncode == 1
    assert "external database" in result.stdout and "cannot connect" in result.stdout
    assert "s3cret" not in result.stdout + result.stderr and "********" in result.stdout


def test_help_states_the_default_rule_and_h_works(tmp_path: Path) -> None:
    bare = subprocess.run([sys.executable, "-m", "neurondb", "-h"], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0 and bare.stdout.startswith("Usage:"), bare.stderr
    for args in (("jobs", "list", "-h"), ("config", "show", "-h")):
        result = neurondb(*args, data_dir=tmp_path / "d")
        assert result.returncode == 0 and result.stdout.startswith("Usage:"), result.stderr
    help_text = " ".join(neurondb("start", "-h", data_dir=tmp_path / "d").stdout.split())
    assert "/var/lib/neurondb as root" in help_text and "~/.local/share/neurondb" in help_text


def test_readme_links_stay_inside_the_repository() -> None:
    for target in re.findall(r"\]\(([^)#\s]+)", (REPO / "README.md").read_text()):
        if "://" in target:
            continue
        assert (REPO / target).resolve().is_relative_to(REPO), f"README links outside the repository: {target}"
        assert (REPO / target).exists(), f"README links to a missing file: {target}"
