"""Job types of the queue worker: a registry of handlers, the context a handler runs with, and the errors
that decide what happens to a failed job.

A handler is `handler(ctx: JobContext, payload: dict) -> result` (anything JSON-serialisable), or the same
as an `async def`. It raises
`PermanentJobError` for a job that can never succeed (malformed payload, unknown index: failed at once,
no retry) and anything else for a failure worth retrying. Database writes a job makes as its effect go
through `ctx.defer(sql, params)`: they run in the same transaction that marks the job completed, so a
completed job's effects are committed exactly with it and a retried job leaves none behind.

Blocking handlers run one at a time in the queue worker's main thread (a timeout interrupts them with
SIGALRM); async handlers run on the worker's event loop, up to `neurondb.neuranq_concurrency` at once per
process and at most `concurrency` of one type (the decorator's argument, overridden by
`neurondb.neuranq_type_concurrency`), so that I/O-bound jobs (HTTP calls, remote embeddings) wait
concurrently instead of in turn. An async handler's `ctx.conn` is a `psycopg.AsyncConnection` shared by the
jobs in flight: reads only, and never a transaction held across an await.

Register your own types in a module named in `neurondb.neuranq_job_modules` (imported by every queue
worker at start) or exposed as an entry point of the group `neurondb.job_types`:

    from neurondb.jobs import job_type, require

    @job_type("thumbnail")
    def thumbnail(ctx, payload):
        url = require(payload, "url", str)
        ...
        return {"ok": True}

    @job_type("webhook", concurrency=4)
    async def webhook(ctx, payload):
        ...
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

import psycopg

from neurondb import db
from neurondb.redaction import shown
from neurondb.settings import Config


class JobError(Exception):
    """A failed attempt; retried with backoff while retries remain."""

    retryable = True


class PermanentJobError(JobError):
    """The job can never succeed as given (malformed payload, unknown type, bad reference): not retried."""

    retryable = False


class JobTimeout(JobError):
    """The attempt ran past neurondb.neuranq_timeout and was stopped."""


@dataclass
class JobContext:
    job_id: int
    job_type: str
    tenant_id: str
    attempt: int                 # 1 for the first run
    config: Config
    # Autocommit, for reads: never hold a transaction across slow work. A psycopg.Connection for a blocking
    # handler, a psycopg.AsyncConnection (shared by the async jobs in flight) for an async one.
    conn: Any
    log: logging.Logger
    effects: list[tuple[str, Any]] = field(default_factory=list)
    dsn: str = ""                # the worker's database, for `connect`
    http: Any = None             # async handlers: the lane's pooled httpx.AsyncClient, for provider calls
    buckets: Any = None          # the machine's rate-limit buckets (shm.buckets.Buckets), shared with neuranllm

    def defer(self, sql: str, params: Any = None) -> None:
        """Run `sql` in the transaction that completes this job (and only if it completes)."""
        self.effects.append((sql, params))

    def connect(self) -> psycopg.Connection:
        """A new autocommit connection of the job's own (close it): for blocking work an async handler
        hands to a thread, which must not share the event loop's connection."""
        return db.connect(self.dsn, f"job {self.job_id}")


Handler = Callable[[JobContext, dict], Any]


@dataclass(frozen=True)
class JobType:
    name: str
    handler: Handler
    aliases: tuple[str, ...] = ()
    concurrency: int | None = None   # async jobs of this type in flight per process at most (None: no own cap)

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler)


REGISTRY: dict[str, JobType] = {}


def job_type(name: str, *, aliases: tuple[str, ...] = (), concurrency: int | None = None
             ) -> Callable[[Handler], Handler]:
    """Register `handler` under `name` (and aliases). Registering a taken name is an error: two modules
    silently fighting over one type would be far worse to debug. `concurrency` caps how many jobs of the
    type an async handler runs at once per queue process (neurondb.neuranq_type_concurrency overrides it)."""
    if concurrency is not None and not (isinstance(concurrency, int) and concurrency >= 1):
        raise ValueError(f"job type {name!r}: concurrency must be a whole number >= 1, got {concurrency!r}")

    def register(handler: Handler) -> Handler:
        jt = JobType(name, handler, aliases, concurrency)
        for key in (name, *aliases):
            existing = REGISTRY.get(key)
            if existing is not None and existing.handler is not handler:
                raise ValueError(f"job type {key!r} is already registered by {existing.handler.__module__}")
            REGISTRY[key] = jt
        return handler

    return register


_LOOP_LOCAL: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, Any]] = weakref.WeakKeyDictionary()


def loop_local(key: Any, factory: Callable[[], Any]) -> Any:
    """The running event loop's object for `key`, made by `factory` on first use: what async handlers of
    one queue process share (its async lane has one loop), such as an HTTP client or a request batcher.
    An asyncio object belongs to one loop, so it is kept per loop, not per process."""
    found = _LOOP_LOCAL.setdefault(asyncio.get_running_loop(), {})
    if key not in found:
        found[key] = factory()
    return found[key]


async def close_loop_local() -> None:
    """Close what `loop_local` made for the running loop (the objects with an `aclose`), as the loop ends."""
    for obj in _LOOP_LOCAL.pop(asyncio.get_running_loop(), {}).values():
        close = getattr(obj, "aclose", None)
        if close is not None:
            await close()


def resolve(name: str) -> JobType:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(j.name for j in set(REGISTRY.values())))
        raise PermanentJobError(f"unknown job type {shown(name)} (known: {known})") from None


def load_job_types(modules: list[str]) -> None:
    """The built-in types, entry points of group `neurondb.job_types`, then the modules named in the
    settings. An import error propagates: a worker must not start half-configured."""
    import_module("neurondb.jobs.builtin")
    for ep in entry_points(group="neurondb.job_types"):
        ep.load()
    for module in modules:
        import_module(module)


_TYPES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object", bool: "a boolean"}


def require(payload: dict, key: str, kind: type | tuple[type, ...], default: Any = ..., *,
            where: str = "payload") -> Any:
    """`payload[key]` checked against `kind`; a missing or mistyped field is a PermanentJobError that says
    which field, what was expected and (shortened) what it got. `where` names the object in the message
    ("documents[3]" for an item of a list)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    expected = " or ".join(_TYPES.get(k, k.__name__) for k in kinds)
    if key not in payload or payload[key] is None:
        if default is not ...:
            return default
        raise PermanentJobError(f"{where} is missing {key!r} ({expected})")
    value = payload[key]
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds) or (float in kinds and isinstance(value, int))
    if not ok:
        raise PermanentJobError(f"{where} field {key!r} must be {expected}, got {type(value).__name__} {shown(value)}")
    return value
