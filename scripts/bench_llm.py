#!/usr/bin/env python3
"""Benchmark neuranllm, the LLM worker, against a provider answering after 50 ms (issue 6).

Prints:

- completions: `--jobs` completion jobs (default 2,000, distinct prompts) at `neuranllm_concurrency`
  `--concurrency` (default 16) against the fake provider answering every request after `--delay-ms`
  (default 50): jobs/s from "worker enabled" to "every job completed", against the target
  0.8 x concurrency / delay (256 jobs/s for 16 and 50 ms), and the provider requests made;
- embeddings: `--jobs` embedding jobs (distinct texts): jobs/s and requests made (jobs are batched,
  up to `neurondb.llm_embedding_batch_size` texts per request);
- the same embeddings again: every job answered by the cache, requests made (expected: 0);
- the local embedder (hash-384, the offline default) in this process: texts/s over `--texts` texts
  (default 20,000) in batches of 64, and the same through the worker (`--jobs` jobs, provider local);
- the ONNX MiniLM embedder's texts/s, when the `onnx` extra is installed.

Each drain submits all jobs first (one statement, `neurondb.llm.submit_many`) with the worker disabled
(`neurondb.neuranllm_enabled = off`), then turns it on (settings file + SIGHUP to the supervisor) and
starts the clock, so submission cost is not counted and the worker sees the whole backlog at once.

The fake provider (tests/fakeprovider.py: OpenAI-shaped, HTTP/1.1 keep-alive, one thread per connection)
runs in this process and counts the requests it receives. Everything else is real: an embedded PostgreSQL
(`neurondb init`) and the service on it (`neurondb start --dsn`, through tests/service.py, the harness the
tests use), in a fresh directory under /tmp, stopped and removed at the end, also on Ctrl-C or an error
(`--keep` keeps the directory). With `--dsn` that server is used instead (a scratch database: the schema
is created there and left in place).

    .venv/bin/python scripts/bench_llm.py [--jobs 2000] [--concurrency 16] [--delay-ms 50] [--json] [--dsn DSN]

One run on a shared machine is one sample: the load average is printed with the figures.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # tests.fakeprovider

from benchlib import (  # noqa: E402
    BenchError,
    clean_env,
    embedded_dsn,
    guarded,
    install_sigterm_handler,
    log,
    remove_embedded,
    run_cli,
    scratch_dir,
    server_bench_parser,
)

from neurondb import db, llm  # noqa: E402
from neurondb.providers.local import HashEmbedder  # noqa: E402
from neurondb.status import pid_alive  # noqa: E402
from tests.fakeprovider import FakeProvider  # noqa: E402
from tests.service import FAST_SETTINGS, Service  # noqa: E402

TABLE = "neurondb.neurondb_llm_jobs"
POLL_S = 0.01
DRAIN_TIMEOUT_S = 600.0


class Bench:
    """The service (tests/service.py's harness: the real CLI, real processes) on its own database, and the
    client connection the benchmark uses."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = dict(FAST_SETTINGS)
        self.conn: psycopg.Connection | None = None

    def start(self, **settings: str) -> None:
        self.reload_settings(neuranllm_enabled="off", **settings)
        self.service.cli("init")
        self.service.start()
        assert self.service.dsn is not None
        self.conn = psycopg.connect(self.service.dsn, autocommit=True, application_name="bench_llm client")

    def reload_settings(self, **changes: str) -> None:
        """New settings by file + SIGHUP (what `neurondb reload` does without a CLI start-up)."""
        self.settings.update({f"neurondb.{k}": v for k, v in changes.items()})
        self.service.write_settings(self.settings)
        if pid_alive(self.service.supervisor_pid):
            os.kill(self.service.supervisor_pid, signal.SIGHUP)

    def drain(self, what: str, operation: str, items: list[Any], fake: FakeProvider | None,
              **changes: str) -> dict[str, Any]:
        """Submit `items` with the worker off, turn it on, time until all are finished."""
        conn = self.conn
        assert conn is not None
        self.reload_settings(neuranllm_enabled="off", **changes)
        time.sleep(0.5)                                   # the worker has applied it (its slice is 0.5 s)
        conn.execute(f"TRUNCATE {TABLE}")
        ids = llm.submit_many(conn, operation, items)
        conn.execute(f"ANALYZE {TABLE}")                  # as autovacuum would after such a burst
        requests_before = fake.count() if fake else 0
        log(f"{what}: {len(ids)} {operation} jobs submitted; worker on")
        t0 = time.monotonic()
        self.reload_settings(neuranllm_enabled="on")
        deadline = t0 + DRAIN_TIMEOUT_S
        while conn.execute(f"SELECT EXISTS (SELECT 1 FROM {TABLE} WHERE status IN ('pending', 'processing'))"
                           ).fetchone()[0]:
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: not drained after {DRAIN_TIMEOUT_S:g} s\n{self.service.log_tail()}")
            time.sleep(POLL_S)
        elapsed = time.monotonic() - t0
        counts = dict(conn.execute(f"SELECT status, count(*) FROM {TABLE} GROUP BY status").fetchall())
        if counts != {"completed": len(ids)}:
            errors = conn.execute(f"SELECT error_message, count(*) FROM {TABLE} WHERE status = 'failed' "
                                  "GROUP BY 1 ORDER BY 2 DESC LIMIT 3").fetchall()
            raise BenchError(f"{what}: ended with {counts}, errors {errors}\n{self.service.log_tail()}")
        hits, span, latency = conn.execute(
            f"SELECT count(*) FILTER (WHERE cache_hit), extract(epoch FROM max(completed_at) - min(started_at)), "
            f"avg(latency_ms) FROM {TABLE}").fetchone()
        out = {"jobs": len(ids), "seconds": round(elapsed, 3), "jobs_per_s": round(len(ids) / elapsed, 1),
               "server_jobs_per_s": round(len(ids) / float(span), 1) if span else None, "cache_hits": hits,
               "mean_call_ms": round(latency, 1) if latency is not None else None}
        if fake is not None:
            out["requests"] = fake.count() - requests_before
        log(f"{what}: {out}")
        return out

    def close(self) -> None:
        if self.conn is not None:
            db.close_quietly(self.conn)
        self.service.close()


def texts(n: int, tag: str) -> list[str]:
    """n distinct sentences of 8-16 words: embedding inputs and prompts of a realistic small size."""
    words = ["vector", "index", "search", "query", "neighbour", "graph", "layer", "cosine", "distance", "model",
             "token", "prompt", "answer", "cache", "worker", "tenant", "latency", "batch", "retry", "provider",
             "database", "table", "lease", "shard"]
    return [f"{tag} {i}: " + " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(8 + i % 9))
            for i in range(n)]


def embedder_rate(embedder: Any, corpus: list[str], batch: int = 64) -> float:
    """texts/s of `embedder.embed` over `corpus` in batches (after one warm-up batch)."""
    embedder.embed(corpus[:batch])
    t0 = time.perf_counter()
    for i in range(0, len(corpus), batch):
        embedder.embed(corpus[i:i + batch])
    return len(corpus) / (time.perf_counter() - t0)


def report(results: dict[str, Any], target: float) -> str:
    c, e, again = results["completion"], results["embedding"], results["embedding_cached"]
    lines = [
        f"neuranllm benchmark: provider answers after {results['delay_ms']:g} ms, "
        f"concurrency {results['concurrency']}, load average before/after "
        f"{results['load_before']:.2f} / {results['load_after']:.2f} on {results['cpus']} CPUs",
        f"  completions      {c['jobs']} jobs in {c['seconds']:.2f} s = {c['jobs_per_s']:.1f} jobs/s "
        f"(target >= {target:.0f}: {'met' if c['jobs_per_s'] >= target else 'NOT met'}); "
        f"{c['requests']} requests",
        f"  embeddings       {e['jobs']} jobs in {e['seconds']:.2f} s = {e['jobs_per_s']:.1f} jobs/s; "
        f"{e['requests']} requests ({e['jobs'] / max(e['requests'], 1):.1f} jobs per request)",
        f"  same again       {again['jobs']} jobs in {again['seconds']:.2f} s = {again['jobs_per_s']:.1f} jobs/s; "
        f"{again['requests']} requests, {again['cache_hits']} cache hits",
        f"  local hash-384   {results['local_texts_per_s']:.0f} texts/s in this process; through the worker "
        f"{results['local_worker']['jobs_per_s']:.1f} jobs/s",
    ]
    onnx = results.get("onnx_texts_per_s")
    lines.append(f"  ONNX MiniLM      {onnx:.0f} texts/s" if onnx else
                 f"  ONNX MiniLM      not measured: {results.get('onnx_skipped')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = server_bench_parser(__doc__, "neuranllm_concurrency")
    parser.add_argument("--texts", type=int, default=20000, help="texts for the local embedder rates")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args(argv)

    install_sigterm_handler()
    target = 0.8 * args.concurrency / (args.delay_ms / 1000.0)
    env = clean_env()
    pg_root = scratch_dir("neurondb-bench-llm-pg-")
    root = scratch_dir("neurondb-bench-llm-")
    fake = FakeProvider(dim=384, record=False)
    results: dict[str, Any] = {"delay_ms": args.delay_ms, "concurrency": args.concurrency, "cpus": os.cpu_count(),
                               "load_before": os.getloadavg()[0]}
    benches: list[Bench] = []

    def run() -> None:
        dsn = embedded_dsn(pg_root, env, args.dsn)
        fake.start()
        fake.set_delay(args.delay_ms)
        bench = Bench(Service(root / "service", dsn))
        benches.append(bench)
        bench.start(neuranllm_concurrency=str(args.concurrency), llm_provider="openai", llm_endpoint=fake.url,
                    llm_model="bench-model")
        results["completion"] = bench.drain("completions", "completion", texts(args.jobs, "prompt"), fake)
        corpus = texts(args.jobs, "passage")
        results["embedding"] = bench.drain("embeddings", "embedding", corpus, fake)
        results["embedding_cached"] = bench.drain("embeddings again (cache)", "embedding", corpus, fake)
        results["local_worker"] = bench.drain("local hash-384 embeddings", "embedding", texts(args.jobs, "local"),
                                              None, llm_provider="local", llm_model="hash-384")
        log(f"local embedder: {args.texts} texts in this process")
        results["local_texts_per_s"] = embedder_rate(HashEmbedder(384), texts(args.texts, "hash"))
        from neurondb.providers import onnx
        if onnx.available():
            log("ONNX MiniLM embedder: 2000 texts")
            results["onnx_texts_per_s"] = embedder_rate(onnx.OnnxMiniLMEmbedder(), texts(2000, "onnx"))
        else:
            results["onnx_skipped"] = "the onnx extra is not installed (pip install -e '.[onnx]')"
        results["load_after"] = os.getloadavg()[0]
        results["target_jobs_per_s"] = target
        print(json.dumps(results, indent=2) if args.json else report(results, target))

    def cleanup() -> None:
        for bench in benches:
            bench.close()
        fake.stop()
        if args.keep:
            if (pg_root / "pgdata" / "postmaster.pid").exists():
                run_cli(["db", "stop", "-D", str(pg_root)], env, check=False, timeout=180)
            log(f"kept {root} and {pg_root} (stopped)")
        else:
            remove_embedded(pg_root, env, root)

    # AssertionError: tests/service.py's harness reports a service that misbehaved that way.
    return guarded(run, cleanup, errors=(BenchError, AssertionError))


if __name__ == "__main__":
    sys.exit(main())
