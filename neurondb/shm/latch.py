"""Latches, like PostgreSQL's: a worker sleeps on its latch; anyone (the supervisor, a NOTIFY listener,
the worker's own signal handler) sets it to wake the worker early.

A latch is a POSIX semaphore with initial value 0: `set()` posts, `wait()` takes. A set that happens
while the worker is busy is not lost: the next `wait()` returns at once. `set()` posts only while the
count is 0, so a burst of sets leaves one pending wakeup, not a backlog of them (two setters racing can
leave 2; `wait()` drains the excess, so the count stays bounded and a spurious wakeup is the worst case).

The protocol that makes it race-free is PostgreSQL's: whoever wants the worker to act first records
why (sets a flag: shutdown requested, reload, new work in the database), then calls `set()`; the worker
checks those flags after every `wait()`. Sets that arrived while it was checking are seen next time.

`set()` only posts a semaphore, so it is safe in a Python signal handler (which runs in the main thread
between bytecodes). A signal delivered to the main thread interrupts the wait at once (EINTR); one
delivered to another thread cannot interrupt it, so `wait()` sleeps in slices of at most
`MAX_SLICE_SECONDS`, between which Python runs pending handlers.
"""

from __future__ import annotations

import time

import posix_ipc

from neurondb.shm.names import check_semaphore_owner, make_owner_only, object_name, semaphore_path, unlink_semaphore

MAX_SLICE_SECONDS = 0.1
_VALUE_SUPPORTED = posix_ipc.SEMAPHORE_VALUE_SUPPORTED


class Latch:
    """A settable wakeup; create with `create` / `attach`."""

    def __init__(self, sem: posix_ipc.Semaphore) -> None:
        self._sem = sem

    @classmethod
    def create(cls, name: str) -> Latch:
        """New latch, not set (O_EXCL, mode 0600)."""
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=0o600, initial_value=0)
        make_owner_only(semaphore_path(name))
        return cls(sem)

    @classmethod
    def attach(cls, name: str) -> Latch:
        check_semaphore_owner(name)
        return cls(posix_ipc.Semaphore(name))

    @property
    def name(self) -> str:
        return self._sem.name

    def set(self) -> None:
        """Wake the waiter (now, or at its next wait). Safe in a signal handler."""
        if not _VALUE_SUPPORTED or self._sem.value == 0:
            self._sem.release()

    def wait(self, timeout: float) -> bool:
        """Sleep until set or `timeout` seconds passed; True if set. Consumes the setting."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            remaining = deadline - time.monotonic()
            try:
                self._sem.acquire(max(0.0, min(MAX_SLICE_SECONDS, remaining)))
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                if remaining <= 0:
                    return False
                continue
            self.reset()
            return True

    def reset(self) -> None:
        """Drop pending sets (the caller is about to check for work anyway)."""
        try:
            while True:
                self._sem.acquire(0)
        except posix_ipc.BusyError:
            pass

    def close(self) -> None:
        self._sem.close()

    def unlink(self) -> None:
        """Remove the name (idempotent)."""
        unlink_semaphore(self.name)


def latch_name(prefix: str, slot: int) -> str:
    """The latch of worker slot `slot` of the installation with `prefix`."""
    return object_name(prefix, "latch", slot)


def create_latches(prefix: str, n_slots: int) -> list[Latch]:
    """One latch per worker slot (the supervisor, at start)."""
    return [Latch.create(latch_name(prefix, i)) for i in range(n_slots)]


def attach_latches(prefix: str, n_slots: int) -> list[Latch]:
    return [Latch.attach(latch_name(prefix, i)) for i in range(n_slots)]


def unlink_latches(prefix: str, n_slots: int) -> None:
    for i in range(n_slots):
        unlink_semaphore(latch_name(prefix, i))
