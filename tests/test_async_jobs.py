"""neuranq's async lane against the real service: async and blocking handlers side by side, per-type caps,
timeouts that cancel, SIGKILL with many jobs in flight, fairness between tenants, SSRF checks mid-flight."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

from neurondb import queue
from neurondb.jobs.coalesce import Coalescer
from neurondb.providers import HashEmbedder, ProviderError
from tests.service import Service, wait_for
from tests.test_metrics import until
from tests.test_queue import JOBS, job, wait_finished

ASYNC = {**JOBS, "neurondb.neuranq_concurrency": "16"}


@pytest.fixture
def service(tmp_path: Path, fresh_dsn: str, request: pytest.FixtureRequest) -> Iterator[Service]:
    svc = Service(tmp_path / "data", fresh_dsn, {**ASYNC, **getattr(request, "param", {})})
    svc.start()
    try:
        yield svc
    finally:
        svc.close()


def paused(service: Service, off: bool, **settings: str) -> None:
    """Queue workers off (to queue a backlog that one claim sees whole) or on again."""
    service.write_settings({**ASYNC, **settings, "neurondb.neuranq_enabled": "off" if off else "on"})
    service.cli("reload")


def spans(conn: psycopg.Connection, ids: list[int]) -> list[tuple[float, float]]:
    """(started, completed) of each job, in seconds since the epoch."""
    return [(float(a), float(b)) for a, b in conn.execute(
        "SELECT extract(epoch FROM started_at), extract(epoch FROM completed_at) "
        "FROM neurondb.neurondb_job_queue WHERE job_id = ANY(%s) ORDER BY job_id", (ids,))]


def starts(path: Path) -> list[tuple[int, int]]:
    """The (job_id, in flight) lines the test handlers write as they start."""
    if not path.exists():
        return []
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]   # type: ignore[misc]


def test_async_and_blocking_handlers_side_by_side(service: Service, conn: psycopg.Connection) -> None:
    """40 async jobs of 0.5 s and 4 blocking ones of 0.5 s: the async ones run 16 at a time while the
    blocking ones run one by one beside them. In turn they would take 22 s."""
    paused(service, True)
    blocking = queue.enqueue_many(conn, "test.sleep", [{"seconds": 0.5}] * 4)
    concurrent = queue.enqueue_many(conn, "test.async_sleep", [{"seconds": 0.5}] * 40)
    t0 = time.monotonic()
    paused(service, False)
    wait_finished(conn, blocking + concurrent, 20.0)
    elapsed = time.monotonic() - t0
    assert all(job(conn, i)["status"] == "completed" for i in blocking + concurrent)
    assert elapsed < 8.0, f"44 jobs of 0.5 s took {elapsed:.1f} s"
    # At least 8 async jobs ran at the same moment (16 slots; the first claim brings 44 jobs).
    async_spans = spans(conn, concurrent)
    peak = max(sum(a <= t < b for a, b in async_spans) for t, _ in async_spans)
    assert peak >= 8, f"at most {peak} async jobs ran at once"
    # A blocking job ran while async ones did: the lane does not wait for the main thread.
    b0, b1 = spans(conn, blocking)[0]
    assert any(a < b1 and b > b0 for a, b in async_spans), "no async job overlapped the first blocking one"


def test_per_type_cap_holds(service: Service, conn: psycopg.Connection, tmp_path: Path) -> None:
    """test.async_capped declares concurrency=3 and test.async_sleep is capped at 2 by the setting: their
    handlers never see more of their type in flight, and the capped types do not hold back the others."""
    service.write_settings({**ASYNC, "neurondb.neuranq_type_concurrency": "test.async_sleep=2"})
    service.cli("reload")
    capped, limited = tmp_path / "capped", tmp_path / "limited"
    a = queue.enqueue_many(conn, "test.async_capped", [{"seconds": 0.2, "file": str(capped)}] * 12)
    b = queue.enqueue_many(conn, "test.async_sleep", [{"seconds": 0.2, "file": str(limited)}] * 8)
    c = queue.enqueue_many(conn, "test.noop", [{}] * 20)
    wait_finished(conn, a + b + c, 20.0)
    assert max(n for _, n in starts(capped)) == 3 and len(starts(capped)) == 12
    assert max(n for _, n in starts(limited)) == 2 and len(starts(limited)) == 8
    assert all(job(conn, i)["status"] == "completed" for i in a + b + c)
    noop_done = max(b for _, b in spans(conn, c))
    assert noop_done < max(b for _, b in spans(conn, a)), "the blocking no-ops waited for the capped type"


@pytest.mark.parametrize("service", [{**ASYNC, "neurondb.neuranq_timeout": "500ms",
                                      "neurondb.neuranq_retry_delay": "100ms"}], indirect=True)
def test_timeout_cancels_an_async_job_and_the_next_attempt_runs(service: Service, conn: psycopg.Connection) -> None:
    job_id = queue.enqueue(conn, "test.async_sleep", {"seconds": 30, "attempts": 1}, max_retries=2)
    others = queue.enqueue_many(conn, "test.async_sleep", [{"seconds": 0.1}] * 5)
    wait_finished(conn, [job_id, *others], 10.0)
    j = job(conn, job_id)
    assert (j["status"], j["retry_count"], j["result"]) == ("completed", 1, {"attempt": 2})
    assert "exceeded neurondb.neuranq_timeout (500 ms)" in j["attempts"][0]["error"]
    assert all(job(conn, i)["status"] == "completed" for i in others)


def test_sigkill_with_16_in_flight_loses_none(service: Service, conn: psycopg.Connection, tmp_path: Path) -> None:
    """SIGKILL neuranq while 16 async jobs run (and more wait in its lane): every job completes, none stays
    leased, and only the jobs that were running are charged an attempt."""
    log = tmp_path / "starts"
    ids = queue.enqueue_many(conn, "test.async_sleep", [{"seconds": 3, "attempts": 1, "file": str(log)}] * 40)
    wait_for(lambda: len(starts(log)) >= 16, 10.0, "16 async jobs to start")
    until(service, "neurondb_queue_jobs_in_flight", 16, worker="neuranq", type="test.async_sleep")
    assert service.worker("neuranq").in_flight == 16
    pid = service.worker("neuranq").pid
    os.kill(pid, signal.SIGKILL)
    wait_finished(conn, ids, 30.0)
    rows = conn.execute("SELECT status, retry_count FROM neurondb.neurondb_job_queue "
                        "WHERE job_id = ANY(%s)", (ids,)).fetchall()
    assert [r[0] for r in rows] == ["completed"] * 40
    charged = sum(r[1] for r in rows)
    started_before = {i for i, _ in starts(log)[:16]}
    assert 16 <= charged <= 16 + 2, f"{charged} attempts charged for 16 jobs running at the kill"
    assert all(job(conn, i)["retry_count"] == 1 for i in started_before)
    assert service.worker("neuranq").pid != pid


def test_fast_shutdown_hands_async_jobs_back_at_once(service: Service, conn: psycopg.Connection,
                                                     tmp_path: Path) -> None:
    """`stop -m fast` with 16 async jobs running and more waiting: the running ones are cancelled, and all
    go back to pending with no attempt counted, in far less than the jobs' 30 s."""
    log = tmp_path / "starts"
    ids = queue.enqueue_many(conn, "test.async_sleep", [{"seconds": 30, "file": str(log)}] * 24)
    wait_for(lambda: len(starts(log)) >= 16, 10.0, "16 async jobs to start")
    t0 = time.monotonic()
    service.cli("stop", "-m", "fast")
    assert time.monotonic() - t0 < 10.0
    rows = conn.execute("SELECT status, retry_count FROM neurondb.neurondb_job_queue WHERE job_id = ANY(%s)",
                        (ids,)).fetchall()
    assert rows == [("pending", 0)] * 24


@pytest.mark.parametrize("service", [{**ASYNC, "neurondb.neuranq_concurrency": "4",
                                      "neurondb.neuranq_batch_size": "20"}], indirect=True)
def test_tenants_share_concurrent_slots_fairly(service: Service, conn: psycopg.Connection) -> None:
    """Tenant A queues 60 async jobs, then B 20: with 4 slots, B's jobs do not wait behind A's backlog."""
    small = {"neurondb.neuranq_concurrency": "4", "neurondb.neuranq_batch_size": "20"}
    paused(service, True, **small)
    a = queue.enqueue_many(conn, "test.async_sleep", [{"seconds": 0.1}] * 60, tenant_id="A")
    b = queue.enqueue_many(conn, "test.async_sleep", [{"seconds": 0.1}] * 20, tenant_id="B")
    paused(service, False, **small)
    wait_finished(conn, a + b, 30.0)
    b_last = max(end for _, end in spans(conn, b))
    a_done_then = sum(end <= b_last for _, end in spans(conn, a))
    assert a_done_then <= 35, f"{a_done_then} of A's 60 jobs finished before B's last of 20"


def test_redirect_to_loopback_refused_mid_flight(service: Service, conn: psycopg.Connection) -> None:
    """An allowed host (127.0.0.2, allowlisted) that redirects to 127.0.0.1: the async http_call checks the
    redirect's target too and refuses it; the allowed request itself completes."""
    from tests.fakeprovider import FakeProvider

    service.write_settings({**ASYNC, "neurondb.http_allowlist": "127.0.0.2"})
    service.cli("reload")
    with FakeProvider(host="127.0.0.2") as allowed, FakeProvider() as internal:
        ok = queue.enqueue(conn, "http_call", {"url": f"{allowed.url}/v1/models"})
        bad = queue.enqueue(conn, "http_call", {"url": f"{allowed.url}/redirect?to={internal.url}/v1/models"},
                            max_retries=0)
        wait_finished(conn, [ok, bad], 10.0)
        assert internal.count() == 0
    assert job(conn, ok)["status"] == "completed" and job(conn, ok)["result"]["status"] == 200
    j = job(conn, bad)
    assert j["status"] == "failed" and "refused: 127.0.0.1" in j["error_message"], j["error_message"]


def test_embed_jobs_waiting_together_share_a_request(service: Service, conn: psycopg.Connection) -> None:
    """12 embed jobs against a remote provider answering after 200 ms go out in a few requests, not 12, and
    requests keep to the provider's rate limit."""
    from tests.fakeprovider import FakeProvider

    with FakeProvider(dim=8) as fake:
        fake.set_delay(200, "/v1/embeddings")
        conn.execute("SELECT neurondb.create_index('remote', 8, 'cosine', provider => 'openai', "
                     "model_name => 'emb-test')")
        remote = {"neurondb.llm_provider": "openai", "neurondb.llm_endpoint": fake.url}
        paused(service, True, **remote)
        before = fake.count("/v1/embeddings")
        ids = queue.enqueue_many(conn, "embed", [{"index": "remote", "doc_id": f"d{i}", "text": f"doc {i}"}
                                                 for i in range(12)])
        paused(service, False, **remote)
        wait_finished(conn, ids, 20.0)
        assert [job(conn, i)["status"] for i in ids] == ["completed"] * 12, [job(conn, i)["error_message"]
                                                                            for i in ids]
        requests = fake.count("/v1/embeddings") - before
        assert requests <= 4, f"{requests} requests for 12 jobs"
        # The provider's rate limit, shared with neuranllm: 6 requests in turn at 2 requests/s take >= 2.5 s.
        paused(service, False, **remote, **{"neurondb.llm_requests_per_second": "2"})
        t0 = time.monotonic()
        for i in range(6):
            one = queue.enqueue(conn, "embed", {"index": "remote", "doc_id": f"r{i}", "text": "x"})
            wait_finished(conn, [one], 10.0)
            assert job(conn, one)["status"] == "completed", job(conn, one)["error_message"]
        assert time.monotonic() - t0 >= 2.4
    stored = conn.execute("SELECT count(*) FROM neurondb.neurondb_vectors WHERE index_name = 'remote'").fetchone()[0]
    assert stored == 18


class PickyEmbedder(HashEmbedder):
    """A real embedder that refuses, as invalid input, any request containing the text "bad"."""

    def __init__(self) -> None:
        super().__init__(dim=8)
        self.requests: list[list[str]] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.requests.append(list(texts))
        if "bad" in texts:
            raise ProviderError("input 'bad' is not allowed", retryable=False, provider="picky")
        return super().embed(texts)


def test_a_shared_embedding_request_refused_as_invalid_is_retried_job_by_job() -> None:
    """Three jobs' texts wait together and go as one request; the provider refuses it for one text: each job's
    texts are sent alone, so the two good jobs get their vectors and only the bad one fails."""
    embedder = PickyEmbedder()

    async def three() -> list[object]:
        batcher = Coalescer()
        return await asyncio.gather(*(batcher.embed(embedder, texts, None, 64)
                                      for texts in (["one", "two"], ["bad"], ["three"])), return_exceptions=True)

    good1, bad, good2 = asyncio.run(three())
    assert embedder.requests == [["one", "two", "bad", "three"], ["one", "two"], ["bad"], ["three"]]
    np.testing.assert_array_equal(good1, HashEmbedder(dim=8).embed(["one", "two"]))
    np.testing.assert_array_equal(good2, HashEmbedder(dim=8).embed(["three"]))
    assert isinstance(bad, ProviderError) and "input 'bad' is not allowed" in str(bad)
