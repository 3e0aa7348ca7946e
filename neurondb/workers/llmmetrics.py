"""What neuranllm counts for the metrics endpoint: provider calls, tokens, 429s, cache lookups, outcomes.

Kept apart from the scheduling loop so the loop calls one method per event. Labels stay bounded: the
provider and model of the call's route, and the HTTP status code (`ok` for a local provider's success,
the error's code, such as `timeout`, or `error` for a call that got no HTTP answer).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from neurondb.observability.recorder import Recorder
from neurondb.providers.base import ProviderError
from neurondb.providers.registry import Route
from neurondb.workers.llmjobs import Outcome

LOCAL = "local"


class LLMMetrics:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def call_succeeded(self, route: Route, seconds: float, operation: str, value: Any) -> None:
        self._call(route, "ok" if route.provider == LOCAL else "200", seconds)
        prompt = completion = None
        if operation == "completion":
            prompt, completion = value.prompt_tokens, value.completion_tokens
        elif operation == "embedding":
            prompt = value[1]
        for kind, tokens in (("prompt", prompt), ("completion", completion)):
            if tokens:
                self.recorder.inc("neurondb_llm_tokens", route.provider, route.model, kind, by=float(tokens))

    def call_failed(self, route: Route, seconds: float, error: BaseException) -> None:
        status = error.status if isinstance(error, ProviderError) else None
        code = str(status) if status is not None else (getattr(error, "code", None) or "error")
        self._call(route, code, seconds)
        if status == 429:
            self.recorder.inc("neurondb_llm_rate_limited", route.provider)
            retry_after = getattr(error, "retry_after", None)
            if retry_after:
                self.recorder.inc("neurondb_llm_retry_after_seconds", route.provider, by=float(retry_after))

    def cache_lookups(self, hits: int, misses: int) -> None:
        for result, n in (("hit", hits), ("miss", misses)):
            if n:
                self.recorder.inc("neurondb_llm_cache_requests", result, by=float(n))

    def outcomes(self, outcomes: Iterable[Outcome]) -> None:
        for (operation, label), n in Counter((o.job.operation, o.status.label) for o in outcomes).items():
            self.recorder.inc("neurondb_llm_jobs", operation, label, by=float(n))

    def _call(self, route: Route, code: str, seconds: float) -> None:
        self.recorder.inc("neurondb_llm_requests", route.provider, route.model, code)
        self.recorder.observe("neurondb_llm_request_duration_seconds", route.provider, route.model, seconds=seconds)
