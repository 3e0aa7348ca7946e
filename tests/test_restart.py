"""`neurondb restart` and `neurondb stop` on the embedded server: the service restarts, the database does not
(unless `stop --with-db`), and no job is lost across the restart."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from neurondb import db, queue
from neurondb.pgserver import EmbeddedPostgres
from tests.service import Service, wait_for

JOBS = {"neurondb.neuranq_job_modules": "tests.jobtypes"}


@pytest.fixture
def embedded() -> Iterator[Service]:
    """An initialised embedded installation (under /tmp: the server's system user must reach it)."""
    root = Path(tempfile.mkdtemp(prefix="neurondb-restart-", dir="/tmp"))
    service = Service(root, dsn=None, settings=JOBS)
    try:
        service.cli("init")
        yield service
    finally:
        service.close()
        EmbeddedPostgres(service.datadir).stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def postmaster(service: Service) -> tuple[int, object]:
    """The embedded postmaster's pid and start time: both unchanged means the database never restarted."""
    pid = int((service.datadir.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    with db.connect(db.resolve_dsn(service.datadir), "test") as conn:
        return pid, conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]


def test_restart_keeps_the_database_and_every_job(embedded: Service) -> None:
    embedded.start()
    before = postmaster(embedded)
    dsn = db.resolve_dsn(embedded.datadir)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Jobs that take a while: some are running when the fast restart hands their batches back.
        ids = queue.enqueue_many(conn, "test.sleep", [{"seconds": 0.05}] * 60, max_retries=3)
    old_supervisor = embedded.supervisor_pid
    result = embedded.cli("restart", "-m", "fast")
    assert "neurondb stopped (fast)" in result.stdout and "neurondb started" in result.stdout, result.stdout
    embedded.wait_healthy(timeout=10)
    assert embedded.supervisor_pid != old_supervisor
    assert postmaster(embedded) == before, "restart restarted the embedded PostgreSQL"
    with psycopg.connect(dsn, autocommit=True) as conn:
        def all_done() -> bool:
            return conn.execute("SELECT count(*) FROM neurondb.neurondb_job_queue "
                                "WHERE job_id = ANY(%s) AND status = 'completed'", (ids,)).fetchone()[0] == len(ids)

        wait_for(all_done, 30, "every job enqueued before the restart to complete")


def test_stop_leaves_the_database_running_unless_with_db(embedded: Service) -> None:
    embedded.start()
    before = postmaster(embedded)
    embedded.cli("stop")
    server = EmbeddedPostgres(embedded.datadir)
    assert server.is_running() and postmaster(embedded) == before
    embedded.start()                              # a warm start: the same database
    assert postmaster(embedded) == before
    embedded.cli("stop", "--with-db")
    assert not server.is_running()


def test_restart_when_stopped_starts(embedded: Service) -> None:
    result = embedded.cli("restart")
    assert "neurondb is not running" in result.stdout and "neurondb started" in result.stdout, result.stdout
    embedded.wait_healthy(timeout=10)


def test_first_start_says_it_compiles_the_kernels(tmp_path: Path, fresh_dsn: str) -> None:
    """A fresh install (an empty numba cache) compiles the index kernels for several seconds: say so, once."""
    service = Service(tmp_path / "d", fresh_dsn, env={"NUMBA_CACHE_DIR": str(tmp_path / "numba")})
    try:
        first = service.cli("start")
        assert "compiling the index kernels (first start only)..." in first.stdout, first.stdout
        again = service.cli("restart")
        assert "compiling" not in again.stdout and "neurondb started" in again.stdout, again.stdout
    finally:
        service.close()
