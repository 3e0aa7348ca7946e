"""Is the service healthy? One rule for `/healthz` and `neurondb health`, like pg_isready's exit codes.

0 healthy; 1 degraded, with the reasons (a worker FATAL, crashed and waiting for its restart, or with a
heartbeat older than neurondb.worker_heartbeat_timeout; PostgreSQL unreachable); 2 down (no supervisor).
"""

from __future__ import annotations

from dataclasses import dataclass, field

HEALTHY, DEGRADED, DOWN = 0, 1, 2
STATUS_WORDS = {HEALTHY: "healthy", DEGRADED: "degraded", DOWN: "down"}


@dataclass(frozen=True)
class WorkerHealth:
    name: str
    state: str
    heartbeat_age_s: float | None
    enabled: bool = True


@dataclass
class Health:
    code: int
    reasons: list[str] = field(default_factory=list)

    @property
    def word(self) -> str:
        return STATUS_WORDS[self.code]

    def to_dict(self) -> dict:
        return {"status": self.word, "code": self.code, "reasons": self.reasons}


def evaluate(running: bool, workers: list[WorkerHealth], database_error: str | None,
             heartbeat_timeout_s: float) -> Health:
    if not running:
        return Health(DOWN, ["the supervisor is not running"])
    reasons = []
    for w in workers:
        if w.state == "fatal":
            reasons.append(f"worker {w.name} is FATAL (too many crashes; see its last error in `neurondb status`)")
        elif w.state == "crashed":
            reasons.append(f"worker {w.name} crashed and is waiting for its restart")
        elif heartbeat_timeout_s > 0 and w.heartbeat_age_s is not None and w.heartbeat_age_s > heartbeat_timeout_s:
            reasons.append(f"worker {w.name}'s heartbeat is {w.heartbeat_age_s:.0f} s old "
                           f"(neurondb.worker_heartbeat_timeout is {heartbeat_timeout_s:.0f} s)")
    if database_error:
        reasons.append(f"PostgreSQL is unreachable: {database_error}")
    return Health(DEGRADED if reasons else HEALTHY, reasons)
