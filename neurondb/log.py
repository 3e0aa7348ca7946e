"""One logging setup for every process: the data directory's log file and stderr.

Each line carries time, process name, pid and level, like PostgreSQL's log_line_prefix '%m [%p] %b'.
Forked workers call `setup()` again with their own name so their lines say who wrote them.

`reopen()` is SIGUSR1's work (`neurondb logrotate`): after a rotation tool renamed the file, every process
writes to a new file of the old name, its stderr too when stderr was the log file (the daemon's).

httpx and httpcore log every request (method and full URL) at INFO and DEBUG: a line per job is noise at
any volume, and a URL can carry credentials. Their loggers are held at WARNING in every process.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from neurondb.paths import ensure_private_dir

FORMAT = "%(asctime)s.%(msecs)03d [%(process)d] %(processName)s %(levelname)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
QUIET_LOGGERS = ("httpx", "httpcore")


def setup(process_name: str, log_file: Path | None = None, level: int = logging.INFO,
          stderr: bool = True) -> logging.Logger:
    """(Re)configure the root logger for this process; safe to call again after fork."""
    import multiprocessing

    multiprocessing.current_process().name = process_name
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(FORMAT, DATEFMT)
    if log_file is not None:
        _create_private(log_file)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    if stderr:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        root.addHandler(stream)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    return logging.getLogger("neurondb")


def _create_private(log_file: Path) -> None:
    """Create the log file readable by its owner only (logging would create it world-readable)."""
    ensure_private_dir(log_file.parent)
    os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))


def reopen() -> None:
    """Reopen this process's log file by name; stderr (fd 2) too when it was the same open file."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            continue
        path = Path(handler.baseFilename)
        _create_private(path)
        old = handler.setStream(open(path, "a", encoding="utf-8"))   # noqa: SIM115 - the handler owns it
        if old is None:
            continue
        old_stat, err_stat = os.fstat(old.fileno()), os.fstat(2)
        if (old_stat.st_dev, old_stat.st_ino) == (err_stat.st_dev, err_stat.st_ino):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.dup2(fd, 2)
            os.close(fd)
        old.close()
