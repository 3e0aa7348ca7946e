"""Operator details from issue 14: the least privileges `init --dsn` needs, neuranq's periodic summary in
the log, and no WARNING for a new index's missing snapshot."""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from neurondb import queue
from tests.service import Service, wait_for
from tests.test_queue import JOBS, wait_finished


@pytest.fixture
def limited_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A DSN of a new login role on a new empty database, holding only what README's "Any PostgreSQL"
    paragraph lists: CONNECT and CREATE on that database (PUBLIC's default rights revoked)."""
    suffix = uuid.uuid4().hex[:12]
    dbname, role, password = f"nd_least_{suffix}", f"nd_least_{suffix}", secrets.token_hex(16)
    with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN PASSWORD \'{password}\' '
                      "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS")
        admin.execute(f'CREATE DATABASE "{dbname}"')
        admin.execute(f'REVOKE ALL ON DATABASE "{dbname}" FROM PUBLIC')
        admin.execute(f'GRANT CONNECT, CREATE ON DATABASE "{dbname}" TO "{role}"')
    info = psycopg.conninfo.conninfo_to_dict(pg_admin_dsn)
    info.update(dbname=dbname, user=role, password=password)
    try:
        yield psycopg.conninfo.make_conninfo(**info)
    finally:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_init_and_start_with_only_the_documented_privileges(tmp_path: Path, limited_dsn: str) -> None:
    svc = Service(tmp_path / "data", limited_dsn, JOBS)
    try:
        init = svc.cli("init", check=False)
        assert init.returncode == 0 and "Traceback" not in init.stderr, init.stderr
        svc.start()
        with psycopg.connect(limited_dsn, autocommit=True) as conn:
            assert not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
            job_id = queue.enqueue(conn, "test.noop")
            wait_finished(conn, [job_id], 20.0)
            assert queue.get(conn, job_id)["status"] == "completed"
        assert " ERROR: " not in svc.datadir.log_file.read_text()
    finally:
        svc.close()


def test_neuranq_logs_a_summary_of_a_burst(tmp_path: Path, fresh_dsn: str) -> None:
    svc = Service(tmp_path / "data", fresh_dsn, {**JOBS, "neurondb.neuranq_log_summary_interval": "1s",
                                                 "neurondb.neuranq_retry_delay": "10ms"})
    svc.start()
    try:
        with psycopg.connect(fresh_dsn, autocommit=True) as conn:
            ids = [queue.enqueue(conn, "test.noop") for _ in range(5)]
            ids.append(queue.enqueue(conn, "test.fail", {"fail_times": 1}, max_retries=2))
            ids.append(queue.enqueue(conn, "test.fail", {"fail_times": 9}, max_retries=0))
            wait_finished(conn, ids, 20.0)
        summary = re.compile(r"neuranq.* INFO: in the last \d+ s: (\d+) jobs completed, (\d+) failed, (\d+) retried")

        def totals() -> tuple[int, ...] | None:
            found = [tuple(map(int, m.groups())) for m in summary.finditer(svc.datadir.log_file.read_text())]
            sums = tuple(sum(column) for column in zip(*found, strict=True)) if found else None
            return sums if sums == (6, 1, 1) else None
        wait_for(totals, 5.0, "summary lines adding up to 6 completed, 1 failed, 1 retried", interval=0.2)
    finally:
        svc.close()


def test_new_index_logs_no_warning_for_its_missing_snapshot(tmp_path: Path, fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        conn.execute("SELECT neurondb.create_index('docs', 4, 'l2')")
    svc = Service(tmp_path / "data", fresh_dsn)
    svc.start()
    try:
        def log() -> str:
            return svc.datadir.log_file.read_text()
        built = wait_for(lambda: [line for line in log().splitlines()          # "(re)building from ..."
                                  if "index docs:" in line and "building from PostgreSQL" in line],
                         60.0, "the new index to be built", interval=0.1)
        assert re.search(r" INFO: index docs: no snapshot yet; building from PostgreSQL$", built[0]), built
        assert not [line for line in log().splitlines() if "WARNING" in line and "index docs" in line]
        svc.cli("stop")
        (svc.datadir.root / "indexes" / "docs.snap").write_bytes(b"garbage")   # corrupt: still a WARNING
        svc.start()
        wait_for(lambda: re.search(r"WARNING: index docs: .*docs\.snap: .*; rebuilding from PostgreSQL", log()),
                 60.0, "a WARNING for the corrupt snapshot", interval=0.1)
    finally:
        svc.close()
