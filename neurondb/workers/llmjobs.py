"""The LLM worker's records: a claimed job, one provider call, and the outcome of a job.

A `Job` holds the inputs as claimed and, once `prepare`d, its route and cache keys; its only progress is
an embedding's results as they arrive (`fill`), the calls made for it and whether it is settled (`done`).
Which texts wait for a request is the batcher's (workers/batching.py); usage and latency of a finished job
travel in its `Outcome`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from neurondb.llm import cache_key
from neurondb.providers import Route
from neurondb.providers.base import estimate_tokens, invalid_input
from neurondb.providers.http import check_params
from neurondb.workers.leases import Status

RERANK_PARAMS = ("top_n",)



class InvalidJob(Exception):
    """A job whose inputs can never run (a plain INSERT without a prompt ...): it fails at once."""


@dataclass(eq=False)
class Job:
    """A claimed job while this worker holds it."""

    job_id: int
    operation: str
    model: str | None
    provider: str | None          # asked for by the submitter (None: routing decides)
    tenant: str
    input_text: str | None
    system_prompt: str | None
    input_texts: list[str] | None
    documents: list[str] | None
    parameters: dict[str, Any]
    retry_count: int
    limit: int
    route: Route | None = None
    keys: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)      # embedding: the texts, one cache key each
    vectors: list[Any] = field(default_factory=list)     # embedding: each text's vector, None until known
    tokens: float | None = 0.0                           # embedding: prompt tokens of the vectors known
    latency_ms: float = 0.0                              # embedding: the longest call for its vectors
    calls: int = 0
    done: bool = False

    def fill(self, index: int, vector: Any, tokens: float | None, ms: float = 0.0) -> None:
        """Text `index`'s vector is known (from the cache: `ms` 0), with its prompt tokens (None: unknown)."""
        self.vectors[index] = vector
        self.tokens = _add(self.tokens, tokens)
        self.latency_ms = max(self.latency_ms, ms)

    def filled(self) -> bool:
        return all(v is not None for v in self.vectors)


def input_problem(job: Job) -> str | None:
    """What makes the job's inputs unusable (neurondb.llm_check_inputs' messages), or None."""
    if not isinstance(job.parameters, dict):
        return f"LLM job parameters must be a JSON object, got {type(job.parameters).__name__}"
    if job.operation == "completion" and job.input_text is None:
        return "a completion job needs input_text (the prompt)"
    if job.operation == "embedding":
        if (job.input_text is None) == (job.input_texts is None):
            return "an embedding job needs either input_text or input_texts (not both)"
        if job.input_texts is not None and (not job.input_texts or any(t is None for t in job.input_texts)):
            return "input_texts of an embedding job must be a non-empty array without NULLs"
    if job.operation == "reranking" and (job.input_text is None or job.documents is None
                                         or any(d is None for d in job.documents)):
        return "a reranking job needs input_text (the query) and documents (without NULLs)"
    return None


def prepare(job: Job, route_of: Callable[[Job], Route]) -> None:
    """Check the job's inputs, route it (`route_of`, once the inputs are known to be usable) and compute its
    cache keys. Inputs are checked here too because a plain INSERT skips neurondb.llm_check_inputs; the
    messages are the same. Raises InvalidJob or a ProviderError (no route, invalid input or parameters)."""
    problem = input_problem(job)
    if problem:
        raise InvalidJob(problem)
    route = job.route = route_of(job)
    params = job.parameters
    if job.operation == "completion":
        check_params(route.provider, params)      # a bad parameter fails now, before any request
        job.keys = [cache_key("completion", route.provider, route.model, [job.system_prompt or "", job.input_text],
                              params)]
    elif job.operation == "embedding":
        if params:
            raise invalid_input(route.provider, f"embedding jobs take no parameters, got {sorted(params)}")
        job.texts = list(job.input_texts) if job.input_texts is not None else [job.input_text or ""]
        job.keys = [cache_key("embedding", route.provider, route.model, t) for t in job.texts]
        job.vectors = [None] * len(job.texts)
    else:
        unknown = sorted(set(params) - set(RERANK_PARAMS))
        if unknown:
            raise invalid_input(route.provider, f"unknown reranking parameters {unknown}; allowed: top_n")
        job.keys = [cache_key("reranking", route.provider, route.model, [job.input_text, job.documents or []],
                              params)]


@dataclass
class Outcome:
    job: Job
    status: Status
    at: float                     # time.monotonic() when it was decided
    text: str | None = None
    vector: Any = None            # np.ndarray from a provider, list from the cache
    json: Any = None
    cache_hit: bool = False
    error: str = ""
    delay_ms: float = 0.0
    latency_ms: float = 0.0
    prompt_tokens: float | None = None
    completion_tokens: int | None = None


@dataclass(eq=False)
class Call:
    """One provider request: a completion, a reranking, or a batch of embedding texts (job, index)."""

    route: Route
    tenant: str
    jobs: list[Job]
    items: list[tuple[Job, int]] = field(default_factory=list)
    tokens: int = 0               # estimated, taken from the tokens/min bucket

    @classmethod
    def single(cls, job: Job) -> Call:
        """The call of a completion or reranking: its prompt's estimated tokens plus the answer's bound."""
        assert job.route is not None
        tokens = estimate_tokens((job.system_prompt or "") + (job.input_text or "") + "".join(job.documents or ()))
        return cls(job.route, job.tenant, [job], tokens=tokens + int(job.parameters.get("max_tokens") or 0))


def _add(total: float | None, value: float | None) -> float | None:
    """Token counts add up while every part is known; one unknown part makes the sum unknown."""
    if total is None or value is None:
        return None
    return total + value


def as_int(value: float | None) -> int | None:
    return None if value is None else round(value)
