"""What every provider is, and how its failures are told apart.

The queue worker (embed / rerank jobs) and the LLM worker (completion / embedding / reranking jobs) both
call providers and both must decide, for every failure, whether to retry: a 429 or a dropped connection
is worth another attempt, a 400 or a prompt longer than the model's context never is. That decision is
made once, here, in `ProviderError.retryable`, so the two workers cannot disagree about it.

Error messages end up in job rows (`error_message`), logs and status output, which the operator and
possibly tenants read: they carry the provider's own explanation and never an API key, an Authorization
header or the request. `Secret` keeps keys out of reprs; `redact` scrubs anything a server echoes back.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from neurondb.redaction import redact_urls, shown

MAX_MESSAGE = 500  # characters of a provider message kept; a whole HTML error page helps nobody

# Failures that no retry can fix even when a server reports them with a 5xx (Ollama and llama.cpp have
# answered "input length exceeds the context length" with 500): the input itself is too long.
_CONTEXT_TOO_LONG = re.compile(
    r"context[ _-]?length|maximum context|context window|too many tokens|input length exceeds|"
    r"exceeds the (?:model's )?(?:maximum|max)",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_OPENAI_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}")


class Secret:
    """An API key that cannot leak through repr(), str(), f-strings or a logged `vars(provider)`.

    Only `reveal()` gives the value, and only the code building the Authorization header calls it.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every known secret, any `Bearer <token>`, anything shaped like an OpenAI key and the
    userinfo and query values of any URL in it (neurondb.redaction) replaced.

    Servers do echo keys back (OpenAI's 401 quotes a masked key; a misconfigured proxy may quote the
    whole Authorization header or the URL asked for), and error text flows into job rows, so it is
    scrubbed before it is kept.
    """
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    text = _BEARER.sub(r"\1[redacted]", text)
    return redact_urls(_OPENAI_KEY.sub("sk-[redacted]", text))


class ProviderError(Exception):
    """A provider call failed. `retryable` says whether the same call may succeed later.

    `status` is the HTTP status (None for transport failures and local providers), `retry_after` the
    server's requested wait in seconds (from Retry-After / retry-after-ms) or None, `provider` the provider
    name ("openai", "local", ...), `code` the provider's machine-readable error code when it gave one
    (e.g. "context_length_exceeded"), `message` the provider's own message. str() is
    "<provider>: HTTP <status>: <message>" so that a job's error_message says who failed and how; with
    provider "" (no provider could be chosen, e.g. an unknown provider name) it is the message alone.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        provider: str,
        status: int | None = None,
        retry_after: float | None = None,
        code: str | None = None,
    ) -> None:
        self.message = message
        self.retryable = retryable
        self.provider = provider
        self.status = status
        self.retry_after = retry_after
        self.code = code
        where = f"{provider}: HTTP {status}" if status is not None else provider
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args); keyword-only fields would be lost crossing a process boundary.
        return (_rebuild_error, (self.message, self.retryable, self.provider, self.status, self.retry_after,
                                 self.code))


def _rebuild_error(message: str, retryable: bool, provider: str, status: int | None,
                   retry_after: float | None, code: str | None) -> ProviderError:
    return ProviderError(message, retryable=retryable, provider=provider, status=status,
                         retry_after=retry_after, code=code)


def invalid_input(provider: str, message: str) -> ProviderError:
    """A request that can never succeed as given (bad parameter, wrong type): fail the job at once."""
    return ProviderError(message, retryable=False, provider=provider, code="invalid_input")


def retryable_status(status: int) -> bool:
    """Timeouts (408), rate limits (429) and server errors (5xx) pass; other 4xx repeat forever."""
    return status in (408, 429) or status >= 500


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After` (delta-seconds or an HTTP date).

    An unparsable or negative value gives None / 0 rather than an error: the header is advice, and a
    bad one must not turn a retryable failure into a crash of the error path.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
        return max(0.0, value) if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_fields(body: bytes) -> tuple[str | None, str | None]:
    """(message, code) from the JSON error shapes in use: OpenAI / vLLM {"error": {"message", "code"}},
    Ollama and TEI {"error": "..."}, Cohere {"message": ...}, FastAPI (Jina) {"detail": ...}."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    err = data.get("error")
    if isinstance(err, dict):
        code = err.get("code") or err.get("type")
        return (str(err["message"]) if err.get("message") else None), (str(code) if code else None)
    if isinstance(err, str):
        code = data.get("error_type") or data.get("code")
        return err, (str(code) if code else None)
    for key in ("message", "detail"):
        value = data.get(key)
        if isinstance(value, str):
            return value, None
        if value is not None:
            return orjson.dumps(value).decode(), None
    return None, None


def error_from_response(
    provider: str, status: int, headers: Mapping[str, str], body: bytes, secrets: Iterable[str] = ()
) -> ProviderError:
    """The ProviderError for a non-2xx answer, with the provider's message and the retry classification."""
    message, code = _error_fields(body)
    if message is None:
        text = body.decode("utf-8", "replace").strip()
        message = " ".join(text.split()) if text else "no error message in the response"
    message = redact(message, secrets)
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "..."
    too_long = code == "context_length_exceeded" or bool(_CONTEXT_TOO_LONG.search(message))
    return ProviderError(
        message,
        retryable=retryable_status(status) and not too_long,
        provider=provider,
        status=status,
        retry_after=parse_retry_after(headers),
        code="context_length_exceeded" if too_long else code,
    )


def decode_json(provider: str, body: bytes) -> Any:
    """The JSON of a 2xx body; a body that is not JSON is a broken server or proxy, not worth retrying."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        snippet = " ".join(body[:120].decode("utf-8", "replace").split())
        raise ProviderError(f"invalid response (not JSON): {snippet!r}", retryable=False, provider=provider,
                            code="invalid_response") from None


def invalid_response(provider: str, what: str) -> ProviderError:
    """A 2xx answer of the wrong shape (missing field, wrong count): retrying would get the same."""
    return ProviderError(f"invalid response: {what}", retryable=False, provider=provider, code="invalid_response")


def check_texts(provider: str, texts: object) -> list[str]:
    """The texts of an embedding call, or an invalid-input error naming the first bad item."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise invalid_input(provider, f"expected a list of texts, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise invalid_input(provider, f"text {i} is {type(text).__name__}, not a string")
    return list(texts)


@dataclass(frozen=True)
class Completion:
    """A completion's text and what it cost. Token counts are None when the provider does not report them."""

    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    model: str
    finish_reason: str | None = None


class Embedder(ABC):
    """Texts to vectors. `dim` is None for a remote model until its first answer tells it."""

    name: str
    model: str
    dim: int | None

    @abstractmethod
    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 array of shape (len(texts), dim), rows in the order of `texts`."""

    async def aembed(self, texts: list[str], *, client: Any = None) -> np.ndarray:
        """Async form for the LLM worker's event loop. Local (CPU-bound) embedders run in a thread so they
        do not stall the loop; HTTP embedders override this with a real async request on `client`."""
        return await asyncio.to_thread(self.embed, texts)


class Reranker(ABC):
    """Orders candidate documents by relevance to a query."""

    name: str
    model: str

    @abstractmethod
    def rerank(self, query: str, documents: list[str], top_n: int | None = None) -> list[tuple[int, float]]:
        """(index into `documents`, score) pairs, best first, at most `top_n` of them (all when None)."""

    async def arerank(self, query: str, documents: list[str], top_n: int | None = None, *,
                      client: Any = None) -> list[tuple[int, float]]:
        """Async form; see Embedder.aembed."""
        return await asyncio.to_thread(self.rerank, query, documents, top_n)


class Completer(ABC):
    """Prompt to text. `params` takes temperature, max_tokens, top_p, stop, seed, presence_penalty and
    frequency_penalty; anything else is refused as invalid input rather than silently ignored."""

    name: str
    model: str

    @abstractmethod
    def complete(self, prompt: str, system: str | None = None,
                 params: Mapping[str, Any] | None = None) -> Completion:
        """The model's answer to `prompt` (after the optional `system` message)."""

    async def acomplete(self, prompt: str, system: str | None = None, params: Mapping[str, Any] | None = None,
                        *, client: Any = None) -> Completion:
        """Async form; see Embedder.aembed."""
        return await asyncio.to_thread(self.complete, prompt, system, params)


def estimate_tokens(text: str) -> int:
    """Tokens of `text` for rate limiting and batching before any tokenizer has seen it: ~4 characters per
    token for English with BPE tokenizers, rounded up; the real count corrects the bucket afterwards."""
    return len(text) // 4 + 1


def check_top_n(provider: str, top_n: int | None, count: int) -> int:
    """How many results a rerank returns: all when None; a negative or non-integer top_n is invalid input."""
    if top_n is None:
        return count
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise invalid_input(provider, f"top_n must be a non-negative integer, got {shown(top_n)}")
    return min(top_n, count)
