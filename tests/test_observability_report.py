"""Issue 13's pictures and their checks: the dashboard and alert rules use only exported metrics (by the
catalogue, and by a real scrape), neuranmon's history fills and is bounded, `neurondb report` draws it."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

import neurondb
from neurondb import llm, queue
from neurondb.client import SearchError
from neurondb.observability import families
from neurondb.observability.history import METRICS
from tests.service import FAST_SETTINGS, Service, wait_for

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "neurondb.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DOCS = REPO / "docs" / "observability.md"
METRIC_NAME = re.compile(r"\bneurondb_\w+")
SECTIONS = 6     # queue depth, jobs/s, search latency, recall and ef, LLM, tuner curves
HISTORY = {"neurondb.metrics_history_interval": "200ms", "neurondb.metrics_history_retention": "1d",
           "neurondb.neuranq_job_modules": "tests.jobtypes", "neurondb.neuranmon_naptime": "1s"}


def expressions() -> dict[str, str]:
    """Every PromQL expression of the dashboard's panels and of the alert rules, by where it is."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = {f"dashboard variable {v['name']}": v["definition"]
           for v in dashboard["templating"]["list"] if v["type"] == "query"}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out[f"dashboard panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for name, expr in alert_rules():
        out[f"alert {name}"] = expr
    return out


def alert_rules() -> list[tuple[str, str]]:
    """(alert, expr) of alerts.yml, whose rules keep each expression on one line (no YAML parser needed)."""
    text = ALERTS.read_text()
    names = re.findall(r"^\s*- alert: (\w+)\s*$", text, re.M)
    exprs = re.findall(r"^\s*expr: (.+?)\s*$", text, re.M)
    assert len(names) == len(exprs), "every alert rule has one single-line expr"
    return list(zip(names, exprs, strict=True))


def used_metric_names() -> set[str]:
    return {name for expr in expressions().values() for name in METRIC_NAME.findall(expr)}


def test_every_dashboard_and_alert_expression_uses_exported_metrics() -> None:
    exprs = expressions()
    assert len(exprs) >= 10
    exported = families.exported_names()
    for where, expr in exprs.items():
        names = set(METRIC_NAME.findall(expr))
        assert names, f"{where} uses no neurondb metric: {expr}"
        assert names <= exported, f"{where} uses metrics the endpoint does not export: {names - exported}"
    alerts = {name for name, _ in alert_rules()}
    assert {"NeurondbWorkerFatal", "NeurondbQueueAgeGrowing", "NeurondbRecallBelowTarget",
            "NeurondbDeadLettersRising", "NeurondbLlmErrorRate"} <= alerts


def test_docs_list_every_exported_family() -> None:
    """The metrics table of docs/observability.md is the catalogue: one row per family, with its type and
    labels, no more, no less."""
    rows = re.findall(r"^\| `(neurondb_\w+)` \| (\w+) \| ([^|]*) \|", DOCS.read_text(), re.M)
    documented = {name: (kind, labels.strip()) for name, kind, labels in rows}
    suffix = {"counter": "_total", "info": "_info"}
    assert documented == {f.name + suffix.get(f.kind, ""): (f.kind, ", ".join(f"`{label}`" for label in f.labels))
                          for f in families.FAMILIES}


def workload(conn: psycopg.Connection, client: neurondb.client.Client) -> None:
    """Jobs (some failing for good), searches on one index, and LLM embeddings by the offline provider."""
    queue.enqueue_many(conn, "test.noop", [{}] * 20)
    queue.enqueue_many(conn, "test.fail", [{}] * 2, max_retries=0)
    for i in range(3):
        llm.submit(conn, "embed", input_text=f"some text {i}")
    searches(client)


def searches(client: neurondb.client.Client) -> None:
    for q in np.random.default_rng(3).standard_normal((100, 8)).astype(np.float32):
        client.search("docs", q, k=5)


def test_history_fills_is_bounded_and_the_report_draws_it(tmp_path: Path, fresh_dsn: str,
                                                          conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO neurondb.neurondb_metrics_history (sampled_at, metric, subject, value) "
                 "SELECT now() - interval '30 days', 'queue_depth', 'pending', 1 FROM generate_series(1, 12000)")
    conn.execute("SELECT neurondb.create_index('docs', 8, 'l2')")
    vectors = np.random.default_rng(1).standard_normal((300, 8)).astype(np.float32)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO neurondb.neurondb_vectors (index_name, doc_id, embedding) VALUES ('docs', %s, %s)",
                        [(f"d{i}", v.tolist()) for i, v in enumerate(vectors)])
    svc = Service(tmp_path / "data", fresh_dsn, HISTORY)
    svc.start()
    try:
        with neurondb.connect(str(svc.datadir.root), fresh_dsn) as client:
            def searchable() -> bool:
                try:
                    return len(client.search("docs", vectors[0], k=5)) == 5
                except SearchError:
                    return False
            wait_for(searchable, 60.0, "the index to load")
            workload(conn, client)

            def metrics() -> set[str]:
                return {m for (m,) in conn.execute("SELECT DISTINCT metric FROM neurondb.neurondb_metrics_history "
                                                   "WHERE sampled_at > now() - interval '1 hour'")}

            def complete() -> bool:
                searches(client)          # until the tuner has the sampled queries a recall needs
                return metrics() >= set(METRICS)
            try:
                wait_for(complete, 30.0, "a row of each metric", interval=0.2)
            except AssertionError:
                pytest.fail(f"no rows of {sorted(set(METRICS) - metrics())} in the history\n{svc.log_tail()}")
            wait_for(lambda: conn.execute("SELECT count(*) FROM neurondb.neurondb_metrics_history "
                                          "WHERE sampled_at < now() - interval '1 day'").fetchone()[0] == 0,
                     30.0, "retention to delete the 30-day-old rows", interval=0.2)
            depth = dict(conn.execute("SELECT subject, max(value) FROM neurondb.neurondb_metrics_history "
                                      "WHERE metric = 'queue_depth' GROUP BY subject").fetchall())
            assert set(depth) == {"pending", "processing", "dead_letter"}
            wait_for(lambda: conn.execute("SELECT max(value) FROM neurondb.neurondb_metrics_history WHERE "
                                          "metric = 'queue_depth' AND subject = 'dead_letter'").fetchone()[0] == 2,
                     10.0, "the two dead letters in the history", interval=0.2)
            rates = dict(conn.execute("SELECT metric, max(value) FROM neurondb.neurondb_metrics_history "
                                      "WHERE metric LIKE 'jobs%%' GROUP BY metric").fetchall())
            assert rates["jobs_per_second"] > 0 and rates["jobs_failed_per_second"] > 0, rates
            assert conn.execute("SELECT count(*) FROM neurondb.neurondb_metrics_history WHERE "
                                "metric = 'search_p99_ms' AND subject = 'docs'").fetchone()[0] > 0

        svc.write_settings({**FAST_SETTINGS, **HISTORY, "neurondb.metrics_history_interval": "0"})
        svc.cli("reload")                  # 0 turns the sampling off, without a restart
        time.sleep(0.5)
        rows = conn.execute("SELECT count(*) FROM neurondb.neurondb_metrics_history").fetchone()[0]
        time.sleep(1.0)
        assert conn.execute("SELECT count(*) FROM neurondb.neurondb_metrics_history").fetchone()[0] == rows

        out = tmp_path / "report.html"
        result = svc.cli("report", "-o", str(out), "--since", "1h")
        assert f"wrote {out}" in result.stdout
        page = out.read_text()
        assert page.count("<svg") == SECTIONS, "a chart for every section, the tuner's curves included"
        assert "No data" not in page
        assert_self_contained(page)
    finally:
        svc.close()


def assert_self_contained(page: str) -> None:
    assert "<script" not in page.lower()
    assert not re.search(r"https?://", page), "the page holds a URL"
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#)""", page), "the page refers to a resource outside it"


def test_report_of_an_empty_history_says_no_data(tmp_path: Path, fresh_dsn: str) -> None:
    svc = Service(tmp_path / "data", fresh_dsn)
    out = tmp_path / "empty.html"
    svc.cli("report", "-o", str(out), "--since", "24h")
    page = out.read_text()
    assert page.count("No data") == SECTIONS and "<svg" not in page
    assert "The last 1 d of" in page
    assert_self_contained(page)
    bad = svc.cli("report", "--since", "yesterday", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert 'invalid value for parameter "--since": "yesterday"' in bad.stderr
    nowhere = svc.cli("report", "-o", str(tmp_path / "missing" / "x.html"), check=False)
    assert nowhere.returncode == 1 and "Traceback" not in nowhere.stderr
    assert f"cannot write the report to {tmp_path / 'missing' / 'x.html'}: No such file or directory" in nowhere.stderr


def test_report_without_matplotlib_says_which_extra(tmp_path: Path, fresh_dsn: str) -> None:
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('matplotlib is not installed here')\n")
    svc = Service(tmp_path / "data", fresh_dsn, env={"PYTHONPATH": f"{shim.parent}:{REPO}"})
    result = svc.cli("report", "-o", str(tmp_path / "x.html"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("neurondb report needs matplotlib: install neurondb[report]")
    assert not (tmp_path / "x.html").exists()


# The sample names a family of each type declares in a scrape, series or not (HELP and TYPE lines).
DECLARED = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_metrics_are_in_a_scrape(tmp_path: Path, fresh_dsn: str) -> None:
    """Every sample name the dashboard and the alerts use is in a real scrape of a running service: as a
    series, or declared by its family's TYPE line (a labelled family without series yet, like the 429s of a
    provider never called)."""
    port = free_port()
    svc = Service(tmp_path / "data", fresh_dsn, {"neurondb.metrics_port": str(port),
                                                  "neurondb.neuranq_job_modules": "tests.jobtypes"})
    svc.start()
    try:
        with psycopg.connect(fresh_dsn, autocommit=True) as conn:
            conn.execute("SELECT neurondb.create_index('docs', 8, 'l2')")
            queue.enqueue(conn, "test.noop", {})
            llm.submit(conn, "embed", input_text="scraped")

        def scraped() -> set[str]:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2.0).text
            except httpx.HTTPError:
                return set()
            out = set()
            for family in text_string_to_metric_families(text):
                out |= {s.name for s in family.samples}
                out |= {family.name + suffix for suffix in DECLARED[family.type]}   # a family with no series yet
            return out

        names: set[str] = set()

        def complete() -> bool:
            names.update(scraped())
            return used_metric_names() <= names
        try:
            wait_for(complete, 30.0, "a scrape holding every metric the dashboard and alerts use", interval=0.5)
        except AssertionError:
            pytest.fail(f"missing from the scrape: {sorted(used_metric_names() - names)}")
    finally:
        svc.close()
