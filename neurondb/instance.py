"""One neurondb installation: a data directory and the database it uses.

`init()` is what `neurondb init` does: create the data directory, start the embedded PostgreSQL unless a
DSN was given, install or upgrade the schema, and publish the settings to `neurondb.settings`. Every step is
idempotent, so `init` doubles as "make sure everything is there" before a start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg

from neurondb import db
from neurondb.migrate import migrate
from neurondb.paths import DataDir, write_private_file
from neurondb.queries import query
from neurondb.settings import Config

if TYPE_CHECKING:
    from neurondb.pgserver import EmbeddedPostgres

log = logging.getLogger(__name__)


@dataclass
class InitReport:
    dsn: str
    embedded: bool
    migrations_applied: list[str]
    seconds: float


class Instance:
    """A data directory plus its database; `dsn` given here (or by $NEURONDB_DSN) means an external server."""

    def __init__(self, datadir: DataDir, dsn: str | None = None) -> None:
        self.datadir = datadir
        self.explicit_dsn = dsn

    @property
    def embedded(self) -> bool:
        """Embedded unless a DSN was given now or recorded at init without a pgdata directory."""
        if self.explicit_dsn:
            return False
        if self.datadir.pgdata.exists():
            return True
        try:
            db.resolve_dsn(self.datadir)
        except db.NotInitialized:
            return True
        return False

    def server(self) -> EmbeddedPostgres:
        """The embedded server; imported lazily so DSN mode never touches the server build."""
        from neurondb.pgserver import EmbeddedPostgres

        return EmbeddedPostgres(self.datadir)

    def ensure_database(self) -> str:
        """The DSN to use, starting the embedded server first if this installation has one."""
        if self.embedded:
            server = self.server()
            server.init()
            return server.start()
        return db.resolve_dsn(self.datadir, self.explicit_dsn)

    def init(self) -> InitReport:
        started = time.monotonic()
        self.datadir.init()
        config = Config.load(self.datadir)
        embedded = self.embedded
        dsn = self.ensure_database()
        with db.connect(dsn, "init") as conn:
            # Recorded only once it answers: a wrong --dsn must not replace the DSN of a working installation.
            if not embedded and self.explicit_dsn:
                write_private_file(self.datadir.dsn_file, dsn + "\n")
            applied = migrate(conn)
            publish_settings(conn, config)
        return InitReport(dsn, embedded, applied, time.monotonic() - started)

    def connect(self, application_name: str) -> psycopg.Connection:
        return db.connect(db.resolve_dsn(self.datadir, self.explicit_dsn), application_name)


def publish_settings(conn: psycopg.Connection, config: Config,
                     rejections: dict[str, tuple[str, str]] | None = None) -> None:
    """Replace the rows of `neurondb.settings` with the values in force (one transaction: never half).

    `rejections` are values refused outside the files (from `neurondb.alter_system()`): name -> (value, why).
    """
    rows = []
    for row in config.rows():
        row = {**row, "rejected_reason": row.get("rejected_error")}
        if rejections and row["name"] in rejections:
            row["rejected_value"], row["rejected_reason"] = rejections[row["name"]]
        rows.append(row)
    with conn.transaction():
        conn.execute(query("settings", "clear_settings"))
        with conn.cursor() as cur:
            cur.executemany(query("settings", "insert_setting"), rows)
