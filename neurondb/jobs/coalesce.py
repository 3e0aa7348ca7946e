"""Embedding requests of concurrent `embed` jobs, coalesced: the texts of jobs that wait on the same
embedder at the same time go to the provider as one request (as neuranllm batches its embeddings).

Group commit, per embedder: the first job's texts are sent at once; texts that arrive while that request
is in flight wait for it and then go together, up to `max_texts` per request (more make several
requests). So a lone job pays no waiting, and a burst of jobs costs a few requests instead of one each.
A failed request fails every job in it with the provider's error, except a non-retryable one (invalid
input) from a request of several jobs: each job's texts are then sent alone, so one bad text fails its
own job only.

A request to a remote provider starts only when the provider's rate limits allow it: the same buckets in
shared memory that neuranllm takes from (`neurondb.llm_requests_per_second`, `llm_tokens_per_minute`, at
the provider's AIMD factor, after its last Retry-After), so queue and LLM jobs share one budget per
provider; a 429 slows the provider down for both.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neurondb.providers import Embedder, ProviderError
from neurondb.providers.base import estimate_tokens
from neurondb.providers.registry import LOCAL
from neurondb.shm.buckets import Buckets, provider_claims


@dataclass(frozen=True)
class Limits:
    """A provider's limits: requests/s and tokens/min, 0 = unlimited."""

    requests_per_second: float = 0.0
    tokens_per_minute: float = 0.0


@dataclass
class _Waiting:
    texts: list[str]
    future: asyncio.Future


@dataclass
class _Queue:
    waiting: list[_Waiting] = field(default_factory=list)
    sending: bool = False


class Coalescer:
    def __init__(self, buckets: Buckets | None = None) -> None:
        self.buckets = buckets
        self.limits = Limits()              # set by each caller: the settings in force
        self._queues: dict[tuple[str, str, str], _Queue] = {}

    async def embed(self, embedder: Embedder, texts: list[str], client: Any, max_texts: int) -> np.ndarray:
        """The vectors of `texts`, in order, from a request shared with the jobs waiting beside this one."""
        key = (embedder.name, embedder.model, str(getattr(embedder, "endpoint", "")))   # the first one's object sends
        queue = self._queues.setdefault(key, _Queue())
        future = asyncio.get_running_loop().create_future()
        queue.waiting.append(_Waiting(texts, future))
        if not queue.sending:
            queue.sending = True
            asyncio.get_running_loop().create_task(self._send_all(key, queue, embedder, client, max_texts))
        return await future

    async def _send_all(self, key: tuple[str, str, str], queue: _Queue, embedder: Embedder, client: Any,
                        max_texts: int) -> None:
        try:
            while queue.waiting:
                batches, batch, size = [], [], 0
                for item in queue.waiting:
                    if batch and size + len(item.texts) > max_texts:
                        batches.append(batch)
                        batch, size = [], 0
                    batch.append(item)
                    size += len(item.texts)
                batches.append(batch)
                queue.waiting = []
                await asyncio.gather(*(self._send(embedder, b, client) for b in batches))
        finally:
            queue.sending = False
            if self._queues.get(key) is queue and not queue.waiting:
                del self._queues[key]

    async def _send(self, embedder: Embedder, batch: list[_Waiting], client: Any) -> None:
        texts = [t for item in batch for t in item.texts]
        try:
            await self._admit(embedder.name, sum(estimate_tokens(t) for t in texts))
            vectors = await embedder.aembed(texts, client=client)
        except ProviderError as exc:
            if exc.status == 429 and self.buckets is not None:
                self.buckets.throttle(embedder.name, exc.retry_after)
            if len(batch) > 1 and not exc.retryable:
                await asyncio.gather(*(self._send(embedder, [item], client) for item in batch))
                return
            _settle(batch, error=exc)
        except Exception as exc:     # a bug or a transport failure: every job in it fails its attempt
            _settle(batch, error=exc)
        else:
            start = 0
            for item in batch:
                if not item.future.done():
                    item.future.set_result(vectors[start:start + len(item.texts)])
                start += len(item.texts)


    async def _admit(self, provider: str, tokens: int) -> None:
        """Wait until the provider's buckets hold a request and `tokens` tokens, and take them."""
        if self.buckets is None or provider == LOCAL:
            return
        rps, tpm = self.limits.requests_per_second, self.limits.tokens_per_minute / 60.0
        while True:
            wait = self.buckets.paused(provider)
            if wait <= 0:
                factor = self.buckets.factor(provider)
                wait = self.buckets.take(provider_claims(provider, "", 1.0, rps * factor, tpm * factor, tokens))
            if wait <= 0:
                return
            await asyncio.sleep(wait)


def _settle(batch: list[_Waiting], error: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)

