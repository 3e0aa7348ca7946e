"""Snapshots of an index graph on disk, so a restart loads instead of rebuilding.

A file is `NDBSNAP1`, an 8-byte header length, a JSON header (index parameters, the snapshot number that
tells which changes it contains, the byte length and SHA-256 of the body), then the body: the graph's
buffer exactly as laid out in shared memory. Written to a temporary file, fsynced and renamed, so a crash
leaves the previous snapshot or the new one, never half of one. Any mismatch (truncation, checksum,
parameters) is a SnapshotError: the caller rebuilds from PostgreSQL instead.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

from neurondb.index import hnsw

MAGIC = b"NDBSNAP1"
CHUNK = 1 << 22


class SnapshotError(Exception):
    """Missing, unreadable or corrupt snapshot."""


def save(path: Path, arrays: hnsw.HnswArrays, meta: dict[str, Any]) -> int:
    """Write `arrays` (a private copy; the writer keeps going meanwhile) with `meta`; returns bytes written."""
    body = np.frombuffer(arrays.buffer, dtype=np.uint8)[: arrays.nbytes]
    digest = hashlib.sha256(body).hexdigest()
    header = orjson.dumps({**meta, "nbytes": int(body.size), "sha256": digest})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            f.write(memoryview(body))
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return len(MAGIC) + 8 + len(header) + int(body.size)


def _read_header(f: BinaryIO, path: Path) -> dict[str, Any]:
    if f.read(len(MAGIC)) != MAGIC:
        raise SnapshotError(f"{path}: not a neurondb snapshot")
    (length,) = struct.unpack("<Q", f.read(8))
    if length > 1 << 20:
        raise SnapshotError(f"{path}: header length {length} is implausible")
    return orjson.loads(f.read(length))


def read_meta(path: Path) -> dict[str, Any]:
    """Only the header of the snapshot at `path` (its number, creation time), without reading the body."""
    try:
        with open(path, "rb") as f:
            return _read_header(f, path)
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no snapshot") from None
    except (OSError, ValueError, struct.error, orjson.JSONDecodeError) as exc:
        raise SnapshotError(f"{path}: unreadable: {exc}") from exc


def load(path: Path) -> tuple[hnsw.HnswArrays, dict[str, Any]]:
    """The graph (in private memory) and the header of the snapshot at `path`."""
    try:
        with open(path, "rb") as f:
            meta = _read_header(f, path)
            nbytes = int(meta["nbytes"])
            body = np.empty(nbytes, dtype=np.uint8)
            view = memoryview(body)
            got = 0
            while got < nbytes:
                n = f.readinto(view[got: got + CHUNK])
                if not n:
                    raise SnapshotError(f"{path}: truncated ({got} of {nbytes} bytes)")
                got += n
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no snapshot") from None
    except (OSError, ValueError, KeyError, struct.error, orjson.JSONDecodeError) as exc:
        raise SnapshotError(f"{path}: unreadable: {exc}") from exc
    if hashlib.sha256(body).hexdigest() != meta.get("sha256"):
        raise SnapshotError(f"{path}: checksum mismatch (corrupt)")
    try:
        arrays = hnsw.HnswArrays.from_buffer(body)
    except ValueError as exc:
        raise SnapshotError(f"{path}: {exc}") from exc
    return arrays, meta
