"""Labelled counters and histograms in shared memory, for the metrics endpoint.

Every worker counts what it does (jobs by type and outcome, LLM calls by status code, maintenance runs) in
rows of one fixed-size table; neuranmon's collector reads them at each scrape. Counters live here, not in
the process that serves /metrics, so neither a crash of a worker nor a restart of neuranmon loses them.

One row per (writer, family, label values). The writer is the worker's name (stable across restarts), so a
row has exactly one writing process at a time and its updates need no lock: a reader sees each 8-byte word
whole. Only adding a row takes the table's lock, once per series and process; a row becomes visible to
lock-free lookups when its `ready` word is set, after its key is written (as in the control block's
tables). Layout, struct of arrays: header i8[8] (0: updates dropped because the table was full, 1: tenant
label values taken), keys S256[CAPACITY], ready i8[CAPACITY], value f8[CAPACITY] (counters), sums
f8[CAPACITY] and buckets i8[CAPACITY, N_BUCKETS] (histograms; bucket i counts observations <= BUCKETS[i],
the last one those above every bound).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from neurondb.shm.control import SharedState
from neurondb.shm.names import object_name
from neurondb.shm.segment import Layout, Segment, pack

CAPACITY = 4096
KEY_BYTES = 256
LABEL_BYTES = 48            # a label value is cut to this many bytes (5 parts fit in KEY_BYTES)
SEP = "\x1f"
LOCK = "series"
_TENANT = "~tenant"         # rows that only reserve a tenant label value (see `tenant_label`)
# Upper bounds in seconds of the histogram buckets, one set for every latency: from a 0.5 ms search to a
# minute-long LLM call. N_BUCKETS adds the +Inf bucket.
BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                              5.0, 10.0, 30.0, 60.0)
N_BUCKETS = len(BUCKETS) + 1
H_DROPPED, H_TENANTS = 0, 1


def _layout() -> tuple[Layout, int]:
    spec = [("header", np.dtype("<i8"), (8,)), ("keys", np.dtype(f"S{KEY_BYTES}"), (CAPACITY,)),
            ("ready", np.dtype("<i8"), (CAPACITY,)), ("value", np.dtype("<f8"), (CAPACITY,)),
            ("sums", np.dtype("<f8"), (CAPACITY,)), ("buckets", np.dtype("<i8"), (CAPACITY, N_BUCKETS))]
    return pack(spec)


@dataclass(frozen=True)
class Row:
    """One series as read: its family, label values, and value (a counter) or buckets and sum."""

    writer: str
    family: str
    labels: tuple[str, ...]
    value: float
    total: float
    buckets: tuple[int, ...]


class SeriesTable:
    def __init__(self, shared: SharedState, segment: Segment) -> None:
        self.segment = segment
        spec, _ = _layout()
        v = {name: segment.ndarray(dt, shape, off) for name, (dt, shape, off) in spec.items()}
        self.header, self.keys, self.ready = v["header"], v["keys"], v["ready"]
        self.value, self.sums, self.buckets = v["value"], v["sums"], v["buckets"]
        self.lock = shared.lock(LOCK)
        self._rows: dict[bytes, int] = {}           # this process's lookups: key -> row (-1: table full)
        self._tenants: dict[str, str] = {}

    @staticmethod
    def name(shared: SharedState) -> str:
        return object_name(shared.prefix, "series")

    @classmethod
    def create(cls, shared: SharedState) -> SeriesTable:
        return cls(shared, Segment.create(cls.name(shared), _layout()[1]))

    @classmethod
    def attach(cls, shared: SharedState) -> SeriesTable:
        return cls(shared, Segment.attach(cls.name(shared)))

    def close(self) -> None:
        self.segment.close()

    # -- writers --------------------------------------------------------------------------------------

    def row(self, writer: str, family: str, labels: tuple[str, ...] = ()) -> int:
        """The row of a series, added on first use by any process; -1 when the table is full (its updates
        are then counted as dropped). Only `writer` may update the row."""
        key = _key((writer, family, *labels))
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = self._find_or_add(key)
        return row

    def inc(self, row: int, by: float = 1.0) -> None:
        if row < 0:
            self.header[H_DROPPED] += 1
        else:
            self.value[row] += by

    def set(self, row: int, value: float) -> None:
        """A gauge's value (the row's one writer sets it; readers see the last store)."""
        if row < 0:
            self.header[H_DROPPED] += 1
        else:
            self.value[row] = value

    def observe(self, row: int, seconds: float) -> None:
        if row < 0:
            self.header[H_DROPPED] += 1
            return
        self.buckets[row, bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sums[row] += seconds

    def tenant_label(self, tenant: str | None, cap: int, other: str) -> str:
        """`tenant` itself while fewer than `cap` tenant values are in use installation-wide, else `other`:
        the label's cardinality stays bounded however many tenants there are."""
        tenant = tenant or ""
        label = self._tenants.get(tenant)
        if label is None:
            key = _key((_TENANT, tenant))
            if self._find(key) is None:
                with self.lock:
                    if self._find(key) is None and int(self.header[H_TENANTS]) < cap and self._add(key) >= 0:
                        self.header[H_TENANTS] += 1
            label = self._tenants[tenant] = tenant if self._find(key) is not None else other
        return label

    # -- the reader -----------------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        return int(self.header[H_DROPPED])

    def labelled_tenants(self) -> set[str]:
        """The tenants that have a label value of their own (see `tenant_label`), without a lock."""
        prefix = (_TENANT + SEP).encode()
        return {bytes(k)[len(prefix):].decode(errors="replace") for k in self.keys[self.ready == 1]
                if bytes(k).startswith(prefix)}

    def rows(self) -> Iterator[Row]:
        """Every series (not the tenant reservations), as of now, without a lock."""
        for i in np.flatnonzero(self.ready == 1):
            parts = self.keys[i].decode(errors="replace").split(SEP)
            if parts[0] == _TENANT:
                continue
            yield Row(parts[0], parts[1], tuple(parts[2:]), float(self.value[i]), float(self.sums[i]),
                      tuple(int(b) for b in self.buckets[i]))

    # -- the table ------------------------------------------------------------------------------------

    def _find(self, key: bytes) -> int | None:
        rows = np.flatnonzero((self.ready == 1) & (self.keys == key))
        return int(rows[0]) if len(rows) else None

    def _find_or_add(self, key: bytes) -> int:
        row = self._find(key)
        if row is None:
            with self.lock:
                row = self._find(key)
                if row is None:
                    row = self._add(key)
        return row

    def _add(self, key: bytes) -> int:
        """Caller holds the lock. A row is claimed by writing its key and zeroing it, then made visible."""
        free = np.flatnonzero(self.ready == 0)
        if not len(free):
            return -1
        row = int(free[0])
        self.keys[row] = key
        self.value[row] = self.sums[row] = 0
        self.buckets[row] = 0
        self.ready[row] = 1
        return row


def _key(parts: tuple[str, ...]) -> bytes:
    """The parts joined by SEP, each cut to LABEL_BYTES (at a character boundary) and stripped of SEP and
    NUL, the whole cut to KEY_BYTES."""
    cut = [p.replace(SEP, " ").replace("\0", " ").encode()[:LABEL_BYTES].decode(errors="ignore") for p in parts]
    return SEP.join(cut).encode()[:KEY_BYTES]
