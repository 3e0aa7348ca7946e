"""The LLM worker's settings as one immutable value, read from the Config at start and at each reload.

The worker's parts (batching, admission, the store) take the values they need from it instead of reading
the Config themselves, so a slice of work sees one consistent set of settings and a reload replaces them
all at once, between slices.
"""

from __future__ import annotations

from dataclasses import dataclass

from neurondb.settings import Config
from neurondb.workers.leases import LLM_TABLE, RetryPolicy

MIN_LEASE_MS = 60_000.0


@dataclass(frozen=True)
class LLMSettings:
    concurrency: int              # calls in flight at most (postmaster: fixed for the process's life)
    batch_size: int               # jobs per claim
    timeout_s: float              # one provider call
    retry: RetryPolicy            # default retry limit and backoff
    embedding_batch_size: int     # texts per embedding request
    requests_per_second: float    # provider limits, 0 = unlimited
    tokens_per_minute: float
    tenant_share: float           # default share of the limits per tenant
    cache_max_entries: int        # 0: no cache
    cache_ttl_s: float

    @classmethod
    def of(cls, config: Config) -> LLMSettings:
        return cls(
            concurrency=config.get_int("neuranllm_concurrency"),
            batch_size=config.get_int("neuranllm_batch_size"),
            timeout_s=config.get_seconds("neuranllm_timeout"),
            retry=RetryPolicy.of(config, LLM_TABLE),
            embedding_batch_size=config.get_int("llm_embedding_batch_size"),
            requests_per_second=config.get_float("llm_requests_per_second"),
            tokens_per_minute=config.get_float("llm_tokens_per_minute"),
            tenant_share=config.get_float("llm_tenant_share"),
            cache_max_entries=config.get_int("llm_cache_max_entries"),
            cache_ttl_s=config.get_seconds("llm_cache_ttl"))

    @property
    def lease_ms(self) -> float:
        """A lease must outlast a call and its wait for a slot; it is renewed every third of it while held."""
        return max(MIN_LEASE_MS, 4 * self.timeout_s * 1000.0)

    @property
    def cache_on(self) -> bool:
        return self.cache_max_entries > 0
