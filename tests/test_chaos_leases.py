"""Leases of the job queue and the LLM jobs under chaos (issue 9, defects 2-6): undecodable rows, poison jobs
that kill their worker, hand-backs that must charge only the attempt that ran, lost database connections.
Real service, real PostgreSQL, real SIGKILLs."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from neurondb import llm, queue
from neurondb.supervisor import pid_alive
from neurondb.workers.leases import RetryPolicy, recover_expired
from tests.fakeprovider import FakeProvider
from tests.service import Service, running_service, wait_for

JOBS = {"neurondb.neuranq_job_modules": "tests.jobtypes", "neurondb.neuranq_retry_delay": "100ms"}
QUEUE = "neurondb.neurondb_job_queue"
DEEP = "'{\"query\":\"q\",\"documents\":' || repeat('[', 1100) || repeat(']', 1100) || '}'"


@pytest.fixture
def service(tmp_path: Path, fresh_dsn: str, request: pytest.FixtureRequest) -> Iterator[Service]:
    with running_service(tmp_path / "data", fresh_dsn, {**JOBS, **getattr(request, "param", {})}) as svc:
        yield svc


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider(dim=8) as server:
        yield server


@pytest.fixture
def llm_service(tmp_path: Path, fresh_dsn: str, fake: FakeProvider,
                request: pytest.FixtureRequest) -> Iterator[Service]:
    settings = {"neurondb.llm_provider": "openai", "neurondb.llm_endpoint": fake.url,
                "neurondb.llm_model": "gpt-test", "neurondb.neuranllm_retry_delay": "100ms",
                **getattr(request, "param", {})}
    with running_service(tmp_path / "data", fresh_dsn, settings) as svc:
        yield svc


def rows(conn: psycopg.Connection, table: str, ids: list[int]) -> list[dict]:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(f"SELECT job_id, status, retry_count, error_message, attempts FROM {table} "
                           "WHERE job_id = ANY(%s) ORDER BY job_id", (ids,)).fetchall()


def wait_finished(conn: psycopg.Connection, table: str, ids: list[int], timeout: float) -> list[dict]:
    finished = f"SELECT count(*) FROM {table} WHERE job_id = ANY(%s) AND status IN ('completed', 'failed')"
    wait_for(lambda: conn.execute(finished, (ids,)).fetchone()[0] == len(ids), timeout,
             f"{len(ids)} jobs of {table} to finish", interval=0.05)
    return rows(conn, table, ids)


def dead_letters(conn: psycopg.Connection, ids: list[int]) -> list[tuple]:
    return conn.execute("SELECT job_id, retry_count, error_message FROM neurondb.neurondb_dead_letter "
                        "WHERE job_id = ANY(%s) ORDER BY job_id", (ids,)).fetchall()


def insert_job(conn: psycopg.Connection, job_type: str, payload_sql: str, *params: object,
               **columns: object) -> int:
    """A plain INSERT, as any database login can write it: `payload_sql` is an SQL expression."""
    names = ", ".join(["job_type", "payload", *columns])
    values = ", ".join(["%s", payload_sql] + ["%s"] * len(columns))
    return conn.execute(f"INSERT INTO {QUEUE} ({names}) VALUES ({values}) RETURNING job_id",
                        (job_type, *params, *columns.values())).fetchone()[0]


# -- defect 2: an undecodable payload fails alone ------------------------------------------------------------

@pytest.mark.parametrize("payload_sql, message", [
    (f"({DEEP})::jsonb", "nested deeper than"),
    ("'{\"n\": 1e400}'::jsonb", "number is infinity"),
])
def test_undecodable_payload_fails_alone_and_the_queue_goes_on(service: Service, conn: psycopg.Connection,
                                                               payload_sql: str, message: str) -> None:
    """PostgreSQL accepts the payload, the worker's JSON decoder does not: that job fails at once, without
    retries, with a one-line message naming the payload; every other job (any tenant) still runs."""
    service.write_settings({**JOBS, "neurondb.neuranq_enabled": "off"})
    service.cli("reload")
    bad = insert_job(conn, "rerank", payload_sql, tenant_id="evil")
    good = [*queue.enqueue_many(conn, "test.noop", [{}] * 20, tenant_id="evil"),
            *queue.enqueue_many(conn, "test.noop", [{}] * 20, tenant_id="other")]
    service.write_settings(JOBS)
    service.cli("reload")
    done = wait_finished(conn, QUEUE, [bad, *good], 10.0)
    assert [r["status"] for r in done[1:]] == ["completed"] * 40
    failed = done[0]
    assert failed["status"] == "failed" and failed["retry_count"] == 0, failed
    error = failed["error_message"]
    assert error.startswith("payload ") and message in error and "\n" not in error and len(error) < 300, error
    assert [r[0] for r in dead_letters(conn, [bad])] == [bad]
    assert "Traceback" not in service.log_tail(400)


# -- defect 3: the same for LLM jobs --------------------------------------------------------------------------

def test_llm_undecodable_parameters_fail_alone(llm_service: Service, conn: psycopg.Connection) -> None:
    """A plain INSERT with parameters nested too deep for the decoder: the job fails at once with a clear
    message instead of staying `processing` for ever, and the jobs claimed with it complete."""
    bad = conn.execute("INSERT INTO neurondb.neurondb_llm_jobs (operation, input_text, parameters) "
                       f"VALUES ('completion', 'hi', ({DEEP})::jsonb) RETURNING job_id").fetchone()[0]
    good = llm.submit_many(conn, "completion", [f"job {i}" for i in range(5)])
    done = wait_finished(conn, "neurondb.neurondb_llm_jobs", [bad, *good], 10.0)
    assert [r["status"] for r in done[1:]] == ["completed"] * 5
    assert done[0]["status"] == "failed" and done[0]["retry_count"] == 0, done[0]
    error = done[0]["error_message"]
    assert error.startswith("parameters ") and "nested deeper than" in error and len(error) < 300, error


# -- defect 4: a job that kills its worker ends in the dead letters --------------------------------------------

@pytest.mark.parametrize("retries", [2, 6])
def test_job_that_kills_its_worker_is_dead_lettered(service: Service, conn: psycopg.Connection,
                                                    retries: int) -> None:
    """max_retries runs + 1, each SIGKILLs neuranq; then the job is failed with a dead-letter row, the worker is
    not FATAL (also with more runs than worker_max_crashes, 5: such crashes are the job's) and the 40 jobs
    behind it complete."""
    poison = queue.enqueue(conn, "test.crash", {}, priority=10, max_retries=retries)
    good = queue.enqueue_many(conn, "test.noop", [{}] * 40)
    done = wait_finished(conn, QUEUE, [poison, *good], 30.0)
    runs = retries + 1
    assert done[0]["status"] == "failed" and done[0]["retry_count"] == runs, done[0]
    assert len(done[0]["attempts"]) == runs
    assert all("terminated by signal 9" in a["error"] for a in done[0]["attempts"])
    assert "terminated by signal 9" in done[0]["error_message"]
    assert dead_letters(conn, [poison]) == [(poison, runs, done[0]["error_message"])]
    assert [r["status"] for r in done[1:]] == ["completed"] * 40
    worker = wait_for(lambda: (w := service.worker("neuranq")).state in ("idle", "running") and w, 5.0,
                      "neuranq to be back after the last crash")
    assert worker.restarts == runs, worker


def test_job_over_its_limit_never_runs_again(service: Service, conn: psycopg.Connection, tmp_path: Path) -> None:
    """A pending job whose attempts already exceed its limit (say, the default limit was lowered) is failed
    and dead-lettered when claimed, without running."""
    effects = tmp_path / "effects.log"
    over = insert_job(conn, "test.record", "jsonb_build_object('file', %s::text)", str(effects),
                      retry_count=3, max_retries=2)
    done = wait_finished(conn, QUEUE, [over], 10.0)[0]
    assert done["status"] == "failed" and "limit" in done["error_message"], done
    assert not effects.exists()
    assert [r[0] for r in dead_letters(conn, [over])] == [over]


def test_expired_lease_over_the_limit_is_dead_lettered(conn: psycopg.Connection) -> None:
    """Lease expiry (a lost machine) counts the lost run; a job past its limit then ends failed with a
    dead-letter row instead of running again, one with retries left goes back to pending."""
    expired = ("UPDATE neurondb.neurondb_job_queue SET status = 'processing', lease_owner = 'lost:1', "
               "started_at = now() - interval '1 hour', lease_expires_at = now() - interval '1 second', "
               "retry_count = %s, max_retries = 2 WHERE job_id = %s")
    last, spare = queue.enqueue(conn, "test.noop"), queue.enqueue(conn, "test.noop")
    conn.execute(expired, (2, last))
    conn.execute(expired, (0, spare))
    assert recover_expired(conn, QUEUE, RetryPolicy(2, 100, 1000)) == (2, [last])
    after = {r["job_id"]: r for r in rows(conn, QUEUE, [last, spare])}
    assert after[last]["status"] == "failed" and after[last]["retry_count"] == 3
    assert "lease expired" in after[last]["error_message"]
    assert after[spare]["status"] == "pending" and after[spare]["retry_count"] == 1
    assert [r[0] for r in dead_letters(conn, [last, spare])] == [last]


# -- defect 5: only a started attempt counts -----------------------------------------------------------------

def test_hand_back_charges_only_the_job_that_ran(service: Service, conn: psycopg.Connection) -> None:
    """A batch of 30 jobs behind a job that kills its worker twice: the 30 were claimed but never started,
    so they go back with no attempt counted, and complete with retry_count 0."""
    poison = queue.enqueue(conn, "test.crash", {"attempts": 2}, priority=10)
    good = queue.enqueue_many(conn, "test.noop", [{}] * 30)
    done = wait_finished(conn, QUEUE, [poison, *good], 20.0)
    assert done[0]["status"] == "completed" and done[0]["retry_count"] == 2, done[0]
    assert [(r["status"], r["retry_count"]) for r in done[1:]] == [("completed", 0)] * 30


@pytest.mark.parametrize("llm_service", [{"neurondb.neuranllm_concurrency": "2"}], indirect=True)
def test_llm_hand_back_charges_only_calls_in_flight(llm_service: Service, conn: psycopg.Connection,
                                                    fake: FakeProvider) -> None:
    """Ten LLM jobs claimed, two calls in flight when the worker is SIGKILLed: the two count an attempt, the
    eight waiting for a call slot do not."""
    fake.set_delay(3000)
    ids = llm.submit_many(conn, "completion", [f"job {i}" for i in range(10)])
    claimed = "SELECT count(*) FROM neurondb.neurondb_llm_jobs WHERE status = 'processing'"
    wait_for(lambda: fake.count() >= 2 and conn.execute(claimed).fetchone()[0] == 10, 5, "2 calls in flight")
    os.kill(llm_service.worker("neuranllm").pid, signal.SIGKILL)
    fake.set_delay(0)
    done = wait_finished(conn, "neurondb.neurondb_llm_jobs", ids, 20.0)
    assert [r["status"] for r in done] == ["completed"] * 10
    assert sorted(r["retry_count"] for r in done) == [0] * 8 + [1] * 2


# -- defect 6: a lost connection is reconciled at once, not after the lease -------------------------------------

def test_lost_connection_reconciles_claimed_jobs_at_once(service: Service, conn: psycopg.Connection,
                                                         tmp_path: Path) -> None:
    """neuranq's connection is cut in the middle of a 50-job batch (as a PostgreSQL restart does): the
    outcomes it computed are recorded and the jobs it had not started are handed back on reconnect, so
    all 50 finish within seconds (the lease is 120 s), each run exactly once, none charged an attempt."""
    effects = tmp_path / "effects.log"
    ids = queue.enqueue_many(conn, "test.record", [{"file": str(effects), "seconds": 0.05}] * 50)
    wait_for(lambda: effects.exists() and len(effects.read_text().splitlines()) >= 5, 5.0, "the batch to start")
    cut = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE application_name = 'neurondb neuranq'").fetchall()
    assert cut == [(True,)]
    done = wait_finished(conn, QUEUE, ids, 15.0)
    assert [(r["status"], r["retry_count"]) for r in done] == [("completed", 0)] * 50
    runs = effects.read_text().split()
    assert sorted(runs) == sorted(str(i) for i in ids), "a job ran twice or never"


def test_llm_lost_connection_hands_back_jobs_it_never_received(llm_service: Service, conn: psycopg.Connection) -> None:
    """A claim that committed but whose answer was lost with the connection leaves jobs leased to the LLM
    worker that it does not know (made here by hand): on reconnect it hands them back at once, no attempt
    counted, instead of leaving them `processing` until their lease (at least 60 s) expires."""
    pid = llm_service.worker("neuranllm").pid
    lost = llm.submit_many(conn, "completion", ["lost 1", "lost 2"], run_at="infinity")
    conn.execute("UPDATE neurondb.neurondb_llm_jobs SET status = 'processing', lease_owner = %s, "
                 "started_at = now(), lease_expires_at = now() + interval '1 hour', run_at = now() "
                 "WHERE job_id = ANY(%s)", (f"{socket.gethostname()}:{pid}", lost))
    cut = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE application_name LIKE 'neurondb neuranllm%'").fetchall()
    assert cut and all(ok for (ok,) in cut)
    done = wait_finished(conn, "neurondb.neurondb_llm_jobs", lost, 10.0)
    assert [(r["status"], r["retry_count"]) for r in done] == [("completed", 0)] * 2
    assert llm_service.worker("neuranllm").pid == pid       # the worker lived through it


# -- the supervisor's hand-back when the database is away, and after its own death -----------------------------

def held_by(conn: psycopg.Connection, pid: int) -> int:
    return conn.execute(f"SELECT count(*) FROM {QUEUE} WHERE status = 'processing' AND lease_owner = %s",
                        (f"{socket.gethostname()}:{pid}",)).fetchone()[0]


def test_hand_back_survives_a_stale_supervisor_connection(service: Service, conn: psycopg.Connection) -> None:
    """The supervisor's connection died (as in a PostgreSQL restart) just before it reaps a SIGKILLed worker:
    the hand-back is retried with a new connection, so the jobs come back in seconds, not after their 120 s
    lease (the chaos run found 300 jobs held so)."""
    ids = queue.enqueue_many(conn, "test.sleep", [{"seconds": 0.2}] * 40)
    wait_for(lambda: conn.execute(f"SELECT count(*) FROM {QUEUE} WHERE status = 'processing'").fetchone()[0] >= 10,
             10.0, "neuranq to claim a batch")
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 "WHERE application_name = 'neurondb supervisor' AND datname = current_database()")
    pid = service.worker("neuranq").pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: held_by(conn, pid) == 0, 5.0, "the killed worker's jobs to be handed back")
    assert {r["status"] for r in wait_finished(conn, QUEUE, ids, 30.0)} == {"completed"}


def test_jobs_of_a_killed_supervisors_workers_come_back_at_start(service: Service,
                                                                conn: psycopg.Connection) -> None:
    """Supervisor and queue worker SIGKILLed together (nobody left to hand the jobs back): the next start finds
    the jobs leased to a dead process of this host and returns them at once, no attempt counted."""
    ids = queue.enqueue_many(conn, "test.sleep", [{"seconds": 0.2}] * 40)
    wait_for(lambda: conn.execute(f"SELECT count(*) FROM {QUEUE} WHERE status = 'processing'").fetchone()[0] >= 10,
             10.0, "neuranq to claim a batch")
    worker, supervisor = service.worker("neuranq").pid, service.supervisor_pid
    os.kill(worker, signal.SIGKILL)
    os.kill(supervisor, signal.SIGKILL)
    assert held_by(conn, worker) > 0
    service.start()
    wait_for(lambda: held_by(conn, worker) == 0, 5.0, "the orphaned jobs to be handed back at start")
    done = wait_finished(conn, QUEUE, ids, 30.0)
    assert {r["status"] for r in done} == {"completed"}
    assert max(r["retry_count"] for r in done) <= 1       # the one running when killed may count its attempt


def test_workers_hand_back_their_jobs_when_the_supervisor_dies(llm_service: Service, conn: psycopg.Connection,
                                                              fake: FakeProvider) -> None:
    """SIGKILL of the supervisor: its LLM worker sees it gone, stops as a fast shutdown does (calls in flight
    abandoned, jobs in hand back to pending at once) and exits; nothing waits for the next start or a lease."""
    fake.set_delay(3000)
    ids = llm.submit_many(conn, "completion", [f"job {i}" for i in range(10)])
    processing = "SELECT count(*) FROM neurondb.neurondb_llm_jobs WHERE status = 'processing'"
    wait_for(lambda: fake.count() >= 2 and conn.execute(processing).fetchone()[0] == 10, 5, "calls in flight")
    worker = llm_service.worker("neuranllm").pid
    os.kill(llm_service.supervisor_pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(worker), 5.0, "the LLM worker to exit")
    assert conn.execute(processing).fetchone()[0] == 0
    assert all(r["status"] == "pending" for r in rows(conn, "neurondb.neurondb_llm_jobs", ids))
