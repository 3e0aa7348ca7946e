"""LLM jobs from the application's side: submit, inspect, wait; and the cache key the worker uses.

Thin functions over the named queries in `sql/queries/llm.sql`; the same exists in SQL
(`neurondb.llm_submit(...)`, or a plain INSERT into `neurondb.neurondb_llm_jobs`) and on the command line
(`neurondb llm submit|show|list`). The worker (neuranllm) picks a job up within milliseconds of its
commit (the insert sends a NOTIFY).

    from neurondb import llm
    job_id = llm.submit(conn, "completion", "gpt-4o-mini", "Say hello", parameters={"max_tokens": 20})
    job = llm.wait(conn, job_id)            # the row, once completed, failed or cancelled
    job["result_text"], job["prompt_tokens"], job["cache_hit"]
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, overload

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from neurondb.queries import query

if TYPE_CHECKING:
    from neurondb.providers.registry import ConfigLike

OPERATIONS = ("completion", "embedding", "reranking")
# The provider registry's name of each operation (neurondb.providers.registry.SERVES).
PROVIDER_OPERATIONS = {"completion": "complete", "embedding": "embed", "reranking": "rerank"}
ALIASES = {"complete": "completion", "embed": "embedding", "rerank": "reranking"}
CACHE_KEY_VERSION = 1   # bump when the normalisation changes: old entries then simply stop matching


def operation_name(operation: str) -> str:
    """The canonical operation for `operation` or its alias; ValueError for anything else."""
    op = operation.strip().lower()
    op = ALIASES.get(op, op)
    if op not in OPERATIONS:
        raise ValueError(f"unknown LLM operation {operation!r}: operations are {', '.join(OPERATIONS)} "
                         f"(aliases {', '.join(ALIASES)})")
    return op


def normalise_text(text: str) -> str:
    """The form of an input that the cache compares: Unicode NFC, line endings as \\n, no surrounding
    whitespace. Two inputs that differ only in those ways get the same answer from any model, so they
    share one cache entry; anything else (case, inner spacing) can change an answer and is kept."""
    return unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").strip()


def cache_key(operation: str, provider: str, model: str, inputs: Any,
              parameters: Mapping[str, Any] | None = None) -> str:
    """Key of a cached result: sha256 over the operation, the provider and model that answer it, the
    normalised input and the parameters (sorted), so equal requests share an entry and nothing else does.

    `inputs` is the prompt (with its system prompt, as a pair) for a completion, the one text for an
    embedding (each text of a multi-text job is cached on its own), the query with its documents for a
    reranking. A `cache_refresh` job can expire entries by these keys.
    """
    def norm(value: Any) -> Any:
        if isinstance(value, str):
            return normalise_text(value)
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        return value

    payload = orjson.dumps([CACHE_KEY_VERSION, operation_name(operation), provider, model, norm(inputs),
                            dict(parameters or {})], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(payload).hexdigest()


# -- submitting ---------------------------------------------------------------------------------------------

def submit(conn: psycopg.Connection, operation: str, model_name: str | None = None, input_text: str | None = None, *,
           system_prompt: str | None = None, input_texts: Sequence[str] | None = None,
           documents: Sequence[str] | None = None, parameters: Mapping[str, Any] | None = None,
           tenant_id: str = "default", priority: int = 0, run_at: datetime | None = None,
           max_retries: int | None = None, provider: str | None = None, config: ConfigLike | None = None) -> int:
    """Submit one job (see `neurondb.llm_submit` in sql/005_llm.sql for the fields); its id.

    A job that cannot run (a completion without a prompt, a reranking without documents ...) is refused
    here with psycopg's error carrying the database's message. Given the service's `config`
    (`neurondb.settings.Config.load(datadir)`), a job its provider cannot serve (a completion on the
    default `local` provider, a provider not enabled ...) is then refused too, its insert rolled back,
    with the ProviderError the worker would otherwise record in the job's error_message."""
    # Checked: insert first (the input's own errors come first) in a transaction or savepoint to roll back.
    with conn.transaction() if config is not None else contextlib.nullcontext():
        job_id = conn.execute(query("llm", "submit"), {
            "operation": operation, "model_name": model_name, "input_text": input_text,
            "system_prompt": system_prompt, "input_texts": list(input_texts) if input_texts is not None else None,
            "documents": list(documents) if documents is not None else None,
            "parameters": Jsonb(dict(parameters or {})), "tenant_id": tenant_id, "priority": priority,
            "run_at": run_at, "max_retries": max_retries, "provider": provider,
        }).fetchone()[0]
        if config is not None:
            from neurondb.providers.registry import resolve  # the HTTP clients load only for a checked submit

            resolve(config, PROVIDER_OPERATIONS[operation_name(operation)], model_name, provider)
    return job_id


_JOB_FIELDS = ("operation", "model_name", "provider", "tenant_id", "priority", "input_text", "system_prompt",
               "input_texts", "documents", "parameters", "run_at", "max_retries")


def submit_many(conn: psycopg.Connection, operation: str, items: Iterable[str | Mapping[str, Any]], *,
                model_name: str | None = None, **common: Any) -> list[int]:
    """Submit many jobs in one statement (one round trip, one NOTIFY); their ids in input order.

    Each item is the job's input_text, or a mapping of its own fields (input_text, input_texts, documents,
    system_prompt, parameters, tenant_id, priority, ...); `common` fields apply to every item that does
    not set them. The whole statement fails if one job cannot run, leaving nothing submitted."""
    unknown = set(common) - set(_JOB_FIELDS)
    if unknown:
        raise TypeError(f"unknown job fields {sorted(unknown)}; fields are {', '.join(_JOB_FIELDS)}")
    jobs = []
    for item in items:
        fields = {"input_text": item} if isinstance(item, str) else dict(item)
        bad = set(fields) - set(_JOB_FIELDS)
        if bad:
            raise TypeError(f"unknown job fields {sorted(bad)}; fields are {', '.join(_JOB_FIELDS)}")
        job = {"operation": operation, "model_name": model_name, **common, **fields}
        if isinstance(job.get("run_at"), datetime):
            job["run_at"] = job["run_at"].isoformat()
        jobs.append(Jsonb({k: v for k, v in job.items() if v is not None}))
    if not jobs:
        return []
    return [r[0] for r in conn.execute(query("llm", "submit_many"), {"jobs": jobs}).fetchall()]


# -- reading ------------------------------------------------------------------------------------------------

def get(conn: psycopg.Connection, job_id: int) -> dict[str, Any] | None:
    """The job's row (inputs, status, results, attempts), or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("llm", "job"), {"ids": [job_id]}).fetchone()


def list_jobs(conn: psycopg.Connection, *, status: str | None = None, operation: str | None = None,
              tenant_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Recent jobs, newest first, without their inputs and results (`get` has those)."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("llm", "list_jobs"), {
            "status": status, "operation": operation_name(operation) if operation else None,
            "tenant_id": tenant_id, "limit": limit}).fetchall()


@overload
def wait(conn: psycopg.Connection, job_ids: int, timeout: float = ...) -> dict[str, Any]: ...
@overload
def wait(conn: psycopg.Connection, job_ids: Sequence[int], timeout: float = ...) -> list[dict[str, Any]]: ...


def wait(conn: psycopg.Connection, job_ids: int | Sequence[int], timeout: float = 60.0) -> Any:
    """Block until the job (or every job of a list) is finished (completed, failed or cancelled); the row(s),
    in the order asked.

    Polls one cheap count, from 5 ms up to 200 ms apart: a result is seen within a few ms of its commit
    for short jobs without hammering the server for long ones. TimeoutError names how many are unfinished.
    """
    single = isinstance(job_ids, int)
    ids = [job_ids] if single else list(job_ids)
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        left = conn.execute(query("llm", "unfinished"), {"ids": ids}).fetchone()[0]
        if left == 0:
            break
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{left} of {len(ids)} LLM jobs still unfinished after {timeout:g} s")
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 1.5, 0.2)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = {r["job_id"]: r for r in cur.execute(query("llm", "job"), {"ids": ids}).fetchall()}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise LookupError(f"no LLM job {missing[0]}")
    return rows[ids[0]] if single else [rows[i] for i in ids]
