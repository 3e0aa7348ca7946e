"""Leases of the job tables, shared by the queue and LLM workers and the supervisor (sql/queries/leases.sql).

A claimed job carries its owner (`host:pid`, built by `lease_owner` alone: the supervisor names a dead
worker with it to hand the worker's jobs back, so both sides must spell it the same) and an expiry. It comes
back when the supervisor reaps its owner (at once) or when the expiry passes (a machine lost with its
supervisor): `release`. Only the attempt that was under way counts then (the worker lists it in its shared-
memory slot, see shm.control.RunningJobs), and a job past its retry limit ends failed (the queue's with a
dead-letter row) instead of running again: a job that kills its worker every time stops after its retries.
The owner itself extends the leases of the jobs it still holds and hands back the claimed jobs it will not
run.

`hand_back` and `extend_leases` take the queue worker's connection or the LLM worker's async one: they
return what `conn.execute` returns, a cursor or an awaitable to await.

Both workers speak of an attempt's end the same way: a `Status` (completed, retry, failed), an error
message made by `describe` (at most MAX_ERROR characters), and a backoff before a retry: the queue's
`equal_jitter_ms`, the LLM worker's `full_jitter_ms`.
"""

from __future__ import annotations

import enum
import os
import random
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import psycopg

from neurondb.queries import query
from neurondb.settings import Config

QUEUE_TABLE = "neurondb.neurondb_job_queue"
LLM_TABLE = "neurondb.neurondb_llm_jobs"
JOB_TABLES = (QUEUE_TABLE, LLM_TABLE)
_SETTINGS = {QUEUE_TABLE: "neuranq", LLM_TABLE: "neuranllm"}   # prefix of each table's retry settings
MAX_ERROR = 2000             # characters of an error message kept per attempt


def lease_owner(pid: int | None = None) -> str:
    """The lease owner of process `pid` (None: this one) as the lease columns hold it: `host:pid`, unique
    across machines."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def local_owners() -> str:
    """A LIKE pattern matching the owners of this machine (see `lease_owner`)."""
    return f"{socket.gethostname()}:%"


def owner_pid(name: str) -> int | None:
    """The process id in a lease owner of this machine's kind (`lease_owner`), None if it has none."""
    pid = name.rpartition(":")[2]
    return int(pid) if pid.isdigit() else None


class Status(str, enum.Enum):
    """How an attempt ended, as a worker records it."""

    COMPLETED = "completed"
    RETRY = "retry"           # failed with retries left: pending again after its backoff
    FAILED = "failed"         # for good

    def __str__(self) -> str:      # the value, as in the tables and the logs, on every Python version
        return self.value

    @property
    def label(self) -> str:
        """The outcome as the metrics name it: an attempt that will run again is "retried"."""
        return "retried" if self is Status.RETRY else self.value


class HasStatus(Protocol):
    status: Status


T = TypeVar("T", bound=HasStatus)


@dataclass
class Partition(Generic[T]):
    """Outcomes by status, each list in the order given; written by one statement each."""

    completed: list[T] = field(default_factory=list)
    retry: list[T] = field(default_factory=list)
    failed: list[T] = field(default_factory=list)


def partition(outcomes: Iterable[T]) -> Partition[T]:
    split: Partition[T] = Partition()
    lists = {Status.COMPLETED: split.completed, Status.RETRY: split.retry, Status.FAILED: split.failed}
    for o in outcomes:
        lists[o.status].append(o)
    return split


def describe(exc: BaseException, shown: tuple[type[BaseException], ...]) -> str:
    """The error_message of a failed attempt: the text of an exception raised to be shown (of a `shown`
    type: a JobError, a ProviderError), anything else with its type in front; at most MAX_ERROR
    characters."""
    text = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, shown):
        text = f"{type(exc).__name__}: {text}"
    return text[:MAX_ERROR]


def _exponential_ms(attempt: int, base_ms: float, max_ms: float) -> float:
    """The step before retry `attempt` (1-based): base * 2^(attempt-1), capped."""
    return min(max_ms, base_ms * 2 ** (attempt - 1))


def equal_jitter_ms(attempt: int, base_ms: float, max_ms: float) -> float:
    """The queue's backoff (and the lease release's, in SQL): uniform over [step/2, step]: never less than
    half the exponential step, so the backoff stays a backoff, spread so jobs failing together do not
    retry together."""
    return _exponential_ms(attempt, base_ms, max_ms) * random.uniform(0.5, 1.0)


def full_jitter_ms(attempt: int, base_ms: float, max_ms: float, retry_after_s: float | None = None) -> float:
    """The LLM worker's backoff: uniform over [0, step] (calls that failed together, on a provider's
    outage or rate limit, retry spread over the whole window), and never before the provider's
    Retry-After."""
    delay = random.uniform(0.0, _exponential_ms(attempt, base_ms, max_ms))
    if retry_after_s is not None:
        delay = max(delay, retry_after_s * 1000.0)
    return delay


@dataclass(frozen=True)
class RetryPolicy:
    """What a released attempt is measured against: the default limit (a job's max_retries overrides it)
    and the backoff before it runs again."""

    max_retries: int
    delay_ms: float
    max_delay_ms: float

    @classmethod
    def of(cls, config: Config, table: str) -> RetryPolicy:
        prefix = _SETTINGS[table]
        return cls(config.get_int(f"{prefix}_max_retries"), config.get_float(f"{prefix}_retry_delay"),
                   config.get_float(f"{prefix}_retry_max_delay"))


def release(conn: psycopg.Connection, table: str, policy: RetryPolicy, owner: str | None,
            ran: list[int] | None, reason: str | None) -> tuple[int, list[int]]:
    """Bring back the jobs of `owner` (None: every job whose lease expired); those in `ran` (None: all)
    count an attempt with error `reason` (None: the expired lease). Returns (jobs released, ids of those
    that ended failed, past their limit); the queue's failed jobs get their dead-letter rows at once."""
    with conn.transaction():
        rows = conn.execute(query("leases", "release").format(table=table), {
            "owner": owner, "ran": ran, "reason": reason, "max_retries": policy.max_retries,
            "delay_ms": policy.delay_ms, "max_delay_ms": policy.max_delay_ms}).fetchall()
        failed = [job_id for job_id, status in rows if status == Status.FAILED]
        if failed and table == QUEUE_TABLE:
            conn.execute(query("queue", "dead_letter"), {"ids": failed})
    return len(rows), failed


def recover_expired(conn: psycopg.Connection, table: str, policy: RetryPolicy) -> tuple[int, list[int]]:
    """Expired leases of `table` back to pending, each counting its lost attempt; see `release`."""
    return release(conn, table, policy, None, None, None)


def hand_back_unheld(conn: psycopg.Connection, table: str, owner: str, held: list[int]) -> int:
    """After a lost connection: return the jobs leased to `owner` that it does not hold (`held`) to pending,
    no attempt counted; the number returned."""
    return conn.execute(query("leases", "hand_back_unheld").format(table=table),
                        {"owner": owner, "held": held}).rowcount


def hand_back(conn: psycopg.Connection | psycopg.AsyncConnection, table: str, owner: str, ids: list[int],
              delay_ms: float) -> Any:
    """Return claimed jobs `ids` that never ran to pending, no attempt counted, not before `delay_ms` from now."""
    return conn.execute(query("leases", "hand_back").format(table=table),
                        {"ids": ids, "owner": owner, "delay_ms": delay_ms})


def extend_leases(conn: psycopg.Connection | psycopg.AsyncConnection, table: str, owner: str, ids: list[int],
                  lease_ms: float) -> Any:
    """Keep the jobs `ids` that `owner` still holds for another `lease_ms`."""
    return conn.execute(query("leases", "extend_leases").format(table=table),
                        {"ids": ids, "owner": owner, "lease_ms": lease_ms})
