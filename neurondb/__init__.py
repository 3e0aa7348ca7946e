"""neurondb: four background workers for PostgreSQL (queue, auto-tuner, index maintenance, LLM jobs).

`neurondb.connect()` gives a client for search; `neurondb.queue` enqueues jobs.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from neurondb.client import Client


def connect(data_dir: str | None = None, dsn: str | None = None) -> "Client":
    """A search client for the installation in `data_dir` (see neurondb.client)."""
    from neurondb.client import connect as _connect

    return _connect(data_dir, dsn)
