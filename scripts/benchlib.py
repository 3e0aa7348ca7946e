"""The harness the benchmark scripts share: errors, signals, progress, statistics, and a scratch installation.

Each `scripts/bench_*.py` drives the real CLI in a throw-away data directory and must leave nothing behind
(processes, shared memory, directories), also on Ctrl-C, SIGTERM or an error. That plumbing was copied
from script to script and the copies had started to drift; it lives here once. The scripts are run as
`.venv/bin/python scripts/X.py`, so this directory is on `sys.path` and `import benchlib` works; nothing in
the `neurondb` package imports it (it is no part of the service).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Protocol, TypeVar

import numpy as np
import psycopg

import neurondb
from neurondb.client import Client
from neurondb.paths import DataDir, write_private_file
from neurondb.shm import names
from neurondb.status import Status, pid_alive, read_status
from neurondb.supervisor import read_pid

# The repository, for the polling loop the tests use as well (scripts may import tests/, never the reverse).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.service import wait_for as poll

T = TypeVar("T")


class BenchError(RuntimeError):
    """The service did not do what the benchmark needs; the message says what and shows a log tail."""


class Interrupted(BaseException):
    """SIGTERM, turned into an exception so that cleanup runs as it does for Ctrl-C (a BaseException, so
    that an `except Exception` on the way does not swallow it)."""


def raise_interrupted(signum: int, frame: object) -> None:
    """SIGTERM handler: unwind the stack like KeyboardInterrupt does, so `finally` blocks clean up."""
    raise Interrupted()


def install_sigterm_handler() -> None:
    """Make SIGTERM raise `Interrupted`: a benchmark killed by a timeout or a CI runner still cleans up."""
    signal.signal(signal.SIGTERM, raise_interrupted)


def log(message: str) -> None:
    """Progress goes to stderr, so that `--json` output on stdout stays parseable."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float | None:
    """The median, or None when nothing was measured (a failed run still prints its figures so far)."""
    return statistics.median(values) if values else None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank: a value that was actually observed, not an interpolation between two samples."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def p95(sorted_samples: list[float]) -> float:
    """Nearest-rank 95th percentile of already sorted, non-empty samples (with n=20, the 19th smallest)."""
    return sorted_samples[max(0, math.ceil(0.95 * len(sorted_samples)) - 1)]


def kill_quietly(pid: int, signum: int = signal.SIGKILL) -> None:
    """Signal `pid` if it still exists: during cleanup a process that already exited is not an error."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without NEURONDB_DSN / NEURONDB_DATA: the benchmark's own settings must
    win, never the caller's installation or server."""
    env = {k: v for k, v in os.environ.items() if k not in ("NEURONDB_DSN", "NEURONDB_DATA")}
    return {**env, **(extra or {})}


def spawn_cli(args: list[str], env: Mapping[str, str]) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Start `python -m neurondb ARGS`. Output goes to an unnamed file, not a pipe: a daemon the command
    starts (the supervisor, PostgreSQL) inherits it and keeps it open, so reading a pipe to its end would
    hang. Pass the result to `finish_cli`, which closes the file."""
    out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by finish_cli(), after the command exits
    proc = subprocess.Popen([sys.executable, "-m", "neurondb", *args], stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, env=dict(env))
    return proc, out


def finish_cli(proc: subprocess.Popen[bytes], out: IO[bytes], what: str, check: bool = True,
               timeout: float = 120, context: Callable[[], str] | None = None) -> str:
    """Wait for a command started by `spawn_cli` (killed after `timeout`); its output, or BenchError if it
    failed and `check`, with `context()` (a log tail) appended to the message."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out.seek(0)
    text = out.read().decode(errors="replace")
    out.close()
    if check and proc.returncode != 0:
        message = f"`neurondb {what}` exited {proc.returncode}:\n{text}"
        raise BenchError(f"{message}\n{context()}" if context else message)
    return text


def run_cli(args: list[str], env: Mapping[str, str], check: bool = True, timeout: float = 120) -> str:
    """`neurondb ARGS` to completion (see `spawn_cli` for why the output goes to a file)."""
    proc, out = spawn_cli(args, env)
    return finish_cli(proc, out, " ".join(args), check=check, timeout=timeout)


def scratch_dir(prefix: str) -> Path:
    """A fresh directory directly under /tmp: as root, the embedded PostgreSQL runs as a system user that
    must be able to traverse the parent of its data directory, which a private $TMPDIR may not allow."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def copy_vectors(conn: psycopg.Connection, index: str, vectors: np.ndarray) -> None:
    """One COPY of `vectors` into `index`, doc_id the row number: the fastest way in, as an operator loads."""
    with conn.cursor().copy("COPY neurondb.neurondb_vectors (index_name, doc_id, embedding) FROM STDIN") as copy:
        for i, v in enumerate(vectors):
            copy.write_row((index, str(i), v.tolist()))


class Scratch:
    """A scratch neurondb installation: a temporary directory under /tmp used as the data directory, driven
    through the real CLI (`python -m neurondb ... -D DIR [--dsn DSN]`), so that what a benchmark measures is
    what an operator gets. `cleanup()` leaves nothing behind."""

    def __init__(self, prefix: str, dsn: str | None = None, settings: Mapping[str, str] | None = None,
                 env: Mapping[str, str] | None = None, owner: str = "a benchmark") -> None:
        self.root = scratch_dir(prefix)
        self.datadir = DataDir(self.root)
        self.dsn = dsn
        self.prefix = names.instance_prefix(self.root)
        self.env = clean_env(env)
        self.settings: dict[str, str] = dict(settings or {})
        self.owner = owner

    def command(self, *args: str) -> list[str]:
        """The CLI arguments (after `neurondb`) for this installation and its server."""
        cmd = [*args, "-D", str(self.root)]
        return [*cmd, "--dsn", self.dsn] if self.dsn else cmd

    def popen(self, *args: str) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
        """Start a CLI command without waiting, for timing it while polling the service; see `finish`."""
        return spawn_cli(self.command(*args), self.env)

    def finish(self, proc: subprocess.Popen[bytes], out: IO[bytes], what: str, check: bool = True,
               timeout: float = 120) -> str:
        """Wait for a command started by `popen`; its output, or BenchError with the log tail if it failed."""
        return finish_cli(proc, out, what, check=check, timeout=timeout, context=self.log_tail)

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        """Run `neurondb ARGS -D DIR [--dsn DSN]` to completion; its output (stdout and stderr)."""
        proc, out = self.popen(*args)
        return self.finish(proc, out, " ".join(args), check=check, timeout=timeout)

    def status(self) -> Status:
        """Worker state the way `neurondb status` reads it (shared memory only: no database round trip)."""
        return read_status(self.datadir, with_database=False)

    def wait_for(self, predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.01) -> T:
        """Poll until `predicate()` is truthy; BenchError with the log tail after `timeout` seconds."""
        return poll(predicate, timeout, what, interval, fail=lambda text: BenchError(f"{text}\n{self.log_tail()}"))

    def log_tail(self, lines: int = 25) -> str:
        """The end of the service's log, for error messages: it usually says why."""
        try:
            tail = self.datadir.log_file.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            return "(no log)"
        return f"last lines of {self.datadir.log_file}:\n" + "\n".join(tail)

    def start_connected(self, application: str) -> tuple[Client, psycopg.Connection]:
        """Write neurondb.conf, init and start the installation; a client of it and an autocommit connection
        to its database named `application` (both the caller's to close)."""
        self.write_conf()
        self.cli("init", timeout=300)
        self.cli("start", timeout=300)
        client = neurondb.connect(str(self.root), self.dsn)
        try:
            conn = client.instance.connect(application)
        except BaseException:
            client.close()
            raise
        conn.autocommit = True
        return client, conn

    def write_conf(self, **changes: str) -> None:
        """Set `neurondb.NAME = VALUE` for each change and rewrite neurondb.conf whole and atomically: a
        reload never sees half a file."""
        self.settings.update({f"neurondb.{k}": v for k, v in changes.items()})
        lines = [f"# written by {self.owner}"] + [f"{k} = '{v}'" for k, v in self.settings.items()]
        write_private_file(self.datadir.conf, "\n".join(lines) + "\n")

    def cleanup(self, keep: bool) -> None:
        """Leave nothing: service and embedded server stopped, shared memory unlinked, directory removed
        (`keep`: left in place, stopped). Each step runs whatever happened in the ones before."""
        sup = read_pid(self.datadir.pid_file)
        try:
            self.cli("stop", "-m", "immediate", check=False, timeout=60)
        except Exception as exc:  # keep cleaning whatever happened
            log(f"cleanup: `neurondb stop` failed: {exc}")
        if pid_alive(sup):
            log(f"cleanup: supervisor {sup} still alive after stop; killing it and its workers")
            for w in self.status().workers:
                if w.pid:
                    kill_quietly(w.pid)
            kill_quietly(sup)
        names.unlink_all(self.prefix)
        if not self.dsn and (self.datadir.pgdata / "postmaster.pid").exists():
            try:
                self.cli("db", "stop", check=False, timeout=60)
            except Exception as exc:
                log(f"cleanup: `neurondb db stop` failed: {exc}")
        if keep:
            log(f"kept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def code_version(show_repo_root: bool = False) -> str:
    """Which neurondb code was measured: the imported package's directory (or, with `show_repo_root`, the
    checkout holding it) and, when it is in a git checkout, its commit and whether the package has
    uncommitted changes. Figures from a dirty tree are not a commit's; the service runs this same code (it
    inherits PYTHONPATH), so to measure a commit while the tree is being edited, run against an export."""
    import neurondb

    pkg = Path(neurondb.__file__).resolve().parent
    shown = pkg.parent if show_repo_root else pkg

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=pkg, capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return f"{shown} (not a git checkout)"
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", ".") else ""
    return f"{shown} at {commit}{dirty}"


OUTCOMES = {0: "complete", 1: "FAILED (figures so far)", 130: "INTERRUPTED (figures so far)"}


class Benchmark(Protocol):
    """What `run_bench` drives: a run in `body`, its cleanup, and a report of the figures measured."""

    def body(self) -> None: ...

    def cleanup(self) -> None: ...

    def report(self, code: int) -> dict: ...


def add_run_options(ap: argparse.ArgumentParser) -> None:
    """The options of every benchmark run by `run_bench`: where it runs, whether its directory stays, where
    its figures go."""
    ap.add_argument("--dsn", help="your server (a scratch database) instead of the embedded PostgreSQL")
    ap.add_argument("--keep", action="store_true", help="leave the data directory (stopped) in place")
    ap.add_argument("--json", help="also write the figures to this file")


def run_bench(make: Callable[[], Benchmark], json_path: str | None,
              errors: tuple[type[BaseException], ...] = (BenchError,)) -> int:
    """A benchmark's main: SIGTERM handled first (see `install_sigterm_handler`), then `make()` the benchmark,
    `guarded(body, cleanup, errors)`, and `report(code)` prints the figures (also those of a failed or
    interrupted run) and returns them, written as JSON to `json_path` when given; the exit code."""
    install_sigterm_handler()
    bench = make()
    code = guarded(bench.body, bench.cleanup, errors=errors)
    figures = bench.report(code)
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=1, default=str))
    return code


def guarded(body: Callable[[], None], cleanup: Callable[[], None],
            errors: tuple[type[BaseException], ...] = (BenchError,)) -> int:
    """Run `body`, then `cleanup` whatever happened; the exit code (a key of OUTCOMES): 0, 1 if `body`
    raised one of `errors` (logged), 130 on Ctrl-C or SIGTERM (see `install_sigterm_handler`).

    A failed or interrupted run still returns normally, so the caller prints the figures measured so far.
    Signals are ignored during `cleanup`: a second Ctrl-C must not abandon it halfway and leave a server,
    shared memory or a directory behind."""
    code = 0
    try:
        body()
    except errors as exc:
        log(f"benchmark failed: {exc}")
        code = 1
    except (KeyboardInterrupt, Interrupted):
        log("interrupted; cleaning up")
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            cleanup()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return code


def embedded_dsn(pg_root: Path, env: Mapping[str, str], dsn: str | None = None) -> str:
    """`dsn` when given, else the DSN of an embedded PostgreSQL initialised now under `pg_root`."""
    if dsn is not None:
        return dsn
    from neurondb import db

    log(f"embedded PostgreSQL: neurondb init -D {pg_root}")
    run_cli(["init", "-D", str(pg_root)], env, timeout=180)
    return db.resolve_dsn(DataDir(pg_root))


def remove_embedded(pg_root: Path, env: Mapping[str, str], *dirs: Path) -> None:
    """Stop the embedded PostgreSQL under `pg_root` if it runs, then remove it and `dirs`."""
    if (pg_root / "pgdata" / "postmaster.pid").exists():
        run_cli(["db", "stop", "-D", str(pg_root)], env, check=False, timeout=180)
    for path in (*dirs, pg_root):
        shutil.rmtree(path, ignore_errors=True)


def server_bench_parser(doc: str, concurrency_setting: str) -> argparse.ArgumentParser:
    """The options of the benchmarks that drain jobs against a local server answering after a delay."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per drain (default 2000)")
    parser.add_argument("--concurrency", type=int, default=16, help=f"{concurrency_setting} (default 16)")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="the server's answer delay (default 50)")
    parser.add_argument("--dsn", help="use this PostgreSQL (a scratch database) instead of the embedded one")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return parser
