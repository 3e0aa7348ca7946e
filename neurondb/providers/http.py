"""HTTP providers: OpenAI-compatible embeddings and chat completions (and Ollama's native API), rerank APIs.

Each provider is split in three so that the queue worker (synchronous) and the LLM worker (asyncio, one
pooled httpx.AsyncClient for all its concurrent calls) share everything but the socket work:

    build_*_request(...)          -> HttpRequest(method, url, headers, json)     pure, validates input
    send(req) / await asend(req)  -> RawResponse(status, headers, body)          transport only
    parse_*_response(status, headers, body) -> result                            pure, raises ProviderError

`embed()` / `aembed()`, `complete()` / `acomplete()`, `rerank()` / `arerank()` are the three composed.
A caller that wants more than the composed result (the LLM worker wants token counts of an embedding
batch) calls the pieces itself. Every failure comes out as a ProviderError classified as retryable or
not; nothing raised here carries the API key, the Authorization header or the request body.

The endpoint is trusted configuration (neurondb.llm_endpoint / llm_routes, set by the operator), so these
clients are not behind the SSRF guard that protects http_call jobs, which take URLs from job payloads.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np
import orjson

from neurondb.providers.base import (
    Completer,
    Completion,
    Embedder,
    ProviderError,
    Reranker,
    Secret,
    check_texts,
    check_top_n,
    decode_json,
    error_from_response,
    invalid_input,
    invalid_response,
    redact,
)
from neurondb.redaction import redact_url, shown

DEFAULT_ENDPOINTS = {
    "openai": "https://api.openai.com",
    "ollama": "http://127.0.0.1:11434",
    "vllm": "http://127.0.0.1:8000",
    "llamacpp": "http://127.0.0.1:8080",
    "tei": "http://127.0.0.1:8080",
    "cohere": "https://api.cohere.com",
    "jina": "https://api.jina.ai",
}
GENERIC_KEY_ENV = "NEURONDB_LLM_API_KEY"
# Provider-specific variables win over the generic one: in a mixed setup (llm_routes) a single generic key
# would otherwise be sent to every provider, including ones it was never meant for.
PROVIDER_KEY_ENV: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "cohere": ("COHERE_API_KEY", "CO_API_KEY"),
    "jina": ("JINA_API_KEY",),
    "vllm": ("VLLM_API_KEY",),
    "llamacpp": ("LLAMA_API_KEY",),
    "tei": ("TEI_API_KEY",),
    "ollama": ("OLLAMA_API_KEY",),
}
USER_AGENT = "neurondb"


# ---------------------------------------------------------------------------------------------------
# API keys


def read_key_file(path: str | os.PathLike[str], provider: str) -> Secret:
    """The key in `path`, which must be a regular file owned by this user and closed to group and others.

    The mode is checked on the opened descriptor, so the file checked is the file read. A key file that
    others can read is refused rather than used: the key has already leaked to them, and quietly going
    on would hide it.
    """
    where = os.fspath(path)
    try:
        fd = os.open(where, os.O_RDONLY)
    except OSError as exc:
        raise ProviderError(f"cannot read API key file {where}: {exc.strerror}", retryable=False,
                            provider=provider, code="config") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ProviderError(f"API key file {where} is not a regular file", retryable=False,
                                provider=provider, code="config")
        if info.st_mode & 0o077:
            raise ProviderError(
                f"refusing to use API key file {where}: it is accessible to group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); make it owner-only: chmod 600 {where}",
                retryable=False, provider=provider, code="config")
        if info.st_uid != os.geteuid():
            raise ProviderError(
                f"refusing to use API key file {where}: it is owned by uid {info.st_uid}, "
                f"not by this user (uid {os.geteuid()})", retryable=False, provider=provider, code="config")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            value = fh.read(65536).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)
    if not value:
        raise ProviderError(f"API key file {where} is empty", retryable=False, provider=provider, code="config")
    return Secret(value)


def resolve_api_key(provider: str, key_file: str | os.PathLike[str] | None = None,
                    environ: Mapping[str, str] | None = None) -> Secret | None:
    """The key for `provider`: from `key_file` when one is configured, else the provider's own variable
    (OPENAI_API_KEY, COHERE_API_KEY, ...), else NEURONDB_LLM_API_KEY; None when there is none (Ollama,
    a local vLLM). Keys are read where they are needed and never stored anywhere else."""
    if key_file:
        return read_key_file(key_file, provider)
    env = os.environ if environ is None else environ
    for var in (*PROVIDER_KEY_ENV.get(provider, ()), GENERIC_KEY_ENV):
        value = env.get(var, "").strip()
        if value:
            return Secret(value)
    return None


# ---------------------------------------------------------------------------------------------------
# Requests and responses


class HttpRequest(NamedTuple):
    """A request ready to send. Its repr hides the Authorization header and URL credentials, so it may be
    logged."""

    method: str
    url: str
    headers: dict[str, str]
    json: Any

    def __repr__(self) -> str:
        shown = {k: ("***" if k.lower() == "authorization" else v) for k, v in self.headers.items()}
        return f"HttpRequest(method={self.method!r}, url={redact_url(self.url)!r}, headers={shown!r})"


class RawResponse(NamedTuple):
    """A response as the pure parsers take it: status, headers, body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class EmbeddingBatch(NamedTuple):
    """Vectors of one embedding request, and the input tokens it cost when the provider says."""

    vectors: np.ndarray
    prompt_tokens: int | None


def _api_base(endpoint: str) -> str:
    """Base URL without a trailing / or /v1: both "http://h:8000" and the OpenAI SDK's habit
    "http://h:8000/v1" are accepted, and the paths below add /v1 themselves."""
    base = endpoint.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


def transport_error(provider: str, exc: httpx.HTTPError | httpx.InvalidURL, url: str,
                    timeout: float) -> ProviderError:
    """The ProviderError for a request that got no HTTP answer. Timeouts, refused or dropped connections
    and other network failures are retryable; a malformed request or redirect loop is not."""
    shown = redact_url(url)
    detail = redact(str(exc)) or type(exc).__name__
    if isinstance(exc, httpx.InvalidURL):
        return ProviderError(f"invalid endpoint URL {shown}: {detail}", retryable=False, provider=provider,
                             code="config")
    if isinstance(exc, httpx.TimeoutException):
        return ProviderError(f"timed out after {timeout:g}s ({type(exc).__name__}) calling {shown}",
                             retryable=True, provider=provider, code="timeout")
    if isinstance(exc, httpx.RemoteProtocolError):
        return ProviderError(f"connection dropped by {shown}: {detail}", retryable=True, provider=provider,
                             code="connection")
    if isinstance(exc, httpx.ConnectError):
        return ProviderError(f"cannot connect to {shown}: {detail}", retryable=True, provider=provider,
                             code="connection")
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.LocalProtocolError)):
        return ProviderError(f"cannot send to {shown}: {detail}", retryable=False, provider=provider,
                             code="config")
    if isinstance(exc, httpx.TransportError):
        return ProviderError(f"network error calling {shown}: {detail}", retryable=True, provider=provider,
                             code="connection")
    return ProviderError(f"calling {shown} failed: {detail}", retryable=False, provider=provider)


class HttpProvider:
    """Endpoint, model, key and transport shared by the HTTP providers.

    `api_key`: a key (str or Secret); None looks it up in the environment (resolve_api_key); "" sends
    none. `client`: a caller-owned httpx.Client for the synchronous calls; without one a client is made
    on first use and closed by close(). Async calls take their client per call (see asend).
    """

    def __init__(self, provider: str, *, model: str, endpoint: str | None = None,
                 api_key: str | Secret | None = None, timeout: float = 30.0,
                 client: httpx.Client | None = None) -> None:
        if not model:
            raise invalid_input(provider, "no model given (name one in the job or set neurondb.llm_model)")
        endpoint = endpoint or DEFAULT_ENDPOINTS.get(provider)
        if not endpoint:
            raise ProviderError(f"no endpoint for provider {provider!r}; set neurondb.llm_endpoint",
                                retryable=False, provider=provider, code="config")
        self.name = provider
        self.model = model
        self.endpoint = endpoint
        self.timeout = timeout
        self._base = _api_base(endpoint)
        if api_key is None:
            api_key = resolve_api_key(provider)
        elif isinstance(api_key, str):
            api_key = Secret(api_key) if api_key else None
        self._key = api_key
        self._client = client
        self._owns_client = client is None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        key = "set" if self._key is not None else "none"
        return (f"{type(self).__name__}(provider={self.name!r}, endpoint={redact_url(self.endpoint)!r}, "
                f"model={self.model!r}, api_key={key})")

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": USER_AGENT}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key.reveal()}"
        return headers

    def _secrets(self) -> tuple[str, ...]:
        return (self._key.reveal(),) if self._key is not None else ()

    def _request(self, path: str, payload: Any) -> HttpRequest:
        return HttpRequest("POST", self._base + path, self._headers(), payload)

    def _json_ok(self, status: int, headers: Mapping[str, str], body: bytes) -> Any:
        """The decoded body of a 2xx answer; any other status becomes its classified ProviderError."""
        if not 200 <= status < 300:
            raise error_from_response(self.name, status, headers, body, self._secrets())
        return decode_json(self.name, body)

    def _sync_client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(timeout=self.timeout)
            return self._client

    def send(self, request: HttpRequest) -> RawResponse:
        """Send on the synchronous client; transport failures become ProviderError (no chained cause,
        so a logged traceback cannot show the request)."""
        try:
            resp = self._sync_client().request(request.method, request.url, headers=request.headers,
                                               content=orjson.dumps(request.json), timeout=self.timeout)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise transport_error(self.name, exc, request.url, self.timeout) from None
        return RawResponse(resp.status_code, resp.headers, resp.content)

    async def asend(self, request: HttpRequest, client: httpx.AsyncClient | None = None) -> RawResponse:
        """Send on `client` (the LLM worker's pooled AsyncClient), or on a client made for this one call.

        The client is passed per call, not kept, because an AsyncClient belongs to one event loop and
        the provider object may outlive it.
        """
        if client is None:
            async with httpx.AsyncClient(timeout=self.timeout) as own:
                return await self.asend(request, own)
        try:
            resp = await client.request(request.method, request.url, headers=request.headers,
                                        content=orjson.dumps(request.json), timeout=self.timeout)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise transport_error(self.name, exc, request.url, self.timeout) from None
        return RawResponse(resp.status_code, resp.headers, resp.content)

    def close(self) -> None:
        """Close the synchronous client if this provider made it."""
        with self._lock:
            if self._owns_client and self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> HttpProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _style(provider: str, style: str | None, allowed: tuple[str, ...], default: str) -> str:
    chosen = style or default
    if chosen not in allowed:
        raise invalid_input(provider, f"unknown API style {shown(chosen)}; expected one of {', '.join(allowed)}")
    return chosen


# ---------------------------------------------------------------------------------------------------
# Embeddings


class OpenAIEmbedder(HttpProvider, Embedder):
    """POST /v1/embeddings {model, input: [...]} (OpenAI, vLLM, llama.cpp, TEI, Jina), or with
    style "ollama" (the default for provider "ollama") POST /api/embed {model, input} -> {embeddings}."""

    def __init__(self, provider: str = "openai", *, model: str, style: str | None = None, **kwargs: Any) -> None:
        super().__init__(provider, model=model, **kwargs)
        self.style = _style(provider, style, ("openai", "ollama"), "ollama" if provider == "ollama" else "openai")
        self.dim: int | None = None

    def build_embed_request(self, texts: list[str]) -> HttpRequest:
        texts = check_texts(self.name, texts)
        path = "/api/embed" if self.style == "ollama" else "/v1/embeddings"
        return self._request(path, {"model": self.model, "input": texts})

    def parse_embed_response(self, status: int, headers: Mapping[str, str], body: bytes, *,
                             count: int | None = None) -> EmbeddingBatch:
        """The vectors in input order (OpenAI's `data` is re-sorted by `index`); `count`, when given, is
        the number of texts sent, and a different number of vectors is an invalid response."""
        data = self._json_ok(status, headers, body)
        try:
            if self.style == "ollama":
                rows, tokens = data["embeddings"], data.get("prompt_eval_count")
            else:
                items = sorted(data["data"], key=lambda item: item.get("index", 0))
                rows = [item["embedding"] for item in items]
                tokens = (data.get("usage") or {}).get("prompt_tokens")
            vectors = np.asarray(rows, dtype=np.float32)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise invalid_response(self.name, f"no embeddings in the answer ({type(exc).__name__}: {exc})") \
                from None
        if vectors.ndim != 2 or (count is not None and vectors.shape[0] != count):
            raise invalid_response(self.name, f"expected {count} vectors, got an array of shape {vectors.shape}")
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise invalid_response(self.name, f"model {self.model} returned {vectors.shape[1]}-dimensional "
                                              f"vectors, earlier {self.dim}-dimensional ones")
        self.dim = int(vectors.shape[1])
        return EmbeddingBatch(vectors, tokens if isinstance(tokens, int) else None)

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.dim or 0), dtype=np.float32)

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = check_texts(self.name, texts)
        if not texts:
            return self._empty()
        return self.parse_embed_response(*self.send(self.build_embed_request(texts)), count=len(texts)).vectors

    async def aembed(self, texts: list[str], *, client: httpx.AsyncClient | None = None) -> np.ndarray:
        texts = check_texts(self.name, texts)
        if not texts:
            return self._empty()
        raw = await self.asend(self.build_embed_request(texts), client)
        return self.parse_embed_response(*raw, count=len(texts)).vectors


# ---------------------------------------------------------------------------------------------------
# Completions

_NUMBER_PARAMS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0),
                  "frequency_penalty": (-2.0, 2.0)}
_INT_PARAMS = {"max_tokens": "a positive integer", "seed": "an integer"}
COMPLETION_PARAMS = (*_NUMBER_PARAMS, *_INT_PARAMS, "stop")


def check_params(provider: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Completion parameters checked by name, type and range. An unknown or bad parameter is invalid input
    (the job fails at once with this message) instead of being dropped or sent to fail remotely."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise invalid_input(provider, f"parameters must be an object, got {type(params).__name__}")
    checked: dict[str, Any] = {}
    for name, value in params.items():
        if value is None:
            continue
        if name in _NUMBER_PARAMS:
            lo, hi = _NUMBER_PARAMS[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise invalid_input(provider,
                                    f"parameter {name} must be a number in {lo:g}..{hi:g}, got {shown(value)}")
        elif name in _INT_PARAMS:
            if isinstance(value, bool) or not isinstance(value, int) or (name == "max_tokens" and value < 1):
                raise invalid_input(provider, f"parameter {name} must be {_INT_PARAMS[name]}, got {shown(value)}")
        elif name == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not stops or not all(isinstance(s, str) and s for s in stops):
                raise invalid_input(provider,
                                    f"parameter stop must be a string or a list of strings, got {shown(value)}")
            value = stops
        else:
            raise invalid_input(provider, f"unknown parameter {shown(name)}; allowed: {', '.join(COMPLETION_PARAMS)}")
        checked[name] = value
    return checked


class OpenAICompleter(HttpProvider, Completer):
    """POST /v1/chat/completions {model, messages: [system?, user], params...} (OpenAI, vLLM, llama.cpp),
    or with style "ollama" POST /api/chat {model, messages, stream: false, options}."""

    def __init__(self, provider: str = "openai", *, model: str, style: str | None = None, **kwargs: Any) -> None:
        super().__init__(provider, model=model, **kwargs)
        self.style = _style(provider, style, ("openai", "ollama"), "ollama" if provider == "ollama" else "openai")

    def build_complete_request(self, prompt: str, system: str | None = None,
                               params: Mapping[str, Any] | None = None) -> HttpRequest:
        if not isinstance(prompt, str):
            raise invalid_input(self.name, f"prompt must be a string, got {type(prompt).__name__}")
        if system is not None and not isinstance(system, str):
            raise invalid_input(self.name, f"system prompt must be a string, got {type(system).__name__}")
        checked = check_params(self.name, params)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        if self.style == "ollama":
            if "max_tokens" in checked:
                checked["num_predict"] = checked.pop("max_tokens")
            payload: dict[str, Any] = {"model": self.model, "messages": messages, "stream": False}
            if checked:
                payload["options"] = checked
            return self._request("/api/chat", payload)
        return self._request("/v1/chat/completions", {"model": self.model, "messages": messages, **checked})

    def parse_complete_response(self, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
        data = self._json_ok(status, headers, body)
        try:
            if self.style == "ollama":
                text = data["message"]["content"]
                finish, prompt_tokens, completion_tokens = (data.get("done_reason"), data.get("prompt_eval_count"),
                                                            data.get("eval_count"))
            else:
                choice = data["choices"][0]
                text = choice["message"].get("content") or ""
                usage = data.get("usage") or {}
                finish, prompt_tokens, completion_tokens = (choice.get("finish_reason"), usage.get("prompt_tokens"),
                                                            usage.get("completion_tokens"))
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise invalid_response(self.name, f"no completion in the answer ({type(exc).__name__}: {exc})") \
                from None
        if not isinstance(text, str):
            raise invalid_response(self.name, f"completion text is {type(text).__name__}, not a string")
        return Completion(
            text=text,
            prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None,
            completion_tokens=completion_tokens if isinstance(completion_tokens, int) else None,
            model=str(data.get("model") or self.model),
            finish_reason=finish if isinstance(finish, str) else None,
        )

    def complete(self, prompt: str, system: str | None = None,
                 params: Mapping[str, Any] | None = None) -> Completion:
        return self.parse_complete_response(*self.send(self.build_complete_request(prompt, system, params)))

    async def acomplete(self, prompt: str, system: str | None = None, params: Mapping[str, Any] | None = None,
                        *, client: httpx.AsyncClient | None = None) -> Completion:
        raw = await self.asend(self.build_complete_request(prompt, system, params), client)
        return self.parse_complete_response(*raw)


# ---------------------------------------------------------------------------------------------------
# Reranking


class RerankClient(HttpProvider, Reranker):
    """POST /v1/rerank {model, query, documents, top_n} -> {results: [{index, relevance_score}]} (Cohere,
    Jina, vLLM, llama.cpp), or with style "tei" (the default for provider "tei") Hugging Face TEI's
    POST /rerank {query, texts} -> [{index, score}]."""

    def __init__(self, provider: str = "cohere", *, model: str, style: str | None = None, **kwargs: Any) -> None:
        super().__init__(provider, model=model, **kwargs)
        self.style = _style(provider, style, ("cohere", "tei"), "tei" if provider == "tei" else "cohere")

    def build_rerank_request(self, query: str, documents: list[str], top_n: int | None = None) -> HttpRequest:
        if not isinstance(query, str):
            raise invalid_input(self.name, f"query must be a string, got {type(query).__name__}")
        documents = check_texts(self.name, documents)
        check_top_n(self.name, top_n, len(documents))
        if self.style == "tei":
            return self._request("/rerank", {"query": query, "texts": documents, "raw_scores": False})
        payload: dict[str, Any] = {"model": self.model, "query": query, "documents": documents}
        if top_n is not None:
            payload["top_n"] = top_n
        return self._request("/v1/rerank", payload)

    def parse_rerank_response(self, status: int, headers: Mapping[str, str], body: bytes, *,
                              count: int | None = None, top_n: int | None = None) -> list[tuple[int, float]]:
        """(index, score) best first, at most `top_n`; an index outside the `count` documents sent is an
        invalid response (it would attach a score to the wrong document)."""
        data = self._json_ok(status, headers, body)
        try:
            if self.style == "tei":
                pairs = [(item["index"], item["score"]) for item in data]
            else:
                pairs = [(item["index"], item["relevance_score"]) for item in data["results"]]
            ranked = [(int(i), float(s)) for i, s in pairs]
        except (KeyError, TypeError, ValueError) as exc:
            raise invalid_response(self.name, f"no rerank results in the answer ({type(exc).__name__}: {exc})") \
                from None
        for index, _ in ranked:
            if index < 0 or (count is not None and index >= count):
                raise invalid_response(self.name, f"result index {index} is outside the {count} documents sent")
        ranked.sort(key=lambda pair: (-pair[1], pair[0]))
        return ranked if top_n is None else ranked[:top_n]

    def rerank(self, query: str, documents: list[str], top_n: int | None = None) -> list[tuple[int, float]]:
        request = self.build_rerank_request(query, documents, top_n)
        if not documents:
            return []
        return self.parse_rerank_response(*self.send(request), count=len(documents), top_n=top_n)

    async def arerank(self, query: str, documents: list[str], top_n: int | None = None, *,
                      client: httpx.AsyncClient | None = None) -> list[tuple[int, float]]:
        request = self.build_rerank_request(query, documents, top_n)
        if not documents:
            return []
        raw = await self.asend(request, client)
        return self.parse_rerank_response(*raw, count=len(documents), top_n=top_n)


def key_file_path(setting: str, data_dir: str | os.PathLike[str] | None) -> Path | None:
    """neurondb.llm_api_key_file as a path: '' is none, a relative name is inside the data directory."""
    if not setting:
        return None
    path = Path(setting).expanduser()
    return path if path.is_absolute() or data_dir is None else Path(data_dir) / path
