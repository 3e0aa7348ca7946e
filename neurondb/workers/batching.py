"""Embedding batching: which texts of the claimed embedding jobs travel together in one request.

Texts wait in groups, one per (route, tenant): a request goes to one model and is charged to one tenant's
share of the rate limits. A job whose batch was refused by the provider for a bad input is `isolate`d:
its texts then go in requests of their own, so only the guilty job fails.

`peek` says what the next request of a job's group would hold without changing anything; `take` removes
exactly those texts once the request is admitted, so a request the rate limits refuse leaves the groups
as they were. Texts of jobs settled meanwhile (`Job.done`) are skipped, and dropped by the next `take`.
"""

from __future__ import annotations

from collections import deque

from neurondb.providers import Route
from neurondb.providers.base import estimate_tokens
from neurondb.workers.llmjobs import Call, Job

GroupKey = tuple[Route, str, int]      # route, tenant, the job's id when isolated (else 0)


class EmbeddingBatcher:
    def __init__(self) -> None:
        self._groups: dict[GroupKey, deque[tuple[Job, int]]] = {}
        self._waiting: dict[Job, int] = {}     # texts of each job in a group
        self._solo: set[Job] = set()

    def add(self, job: Job) -> None:
        """Queue the job's texts whose vector is not known yet."""
        items = [(job, i) for i, v in enumerate(job.vectors) if v is None]
        self._groups.setdefault(self._key(job), deque()).extend(items)
        self._waiting[job] = self._waiting.get(job, 0) + len(items)

    def isolate(self, job: Job) -> None:
        """From now on the job's texts without a vector go in requests of their own."""
        old = self._groups.get(self._key(job))
        if old is not None:
            kept = [item for item in old if item[0] is not job]
            old.clear()
            old.extend(kept)
        self._waiting.pop(job, None)
        self._solo.add(job)
        self.add(job)

    def waiting(self, job: Job) -> bool:
        """Whether some of the job's texts wait for a request."""
        return self._waiting.get(job, 0) > 0

    def filling(self, job: Job, max_texts: int) -> bool:
        """Whether the job's group is below a full request (an isolated job's never waits for more)."""
        if job in self._solo:
            return False
        group = self._groups.get(self._key(job))
        return group is not None and len(group) < max_texts

    def any_filling(self, max_texts: int) -> bool:
        """Whether some shared group is not empty but below a full request."""
        return any(0 < len(g) < max_texts for k, g in self._groups.items() if not k[2])

    def peek(self, job: Job, max_texts: int, max_tokens: int) -> Call | None:
        """The next request of the job's group, from its head: up to `max_texts` texts and `max_tokens`
        estimated tokens (at least one text); None when the group holds no live text. Changes nothing."""
        group = self._groups.get(self._key(job))
        if group is None:
            return None
        assert job.route is not None
        call = Call(job.route, job.tenant, [])
        jobs: dict[int, Job] = {}
        for item_job, index in group:
            if len(call.items) >= max_texts:
                break
            if item_job.done:
                continue
            cost = estimate_tokens(item_job.texts[index])
            if call.items and call.tokens + cost > max_tokens:
                break
            call.items.append((item_job, index))
            call.tokens += cost
            jobs[item_job.job_id] = item_job
        if not call.items:
            return None
        call.jobs = list(jobs.values())
        return call

    def take(self, call: Call) -> None:
        """Remove the texts of `call` (the last `peek` of its group, nothing taken since) from its group."""
        key = self._key(call.items[0][0])
        group = self._groups[key]
        left = len(call.items)
        while left:
            item_job, _ = group.popleft()
            self._count_off(item_job)
            if not item_job.done:
                left -= 1
        if not group:
            del self._groups[key]      # groups come and go with tenants and isolated jobs

    def _count_off(self, job: Job) -> None:
        n = self._waiting.get(job, 0) - 1
        if n > 0:
            self._waiting[job] = n
        else:
            self._waiting.pop(job, None)
            self._solo.discard(job)

    def _key(self, job: Job) -> GroupKey:
        assert job.route is not None
        return (job.route, job.tenant, job.job_id if job in self._solo else 0)
