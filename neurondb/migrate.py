"""Schema migrations: plain SQL files in `neurondb/sql/`, applied in order, each in its own transaction.

Applied versions are recorded in `neurondb.schema_migrations` with a checksum, so an edited migration is
detected instead of silently skipped. A session advisory lock serialises concurrent `neurondb init` runs
(several supervisors starting against one database at once).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import psycopg

log = logging.getLogger(__name__)

# pg_advisory_lock key: "neurondb" as an int64, so it never collides with an application's small keys.
ADVISORY_LOCK_KEY = int.from_bytes(b"neurondb", "big") & 0x7FFF_FFFF_FFFF_FFFF


class MigrationError(RuntimeError):
    """A migration failed, or one already applied has changed since."""


@dataclass(frozen=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The packaged migrations, in order of their file names (`001_schema.sql`, `002_...`)."""
    files = sorted(
        (f for f in resources.files("neurondb.sql").iterdir() if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    return [Migration(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in files]


def migrate(conn: psycopg.Connection) -> list[str]:
    """Apply every pending migration; return the versions applied (empty when up to date)."""
    if not conn.autocommit:
        raise ValueError("migrate() needs an autocommit connection: it manages its own transactions")
    conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
    try:
        with conn.transaction():
            conn.execute("CREATE SCHEMA IF NOT EXISTS neurondb")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS neurondb.schema_migrations ("
                " version text PRIMARY KEY, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
        done = dict(conn.execute("SELECT version, checksum FROM neurondb.schema_migrations").fetchall())
        applied = []
        for migration in available():
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version} was changed after it was applied; "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            log.info("applying migration %s", migration.version)
            try:
                with conn.transaction():
                    conn.execute(migration.sql)
                    conn.execute(
                        "INSERT INTO neurondb.schema_migrations (version, checksum) VALUES (%s, %s)",
                        (migration.version, migration.checksum),
                    )
            except psycopg.Error as exc:
                raise MigrationError(f"migration {migration.version} failed: {exc}") from exc
            applied.append(migration.version)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
