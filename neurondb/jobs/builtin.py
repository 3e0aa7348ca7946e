"""The document's four job types: embed, rerank, cache_refresh, http_call.

Payloads (JSON objects):
- `embed` (alias `embedding`): `{"index": NAME, "doc_id": ID, "text": TEXT, "metadata": {...}}` or
  `{"index": NAME, "documents": [{"doc_id", "text", "metadata"?, "tenant_id"?}, ...]}`. Texts are embedded
  with the index's provider and model and upserted into `neurondb.neurondb_vectors` when the job completes.
- `rerank` (alias `reranking`): `{"query": TEXT, "documents": [TEXT | {"id", "text"}], "top_n"?, "model"?}`;
  the result is `{"ranking": [{"index", "id", "score"}, ...]}`, best first.
- `cache_refresh`: `{"cache": "llm" | "embedding" | "result", "name"?: RESULT_CACHE_NAME, "keys"?: [...],
  "older_than"?: SECONDS (0 to 3,153,600,000, i.e. 100 years), "action"?: "expire" | "refresh"}`. `expire`
  removes matching entries (and every entry past its expiry); `refresh` recomputes result-cache entries from
  the job type + payload recorded in their `source`. LLM and embedding results are recomputed on their next
  use, so they only expire.
- `http_call`: `{"url": ABSOLUTE_HTTP_OR_HTTPS_URL, "method"?: "GET", "headers"?: {...}, "json"? | "body"?,
  "timeout"?: SECONDS, "expected_status"?: [200, ...]}`; the result is `{"status", "headers", "body"}` (body
  cut at neurondb.http_max_response_size). Loopback, private, link-local and metadata addresses are refused
  unless allowed by neurondb.http_allowlist. Error messages show the URL with its userinfo and query values
  masked (neurondb.redaction), since a URL may carry credentials.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
from psycopg.types.json import Jsonb

from neurondb.jobs import JobContext, JobError, JobType, PermanentJobError, job_type, loop_local, require, resolve
from neurondb.queries import query
from neurondb.redaction import redact_url, redact_urls, shorten, shown

MAX_DOCUMENTS = 10_000
MAX_AGE_S = 100 * 365 * 86_400   # older_than bound: a century, well inside PostgreSQL's interval (1e308 s is not)


def _documents(payload: dict) -> list[dict]:
    if "documents" in payload:
        docs = require(payload, "documents", list)
        if not docs:
            raise PermanentJobError("payload field 'documents' is empty")
        if len(docs) > MAX_DOCUMENTS:
            raise PermanentJobError(f"payload has {len(docs)} documents; at most {MAX_DOCUMENTS} per job")
        names = [f"documents[{i}]" for i in range(len(docs))]
    else:
        docs, names = [payload], ["payload"]
    for doc, where in zip(docs, names, strict=True):
        if not isinstance(doc, dict):
            raise PermanentJobError(f"{where} must be an object with doc_id and text, got {shown(doc)}")
        if str(require(doc, "doc_id", (str, int), where=where)) == "":
            raise PermanentJobError(f"{where} field 'doc_id' must not be empty")
        require(doc, "text", str, where=where)
        require(doc, "metadata", dict, default={}, where=where)
    return docs


@contextmanager
def _provider_errors() -> Iterator[None]:
    """A provider's failure as a JobError (retried) or PermanentJobError carrying its own message, so a
    job's error_message reads "provider: 'x' is not one of: ..." or "openai: HTTP 429: ...", not the
    exception's class name."""
    from neurondb.providers import ProviderError

    try:
        yield
    except ProviderError as exc:
        raise (JobError if exc.retryable else PermanentJobError)(str(exc)) from None


def _pg_array(vector: np.ndarray) -> str:
    return "{" + ",".join(repr(float(x)) for x in vector.tolist()) + "}"


@job_type("embed", aliases=("embedding",))
async def embed(ctx: JobContext, payload: dict) -> dict:
    from neurondb.jobs.coalesce import Coalescer, Limits
    from neurondb.providers.registry import embedder_for

    index = require(payload, "index", str)
    docs = _documents(payload)
    asked = require(payload, "model", str, default=None)
    row = await (await ctx.conn.execute(query("jobs", "index_of"), (index,))).fetchone()
    if row is None:
        raise PermanentJobError(f"index {shown(index)} does not exist (create it with `neurondb index create`)")
    dim, provider, model = row
    with _provider_errors():
        embedder = embedder_for(ctx.config, model=asked or model, provider=provider)
        batcher = loop_local(Coalescer, lambda: Coalescer(ctx.buckets))
        batcher.limits = Limits(ctx.config.get_float("llm_requests_per_second"),
                                ctx.config.get_float("llm_tokens_per_minute"))
        vectors = np.asarray(await batcher.embed(embedder, [d["text"] for d in docs], ctx.http,
                                                 ctx.config.get_int("llm_embedding_batch_size")), dtype=np.float32)
    if vectors.shape != (len(docs), dim):
        raise PermanentJobError(f"{embedder.name} model {embedder.model!r} returned vectors of shape "
                                f"{vectors.shape}; index {index!r} expects {dim} dimensions")
    if not np.isfinite(vectors).all():
        raise PermanentJobError(f"{embedder.name} model {embedder.model!r} returned NaN or infinite values")
    ctx.defer(query("jobs", "upsert_vectors"), {
        "index": index,
        "doc_ids": [str(d["doc_id"]) for d in docs],
        "tenants": [str(d.get("tenant_id") or ctx.tenant_id) for d in docs],
        "contents": [d["text"] for d in docs],
        "embeddings": [_pg_array(v) for v in vectors],
        "metadata": [Jsonb(d.get("metadata") or {}) for d in docs],
    })
    return {"index": index, "documents": len(docs), "dim": dim, "provider": embedder.name, "model": embedder.model}


@job_type("rerank", aliases=("reranking",))
def rerank(ctx: JobContext, payload: dict) -> dict:
    from neurondb.providers.registry import reranker_for

    question = require(payload, "query", str)
    docs = require(payload, "documents", list)
    if len(docs) > MAX_DOCUMENTS:
        raise PermanentJobError(f"payload has {len(docs)} documents; at most {MAX_DOCUMENTS} per job")
    model = require(payload, "model", str, default=None)
    ids: list[Any] = []
    texts: list[str] = []
    for i, doc in enumerate(docs):
        if isinstance(doc, str):
            ids.append(i)
            texts.append(doc)
        elif isinstance(doc, dict) and isinstance(doc.get("text"), str):
            ids.append(doc.get("id", i))
            texts.append(doc["text"])
        else:
            raise PermanentJobError(f"documents[{i}] must be a string or an object with a text field, got {shown(doc)}")
    top_n = require(payload, "top_n", int, default=None)
    with _provider_errors():
        reranker = reranker_for(ctx.config, model=model)
        order = reranker.rerank(question, texts, top_n)
    return {"model": reranker.model, "ranking": [{"index": i, "id": ids[i], "score": float(s)} for i, s in order]}




@job_type("cache_refresh")
async def cache_refresh(ctx: JobContext, payload: dict) -> dict:
    cache = require(payload, "cache", str)
    action = require(payload, "action", str, default="expire")
    keys = require(payload, "keys", list, default=None)
    older_than = require(payload, "older_than", float, default=None)
    if action not in ("expire", "refresh"):
        raise PermanentJobError(f"payload field 'action' must be 'expire' or 'refresh', got {shown(action)}")
    if older_than is not None and not 0 <= older_than <= MAX_AGE_S:
        raise PermanentJobError(f"payload field 'older_than' must be a number of seconds between 0 and {MAX_AGE_S}, "
                                f"got {shown(older_than)}")
    params = {"keys": [str(k) for k in keys] if keys is not None else None, "older_than": older_than}
    if cache in ("llm", "embedding"):
        if action == "refresh":
            raise PermanentJobError(f"{cache} cache entries are recomputed on their next use: use action 'expire'")
        ctx.defer(query("jobs", "expire_llm"), {**params, "operation": "embedding" if cache == "embedding" else None})
        return {"cache": cache, "action": action}
    if cache != "result":
        raise PermanentJobError(f"payload field 'cache' must be llm, embedding or result, got {shown(cache)}")
    params["name"] = require(payload, "name", str)
    if action == "expire":
        ctx.defer(query("jobs", "expire_results"), params)
        return {"cache": cache, "name": params["name"], "action": action}
    refreshed = 0
    for key, source in await (await ctx.conn.execute(query("jobs", "stale_results"), params)).fetchall():
        if not isinstance(source, dict) or not isinstance(source.get("job_type"), str):
            raise PermanentJobError(f"result cache entry {key!r} has no usable source (job_type + payload)")
        value = await _recompute(ctx, resolve(source["job_type"]), source.get("payload") or {})
        ctx.defer(query("jobs", "store_result"), {"value": Jsonb(value), "name": params["name"], "key": key})
        refreshed += 1
    return {"cache": cache, "name": params["name"], "action": action, "refreshed": refreshed}


async def _recompute(ctx: JobContext, jt: JobType, payload: dict) -> Any:
    """A result cache entry's value, from the job type that made it. A blocking type runs in a thread, on a
    connection of its own (the event loop's is not for threads); its deferred effects join this job's."""
    if jt.is_async:
        return await jt.handler(ctx, payload)

    def blocking() -> Any:
        with ctx.connect() as conn:
            return jt.handler(replace(ctx, conn=conn, http=None), payload)

    return await asyncio.to_thread(blocking)


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _absolute_http_url(url: str) -> bool:
    """Whether `url` is absolute with scheme http or https and a host: anything else ("", "example.com/x",
    "ftp://...") is refused before a request is attempted, with a message saying so."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


def _statuses(payload: dict) -> list[int] | None:
    expected = require(payload, "expected_status", list, default=None)
    if expected is not None and not all(isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599
                                        for s in expected):
        raise PermanentJobError(f"payload field 'expected_status' must be a list of HTTP statuses (100 to 599), "
                                f"got {shown(expected)}")
    return expected


@job_type("http_call")
async def http_call(ctx: JobContext, payload: dict) -> dict:
    import httpx

    from neurondb.netguard import NetguardError, aread_bounded, guarded_async_client
    from neurondb.providers.transport import MAX_BODY

    url = require(payload, "url", str)
    where = shorten(redact_url(url), 200)     # the URL as every message shows it
    if not _absolute_http_url(url):
        raise PermanentJobError(f"payload field 'url': {where!r} is not an absolute http(s) URL")
    method = require(payload, "method", str, default="GET").upper()
    if method not in METHODS:
        raise PermanentJobError(f"payload field 'method' must be one of {', '.join(METHODS)}, got {shown(method)}")
    headers = require(payload, "headers", dict, default={})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise PermanentJobError("payload field 'headers' must map strings to strings")
    if "json" in payload and "body" in payload:
        raise PermanentJobError("payload may have 'json' or 'body', not both")
    body = require(payload, "body", str, default=None)
    timeout = require(payload, "timeout", float, default=10.0)
    if not 0 < timeout <= 300:
        raise PermanentJobError(f"payload field 'timeout' must be in (0, 300] seconds, got {shown(timeout)}")
    expected = _statuses(payload)
    limit = ctx.config.get_int("http_max_response_size") * 1024
    allowlist = ctx.config.get_str("http_allowlist")
    # One client per allowlist in force, shared by the jobs in flight: a client builds its TLS context once.
    client = loop_local(("http_call", allowlist), lambda: guarded_async_client(allowlist))
    try:
        async with client.stream(method, url, headers=headers, content=body, json=payload.get("json"),
                                 timeout=timeout, extensions={MAX_BODY: limit}) as response:
            content, truncated = await aread_bounded(response, limit)
    except NetguardError as exc:
        if getattr(exc, "retryable", False):
            raise
        raise PermanentJobError(str(exc)) from None
    except httpx.InvalidURL as exc:
        raise PermanentJobError(f"payload field 'url': {where!r} is not a valid URL: {redact_urls(str(exc))}") from None
    except httpx.TooManyRedirects:
        raise PermanentJobError(f"{method} {where}: more redirects than the 5 allowed") from None
    except (httpx.TimeoutException, httpx.TransportError) as exc:
        raise JobError(f"{method} {where}: {type(exc).__name__}: {redact_urls(str(exc))}") from None
    status = response.status_code
    ok = status in expected if expected else 200 <= status < 300
    if not ok:
        message = f"{method} {where} answered {status}" + (f", expected one of {expected}" if expected else "")
        if 400 <= status < 500 and status not in (408, 429):
            raise PermanentJobError(message)
        raise JobError(message)
    text = content.decode(response.encoding or "utf-8", errors="replace")
    return {"status": status, "headers": dict(response.headers), "body": text, "truncated": truncated}
