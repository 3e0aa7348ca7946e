"""Admission of provider calls: the call slots and the provider's rate limits, shared with the tenants.

A call starts only when a slot is free (`neuranllm_concurrency`, fewer for a provider that answered 429:
its AIMD factor) and the buckets in shared memory (neurondb/shm/buckets.py, shared by every process of
the machine) hold a request and its estimated tokens: the provider's own buckets and, for a tenant whose
share of the limits is below 1, the tenant's. The estimate taken is corrected once the answer gives the
real count.
"""

from __future__ import annotations

import math

from neurondb.shm.buckets import TPM_BURST_S, Buckets, provider_claims
from neurondb.workers.llmjobs import Call
from neurondb.workers.llmsettings import LLMSettings

EMBED_MAX_TOKENS = 50_000    # estimated tokens per embedding request


class Admission:
    def __init__(self, buckets: Buckets, settings: LLMSettings) -> None:
        self.buckets = buckets
        self.settings = settings                      # replaced at each reload
        self.tenant_shares: dict[str, float] = {}     # neurondb_tenants.llm_share, refreshed by the worker
        self.in_flight = 0
        self._in_flight_by: dict[str, int] = {}

    def request_tokens(self) -> int:
        """The most estimated tokens one embedding request may carry: a tokens/min bucket's burst at most."""
        tpm = self.settings.tokens_per_minute
        if tpm > 0:
            return min(EMBED_MAX_TOKENS, max(1, int(tpm / 60 * TPM_BURST_S)))
        return EMBED_MAX_TOKENS

    def admit(self, call: Call, now: float) -> tuple[float, bool]:
        """(0, _) if the call may start now (its tokens are taken), else (seconds to wait, whether the
        whole provider is held back rather than this tenant)."""
        provider = call.route.provider
        if provider == "local":
            return 0.0, False
        paused = self.buckets.paused(provider, now)
        if paused > 0:
            return paused, True
        factor = self.buckets.factor(provider, now)
        if self._in_flight_by.get(provider, 0) >= max(1, int(self.settings.concurrency * factor)):
            return math.inf, True      # until one of its calls finishes (which wakes the session)
        rps = self.settings.requests_per_second * factor
        tpm = self.settings.tokens_per_minute / 60.0 * factor
        share = self.share(call.tenant)
        own = provider_claims(provider, "", 1.0, rps, tpm, call.tokens)
        tenant = provider_claims(provider, f":{call.tenant}", share, rps, tpm, call.tokens) if share < 1.0 else []
        if not own and not tenant:
            return 0.0, False
        wait = self.buckets.take(own + tenant, now)
        if wait <= 0:
            return 0.0, False
        # Held back by the provider's own limits (everyone waits), or only by this tenant's share?
        return wait, not tenant or self.buckets.peek(own, now) > 0

    def started(self, call: Call) -> None:
        provider = call.route.provider
        self.in_flight += 1
        self._in_flight_by[provider] = self._in_flight_by.get(provider, 0) + 1

    def finished(self, call: Call) -> None:
        self.in_flight -= 1
        self._in_flight_by[call.route.provider] -= 1

    def share(self, tenant: str) -> float:
        """The tenant's share of the provider limits: its neurondb_tenants.llm_share, else the setting."""
        return self.tenant_shares.get(tenant, self.settings.tenant_share)

    def throttled(self, provider: str, retry_after: float | None) -> float:
        """The provider answered 429: slow it down (and pause it for `retry_after`); the factor now."""
        return self.buckets.throttle(provider, retry_after)

    def correct_tokens(self, call: Call, actual: int) -> None:
        """The tokens/min buckets were charged an estimate; charge the difference now that it is known
        (a failed call is charged nothing: `actual` 0)."""
        delta = float(actual - call.tokens)
        if not self.correctable(call) or delta == 0:
            return
        provider = call.route.provider
        tpm = self.settings.tokens_per_minute / 60.0 * self.buckets.factor(provider)
        share = self.share(call.tenant)
        self.buckets.adjust(f"tpm:{provider}", delta, tpm, max(1.0, tpm * TPM_BURST_S))
        if share < 1.0:
            self.buckets.adjust(f"tpm:{provider}:{call.tenant}", delta, tpm * share,
                                max(1.0, tpm * share * TPM_BURST_S))

    def correctable(self, call: Call) -> bool:
        return call.route.provider != "local" and self.settings.tokens_per_minute > 0
