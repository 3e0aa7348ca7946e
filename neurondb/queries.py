"""Named SQL queries kept in `neurondb/sql/queries/*.sql`, after Procrastinate: SQL stays SQL, readable and
testable in psql, and the Python around it stays thin. A file holds several queries, each introduced by a
`-- name: NAME` line; comments before the first statement line are its documentation."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.M)


@cache
def load(group: str) -> dict[str, str]:
    """The queries of `sql/queries/<group>.sql` by name."""
    text = resources.files("neurondb.sql").joinpath("queries", f"{group}.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    return {name: body.strip().rstrip(";") for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query(group: str, name: str) -> str:
    try:
        return load(group)[name]
    except KeyError:
        raise KeyError(f"no query {name!r} in sql/queries/{group}.sql") from None
