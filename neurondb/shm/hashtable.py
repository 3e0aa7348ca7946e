"""The probe of the fixed-size tables in shared memory that processes extend while others read them
(the tenant table, the rate-limit buckets): open addressing, linear probing from a hash of the key.

A row is in use once its `ready` word is set, after its key is completely written, so lock-free readers
never see a half-written key; a row whose `ready` is 0 is free (never used, or left by an inserter that
died) and ends a probe path. Inserting (claiming the free row found) is the caller's, under its lock.
"""

from __future__ import annotations

import hashlib

import numpy as np


def probe(ready: np.ndarray, keys: np.ndarray, key: bytes) -> tuple[int | None, int | None]:
    """(row holding `key`, None), or (None, the first free row on its path), or (None, None): table full."""
    n = len(ready)
    start = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % n
    for k in range(n):
        row = (start + k) % n
        if not ready[row]:
            return None, row
        if keys[row] == key:
            return row, None
    return None, None
