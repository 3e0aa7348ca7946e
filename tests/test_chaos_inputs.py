"""Bad input at every door (queue payloads, LLM jobs, index rows, search calls) and secrets in URLs.

Every bad input must get one line naming the field, the value (shortened) and what is allowed: in the
job's error_message, in the database error of an INSERT, in the SearchError of a search. No worker may
die of it and the good jobs around it must still complete. A URL's userinfo and query values must never
reach a job row or the log. Everything runs against the real service, a real PostgreSQL and a real HTTP
server on 127.0.0.1.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from neurondb import llm, queue
from neurondb.client import Client, SearchError
from neurondb.instance import Instance
from neurondb.paths import DataDir
from neurondb.redaction import redact_url, redact_urls
from tests.fakeprovider import FakeProvider
from tests.service import Service, wait_for

SECRET = "S3cretPW9"
FINISHED = "SELECT count(*) FROM neurondb.{table} WHERE job_id = ANY(%s) AND status IN ('completed', 'failed')"


@pytest.fixture
def service(tmp_path: Path, fresh_dsn: str, request: pytest.FixtureRequest) -> Iterator[Service]:
    svc = Service(tmp_path / "data", fresh_dsn, getattr(request, "param", {}))
    svc.start()
    try:
        yield svc
    finally:
        svc.close()


def wait_finished(conn: psycopg.Connection, ids: list[int], timeout: float, table: str = "neurondb_job_queue") -> None:
    sql = FINISHED.format(table=table)
    wait_for(lambda: conn.execute(sql, (ids,)).fetchone()[0] == len(ids), timeout, f"{len(ids)} jobs to finish",
             interval=0.05)


def restarts(service: Service) -> dict[str, int]:
    return {w.name: w.restarts for w in service.status().workers}


def assert_clear(message: str | None, field: str) -> None:
    """One line, no traceback, names the field."""
    assert message, "no message"
    assert "\n" not in message.strip() and "Traceback" not in message, message
    assert field in message, f"{field!r} not named in: {message}"
    assert "_check" not in message, message


def assert_clear_violation(exc: psycopg.Error, field: str) -> str:
    """A refused row: the error's first line is its one-line primary message (PostgreSQL adds a CONTEXT line
    naming the function that raised it), which names the column, also given in the COLUMN field."""
    message = exc.diag.message_primary or ""
    assert_clear(message, field)
    assert str(exc).splitlines()[0] == message and exc.diag.column_name == field
    return message


# -- defect 9: secrets in URLs --------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "shown"), [
    (f"http://alice:{SECRET}@localhost:1/a/b?token={SECRET}&x=1#frag-{SECRET}",
     "http://***@localhost:1/a/b?token=***&x=***"),
    (f"https://h.example/p?{SECRET}", "https://h.example/p?***"),
    (f"https://{SECRET}@h.example", "https://***@h.example"),
    (f"alice:{SECRET}@host/x", "***@host/x"),
    (f"http://alice:{SECRET}@[::1", "http://***@[::1"),
    ("https://h.example/plain", "https://h.example/plain"),
    ("", ""),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_urls_in_text() -> None:
    text = f"GET http://u:{SECRET}@h/x?k={SECRET} failed; redirect to 'https://h2/?sig={SECRET}'"
    assert redact_urls(text) == "GET http://***@h/x?k=*** failed; redirect to 'https://h2/?sig=***'"


@pytest.mark.parametrize("service", [{"neurondb.http_allowlist": "127.0.0.0/8"}], indirect=True)
def test_http_call_errors_and_log_hide_url_secrets(service: Service, conn: psycopg.Connection) -> None:
    with FakeProvider() as fake:
        with_secret = fake.url.replace("http://", f"http://alice:{SECRET}@")
        bad = [queue.enqueue(conn, "http_call", p, max_retries=0) for p in (
            {"url": f"http://alice:{SECRET}@127.0.0.1:1/x?token={SECRET}"},                   # refused connection
            {"url": f"{with_secret}/status?sig={SECRET}", "expected_status": [201]},           # unexpected status
            {"url": f"{fake.url}/redirect?to=http://bob:{SECRET}@127.0.0.2:1/%3Fk%3D{SECRET}"},  # redirect, dead end
            {"url": f"http://alice:{SECRET}@[::1/x?token={SECRET}"},                          # invalid URL
        )]
        good = queue.enqueue(conn, "http_call", {"url": f"{fake.url}/ok?token={SECRET}"})
        wait_finished(conn, [*bad, good], 20.0)
    for job_id in bad:
        j = queue.get(conn, job_id)
        assert j is not None and j["status"] == "failed"
        assert SECRET not in j["error_message"] and SECRET not in str(j["attempts"]), j["error_message"]
        assert "***" in j["error_message"], j["error_message"]
    assert queue.get(conn, good)["status"] == "completed"
    log = service.datadir.log_file.read_text()
    assert SECRET not in log
    assert "HTTP Request:" not in log       # httpx's per-request INFO line


def test_provider_errors_hide_url_secrets() -> None:
    from neurondb.providers import ProviderError
    from neurondb.providers.http import OpenAIEmbedder

    embedder = OpenAIEmbedder("openai", model="m", endpoint=f"http://alice:{SECRET}@127.0.0.1:1/?key={SECRET}",
                              api_key="")
    with pytest.raises(ProviderError) as info:
        embedder.embed(["x"])
    assert SECRET not in str(info.value) and "http://***@127.0.0.1:1/" in str(info.value)
    assert SECRET not in repr(embedder)


# -- defect 13: constraint violations -------------------------------------------------------------------------

JOB = "INSERT INTO neurondb.neurondb_job_queue (job_type, tenant_id, status, max_retries, completed_at, lease_owner)"
LLM = "INSERT INTO neurondb.neurondb_llm_jobs (operation, tenant_id, input_text, max_retries, status)"
INDEX = "INSERT INTO neurondb.neurondb_indexes (index_name, dim, metric, m, ef_construction, ef_search, hybrid_weight)"


@pytest.mark.parametrize(("sql", "expected"), [
    (f"{JOB} VALUES ('', 'default', 'pending', NULL, NULL, NULL)", "job_type: '' must be"),
    (f"{JOB} VALUES ('x', repeat('t', 100), 'pending', NULL, NULL, NULL)", "tenant_id: 'tttttttt"),
    (f"{JOB} VALUES ('x', '', 'pending', NULL, NULL, NULL)", "tenant_id: '' must be 1 to 64 characters"),
    (f"{JOB} VALUES ('x', 'default', 'done', NULL, NULL, NULL)",
     "status: 'done' must be one of pending, processing, completed, failed, cancelled"),
    (f"{JOB} VALUES ('x', 'default', 'pending', 500, NULL, NULL)", "max_retries: 500 must be"),
    (f"{JOB} VALUES ('x', 'default', 'processing', NULL, NULL, 'me')", "status: 'processing' needs"),
    (f"{JOB} VALUES ('x', 'default', 'completed', NULL, NULL, NULL)", "status: 'completed' needs completed_at"),
    (f"{LLM} VALUES ('summarize', 'default', 'x', NULL, 'pending')", "operation: 'summarize' must be one of"),
    (f"{LLM} VALUES ('completion', '', 'x', NULL, 'pending')", "tenant_id: '' must be"),
    (f"{LLM} VALUES ('completion', 'default', 'x', -1, 'pending')", "max_retries: -1 must be"),
    (f"{LLM} VALUES ('completion', 'default', 'x', NULL, 'failed')", "status: 'failed' needs completed_at"),
    (f"{INDEX} VALUES ('X-1', 8, 'l2', 16, 200, 40, 0.5)", "index_name: 'X-1' must"),
    (f"{INDEX} VALUES ('ok', 0, 'l2', 16, 200, 40, 0.5)", "dim: 0 must be between 1 and 16000"),
    (f"{INDEX} VALUES ('ok', 8, 'cos', 16, 200, 40, 0.5)", "metric: 'cos' must be one of l2, cosine, ip"),
    (f"{INDEX} VALUES ('ok', 8, 'l2', 1, 200, 40, 0.5)", "m: 1 must be between 2 and 128"),
    (f"{INDEX} VALUES ('ok', 8, 'l2', 16, 2, 40, 0.5)", "ef_construction: 2 must be between 4 and 4096"),
    (f"{INDEX} VALUES ('ok', 8, 'l2', 16, 200, 0, 0.5)", "ef_search: 0 must be between 1 and 4096"),
    (f"{INDEX} VALUES ('ok', 8, 'l2', 16, 200, 40, 1.5)", "hybrid_weight: 1.5 must be between 0 and 1"),
    ("INSERT INTO neurondb.neurondb_tenants (tenant_id, rate_limit) VALUES ('t', -1)", "rate_limit: -1 must be"),
    ("INSERT INTO neurondb.neurondb_tenants (tenant_id, burst) VALUES ('t', 0)", "burst: 0 must be"),
    ("INSERT INTO neurondb.neurondb_tenants (tenant_id, llm_share) VALUES ('t', 0)", "llm_share: 0 must be"),
    ("SELECT neurondb.create_index('docs', 4); INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, embedding) "
     "VALUES ('docs', '', '{1,2,3,4}')", "doc_id: '' must not be empty"),
])
def test_bad_rows_name_field_value_and_rule(conn: psycopg.Connection, sql: str, expected: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as info:
        conn.execute(sql)
    message = assert_clear_violation(info.value, expected.split(":")[0])
    assert message.startswith(expected), message


def test_api_and_cli_show_the_clear_message(conn: psycopg.Connection, tmp_path: Path, fresh_dsn: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match=r"^tenant_id: '' must be 1 to 64 characters"):
        queue.enqueue(conn, "embed", {}, tenant_id="")
    with pytest.raises(psycopg.errors.CheckViolation, match=r"^max_retries: 101 must be"):
        llm.submit(conn, "completion", input_text="x", max_retries=101)
    out = Service(tmp_path / "data", fresh_dsn).cli("index", "create", "Bad-Name", "--dim", "8", check=False)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error: index_name: 'Bad-Name' must"), out.stderr


# -- defect 13: search arguments ------------------------------------------------------------------------------

@pytest.fixture
def client(conn: psycopg.Connection, tmp_path: Path, fresh_dsn: str) -> Iterator[Client]:
    """A client of a database with index 'docs' (dim 4); no service needed: arguments are checked first."""
    conn.execute("SELECT neurondb.create_index('docs', 4)")
    with Client(Instance(DataDir(tmp_path / "data"), fresh_dsn)) as c:
        yield c


SEARCH_CASES: list[tuple[dict[str, Any], str]] = [
    ({"vector": "1234"}, "vector must be one vector of 4 finite numbers, not '1234'"),
    ({"vector": {"a": 1.0}}, "vector must be one vector of 4 finite numbers, not {'a': 1.0}"),
    ({"vector": np.ones((2, 4))}, "vector must be one vector of 4 finite numbers, not an array of shape (2, 4)"),
    ({"vector": [[1.0, 2.0, 3.0, 4.0]]}, "vector must be one vector of 4 finite numbers, not an array of shape (1, 4)"),
    ({"vector": ["1", "2", "3", "4"]}, "vector must be one vector of 4 finite numbers, not ['1', '2', '3', '4']"),
    ({"vector": [1.0, None, 3.0, 4.0]}, "vector must be one vector of 4 finite numbers, not [1.0, None, 3.0, 4.0]"),
    ({"vector": [True, False, True, False]}, "vector must be one vector of 4 finite numbers, not [True, False,"),
    ({"vector": [1.0, 2.0, 3.0]}, "query vector has 3 dimensions, index 'docs' expects 4"),
    ({"vector": [1.0, float("nan"), 3.0, 4.0]}, "query vector contains NaN or infinite values"),
    ({"vector": [1.0, 2.0, 3.0, 4.0], "k": 1.5}, "k must be an integer between 1 and 1000, not 1.5"),
    ({"vector": [1.0, 2.0, 3.0, 4.0], "k": "3"}, "k must be an integer between 1 and 1000, not '3'"),
    ({"vector": [1.0, 2.0, 3.0, 4.0], "k": True}, "k must be an integer between 1 and 1000, not True"),
    ({"vector": [1.0, 2.0, 3.0, 4.0], "k": 0}, "k must be an integer between 1 and 1000, not 0"),
    ({"vector": [1.0, 2.0, 3.0, 4.0], "tenant": 5}, "tenant must be a string or None, not 5"),
    ({"vector": [1.0, 2.0, 3.0, 4.0], "ef": 2.5}, "ef must be None or an integer between 1 and 10000, not 2.5"),
    ({"vector": [1.0, 2.0, 3.0, 4.0], "ef": 0}, "ef must be None or an integer between 1 and 10000, not 0"),
    ({"text": 5}, "text must be a string or None, not 5"),
    ({"text": "x", "hybrid_weight": "half"}, "hybrid_weight must be None or a number between 0 and 1, not 'half'"),
    ({"text": "x", "hybrid_weight": 2}, "hybrid_weight must be None or a number between 0 and 1, not 2"),
    ({}, "give a vector, a text, or both"),
]


@pytest.mark.parametrize(("kwargs", "expected"), SEARCH_CASES)
def test_search_arguments_raise_search_error(client: Client, kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(SearchError) as info:
        client.search("docs", **kwargs)
    assert str(info.value).startswith(expected), str(info.value)


# -- defect 13: payloads and providers at job time ------------------------------------------------------------

def test_job_time_errors_name_field_value_and_rule(service: Service, conn: psycopg.Connection) -> None:
    conn.execute("SELECT neurondb.create_index('odd', 8, provider => 'nosuch')")
    cases = [
        ({"url": ""}, "payload field 'url': '' is not an absolute http(s) URL"),
        ({"url": "example.com/hook"}, "payload field 'url': 'example.com/hook' is not an absolute http(s) URL"),
        ({"url": "ftp://example.com/x"}, "payload field 'url': 'ftp://example.com/x' is not an absolute http(s) URL"),
        ({"url": "http:///path"}, "payload field 'url': 'http:///path' is not an absolute http(s) URL"),
    ]
    jobs = {queue.enqueue(conn, "http_call", p, max_retries=3): m for p, m in cases}
    seconds = "must be a number of seconds between 0 and 3153600000"
    for older_than, shown in ((1e308, "1e+308"), (-5, "-5"), (3.2e9, "3200000000.0")):
        jobs[queue.enqueue(conn, "cache_refresh", {"cache": "llm", "older_than": older_than}, max_retries=3)] = \
            f"payload field 'older_than' {seconds}, got {shown}"
    jobs[queue.enqueue(conn, "cache_refresh", {"cache": "nosuch"}, max_retries=3)] = \
        "payload field 'cache' must be llm, embedding or result, got 'nosuch'"
    jobs[queue.enqueue(conn, "embed", {"index": "odd", "doc_id": "1", "text": "t"}, max_retries=3)] = \
        "provider: 'nosuch' is not one of: local, openai"
    good = queue.enqueue(conn, "cache_refresh", {"cache": "llm", "older_than": 86400})
    [llm_job] = conn.execute("INSERT INTO neurondb.neurondb_llm_jobs (operation, input_text, provider) "
                             "VALUES ('embedding', 'x', 'nosuch') RETURNING job_id").fetchone()
    wait_finished(conn, [*jobs, good], 20.0)
    wait_finished(conn, [llm_job], 20.0, table="neurondb_llm_jobs")
    for job_id, expected in jobs.items():
        j = queue.get(conn, job_id)
        assert (j["status"], j["retry_count"]) == ("failed", 0), j
        assert j["error_message"].startswith(expected), j["error_message"]
    assert queue.get(conn, good)["status"] == "completed"
    message = llm.get(conn, llm_job)["error_message"]
    assert message.startswith("provider: 'nosuch' is not one of: local, openai"), message


BEYOND_A_DOUBLE = "1e400"      # jsonb keeps it; orjson refuses it ("number is infinity")


def test_number_beyond_a_double_fails_its_job_not_the_queue(service: Service, conn: psycopg.Connection) -> None:
    """Such a payload (or one nested too deep to load) used to make every claim fetching it raise, so it
    and every job behind it stayed pending forever (and the log filled with tracebacks)."""
    [bad] = conn.execute("INSERT INTO neurondb.neurondb_job_queue (job_type, payload) VALUES ('cache_refresh', "
                         f"'{{\"cache\": \"llm\", \"older_than\": {BEYOND_A_DOUBLE}}}') RETURNING job_id").fetchone()
    deep = "[" * 3000 + "]" * 3000        # deeper than orjson (1,024) and the json module go
    [too_deep] = conn.execute("INSERT INTO neurondb.neurondb_job_queue (job_type, payload) "
                              "VALUES ('cache_refresh', %s::jsonb) RETURNING job_id", (deep,)).fetchone()
    good = queue.enqueue(conn, "cache_refresh", {"cache": "llm"})
    wait_finished(conn, [bad, too_deep, good], 10.0)
    assert_clear(queue.get(conn, too_deep)["error_message"], "payload")
    j = queue.get(conn, bad)
    assert j["status"] == "failed" and j["error_message"].startswith("payload cannot be decoded: "), j
    assert "numbers within double range" in j["error_message"] and len(j["error_message"]) < 300
    assert queue.get(conn, good)["status"] == "completed"
    assert "Traceback" not in service.datadir.log_file.read_text()


def test_number_beyond_a_double_fails_its_llm_job_not_the_worker(service: Service, conn: psycopg.Connection) -> None:
    """The LLM worker's twin of the test above: its async connection sets orjson.loads itself."""
    [bad] = conn.execute("INSERT INTO neurondb.neurondb_llm_jobs (operation, input_text, parameters) "
                         f"VALUES ('embedding', 'x', '{{\"n\": {BEYOND_A_DOUBLE}}}') RETURNING job_id").fetchone()
    good = llm.submit(conn, "embedding", "hash-8", "fine")
    wait_finished(conn, [bad, good], 10.0, table="neurondb_llm_jobs")
    assert_clear(llm.get(conn, bad)["error_message"], "parameters")
    assert llm.get(conn, good)["status"] == "completed"


# -- the mini-fuzz --------------------------------------------------------------------------------------------

MISSING = object()
# Per job type: a payload that works, and for each field values that can never work (None counts as missing
# for optional fields, so it is only listed for required ones).
FUZZ: dict[str, tuple[dict[str, Any], dict[str, list[Any]]]] = {
    "embed": ({"index": "docs", "doc_id": "d", "text": "some text", "metadata": {"a": 1}}, {
        "index": [MISSING, None, 5, "", "nope", [], "x" * 300],
        "doc_id": [MISSING, None, 1.5, [], {}, True, ""],
        "text": [MISSING, None, 5, [], {"t": 1}],
        "metadata": ["x", 5, [1]],
        "documents": [[], "x", [5], [{"doc_id": "a"}], [{"text": "t"}], [{"doc_id": "a", "text": 5}]],
    }),
    "rerank": ({"query": "cat", "documents": ["a cat", "a dog"], "top_n": 1}, {
        "query": [MISSING, None, 5, [], {}],
        "documents": [MISSING, None, "x", [5], [{"id": 1}], {}],
        "top_n": ["3", -1, 1.5, []],
        "model": [5, "nosuch-model", []],
    }),
    "cache_refresh": ({"cache": "llm", "older_than": 60}, {
        "cache": [MISSING, None, 5, "nosuch", ""],
        "action": ["purge", 5, ""],
        "keys": ["k", 5, {}],
        "older_than": [1e308, -1, "1d", [], 1e20, float(2**63)],
    }),
    "http_call": ({"url": "http://127.0.0.1:9/", "method": "GET"}, {
        "url": [MISSING, None, "", "example.com", "ftp://x/", 5, "http://", "http://[::1", "//host/x", "http:x"],
        "method": ["FETCH", 5, ""],
        "headers": ["x", {"a": 5}, []],
        "body": [5, {}],
        "timeout": [0, -1, 1e308, "10"],
        "expected_status": ["200", [99], ["x"], 5],
    }),
}
LLM_BAD: list[tuple[dict[str, Any], str]] = [
    ({"operation": "embedding", "input_text": "x", "provider": "nosuch"}, "provider"),
    ({"operation": "embedding", "input_text": "x", "provider": "NoSuch-Provider" * 10}, "provider"),
    ({"operation": "embedding", "input_text": "x", "model_name": "nosuch"}, "model"),
    ({"operation": "embedding", "input_text": "x", "parameters": '{"temperature": 1}'}, "parameters"),
    ({"operation": "reranking", "input_text": "q", "documents": "{a,b}", "parameters": '{"top": 1}'}, "parameters"),
    ({"operation": "completion", "input_text": None}, "input_text"),
    ({"operation": "completion", "input_text": "x"}, "provider"),           # local serves no completions
    ({"operation": "embedding", "input_texts": "{}"}, "input_texts"),
]
INDEX_BAD: dict[str, list[Any]] = {
    "index_name": ["", "1abc", "a-b", "x" * 64, "é"], "dim": [0, -1, 16001], "metric": ["cos", "", "L1"],
    "m": [0, 1, 129], "ef_construction": [3, 5000], "ef_search": [0, 4097], "hybrid_weight": [-0.1, 1.01],
}
SEARCH_BAD: dict[str, list[Any]] = {
    "vector": ["abcd", {"a": 1}, [[1.0] * 4], np.ones((2, 2)), ["1"] * 4, [None] * 4, [1.0] * 3, [np.inf] * 4,
               [1j] * 4, object()],
    "k": [0, -1, 1001, 1.5, "3", None, True, np.float64(2.0)],
    "ef": [0, 10001, 2.5, "40", False],
    "tenant": [5, b"acme", ["acme"]],
    "text": [5, b"x", ["x"]],
    "hybrid_weight": ["half", -1, 2, float("nan"), [0.5]],
}


def bad_payload(rng: random.Random, job_type: str) -> tuple[dict[str, Any], str]:
    base, fields = FUZZ[job_type]
    field = rng.choice(sorted(fields))
    payload = dict(base)
    if field == "documents" and job_type == "embed":
        for k in ("doc_id", "text", "metadata"):
            payload.pop(k)
    value = rng.choice(fields[field])
    if value is MISSING:
        payload.pop(field, None)
    else:
        payload[field] = value
    if job_type == "http_call" and field == "body":
        payload["json"] = {"also": "json"} if rng.random() < 0.3 else payload.get("json")
    return {k: v for k, v in payload.items() if v is not None or k == field}, field


@pytest.mark.parametrize("service", [{"neurondb.http_allowlist": "127.0.0.1"}], indirect=True)
def test_seeded_fuzz_of_bad_inputs(service: Service, conn: psycopg.Connection, fresh_dsn: str) -> None:
    rng = random.Random(9013)
    conn.execute("SELECT neurondb.create_index('docs', 384)")
    before = restarts(service)
    bad: dict[int, str] = {}
    good: list[int] = []
    for n in range(240):
        job_type = rng.choice(sorted(FUZZ))
        payload, field = bad_payload(rng, job_type)
        bad[queue.enqueue(conn, job_type, payload, max_retries=0)] = field
        if n % 10 == 0:
            good.append(queue.enqueue(conn, "rerank", {"query": "cat", "documents": ["a cat", "a dog"]}))
    llm_bad: dict[int, str] = {}
    for fields, field in LLM_BAD * 3:
        cols = {"max_retries": 0, **fields}
        sql = (f"INSERT INTO neurondb.neurondb_llm_jobs ({', '.join(cols)}) "
               f"VALUES ({', '.join(['%s'] * len(cols))}) RETURNING job_id")
        llm_bad[conn.execute(sql, list(cols.values())).fetchone()[0]] = field
    llm_good = [llm.submit(conn, "embedding", "hash-8", f"text {i}") for i in range(5)]

    for _ in range(60):            # index rows: refused at the door, one clear line each
        column = rng.choice(sorted(INDEX_BAD))
        row = {"index_name": f"i{rng.randrange(10**6)}", "dim": 8, "metric": "l2", "m": 16, "ef_construction": 200,
               "ef_search": 40, "hybrid_weight": 0.5, column: rng.choice(INDEX_BAD[column])}
        with pytest.raises(psycopg.errors.CheckViolation) as info:
            conn.execute(f"INSERT INTO neurondb.neurondb_indexes ({', '.join(row)}) "
                         f"VALUES ({', '.join(['%s'] * len(row))})", list(row.values()))
        assert_clear_violation(info.value, column)

    with Client(Instance(DataDir(service.datadir.root), fresh_dsn)) as client:
        for _ in range(100):
            arg = rng.choice(sorted(SEARCH_BAD))
            kwargs: dict[str, Any] = {"vector": [0.5] * 384, arg: rng.choice(SEARCH_BAD[arg])}
            if arg in ("text", "hybrid_weight"):
                kwargs.pop("vector")
                kwargs.setdefault("text", "cat")
            try:
                client.search("docs", **kwargs)
            except SearchError as exc:
                assert_clear(str(exc), arg)
            else:
                raise AssertionError(f"search accepted {kwargs}")

    wait_finished(conn, [*bad, *good], 30.0)
    wait_finished(conn, [*llm_bad, *llm_good], 30.0, table="neurondb_llm_jobs")
    for job_id, field in bad.items():
        j = queue.get(conn, job_id)
        assert j["status"] == "failed", (j["job_type"], j["payload"], j["result"])
        assert_clear(j["error_message"], field)
    assert all(queue.get(conn, g)["status"] == "completed" for g in good)
    for job_id, field in llm_bad.items():
        j = llm.get(conn, job_id)
        assert j["status"] == "failed", j
        assert_clear(j["error_message"], field)
    assert all(llm.get(conn, g)["status"] == "completed" for g in llm_good)
    assert restarts(service) == before
