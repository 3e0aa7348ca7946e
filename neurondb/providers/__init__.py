"""Embedding, reranking and completion providers shared by the queue worker and the LLM worker.

    from neurondb.providers import embedder_for
    vectors = embedder_for(config).embed(["some text"])      # hash-384 offline by default

`base` defines the interfaces and ProviderError (retryable or not); `local` the offline hash embedder and
BM25 reranker; `http` the OpenAI / Ollama / rerank-API clients; `onnx` the optional MiniLM embedder;
`registry` picks one from the settings.
"""

from neurondb.providers.base import Completer, Completion, Embedder, ProviderError, Reranker, Secret
from neurondb.providers.http import OpenAICompleter, OpenAIEmbedder, RerankClient, resolve_api_key
from neurondb.providers.local import BM25Reranker, HashEmbedder
from neurondb.providers.registry import Route, completer_for, embedder_for, reranker_for, resolve

__all__ = [
    "BM25Reranker",
    "Completer",
    "Completion",
    "Embedder",
    "HashEmbedder",
    "OpenAICompleter",
    "OpenAIEmbedder",
    "ProviderError",
    "RerankClient",
    "Reranker",
    "Route",
    "Secret",
    "completer_for",
    "embedder_for",
    "reranker_for",
    "resolve",
    "resolve_api_key",
]
