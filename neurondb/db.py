"""Connections to PostgreSQL: which server (DSN resolution) and how every process connects.

The DSN comes from, in order: `--dsn`, `$NEURONDB_DSN`, the `dsn` file of the data directory (written by
`neurondb init`, owner-only since it holds the password). Every connection carries an application_name of
the form `neurondb <process>` so that `pg_stat_activity` tells which neurondb process holds it.
"""

from __future__ import annotations

import json
import os

import orjson
import psycopg
from psycopg.types.json import set_json_dumps, set_json_loads

from neurondb.paths import DataDir

ENV_DSN = "NEURONDB_DSN"



class UnreadableJson:
    """Stands for a jsonb value neither orjson nor the json module can load (nested deeper than ~1,000
    levels): the row is still fetched, and the job that holds it fails on its own (its payload is not an
    object) instead of every fetch of it raising and the queue stalling behind it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"UnreadableJson({self.reason!r})"


def _int(digits: str) -> int | float:
    # Python refuses to convert ints of more than 4,300 digits; such a number is as good as infinite.
    return int(digits) if len(digits) <= 4000 else float(digits)


def json_loads(data: bytes | str) -> object:
    """jsonb as Python: orjson, else the json module for what orjson refuses but jsonb holds (numbers
    beyond a double, like 1e400, which jsonb prints as 401 digits), else UnreadableJson. Good rows cost
    nothing more; a bad one no longer makes every claim that fetches it raise."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        reason = str(exc)
    try:
        return json.loads(bytes(data) if isinstance(data, memoryview) else data, parse_int=_int)
    except (ValueError, RecursionError):
        return UnreadableJson(reason)


# jsonb in and out of every connection through orjson: psycopg's default (the json module) was 13 % of the
# queue worker's CPU time at full drain (scripts/bench_queue.py).
set_json_dumps(orjson.dumps)
set_json_loads(json_loads)


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
