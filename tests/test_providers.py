"""Providers end to end against a real HTTP server on 127.0.0.1 (tests/fakeprovider.py), plus the local ones.

What matters to the workers built on them: the right vectors in the right order, failures classified as
retryable or not with the provider's own message, and the API key sent where it belongs and nowhere else.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import pickle
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from neurondb.paths import DataDir
from neurondb.providers import onnx
from neurondb.providers.base import Completion, ProviderError, parse_retry_after, redact
from neurondb.providers.http import OpenAICompleter, OpenAIEmbedder, RerankClient, resolve_api_key
from neurondb.providers.local import BM25Reranker, HashEmbedder
from neurondb.providers.registry import completer_for, embedder_for, reranker_for, resolve
from neurondb.settings import Config
from tests.fakeprovider import FakeProvider

KEY = "sk-test-7f3a9c1e5b2d4f6a8c0e"


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider(dim=16) as server:
        yield server


@pytest.fixture(autouse=True)
def _no_env_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys in the developer's environment must neither be sent to the fake server nor change results."""
    for var in ("NEURONDB_LLM_API_KEY", "OPENAI_API_KEY", "COHERE_API_KEY", "CO_API_KEY", "JINA_API_KEY",
                "VLLM_API_KEY", "LLAMA_API_KEY", "TEI_API_KEY", "OLLAMA_API_KEY"):
        monkeypatch.delenv(var, raising=False)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------------------------------------------
# Local providers


def test_hash_embedder_is_deterministic_normalised_float32() -> None:
    texts = ["The quick brown fox", "jumps over the lazy dog", "", "!!!"]
    a = HashEmbedder().embed(texts)
    b = HashEmbedder().embed(list(reversed(texts)))[::-1]
    assert a.dtype == np.float32 and a.shape == (4, 384)
    np.testing.assert_array_equal(a, b)  # another instance, another batch order: the same vectors
    np.testing.assert_allclose(np.linalg.norm(a[:2], axis=1), 1.0, rtol=1e-5)
    assert not a[2].any() and not a[3].any()  # no word characters: the zero vector, not NaN
    single = HashEmbedder(dim=64).embed(["The quick brown fox"])
    assert single.shape == (1, 64)
    np.testing.assert_array_equal(HashEmbedder().embed(["NeuronDB"]), HashEmbedder().embed(["neurondb"]))


def test_hash_embedder_feature_space_is_pinned() -> None:
    """Stored vectors must keep matching new ones: a change to hashing or weights needs a new model name."""
    v = HashEmbedder().embed(["NeuronDB background workers"])[0]
    nonzero = np.flatnonzero(v)
    assert len(nonzero) == 64 and nonzero[:6].tolist() == [4, 34, 35, 44, 47, 50]
    assert v[nonzero[:3]].tolist() == pytest.approx([-0.15011, -0.10508, -0.10508], abs=1e-5)


def test_hash_embedder_similarity_ordering() -> None:
    emb = HashEmbedder()
    v = emb.embed(["the cat sat on the mat", "The cat sat on the mat!", "a cat sat on a mat",
                   "the dog ran in the park", "quarterly stock market report", "embedding vectors",
                   "embeddings vector"])
    assert cosine(v[0], v[1]) == pytest.approx(1.0)  # case and punctuation do not matter
    assert cosine(v[0], v[2]) > 0.5
    assert cosine(v[0], v[2]) > cosine(v[0], v[3]) > cosine(v[0], v[4])
    assert abs(cosine(v[0], v[4])) < 0.15
    assert cosine(v[5], v[6]) > 0.3  # inflections share character n-grams


def test_hash_embedder_rejects_bad_input() -> None:
    with pytest.raises(ProviderError) as info:
        HashEmbedder().embed("not a list")  # type: ignore[arg-type]
    assert not info.value.retryable
    with pytest.raises(ProviderError):
        HashEmbedder().embed(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ProviderError):
        HashEmbedder(dim=4)
    assert HashEmbedder().embed([]).shape == (0, 384)


def test_bm25_ordering() -> None:
    docs = [
        "PostgreSQL background workers run inside the server",
        "A recipe for chocolate cake",
        "Vector search with HNSW indexes in PostgreSQL",
        "HNSW graph: hierarchical navigable small world, a vector index",
    ]
    ranked = BM25Reranker().rerank("hnsw vector index", docs)
    assert [i for i, _ in ranked][:2] == [3, 2]
    assert ranked[-1][1] == 0.0 and {i for i, _ in ranked[2:]} == {0, 1}
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    assert BM25Reranker().rerank("hnsw vector index", docs, top_n=1) == ranked[:1]
    assert BM25Reranker().rerank("anything", []) == []
    with pytest.raises(ProviderError):
        BM25Reranker().rerank("q", docs, top_n=-1)


def test_local_async_entry_points() -> None:
    vectors = asyncio.run(HashEmbedder().aembed(["a b c"]))
    np.testing.assert_array_equal(vectors, HashEmbedder().embed(["a b c"]))
    assert [i for i, _ in asyncio.run(BM25Reranker().arerank("cat", ["dog", "cat"]))] == [1, 0]


# ---------------------------------------------------------------------------------------------------
# HTTP shapes end to end


@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_embeddings_both_shapes(fake: FakeProvider, provider: str) -> None:
    texts = ["first text", "second text", "third one"]
    with OpenAIEmbedder(provider, model="embed-model", endpoint=fake.url, api_key="") as emb:
        vectors = emb.embed(texts)
    np.testing.assert_allclose(vectors, np.asarray(fake.vectors(texts), dtype=np.float32), rtol=1e-6)
    assert vectors.dtype == np.float32 and emb.dim == 16
    sent = fake.requests[-1]
    assert sent.path == ("/api/embed" if provider == "ollama" else "/v1/embeddings")
    assert sent.json == {"model": "embed-model", "input": texts}


def test_openai_embeddings_reordered_by_index_and_v1_endpoint(fake: FakeProvider) -> None:
    emb = OpenAIEmbedder("vllm", model="m", endpoint=fake.url + "/v1/", api_key="")
    body = (b'{"data": [{"index": 1, "embedding": [0, 1]}, {"index": 0, "embedding": [1, 0]}],'
            b' "usage": {"prompt_tokens": 7}}')
    batch = emb.parse_embed_response(200, {}, body, count=2)
    assert batch.vectors.tolist() == [[1.0, 0.0], [0.0, 1.0]] and batch.prompt_tokens == 7
    assert emb.build_embed_request(["x"]).url == fake.url + "/v1/embeddings"
    with pytest.raises(ProviderError, match="expected 3 vectors") as info:
        emb.parse_embed_response(200, {}, body, count=3)
    assert not info.value.retryable


@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_completion_both_shapes(fake: FakeProvider, provider: str) -> None:
    comp = OpenAICompleter(provider, model="chat-model", endpoint=fake.url, api_key="")
    result = comp.complete("tell me a story", system="be brief", params={"temperature": 0.2, "max_tokens": 3,
                                                                          "stop": "\n"})
    assert result == Completion("echo: tell me", 6, 3, "chat-model", "length")
    full = comp.complete("hi")
    assert full.text == "echo: hi" and full.finish_reason == "stop"
    sent = fake.requests[0].json
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me a story"}]
    if provider == "ollama":
        assert sent == {"model": "chat-model", "messages": messages, "stream": False,
                        "options": {"temperature": 0.2, "num_predict": 3, "stop": ["\n"]}}
    else:
        assert sent == {"model": "chat-model", "messages": messages, "temperature": 0.2, "max_tokens": 3,
                        "stop": ["\n"]}


def test_completion_params_are_checked_before_sending(fake: FakeProvider) -> None:
    comp = OpenAICompleter("openai", model="m", endpoint=fake.url, api_key="")
    for params, text in [({"temprature": 1}, "unknown parameter 'temprature'"),
                         ({"temperature": 7}, "temperature must be a number in 0..2"),
                         ({"max_tokens": 0}, "max_tokens must be a positive integer"),
                         ({"seed": 1.5}, "seed must be an integer"),
                         ({"stop": [1]}, "stop must be a string")]:
        with pytest.raises(ProviderError, match=text) as info:
            comp.complete("x", params=params)
        assert not info.value.retryable
    assert fake.count() == 0


@pytest.mark.parametrize("provider", ["cohere", "tei"])
def test_rerank_both_shapes(fake: FakeProvider, provider: str) -> None:
    docs = ["dogs bark", "cat purr and sleep", "a cat", "nothing here"]
    client = RerankClient(provider, model="rerank-model", endpoint=fake.url, api_key="")
    assert client.rerank("sleepy cat purr", docs, top_n=2) == [(1, pytest.approx(2 / 3)), (2, pytest.approx(1 / 3))]
    sent = fake.requests[-1]
    if provider == "tei":
        assert sent.path == "/rerank" and sent.json["texts"] == docs
    else:
        assert sent.path == "/v1/rerank"
        assert sent.json == {"model": "rerank-model", "query": "sleepy cat purr", "documents": docs, "top_n": 2}
    assert client.rerank("q", []) == []
    assert fake.count() == 1


def test_rerank_index_out_of_range_is_invalid() -> None:
    client = RerankClient("cohere", model="m", endpoint="http://127.0.0.1:9", api_key="")
    with pytest.raises(ProviderError, match="outside the 2 documents"):
        client.parse_rerank_response(200, {}, b'{"results": [{"index": 5, "relevance_score": 1}]}', count=2)


def test_async_entry_points_share_one_client(fake: FakeProvider) -> None:
    emb = OpenAIEmbedder("openai", model="m", endpoint=fake.url, api_key="")
    comp = OpenAICompleter("openai", model="m", endpoint=fake.url, api_key="")
    rr = RerankClient("jina", model="m", endpoint=fake.url, api_key="")
    fake.set_delay(200)

    async def run() -> tuple[np.ndarray, list[Completion], list[tuple[int, float]]]:
        async with httpx.AsyncClient() as client:
            vectors = await emb.aembed(["x y"], client=client)
            completions = await asyncio.gather(*(comp.acomplete(f"p{i}", client=client) for i in range(8)))
            ranked = await rr.arerank("x", ["y", "x"], client=client)
        return vectors, completions, ranked

    start = time.monotonic()
    vectors, completions, ranked = asyncio.run(run())
    elapsed = time.monotonic() - start
    assert vectors.shape == (1, 16)
    assert [c.text for c in completions] == [f"echo: p{i}" for i in range(8)]
    assert ranked[0][0] == 1
    assert elapsed < 1.5  # the 8 completions ran concurrently: ~3 x 200 ms, not 10 x 200 ms
    assert asyncio.run(comp.acomplete("solo")).text == "echo: solo"  # without a client: one made per call


# ---------------------------------------------------------------------------------------------------
# Error classification


def _error_of(call: object) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        call()  # type: ignore[operator]
    return info.value


def test_429_with_and_without_retry_after(fake: FakeProvider) -> None:
    emb = OpenAIEmbedder("openai", model="m", endpoint=fake.url, api_key="")
    fake.fail(429, retry_after=3)
    err = _error_of(lambda: emb.embed(["x"]))
    assert err.retryable and err.status == 429 and err.retry_after == 3.0
    assert "Rate limit reached" in str(err) and str(err).startswith("openai: HTTP 429: ")
    fake.fail(429)
    err = _error_of(lambda: emb.embed(["x"]))
    assert err.retryable and err.retry_after is None
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    fake.fail(429, retry_after=when)
    err = _error_of(lambda: emb.embed(["x"]))
    assert 27 <= err.retry_after <= 31  # type: ignore[operator]
    assert emb.embed(["x"]).shape == (1, 16)  # faults used up: the next call succeeds


def test_retry_after_parsing() -> None:
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"Retry-After": "1.5"}) == 1.5
    assert parse_retry_after({"Retry-After": "-4"}) == 0.0
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


def test_500_408_retryable_400_not(fake: FakeProvider) -> None:
    comp = OpenAICompleter("openai", model="m", endpoint=fake.url, api_key="")
    fake.fail(500)
    err = _error_of(lambda: comp.complete("x"))
    assert err.retryable and err.status == 500 and "The server had an error" in err.message
    fake.fail(408)
    assert _error_of(lambda: comp.complete("x")).retryable
    fake.fail(400, message="Invalid 'messages[0].content': string too long.", code="string_above_max_length")
    err = _error_of(lambda: comp.complete("x"))
    assert not err.retryable and err.status == 400 and err.code == "string_above_max_length"
    assert err.message == "Invalid 'messages[0].content': string too long."
    fake.fail(404, endpoint="/v1/chat/completions")
    assert not _error_of(lambda: comp.complete("x")).retryable


def test_context_length_is_never_retryable(fake: FakeProvider) -> None:
    comp = OpenAICompleter("ollama", model="m", endpoint=fake.url, api_key="")
    fake.fail(500, message="input length exceeds the context length")
    err = _error_of(lambda: comp.complete("x"))
    assert not err.retryable and err.code == "context_length_exceeded"
    fake.fail(400, message="This model's maximum context length is 8192 tokens.", code="context_length_exceeded")
    assert not _error_of(lambda: comp.complete("x")).retryable


def test_dropped_connection_refused_connection_and_timeout_are_retryable(fake: FakeProvider) -> None:
    emb = OpenAIEmbedder("openai", model="m", endpoint=fake.url, api_key="", timeout=0.2)
    fake.drop(endpoint="/v1/embeddings")
    err = _error_of(lambda: emb.embed(["x"]))
    assert err.retryable and err.status is None and "connection dropped" in err.message
    fake.set_delay(600)
    err = _error_of(lambda: emb.embed(["x"]))
    assert err.retryable and err.code == "timeout" and "timed out after 0.2s" in err.message
    closed = OpenAIEmbedder("openai", model="m", endpoint="http://127.0.0.1:9", api_key="")
    err = _error_of(lambda: closed.embed(["x"]))
    assert err.retryable and "cannot connect to http://127.0.0.1:9" in err.message


def test_async_errors_are_classified_the_same(fake: FakeProvider) -> None:
    emb = OpenAIEmbedder("openai", model="m", endpoint=fake.url, api_key="")
    fake.fail(429, retry_after=1)
    fake.drop()
    fake.fail(400)
    errors = []
    for _ in range(3):
        with pytest.raises(ProviderError) as info:
            asyncio.run(emb.aembed(["x"]))
        errors.append((info.value.retryable, info.value.status, info.value.retry_after))
    assert errors == [(True, 429, 1.0), (True, None, None), (False, 400, None)]


def test_non_json_success_is_an_invalid_response(fake: FakeProvider) -> None:
    emb = OpenAIEmbedder("openai", model="m", endpoint=fake.url, api_key="")
    err = _error_of(lambda: emb.parse_embed_response(200, {}, b"<html>proxy login</html>"))
    assert not err.retryable and err.code == "invalid_response"


def test_provider_error_survives_pickling() -> None:
    err = ProviderError("slow down", retryable=True, provider="openai", status=429, retry_after=2.0, code="rate")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.retryable, copy.status, copy.retry_after, copy.code, str(copy)) == (True, 429, 2.0, "rate",
                                                                                      str(err))


# ---------------------------------------------------------------------------------------------------
# API keys


def test_key_is_sent_as_bearer_and_nowhere_else() -> None:
    with FakeProvider(api_key=KEY) as fake:
        emb = OpenAIEmbedder("openai", model="m", endpoint=fake.url, api_key=KEY)
        comp = OpenAICompleter("openai", model="m", endpoint=fake.url, api_key=KEY)
        emb.embed(["hello"])
        comp.complete("hello")
        for req in fake.requests:
            assert req.headers["authorization"] == f"Bearer {KEY}"
            others = {k: v for k, v in req.headers.items() if k != "authorization"}
            assert KEY not in repr(others) and KEY.encode() not in req.body


def test_key_never_in_errors_or_repr() -> None:
    wrong = "sk-wrong-0123456789abcdef"
    with FakeProvider(api_key=KEY) as fake:
        emb = OpenAIEmbedder("openai", model="m", endpoint=fake.url, api_key=wrong)
        err = _error_of(lambda: emb.embed(["x"]))  # the server echoes the presented key in its 401
        assert err.status == 401 and not err.retryable
        assert wrong not in str(err) and wrong not in repr(err) and "Incorrect API key" in err.message
        comp = OpenAICompleter("openai", model="m", endpoint=fake.url, api_key=KEY)
        fake.fail(400, message=f"bad header Authorization: Bearer {KEY} in request {{'key': '{KEY}'}}")
        err = _error_of(lambda: comp.complete("x"))
        assert KEY not in str(err) and "[redacted]" in str(err)
        for provider in (emb, comp, RerankClient("cohere", model="m", endpoint=fake.url, api_key=KEY)):
            assert KEY not in repr(provider) and KEY not in repr(vars(provider)) and "api_key=set" in repr(provider)
        request = comp.build_complete_request("x")
        assert KEY not in repr(request) and request.headers["Authorization"] == f"Bearer {KEY}"
    assert redact(f"token {KEY} and Bearer abc.def", [KEY]) == "token [redacted] and Bearer [redacted]"


def test_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEURONDB_LLM_API_KEY", "generic-key")
    assert resolve_api_key("ollama").reveal() == "generic-key"  # type: ignore[union-attr]
    monkeypatch.setenv("OPENAI_API_KEY", "openai-key")
    assert resolve_api_key("openai").reveal() == "openai-key"  # type: ignore[union-attr]
    assert resolve_api_key("cohere").reveal() == "generic-key"  # type: ignore[union-attr]
    monkeypatch.delenv("NEURONDB_LLM_API_KEY")
    assert resolve_api_key("cohere") is None
    with FakeProvider() as fake:
        OpenAIEmbedder("openai", model="m", endpoint=fake.url).embed(["x"])  # api_key=None: environment
        assert fake.requests[0].headers["authorization"] == "Bearer openai-key"


def test_key_file_must_be_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    os.chmod(path, 0o600)
    assert resolve_api_key("openai", path).reveal() == KEY  # type: ignore[union-attr]
    os.chmod(path, 0o640)
    err = _error_of(lambda: resolve_api_key("openai", path))
    assert "accessible to group or others (mode 0640)" in err.message and "chmod 600" in err.message
    assert not err.retryable and KEY not in str(err)
    assert "cannot read API key file" in _error_of(lambda: resolve_api_key("openai", tmp_path / "nope")).message


# ---------------------------------------------------------------------------------------------------
# Registry


def _config(tmp_path: Path, **settings: str) -> Config:
    datadir = DataDir(tmp_path)
    datadir.init()
    datadir.conf.write_text("".join(f"neurondb.{k} = '{v}'\n" for k, v in settings.items()))
    return Config.load(datadir)


def test_registry_local_defaults(tmp_path: Path) -> None:
    config = _config(tmp_path)
    emb = embedder_for(config)
    assert isinstance(emb, HashEmbedder) and emb.model == "hash-384"
    assert embedder_for(config, "hash-128").dim == 128
    assert embedder_for(config) is emb  # local providers are shared within the process
    assert isinstance(reranker_for(config), BM25Reranker)
    err = _error_of(lambda: completer_for(config))
    assert not err.retryable and "local does not serve completions" in err.message
    err = _error_of(lambda: embedder_for(config, "gpt-4o"))
    assert not err.retryable and "unknown local embedding model 'gpt-4o'" in err.message
    err = _error_of(lambda: embedder_for(config, provider="nosuch"))
    assert str(err).startswith("provider: 'nosuch' is not one of: local, openai, ollama"), str(err)


def test_registry_routes_and_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    config = _config(tmp_path, llm_provider="openai", llm_endpoint="http://127.0.0.1:8001", llm_model="gpt-4o-mini",
                     llm_routes="llama3=ollama@http://127.0.0.1:11434, bge-*=tei@http://127.0.0.1:8080, "
                                "bge-reranker-*=cohere@http://127.0.0.1:9000")
    assert resolve(config, "complete") == ("openai", "http://127.0.0.1:8001", "gpt-4o-mini")
    assert resolve(config, "complete", "llama3") == ("ollama", "http://127.0.0.1:11434", "llama3")
    assert resolve(config, "embed", "bge-m3") == ("tei", "http://127.0.0.1:8080", "bge-m3")
    assert resolve(config, "rerank", "bge-reranker-v2") == ("cohere", "http://127.0.0.1:9000", "bge-reranker-v2")
    assert resolve(config, "embed", "x", provider="ollama") == ("ollama", "http://127.0.0.1:11434", "x")
    assert resolve(config, "embed", "bge-m3", provider="tei") == ("tei", "http://127.0.0.1:8080", "bge-m3")
    assert resolve(config, "embed", "bge-m3", provider="openai") == ("openai", "http://127.0.0.1:8001", "bge-m3")
    # A job or an index (any database login writes them) may not pick a provider the operator did not enable:
    # it would be a host reached with the operator's key (issue 9, defect 10).
    refused = _error_of(lambda: embedder_for(config, "x", provider="jina"))
    assert str(refused).startswith("provider: 'jina' is not enabled on this installation (enabled: cohere, local, "
                                   "ollama, openai, tei)"), str(refused)
    comp = completer_for(config, "llama3")
    assert isinstance(comp, OpenAICompleter) and comp.style == "ollama" and "api_key=none" in repr(comp)
    openai = completer_for(config)
    assert openai.endpoint == "http://127.0.0.1:8001" and "api_key=set" in repr(openai)
    assert openai.timeout == 30.0  # neuranllm_timeout
    assert isinstance(reranker_for(config, "bge-reranker-v2"), RerankClient)
    assert "does not serve reranking" in _error_of(lambda: reranker_for(config)).message  # openai: no rerank


def test_registry_key_file_relative_to_data_dir(tmp_path: Path) -> None:
    (tmp_path / "secret").mkdir()
    key = tmp_path / "secret" / "key"
    key.write_text(KEY)
    os.chmod(key, 0o644)
    with FakeProvider(api_key=KEY) as fake:
        config = _config(tmp_path, llm_provider="vllm", llm_endpoint=fake.url, llm_model="served",
                         llm_api_key_file="secret/key")
        assert "chmod 600" in _error_of(lambda: embedder_for(config)).message
        os.chmod(key, 0o600)
        assert embedder_for(config).embed(["x"]).shape == (1, 16)
        assert fake.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_registry_onnx_model_name(tmp_path: Path) -> None:
    config = _config(tmp_path)
    if onnx.available():
        assert embedder_for(config, "all-MiniLM-L6-v2").dim == 384
    else:
        err = _error_of(lambda: embedder_for(config, "minilm"))
        assert "install neurondb[onnx]" in err.message and not err.retryable


# ---------------------------------------------------------------------------------------------------
# ONNX MiniLM (optional extra)


def test_onnx_without_the_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx, "importlib", SimpleNamespace(util=SimpleNamespace(find_spec=lambda name: None)))
    assert not onnx.available()
    err = _error_of(onnx.require)
    assert "install neurondb[onnx]" in str(err) and not err.retryable
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    err = _error_of(lambda: onnx.OnnxMiniLMEmbedder("model.onnx", "tokenizer.json").embed(["x"]))
    assert "needs the Python package onnxruntime: install neurondb[onnx]" in str(err)


@pytest.mark.skipif(not onnx.available(), reason="extra not installed: pip install 'neurondb[onnx]'")
def test_onnx_minilm_semantic_similarity() -> None:
    emb = onnx.OnnxMiniLMEmbedder()
    v = emb.embed(["How do I reset my password?", "I forgot my login credentials", "Weather forecast for Paris",
                   "How do I reset my password?"])
    assert v.shape == (4, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(v[0], v[3], atol=1e-6)
    # Semantic, not lexical: no shared word, yet closer than the unrelated sentence.
    assert cosine(v[0], v[1]) > 0.4 > cosine(v[0], v[2])
