"""Which provider serves a model, from the settings, as both workers must agree on it.

Resolution of (operation, model, provider) -> Route(provider, endpoint, model):
  1. an explicit `provider` argument wins (a job that names its provider; a route for the model to that
     same provider still gives the endpoint), if the operator enabled that provider: `local`, the
     configured llm_provider, or one named in llm_routes. A job row or an index is written by any
     database login, and a provider it could pick freely would be a host the service reaches with the
     operator's API key that the operator never chose;
  2. else the first neurondb.llm_routes entry matching the model: an exact name before any prefix
     pattern ("gpt-*"), the longest prefix first;
  3. else neurondb.llm_provider (default `local`).
The endpoint is the route's, else neurondb.llm_endpoint when the provider is the configured
llm_provider, else the provider's usual default. The model is the one asked for, else neurondb.llm_model,
else the provider's default model for that operation (where it has one).

Local models: embeddings "hash-384" (default; "hash-N" for N dimensions) and "all-MiniLM-L6-v2" (alias
"minilm", the optional ONNX extra); reranking "bm25". Local providers are cached per process (the ONNX
session takes ~1 s and ~100 MB to load; the hash embedder keeps a word cache); HTTP providers are cheap
to build and are made per call.
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple, Protocol

from neurondb.providers.base import Completer, Embedder, ProviderError, Reranker
from neurondb.providers.http import (
    DEFAULT_ENDPOINTS,
    OpenAICompleter,
    OpenAIEmbedder,
    RerankClient,
    key_file_path,
    resolve_api_key,
)
from neurondb.providers.local import BM25Reranker, HashEmbedder
from neurondb.redaction import shown
from neurondb.settings import LLM_PROVIDERS, LlmRoute, parse_llm_routes

LOCAL = "local"
OPERATIONS = ("embed", "rerank", "complete")
# Which operation each provider serves here, and through which client.
SERVES: dict[str, frozenset[str]] = {
    "local": frozenset({"embed", "rerank"}),
    "openai": frozenset({"embed", "complete"}),
    "ollama": frozenset({"embed", "complete"}),
    "vllm": frozenset({"embed", "complete", "rerank"}),
    "llamacpp": frozenset({"embed", "complete", "rerank"}),
    "tei": frozenset({"embed", "rerank"}),
    "cohere": frozenset({"rerank"}),
    "jina": frozenset({"embed", "rerank"}),
}
# The model used when neither the job nor neurondb.llm_model names one. vLLM serves whatever it was
# started with, so it has no default: the operator must name it. llama.cpp and TEI ignore the name.
DEFAULT_MODELS: dict[tuple[str, str], str] = {
    ("local", "embed"): "hash-384",
    ("local", "rerank"): "bm25",
    ("openai", "embed"): "text-embedding-3-small",
    ("openai", "complete"): "gpt-4o-mini",
    ("ollama", "embed"): "nomic-embed-text",
    ("ollama", "complete"): "llama3.2",
    ("cohere", "rerank"): "rerank-v3.5",
    ("jina", "embed"): "jina-embeddings-v3",
    ("jina", "rerank"): "jina-reranker-v2-base-multilingual",
    **{("llamacpp", op): "default" for op in ("embed", "complete", "rerank")},
    **{("tei", op): "default" for op in ("embed", "rerank")},
}
ONNX_ALIASES = frozenset({"all-minilm-l6-v2", "minilm", "onnx-minilm", "sentence-transformers/all-minilm-l6-v2"})
_HASH_MODEL = re.compile(r"^hash(?:-(\d+))?$")
_OPERATION_WORDS = {"embed": "embeddings", "rerank": "reranking", "complete": "completions"}


class ConfigLike(Protocol):
    """What is read from neurondb.settings.Config: typed values by name (and `datadir` for the key file)."""

    def get_str(self, name: str) -> str: ...

    def get_seconds(self, name: str) -> float: ...


class Route(NamedTuple):
    """Where one operation on one model goes."""

    provider: str
    endpoint: str  # "" for local
    model: str


def _error(message: str, provider: str = LOCAL) -> ProviderError:
    return ProviderError(message, retryable=False, provider=provider, code="config")


def match_route(routes: list[LlmRoute], model: str) -> LlmRoute | None:
    """The route for `model`: an exact entry, else the longest matching "prefix*" entry."""
    for route in routes:
        if not route.model.endswith("*") and route.model == model:
            return route
    best: LlmRoute | None = None
    for route in routes:
        prefix = route.model.endswith("*") and model.startswith(route.model[:-1])
        if prefix and (best is None or len(route.model) > len(best.model)):
            best = route
    return best


def resolve(config: ConfigLike, operation: str, model: str | None = None, provider: str | None = None) -> Route:
    """The Route for `operation` ("embed", "rerank" or "complete"); see the module docstring."""
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")
    configured = config.get_str("llm_provider")
    name = model or config.get_str("llm_model")
    routes = parse_llm_routes(config.get_str("llm_routes"))
    route = match_route(routes, name) if name else None
    if provider:
        chosen = provider.strip().lower()
        if chosen not in LLM_PROVIDERS:
            raise _error(f"provider: {shown(provider)} is not one of: {', '.join(LLM_PROVIDERS)}", "")
        enabled = sorted({LOCAL, configured, *(r.provider for r in routes)})
        if chosen not in enabled:
            raise _error(f"provider: {shown(provider)} is not enabled on this installation (enabled: "
                         f"{', '.join(enabled)}); the operator enables a provider with neurondb.llm_provider or "
                         "neurondb.llm_routes in neurondb.conf", "")
        # A route to the same provider still says where that provider lives for this model.
        endpoint = route.endpoint if route and route.provider == chosen else ""
    else:
        chosen, endpoint = (route.provider, route.endpoint) if route else (configured, "")
    if chosen != LOCAL:
        if not endpoint and chosen == configured:
            endpoint = config.get_str("llm_endpoint")
        endpoint = endpoint or DEFAULT_ENDPOINTS[chosen]
    if operation not in SERVES[chosen]:
        served = ", ".join(sorted(p for p, ops in SERVES.items() if operation in ops))
        raise _error(f"provider {chosen} does not serve {_OPERATION_WORDS[operation]}; providers that do: {served} "
                     "(set neurondb.llm_provider or route the model with neurondb.llm_routes)", chosen)
    if not name:
        name = DEFAULT_MODELS.get((chosen, operation), "")
        if not name:
            raise _error(f"no model named for {_OPERATION_WORDS[operation]} and provider {chosen} has no default; "
                         "name the model in the job or set neurondb.llm_model", chosen)
    return Route(chosen, endpoint, name)


def _api_key(config: ConfigLike, provider: str) -> Any:
    datadir = getattr(config, "datadir", None)
    path = key_file_path(config.get_str("llm_api_key_file"), getattr(datadir, "root", None))
    return resolve_api_key(provider, path)


def _timeout(config: ConfigLike, timeout: float | None) -> float:
    if timeout is not None:
        return timeout
    return config.get_seconds("neuranllm_timeout")


@functools.lru_cache(maxsize=16)
def _local_embedder(model: str) -> Embedder:
    match = _HASH_MODEL.match(model.lower())
    if match:
        return HashEmbedder(int(match.group(1) or 384))
    if model.lower() in ONNX_ALIASES:
        from neurondb.providers import onnx

        onnx.require()
        return onnx.OnnxMiniLMEmbedder()
    raise _error(f"unknown local embedding model {shown(model)}; local models are hash-384 (or hash-N) and "
                 "all-MiniLM-L6-v2 (with neurondb[onnx])")


def embedder_for(config: ConfigLike, model: str | None = None, provider: str | None = None, *,
                 timeout: float | None = None) -> Embedder:
    """The embedder serving `model` (default: see resolve). `timeout` (s) defaults to neuranllm_timeout."""
    route = resolve(config, "embed", model, provider)
    if route.provider == LOCAL:
        return _local_embedder(route.model)
    return OpenAIEmbedder(route.provider, model=route.model, endpoint=route.endpoint,
                          api_key=_api_key(config, route.provider) or "", timeout=_timeout(config, timeout))


def reranker_for(config: ConfigLike, model: str | None = None, provider: str | None = None, *,
                 timeout: float | None = None) -> Reranker:
    """The reranker serving `model`; locally "bm25"."""
    route = resolve(config, "rerank", model, provider)
    if route.provider == LOCAL:
        if route.model.lower() != "bm25":
            raise _error(f"unknown local rerank model {shown(route.model)}; the local reranker is bm25")
        return BM25Reranker()
    return RerankClient(route.provider, model=route.model, endpoint=route.endpoint,
                        api_key=_api_key(config, route.provider) or "", timeout=_timeout(config, timeout))


def completer_for(config: ConfigLike, model: str | None = None, provider: str | None = None, *,
                  timeout: float | None = None) -> Completer:
    """The chat-completion client serving `model`. There is no local completion model."""
    route = resolve(config, "complete", model, provider)
    return OpenAICompleter(route.provider, model=route.model, endpoint=route.endpoint,
                           api_key=_api_key(config, route.provider) or "", timeout=_timeout(config, timeout))
