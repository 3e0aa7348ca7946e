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


BOOTSTRAP = (
    "CREATE SCHEMA IF NOT EXISTS neurondb",
    "CREATE TABLE IF NOT EXISTS neurondb.schema_migrations ("
    " version text PRIMARY KEY, checksum text NOT NULL,"
    " applied_at timestamptz NOT NULL DEFAULT now())",
)
"""Run before the migrations, in one transaction: where the applied versions are recorded."""

RECORD = "INSERT INTO neurondb.schema_migrations (version, checksum) VALUES (%s, %s)"


def applied_checksums(conn: psycopg.Connection) -> dict[str, str]:
    """version -> checksum of the migrations applied to this database (empty when none ever was)."""
    if conn.execute("SELECT to_regclass('neurondb.schema_migrations')").fetchone()[0] is None:
        return {}
    return dict(conn.execute("SELECT version, checksum FROM neurondb.schema_migrations").fetchall())


def pending(done: dict[str, str]) -> list[Migration]:
    """The migrations not in `done`, in order; an applied one whose file has changed since is an error."""
    todo = []
    for migration in available():
        if migration.version in done:
            if done[migration.version] != migration.checksum:
                raise MigrationError(
                    f"migration {migration.version} was changed after it was applied; "
                    "add a new migration instead of editing an applied one"
                )
            continue
        todo.append(migration)
    return todo


def script(migrations: list[Migration]) -> str:
    """The SQL `migrate` runs for `migrations`, as one psql script: the same advisory lock, bootstrap, one
    transaction per migration recording its version and checksum (so a later `migrate` skips them)."""
    def literal(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    parts = [f"SELECT pg_advisory_lock({ADVISORY_LOCK_KEY});",
             "BEGIN;\n" + "".join(f"{statement};\n" for statement in BOOTSTRAP) + "COMMIT;"]
    for migration in migrations:
        record = RECORD % (literal(migration.version), literal(migration.checksum))
        parts.append(f"-- migration {migration.version}\nBEGIN;\n{migration.sql.rstrip()}\n{record};\nCOMMIT;")
    parts.append(f"SELECT pg_advisory_unlock({ADVISORY_LOCK_KEY});")
    return "\n\n".join(parts) + "\n"


def migrate(conn: psycopg.Connection) -> list[str]:
    """Apply every pending migration; return the versions applied (empty when up to date)."""
    if not conn.autocommit:
        raise ValueError("migrate() needs an autocommit connection: it manages its own transactions")
    conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
    try:
        with conn.transaction():
            for statement in BOOTSTRAP:
                conn.execute(statement)
        applied = []
        for migration in pending(applied_checksums(conn)):
            log.info("applying migration %s", migration.version)
            try:
                with conn.transaction():
                    conn.execute(migration.sql)
                    conn.execute(RECORD, (migration.version, migration.checksum))
            except psycopg.Error as exc:
                raise MigrationError(f"migration {migration.version} failed: {exc}") from exc
            applied.append(migration.version)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
