"""Names of the shared memory segments and POSIX semaphores of one data directory.

Every object of an installation is named `<prefix>.<what>`, where the prefix is derived from the real
path of the data directory. That gives three properties the supervisor relies on:

- two installations on one machine never collide (different data directories, different prefixes);
- the same data directory reached through a symlink or a relative path gets the same prefix;
- after a crash, everything the previous run left behind is found by prefix alone (`unlink_all`),
  without any record of what was created.

Listing works by reading `/dev/shm`, where Linux keeps POSIX shared memory (`/dev/shm/<name>`) and
named semaphores (`/dev/shm/sem.<name>`). On a system without `/dev/shm` the listing is empty.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import posix_ipc

SHM_DIR = Path("/dev/shm")
_SEM_FILE_PREFIX = "sem."


def instance_prefix(data_dir: Path) -> str:
    """`/nd` + 10 hex chars of sha256(realpath(data_dir)): short, fixed-length, per installation.

    The fixed length matters: no prefix is a proper prefix of another, so matching names by prefix
    never reaches into a different installation.
    """
    digest = hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()
    return "/nd" + digest[:10]


def object_name(prefix: str, *parts: object) -> str:
    """`prefix.part1.part2`: the one way names are built, so that listing by prefix finds them all."""
    _check_prefix(prefix)
    name = ".".join([prefix, *(str(p) for p in parts)])
    if "/" in name[1:] or "\0" in name:
        raise ValueError(f"invalid shared object name {name!r}: no '/' or NUL after the leading '/'")
    return name


def segment_path(name: str) -> Path:
    """Where Linux shows the segment `name`."""
    return SHM_DIR / name.lstrip("/")


def semaphore_path(name: str) -> Path:
    """Where Linux shows the named semaphore `name`."""
    return SHM_DIR / (_SEM_FILE_PREFIX + name.lstrip("/"))


def list_objects(prefix: str) -> list[str]:
    """Entries of /dev/shm (segments and `sem.*` semaphores) whose name starts with `prefix`, sorted.

    The result is the entry names as `ls /dev/shm` shows them (`nd0123456789.control`,
    `sem.nd0123456789.lock.0`), so a segment and a semaphore can never be confused in a log line.
    """
    _check_prefix(prefix)
    bare = prefix[1:]
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(e for e in entries if e.startswith(bare) or e.startswith(_SEM_FILE_PREFIX + bare))


def unlink_all(prefix: str) -> list[str]:
    """Unlink every segment and semaphore of `prefix` (stale cleanup); returns the entries removed.

    Processes that still have an object open keep using it (unlink only removes the name), which is
    why the supervisor must first make sure no process of the old run is alive. An object of another
    user under our prefix raises `posix_ipc.PermissionsError`: refusing to start is right then.
    """
    removed = []
    for entry in list_objects(prefix):
        try:
            if entry.startswith(_SEM_FILE_PREFIX):
                posix_ipc.unlink_semaphore("/" + entry[len(_SEM_FILE_PREFIX):])
            else:
                posix_ipc.unlink_shared_memory("/" + entry)
        except posix_ipc.ExistentialError:
            continue  # someone else removed it between listing and unlinking
        removed.append(entry)
    return removed


def unlink_semaphore(name: str) -> None:
    """Remove the named semaphore `name` if it exists: unlinking is idempotent, so a cleanup may run twice
    or after another process's. Processes that have it open keep using it (unlink only removes the name)."""
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        pass


def make_owner_only(path: Path) -> None:
    """chmod 0600 `path` if it exists: creation modes are filtered by the umask, which could also
    remove the owner's own bits; this makes the result exact."""
    try:
        os.chmod(path, 0o600)
    except FileNotFoundError:
        pass


def check_owner_only(st: os.stat_result, what: str) -> None:
    """Refuse to use an object another user created or can access: someone could pre-create one of
    our (predictable) names to read or corrupt our state."""
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(
            f"{what} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}; "
            f"expected uid {os.geteuid()} and mode 600: refusing to use it"
        )


def check_semaphore_owner(name: str) -> None:
    """`check_owner_only` for a named semaphore (Linux only; elsewhere there is no file to stat)."""
    try:
        st = os.stat(semaphore_path(name))
    except FileNotFoundError:
        return
    check_owner_only(st, f"semaphore {name}")


def _check_prefix(prefix: str) -> None:
    if not prefix.startswith("/") or len(prefix) < 2 or "/" in prefix[1:]:
        raise ValueError(f"invalid prefix {prefix!r}: must look like '/nd0123456789'")
