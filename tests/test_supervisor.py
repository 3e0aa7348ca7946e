"""The supervisor with real forked workers, real signals and real shared memory (issue: supervisor)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psycopg
import pytest

from neurondb.status import pid_alive
from tests.service import Service, wait_for

WORKERS = {"neuranq", "neuranmon", "neurandefrag", "neuranllm"}


@pytest.mark.parametrize("mode", ["smart", "fast", "immediate"])
def test_start_heartbeats_then_stop_leaves_nothing(make_service, mode: str) -> None:
    service = make_service()
    status = service.start()
    assert {w.name for w in status.workers} == WORKERS
    pids = [w.pid for w in status.workers] + [service.supervisor_pid]
    assert service.shm_objects()
    assert service.cli("status").returncode == 0

    result = service.cli("stop", "-m", mode)
    assert result.returncode == 0, result.stderr
    assert not [pid for pid in pids if pid_alive(pid)]
    assert service.shm_objects() == []
    assert not service.datadir.pid_file.exists()
    assert service.cli("status", check=False).returncode == 3


def test_second_start_refuses(make_service) -> None:
    service = make_service()
    service.start()
    again = service.cli("start", check=False)
    assert again.returncode != 0
    assert "already running" in again.stderr
    service.wait_healthy()   # the refused start touched nothing of the running one


def test_sigkilled_workers_are_restarted(make_service) -> None:
    service = make_service()
    service.start()
    for name in sorted(WORKERS):
        before = {w.name: w for w in service.status().workers}
        os.kill(before[name].pid, signal.SIGKILL)
        t0 = time.monotonic()

        def restarted(name: str = name, old=before[name]) -> bool:
            w = service.worker(name)
            return bool(w.pid and w.pid != old.pid and w.heartbeat_age_s is not None and w.heartbeat_age_s < 0.5)

        wait_for(restarted, 2.0, f"{name} to come back with a new pid")
        assert time.monotonic() - t0 < 2.0
        after = {w.name: w for w in service.status().workers}
        assert after[name].restarts == before[name].restarts + 1
        for other in WORKERS - {name}:
            assert after[other].pid == before[other].pid, f"{other} was disturbed by {name}'s crash"


def test_worker_crashing_at_start_turns_fatal(make_service) -> None:
    service = make_service(settings={"neurondb.worker_max_crashes": "3"},
                           env={"NEURONDB_INJECTION_POINTS": "neuranmon:start=crash"})
    service.cli("start")
    fatal = wait_for(lambda: service.worker("neuranmon").state == "fatal", 10.0, "neuranmon to turn FATAL")
    assert fatal
    status = service.status()
    assert status.running and pid_alive(service.supervisor_pid)
    assert all(w.state in ("idle", "running") for w in status.workers if w.name != "neuranmon")
    assert "crashes within" in service.worker("neuranmon").last_error
    assert service.cli("status", check=False).returncode == 1
    assert "marked FATAL" in service.log_tail()


def test_hung_worker_is_killed_and_restarted(make_service) -> None:
    service = make_service(settings={"neurondb.worker_heartbeat_timeout": "1s", "neurondb.worker_max_crashes": "50"},
                           env={"NEURONDB_INJECTION_POINTS": "neurandefrag:batch=hang"})
    service.cli("start")
    wait_for(lambda: service.worker("neurandefrag").restarts >= 1, 10.0, "the hung worker to be restarted")
    assert "sent no heartbeat" in service.log_tail(200)


def test_supervisor_sigkill_then_clean_restart(make_service) -> None:
    service = make_service()
    status = service.start()
    workers = [w.pid for w in status.workers]
    os.kill(service.supervisor_pid, signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(p) for p in workers), 2.0, "workers to exit after the supervisor died")
    assert service.shm_objects(), "a killed supervisor cannot clean up; the next start must"
    status = service.start()
    assert {w.name for w in status.workers} == WORKERS
    assert "stale shared memory" in service.log_tail(100)


def test_reload_from_file_and_from_sql(make_service, fresh_dsn: str) -> None:
    service = make_service()
    service.start()
    generation = service.status().config_generation

    service.write_settings({
        "neurondb.neuranq_naptime": "700ms",
        "neurondb.neuranq_workers": "2",            # postmaster: pending restart
        "neurondb.neuranmon_target_recall": "2.0",  # out of range: rejected, old value kept
        "neurondb.worker_restart_interval": "100ms",
    })
    os.kill(service.supervisor_pid, signal.SIGHUP)
    t0 = time.monotonic()

    def applied() -> bool:
        s = service.status()
        return s.config_generation > generation and all(w.config_generation == s.config_generation
                                                        for w in s.workers)

    wait_for(applied, 1.0, "every worker to apply the reload")
    assert time.monotonic() - t0 < 1.0
    naptimes = {w.name: w.naptime_ms for w in service.status().workers}
    assert naptimes == {"neuranq": 700, "neuranmon": 1000 * 60, "neurandefrag": 300_000, "neuranllm": 1000}
    assert [w.name for w in service.status().workers if w.kind == "neuranq"] == ["neuranq"]
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        rows = {r[0]: r[1:] for r in conn.execute(
            "SELECT name, setting, pending_restart, rejected_value FROM neurondb.settings")}
        assert rows["neurondb.neuranq_naptime"][0] == "700"
        assert rows["neurondb.neuranq_workers"][:2] == ("1", True)
        assert rows["neurondb.neuranmon_target_recall"][0] == "0.95"
        assert rows["neurondb.neuranmon_target_recall"][2] == "2.0"

        # The DBA's path: ALTER SYSTEM + pg_reload_conf(), as neurondb functions.
        conn.execute("SELECT neurondb.alter_system('neurondb.neuranq_naptime', '450ms')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="neuranq_batch_size"):
            conn.execute("SELECT neurondb.alter_system('neurondb.neuranq_batch_size', 'lots')")
        # A request written around the function is refused by the supervisor when it applies it.
        conn.execute("INSERT INTO neurondb.neurondb_settings_requests (name, value) "
                     "VALUES ('neurondb.neuranq_batch_size', 'lots')")
        conn.execute("SELECT neurondb.reload_conf()")
        wait_for(lambda: service.worker("neuranq").naptime_ms == 450, 2.0, "the SQL reload to reach neuranq")

        def rejected() -> tuple | None:
            return conn.execute("SELECT setting, rejected_value, rejected_reason FROM neurondb.settings "
                                "WHERE name = 'neurondb.neuranq_batch_size' AND rejected_value IS NOT NULL").fetchone()

        setting, value, reason = wait_for(rejected, 2.0, "the SQL rejection to show in neurondb.settings")
        assert (setting, value) == ("100", "lots")
        assert "neuranq_batch_size" in reason
        with pytest.raises(psycopg.errors.UndefinedObject):
            conn.execute("SELECT neurondb.alter_system('neurondb.no_such_thing', '1')")
    assert "rejected" in service.log_tail(100)


def test_disabled_worker_idles_and_resumes_on_reload(make_service) -> None:
    service = make_service(settings={"neurondb.neurandefrag_enabled": "off"})
    service.start()
    defrag = service.worker("neurandefrag")
    assert not defrag.enabled and defrag.state == "idle"
    service.write_settings({"neurondb.neurandefrag_enabled": "on", "neurondb.neurandefrag_naptime": "1s"})
    service.cli("reload")
    wait_for(lambda: service.worker("neurandefrag").enabled, 2.0, "neurandefrag to be enabled")
    assert service.worker("neurandefrag").pid == defrag.pid


def test_workers_view_shows_heartbeats(make_service, fresh_dsn: str) -> None:
    service = make_service()
    service.start()
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        def rows() -> list:
            return conn.execute("SELECT worker, pid, state FROM neurondb.workers "
                                "WHERE last_heartbeat > now() - interval '5 seconds'").fetchall()
        found = wait_for(lambda: len(rows()) == 4 and rows(), 5.0, "neurondb.workers to show 4 live workers")
        assert {r[0] for r in found} == WORKERS
        apps = {r[0] for r in conn.execute("SELECT application_name FROM pg_stat_activity "
                                            "WHERE application_name LIKE 'neurondb %'")}
        assert {"neurondb neuranq", "neurondb supervisor"} <= apps


def test_worker_killed_holding_a_lock_blocks_nobody(make_service) -> None:
    """neuranq stalls inside the shared `tenants` lock and is SIGKILLed there: the supervisor releases the
    lock when it reaps the pid (restart delayed 5 s, so only the release can free it in time)."""
    from neurondb.shm.control import SharedState

    service = make_service(settings={"neurondb.worker_restart_interval": "5s"},
                           env={"NEURONDB_INJECTION_POINTS": "neuranq:batch=hold:tenants:600"})
    service.cli("start")
    shared = SharedState.attach(service.prefix)
    try:
        lock = shared.lock("tenants")
        holder = wait_for(lock.owner, 5.0, "neuranq to take the tenants lock")
        assert holder == service.worker("neuranq").pid
        os.kill(holder, signal.SIGKILL)
        t0 = time.monotonic()
        assert lock.acquire(timeout=2.0), "the lock of a killed worker was not released within 2 s"
        assert time.monotonic() - t0 < 2.0
        lock.release()
        assert "died holding tenants" in wait_for(lambda: "died holding" in service.log_tail(50)
                                                  and service.log_tail(50), 2.0, "the release to be logged")
    finally:
        shared.close()


def test_workers_reconnect_when_postgres_restarts() -> None:
    """Embedded mode: the service's own PostgreSQL is restarted under it; every worker reconnects and keeps
    working, none crashes or turns FATAL. (A data dir under /tmp: the server's system user must reach it.)"""
    import shutil
    import tempfile

    from neurondb.pgserver import EmbeddedPostgres

    root = Path(tempfile.mkdtemp(prefix="neurondb-pgrestart-", dir="/tmp"))
    service = Service(root, dsn=None)
    try:
        service.cli("init")
        service.start()
        server = EmbeddedPostgres(service.datadir)
        server.stop("fast")
        time.sleep(1.0)
        server.start()
        after_restart = {w.name: w.batches for w in service.status().workers}

        def all_working_again() -> bool:
            return all(w.batches >= after_restart[w.name] + 2 and w.state in ("idle", "running")
                       for w in service.status().workers)

        wait_for(all_working_again, 15.0, "every worker to run batches again after the restart")
        status = service.status()
        assert all(w.restarts == 0 for w in status.workers), [(w.name, w.restarts) for w in status.workers]
        assert "database unavailable" in service.log_tail(200)
        assert service.cli("status").returncode == 0
        service.cli("stop", "--with-db")
        assert not server.is_running()
    finally:
        service.close()
        EmbeddedPostgres(service.datadir).stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
