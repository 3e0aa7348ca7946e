"""A cross-process lock that survives its holder being SIGKILLed.

A POSIX semaphore (initial value 1) does the mutual exclusion; the kernel never gives back a semaphore
token held by a dead process. So each lock also has a state record in shared memory (a row of the lock
table in the control block, see `control.py`; any structured row with the `LOCK_FIELDS` works):

- `owner`: the holder's identity packed into ONE int64, `start_ticks << 22 | pid`, where start_ticks is
  the process start time from /proc/<pid>/stat. One aligned 8-byte word is read and written whole, so
  nobody ever sees the pid of one holder with the start time of another, and a recycled pid (same pid,
  other start time) is recognised as a different process.
- `dirty`: set by the holder while it modifies the protected structure (`writing()`), cleared after.
  A holder that dies inside the write leaves it set, and it stays set through recovery: whoever holds
  the lock next sees `dirty` and must repair or rebuild the structure, then `mark_clean()`.
- `seq` (acquisitions, to tell a stuck lock from a busy one), `recoveries`, `last_dead_pid`,
  `acquired_at`, for the recovery logic and for status.

Recovery. `acquire()` waits in slices of 50 ms. Between slices it looks at the owner word:
- owner recorded and dead (no /proc entry, a zombie, or a different start time): the waiter inherits
  the dead holder's token. The semaphore stays at 0 (the token changes hands, no post), so the count
  can never exceed 1. Cost: one slice, i.e. a waiter is blocked at most ~50 ms behind a dead holder.
- no owner recorded, the semaphore unavailable and `seq` unchanged for `ORPHAN_GRACE_SECONDS`: the
  holder died in the microseconds between taking the token and recording itself (or between clearing
  itself and posting, on release). The waiter inherits the orphaned token.
`release_if_held_by(pid)` is the supervisor's path: after waitpid reported `pid` dead it clears the
owner word and posts the token back, so that a waiter wakes immediately.

Every recovery runs under a `RecoveryGuard`, an flock the kernel drops when its holder dies, so two
recoverers never both inherit (or post) one token and a recoverer SIGKILLed mid-recovery blocks nobody.
The normal acquire/release path never touches the guard.

Known limit (no atomic compare-and-swap is available from Python): a process frozen (SIGSTOP, swap) for
longer than the orphan grace exactly between taking the token and recording itself would, on waking,
share the lock with the waiter that inherited the orphan. Its later `release()` then raises instead of
posting a second token. A dead owner, the case the system must handle, is detected exactly.

The lock is not re-entrant, and it belongs to a process, not a thread.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import posix_ipc

from neurondb.shm.names import check_semaphore_owner, make_owner_only, semaphore_path, unlink_semaphore

log = logging.getLogger(__name__)

LOCK_FIELDS = [
    ("owner", "<i8"),
    ("seq", "<i8"),
    ("dirty", "<i8"),
    ("recoveries", "<i8"),
    ("last_dead_pid", "<i8"),
    ("acquired_at", "<f8"),
]

PID_BITS = 22  # Linux pid_max is at most 2**22
PID_MASK = (1 << PID_BITS) - 1
SLICE_SECONDS = 0.05
ORPHAN_GRACE_SECONDS = 0.5
GUARD_TIMEOUT_SECONDS = 1.0

_HAVE_PROC = os.path.exists("/proc/self/stat")
_own_token: dict[int, int] = {}


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of `pid`, None if there is no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2:].split()  # the command name may contain spaces and ')'
    return fields[0].decode(), int(fields[19])


def own_token() -> int:
    """This process's owner word; recomputed after fork (the cache is keyed by pid)."""
    pid = os.getpid()
    token = _own_token.get(pid)
    if token is None:
        stat = _proc_stat(pid) if _HAVE_PROC else None
        token = ((stat[1] if stat else 0) << PID_BITS) | pid
        _own_token.clear()
        _own_token[pid] = token
    return token


def token_alive(token: int) -> bool:
    """Is the process that wrote owner word `token` still running (zombies count as dead)?"""
    pid, start = token & PID_MASK, token >> PID_BITS
    if not _HAVE_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X", "x"):
        return False
    return not start or stat[1] == start


def _sem_wait(sem: posix_ipc.Semaphore, timeout: float) -> bool:
    """Take a token within `timeout` seconds (0: don't wait); a signal counts as a timeout."""
    try:
        sem.acquire(timeout)
    except (posix_ipc.BusyError, posix_ipc.SignalError):
        return False
    return True


class RecoveryGuard:
    """Serialises lock recoveries between processes: flock on a file descriptor of a shm object.

    A semaphore here would need recovering in turn; an flock is dropped by the kernel when its holder
    dies. Each process opens its own descriptor (an flock belongs to an open file description, which a
    forked child would otherwise share with its parent); a thread mutex covers threads of one process.
    """

    def __init__(self, shm_name: str) -> None:
        self.shm_name = shm_name
        self._pid = 0
        self._fd = -1
        self._mutex = threading.Lock()

    def _fd_for_this_process(self) -> int:
        pid = os.getpid()
        if self._pid != pid:
            if self._fd >= 0:
                os.close(self._fd)  # the duplicate inherited through fork; the parent keeps its own
            self._fd = posix_ipc.SharedMemory(self.shm_name).fd
            self._pid = pid
            self._mutex = threading.Lock()
        return self._fd

    def acquire(self, timeout: float) -> bool:
        fd = self._fd_for_this_process()
        deadline = time.monotonic() + timeout
        if not self._mutex.acquire(timeout=timeout):
            return False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self._mutex.release()
                    return False
                time.sleep(0.001)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._mutex.release()

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = -1, 0


class RobustLock:
    """Semaphore + owner word; see the module docstring. Use `create` / `attach`, or
    `SharedState.lock(name)`, which keeps the state in the control block's lock table."""

    def __init__(self, sem: posix_ipc.Semaphore, state: np.ndarray, guard: RecoveryGuard) -> None:
        self._sem = sem
        self._state = state
        self._owner = state["owner"]
        self._seq = state["seq"]
        self._guard = guard
        # After an acquire(): pid of the dead holder whose token it inherited (0 if unknown, for an
        # orphaned token), or None when the lock was taken normally.
        self.recovered_from: int | None = None

    @classmethod
    def create(cls, sem_name: str, state: np.ndarray, guard: RecoveryGuard) -> RobustLock:
        """New semaphore (O_EXCL, mode 0600, value 1); resets the lock fields of `state`."""
        sem = posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, mode=0o600, initial_value=1)
        make_owner_only(semaphore_path(sem_name))
        for field, _ in LOCK_FIELDS:
            state[field] = 0
        return cls(sem, state, guard)

    @classmethod
    def attach(cls, sem_name: str, state: np.ndarray, guard: RecoveryGuard) -> RobustLock:
        check_semaphore_owner(sem_name)
        return cls(posix_ipc.Semaphore(sem_name), state, guard)

    @property
    def name(self) -> str:
        return self._sem.name

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock within `timeout` seconds (None: wait forever, 0: try once); False on timeout.

        Dead holders are recovered between 50 ms slices (see the module docstring); afterwards check
        `dirty`: if set, the structure was left half-written and must be repaired before use.
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        self.recovered_from = None
        orphan: tuple[int, float] | None = None  # (seq, since when) while held with no owner recorded
        while True:
            wait = SLICE_SECONDS if deadline is None else max(0.0, min(SLICE_SECONDS, deadline - time.monotonic()))
            if _sem_wait(self._sem, wait):
                self._take()
                return True
            owner = int(self._owner)
            if owner:
                orphan = None
                if not token_alive(owner) and self._recover(owner, None):
                    return True
            else:
                seq, now = int(self._seq), time.monotonic()
                if orphan is None or orphan[0] != seq:
                    orphan = (seq, now)
                elif now - orphan[1] >= ORPHAN_GRACE_SECONDS and self._recover(0, seq):
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def release(self) -> None:
        """Give the lock back; RuntimeError if this process does not hold it (then nothing is posted,
        so the semaphore never counts above 1)."""
        owner = int(self._owner)
        if owner != own_token():
            raise RuntimeError(f"lock {self.name} is not held by this process (owner pid {owner & PID_MASK})")
        self._owner[...] = 0
        self._sem.release()

    def owner(self) -> int:
        """Pid of the holder, 0 if free (or held by a process that has not recorded itself yet)."""
        return int(self._owner) & PID_MASK

    def release_if_held_by(self, pid: int) -> bool:
        """Supervisor path, after waitpid reported `pid` dead: free the lock if `pid` held it.

        The `dirty` flag is left as it was: the caller reports "structure needs repair" when set.
        """
        if not self._guard.acquire(GUARD_TIMEOUT_SECONDS):
            log.warning("lock %s: recovery guard busy; leaving recovery of pid %d to waiters", self.name, pid)
            return False
        try:
            owner = int(self._owner)
            if not owner or owner & PID_MASK != pid or token_alive(owner):
                return False
            self._state["recoveries"] += 1
            self._state["last_dead_pid"] = pid
            self._owner[...] = 0
            self._sem.release()
            self._log_recovery(pid, "released by the supervisor")
            return True
        finally:
            self._guard.release()

    @property
    def dirty(self) -> bool:
        """The protected structure may be half-written: repair it before trusting it."""
        return bool(self._state["dirty"])

    def mark_dirty(self) -> None:
        self._check_held()
        self._state["dirty"] = 1

    def mark_clean(self) -> None:
        self._check_held()
        self._state["dirty"] = 0

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the dirty flag for the duration of a write. If the block raises, the flag stays set:
        the structure may be half-written, exactly as if the process had died there."""
        self.mark_dirty()
        yield
        self.mark_clean()

    def close(self) -> None:
        self._sem.close()

    def unlink(self) -> None:
        """Remove the semaphore's name (idempotent); processes that have it open keep it."""
        unlink_semaphore(self.name)

    def __enter__(self) -> RobustLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _take(self) -> None:
        self._owner[...] = own_token()
        self._state["acquired_at"] = time.time()
        self._seq[...] = int(self._seq) + 1

    def _check_held(self) -> None:
        if int(self._owner) != own_token():
            raise RuntimeError(f"lock {self.name} is not held by this process")

    def _recover(self, expected: int, seq: int | None) -> bool:
        """Inherit the token held by dead owner `expected` (0: orphaned token, `seq` unchanged)."""
        if not self._guard.acquire(GUARD_TIMEOUT_SECONDS):
            return False
        try:
            if _sem_wait(self._sem, 0):  # freed meanwhile (by its holder or by the supervisor)
                self._take()
                return True
            if int(self._owner) != expected or (seq is not None and int(self._seq) != seq):
                return False  # someone else recovered it, or the holder was alive after all
            dead_pid = expected & PID_MASK
            self._state["recoveries"] += 1
            self._state["last_dead_pid"] = dead_pid
            self._take()
            self.recovered_from = dead_pid
            self._log_recovery(dead_pid, "inherited by a waiter")
            return True
        finally:
            self._guard.release()

    def _log_recovery(self, dead_pid: int, how: str) -> None:
        holder = f"dead holder pid {dead_pid}" if dead_pid else "a holder that died before recording itself"
        if self.dirty:
            log.warning("lock %s: %s from %s; the protected structure is dirty and needs repair",
                        self.name, how, holder)
        else:
            log.warning("lock %s: %s from %s; the protected structure is clean", self.name, how, holder)
