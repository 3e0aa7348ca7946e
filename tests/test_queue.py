"""neuranq against the real service: claims, retries, timeouts, dead letters, fairness, rate limits, crashes."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import orjson
import psycopg
import pytest

from neurondb import queue
from neurondb.queries import query
from tests.service import Service, running_service, wait_for
from tests.test_document_sql import document_statements

JOBS = {"neurondb.neuranq_job_modules": "tests.jobtypes"}


@pytest.fixture
def service(tmp_path: Path, fresh_dsn: str, request: pytest.FixtureRequest) -> Iterator[Service]:
    with running_service(tmp_path / "data", fresh_dsn, {**JOBS, **getattr(request, "param", {})}) as svc:
        yield svc


def job(conn: psycopg.Connection, job_id: int) -> dict:
    found = queue.get(conn, job_id)
    assert found is not None
    return found


def wait_finished(conn: psycopg.Connection, ids: list[int], timeout: float) -> None:
    def done() -> bool:
        n = conn.execute("SELECT count(*) FROM neurondb.neurondb_job_queue WHERE job_id = ANY(%s) "
                         "AND status IN ('completed', 'failed')", (ids,)).fetchone()[0]
        return n == len(ids)
    wait_for(done, timeout, f"{len(ids)} jobs to finish", interval=0.05)


def test_notify_wakes_an_idle_worker_at_once(service: Service, conn: psycopg.Connection) -> None:
    service.write_settings({**JOBS, "neurondb.neuranq_naptime": "60s"})
    service.cli("reload")
    time.sleep(0.3)
    job_id = queue.enqueue(conn, "test.noop")
    wait_finished(conn, [job_id], 1.0)   # far below the 60 s naptime: the NOTIFY woke it
    j = job(conn, job_id)
    assert j["status"] == "completed" and j["result"] == {"ok": True}
    assert (j["started_at"] - j["created_at"]).total_seconds() < 0.5


def test_retries_back_off_then_succeed(service: Service, conn: psycopg.Connection) -> None:
    service.write_settings({**JOBS, "neurondb.neuranq_retry_delay": "200ms"})
    service.cli("reload")
    job_id = queue.enqueue(conn, "test.fail", {"fail_times": 3}, max_retries=5)
    wait_finished(conn, [job_id], 10.0)
    j = job(conn, job_id)
    assert j["status"] == "completed" and j["result"] == {"attempt": 4} and j["retry_count"] == 3
    assert [a["error"] for a in j["attempts"]] == [f"planned failure {n}" for n in (1, 2, 3)]
    # delay before attempt n+1 = 200 ms * 2^(n-1) * uniform(0.5, 1): check each gap against its bounds.
    starts = [datetime.fromisoformat(a["started_at"]) for a in j["attempts"]] + [j["started_at"]]
    ends = [datetime.fromisoformat(a["finished_at"]) for a in j["attempts"]]
    for n, (end, nxt) in enumerate(zip(ends, starts[1:], strict=True), start=1):
        gap_ms = (nxt - end).total_seconds() * 1000
        step = 200 * 2 ** (n - 1)
        assert 0.5 * step - 5 <= gap_ms <= step + 250, f"retry {n}: waited {gap_ms:.0f} ms, step {step} ms"


def test_exhausted_retries_go_to_dead_letters_and_replay(service: Service, conn: psycopg.Connection) -> None:
    service.write_settings({**JOBS, "neurondb.neuranq_retry_delay": "10ms"})
    service.cli("reload")
    job_id = queue.enqueue(conn, "test.fail", {"fail_times": 2}, max_retries=1, tenant_id="acme")
    wait_finished(conn, [job_id], 10.0)
    j = job(conn, job_id)
    assert j["status"] == "failed" and j["error_message"] == "planned failure 2"
    failed = conn.execute("SELECT job_id, error_message, retry_count FROM neurondb.neurondb_job_queue "
                          "WHERE status = 'failed' ORDER BY created_at DESC LIMIT 20").fetchall()
    assert (job_id, "planned failure 2", 1) in failed      # the document's failed-jobs query shows it
    [dead] = queue.dlq_list(conn)
    assert dead["job_id"] == job_id and dead["tenant_id"] == "acme"
    attempts = conn.execute("SELECT attempts FROM neurondb.neurondb_dead_letter WHERE dlq_id = %s",
                            (dead["dlq_id"],)).fetchone()[0]
    assert [a["error"] for a in attempts] == ["planned failure 1", "planned failure 2"]

    out = service.cli("jobs", "dlq", "replay", "--tenant", "acme")
    assert "replayed 1 dead letters" in out.stdout
    [(_, new_id)] = conn.execute("SELECT dlq_id, replayed_job_id FROM neurondb.neurondb_dead_letter").fetchall()
    wait_finished(conn, [new_id], 10.0)
    assert job(conn, new_id)["tenant_id"] == "acme"
    assert queue.dlq_list(conn) == []


@pytest.mark.parametrize(("job_type", "payload", "message"), [
    ("no.such.type", {}, "unknown job type 'no.such.type'"),
    ("test.sleep", {"seconds": "long"}, "payload field 'seconds' must be a number, got str"),
    ("test.record", {}, "payload is missing 'file'"),
])
def test_bad_jobs_fail_at_once_without_retries(service: Service, conn: psycopg.Connection, job_type: str,
                                              payload: dict, message: str) -> None:
    bad = queue.enqueue(conn, job_type, payload, max_retries=5)
    good = queue.enqueue(conn, "test.noop")
    wait_finished(conn, [bad, good], 5.0)
    j = job(conn, bad)
    assert (j["status"], j["retry_count"]) == ("failed", 0)
    assert j["error_message"].startswith(message), j["error_message"]
    assert job(conn, good)["status"] == "completed"
    assert service.worker("neuranq").restarts == 0


def test_payload_that_is_not_an_object_fails_clearly(service: Service, conn: psycopg.Connection) -> None:
    [job_id] = conn.execute("INSERT INTO neurondb.neurondb_job_queue (job_type, payload) "
                            "VALUES ('test.noop', '[1, 2]') RETURNING job_id").fetchone()
    wait_finished(conn, [job_id], 5.0)
    assert job(conn, job_id)["error_message"] == "payload must be a JSON object, got list"


@pytest.mark.parametrize("service", [{**JOBS, "neurondb.neuranq_timeout": "300ms"}], indirect=True)
def test_overrunning_job_is_stopped(service: Service, conn: psycopg.Connection) -> None:
    t0 = time.monotonic()
    job_id = queue.enqueue(conn, "test.sleep", {"seconds": 30}, max_retries=0)
    wait_finished(conn, [job_id], 5.0)
    assert time.monotonic() - t0 < 3.0
    j = job(conn, job_id)
    assert j["status"] == "failed" and "exceeded neurondb.neuranq_timeout (300 ms)" in j["error_message"]


def test_dedupe_merges_pending_duplicates(conn: psycopg.Connection) -> None:
    first = queue.enqueue(conn, "test.noop", {"n": 1}, dedupe_key="k", priority=1)
    second = queue.enqueue(conn, "test.noop", {"n": 2}, dedupe_key="k", priority=5)
    other = queue.enqueue(conn, "test.noop", {"n": 3}, dedupe_key="other")
    assert first == second != other
    j = job(conn, first)
    assert j["payload"] == {"n": 1} and j["priority"] == 5


def test_queue_depth_bound_rejects_and_keeps_existing(conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO neurondb.neurondb_settings (name, setting, short_desc, context, vartype, source)"
                 " VALUES ('neurondb.neuranq_queue_depth', '100', 'test', 'sighup', 'integer', 'test')")
    queue.enqueue_many(conn, "test.noop", [{}] * 90)
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="queue is full: 140 pending jobs exceed"):
        queue.enqueue_many(conn, "test.noop", [{}] * 50)
    assert conn.execute("SELECT count(*) FROM neurondb.neurondb_job_queue").fetchone()[0] == 90


def test_cancel_and_retry(service: Service, conn: psycopg.Connection) -> None:
    later = queue.enqueue(conn, "test.noop", run_at=datetime.fromisoformat("2100-01-01T00:00:00+00:00"))
    assert "cancelled" in service.cli("jobs", "cancel", str(later)).stdout
    j = job(conn, later)
    assert j["status"] == "cancelled" and j["error_message"].startswith("cancelled by")
    assert service.cli("jobs", "cancel", str(later), check=False).returncode == 1
    service.cli("jobs", "retry", str(later))
    conn.execute("UPDATE neurondb.neurondb_job_queue SET run_at = now() WHERE job_id = %s", (later,))
    wait_finished(conn, [later], 5.0)
    assert job(conn, later)["status"] == "completed"


def test_effects_commit_only_with_completion(service: Service, conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE public.test_effects (job_id bigint PRIMARY KEY)")
    ids = queue.enqueue_many(conn, "test.effect", [{}] * 20)
    wait_finished(conn, ids, 5.0)
    assert conn.execute("SELECT count(*) FROM public.test_effects").fetchone()[0] == 20
    # The same job completing twice would violate the primary key: effects ran exactly once each.


def test_killed_worker_jobs_come_back_at_once(service: Service, conn: psycopg.Connection) -> None:
    job_id = queue.enqueue(conn, "test.sleep", {"seconds": 30, "attempts": 1})
    wait_for(lambda: job(conn, job_id)["status"] == "processing", 5.0, "the job to start")
    os.kill(service.worker("neuranq").pid, signal.SIGKILL)
    wait_finished(conn, [job_id], 5.0)       # far below the 120 s lease: the supervisor handed it back
    j = job(conn, job_id)
    assert j["status"] == "completed" and j["retry_count"] == 1
    assert "terminated by signal 9" in j["attempts"][0]["error"]


FAIR = {**JOBS, "neurondb.neuranq_batch_size": "50", "neurondb.neuranq_queue_depth": "20000"}


@pytest.mark.parametrize("service", [FAIR], indirect=True)
def test_fairness_across_tenants(service: Service, conn: psycopg.Connection) -> None:
    """Tenant A floods 10,000 jobs, then B adds 100: B's all finish before half of A's backlog is done."""
    service.write_settings({**FAIR, "neurondb.neuranq_enabled": "off"})
    service.cli("reload")
    a = queue.enqueue_many(conn, "test.noop", [{}] * 10_000, tenant_id="A")
    b = queue.enqueue_many(conn, "test.noop", [{}] * 100, tenant_id="B")
    service.write_settings(FAIR)
    service.cli("reload")
    wait_finished(conn, b, 60.0)
    b_last = conn.execute("SELECT max(completed_at) FROM neurondb.neurondb_job_queue WHERE job_id = ANY(%s)",
                          (b,)).fetchone()[0]
    a_done = conn.execute("SELECT count(*) FROM neurondb.neurondb_job_queue WHERE job_id = ANY(%s) "
                          "AND status = 'completed' AND completed_at <= %s", (a, b_last)).fetchone()[0]
    assert a_done < 5_000, f"A completed {a_done} jobs before B's last"
    per_tenant = dict(conn.execute(
        "SELECT tenant_id, count(*) FROM neurondb.neurondb_job_queue WHERE status = 'completed' GROUP BY tenant_id"
    ).fetchall())
    assert per_tenant["B"] == 100


def test_rate_limit_per_tenant(service: Service, conn: psycopg.Connection) -> None:
    """A tenant limited to 50 jobs/s completes 50 +- 10% per second over 10 s; others are not held up."""
    conn.execute("INSERT INTO neurondb.neurondb_tenants (tenant_id, rate_limit, burst) VALUES ('slow', 50, 5)")
    time.sleep(5.5)   # the worker refreshes tenant limits every 5 s
    slow = queue.enqueue_many(conn, "test.noop", [{}] * 1000, tenant_id="slow")
    fast = queue.enqueue_many(conn, "test.noop", [{}] * 500, tenant_id="fast")
    wait_finished(conn, fast, 10.0)
    time.sleep(1.0)
    window = 10.0
    count = "SELECT count(*) FROM neurondb.neurondb_job_queue WHERE job_id = ANY(%s) AND status = 'completed'"
    before = conn.execute(count, (slow,)).fetchone()[0]
    time.sleep(window)
    rate = (conn.execute(count, (slow,)).fetchone()[0] - before) / window
    assert 45 <= rate <= 55, f"slow tenant ran {rate:.1f} jobs/s, limit 50"


CHAOS = {**JOBS, "neurondb.worker_max_crashes": "1000", "neurondb.worker_crash_window": "1s",
         "neurondb.neuranq_queue_depth": "20000"}


@pytest.mark.parametrize("service", [CHAOS], indirect=True)
def test_chaos_sigkill_loses_no_job(service: Service, conn: psycopg.Connection, tmp_path: Path) -> None:
    """10,000 jobs while neuranq is SIGKILLed 10 times at random moments: every job completes, none stays
    processing, and the outside side effect ran at most 10,000 + 10 x batch size times."""
    effects = tmp_path / "effects.log"
    ids: list[int] = []
    for _ in range(10):   # 0.5 ms of work per job: the backlog lasts several seconds, long enough for 10 kills
        ids += queue.enqueue_many(conn, "test.record", [{"file": str(effects), "seconds": 0.0005}] * 1000)
    kills = 0
    stop = threading.Event()

    def killer() -> None:
        nonlocal kills
        rng = random.Random(7)
        while kills < 10 and not stop.is_set():
            time.sleep(rng.uniform(0.1, 0.4))
            pid = service.worker("neuranq").pid
            if pid:
                os.kill(pid, signal.SIGKILL)
                kills += 1

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        wait_finished(conn, ids, 120.0)
    finally:
        stop.set()
        thread.join()
    statuses = dict(conn.execute("SELECT status, count(*) FROM neurondb.neurondb_job_queue GROUP BY status"))
    assert statuses == {"completed": 10_000}, statuses
    runs = len(effects.read_text().splitlines())
    assert 10_000 <= runs <= 10_000 + kills * 100, f"{runs} runs after {kills} kills"
    assert kills == 10, f"the queue drained after {kills} kills"


def test_document_queue_queries_and_status_counts(service: Service, conn: psycopg.Connection,
                                                  document_text: str) -> None:
    """The document's 'check queue status' and 'per-tenant metrics' queries, and `neurondb status`, agree
    with what ran."""
    ok = queue.enqueue_many(conn, "test.noop", [{}] * 30, tenant_id="t1")
    ok += queue.enqueue_many(conn, "test.noop", [{}] * 20, tenant_id="t2")
    bad = queue.enqueue_many(conn, "test.fail", [{}] * 5, tenant_id="t2", max_retries=0)
    wait_finished(conn, ok + bad, 10.0)
    queries = [q for q in document_statements(document_text) if "neurondb_job_queue" in q and "GROUP BY" in q]
    by_status, per_tenant = (conn.execute(q).fetchall() for q in queries)
    assert dict(by_status) == {"completed": 50, "failed": 5}
    assert {t: n for t, n, _ in per_tenant} == {"t1": 30, "t2": 20}
    assert all(avg is not None and avg >= 0 for _, _, avg in per_tenant)
    status = orjson.loads(service.cli("status", "--json").stdout)
    assert status["queue"] == {"completed": 50, "failed": 5}
    tenants = {t["tenant"]: t for t in status["tenants"]}
    assert (tenants["t1"]["processed"], tenants["t2"]["processed"], tenants["t2"]["failed"]) == (30, 20, 5)


def test_builtin_job_types(service: Service, conn: psycopg.Connection) -> None:
    """embed, rerank, cache_refresh and http_call end to end through the real worker."""
    from tests.fakeprovider import FakeProvider

    conn.execute("SELECT neurondb.create_index('docs', 384)")
    texts = {"a": "the cat sat on the mat", "b": "stock markets fell sharply", "c": "a kitten on a rug"}
    embed = queue.enqueue(conn, "embed", {"index": "docs", "documents": [
        {"doc_id": k, "text": v, "metadata": {"n": i}} for i, (k, v) in enumerate(texts.items())]},
        tenant_id="acme")
    bad_index = queue.enqueue(conn, "embedding", {"index": "nope", "doc_id": "x", "text": "t"})
    rerank = queue.enqueue(conn, "rerank", {"query": "cat on a mat",
                                            "documents": [{"id": "b", "text": texts["b"]}, texts["a"]]})
    conn.execute("INSERT INTO neurondb.neurondb_llm_cache (cache_key, operation, provider, model_name, result_text,"
                 " created_at) VALUES ('old', 'completion', 'local', 'm', 'x', now() - interval '2 days'),"
                 " ('new', 'completion', 'local', 'm', 'y', now())")
    refresh = queue.enqueue(conn, "cache_refresh", {"cache": "llm", "older_than": 86400})
    with FakeProvider(dim=8) as server:
        refused = queue.enqueue(conn, "http_call", {"url": f"{server.url}/v1/models"})
        wait_finished(conn, [embed, bad_index, rerank, refresh, refused], 20.0)
        service.write_settings({**JOBS, "neurondb.http_allowlist": "127.0.0.1"})
        service.cli("reload")
        allowed = queue.enqueue(conn, "http_call", {"url": f"{server.url}/redirect?to=/v1/models"})
        wait_finished(conn, [allowed], 10.0)

    assert job(conn, embed)["status"] == "completed", job(conn, embed)["error_message"]
    rows = conn.execute("SELECT doc_id, tenant_id, cardinality(embedding), metadata->>'n' FROM "
                        "neurondb.neurondb_vectors ORDER BY doc_id").fetchall()
    assert rows == [("a", "acme", 384, "0"), ("b", "acme", 384, "1"), ("c", "acme", 384, "2")]
    j = job(conn, bad_index)
    assert (j["status"], j["retry_count"]) == ("failed", 0) and "index 'nope' does not exist" in j["error_message"]
    ranking = job(conn, rerank)["result"]["ranking"]
    assert [r["id"] for r in ranking] == [1, "b"]
    assert job(conn, refresh)["status"] == "completed"
    assert [r[0] for r in conn.execute("SELECT cache_key FROM neurondb.neurondb_llm_cache")] == ["new"]
    j = job(conn, refused)
    assert (j["status"], j["retry_count"]) == ("failed", 0)
    assert "refused: 127.0.0.1" in j["error_message"] and "neurondb.http_allowlist" in j["error_message"]
    j = job(conn, allowed)
    assert j["status"] == "completed", j["error_message"]
    assert j["result"]["status"] == 200


@pytest.mark.parametrize("service", [{**JOBS, "neurondb.neuranq_workers": "2", "neurondb.neuranq_batch_size": "20"}],
                         indirect=True)
def test_two_queue_processes_never_run_a_job_twice(service: Service, conn: psycopg.Connection,
                                                   tmp_path: Path) -> None:
    """Two neuranq processes claim from one queue: with no crash, every job runs exactly once, and both
    processes take part."""
    assert [w.name for w in service.status().workers if w.kind == "neuranq"] == ["neuranq", "neuranq-2"]
    effects = tmp_path / "runs.log"
    ids = queue.enqueue_many(conn, "test.record", [{"file": str(effects), "seconds": 0.001}] * 2000)
    wait_finished(conn, ids, 60.0)
    runs = effects.read_text().split()
    assert len(runs) == len(set(runs)) == 2000
    owners = dict(conn.execute("SELECT split_part(lease_owner, ':', 2), count(*) FROM neurondb.neurondb_job_queue "
                               "GROUP BY 1").fetchall())
    assert len(owners) == 2 and min(owners.values()) > 100, owners


@pytest.mark.parametrize("service", [{**JOBS, "neurondb.job_retention": "3s"}], indirect=True)
def test_retention_removes_old_finished_jobs(service: Service, conn: psycopg.Connection) -> None:
    done = queue.enqueue_many(conn, "test.noop", [{}] * 50)
    later = queue.enqueue(conn, "test.noop", run_at=datetime.fromisoformat("2100-01-01T00:00:00+00:00"))
    wait_finished(conn, done, 10.0)
    wait_for(lambda: conn.execute("SELECT count(*) FROM neurondb.neurondb_job_queue WHERE job_id = ANY(%s)",
                                  (done,)).fetchone()[0] == 0, 15.0, "retention to remove finished jobs")
    assert job(conn, later)["status"] == "pending"       # unfinished jobs are never touched


def test_claim_commits_async_and_leaves_completions_durable(conn: psycopg.Connection) -> None:
    """The claim turns synchronous_commit off for its own transaction only: the worker's completions on
    the same connection still wait for their commit to be durable."""
    ids = queue.enqueue_many(conn, "test.noop", [{}] * 3)
    rows = conn.execute(query("queue", "claim"), {"batch": 10, "owner": "h:1", "lease_ms": 60000.0, "salt": "s",
                                                  "capped": [], "caps": []}).fetchall()
    assert sorted(r[0] for r in rows) == ids
    assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
    done = orjson.dumps([[i, {"n": i}] for i in ids]).decode()
    assert {r[0] for r in conn.execute(query("queue", "complete"), {"owner": "h:1", "done": done})} == set(ids)
    assert [job(conn, i)["result"] for i in ids] == [{"n": i} for i in ids]
