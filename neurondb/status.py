"""What `neurondb status` reports: the supervisor and each worker as shared memory shows them, plus queue
depths and each index's size and tuning from PostgreSQL. Reading never blocks the service: no lock is
taken, slots are read as they are."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import psycopg

from neurondb import db
from neurondb.observability.families import PORT_GAUGE
from neurondb.paths import DataDir
from neurondb.queries import query
from neurondb.settings import Config
from neurondb.shm import names
from neurondb.shm.control import SharedState, get_text
from neurondb.supervisor import pid_alive, read_pid

# `neurondb status` exit codes, after pg_ctl status: 0 running and healthy, 1 degraded, 3 not running.
OK, DEGRADED, NOT_RUNNING = 0, 1, 3


@dataclass
class WorkerStatus:
    name: str
    kind: str
    pid: int
    state: str
    uptime_s: float | None
    heartbeat_age_s: float | None
    restarts: int
    processed: int
    failed: int
    retried: int
    batches: int
    in_flight: int        # jobs whose handler runs now (a queue process's async lane runs many at once)
    naptime_ms: int
    enabled: bool
    config_generation: int
    last_error: str


@dataclass
class TenantStatus:
    tenant: str
    processed: int
    failed: int
    retried: int


@dataclass
class IndexStatus:
    """One index: its size and the writer's task, and the auto-tuner's view (neurondb.tuning_status)."""

    name: str
    vectors: int
    graph_nodes: int | None
    pending_changes: int | None
    ef_search: int | None          # in effect (the graph's header as last published)
    task: str | None
    task_progress: float | None
    tuning: str                    # auto | pinned
    tuning_state: str              # waiting, exploring, converged, unattainable, pinned
    target_recall: float | None
    target_latency_ms: float | None
    recall: float | None           # replayed recall@k at the ef the tuner last decided on
    recall_low: float | None       # its one-sided 95 % lower confidence bound
    measured_recall: float | None  # recall@k of the real searches' own results
    p95_ms: float | None           # real searches, client-observed
    last_decision: str | None


@dataclass
class MaintenanceStatus:
    """An operation neurandefrag is running now (neurondb.maintenance_progress)."""

    kind: str                # index or table
    target: str
    operation: str
    phase: str
    done: int
    total: int | None
    elapsed_s: float


@dataclass
class Status:
    data_dir: str
    running: bool
    supervisor_pid: int = 0
    uptime_s: float | None = None
    config_generation: int = 0
    workers: list[WorkerStatus] = field(default_factory=list)
    tenants: list[TenantStatus] = field(default_factory=list)
    queue: dict[str, int] = field(default_factory=dict)
    llm_jobs: dict[str, int] = field(default_factory=dict)
    indexes: list[IndexStatus] = field(default_factory=list)
    caches: dict[str, dict[str, int]] = field(default_factory=dict)   # neuranmon's rotation (cache_status)
    maintenance: list[MaintenanceStatus] = field(default_factory=list)   # neurondb.maintenance_progress
    metrics_url: str | None = None     # neuranmon's /metrics endpoint while it listens
    database_error: str | None = None

    @property
    def exit_code(self) -> int:
        if not self.running:
            return NOT_RUNNING
        return DEGRADED if any(w.state == "fatal" for w in self.workers) else OK

    def to_dict(self) -> dict:
        return {**asdict(self), "exit_code": self.exit_code}


def read_status(datadir: DataDir, dsn: str | None = None, with_database: bool = True) -> Status:
    """A consistent-enough snapshot for an operator; never raises because the service is down."""
    status = Status(data_dir=str(datadir.root), running=False)
    pid = read_pid(datadir.pid_file)
    if not pid_alive(pid):
        return status
    try:
        shared = SharedState.attach(names.instance_prefix(datadir.root))
    except FileNotFoundError:
        return status
    try:
        now = time.time()
        control = shared.read_control()
        status.running = True
        status.supervisor_pid = int(control["supervisor_pid"])
        status.uptime_s = now - control["supervisor_started_at"] if control["supervisor_started_at"] else None
        status.config_generation = int(control["config_generation"])
        for i in range(shared.n_slots):
            s = shared.read_slot(i)
            alive = s["pid"] and s["state"] not in ("stopped", "crashed", "fatal")
            status.workers.append(WorkerStatus(
                name=s["name"], kind=s["kind"], pid=int(s["pid"]) if alive else 0, state=s["state"],
                uptime_s=now - s["started_at"] if alive and s["started_at"] else None,
                heartbeat_age_s=now - s["heartbeat"] if alive and s["heartbeat"] else None,
                restarts=int(s["restarts"]), processed=int(s["jobs_processed"]), failed=int(s["jobs_failed"]),
                retried=int(s["jobs_retried"]), batches=int(s["batches"]),
                in_flight=sum(1 for j in s["running"] if j) + int(s["running_unlisted"]) if alive else 0,
                naptime_ms=int(s["naptime_ms"]), enabled=bool(s["enabled"]),
                config_generation=int(s["config_generation_seen"]), last_error=s["last_error"],
            ))
        status.metrics_url = _metrics_url(datadir, shared)
        tenants = shared.tenants[shared.tenants["ready"] == 1]
        status.tenants = [TenantStatus(t["tenant"].decode(errors="replace"), int(t["processed"]), int(t["failed"]),
                                       int(t["retried"])) for t in tenants]
    finally:
        shared.close()
    if with_database:
        try:
            with db.connect(db.resolve_dsn(datadir, dsn), "status", connect_timeout=3) as conn:
                status.queue = dict(conn.execute(query("status", "queue_counts")).fetchall())
                status.llm_jobs = dict(conn.execute(query("status", "llm_job_counts")).fetchall())
                with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
                    status.indexes = [IndexStatus(**row) for row in cur.execute(query("tune_cli", "index_status"))]
                    status.caches = {row.pop("cache_name"): {k: int(v or 0) for k, v in row.items()}
                                     for row in cur.execute(query("tune_cli", "cache_status"))}
                    status.maintenance = [MaintenanceStatus(**row)
                                          for row in cur.execute(query("defrag", "progress_all"))]
        except (psycopg.Error, db.NotInitialized) as exc:
            status.database_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return status


def _metrics_url(datadir: DataDir, shared: SharedState) -> str | None:
    """The URL of neuranmon's endpoint, from the port it published in its slot and the address setting."""
    for i in range(shared.n_slots):
        slot = shared.slot(i)
        port = int(slot["gauges"][PORT_GAUGE])
        if get_text(slot, "kind") == "neuranmon" and port:
            address = Config.load_lenient(datadir)[0].get_str("metrics_listen_address")
            host = "127.0.0.1" if address in ("*", "0.0.0.0") else address
            return f"http://{host}:{port}/metrics"
    return None
