"""Shared memory, robust locks and latches, with real processes (fork, spawn, SIGKILL, signals).

Every test gets its own prefix (from its tmp_path) and the `prefix` fixture fails the test if any
segment or semaphore with that prefix is left in /dev/shm afterwards.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import posix_ipc
import pytest

from neurondb.shm.control import TENANTS_LOCK, SharedState, control_name, get_text, heartbeat, set_text, state_name
from neurondb.shm.latch import Latch, attach_latches
from neurondb.shm.names import instance_prefix, list_objects, object_name, segment_path, semaphore_path, unlink_all
from neurondb.shm.segment import GenerationReader, Segment, generation_name, publish_generation

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def prefix(tmp_path: Path) -> Iterator[str]:
    """A prefix of our own; asserts the test removed everything it created under it."""
    p = instance_prefix(tmp_path)
    assert not list_objects(p)
    yield p
    leftover = unlink_all(p)
    assert not leftover, f"test left shared objects behind: {leftover}"


class Children:
    """Forked children that run a function and exit; all killed and reaped at teardown."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def fork(self, fn: Callable[[], None]) -> int:
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 1
            try:
                fn()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        self.pids.append(pid)
        return pid

    def reap(self, pid: int, timeout: float = 10.0) -> int:
        """Exit code (negative: killed by that signal) of `pid`, waiting at most `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.pids.remove(pid)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                raise AssertionError(f"child {pid} did not exit within {timeout}s")
            time.sleep(0.005)

    def cleanup(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    yield kids
    kids.cleanup()


@pytest.fixture
def state(prefix: str) -> Iterator[SharedState]:
    """A control block with 2 worker slots under the test's prefix; unlinked and closed after the test."""
    shared = SharedState.create(prefix, 2)
    yield shared
    shared.unlink()
    shared.close()


def read_line(fd: int, timeout: float = 10.0) -> str:
    """One short message from a pipe, failing the test instead of hanging."""
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "no message from the child in time"
    return os.read(fd, 4096).decode().strip()


# --- 1. the resource tracker never unlinks a live segment -----------------------------------------------

def _spawned_attach(name: str) -> None:
    """Runs in a "spawn" child, which talks to a resource tracker: attach, check, write, exit."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    seg = Segment.attach(name)
    view = seg.ndarray(np.int64, 4)
    assert view[0] == 1234
    view[1] = 5678
    seg.close()


_FRESH_INTERPRETER = textwrap.dedent("""
    import sys
    name, how = sys.argv[1], sys.argv[2]
    if how == "neurondb":
        import numpy as np
        from neurondb.shm.segment import Segment
        seg = Segment.attach(name)
        assert seg.ndarray(np.int64, 4)[0] == 1234
        seg.close()
    else:  # the trap: attaching with multiprocessing.shared_memory registers with a resource tracker
        from multiprocessing import shared_memory
        shm = shared_memory.SharedMemory(name=name.lstrip("/"))
        shm.close()
""")


_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _exists(name: str) -> bool:
    try:
        posix_ipc.SharedMemory(name).close_fd()
    except posix_ipc.ExistentialError:
        return False
    return True


def test_resource_tracker_does_not_unlink_live_segment(prefix: str) -> None:
    name = object_name(prefix, "trap")
    seg = Segment.create(name, 4096)
    view = seg.ndarray(np.int64, 4)
    view[0] = 1234
    try:
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(target=_spawned_attach, args=(name,))
        child.start()
        child.join(20)
        assert child.exitcode == 0
        # A fresh interpreter has its own resource tracker, which exits (and cleans up what was
        # registered) together with it.
        run = [sys.executable, "-c", _FRESH_INTERPRETER, name, "neurondb"]
        subprocess.run(run, check=True, timeout=20, capture_output=True, env=_ENV)
        time.sleep(0.3)  # the tracker runs its cleanup asynchronously
        assert _exists(name)
        again = Segment.attach(name)
        assert list(again.ndarray(np.int64, 4)[:2]) == [1234, 5678]
        again.close()

        # Control: the same attach through multiprocessing.shared_memory loses the segment, so this
        # test would catch the trap.
        victim = object_name(prefix, "victim")
        Segment.create(victim, 4096).close()
        run = [sys.executable, "-c", _FRESH_INTERPRETER, victim, "shared_memory"]
        subprocess.run(run, check=True, timeout=20, capture_output=True, env=_ENV)
        deadline = time.monotonic() + 5
        while _exists(victim) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _exists(victim), "multiprocessing.shared_memory did not unlink: control failed"
    finally:
        seg.unlink()
        seg.close()


# --- 2. numpy views outliving close() ------------------------------------------------------------------

def _mapped(name: str) -> bool:
    return f"/dev/shm/{name.lstrip('/')}" in Path("/proc/self/maps").read_text()


def test_views_outlive_close_without_crash(prefix: str, children: Children) -> None:
    name = object_name(prefix, "views")

    def use_after_close() -> None:
        seg = Segment.create(name, 1 << 20)
        seg.unlink()
        view = seg.ndarray(np.float64, (1024, 16))
        derived = view[10:20, 3]
        view[:] = 7.0
        seg.close()
        seg.close()  # idempotent
        assert seg.closed and view.sum() == 7.0 * view.size
        derived[:] = 1.5
        assert view[15, 3] == 1.5
        with pytest.raises(ValueError):
            seg.ndarray(np.int8, 1)

    # In a child, so that a segfault shows up as an exit code instead of killing pytest.
    assert children.reap(children.fork(use_after_close)) == 0

    # The mapping is freed when the last view dies, not leaked.
    seg = Segment.create(name, 1 << 16)
    seg.unlink()
    view = seg.ndarray(np.int64, 8)
    view_of_view = view[2:]
    assert seg.live_views() == 1
    seg.close()
    assert _mapped(name)
    del view
    assert _mapped(name)
    view_of_view[0] = 3  # still valid
    del view_of_view
    assert not _mapped(name)


def test_the_crash_that_close_avoids(prefix: str, children: Children) -> None:
    """Control for the test above: closing the mmap itself under a plain numpy view segfaults."""
    name = object_name(prefix, "crash")

    def unsafe() -> None:
        import faulthandler
        import resource

        faulthandler.disable()
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=1 << 20)
        shm.unlink()
        mm = mmap.mmap(shm.fd, shm.size)
        shm.close_fd()
        view = np.ndarray((1 << 17,), np.int64, buffer=mm)  # holds no buffer export
        mm.close()  # so this succeeds...
        print(view.sum())  # ...and this reads unmapped memory

    assert children.reap(children.fork(unsafe)) == -signal.SIGSEGV


# --- 3. a lock held by a SIGKILLed process ------------------------------------------------------------

def _holder(prefix: str, lock_name: str, w: int, *, record_owner: bool = True) -> Callable[[], None]:
    def run() -> None:
        lock = SharedState.attach(prefix).lock(lock_name)
        if record_owner:
            lock.acquire()
            lock.mark_dirty()  # dies in the middle of writing the structure
        else:  # dies between taking the token and recording itself
            lock._sem.acquire()
        os.write(w, b"held\n")
        time.sleep(60)

    return run


def test_waiter_recovers_lock_of_sigkilled_holder(prefix: str, children: Children, state: SharedState) -> None:
    lock = state.lock("graph:test")
    r, w = os.pipe()
    holder = children.fork(_holder(prefix, "graph:test", w))
    assert read_line(r) == "held"
    assert lock.owner() == holder and lock.dirty

    def waiter() -> None:
        mine = SharedState.attach(prefix).lock("graph:test")
        assert mine.acquire(timeout=5)
        got = time.monotonic()
        os.write(w, f"{got} {mine.recovered_from} {int(mine.dirty)}\n".encode())
        mine.release()

    waiting = children.fork(waiter)
    time.sleep(0.3)
    assert lock.acquire(timeout=0) is False  # alive holder: no recovery
    killed_at = time.monotonic()
    os.kill(holder, signal.SIGKILL)  # not reaped yet: the waiter must see through the zombie
    got, recovered_from, dirty = read_line(r).split()
    assert float(got) - killed_at < 1.0
    assert int(recovered_from) == holder and dirty == "1"
    assert children.reap(waiting) == 0
    assert children.reap(holder) == -signal.SIGKILL

    # Usable again, and still dirty until someone repairs the structure.
    assert lock.acquire(timeout=0)
    assert lock.dirty
    lock.mark_clean()
    lock.release()
    assert state.lock_info()[-1] | {"held_since": None} == {
        "name": "graph:test", "owner_pid": 0, "held_since": None, "dirty": False,
        "recoveries": 1, "last_dead_pid": holder,
    }


def test_supervisor_releases_lock_of_dead_pid(prefix: str, children: Children, state: SharedState) -> None:
    r, w = os.pipe()
    holder = children.fork(_holder(prefix, TENANTS_LOCK, w))
    assert read_line(r) == "held"
    lock = state.lock(TENANTS_LOCK)
    assert state.release_locks_held_by(holder) == []  # alive: nothing to release
    os.kill(holder, signal.SIGKILL)
    assert children.reap(holder) == -signal.SIGKILL  # what the supervisor learns from waitpid
    started = time.monotonic()
    assert state.release_locks_held_by(holder) == [(TENANTS_LOCK, True)]
    assert lock.owner() == 0
    assert lock.acquire(timeout=0) and lock.recovered_from is None  # posted back, not inherited
    assert time.monotonic() - started < 0.5
    assert not lock.release_if_held_by(holder)
    lock.mark_clean()
    lock.release()


def test_orphaned_token_is_recovered(prefix: str, children: Children, state: SharedState) -> None:
    """The holder died after taking the semaphore but before recording itself as owner."""
    lock = state.lock("graph:orphan")
    r, w = os.pipe()
    holder = children.fork(_holder(prefix, "graph:orphan", w, record_owner=False))
    assert read_line(r) == "held"
    os.kill(holder, signal.SIGKILL)
    children.reap(holder)
    started = time.monotonic()
    assert lock.acquire(timeout=3)
    assert 0.4 < time.monotonic() - started < 1.5
    assert lock.recovered_from == 0 and lock.owner() == os.getpid()
    lock.release()


def test_live_holder_keeps_lock(prefix: str, children: Children, state: SharedState) -> None:
    lock = state.lock("graph:live")
    r, w = os.pipe()
    holder = children.fork(_holder(prefix, "graph:live", w))
    assert read_line(r) == "held"
    started = time.monotonic()
    assert lock.acquire(timeout=0.7) is False  # longer than the orphan grace: owner is recorded
    assert time.monotonic() - started >= 0.7
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()
    assert lock.owner() == holder
    with pytest.raises(RuntimeError):
        lock.mark_dirty()


# --- 4. latches -----------------------------------------------------------------------------------------

def test_latch_set_from_other_process_and_signal_handler(prefix: str, children: Children, state: SharedState) -> None:
    latch = state.latch(0)
    scratch = state.slot(1)["gauges"]
    def set_later() -> None:
        time.sleep(0.2)
        scratch[0] = time.monotonic()
        attach_latches(prefix, 2)[0].set()

    children.fork(set_later)
    assert latch.wait(5)
    assert time.monotonic() - scratch[0] < 0.05

    parent = os.getpid()

    def signal_later() -> None:
        time.sleep(0.2)
        scratch[1] = time.monotonic()
        os.kill(parent, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, lambda *_: latch.set())
    try:
        children.fork(signal_later)
        assert latch.wait(5)
        assert time.monotonic() - scratch[1] < 0.05
    finally:
        signal.signal(signal.SIGUSR1, previous)
    for pid in list(children.pids):
        assert children.reap(pid) == 0

    # A set before the wait is not lost; repeated sets leave one wakeup; timeouts time out.
    latch.set()
    latch.set()
    assert latch.wait(0)
    started = time.monotonic()
    assert latch.wait(0.1) is False
    assert time.monotonic() - started >= 0.1
    latch.set()
    latch.reset()
    assert latch.wait(0) is False


# --- 5. owner-only objects, one prefix per data directory ------------------------------------------------

def test_modes_and_prefixes(prefix: str, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert re.fullmatch(r"/nd[0-9a-f]{10}", instance_prefix(tmp_path / "a"))
    assert instance_prefix(tmp_path / "a") != instance_prefix(tmp_path / "b")
    assert instance_prefix(tmp_path / "link") == instance_prefix(tmp_path / "a")

    old_umask = os.umask(0)  # even a permissive umask must not widen the modes
    try:
        state = SharedState.create(prefix, 2)
        state.lock("graph:x")
        seg = Segment.create(object_name(prefix, "graph"), 4096)
    finally:
        os.umask(old_umask)
    try:
        entries = list_objects(prefix)
        assert len(entries) == 1 + 2 + 3 + 1  # control, 2 latches, 3 locks, 1 segment
        for entry in entries:
            st = os.stat(f"/dev/shm/{entry}")
            assert (entry, st.st_mode & 0o777, st.st_uid) == (entry, 0o600, os.geteuid())

        os.chmod(segment_path(seg.name), 0o644)  # as if someone else had prepared it for us
        with pytest.raises(PermissionError):
            Segment.attach(seg.name)
        os.chmod(semaphore_path(state.latch(1).name), 0o666)
        with pytest.raises(PermissionError):
            Latch.attach(state.latch(1).name)
    finally:
        seg.unlink()
        seg.close()
        state.unlink()
        state.close()


# --- 6. stale cleanup -------------------------------------------------------------------------------------

def test_unlink_all_removes_everything_with_prefix(prefix: str, tmp_path: Path) -> None:
    other = instance_prefix(tmp_path / "other")
    state = SharedState.create(prefix, 3)
    state.lock("graph:a")
    Segment.create(generation_name(object_name(prefix, "graph"), 1), 4096).close()
    neighbour = Segment.create(object_name(other, "control"), 4096)
    try:
        state.close()  # as after a crash: nothing closed or unlinked properly
        assert len(list_objects(prefix)) == 1 + 3 + 3 + 1
        removed = unlink_all(prefix)
        assert sorted(removed) == removed and len(removed) == 8
        assert any(e.startswith("sem.") for e in removed) and f"{prefix[1:]}.control" in removed
        assert list_objects(prefix) == [] and unlink_all(prefix) == []
        assert list_objects(other) == [f"{other[1:]}.control"]
        with pytest.raises(FileNotFoundError):
            SharedState.attach(prefix)
        fresh = SharedState.create(prefix, 3)  # a fresh start succeeds
        fresh.unlink()
        fresh.close()
    finally:
        neighbour.unlink()
        neighbour.close()


# --- 7. worker slots, tenants, control block ------------------------------------------------------------

def test_slots_and_tenants_across_processes(prefix: str, children: Children) -> None:
    state = SharedState.create(prefix, 3, n_tenants=8)
    try:
        for i in (1, 2):
            state.init_slot(i, f"neuranq.{i}", "neuranq")
            state.reset_slot(i)  # what the supervisor does before each fork

        def worker(i: int) -> Callable[[], None]:
            def run() -> None:
                mine = SharedState.attach(prefix)
                row = mine.slot(i)  # each worker writes only its own slot
                assert get_text(row, "name") == f"neuranq.{i}"
                assert state_name(int(row["state"])) == "starting"
                row["pid"] = os.getpid()
                mine.set_state(i, "idle")
                heartbeat(row)
                row["jobs_processed"] += 5
                row["jobs_failed"] += 1
                row["latency_sum_ms"] += 12.5
                row["counters"][3] = 7
                mine.set_last_error(i, "connection refused ✗")
                for _ in range(200):  # tenants are shared between workers: updates go through the lock
                    mine.tenant_add("acme", processed=1)
                mine.tenant_stats(f"solo-{os.getpid()}")

            return run

        before = time.time()
        pids = [children.fork(worker(1)), children.fork(worker(2))]
        assert [children.reap(pid) for pid in pids] == [0, 0]
        for i, pid in ((1, pids[0]), (2, pids[1])):
            row = state.slot(i)
            assert int(row["pid"]) == pid and state_name(int(row["state"])) == "idle"
            assert before <= float(row["heartbeat"]) <= time.time()
            assert int(row["jobs_processed"]) == 5 and int(row["jobs_failed"]) == 1
            assert float(row["latency_sum_ms"]) == 12.5 and int(row["counters"][3]) == 7
            assert get_text(row, "last_error") == "connection refused ✗"
        assert int(state.slots["pid"][0]) == 0  # the unused slot is untouched

        assert int(state.tenant_stats("acme")["processed"]) == 400  # no lost updates
        names = sorted(bytes(t).decode() for t in state.tenants["tenant"][state.tenants["ready"] == 1])
        assert names == sorted(["acme", *(f"solo-{pid}" for pid in pids)])
        for i in range(5):
            state.tenant_stats(f"t{i}")
        with pytest.raises(RuntimeError, match="tenant rows"):
            state.tenant_stats("one-too-many")
        with pytest.raises(ValueError):
            state.tenant_stats("x" * 65)

        # Token bucket: burst of 2, then limited until time refills it.
        assert [state.tenant_take_token("t0", rate=1.0, burst=2.0, now=100.0) for _ in range(3)] == [
            True, True, False,
        ]
        assert state.tenant_take_token("t0", rate=1.0, burst=2.0, now=101.0)
        assert int(state.tenant_stats("t0")["rate_limited"]) == 1

        reader = SharedState.attach(prefix)
        assert int(reader.control["supervisor_pid"]) == os.getpid()
        assert reader.n_slots == 3
        snapshot = reader.read_slot(1)
        assert snapshot["state"] == "idle" and snapshot["last_error"] == "connection refused ✗"
        assert snapshot["name"] == "neuranq.1" and snapshot["counters"][3] == 7
        assert reader.read_control()["shutdown_mode"] == "none"
        reader.close()

        state.reset_slot(1)  # a restart: the new process starts from zero, counters keep counting
        assert state.read_slot(1)["pid"] == 0 and state.read_slot(1)["jobs_processed"] == 5
        set_text(state.slot(1), "name", "x" * 15 + "é")  # cut on a character boundary
        assert get_text(state.slot(1), "name") == "x" * 15
    finally:
        state.unlink()
        state.close()


def test_attach_refuses_incomplete_or_foreign_layout(prefix: str, state: SharedState) -> None:
    state.control["magic"] = b""
    with pytest.raises(RuntimeError, match="not initialised"):
        SharedState.attach(prefix)
    state.control["magic"] = b"NEURONDB"
    state.control["layout_version"] = 99
    with pytest.raises(RuntimeError, match="layout version 99"):
        SharedState.attach(prefix)
    with pytest.raises(FileExistsError):
        SharedState.create(prefix, 2)
    assert control_name(prefix) == state.segment.name


# --- 8. generations ------------------------------------------------------------------------------------

def test_generation_publish_and_reader_switch(prefix: str) -> None:
    state = SharedState.create(prefix, 1)
    base = object_name(prefix, "graph", "docs")
    counter = state.generation("docs")
    reader = GenerationReader(base, SharedState.attach(prefix).generation("docs"))
    try:
        assert reader.current() is None
        for g in (1, 2):
            seg = Segment.create(generation_name(base, g), 8 * 64 * g)
            seg.ndarray(np.int64, 64 * g)[:] = g
            publish_generation(counter, base, g)
            seg.close()
            if g == 1:
                old = reader.current()
                assert old is not None
                old_view = old.ndarray(np.int64, 64)
        new = reader.current()
        assert new is not None and reader.generation == 2
        assert new.ndarray(np.int64, 128).sum() == 256
        assert old.closed and old_view.sum() == 64  # a query still running on generation 1 is fine
        graph_segments = [e for e in list_objects(prefix) if e.startswith(base[1:])]
        assert graph_segments == [f"{base[1:]}.g2"]  # generation 1 is unlinked
        with pytest.raises(ValueError):
            publish_generation(counter, base, 2)
    finally:
        reader.close()
        posix_ipc.unlink_shared_memory(generation_name(base, 2))
        state.unlink()
        state.close()


def test_series_table_counts_caps_tenants_and_drops_when_full(prefix: str) -> None:
    """Counters and histograms per (writer, family, labels), seen by another attach; tenant label values
    capped; a full table drops and counts updates instead of failing the worker."""
    from neurondb.shm import series

    shared = SharedState.create(prefix, n_slots=1)
    table = series.SeriesTable.create(shared)
    other = series.SeriesTable.attach(shared)
    try:
        row = table.row("neuranq", "jobs", ("noop", "completed"))
        assert table.row("neuranq", "jobs", ("noop", "completed")) == row        # the same series
        table.inc(row)
        table.inc(row, 2.0)
        hist = table.row("neuranq", "duration", ("noop",))
        for seconds in (0.0001, 0.003, 0.003, 1e9):
            table.observe(hist, seconds)
        rows = {(r.family, r.labels): r for r in other.rows()}
        assert rows[("jobs", ("noop", "completed"))].value == 3.0
        h = rows[("duration", ("noop",))]
        assert h.buckets[0] == 1 and h.buckets[series.BUCKETS.index(0.005)] == 2 and h.buckets[-1] == 1
        assert sum(h.buckets) == 4 and h.total == pytest.approx(1e9 + 0.0061)
        assert [table.tenant_label(t, 2, "other") for t in ("a", "b", "c", "a")] == ["a", "b", "other", "a"]
        assert other.tenant_label("d", 2, "other") == "other" and other.labelled_tenants() == {"a", "b"}
        for i in range(series.CAPACITY):
            if table.row("w", "fill", (str(i),)) < 0:
                break
        assert table.row("w", "one too many", ()) == -1
        table.inc(-1)
        table.observe(-1, 1.0)
        assert other.dropped == 2
    finally:
        other.close()
        table.segment.unlink()
        table.close()
        shared.close()
        shared.unlink()
