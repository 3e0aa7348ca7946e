"""POSIX shared memory segments with numpy views, and generations for structures that grow.

Two Python traps shape this module.

Resource tracker. `multiprocessing.shared_memory` registers every segment it opens (even attaches)
with the resource tracker, which unlinks it when the process that registered it goes away, under the
feet of the processes still using it. Segments here are opened with `posix_ipc` and mapped with
`mmap`; nothing is ever registered, so only an explicit `unlink()` (or `names.unlink_all`) removes one.

Views outliving close. `np.ndarray(buffer=mmap)` holds no buffer export on the mmap, so `mmap.close()`
succeeds under a live view and the next access segfaults. So views are made with `np.frombuffer`
(which holds an export: an accidental `mmap.close()` raises BufferError instead of crashing), and
`Segment.close()` never unmaps: it drops the segment's own reference to the mmap. With no views left
the mmap is freed right there (CPython refcounting); otherwise it is freed when the last view dies.
A view used after `close()` therefore always reads valid memory.

Generations. A structure that grows is rebuilt in a new segment `generation_name(base, g + 1)` and
published by storing g + 1 into a shared int64 counter; readers call `GenerationReader.current()`
before each query and switch when the counter moved. The writer then unlinks the old generation: a
reader still attached keeps its mapping until it switches (unlink removes the name, not the memory).
A writer killed between creating g + 1 and publishing it (or between publishing and unlinking g)
leaves a generation nobody publishes or unlinks; the next writer, under the same lock, removes it
with `unlink_stale_generations` before it creates one.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import time
import weakref

import numpy as np
import posix_ipc
from numpy.typing import DTypeLike

from neurondb.shm.names import SHM_DIR, check_owner_only

log = logging.getLogger(__name__)


class Segment:
    """One mapped POSIX shared memory object. Create with `create` or `attach`, not the constructor."""

    def __init__(self, name: str, mm: mmap.mmap) -> None:
        self.name = name
        self.size = len(mm)
        self._mm: mmap.mmap | None = mm
        self._views: list[weakref.ref[np.ndarray]] = []

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        """A new zero-filled segment, mode 0600; FileExistsError if the name is taken (O_EXCL)."""
        if size <= 0:
            raise ValueError(f"segment size must be positive, not {size}")
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.ExistentialError as exc:
            raise FileExistsError(f"shared memory segment {name} already exists") from exc
        try:
            os.fchmod(shm.fd, 0o600)  # the creation mode went through the umask
            return cls(name, mmap.mmap(shm.fd, size))
        except BaseException:
            shm.unlink()
            raise
        finally:
            shm.close_fd()

    @classmethod
    def attach(cls, name: str) -> Segment:
        """Map an existing segment; FileNotFoundError if it does not exist, PermissionError if it is
        not ours and owner-only."""
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError as exc:
            raise FileNotFoundError(f"shared memory segment {name} does not exist") from exc
        try:
            check_owner_only(os.fstat(shm.fd), f"shared memory segment {name}")
            if shm.size == 0:
                raise FileNotFoundError(f"shared memory segment {name} is empty (not initialised)")
            return cls(name, mmap.mmap(shm.fd, shm.size))
        finally:
            shm.close_fd()

    @property
    def closed(self) -> bool:
        return self._mm is None

    def ndarray(self, dtype: DTypeLike, shape: int | tuple[int, ...], offset: int = 0) -> np.ndarray:
        """A writable view of `shape` elements of `dtype` at `offset`; it keeps the mapping alive."""
        if self._mm is None:
            raise ValueError(f"segment {self.name} is closed")
        dt = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        count = math.prod(shape)
        if offset < 0 or offset + count * dt.itemsize > self.size:
            raise ValueError(
                f"view of {count} x {dt} at offset {offset} exceeds segment {self.name} ({self.size} bytes)"
            )
        if offset % dt.alignment:
            raise ValueError(f"offset {offset} is not aligned for {dt} (alignment {dt.alignment})")
        view = np.frombuffer(self._mm, dtype=dt, count=count, offset=offset).reshape(shape)
        self._views = [ref for ref in self._views if ref() is not None]
        self._views.append(weakref.ref(view))
        return view

    def live_views(self) -> int:
        """How many views made by `ndarray()` are still referenced somewhere (diagnostics)."""
        return sum(ref() is not None for ref in self._views)

    def close(self) -> None:
        """Give up this object's claim on the mapping; never raises, never invalidates a live view.

        The mapping is unmapped as soon as nothing references it: now if no view is alive, otherwise
        when the last view is garbage collected.
        """
        if self._mm is None:
            return
        live = self.live_views()
        if live:
            log.debug("segment %s closed with %d live views; unmapped when the last one dies", self.name, live)
        self._mm = None
        self._views.clear()

    def unlink(self) -> None:
        """Remove the name; mappings (ours and other processes') stay valid. Idempotent."""
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, size={self.size}, closed={self.closed})"


def generation_name(base: str, generation: int) -> str:
    """Name of generation `generation` (>= 1) of the structure whose segments are named `base`."""
    if generation < 1:
        raise ValueError(f"generations start at 1, not {generation}")
    return f"{base}.g{generation}"


def publish_generation(counter: np.ndarray, base: str, generation: int) -> None:
    """Make `generation` current and unlink the previous one.

    Call after the new segment is completely written, with the structure's lock held (writers must be
    serialised; readers take no lock). `counter` is a 0-d int64 view in shared memory; an aligned
    8-byte store is seen whole by readers. Readers see the data before the counter because x86-64
    makes stores visible in program order; Python has no fence for weakly ordered CPUs (ARM), where a
    reader attaching within microseconds of the publish could in theory see stale bytes.
    """
    previous = int(counter)
    if generation <= previous:
        raise ValueError(f"generation must increase: {generation} <= current {previous}")
    counter[...] = generation
    if previous:
        try:
            posix_ipc.unlink_shared_memory(generation_name(base, previous))
        except posix_ipc.ExistentialError:
            pass


def unlink_stale_generations(base: str, published: int, building: int | None = None) -> list[str]:
    """Unlink every generation of `base` other than `published` (and `building`, the next one, which this
    process is writing in the background); returns the names removed.

    Call with the structure's lock held: generations are created only under it, so one above the
    published counter is a dead writer's unpublished work, and one below it a dead writer's leftover
    after publishing. Readers still mapping an old one keep their mapping (and re-read the counter when
    an attach finds the name gone). Lists /dev/shm, where Linux keeps POSIX shared memory.
    """
    stem = f"{base.lstrip('/')}.g"
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        suffix = entry.removeprefix(stem)
        if suffix != entry and suffix.isdigit() and int(suffix) not in (published, building):
            try:
                posix_ipc.unlink_shared_memory("/" + entry)
                removed.append("/" + entry)
            except posix_ipc.ExistentialError:
                pass
    return sorted(removed)


class GenerationReader:
    """Keeps the current generation of `base` attached; call `current()` before each query."""

    ATTACH_RETRY_SECONDS = 1.0

    def __init__(self, base: str, counter: np.ndarray) -> None:
        self.base = base
        self._counter = counter
        self._generation = 0
        self._segment: Segment | None = None

    @property
    def generation(self) -> int:
        """The generation currently attached (0: none)."""
        return self._generation

    def current(self) -> Segment | None:
        """The segment of the published generation (None if nothing is published yet).

        When the counter moved, attaches the new generation and closes the old one; views a caller still
        holds into the old one stay valid. If the generation read was already replaced and unlinked
        (two publishes between our read and our attach), re-reads the counter and tries again.
        """
        deadline = time.monotonic() + self.ATTACH_RETRY_SECONDS
        while True:
            generation = int(self._counter)
            if generation == self._generation:
                return self._segment
            try:
                segment = Segment.attach(generation_name(self.base, generation))
            except FileNotFoundError:
                if int(self._counter) == generation and time.monotonic() > deadline:
                    raise
                time.sleep(0.001)
                continue
            if self._segment is not None:
                self._segment.close()
            self._segment, self._generation = segment, generation
            return segment

    def close(self) -> None:
        if self._segment is not None:
            self._segment.close()
        self._segment, self._generation = None, 0


Layout = dict[str, tuple[np.dtype, tuple[int, ...], int]]


def pack(spec: list[tuple[str, np.dtype, tuple[int, ...]]]) -> tuple[Layout, int]:
    """Offsets of consecutive arrays in one segment, each on a 64-byte boundary (a cache line: no array
    shares one with its neighbour), and the total size: {name: (dtype, shape, offset)}, size."""
    out, offset = {}, 0
    for name, dtype, shape in spec:
        offset = (offset + 63) // 64 * 64
        out[name] = (dtype, shape, offset)
        offset += dtype.itemsize * int(np.prod(shape))
    return out, offset

