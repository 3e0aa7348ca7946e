"""One logging setup for every process: the data directory's log file and stderr.

Each line carries time, process name, pid and level, like PostgreSQL's log_line_prefix '%m [%p] %b'.
Forked workers call `setup()` again with their own name so their lines say who wrote them.

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
        ensure_private_dir(log_file.parent)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
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
