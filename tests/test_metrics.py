"""The Prometheus endpoint and health checks against the real service (issue 13): scrapes parsed with
prometheus_client's own parser, counters compared with a known workload, real SIGKILLs, real exit codes."""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

import neurondb
from neurondb import queue
from neurondb.observability import families
from neurondb.observability.process import MetricsProcess, Params
from neurondb.settings import REGISTRY
from neurondb.shm.control import SharedState
from neurondb.shm.names import instance_prefix
from tests.service import Service, running_service, wait_for

DIM = 8
SETTINGS = {"neurondb.neuranq_job_modules": "tests.jobtypes"}

Samples = dict[tuple[str, frozenset], float]


@pytest.fixture
def service(tmp_path: Path, fresh_dsn: str, conn: psycopg.Connection) -> Iterator[Service]:
    """A running service with the index 'docs' (DIM dimensions) and the test job types."""
    conn.execute("SELECT neurondb.create_index('docs', %s, 'l2')", (DIM,))
    with running_service(tmp_path / "data", fresh_dsn, SETTINGS) as svc:
        yield svc


def metrics_url(svc: Service) -> str:
    return wait_for(lambda: svc.status().metrics_url, 20.0, "neuranmon's metrics endpoint")


def scrape(svc: Service) -> Samples:
    text = httpx.get(metrics_url(svc), timeout=5.0).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def until(svc: Service, name: str, expected: float, timeout: float = 20.0, at_least: bool = False,
          **labels: str) -> Samples:
    """Scrape until `name`{labels} equals `expected` (or, with at_least, reaches it); the last scrape."""
    def reached() -> Samples | None:
        samples = scrape(svc)
        got = value(samples, name, **labels)
        return samples if got == expected or (at_least and got >= expected) else None
    return wait_for(reached, timeout, f"{name}{labels} {'>=' if at_least else '=='} {expected}", interval=0.2)


def test_counters_equal_a_known_workload(service: Service, conn: psycopg.Connection, fresh_dsn: str) -> None:
    """N jobs of which F fail, M searches: the counters are those numbers; depths and graph figures agree."""
    ok = queue.enqueue_many(conn, "test.noop", [{}] * 30, tenant_id="t1")
    ok += queue.enqueue_many(conn, "test.noop", [{}] * 10, tenant_id="t2")
    bad = queue.enqueue_many(conn, "test.fail", [{}] * 7, tenant_id="t2", max_retries=0)
    retried = queue.enqueue(conn, "test.fail", {"fail_times": 1}, tenant_id="t1", max_retries=1)
    vectors = np.random.default_rng(3).standard_normal((200, DIM)).astype(np.float32)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, embedding) VALUES ('docs', %s, %s)",
                        [(f"d{i}", v.tolist()) for i, v in enumerate(vectors)])
    samples = until(service, "neurondb_index_vectors", 200, index="docs")
    with neurondb.connect(str(service.datadir.root), fresh_dsn) as client:
        for v in vectors[:50]:
            assert client.search("docs", v, k=5)
    samples = until(service, "neurondb_search_duration_seconds_count", 50, index="docs", type="vector")
    samples = until(service, "neurondb_queue_jobs_total", 41, outcome="completed")
    assert value(samples, "neurondb_queue_jobs_total", outcome="completed", type="test.noop", tenant="t1") == 30
    assert value(samples, "neurondb_queue_jobs_total", outcome="completed", type="test.noop", tenant="t2") == 10
    assert value(samples, "neurondb_queue_jobs_total", outcome="completed", type="test.fail") == 1
    assert value(samples, "neurondb_queue_jobs_total", outcome="failed", type="test.fail", tenant="t2") == 7
    assert value(samples, "neurondb_queue_jobs_total", outcome="retried", type="test.fail", tenant="t1") == 1
    # Every attempt was timed and picked up (49 attempts: 48 jobs, one of them twice).
    assert value(samples, "neurondb_queue_job_duration_seconds_count") == 49
    assert value(samples, "neurondb_queue_pickup_latency_seconds_count") == 49
    assert value(samples, "neurondb_queue_job_duration_seconds_bucket", le="+Inf") == 49
    assert value(samples, "neurondb_search_duration_seconds_bucket", index="docs", le="+Inf") == 50
    assert value(samples, "neurondb_search_duration_seconds_sum", index="docs") > 0
    assert value(samples, "neurondb_index_tombstones", index="docs") == 0
    assert value(samples, "neurondb_index_memory_bytes", index="docs") > 200 * DIM * 4
    assert value(samples, "neurondb_index_ef_search", index="docs") > 0
    until(service, "neurondb_queue_dead_letters", 7)          # from the database cache, refreshed every 5 s
    samples = until(service, "neurondb_queue_pending_jobs", 0)
    assert value(samples, "neurondb_queue_running_jobs") == 0
    for kind in ("neuranq", "neuranmon", "neurandefrag", "neuranllm"):
        assert value(samples, "neurondb_worker_up", kind=kind) == 1
        assert value(samples, "neurondb_worker_state", kind=kind, state="fatal") == 0
    assert value(samples, "neurondb_build_info") == 1
    # neurandefrag's operations: deleting a fifth of the index starts a prune at once.
    conn.execute("DELETE FROM neurondb.neurondb_vectors WHERE doc_id = ANY(%s)", ([f"d{i}" for i in range(40)],))
    samples = until(service, "neurondb_maintenance_operations_total", 1, timeout=30.0, at_least=True, index="docs",
                    operation="prune", status="completed")
    assert value(samples, "neurondb_maintenance_duration_seconds_count", operation="prune") >= 1
    until(service, "neurondb_index_vectors", 160, index="docs")
    assert ok and bad and retried
    # Every family of the catalogue is announced, even those with no sample yet.
    text = httpx.get(metrics_url(service)).text
    announced = {f.name for f in text_string_to_metric_families(text)}
    assert {f.name + ("_info" if f.kind == "info" else "") for f in families.FAMILIES} <= announced


def metrics_process(svc: Service) -> int | None:
    """The pid of the process that serves neuranmon's endpoint: neuranmon's one child (None while it has none)."""
    pid = svc.worker("neuranmon").pid
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return None
    return int(children[0]) if len(children) == 1 else None


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_killed_workers_show_in_restarts_and_counters_survive(service: Service, conn: psycopg.Connection) -> None:
    """A SIGKILLed queue worker counts a restart and a crash. A SIGKILLed metrics process is replaced by
    neuranmon, which itself keeps running. A SIGKILLed neuranmon takes its metrics process with it, and its
    successor serves the endpoint again (on a new port here: metrics_port 0) with the counters kept in shared
    memory."""
    queue.enqueue_many(conn, "test.noop", [{}] * 20)
    until(service, "neurondb_queue_jobs_total", 20, outcome="completed")
    os.kill(service.worker("neuranq").pid, signal.SIGKILL)
    samples = until(service, "neurondb_worker_restarts_total", 1, worker="neuranq")
    assert value(samples, "neurondb_worker_crashes_total", worker="neuranq") == 1
    assert value(samples, "neurondb_worker_crashes_total", worker="neuranmon") == 0
    first = wait_for(lambda: metrics_process(service), 10.0, "the metrics process")
    os.kill(first, signal.SIGKILL)

    def replaced() -> int | None:
        pid = metrics_process(service)
        return pid if pid not in (None, first) else None

    second = wait_for(replaced, 20.0, "a new metrics process")
    samples = until(service, "neurondb_queue_jobs_total", 20, outcome="completed")
    assert value(samples, "neurondb_worker_restarts_total", worker="neuranmon") == 0
    old_url = metrics_url(service)
    os.kill(service.worker("neuranmon").pid, signal.SIGKILL)
    wait_for(lambda: not running(second), 5.0, "the metrics process to die with neuranmon")
    wait_for(lambda: service.status().metrics_url not in (None, old_url), 20.0, "the endpoint after a restart")
    samples = until(service, "neurondb_worker_restarts_total", 1, worker="neuranmon")
    assert value(samples, "neurondb_queue_jobs_total", outcome="completed") == 20
    queue.enqueue_many(conn, "test.noop", [{}] * 5)
    until(service, "neurondb_queue_jobs_total", 25, outcome="completed")


def test_a_scrape_under_load_takes_milliseconds(service: Service, conn: psycopg.Connection, fresh_dsn: str) -> None:
    """While the queue drains thousands of jobs and a client searches flat out, scrapes answer in < 100 ms
    (median; the gross limit of the issue on a noisy 2-core machine)."""
    vectors = np.random.default_rng(4).standard_normal((500, DIM)).astype(np.float32)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, embedding) VALUES ('docs', %s, %s)",
                        [(f"d{i}", v.tolist()) for i, v in enumerate(vectors)])
    until(service, "neurondb_index_vectors", 500, index="docs")
    stop = threading.Event()

    def search() -> None:
        with neurondb.connect(str(service.datadir.root), fresh_dsn) as client:
            while not stop.is_set():
                client.search("docs", vectors[np.random.randint(500)], k=10)

    searcher = threading.Thread(target=search)
    searcher.start()
    try:
        queue.enqueue_many(conn, "test.noop", [{}] * 5000)
        url = metrics_url(service)
        times = []
        with httpx.Client() as http:
            for _ in range(15):
                t = time.perf_counter()
                assert http.get(url).status_code == 200
                times.append(time.perf_counter() - t)
                time.sleep(0.1)
    finally:
        stop.set()
        searcher.join()
    print(f"scrape under load: median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")
    assert statistics.median(times) < 0.1, times


def check_output_composes(svc: Service) -> None:
    """Not a terminal: `status` and `config show` print whole tab-separated rows; `status --watch --json`
    one JSON object per line."""
    lines = svc.cli("status").stdout.splitlines()
    workers = {w.name: w.pid for w in svc.status().workers}
    rows = [line.split("\t") for line in lines if line.startswith("worker\t")]
    assert {r[1]: int(r[2]) for r in rows} == workers and all(len(r) == 11 for r in rows), lines
    assert "#worker\tworker\tpid\tstate" in lines[2], lines
    settings = [line.split("\t") for line in svc.cli("config", "show").stdout.splitlines()]
    assert settings[0] == ["name", "setting", "unit", "context", "source", "range", "description"]
    assert {r[0] for r in settings[1:]} == set(REGISTRY) and all(len(r) == 7 for r in settings)
    assert max(len(r[6]) for r in settings) > 120                        # descriptions are not cut
    watch = subprocess.Popen([sys.executable, "-m", "neurondb", "status", "--watch", "--json", "-D",
                              str(svc.datadir.root)], stdout=subprocess.PIPE, env=svc.env, text=True)
    try:
        snapshots = [orjson.loads(watch.stdout.readline()) for _ in range(2)]
    finally:
        watch.terminate()
        watch.wait(10)
    assert [s["running"] for s in snapshots] == [True, True] and snapshots[1]["uptime_s"] > snapshots[0]["uptime_s"]


def test_health_exit_codes_and_healthz(tmp_path: Path, fresh_dsn: str) -> None:
    """healthy: 0 and /healthz 200; a FATAL worker: 1 with the reason and 503; stopped: 2. (And, on the same
    service, the plain output of status and config show.)"""
    svc = Service(tmp_path / "data", fresh_dsn, {**SETTINGS, "neurondb.worker_max_crashes": "1"})
    svc.start()
    try:
        url = metrics_url(svc).replace("/metrics", "/healthz")
        check_output_composes(svc)
        healthy = svc.cli("health", check=False)
        assert healthy.returncode == 0 and healthy.stdout.strip() == "healthy", healthy.stdout
        assert httpx.get(url).json() == {"status": "healthy", "code": 0, "reasons": []}
        os.kill(svc.worker("neurandefrag").pid, signal.SIGKILL)
        wait_for(lambda: svc.worker("neurandefrag").state == "fatal", 20.0, "neurandefrag FATAL")
        degraded = svc.cli("health", check=False)
        assert degraded.returncode == 1, degraded.stdout
        assert "degraded" in degraded.stdout and "worker neurandefrag is FATAL" in degraded.stdout
        answer = httpx.get(url)
        assert answer.status_code == 503 and answer.json()["status"] == "degraded"
        assert value(scrape(svc), "neurondb_workers_fatal") == 1
        svc.cli("stop")
        down = svc.cli("health", check=False)
        assert down.returncode == 2 and down.stdout.startswith("down"), down.stdout
    finally:
        svc.close()


def test_llm_counters_equal_a_known_workload(tmp_path: Path, fresh_dsn: str, conn: psycopg.Connection) -> None:
    """L completion jobs of which C are answered by the cache, with one 429 (Retry-After 1 s) on the way:
    requests by status code, tokens, cache hits and misses, 429s and their waits, jobs by outcome."""
    from neurondb import llm
    from tests.fakeprovider import FakeProvider

    with FakeProvider(dim=8) as fake:
        svc = Service(tmp_path / "data", fresh_dsn, {
            "neurondb.llm_provider": "openai", "neurondb.llm_endpoint": fake.url, "neurondb.llm_model": "gpt-test",
            "neurondb.neuranllm_retry_delay": "100ms"})
        svc.start()
        try:
            fake.fail(429, times=1, retry_after=1)
            first = llm.submit_many(conn, "completion", [f"prompt {i}" for i in range(5)])
            llm.wait(conn, first, timeout=30)
            again = llm.submit_many(conn, "completion", [f"prompt {i}" for i in range(3)])    # C = 3 cache hits
            llm.wait(conn, again, timeout=30)
            samples = until(svc, "neurondb_llm_jobs_total", 8, operation="completion", outcome="completed")
            labels = {"provider": "openai", "model": "gpt-test"}
            assert value(samples, "neurondb_llm_requests_total", code="200", **labels) == 5
            assert value(samples, "neurondb_llm_requests_total", code="429", **labels) == 1
            assert value(samples, "neurondb_llm_request_duration_seconds_count", **labels) == 6
            assert value(samples, "neurondb_llm_rate_limited_total", provider="openai") == 1
            assert value(samples, "neurondb_llm_retry_after_seconds_total", provider="openai") == 1
            assert value(samples, "neurondb_llm_jobs_total", outcome="retried") == 1
            assert value(samples, "neurondb_llm_cache_requests_total", result="hit") == 3
            assert value(samples, "neurondb_llm_cache_requests_total", result="miss") == 6   # 5 + the retried one
            assert value(samples, "neurondb_llm_tokens_total", kind="prompt", **labels) > 0
            assert value(samples, "neurondb_llm_tokens_total", kind="completion", **labels) > 0
            assert fake.count() == 6
        finally:
            svc.close()


def test_a_metrics_process_that_cannot_start_is_retried_ever_more_rarely(tmp_path: Path, caplog) -> None:
    """A metrics process that exits at once (here the shared memory it is told to attach does not exist) is
    restarted after 1 s, then 2 s, then 4 s, not every second: one warning per exit, with the delay."""
    prefix = instance_prefix(tmp_path)
    shared = SharedState.create(prefix, 1)
    try:
        endpoint = MetricsProcess(shared)
        params = Params("neuranmon-metrics", os.getpid(), prefix + "-missing", 0, "", "127.0.0.1", 0, 10.0,
                        str(tmp_path / "metrics.log"))
        with caplog.at_level("WARNING", logger="neurondb.metrics"):
            deadline = time.monotonic() + 30.0
            while len(caplog.records) < 3 and time.monotonic() < deadline:
                endpoint.ensure(params)
                time.sleep(0.05)
        endpoint.stop()
    finally:
        shared.unlink()
        shared.close()
    delays = [int(m.group(1)) for r in caplog.records if (m := re.search(r"restarting it in (\d+) s", r.getMessage()))]
    assert delays == [1, 2, 4], [r.getMessage() for r in caplog.records]
