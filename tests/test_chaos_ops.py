"""Chaos findings on the supervisor, settings and privileges: each test reproduces one reported defect.

8   `neurondb reload` printed stale results (the generation was bumped before the settings were published).
10  a database login could point file-, host- and module-naming settings anywhere; 0.0.0.0/0 in the
    allowlist silently switched the SSRF guard off.
12  `neurondb start` right after a supervisor SIGKILL refused ("already running", dead pid) and wrote a
    traceback into the log.
13  conf syntax errors were logged as "parameter : invalid value ''".
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from neurondb.netguard import Allowlist
from neurondb.paths import DataDir
from neurondb.settings import REGISTRY, Config, SettingError, parse_value
from neurondb.status import pid_alive
from tests.service import wait_for

# ---------------------------------------------------------------- 8: reload output


def test_reload_cli_reports_every_rejection_and_pending_restart(make_service) -> None:
    """The supervisor stalls half a second inside every reload (an injection point), as it does under
    load; the CLI must still print the outcome of *its* reload, every time, including what
    neurondb.settings cannot hold (unknown names, syntax errors)."""
    service = make_service(env={"NEURONDB_INJECTION_POINTS": "supervisor:reload=sleep:0.5"})
    service.start()
    settings = {"neurondb.neuranq_workers": "2",              # postmaster: pending restart
                "neurondb.neuranmon_target_recall": "2.0",    # out of range: rejected
                "neurondb.neuranq_naptime": "300ms",          # applied
                "neurondb.no_such_setting": "1"}              # unknown: rejected
    for round_ in range(3):
        service.write_settings({**settings, "neurondb.neuranq_naptime": f"{300 + round_}ms"})
        out = service.cli("reload").stdout
        assert "neurondb.neuranq_workers" in out and "restart" in out, out
        assert "neurondb.neuranmon_target_recall" in out and "2.0" in out and "0.5 .. 1" in out, out
        assert "neurondb.no_such_setting" in out and "unrecognized" in out, out
        old = 299 + round_ if round_ else 200
        assert f"parameter neurondb.neuranq_naptime changed from {old}ms to {300 + round_}ms" in out, out

    # 13: a syntax error names file, line and text, says nothing was applied; the log says the same
    service.datadir.conf.write_text("neurondb.neuranq_naptime = 250ms\nneurondb.neuranq_batch_size = 'half\n")
    out = service.cli("reload").stdout
    assert f"{service.datadir.conf}:2: " in out and "neurondb.neuranq_batch_size = 'half" in out, out
    assert "no changes were applied" in out, out
    log = service.log_tail(200)
    assert f"{service.datadir.conf}:2: " in log
    assert "parameter : invalid value" not in log and "invalid value ''" not in log, log


def test_conf_syntax_errors_name_file_line_text_and_expectation(tmp_path: Path) -> None:
    datadir = DataDir(tmp_path / "d")
    datadir.init()
    datadir.conf.write_text("neurondb.neuranq_naptime 500 ms\n"
                            "= 5\n"
                            "neurondb.neuranq_batch_size =\n"
                            "neurondb.llm_model = 'open\n")
    with pytest.raises(SettingError) as info:
        Config.load(datadir)
    problems = info.value.problems
    assert len(problems) == 4, problems
    texts = ["neurondb.neuranq_naptime 500 ms", "= 5", "neurondb.neuranq_batch_size =", "neurondb.llm_model = 'open"]
    for line, (problem, text) in enumerate(zip(problems, texts, strict=True), start=1):
        assert problem.startswith(f"{datadir.conf}:{line}: "), problem
        assert f'"{text}"' in problem and "expected" in problem, problem


def test_long_bad_values_are_shortened_in_messages() -> None:
    with pytest.raises(SettingError) as info:
        parse_value(REGISTRY["neurondb.neuranq_job_modules"], "x-" * 500)
    message = str(info.value)
    assert "neurondb.neuranq_job_modules" in message and len(message) < 400, message


# ---------------------------------------------------------------- 10: privileges


SQL_UNSAFE = ["neurondb.llm_api_key_file", "neurondb.llm_endpoint", "neurondb.llm_routes",
              "neurondb.llm_provider", "neurondb.http_allowlist", "neurondb.neuranq_job_modules",
              "neurondb.metrics_listen_address", "neurondb.metrics_port"]


def test_sql_login_cannot_set_file_host_or_module_settings(make_service, fresh_dsn: str) -> None:
    """The reported exfiltration path (api key file + endpoint from SQL), refused at alter_system() and,
    for requests written straight into the table, by the supervisor; harmless settings still work."""
    service = make_service(settings={"neurondb.http_allowlist": "*"})
    service.start()
    assert "SSRF guard is off" in service.log_tail(100)
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        for name in SQL_UNSAFE:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=name) as info:
                conn.execute("SELECT neurondb.alter_system(%s, 'x')", (name,))
            assert "neurondb.conf" in str(info.value)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=name):
                conn.execute("SELECT neurondb.alter_system_reset(%s)", (name,))
        assert conn.execute("SELECT bool_and(sql_settable = (name <> ALL(%s))) FROM neurondb.settings",
                            (SQL_UNSAFE,)).fetchone()[0]

        # Around the function: a request inserted directly is refused by the supervisor.
        conn.execute("INSERT INTO neurondb.neurondb_settings_requests (name, value) VALUES "
                     "('neurondb.llm_api_key_file', '/etc/shadow'), ('neurondb.llm_endpoint', 'http://evil:1'),"
                     " ('neurondb.neuranq_naptime', '450ms')")
        conn.execute("SELECT neurondb.reload_conf()")
        wait_for(lambda: service.worker("neuranq").naptime_ms == 450, 3.0, "the allowed SQL setting to apply")

        def refused() -> list:
            return conn.execute("SELECT name, setting, rejected_reason FROM neurondb.settings "
                                "WHERE rejected_value IS NOT NULL ORDER BY name").fetchall()

        rows = wait_for(lambda: len(refused()) == 2 and refused(), 3.0, "both refusals in neurondb.settings")
        assert [(r[0], r[1]) for r in rows] == [("neurondb.llm_api_key_file", ""), ("neurondb.llm_endpoint", "")]
        assert all("cannot be set from SQL" in r[2] for r in rows), rows
    auto = service.datadir.auto_conf.read_text()
    assert "shadow" not in auto and "evil" not in auto and "neuranq_naptime = '450ms'" in auto
    warnings = service.log_tail(200).count("SSRF guard is off")
    service.cli("reload")
    assert service.log_tail(200).count("SSRF guard is off") == warnings + 1


@pytest.mark.parametrize("entry", ["0.0.0.0/0", "::/0", "0.0.0.0/1", "::ffff:0:0/96", "2000::/3"])
def test_allowlist_entry_covering_public_space_is_refused(entry: str) -> None:
    setting = REGISTRY["neurondb.http_allowlist"]
    with pytest.raises(SettingError) as info:
        parse_value(setting, f"api.example.com, {entry}")
    message = str(info.value)
    assert "neurondb.http_allowlist" in message and entry in message and "'*'" in message, message


def test_allowlist_star_allows_everything_explicitly() -> None:
    setting = REGISTRY["neurondb.http_allowlist"]
    for fine in ("10.0.0.0/8", "172.16.0.0/12", "fc00::/7", "169.254.169.254", "api.example.com", "*"):
        parse_value(setting, fine)
    everything = Allowlist.parse("*")
    for ip in ("169.254.169.254", "127.0.0.1", "::1", "8.8.8.8"):
        assert everything.ip_entry(ipaddress.ip_address(ip)) is not None, ip


# ---------------------------------------------------------------- 12: start after a supervisor SIGKILL


def test_start_right_after_supervisor_sigkill_waits_for_its_workers(make_service) -> None:
    """neuranq is inside a 2 s batch when its supervisor is killed, so it keeps the data directory's
    lock a while: `neurondb start` says so, waits, and starts; nothing writes a traceback."""
    service = make_service(env={"NEURONDB_INJECTION_POINTS": "neuranq:batch=sleep:2"})
    status = service.start()
    old_supervisor = service.supervisor_pid
    old_workers = [w.pid for w in status.workers]
    old_neuranq = service.worker("neuranq").pid
    wait_for(lambda: service.worker("neuranq").state == "running", 5.0, "neuranq to be inside a batch")
    os.kill(old_supervisor, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old_supervisor), 2.0, "the supervisor to be gone")
    result = service.cli("start", check=False)
    assert result.returncode == 0, result.stderr + result.stdout
    output = result.stdout + result.stderr
    assert f"supervisor pid {old_supervisor} is gone" in output, output
    assert "waiting for its" in output and str(old_neuranq) in output, output
    assert service.supervisor_pid != old_supervisor and pid_alive(service.supervisor_pid)
    assert not any(pid_alive(p) for p in old_workers)
    assert "Traceback" not in service.datadir.log_file.read_text()


def test_second_start_writes_no_traceback_into_the_running_log(make_service) -> None:
    service = make_service()
    service.start()
    again = service.cli("start", check=False)
    assert again.returncode == 1 and f"supervisor pid {service.supervisor_pid}" in again.stderr
    assert "Traceback" not in again.stderr
    assert "Traceback" not in service.datadir.log_file.read_text()


def test_a_process_that_keeps_the_lock_is_named_after_the_wait(tmp_path: Path) -> None:
    """A survivor that never exits: start gives up after the bounded wait with its pid and what to do."""
    from neurondb.supervisor import SupervisorError, wait_for_previous

    datadir = DataDir(tmp_path / "d")
    datadir.init()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    datadir.pid_file.write_text(f"{dead.pid}\n")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(datadir.lock_file)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        said: list[str] = []
        t0 = time.monotonic()
        with pytest.raises(SupervisorError) as info:
            wait_for_previous(datadir, timeout=0.5, say=said.append)
        assert time.monotonic() - t0 < 5.0
        assert said and f"supervisor pid {dead.pid} is gone" in said[0] and str(holder.pid) in said[0], said
        assert str(holder.pid) in str(info.value) and "kill" in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    fd = os.open(datadir.lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again: the next call returns at once
    finally:
        os.close(fd)
    wait_for_previous(datadir, timeout=0.5, say=said.append)


def test_worker_mid_batch_notices_a_dead_supervisor_between_jobs(make_service, fresh_dsn: str) -> None:
    """neuranq is in a batch of 100 jobs of 50 ms (5 s) when its supervisor is SIGKILLed: it stops after the
    job in progress, hands the rest back and exits, instead of holding the lock to the end of the batch."""
    from neurondb import queue

    service = make_service(settings={"neurondb.neuranq_job_modules": "tests.jobtypes"})
    service.start()
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        queue.enqueue_many(conn, "test.sleep", [{"seconds": 0.05}] * 100)
        wait_for(lambda: conn.execute("SELECT count(*) FROM neurondb.neurondb_job_queue "
                                      "WHERE status = 'completed'").fetchone()[0] >= 5, 5.0, "the batch to run")
        neuranq = service.worker("neuranq").pid
        os.kill(service.supervisor_pid, signal.SIGKILL)
        t0 = time.monotonic()
        wait_for(lambda: not pid_alive(neuranq), 3.0, "neuranq to exit after its supervisor died")
        elapsed = time.monotonic() - t0
        counts = dict(conn.execute("SELECT status, count(*) FROM neurondb.neurondb_job_queue GROUP BY status"))
    assert elapsed < 2.0, elapsed
    assert counts.get("pending", 0) > 20 and counts.get("processing", 0) == 0, counts
