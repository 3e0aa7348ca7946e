"""Commands that misled their user (issue 14), against the real service: each test failed before its fix."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import psycopg
import pytest

from neurondb import queue
from neurondb.settings import REGISTRY, SettingError, parse_value
from tests.service import Service, running_service, wait_for

JOBS = {"neurondb.neuranq_job_modules": "tests.jobtypes", "neurondb.neuranq_retry_delay": "10ms"}


@pytest.fixture
def service(tmp_path: Path, fresh_dsn: str) -> Iterator[Service]:
    with running_service(tmp_path / "data", fresh_dsn, JOBS) as svc:
        yield svc


def wait_status(conn: psycopg.Connection, job_id: int, status: str) -> None:
    def reached() -> bool:
        found = queue.get(conn, job_id)
        return found is not None and found["status"] == status
    wait_for(reached, 10.0, f"job {job_id} to be {status}", interval=0.05)


def test_retry_of_a_dead_letter_that_fails_again_leaves_one_dead_letter(service: Service,
                                                                         conn: psycopg.Connection) -> None:
    job_id = queue.enqueue(conn, "test.fail", max_retries=0)
    wait_status(conn, job_id, "failed")
    [first] = queue.dlq_list(conn)
    assert first["job_id"] == job_id

    assert "queued again" in service.cli("jobs", "retry", str(job_id)).stdout
    # The retried job's dead letter is settled by the retry: replaying now would run the job twice. (The
    # worker may already have run it and failed it again by now: that is a new dead letter, not the first.)
    assert first["dlq_id"] not in [d["dlq_id"] for d in queue.dlq_list(conn)]
    wait_for(lambda: len(queue.dlq_list(conn)) == 1, 10.0, "the second failure's dead letter")
    [dead] = queue.dlq_list(conn)
    assert dead["job_id"] == job_id and dead["dlq_id"] != first["dlq_id"]
    assert "replayed 1 dead letters" in service.cli("jobs", "dlq", "replay").stdout
    n = conn.execute("SELECT count(*) FROM neurondb.neurondb_job_queue WHERE job_id <> %s", (job_id,)).fetchone()[0]
    assert n == 1


def test_fatal_worker_shows_its_own_error_and_the_restart_hint(tmp_path: Path, fresh_dsn: str) -> None:
    svc = Service(tmp_path / "data", fresh_dsn, {"neurondb.neuranq_job_modules": "nosuchmodule",
                                                "neurondb.worker_max_crashes": "2"})
    try:
        svc.cli("start")
        wait_for(lambda: any(w.state == "fatal" for w in svc.status().workers if w.name.startswith("neuranq")),
                 10.0, "the queue worker to turn FATAL")
        [fatal] = [w for w in svc.status().workers if w.state == "fatal"]
        assert "No module named 'nosuchmodule'" in fatal.last_error
        assert "2 crashes" in fatal.last_error
        assert "No module named 'nosuchmodule'" in svc.cli("status", "--json", check=False).stdout
        # The module list is a postmaster setting: a reload keeps the old value, only a restart applies it.
        [line] = [ln for ln in svc.log_tail(200).splitlines() if "marked FATAL" in ln]
        assert "No module named 'nosuchmodule'" in line and "neurondb stop" in line
    finally:
        svc.close()


BAD_VALUES = [
    ("neurondb.neuranq_naptime", "50"),
    ("neurondb.neuranq_naptime", "fast"),
    ("neurondb.neuranq_naptime", "2.5"),
    ("neurondb.neuranq_naptime", "3 parsecs"),
    ("neurondb.neuranq_naptime", "1e999"),
    ("neurondb.neuranq_queue_depth", "5ms"),
    ("neurondb.neuranq_enabled", "maybe"),
    ("neurondb.neuranmon_priority", "speed"),
    ("neurondb.neuranmon_target_recall", "1.5"),
    ("neurondb.llm_model", "two\nlines"),
]


def test_alter_system_refuses_a_bad_value_at_once_as_config_set_does(service: Service,
                                                                     conn: psycopg.Connection) -> None:
    for name, raw in BAD_VALUES:
        with pytest.raises(SettingError) as expected:
            parse_value(REGISTRY[name], raw)
        with pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
            conn.execute("SELECT neurondb.alter_system(%s, %s)", (name, raw))
        assert refused.value.diag.message_primary == str(expected.value)
    assert conn.execute("SELECT count(*) FROM neurondb.neurondb_settings_requests").fetchone()[0] == 0


def test_alter_system_takes_what_config_set_takes(service: Service, conn: psycopg.Connection) -> None:
    for name, raw in [("neurondb.neuranq_naptime", " 1.5s "), ("neurondb.neuranq_enabled", "OF"),
                      ("neurondb.job_retention", "1500ms"), ("neurondb.neuranmon_priority", "Latency"),
                      ("neurondb.neuronmon_target_latency", "2.5"), ("neurondb.http_max_response_size", "2MB")]:
        parse_value(REGISTRY[name.replace("neuronmon", "neuranmon")], raw)
        assert "queued" in conn.execute("SELECT neurondb.alter_system(%s, %s)", (name, raw)).fetchone()[0]
    service.cli("reload")
    settings = dict(conn.execute("SELECT name, setting FROM neurondb.settings").fetchall())
    assert settings["neurondb.neuranq_naptime"] == "1500" and settings["neurondb.job_retention"] == "2"
    assert settings["neurondb.http_max_response_size"] == "2048"


def test_cancelled_jobs_end_cancelled_and_are_counted_apart(service: Service, conn: psycopg.Connection) -> None:
    later = queue.enqueue(conn, "test.noop", run_at=datetime.now(UTC) + timedelta(hours=1))
    running = queue.enqueue(conn, "test.sleep", {"seconds": 4.0})   # long enough for two CLI starts
    wait_status(conn, running, "processing")
    for job_id in (later, running):
        assert service.cli("jobs", "cancel", str(job_id)).stdout.strip() == f"job {job_id} cancelled"
    failing = queue.enqueue(conn, "test.fail", max_retries=0)
    wait_status(conn, failing, "failed")
    time.sleep(4.2)   # the cancelled run ends; its worker's outcome must not overwrite the cancellation
    for job_id in (later, running):
        found = queue.get(conn, job_id)
        assert found is not None and found["status"] == "cancelled"
        assert found["error_message"].startswith("cancelled by ")
    assert [d["job_id"] for d in queue.dlq_list(conn)] == [failing]   # a cancellation is no dead letter
    listed = service.cli("jobs", "list", "--status", "cancelled", "--json").stdout
    assert sorted(j["job_id"] for j in orjson.loads(listed)) == [later, running]
    counts = orjson.loads(service.cli("status", "--json", check=False).stdout)["queue"]
    assert counts["cancelled"] == 2 and counts["failed"] == 1
    assert "queued again" in service.cli("jobs", "retry", str(later)).stdout   # a cancelled job can run again
    wait_status(conn, later, "completed")          # retried: it runs now (the retry resets run_at)
