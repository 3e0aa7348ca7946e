"""The main shared segment of an installation: control block, worker slots, lock table, generation
counters, per-tenant table. One segment, laid out as consecutive numpy structured arrays:

    offset 0   control      CONTROL_DTYPE x 1        (header first: attach reads it to find the rest)
               slots        SLOT_DTYPE    x n_slots
               locks        LOCK_ENTRY    x N_LOCKS  (state of every RobustLock; semaphores beside it)
               generations  GEN_ENTRY     x N_GENERATIONS
               tenants      TENANT_DTYPE  x n_tenants (found by `hashtable.probe`)

Each section starts on a 64-byte boundary and every dtype is aligned, so each int64/float64 field is
one aligned 8-byte word that other processes read whole. There is no lock around reads: a status
reader may see one counter of a slot updated and the next one not yet, never a torn number. Strings
(last_error) can be seen half-rewritten; they are diagnostics.

Who writes what: a worker writes its own slot while it runs; the supervisor writes a slot's lifecycle
fields (name, kind, pid, state, restarts, exit_status) before forking the worker and after reaping it.
The control block is the supervisor's. Tables that several processes extend (locks, generations,
tenants) are extended under a lock, and an entry becomes visible to lock-free lookups only when its
`ready` word is set, after its key is completely written.

The tenants' rate limits (token buckets) are kept with the LLM providers' in `buckets.Buckets`, a segment
of its own that this block opens when a tenant first takes a token, and unlinks with itself.

Attach refuses a block whose magic is not written yet (the supervisor writes it last) or whose
layout version differs (code and running supervisor disagree on the layout).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import posix_ipc

from neurondb.shm.buckets import Buckets, Claim
from neurondb.shm.buckets import segment_name as buckets_segment_name
from neurondb.shm.hashtable import probe
from neurondb.shm.latch import Latch, create_latches, latch_name, unlink_latches
from neurondb.shm.lock import LOCK_FIELDS, PID_MASK, RecoveryGuard, RobustLock
from neurondb.shm.names import object_name, unlink_semaphore
from neurondb.shm.segment import Segment

MAGIC = b"NEURONDB"
LAYOUT_VERSION = 3  # 3: the tenants' token buckets moved to buckets.Buckets
N_LOCKS = 32
RUNNING_MAX = 256  # job ids a worker can list as running (the LLM worker: jobs of its calls in flight)
N_GENERATIONS = 32
_ALIGN = 64

WORKER_STATES = ("unused", "starting", "idle", "running", "stopping", "stopped", "crashed", "fatal")
SHUTDOWN_MODES = ("none", "smart", "fast", "immediate")

# The locks every installation has; their table rows are fixed.
REGISTRY_LOCK = "registry"  # extends the lock and generation tables
TENANTS_LOCK = "tenants"  # inserts into the tenant table and read-modify-writes of tenant rows
_BUILTIN_LOCKS = (REGISTRY_LOCK, TENANTS_LOCK)

CONTROL_DTYPE = np.dtype([
    ("magic", "S8"),
    ("layout_version", "<i8"),
    ("n_slots", "<i8"),
    ("n_tenants", "<i8"),
    ("n_locks", "<i8"),
    ("n_generations", "<i8"),
    ("created_at", "<f8"),
    ("supervisor_pid", "<i8"),
    ("supervisor_started_at", "<f8"),
    ("supervisor_heartbeat", "<f8"),
    ("config_generation", "<i8"),  # bumped by the supervisor on every applied reload
    ("shutdown_mode", "<i8"),  # index into SHUTDOWN_MODES
    ("pending_restart", "<i8"),  # postmaster-context settings changed but not applied
    ("counters", "<i8", (8,)),
], align=True)

SLOT_DTYPE = np.dtype([
    ("name", "S16"),
    ("kind", "S16"),
    ("pid", "<i8"),
    ("state", "<i8"),  # index into WORKER_STATES
    ("started_at", "<f8"),
    ("heartbeat", "<f8"),  # epoch seconds, for display
    ("heartbeat_mono", "<f8"),  # CLOCK_MONOTONIC (system-wide), for hang detection: immune to clock steps
    ("restarts", "<i8"),
    ("exit_status", "<i8"),  # last waitpid status decoded by the supervisor (exit code, or -signal)
    ("jobs_processed", "<i8"),
    ("jobs_failed", "<i8"),
    ("jobs_retried", "<i8"),
    ("latency_sum_ms", "<f8"),
    ("batches", "<i8"),
    ("last_batch_at", "<f8"),
    ("config_generation_seen", "<i8"),  # the control block's config_generation the worker last applied
    ("settings_seen", "S256"),  # short text (JSON or digest) of the settings the worker last applied
    ("naptime_ms", "<i8"),  # the worker's settings in force, for status
    ("enabled", "<i8"),
    ("last_error", "S200"),
    ("last_error_at", "<f8"),
    ("counters", "<i8", (8,)),
    ("gauges", "<f8", (8,)),
    # The jobs whose attempt is under way, 0 = free entry; `running_unlisted` counts those that did not fit.
    # When a worker dies, the supervisor charges an attempt to these jobs only (see RunningJobs).
    ("running", "<i8", (RUNNING_MAX,)),
    ("running_unlisted", "<i8"),
], align=True)

LOCK_ENTRY = np.dtype([("name", "S32"), ("ready", "<i8"), *LOCK_FIELDS], align=True)
GEN_ENTRY = np.dtype([("name", "S32"), ("ready", "<i8"), ("generation", "<i8")], align=True)

# What belongs to one incarnation of a worker; the rest of a slot (identity, restarts, cumulative
# counters, last error and exit status: why the previous incarnation died) survives a restart.
_INCARNATION_FIELDS = ("pid", "started_at", "heartbeat", "heartbeat_mono", "last_batch_at",
                       "config_generation_seen", "settings_seen", "naptime_ms", "enabled", "running",
                       "running_unlisted")

TENANT_DTYPE = np.dtype([
    ("tenant", "S64"),
    ("ready", "<i8"),
    ("processed", "<i8"),
    ("failed", "<i8"),
    ("retried", "<i8"),
    ("rate_limited", "<i8"),
    ("latency_sum_ms", "<f8"),
    ("counters", "<i8", (4,)),
], align=True)


class TenantTableFull(RuntimeError):
    """Every row of the fixed-size tenant table is taken."""


def _layout(n_slots: int, n_tenants: int) -> tuple[dict[str, tuple[np.dtype, int, int]], int]:
    """{section: (dtype, count, offset)} and the total size."""
    sections = {}
    offset = 0
    for name, dtype, count in (
        ("control", CONTROL_DTYPE, 1),
        ("slots", SLOT_DTYPE, n_slots),
        ("locks", LOCK_ENTRY, N_LOCKS),
        ("generations", GEN_ENTRY, N_GENERATIONS),
        ("tenants", TENANT_DTYPE, n_tenants),
    ):
        sections[name] = (dtype, count, offset)
        offset += -(-dtype.itemsize * count // _ALIGN) * _ALIGN
    return sections, offset


def control_name(prefix: str) -> str:
    return object_name(prefix, "control")


def lock_sem_name(prefix: str, row: int) -> str:
    """Semaphores are named by table row, not by lock name: any lock name is then allowed, and
    `unlink` can find every possible lock semaphore without reading the table."""
    return object_name(prefix, "lock", row)


class SharedState:
    """The control segment mapped into this process. `create` (supervisor) or `attach` (others)."""

    def __init__(self, prefix: str, segment: Segment) -> None:
        self.prefix = prefix
        self.segment = segment
        header = segment.ndarray(CONTROL_DTYPE, ())
        sections, size = _layout(int(header["n_slots"]), int(header["n_tenants"]))
        if size != segment.size or (int(header["n_locks"]), int(header["n_generations"])) != (
            N_LOCKS, N_GENERATIONS,
        ):
            raise RuntimeError(f"shared memory {segment.name} does not match layout version {LAYOUT_VERSION}")
        views = {name: segment.ndarray(dt, count, off) for name, (dt, count, off) in sections.items()}
        # The one control record, as a 0-d array: control["config_generation"] += 1 and
        # int(control["supervisor_pid"]) work (numpy 2 refuses int() of a 1-element 1-d array).
        self.control: np.ndarray = views["control"].reshape(())
        self.slots: np.ndarray = views["slots"]
        self.locks: np.ndarray = views["locks"]
        self.generations: np.ndarray = views["generations"]
        self.tenants: np.ndarray = views["tenants"]
        self._guard = RecoveryGuard(segment.name)
        self._lock_cache: dict[str, RobustLock] = {}
        self._latches: dict[int, Latch] = {}
        self._buckets: Buckets | None = None

    @classmethod
    def create(cls, prefix: str, n_slots: int, n_tenants: int = 256) -> SharedState:
        """Create the segment, the built-in locks and one latch per slot. FileExistsError if a previous
        run left them: the supervisor then checks no old process lives and calls `names.unlink_all`."""
        if n_slots < 1 or n_tenants < 1:
            raise ValueError("need at least one slot and one tenant row")
        _, size = _layout(n_slots, n_tenants)
        segment = Segment.create(control_name(prefix), size)
        header = segment.ndarray(CONTROL_DTYPE, ())
        header["layout_version"] = LAYOUT_VERSION
        header["n_slots"] = n_slots
        header["n_tenants"] = n_tenants
        header["n_locks"] = N_LOCKS
        header["n_generations"] = N_GENERATIONS
        header["created_at"] = header["supervisor_started_at"] = time.time()
        header["supervisor_pid"] = os.getpid()
        state = cls(prefix, segment)
        try:
            for row, name in enumerate(_BUILTIN_LOCKS):
                state._lock_cache[name] = RobustLock.create(
                    lock_sem_name(prefix, row), state.locks[row, ...], state._guard
                )
                state.locks["name"][row] = name.encode()
                state.locks["ready"][row] = 1
            state._latches = dict(enumerate(create_latches(prefix, n_slots)))
        except BaseException:
            state.unlink()
            state.close()
            raise
        header["magic"] = MAGIC  # last: attach refuses the block until it is complete
        return state

    @classmethod
    def attach(cls, prefix: str) -> SharedState:
        """Map an existing control segment. FileNotFoundError if there is none (service down),
        RuntimeError if it is not initialised yet or has another layout version."""
        segment = Segment.attach(control_name(prefix))
        header = segment.ndarray(CONTROL_DTYPE, ())
        try:
            if header["magic"].item() != MAGIC:
                raise RuntimeError(f"shared memory {segment.name} is not initialised (yet)")
            if int(header["layout_version"]) != LAYOUT_VERSION:
                raise RuntimeError(
                    f"shared memory {segment.name} has layout version {int(header['layout_version'])}, "
                    f"this code expects {LAYOUT_VERSION}: restart the service with one version"
                )
            return cls(prefix, segment)
        except BaseException:
            segment.close()
            raise

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def slot(self, i: int) -> np.ndarray:
        """A 0-d view of slot `i`: `row["heartbeat"] = ...` writes shared memory."""
        return self.slots[i, ...]

    def init_slot(self, i: int, name: str, kind: str) -> None:
        """Supervisor, at start: slot `i` belongs to worker `name` of `kind`; everything else zeroed."""
        row = self.slot(i)
        row[...] = np.zeros((), SLOT_DTYPE)
        set_text(row, "name", name)
        set_text(row, "kind", kind)

    def reset_slot(self, i: int) -> None:
        """Supervisor, before forking a new incarnation of the worker of slot `i`: forget the previous
        process, keep what spans restarts (counters keep counting, so rates never go negative)."""
        row = self.slot(i)
        for field in _INCARNATION_FIELDS:
            row[field] = 0
        row["state"] = state_code("starting")

    def set_state(self, i: int, state: str) -> None:
        self.slots["state"][i] = state_code(state)

    def set_last_error(self, i: int, message: str) -> None:
        row = self.slot(i)
        set_text(row, "last_error", message)
        row["last_error_at"] = time.time()

    def read_slot(self, i: int) -> dict[str, Any]:
        """A private copy of slot `i` as plain Python values: text decoded, `state` as its name.
        For readers that must not trust shared memory (status, the supervisor's SQL export)."""
        snapshot = _snapshot(self.slots[i, ...])
        snapshot["state"] = state_name(snapshot["state"])
        return snapshot

    def running_jobs(self, i: int) -> list[int] | None:
        """Supervisor, after reaping the worker of slot `i`: the job ids it listed as running, or None when
        some did not fit in the slot (then any of its claimed jobs may have been running)."""
        row = self.slot(i)
        if int(row["running_unlisted"]) > 0:
            return None
        running = row["running"].copy()
        return [int(job_id) for job_id in running[running != 0]]

    def read_control(self) -> dict[str, Any]:
        """A private copy of the control block; `shutdown_mode` as its name."""
        snapshot = _snapshot(self.control)
        mode = snapshot["shutdown_mode"]
        snapshot["shutdown_mode"] = SHUTDOWN_MODES[mode] if 0 <= mode < len(SHUTDOWN_MODES) else "invalid"
        return snapshot

    def latch(self, i: int) -> Latch:
        """The latch of slot `i` (attached on first use)."""
        latch = self._latches.get(i)
        if latch is None:
            if not 0 <= i < self.n_slots:
                raise IndexError(f"no slot {i} (have {self.n_slots})")
            latch = self._latches[i] = Latch.attach(latch_name(self.prefix, i))
        return latch

    def lock(self, name: str) -> RobustLock:
        """The RobustLock called `name` (at most 32 bytes), registered in the lock table on first use
        by any process. Locks are never unregistered: a name is a structure, not a transaction."""
        lock = self._lock_cache.get(name)
        if lock is not None:
            return lock
        key = _key(name, 32, "lock name")
        row = _find_entry(self.locks, key)
        if row is None:
            with self.lock(REGISTRY_LOCK):
                row = _find_entry(self.locks, key)
                if row is None:
                    row = _free_entry(self.locks, "lock")
                    sem_name = lock_sem_name(self.prefix, row)
                    unlink_semaphore(sem_name)  # left behind by a registrant that died before marking its row ready
                    lock = RobustLock.create(sem_name, self.locks[row, ...], self._guard)
                    self.locks["name"][row] = key
                    self.locks["ready"][row] = 1
        if lock is None:
            lock = RobustLock.attach(lock_sem_name(self.prefix, row), self.locks[row, ...], self._guard)
        self._lock_cache[name] = lock
        return lock

    def release_locks_held_by(self, pid: int) -> list[tuple[str, bool]]:
        """Supervisor, after waitpid reported `pid` dead: free every lock it held.

        Returns (lock name, dirty) for each one freed; dirty means the structure it protects was left
        half-written and needs repair. Takes no data lock (only the recovery flock, for microseconds).
        """
        freed = []
        held = (self.locks["ready"] == 1) & ((self.locks["owner"] & PID_MASK) == pid)
        for row in np.flatnonzero(held):
            name = bytes(self.locks["name"][row]).decode()
            lock = self.lock(name)
            if lock.release_if_held_by(pid):
                freed.append((name, lock.dirty))
        return freed

    def lock_info(self) -> list[dict[str, Any]]:
        """One dict per registered lock, for status output."""
        info = []
        for row in np.flatnonzero(self.locks["ready"] == 1):
            entry = self.locks[row]
            owner = int(entry["owner"]) & PID_MASK
            info.append({
                "name": bytes(entry["name"]).decode(),
                "owner_pid": owner,
                "held_since": float(entry["acquired_at"]) if owner else None,
                "dirty": bool(entry["dirty"]),
                "recoveries": int(entry["recoveries"]),
                "last_dead_pid": int(entry["last_dead_pid"]),
            })
        return info

    def generation(self, name: str) -> np.ndarray:
        """The 0-d int64 generation counter of structure `name` (0 until its first publish); pass it to
        `segment.publish_generation` / `segment.GenerationReader`."""
        key = _key(name, 32, "structure name")
        row = _find_entry(self.generations, key)
        if row is None:
            with self.lock(REGISTRY_LOCK):
                row = _find_entry(self.generations, key)
                if row is None:
                    row = _free_entry(self.generations, "generation")
                    self.generations["generation"][row] = 0
                    self.generations["name"][row] = key
                    self.generations["ready"][row] = 1
        return self.generations["generation"][row, ...]

    def tenant_stats(self, tenant_id: str) -> np.ndarray:
        """0-d view of the row of `tenant_id` (created on first use, under the tenants lock).

        Lookups are lock-free; read-modify-writes of the row must hold `lock(TENANTS_LOCK)` since
        several queue workers serve one tenant (or use `tenant_add` / `tenant_take_token`).
        """
        key = _key(tenant_id, 64, "tenant id")
        row = self._probe_tenant(key, insert=False)
        if row is None:
            with self.lock(TENANTS_LOCK):
                row = self._probe_tenant(key, insert=True)
        return self.tenants[row, ...]

    def tenant_add(self, tenant_id: str, *, processed: int = 0, failed: int = 0, retried: int = 0,
                   latency_ms: float = 0.0) -> None:
        """Add to a tenant's counters atomically with respect to the other workers."""
        row = self.tenant_stats(tenant_id)
        with self.lock(TENANTS_LOCK):
            row["processed"] += processed
            row["failed"] += failed
            row["retried"] += retried
            row["latency_sum_ms"] += latency_ms

    def tenant_take_token(self, tenant_id: str, rate: float, burst: float, now: float | None = None) -> bool:
        """Token bucket shared by all workers: refill at `rate` tokens/s up to `burst`, take one.
        False (and `rate_limited` counted) when the tenant is over its rate."""
        row = self.tenant_stats(tenant_id)
        if self.buckets.take([Claim(tenant_bucket(tenant_id), 1.0, rate, burst)], now) == 0:
            return True
        with self.lock(TENANTS_LOCK):
            row["rate_limited"] += 1
        return False

    @property
    def buckets(self) -> Buckets:
        """The installation's rate-limit buckets (opened, or created, on first use)."""
        if self._buckets is None:
            self._buckets = Buckets.open(self)
        return self._buckets

    def close(self) -> None:
        """Close this process's handles. The arrays above stay readable until this object is dropped
        (see `Segment.close`); nothing is removed for other processes."""
        for latch in self._latches.values():
            latch.close()
        for lock in self._lock_cache.values():
            lock.close()
        self._latches, self._lock_cache = {}, {}
        if self._buckets is not None:
            self._buckets.close()
            self._buckets = None
        self._guard.close()
        self.segment.close()

    def unlink(self) -> None:
        """Remove the control segment, every lock semaphore, every latch and the rate-limit buckets
        (idempotent). Segments of structures (generations) are their owners' to unlink;
        `names.unlink_all` removes everything."""
        for row in range(N_LOCKS):
            unlink_semaphore(lock_sem_name(self.prefix, row))
        unlink_latches(self.prefix, self.n_slots)
        try:
            posix_ipc.unlink_shared_memory(buckets_segment_name(self.prefix))
        except posix_ipc.ExistentialError:
            pass
        self.segment.unlink()

    def _probe_tenant(self, key: bytes, *, insert: bool) -> int | None:
        """Row of `key`; with `insert` (tenants lock held) claims the first free row on its probe path."""
        row, free = probe(self.tenants["ready"], self.tenants["tenant"], key)
        if row is not None or not insert:
            return row
        if free is None:
            raise TenantTableFull(f"all {len(self.tenants)} tenant rows are taken; raise the tenant table size")
        self.tenants[free] = np.zeros((), TENANT_DTYPE)
        self.tenants["tenant"][free] = key
        self.tenants["ready"][free] = 1
        return free


class RunningJobs:
    """A worker's list of the jobs whose attempt is under way, in its own slot, for the supervisor to read
    once the worker is dead: only these count an attempt then (claimed jobs that never started do not).

    Each change is one aligned 8-byte store, so a worker killed at any moment leaves a list that is right
    to within the job being added or removed. O(1) per call, no lock: the slot is this process's own.
    """

    def __init__(self, row: np.ndarray) -> None:
        self._ids = row["running"]
        self._unlisted = row["running_unlisted"]
        self._ids[...] = 0
        self._unlisted[...] = 0
        self._where: dict[int, int] = {}       # job id -> its entry; -1: did not fit
        self._free = list(range(RUNNING_MAX - 1, -1, -1))

    def add(self, job_id: int) -> None:
        if job_id in self._where:
            return
        if self._free:
            entry = self._where[job_id] = self._free.pop()
            self._ids[entry] = job_id
        else:
            self._where[job_id] = -1
            self._unlisted[...] = int(self._unlisted) + 1

    def discard(self, job_id: int) -> None:
        entry = self._where.pop(job_id, None)
        if entry is None:
            return
        if entry < 0:
            self._unlisted[...] = int(self._unlisted) - 1
        else:
            self._ids[entry] = 0
            self._free.append(entry)


def tenant_bucket(tenant_id: str) -> str:
    """The key of a tenant's job-rate bucket in `Buckets`."""
    return f"jobs:{tenant_id}"


def state_code(name: str) -> int:
    """Small int stored in `slots["state"]` for a WORKER_STATES name."""
    return WORKER_STATES.index(name)


def state_name(code: int) -> str:
    """The WORKER_STATES name of a stored code (defensive: an out-of-range value reads "invalid")."""
    return WORKER_STATES[code] if 0 <= code < len(WORKER_STATES) else "invalid"


def set_text(row: np.ndarray, field: str, text: str) -> None:
    """Store `text` UTF-8 encoded into a fixed-size bytes field, cut on a character boundary."""
    size = row.dtype[field].itemsize
    row[field] = text.encode()[:size].decode(errors="ignore").encode()


def get_text(row: np.ndarray, field: str) -> str:
    """The text of a bytes field (`.item()`: `bytes()` of a 0-d view would keep the NUL padding)."""
    return row[field].item().decode(errors="replace")


def heartbeat(row: np.ndarray) -> None:
    """Record that the worker of this slot is alive, in both clocks (see SLOT_DTYPE)."""
    row["heartbeat"] = time.time()
    row["heartbeat_mono"] = time.monotonic()


def _snapshot(row: np.ndarray) -> dict[str, Any]:
    copy = row.copy()  # one memcpy: the fields below all come from the same instant (near enough)
    out: dict[str, Any] = {}
    for field in copy.dtype.names:
        value = copy[field]
        out[field] = value.item().decode(errors="replace") if value.dtype.kind == "S" else value.tolist()
    return out


def _key(text: str, size: int, what: str) -> bytes:
    key = text.encode()
    if not key or len(key) > size or b"\0" in key:
        raise ValueError(f"{what} {text!r} must be 1 to {size} bytes of UTF-8 without NUL")
    return key


def _find_entry(table: np.ndarray, key: bytes) -> int | None:
    rows = np.flatnonzero((table["ready"] == 1) & (table["name"] == key))
    return int(rows[0]) if len(rows) else None


def _free_entry(table: np.ndarray, what: str) -> int:
    rows = np.flatnonzero(table["ready"] == 0)
    if not len(rows):
        raise RuntimeError(f"the {what} table is full ({len(table)} entries)")
    return int(rows[0])
