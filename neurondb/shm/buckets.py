"""Token buckets and 429 back-off shared by every process of an installation: the rate limits of the LLM
providers and of the queue's tenants.

A rate limit (a provider's requests per second or tokens per minute, a tenant's jobs per second) holds
for the whole machine, whatever number of processes serve it, so its state lives in shared memory: one
small segment of its own, `<prefix>.buckets` (the control block's layout is not touched), created by
whichever process needs it first and unlinked with the control block (`SharedState.unlink`) and with
everything else of the installation when the supervisor exits.

The segment is a table of ENTRY rows found by key (`hashtable.probe`), every row guarded by one
RobustLock ("buckets"), so a process SIGKILLed while holding it blocks nobody. All-zero memory is an
empty table: there is nothing to initialise, and the creator and the first attacher cannot race.

Keys are free-form; the LLM worker uses `rps:<provider>`, `tpm:<provider>` and the same with
`:<tenant>` for a tenant's share, the queue `jobs:<tenant>` (`SharedState.tenant_take_token`). Callers
pass the rate and capacity with every call, so a reload that changes a limit applies at the next call;
stored state is only (tokens, when).

Back-off after a 429 ("AIMD"): each provider row also carries a factor in (0, 1] that a 429 halves
(several 429s within HOLD_S count once: they are one burst's answers) and that then grows back linearly
by RECOVER_PER_S, so the full rate returns about 10 s after one halving. Callers multiply their rate
limits and their concurrency by it. A Retry-After on the 429 also pauses the provider until then.

Times are CLOCK_MONOTONIC, which is system-wide on Linux, so every process reads the same clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from neurondb.shm.hashtable import probe
from neurondb.shm.names import object_name
from neurondb.shm.segment import Segment

if TYPE_CHECKING:  # the control block holds the lock table; it opens this table, not the other way round
    from neurondb.shm.control import SharedState

N_ENTRIES = 512
KEY_BYTES = 128
LOCK_NAME = "buckets"
HOLD_S = 1.0           # 429s closer together than this halve the factor once
RECOVER_PER_S = 0.05   # factor regained per second after a halving
MIN_FACTOR = 1 / 64
IDLE_REUSE_S = 3600.0  # a row unused this long may be taken over by a new key when the table is full
ATTACH_RETRY_S = 1.0

ENTRY = np.dtype([
    ("key", f"S{KEY_BYTES}"),
    ("ready", "<i8"),
    ("tokens", "<f8"),
    ("last_refill", "<f8"),      # CLOCK_MONOTONIC of the last refill; 0 = bucket not started (full)
    ("last_used", "<f8"),
    ("factor", "<f8"),           # AIMD factor after the last halving; 0 = never halved (1)
    ("factor_at", "<f8"),        # when it was halved
    ("paused_until", "<f8"),     # Retry-After of the last 429
    ("taken", "<i8"),            # diagnostics: successful takes, refusals, 429s seen
    ("refused", "<i8"),
    ("throttled", "<i8"),
], align=True)


def segment_name(prefix: str) -> str:
    return object_name(prefix, "buckets")


class Claim(NamedTuple):
    """`cost` tokens from bucket `key`, which refills at `rate` tokens/s up to `capacity`."""

    key: str
    cost: float
    rate: float
    capacity: float


class Buckets:
    """The bucket table mapped into this process; `open(shared)` attaches or creates it."""

    def __init__(self, shared: SharedState, segment: Segment) -> None:
        self.shared = shared
        self.segment = segment
        self.rows = segment.ndarray(ENTRY, N_ENTRIES)
        self._index: dict[bytes, int] = {}

    @classmethod
    def open(cls, shared: SharedState) -> Buckets:
        """Attach the installation's table, creating it if no process has yet."""
        name = segment_name(shared.prefix)
        size = ENTRY.itemsize * N_ENTRIES
        deadline = time.monotonic() + ATTACH_RETRY_S
        while True:
            try:
                segment = Segment.attach(name)
            except FileNotFoundError:
                try:
                    segment = Segment.create(name, size)
                except FileExistsError:
                    # Another process is creating it (or it exists but is still empty): attach again.
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.001)
                    continue
            if segment.size != size:
                segment.close()
                raise RuntimeError(f"shared memory {name} has {segment.size} bytes, this code expects {size}: "
                                   "restart the service with one version")
            return cls(shared, segment)

    def close(self) -> None:
        self.segment.close()

    # -- rows -----------------------------------------------------------------------------------------

    def _find(self, key: bytes) -> int | None:
        """Row of `key` without the lock (rows are published by `ready` after their key is written)."""
        row = self._index.get(key)
        if row is not None and self.rows["ready"][row] and self.rows["key"][row] == key:
            return row
        row, _ = probe(self.rows["ready"], self.rows["key"], key)
        if row is not None:
            self._index[key] = row
        return row

    def _row(self, key: str, now: float) -> int:
        """Row of `key`, inserted if new. Call with the lock held."""
        raw = key.encode()[:KEY_BYTES]
        row = self._find(raw)
        if row is not None:
            return row
        _, row = probe(self.rows["ready"], self.rows["key"], raw)
        ready = self.rows["ready"]
        if row is None:
            # Full: take over the row idle longest (its bucket is full again by now anyway). A lookup of
            # the evicted key then misses and starts it afresh.
            row = int(np.argmin(self.rows["last_used"]))
            if now - float(self.rows["last_used"][row]) < IDLE_REUSE_S:
                raise RuntimeError(f"all {N_ENTRIES} rate-limit buckets are in use")
            ready[row] = 0
        self.rows[row] = np.zeros((), ENTRY)
        self.rows["key"][row] = raw
        self.rows["last_used"][row] = now
        ready[row] = 1
        self._index[raw] = row
        return row

    def _refilled(self, row: int, rate: float, capacity: float, now: float) -> float:
        last = float(self.rows["last_refill"][row])
        if last == 0:
            return capacity
        return min(capacity, float(self.rows["tokens"][row]) + max(0.0, now - last) * rate)

    # -- token buckets --------------------------------------------------------------------------------

    def _wait(self, rows: list[int], claims: Sequence[Claim], t: float) -> tuple[list[float], float]:
        """Refilled levels of `rows` and the seconds until every claim could be met (0: now)."""
        levels = [self._refilled(r, c.rate, c.capacity, t) for r, c in zip(rows, claims, strict=True)]
        wait = 0.0
        for level, c in zip(levels, claims, strict=True):
            need = min(c.cost, c.capacity)
            if level < need:
                wait = max(wait, (need - level) / c.rate if c.rate > 0 else math.inf)
        return levels, wait

    def take(self, claims: Sequence[Claim], now: float | None = None) -> float:
        """Take every claim's tokens, or none: 0.0 when taken, else the seconds until they all would be.

        A cost above a bucket's capacity is allowed from a full bucket (the bucket goes negative and the
        debt delays what follows), so one big request is slowed, never refused forever.
        """
        if not claims:
            return 0.0
        t = time.monotonic() if now is None else now
        lock = self.shared.lock(LOCK_NAME)
        with lock:
            if lock.dirty:
                lock.mark_clean()   # a holder died mid-update: at worst one bucket's count is off by a take
            rows = [self._row(c.key, t) for c in claims]
            levels, wait = self._wait(rows, claims, t)
            with lock.writing():
                for row, level, c in zip(rows, levels, claims, strict=True):
                    self.rows["tokens"][row] = level - (c.cost if wait == 0 else 0.0)
                    self.rows["last_refill"][row] = t
                    self.rows["last_used"][row] = t
                    self.rows["taken" if wait == 0 else "refused"][row] += 1
        return wait

    def level(self, key: str, rate: float, capacity: float, now: float | None = None) -> float:
        """Tokens in bucket `key` now (full when it was never taken from); lock-free, so only a hint."""
        row = self._find(key.encode()[:KEY_BYTES])
        if row is None:
            return capacity
        return self._refilled(row, rate, capacity, time.monotonic() if now is None else now)

    def peek(self, claims: Sequence[Claim], now: float | None = None) -> float:
        """Seconds until `claims` could be taken (0: now), taking nothing; lock-free, so only a hint."""
        t = time.monotonic() if now is None else now
        rows = [self._find(c.key.encode()[:KEY_BYTES]) for c in claims]
        known = [(r, c) for r, c in zip(rows, claims, strict=True) if r is not None]
        if not known:
            return 0.0
        return self._wait([r for r, _ in known], [c for _, c in known], t)[1]

    def adjust(self, key: str, delta: float, rate: float, capacity: float, now: float | None = None) -> None:
        """Take `delta` more tokens from `key` (negative: give some back), e.g. a request's real token
        count once the answer says it, against the estimate taken before it was sent."""
        t = time.monotonic() if now is None else now
        lock = self.shared.lock(LOCK_NAME)
        with lock, lock.writing():
            row = self._row(key, t)
            self.rows["tokens"][row] = min(capacity, self._refilled(row, rate, capacity, t) - delta)
            self.rows["last_refill"][row] = t

    # -- 429 back-off ---------------------------------------------------------------------------------

    def factor(self, provider: str, now: float | None = None) -> float:
        """The provider's AIMD factor now, in (0, 1]; lock-free (two aligned words, read apart: a reader
        racing a halving sees the old or the new factor for one call)."""
        row = self._find(f"p:{provider}".encode())
        if row is None:
            return 1.0
        base = float(self.rows["factor"][row])
        if base == 0:
            return 1.0
        t = time.monotonic() if now is None else now
        return min(1.0, base + RECOVER_PER_S * max(0.0, t - float(self.rows["factor_at"][row])))

    def paused(self, provider: str, now: float | None = None) -> float:
        """Seconds the provider asked us to stay away (its last Retry-After), 0 when none."""
        row = self._find(f"p:{provider}".encode())
        if row is None:
            return 0.0
        t = time.monotonic() if now is None else now
        return max(0.0, float(self.rows["paused_until"][row]) - t)

    def throttle(self, provider: str, retry_after: float | None = None, now: float | None = None) -> float:
        """A 429 from `provider`: halve its factor (once per HOLD_S) and pause it for `retry_after` seconds.
        Returns the factor now in force."""
        t = time.monotonic() if now is None else now
        lock = self.shared.lock(LOCK_NAME)
        with lock, lock.writing():
            row = self._row(f"p:{provider}", t)
            current = self.factor(provider, t)
            self.rows["throttled"][row] += 1
            self.rows["last_used"][row] = t
            if retry_after:
                self.rows["paused_until"][row] = max(float(self.rows["paused_until"][row]), t + retry_after)
            if float(self.rows["factor"][row]) == 0 or t - float(self.rows["factor_at"][row]) >= HOLD_S:
                current = max(MIN_FACTOR, current / 2)
                self.rows["factor"][row] = current
                self.rows["factor_at"][row] = t
            return current

    def snapshot(self) -> list[dict[str, object]]:
        """Every row as plain values, for diagnostics and tests."""
        out = []
        for row in np.flatnonzero(self.rows["ready"] == 1):
            r = self.rows[row].copy()
            out.append({"key": r["key"].decode(errors="replace"), "tokens": float(r["tokens"]),
                        "taken": int(r["taken"]), "refused": int(r["refused"]), "throttled": int(r["throttled"]),
                        "factor": float(r["factor"]) or 1.0})
        return out


RPS_BURST_S = 0.1            # a requests/s bucket holds this many seconds of requests
TPM_BURST_S = 10.0           # a tokens/min bucket holds this many seconds of tokens


def provider_claims(provider: str, scope: str, share: float, rps: float, tpm: float, tokens: int) -> list[Claim]:
    """The bucket claims of one call: a request, and its estimated tokens, at `share` of the limits."""
    claims = []
    if rps > 0:
        claims.append(Claim(f"rps:{provider}{scope}", 1.0, rps * share, max(1.0, rps * share * RPS_BURST_S)))
    if tpm > 0:
        claims.append(Claim(f"tpm:{provider}{scope}", float(tokens), tpm * share,
                            max(1.0, tpm * share * TPM_BURST_S)))
    return claims
