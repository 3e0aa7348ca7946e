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


class UndecodableJson(ValueError):
    """A jsonb value PostgreSQL accepted that orjson cannot decode (too deep, a number beyond a double)."""


def _undecodable(data: bytes | str, field: str, exc: orjson.JSONDecodeError) -> UndecodableJson:
    reason = str(exc).split(": line ")[0]
    if reason == "depth limit exceeded":
        reason = f"nested deeper than {JSON_MAX_DEPTH} levels"
    text = bytes(data).decode(errors="replace") if not isinstance(data, str) else data
    start = text[:60] + ("..." if len(text) > 60 else "")
    return UndecodableJson(f"{field} cannot be decoded: {reason} (allowed: JSON nested at most {JSON_MAX_DEPTH} "
                           f"levels deep, numbers within double range); it starts {start}")


def decode_json(text: str, field: str) -> Any:
    """`text` (a jsonb column read as text) decoded, else UndecodableJson with one line naming `field`,
    the reason, what is allowed and the value's start. Callers decode per row: one such value in a
    result set must fail its own row, not the fetch of all of them."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _undecodable(text, field, exc) from None


def json_loads(data: bytes | str) -> Any:
    """Every connection's jsonb loader: orjson, and for a value it refuses an UndecodableJson *instance* in
    place of the value instead of an exception, so that no fetch of a whole result set (a `jobs list`, a
    cache lookup) fails for one row. The job workers read their payload columns as text and decode them per
    row with `decode_json`, failing just that job with the message."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return _undecodable(data, "value", exc)


# jsonb in and out of every connection through orjson: psycopg's default (the json module) was 13 % of the
# queue worker's CPU time at full drain (scripts/bench_queue.py).
set_json_dumps(orjson.dumps)
set_json_loads(json_loads)


def first_line(exc: BaseException) -> str:
    """The one-line message of an error for a job row or the CLI: a database error's primary message
    (without the DETAIL that may quote a whole row, nor the CONTEXT lines), else the exception's first line."""
    primary = getattr(getattr(exc, "diag", None), "message_primary", None)
    text = primary or str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


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
