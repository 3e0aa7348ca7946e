"""systemd integration and log rotation: the notify protocol of `start --foreground` against a local datagram
socket standing in for systemd's, the shipped unit file, and `neurondb logrotate`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from neurondb.sdnotify import Notifier
from neurondb.status import read_status
from tests.service import REPO, Service, wait_for

UNIT = REPO / "deploy" / "neurondb.service"


def _receive(sock: socket.socket, timeout: float) -> list[str]:
    """The datagrams that arrive within `timeout` seconds, each split into its lines."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            lines += sock.recv(4096).decode().splitlines()
        except TimeoutError:
            break
    return lines


def _wait_message(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """Every line received up to and including the first `wanted` one; fails after `timeout` seconds."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {wanted} within {timeout}s; received {seen}")
        sock.settimeout(left)
        try:
            seen += sock.recv(4096).decode().splitlines()
        except TimeoutError:
            continue
    return seen


def test_notifier_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The watchdog is on only with $WATCHDOG_USEC (for this pid); the variables leave the environment so the
    processes the supervisor starts do not report in its name; a path socket receives the datagram."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier.from_env() is None
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        notifier = Notifier.from_env()
        assert notifier is not None and notifier.watchdog_interval is None
        assert "NOTIFY_SOCKET" not in os.environ
        notifier.notify("READY=1", "STATUS=x")
        assert _receive(sock, 2.0) == ["READY=1", "STATUS=x"]
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "3000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
        assert Notifier.from_env().watchdog_interval is None     # the watchdog is another process's
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "3000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert Notifier.from_env().watchdog_interval == 1.5
        assert not {"WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)


def test_start_foreground_speaks_notify_protocol(tmp_path: Path, fresh_dsn: str) -> None:
    """READY=1 once every worker heartbeats, WATCHDOG=1 every half $WATCHDOG_USEC, STOPPING=1 on SIGTERM;
    the socket is abstract ('@'), as systemd's usually is."""
    service = Service(tmp_path / "data", fresh_dsn)
    address = f"@neurondb-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:])
    env = {**service.env, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "600000"}
    proc = subprocess.Popen([sys.executable, "-m", "neurondb", "start", "--foreground", "-D",
                             str(service.datadir.root), "--dsn", fresh_dsn], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        before = _wait_message(sock, "READY=1", 60.0)
        workers = read_status(service.datadir, with_database=False).workers
        assert workers and all(w.pid and w.heartbeat_age_s is not None for w in workers), workers
        assert any(line.startswith("STATUS=") and f"{len(workers)} workers running" in line for line in before)
        assert f"MAINPID={proc.pid}" in before
        watchdogs = [line for line in _receive(sock, 1.6) if line == "WATCHDOG=1"]
        assert len(watchdogs) >= 3, watchdogs   # every 0.3 s: at least 3 in 1.6 s even on a busy machine
        proc.send_signal(signal.SIGTERM)
        _wait_message(sock, "STOPPING=1", 30.0)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
        service.close()


def test_unit_file_verifies(tmp_path: Path) -> None:
    """The shipped unit passes `systemd-analyze verify` (its ExecStart pointed at this installation)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    text = UNIT.read_text()
    for line in ("Type=notify", "KillMode=mixed", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in text
    assert "start --foreground" in text
    unit = tmp_path / "neurondb.service"
    unit.write_text(text.replace("/opt/neurondb/bin/neurondb", str(Path(sys.executable).parent / "neurondb")))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and "neurondb.service" not in result.stderr, result.stderr


def test_logrotate_reopens_every_log(tmp_path: Path, fresh_dsn: str) -> None:
    """After the log file is renamed, `neurondb logrotate` makes the supervisor and every worker write to a
    new file of the old name; refused with one line when nothing runs."""
    service = Service(tmp_path / "data", fresh_dsn)
    refused = service.cli("logrotate", check=False)
    assert refused.returncode == 1 and refused.stderr.strip() == "error: neurondb is not running"
    try:
        names = {w.name for w in service.start().workers}
        log_file = service.datadir.log_file
        rotated = log_file.with_name(log_file.name + ".1")
        log_file.rename(rotated)
        service.cli("logrotate")

        def reopened() -> set[str]:
            try:
                lines = log_file.read_text().splitlines()
            except FileNotFoundError:
                return set()
            who = {line.split("] ", 1)[1].split(" ", 1)[0] for line in lines if line.endswith("log file reopened")}
            return who if who >= names | {"supervisor"} else set()

        wait_for(reopened, 10.0, f"'log file reopened' from the supervisor and {sorted(names)} in {log_file}")
        assert oct(log_file.stat().st_mode & 0o777) == "0o600"
        assert "log file reopened" not in rotated.read_text()
        service.cli("stop")
        assert "supervisor stopped" in log_file.read_text()
    finally:
        service.close()
