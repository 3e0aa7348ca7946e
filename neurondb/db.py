"""Connections to PostgreSQL: which server (DSN resolution) and how every process connects.

The DSN comes from, in order: `--dsn`, `$NEURONDB_DSN`, the `dsn` file of the data directory (written by
`neurondb init`, owner-only since it holds the password). Every connection carries an application_name of
the form `neurondb <process>` so that `pg_stat_activity` tells which neurondb process holds it.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
import psycopg
from psycopg.types.json import set_json_dumps, set_json_loads

from neurondb.paths import DataDir

ENV_DSN = "NEURONDB_DSN"
JSON_MAX_DEPTH = 1024   # orjson's nesting limit; PostgreSQL's jsonb has none of its own

# jsonb in and out of every connection through orjson: psycopg's default (the json module) was 13 % of the
# queue worker's CPU time at full drain (scripts/bench_queue.py).
set_json_dumps(orjson.dumps)
set_json_loads(orjson.loads)


class UndecodableJson(ValueError):
    """A jsonb value PostgreSQL accepted that orjson cannot decode (too deep, a number beyond a double)."""


def decode_json(text: str, field: str) -> Any:
    """`text` (a jsonb column read as text) decoded, else UndecodableJson with one line naming `field`,
    the reason, what is allowed and the value's start. Callers decode per row: one such value in a
    result set must fail its own row, not the fetch of all of them."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        reason = str(exc).split(": line ")[0]
        if reason == "depth limit exceeded":
            reason = f"nested deeper than {JSON_MAX_DEPTH} levels"
        start = text[:60] + ("..." if len(text) > 60 else "")
        raise UndecodableJson(f"{field} cannot be decoded: {reason} (allowed: JSON nested at most {JSON_MAX_DEPTH} "
                              f"levels deep, numbers within double range); it starts {start}") from None


class NotInitialized(RuntimeError):
    """No DSN is known for this data directory: neither given nor recorded by `neurondb init`."""


def resolve_dsn(datadir: DataDir, dsn: str | None = None) -> str:
    """The DSN to use: explicit, else `$NEURONDB_DSN`, else the one recorded in the data directory."""
    if dsn:
        return dsn
    env = os.environ.get(ENV_DSN)
    if env:
        return env
    try:
        return datadir.dsn_file.read_text().strip()
    except FileNotFoundError:
        raise NotInitialized(
            f"no database known for data directory {datadir.root}: run `neurondb init -D {datadir.root}` "
            f"(embedded PostgreSQL) or pass --dsn / set {ENV_DSN}"
        ) from None


def connect(dsn: str, application_name: str, autocommit: bool = True, connect_timeout: int = 10,
            statement_timeout_ms: int | None = None) -> psycopg.Connection:
    """Open a connection named `neurondb <application_name>`; `statement_timeout_ms` bounds every statement
    (for processes that must never hang on the database, like the supervisor)."""
    options = f"-c statement_timeout={statement_timeout_ms}" if statement_timeout_ms else None
    return psycopg.connect(
        dsn,
        autocommit=autocommit,
        application_name=f"neurondb {application_name}"[:63],
        connect_timeout=connect_timeout,
        **({"options": options} if options else {}),
    )


def close_quietly(conn: psycopg.Connection | None) -> None:
    """Close a connection that may already be broken (the server went away): errors are moot then."""
    if conn is not None:
        try:
            conn.close()
        except psycopg.Error:
            pass


def redact(dsn: str) -> str:
    """The DSN with its password hidden, for logs and messages."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    if "password" in info:
        info["password"] = "********"
    return psycopg.conninfo.make_conninfo(**info)
