"""Fixture factories: the same fixtures for several test modules, which differ only in their values.

pytest finds a fixture by the module attribute it is assigned to, so a module writes
`conn, service, client = index_service_fixtures(DIM, SETTINGS)` and its tests ask for those names.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import neurondb
from tests.service import Service, index_connection, running_service


def index_service_fixtures(dim: int, settings: dict[str, str]) -> tuple[object, object, object]:
    """`conn`: an autocommit connection to the test's fresh database with the l2 index 'docs' of `dim`
    dimensions; `service`: the service running there with `settings` (started after the index exists);
    `client`: a client of that service."""

    @pytest.fixture
    def conn(fresh_dsn: str) -> Iterator[psycopg.Connection]:
        with index_connection(fresh_dsn, dim) as c:
            yield c

    @pytest.fixture
    def service(tmp_path: Path, fresh_dsn: str, conn: psycopg.Connection) -> Iterator[Service]:
        with running_service(tmp_path / "data", fresh_dsn, settings) as svc:
            yield svc

    @pytest.fixture
    def client(service: Service, fresh_dsn: str) -> Iterator[neurondb.client.Client]:
        with neurondb.connect(str(service.datadir.root), fresh_dsn) as c:
            yield c

    return conn, service, client
