"""neuranllm against the real service and a real HTTP provider on 127.0.0.1 (tests/fakeprovider.py):
every operation in OpenAI and Ollama shapes, retries and their timing, failures, timeouts, dropped
connections, rate limits, the cache, a SIGKILLed worker, API keys kept secret, the document's queries."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import orjson
import psycopg
import pytest

from neurondb import llm, queue
from neurondb.shm import names
from neurondb.shm.buckets import Buckets, Claim
from neurondb.shm.control import SharedState
from tests.fakeprovider import FakeProvider
from tests.service import Service, wait_for
from tests.test_document_sql import document_statements

FINISHED = ("SELECT count(*) FROM neurondb.neurondb_llm_jobs WHERE job_id = ANY(%s) "
            "AND status IN ('completed', 'failed')")


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider(dim=8) as server:
        yield server


@pytest.fixture
def service(tmp_path: Path, fresh_dsn: str, fake: FakeProvider, request: pytest.FixtureRequest) -> Iterator[Service]:
    """The service with the fake provider as its OpenAI endpoint. A test's parameters add settings
    ("{fake}" stands for the fake's URL) and, under "env", environment variables."""
    param = dict(getattr(request, "param", {}))
    env = param.pop("env", None)
    settings = {"neurondb.llm_provider": "openai", "neurondb.llm_endpoint": fake.url, "neurondb.llm_model": "gpt-test",
                "neurondb.neuranllm_retry_delay": "200ms",
                **{k: v.replace("{fake}", fake.url) for k, v in param.items()}}
    svc = Service(tmp_path / "data", fresh_dsn, settings, env=env)
    svc.settings = settings   # type: ignore[attr-defined]
    svc.start()
    try:
        yield svc
    finally:
        svc.close()


def reload(service: Service, **changes: str) -> None:
    service.settings.update({f"neurondb.{k}": v for k, v in changes.items()})   # type: ignore[attr-defined]
    service.write_settings(service.settings)                                      # type: ignore[attr-defined]
    service.cli("reload")


def wait_done(conn: psycopg.Connection, ids: list[int], timeout: float) -> list[dict]:
    wait_for(lambda: conn.execute(FINISHED, (ids,)).fetchone()[0] == len(ids), timeout,
             f"{len(ids)} LLM jobs to finish", interval=0.02)
    return llm.wait(conn, ids, timeout=1)


def gaps_ms(job: dict) -> list[float]:
    """Time from the end of each failed attempt to the start of the next one, in ms."""
    ends = [datetime.fromisoformat(a["finished_at"]) for a in job["attempts"]]
    starts = [datetime.fromisoformat(a["started_at"]) for a in job["attempts"][1:]] + [job["started_at"]]
    return [(s - e).total_seconds() * 1000 for e, s in zip(ends, starts, strict=True)]


# -- the shared-memory buckets, without a service -------------------------------------------------------------

@pytest.fixture
def buckets(tmp_path: Path) -> Iterator[Buckets]:
    prefix = names.instance_prefix(tmp_path)
    shared = SharedState.create(prefix, n_slots=1)
    b = Buckets.open(shared)
    try:
        yield b
    finally:
        b.close()
        shared.unlink()
        shared.close()
        names.unlink_all(prefix)


def test_buckets_take_all_or_nothing_and_refill(buckets: Buckets) -> None:
    rps, tenant = Claim("rps:p", 1, rate=10, capacity=2), Claim("rps:p:t", 1, rate=5, capacity=1)
    t = 1000.0
    assert buckets.take([rps, tenant], t) == 0          # full buckets to start with
    wait = buckets.take([rps, tenant], t)               # the tenant's bucket is empty: nothing is taken
    assert wait == pytest.approx(0.2)
    assert buckets.peek([rps], t) == 0                  # ... so the provider's still has its token
    assert buckets.take([rps, tenant], t + 0.2) == 0
    assert buckets.take([Claim("tpm:p", 500, 10, 100)], t) == 0      # a cost above capacity: from full only
    assert buckets.take([Claim("tpm:p", 1, 10, 100)], t) == pytest.approx(40.1)   # ... and it left a debt
    other = Buckets.open(buckets.shared)                 # another process's view: the same table
    assert other.take([rps], t + 0.2) == 0 and other.take([rps], t + 0.2) > 0
    other.close()


def test_buckets_429_halves_then_recovers(buckets: Buckets) -> None:
    t = 50.0
    assert buckets.factor("openai", t) == 1.0
    assert buckets.throttle("openai", retry_after=2.0, now=t) == 0.5
    assert buckets.throttle("openai", now=t + 0.1) == pytest.approx(0.505)   # one burst's 429s count once
    assert buckets.paused("openai", t + 1) == pytest.approx(1.0)
    assert buckets.throttle("openai", now=t + 1.5) == pytest.approx(0.2875)   # 0.5 + 1.5 * 0.05, halved
    assert buckets.factor("openai", t + 1.5 + 4) == pytest.approx(0.4875)
    assert buckets.factor("openai", t + 100) == 1.0
    assert buckets.factor("ollama", t) == 1.0 and buckets.paused("ollama", t) == 0


# -- submitting ----------------------------------------------------------------------------------------------

def test_submit_checks_inputs_and_accepts_aliases(conn: psycopg.Connection) -> None:
    a = llm.submit(conn, "complete", "m", "hi", parameters={"max_tokens": 3})
    b = conn.execute("SELECT neurondb.llm_submit('embed', input_texts => ARRAY['x', 'y'])").fetchone()[0]
    c = conn.execute("SELECT neurondb.llm_submit('rerank', NULL, 'q', documents => ARRAY['d'])").fetchone()[0]
    ids = llm.submit_many(conn, "embedding", ["one", {"input_text": "two", "tenant_id": "acme"}], priority=3)
    rows = conn.execute("SELECT job_id, operation, tenant_id, priority FROM neurondb.neurondb_llm_jobs ORDER BY job_id"
                        ).fetchall()
    assert rows == [(a, "completion", "default", 0), (b, "embedding", "default", 0), (c, "reranking", "default", 0),
                    (ids[0], "embedding", "default", 3), (ids[1], "embedding", "acme", 3)]
    for args, message in [
        (("summarise", None, "x"), 'unknown LLM operation "summarise"'),
        (("completion", None, None), "a completion job needs input_text"),
        (("rerank", None, "q"), "a reranking job needs input_text (the query) and documents"),
    ]:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=message.replace("(", r"\(").replace(")", r"\)")):
            llm.submit(conn, *args)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="either input_text or input_texts"):
        llm.submit_many(conn, "embedding", ["fine", {"input_texts": ["a"], "input_text": "b"}])
    assert conn.execute("SELECT count(*) FROM neurondb.neurondb_llm_jobs").fetchone()[0] == 5   # nothing half-done


# -- every operation, end to end ------------------------------------------------------------------------------

OLLAMA = {"neurondb.llm_provider": "ollama", "neurondb.llm_model": "llama3.2",
          "neurondb.llm_routes": "rerank-*=cohere@{fake}, bm25=local, hash-16=local"}


@pytest.mark.parametrize("service", [{"neurondb.llm_routes": "rerank-*=vllm@{fake}, bm25=local, hash-16=local"},
                                     OLLAMA], indirect=True, ids=["openai", "ollama"])
def test_every_operation_end_to_end(service: Service, conn: psycopg.Connection, fake: FakeProvider) -> None:
    shape = service.settings["neurondb.llm_provider"]   # type: ignore[attr-defined]
    with conn.transaction():   # committed together: the worker sees (and batches) them together
        complete = llm.submit(conn, "completion", None, "say hello please", system_prompt="be brief",
                              parameters={"max_tokens": 3, "temperature": 0})
        embed = llm.submit(conn, "embedding", None, "the cat sat")
        embed_many = llm.submit(conn, "embed", None, input_texts=["a dog", "a cat", "the cat sat"])
        rerank = llm.submit(conn, "reranking", "rerank-english", "cat mat",
                            documents=["a dog barks", "the cat on the mat", "a cat"], parameters={"top_n": 2})
        local_embed = llm.submit(conn, "embedding", "hash-16", "offline text")
        local_rerank = llm.submit(conn, "reranking", "bm25", "cat", documents=["dog", "cat cat"])
    c, e, em, r, le, lr = wait_done(conn, [complete, embed, embed_many, rerank, local_embed, local_rerank], 15)

    assert all(j["status"] == "completed" for j in (c, e, em, r, le, lr)), [j["error_message"] for j in (c, e, em, r)]
    assert (c["result_text"], c["provider"], c["prompt_tokens"], c["completion_tokens"]) == \
        ("echo: say hello", shape, 5, 3)   # max_tokens 3 cut "echo: say hello please"; 2 + 3 words of prompt
    assert c["latency_ms"] > 0 and not c["cache_hit"]
    assert np.allclose(e["result_vector"], fake.vectors(["the cat sat"])[0], atol=1e-6)
    assert np.allclose(em["result_json"], fake.vectors(["a dog", "a cat", "the cat sat"]), atol=1e-6)
    assert em["result_vector"] is None and em["prompt_tokens"] == 7 and e["provider"] == shape
    assert [(x["index"], x["doc"]) for x in r["result_json"]] == [(1, "the cat on the mat"), (2, "a cat")]
    assert r["result_json"][0]["score"] == 1.0 and r["provider"] == ("vllm" if shape == "openai" else "cohere")
    assert (le["provider"], len(le["result_vector"])) == ("local", 16)
    assert [x["index"] for x in lr["result_json"]] == [1, 0] and lr["provider"] == "local"

    paths = {q.path for q in fake.requests}
    if shape == "openai":
        assert paths == {"/v1/chat/completions", "/v1/embeddings", "/v1/rerank"}
    else:
        assert paths == {"/api/chat", "/api/embed", "/v1/rerank"}
    chat = next(q.json for q in fake.requests if "chat" in q.path)
    assert chat["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "say hello please"}]
    # The two embedding jobs travelled in one request (the worker batches texts of one model and tenant).
    assert sum(1 for q in fake.requests if "embed" in q.path) == 1

    if shape == "openai":   # the command line, once
        out = service.cli("llm", "submit", "complete", "from the shell", "--params", '{"max_tokens": 2}', "--wait")
        job = orjson.loads(out.stdout)
        assert (job["status"], job["result_text"]) == ("completed", "echo: from")
        shown = orjson.loads(service.cli("llm", "show", str(job["job_id"])).stdout)
        assert shown["result_text"] == "echo: from"
        listed = orjson.loads(service.cli("llm", "list", "--operation", "embed", "--json").stdout)
        assert {j["job_id"] for j in listed} == {embed, embed_many, local_embed}
        bad = service.cli("llm", "submit", "rerank", "q", check=False)
        assert bad.returncode == 1 and "needs input_text (the query) and documents" in bad.stderr


# -- failures --------------------------------------------------------------------------------------------------

def test_retries_back_off_with_full_jitter_and_honour_retry_after(service: Service, conn: psycopg.Connection,
                                                                  fake: FakeProvider) -> None:
    """retry_delay 200 ms: the wait before attempt n+1 is uniform in [0, 200 * 2^(n-1)] ms, or the
    server's Retry-After when it sends one; nothing waits for the naptime."""
    cases = [(429, None, 2), (500, None, 2), (429, 1, 1)]
    for status, retry_after, times in cases:
        fake.fail(status, times=times, retry_after=retry_after)
        job_id = llm.submit(conn, "completion", None, f"retry {status} {retry_after}")
        [job] = wait_done(conn, [job_id], 15)
        assert (job["status"], job["retry_count"], job["result_text"]) == \
            ("completed", times, f"echo: retry {status} {retry_after}")
        assert all(f"HTTP {status}" in a["error"] for a in job["attempts"]), job["attempts"]
        for n, gap in enumerate(gaps_ms(job), start=1):
            if retry_after:
                assert 1000 - 5 <= gap <= 1000 + 400, f"{status}: waited {gap:.0f} ms, Retry-After 1 s"
            else:
                assert -5 <= gap <= 200 * 2 ** (n - 1) + 300, f"{status} retry {n}: waited {gap:.0f} ms"
    assert fake.count() == 2 + 1 + 2 + 1 + 1 + 1


def test_non_retryable_errors_fail_at_once_with_the_message(service: Service, conn: psycopg.Connection,
                                                           fake: FakeProvider) -> None:
    fake.fail(400, message="Invalid 'messages[0].content': string too long.", code="string_above_max_length")
    bad = llm.submit(conn, "completion", None, "x", max_retries=5)
    [job] = wait_done(conn, [bad], 10)
    assert (job["status"], job["retry_count"]) == ("failed", 0)
    assert job["error_message"] == "openai: HTTP 400: Invalid 'messages[0].content': string too long."
    before = fake.count()
    bad_param = llm.submit(conn, "completion", None, "x", parameters={"temprature": 0.5})
    conn.execute("INSERT INTO neurondb.neurondb_llm_jobs (operation, input_text) VALUES ('rerank', 'q')")
    plain = conn.execute("SELECT max(job_id) FROM neurondb.neurondb_llm_jobs").fetchone()[0]
    p, q = wait_done(conn, [bad_param, plain], 10)
    assert p["status"] == "failed" and "unknown parameter 'temprature'" in p["error_message"]
    assert q["status"] == "failed" and "needs input_text (the query) and documents" in q["error_message"]
    assert fake.count() == before      # neither reached the provider


@pytest.mark.parametrize("service", [{"neurondb.neuranllm_timeout": "500ms"}], indirect=True)
def test_timeout_and_dropped_connection(service: Service, conn: psycopg.Connection, fake: FakeProvider) -> None:
    fake.set_delay(3000)
    slow = llm.submit(conn, "completion", None, "slow", max_retries=0)
    [job] = wait_done(conn, [slow], 10)
    assert job["status"] == "failed" and "timed out after 0.5s" in job["error_message"]
    assert 450 <= job["latency_ms"] <= 1500
    fake.set_delay(0)
    fake.drop(1)
    dropped = llm.submit(conn, "embedding", None, "dropped")
    [job] = wait_done(conn, [dropped], 10)
    assert (job["status"], job["retry_count"]) == ("completed", 1)
    assert "disconnected without sending a response" in job["attempts"][0]["error"]


# -- rate limits -----------------------------------------------------------------------------------------------

@pytest.fixture
def small_tenant(fresh_dsn: str) -> str:
    """A tenant allowed a quarter of the provider limits; the row exists before the service starts."""
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        c.execute("INSERT INTO neurondb.neurondb_tenants (tenant_id, llm_share) VALUES ('small', 0.25)")
    return "small"


@pytest.mark.parametrize("service", [{"neurondb.llm_requests_per_second": "20"}], indirect=True)
def test_rate_limit_tenant_share_and_429(small_tenant: str, service: Service, conn: psycopg.Connection,
                                         fake: FakeProvider) -> None:
    """20 requests/s is held within 10%; the tenant with a 0.25 share gets 5/s of it while the other takes
    the rest (its jobs are not held up behind the throttled tenant's backlog); a 429 halves the rate."""
    ids = llm.submit_many(conn, "completion", [f"small {i}" for i in range(150)], tenant_id=small_tenant)
    ids += llm.submit_many(conn, "completion", [f"prompt {i}" for i in range(300)])
    wait_for(lambda: fake.count() > 0, 5, "the first request")
    time.sleep(1.0)
    r0, t0 = len(fake.requests), time.monotonic()
    time.sleep(5.0)
    window = fake.requests[r0:]
    seconds = time.monotonic() - t0
    rate = len(window) / seconds
    small = sum(1 for q in window if q.json["messages"][-1]["content"].startswith("small")) / seconds
    assert 18 <= rate <= 22, f"{rate:.1f} requests/s, limit 20"
    assert 4 <= small <= 6, f"tenant small made {small:.1f} requests/s, its share is 5"

    fake.fail(429)                     # one 429: the rate halves, then grows back (AIMD, shared memory)
    wait_for(lambda: conn.execute("SELECT count(*) FROM neurondb.neurondb_llm_jobs WHERE retry_count > 0"
                                  ).fetchone()[0] > 0, 5, "the 429")
    c1, t1 = fake.count(), time.monotonic()
    time.sleep(2.0)
    slowed = (fake.count() - c1) / (time.monotonic() - t1)
    assert slowed < 14, f"{slowed:.1f} requests/s after a 429, expected about half of 20"
    conn.execute("DELETE FROM neurondb.neurondb_llm_jobs WHERE job_id = ANY(%s) AND status = 'pending'", (ids,))


# -- the cache ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("service", [{"neurondb.llm_cache_max_entries": "5"}], indirect=True)
def test_cache_hit_makes_no_request_bounded_and_expired_by_cache_refresh(service: Service, conn: psycopg.Connection,
                                                                         fake: FakeProvider) -> None:
    first = llm.submit(conn, "completion", None, "What is 2+2?", parameters={"temperature": 0})
    [a] = wait_done(conn, [first], 10)
    before = fake.count()
    again = llm.submit(conn, "complete", None, "  What is 2+2?\r\n", parameters={"temperature": 0})
    [b] = wait_done(conn, [again], 10)
    assert fake.count() == before                                # answered without a request
    assert (b["status"], b["cache_hit"], b["result_text"]) == ("completed", True, a["result_text"])
    assert (b["prompt_tokens"], b["completion_tokens"]) == (a["prompt_tokens"], a["completion_tokens"])
    other = llm.submit(conn, "completion", None, "What is 2+2?", parameters={"temperature": 1})   # other params
    [c] = wait_done(conn, [other], 10)
    assert not c["cache_hit"] and fake.count() == before + 1

    ids = llm.submit_many(conn, "embedding", [f"text {i}" for i in range(12)])
    wait_done(conn, ids, 10)
    count = "SELECT count(*) FROM neurondb.neurondb_llm_cache"
    wait_for(lambda: conn.execute(count).fetchone()[0] <= 5, 10, "the cache to be cut to its bound")

    refresh = queue.enqueue(conn, "cache_refresh", {"cache": "llm"})    # the queue worker's job type
    wait_for(lambda: queue.get(conn, refresh)["status"] == "completed", 10, "cache_refresh")
    assert conn.execute(count).fetchone()[0] == 0
    before = fake.count()
    after = llm.submit(conn, "completion", None, "What is 2+2?", parameters={"temperature": 0})
    [d] = wait_done(conn, [after], 10)
    assert not d["cache_hit"] and fake.count() == before + 1


# -- crashes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("service", [{"neurondb.neuranllm_concurrency": "8"}], indirect=True)
def test_worker_sigkilled_mid_flight_loses_no_job(service: Service, conn: psycopg.Connection,
                                                  fake: FakeProvider) -> None:
    fake.set_delay(1000)
    ids = llm.submit_many(conn, "completion", [f"job {i}" for i in range(20)])
    wait_for(lambda: fake.count() >= 8, 5, "8 calls in flight")
    os.kill(service.worker("neuranllm").pid, signal.SIGKILL)
    fake.set_delay(20)
    rows = wait_done(conn, ids, 20)
    assert [r["status"] for r in rows] == ["completed"] * 20
    assert [r["result_text"] for r in rows] == [f"echo: job {i}" for i in range(20)]
    interrupted = [r for r in rows if r["retry_count"]]
    assert len(interrupted) >= 8
    assert all("terminated by signal 9" in r["attempts"][0]["error"] for r in interrupted)


# -- secrets -------------------------------------------------------------------------------------------------

KEY = f"sk-neurondb-leakcheck-{uuid.uuid4().hex}"


@pytest.mark.parametrize("service", [{"env": {"NEURONDB_LLM_API_KEY": KEY}}], indirect=True)
def test_api_key_never_leaks(service: Service, conn: psycopg.Connection, fake: FakeProvider) -> None:
    fake.api_key = KEY
    ok = llm.submit(conn, "completion", None, "authorised")
    [job] = wait_done(conn, [ok], 10)
    assert job["status"] == "completed"
    assert fake.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    fake.api_key = "sk-some-other-key"          # now the server answers 401, quoting the key it was sent
    refused = llm.submit(conn, "completion", None, "refused")
    [job] = wait_done(conn, [refused], 10)
    assert job["status"] == "failed" and "Incorrect API key provided" in job["error_message"]
    assert "redacted" in job["error_message"]

    dump = conn.execute("SELECT string_agg(t::text, ' ') FROM neurondb.neurondb_llm_jobs t").fetchone()[0]
    dump += conn.execute("SELECT coalesce(string_agg(c::text, ' '), '') FROM neurondb.neurondb_llm_cache c"
                         ).fetchone()[0]
    status = service.cli("status", "--json").stdout
    shown = service.cli("llm", "show", str(refused)).stdout
    log = service.datadir.log_file.read_text()
    for where, text in (("the job table", dump), ("status --json", status), ("llm show", shown), ("the log", log)):
        assert KEY not in text and KEY[3:] not in text, f"the API key leaked into {where}"
    assert "Incorrect API key provided" in log   # the failure itself is logged, without the key


# -- the document's monitoring -----------------------------------------------------------------------------

def test_document_llm_queries_and_status_view(service: Service, conn: psycopg.Connection, fake: FakeProvider,
                                              document_text: str) -> None:
    ok = llm.submit_many(conn, "completion", [f"q {i}" for i in range(6)])
    ok += llm.submit_many(conn, "embedding", [f"e {i}" for i in range(4)])
    wait_done(conn, ok, 15)
    fake.fail(400, times=2, message="bad request")
    bad = [llm.submit(conn, "completion", None, f"bad {i}") for i in range(2)]
    wait_done(conn, bad, 10)
    cached = llm.submit_many(conn, "embedding", [f"e {i}" for i in range(3)])   # answered by the cache
    wait_done(conn, cached, 10)

    queries = [q for q in document_statements(document_text) if "neurondb_llm_jobs" in q]
    by_status, times, failed = (conn.execute(q).fetchall() for q in queries[:3])
    assert by_status == [("completion", "completed", 6), ("completion", "failed", 2), ("embedding", "completed", 7)]
    assert {op for op, _ in times} == {"completion", "embedding"} and all(s >= 0 for _, s in times)
    assert sorted(j for j, *_ in failed) == sorted(bad)
    assert all(op == "completion" and "bad request" in msg and retries == 0 for _, op, msg, retries in failed)

    view = {(op, st): (n, hits, tokens) for op, st, n, hits, tokens in conn.execute(
        "SELECT operation, status, jobs, cache_hits, tokens FROM neurondb.llm_job_status")}
    assert view[("completion", "completed")] == (6, 0, 6 * (2 + 3))    # "q i": 2 prompt words, "echo: q i": 3
    assert view[("embedding", "completed")][:2] == (7, 3)
    assert view[("completion", "failed")][:2] == (2, 0)
    status = orjson.loads(service.cli("status", "--json").stdout)
    assert status["llm_jobs"] == {"completed": 13, "failed": 2}
    assert next(w for w in status["workers"] if w["name"] == "neuranllm")["processed"] >= 13


def test_notify_wakes_the_worker_concurrency_and_disabling(service: Service, conn: psycopg.Connection,
                                                           fake: FakeProvider) -> None:
    """With a 60 s naptime a submitted job still starts at once; 32 calls of 300 ms at concurrency 16
    take about 2 x 300 ms, not 32 x 300 ms. Disabling the worker lets its calls in flight finish and
    hands back the jobs it had not started; enabling it again runs them."""
    reload(service, neuranllm_naptime="60s")
    time.sleep(0.6)
    fake.set_delay(300)
    started = time.monotonic()
    ids = llm.submit_many(conn, "completion", [f"p {i}" for i in range(32)])
    wait_done(conn, ids, 10)
    assert time.monotonic() - started < 2.5

    fake.set_delay(1000)
    ids = llm.submit_many(conn, "completion", [f"q {i}" for i in range(40)])
    wait_for(lambda: fake.count() >= 32 + 16, 5, "16 calls in flight")
    reload(service, neuranllm_enabled="off")
    statuses = "SELECT status, count(*) FROM neurondb.neurondb_llm_jobs WHERE job_id = ANY(%s) GROUP BY status"
    wait_for(lambda: dict(conn.execute(statuses, (ids,)).fetchall()).get("processing") is None, 5,
             "no job left processing")
    counts = dict(conn.execute(statuses, (ids,)).fetchall())
    assert counts["completed"] >= 16 and counts["completed"] + counts["pending"] == 40, counts
    fake.set_delay(0)
    reload(service, neuranllm_enabled="on")
    assert [r["status"] for r in wait_done(conn, ids, 10)] == ["completed"] * 40
