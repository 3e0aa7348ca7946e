"""The embedded PostgreSQL server, tested against real server processes, signals and users (no mocks).

Each test gets its own data directory directly under /tmp: pytest's own temp base is private to the
user running the tests, so as root the server user could not traverse it (a test below checks that
such a directory is refused with a clear message rather than "fixed" by loosening its parents).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import neurondb
from neurondb.paths import DataDir
from neurondb.pgserver import EmbeddedPostgres, PostgresError, bundled_pg_homes

pytestmark = pytest.mark.timeout(45)

AS_ROOT = os.geteuid() == 0
TEST_USER = "neurondb-test"


def postgres_processes(pgdata: Path) -> list[int]:
    """Pids of live processes working in `pgdata` (every PostgreSQL process chdirs there)."""
    target = os.path.realpath(pgdata)
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.readlink(f"/proc/{entry}/cwd") == target:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def postmaster_pid(datadir: DataDir) -> int:
    return int((datadir.pgdata / "postmaster.pid").read_text().split()[0])


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def wait_until_dead(pid: int) -> None:
    """Until `pid` is gone or a zombie (its parent may never reap it)."""
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.01)


def kill_servers(pgdata: Path) -> None:
    """Last-resort cleanup, whatever state a failed test left the server in."""
    for pid in postgres_processes(pgdata):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def new_root(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture
def datadir() -> Iterator[DataDir]:
    root = new_root("neurondb-pgtest-")
    try:
        yield DataDir(root)
    finally:
        with contextlib.suppress(PostgresError, OSError):
            EmbeddedPostgres(DataDir(root)).stop("immediate", timeout=10)
        kill_servers(root / "pgdata")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def server(datadir: DataDir) -> EmbeddedPostgres:
    return EmbeddedPostgres(datadir)


def test_start_twice_is_a_noop(server: EmbeddedPostgres, datadir: DataDir) -> None:
    dsn = server.start()
    pid = postmaster_pid(datadir)
    assert server.start() == dsn
    assert postmaster_pid(datadir) == pid
    assert server.is_running()
    assert datadir.dsn_file.read_text().strip() == dsn == server.dsn
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("neurondb",)


def test_server_settings_and_password_auth(server: EmbeddedPostgres, datadir: DataDir) -> None:
    dsn = server.start()
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    assert info["host"] == "127.0.0.1"
    with psycopg.connect(dsn) as conn:
        settings = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('listen_addresses', 'fsync',"
            " 'unix_socket_permissions', 'unix_socket_directories', 'max_connections', 'shared_buffers')"
        ).fetchall())
    assert settings["listen_addresses"] == "127.0.0.1"
    assert settings["fsync"] == "on"
    assert settings["unix_socket_permissions"] == "0700"
    assert settings["unix_socket_directories"] == str(server.socket_dir)
    assert settings["max_connections"] == "100"
    assert settings["shared_buffers"] == "16384"  # 8kB pages: 128MB
    with psycopg.connect(psycopg.conninfo.make_conninfo(dsn, host=str(server.socket_dir))) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    for host in ("127.0.0.1", str(server.socket_dir)):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(psycopg.conninfo.make_conninfo(dsn, host=host, password="wrong"))
    hba = (datadir.pgdata / "pg_hba.conf").read_text()
    assert "trust" not in [line.split()[-1] for line in hba.splitlines() if line and line[0] != "#"]


@pytest.mark.parametrize("mode", ["smart", "fast", "immediate"])
def test_stop_leaves_no_process(server: EmbeddedPostgres, datadir: DataDir, mode: str) -> None:
    dsn = server.start()
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1")
    assert postgres_processes(datadir.pgdata)
    server.stop(mode)
    assert postgres_processes(datadir.pgdata) == []
    assert not server.is_running()
    server.stop(mode)  # nothing running: a no-op


def test_stop_rejects_unknown_mode(server: EmbeddedPostgres) -> None:
    with pytest.raises(ValueError, match="smart, fast, immediate"):
        server.stop("gentle")


def test_data_survives_restart(server: EmbeddedPostgres) -> None:
    dsn = server.start()
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO kept VALUES (1, 'survives')")
    server.stop()
    assert server.start() == dsn
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT note FROM kept WHERE id = 1").fetchone() == ("survives",)


def test_port_is_remembered_and_moves_when_taken(server: EmbeddedPostgres, datadir: DataDir) -> None:
    port = psycopg.conninfo.conninfo_to_dict(server.start())["port"]
    server.stop()
    assert psycopg.conninfo.conninfo_to_dict(server.start())["port"] == port
    server.stop()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(port)))
        squatter.listen()
        dsn = server.start()
    assert psycopg.conninfo.conninfo_to_dict(dsn)["port"] != port
    assert datadir.dsn_file.read_text().strip() == dsn
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1")


def test_recovery_from_killed_postmaster(server: EmbeddedPostgres, datadir: DataDir) -> None:
    dsn = server.start()
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE crash (id int)")
        conn.execute("INSERT INTO crash VALUES (42)")
    old = postmaster_pid(datadir)
    os.kill(old, signal.SIGKILL)
    wait_until_dead(old)  # SIGKILL is asynchronous: a crash is over once the postmaster is gone
    assert (datadir.pgdata / "postmaster.pid").exists()
    assert server.start() == dsn
    assert postmaster_pid(datadir) != old
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT id FROM crash").fetchone() == (42,)


def test_concurrent_init_and_start(datadir: DataDir) -> None:
    """Two processes start a fresh data directory at once: one creates and starts, the other waits."""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from neurondb.paths import DataDir
        from neurondb.pgserver import EmbeddedPostgres
        print(EmbeddedPostgres(DataDir(Path({str(datadir.root)!r}))).start(timeout=40))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=40) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    processes = postgres_processes(datadir.pgdata)
    postmasters = [pid for pid in processes if parent_pid(pid) not in processes]
    assert postmasters == [postmaster_pid(datadir)]
    with psycopg.connect(outputs[0][0].strip()) as conn:
        conn.execute("SELECT 1")


def test_startup_error_shows_server_log(server: EmbeddedPostgres, datadir: DataDir) -> None:
    server.init()
    with open(datadir.pgdata / "postgresql.conf", "a") as conf:
        conf.write("neurondb_bogus_setting = 1\n")
    with pytest.raises(PostgresError) as failure:
        server.start(timeout=20)
    message = str(failure.value)
    assert 'unrecognized configuration parameter "neurondb_bogus_setting"' in message
    assert str(server.log_file) in message
    assert not server.is_running()


def test_files_are_not_readable_by_others(server: EmbeddedPostgres, datadir: DataDir) -> None:
    """Nothing in the data directory can be read by other users: no 'r' for group/others on any path
    those users can reach (the root is traverse-only as root, so the server user can reach pgdata)."""
    server.start()
    assert stat.S_IMODE(datadir.dsn_file.stat().st_mode) == 0o600
    exposed = []
    for dirpath, dirnames, filenames in os.walk(datadir.root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            mode = path.lstat().st_mode
            if mode & (stat.S_IRGRP | stat.S_IROTH) and reachable_by_others(path, datadir.root):
                exposed.append(f"{path} {stat.filemode(mode)}")
    assert stat.S_IMODE(datadir.root.stat().st_mode) & 0o044 == 0
    assert exposed == []


def reachable_by_others(path: Path, root: Path) -> bool:
    """Whether users other than the owner can traverse every directory from `root` down to `path`."""
    parent = path.parent
    while True:
        if not parent.stat().st_mode & (stat.S_IXGRP | stat.S_IXOTH):
            return False
        if parent == root:
            return True
        parent = parent.parent


@pytest.mark.skipif(not AS_ROOT, reason="only root runs the server as a separate system user")
def test_unreachable_data_dir_is_refused(tmp_path: Path) -> None:
    """pytest's temp base is private to root: the server user cannot reach it, and we never loosen it."""
    before = stat.S_IMODE(tmp_path.parent.stat().st_mode)
    with pytest.raises(PostgresError, match="cannot reach"):
        EmbeddedPostgres(DataDir(tmp_path / "data")).init()
    assert stat.S_IMODE(tmp_path.parent.stat().st_mode) == before


@pytest.mark.skipif(not AS_ROOT, reason="only root needs a private copy of the server binaries")
def test_private_copy_of_unreachable_binaries(tmp_path: Path, datadir: DataDir) -> None:
    """Binaries under a root-only path (a venv in /root, say) are copied into the data directory once,
    usable by the server user even under a strict umask."""
    home = bundled_pg_homes()[0]
    site = tmp_path / "site-packages"  # under pytest's root-only temp base
    for part in ("bin", "lib", "share"):
        shutil.copytree(home / part, site / home.parent.name / home.name / part, symlinks=True)
    libs = home.parent.parent / f"{home.parent.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    server = EmbeddedPostgres(datadir, pg_home=site / home.parent.name / home.name)
    umask = os.umask(0o077)
    try:
        dsn = server.start()
    finally:
        os.umask(umask)
    assert (datadir.root / "pgbin" / "SOURCE").exists()
    exe = os.readlink(f"/proc/{postmaster_pid(datadir)}/exe")
    assert exe.startswith(str(datadir.root / "pgbin"))
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("neurondb",)
    copied = (datadir.root / "pgbin" / "SOURCE").stat().st_ino
    server.stop()
    server.start()
    assert (datadir.root / "pgbin" / "SOURCE").stat().st_ino == copied


def ensure_test_user() -> pwd.struct_passwd:
    """An ordinary (non-system) account to prove the non-root path; created once, reused after."""
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                       capture_output=True, check=False)
        return pwd.getpwnam(TEST_USER)


def interpreter_for(run_as: dict[str, Any]) -> tuple[str | None, str]:
    """A Python that `run_as` can execute and that imports neurondb with our sys.path, or why none can.

    Our own interpreter comes first; a venv often links to one under root's private home (pyenv in
    /root), so the system interpreter of the same version is the fallback. Nothing is copied.
    """
    candidates = [sys.executable]
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/bin")
    if system:
        candidates.append(system)
    reasons = []
    for python in candidates:
        try:
            probe = subprocess.run([python, "-c", "import neurondb.pgserver, psycopg"], **run_as)
        except OSError as error:
            reasons.append(f"{python}: {error}")
            continue
        if probe.returncode == 0:
            return python, ""
        reasons.append(f"{python}: {probe.stderr.strip().splitlines()[-1]}")
    return None, "; ".join(reasons)


@pytest.mark.skipif(not AS_ROOT, reason="already an ordinary user: every other test covers that path")
def test_ordinary_user_runs_server_as_itself() -> None:
    """As an ordinary user the server runs as that user: no system user, no 0711 root, no binary copy."""
    user = ensure_test_user()
    base = new_root("neurondb-nonroot-")
    os.chown(base, user.pw_uid, user.pw_gid)
    data = base / "data"
    package_parent = str(Path(neurondb.__file__).resolve().parents[1])  # an editable install's .pth
    run_as: dict[str, Any] = {
        "user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "cwd": str(base),
        "env": {"PATH": "/usr/bin:/bin", "HOME": str(base),
                "PYTHONPATH": os.pathsep.join([package_parent, *(p for p in sys.path if p)])},
        "capture_output": True, "text": True, "check": False, "timeout": 40,
    }
    try:
        python, why_not = interpreter_for(run_as)
        if python is None:
            pytest.skip(f"{TEST_USER} cannot run a Python that imports neurondb: {why_not}")
        code = textwrap.dedent(f"""
            import json, os
            from pathlib import Path
            import psycopg
            from neurondb.paths import DataDir
            from neurondb.pgserver import EmbeddedPostgres
            server = EmbeddedPostgres(DataDir(Path({str(data)!r})))
            server.init()
            dsn = server.start()
            pid = int((server.pgdata / "postmaster.pid").read_text().split()[0])
            uid = os.stat(f"/proc/{{pid}}").st_uid
            with psycopg.connect(dsn) as conn:
                conn.execute("SELECT 1")
            server.stop()
            print(json.dumps({{"uid": uid, "running": server.is_running(),
                              "pgdata_uid": server.pgdata.stat().st_uid}}))
        """)
        result = subprocess.run([python, "-c", code], **run_as)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report == {"uid": user.pw_uid, "running": False, "pgdata_uid": user.pw_uid}
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert not (data / "pgbin").exists()
    finally:
        kill_servers(data / "pgdata")
        shutil.rmtree(base, ignore_errors=True)
