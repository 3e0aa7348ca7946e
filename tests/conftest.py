"""Shared fixtures: one real PostgreSQL per test session, a fresh migrated database per test that asks.

The server is the project's embedded PostgreSQL (started in a temporary data directory), or the server
named by `$NEURONDB_TEST_DSN`. Nothing here mocks the database.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from neurondb.migrate import migrate
from neurondb.paths import DataDir
from tests.service import Service

REPO = Path(__file__).resolve().parents[1]
DOCUMENT = REPO.parent / "shared" / "seed" / "neurondb-background-workers.md"


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """DSN of a superuser connection to the session's PostgreSQL server."""
    env = os.environ.get("NEURONDB_TEST_DSN")
    if env:
        yield env
        return
    from neurondb.pgserver import EmbeddedPostgres

    # Not under pytest's tmp_path: as root that is a 0700 tree the server's system user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="neurondb-session-", dir="/tmp"))
    datadir = DataDir(root)
    datadir.init()
    server = EmbeddedPostgres(datadir)
    server.init()
    dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop("fast")
        shutil.rmtree(root, ignore_errors=True)


def _with_dbname(dsn: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)


@pytest.fixture
def fresh_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A new database with the neurondb schema installed, dropped after the test."""
    name = f"nd_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = _with_dbname(pg_admin_dsn, name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn)
    try:
        yield dsn
    finally:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def conn(fresh_dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's fresh database (a test module may override it)."""
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        yield c


@pytest.fixture
def make_service(tmp_path: Path, fresh_dsn: str) -> Iterator[Callable[..., Service]]:
    """`make_service(settings=None, env=None, dsn=fresh_dsn)`: a new, not yet started Service in its own data
    directory under tmp_path; every one made is closed after the test, whatever state it was left in."""
    services: list[Service] = []

    def make(settings: dict[str, str] | None = None, env: dict[str, str] | None = None,
             dsn: str | None = fresh_dsn) -> Service:
        service = Service(tmp_path / f"data{len(services)}", dsn, settings, env)
        services.append(service)
        return service

    yield make
    for service in services:
        service.close()


@pytest.fixture
def document_text() -> str:
    if not DOCUMENT.exists():
        pytest.skip(f"source document not found at {DOCUMENT}")
    return DOCUMENT.read_text(encoding="utf-8")
