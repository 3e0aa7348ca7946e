"""`neurondb status` as a table, and `--watch` as a live `rich` view with job rates as sparklines.

Plain characters and colours only, so it works over SSH and inside tmux."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable

from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from neurondb.queue import JOB_STATUSES
from neurondb.status import Status

SPARK = "▁▂▃▄▅▆▇█"
STATE_STYLE = {"running": "green", "idle": "green", "starting": "yellow", "stopping": "yellow",
               "crashed": "red", "fatal": "bold red", "stopped": "dim"}
TUNING_STYLE = {"converged": "green", "exploring": "yellow", "unattainable": "bold red", "pinned": "cyan",
                "waiting": "dim"}


def sparkline(values: deque[float] | list[float]) -> str:
    if not values:
        return ""
    top = max(values) or 1.0
    return "".join(SPARK[min(int(v / top * (len(SPARK) - 1) + 0.5), len(SPARK) - 1)] for v in values)


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{value / 60:.0f}m{value % 60:02.0f}s"
    return f"{value / 3600:.0f}h{value % 3600 / 60:02.0f}m"


def render(status: Status, rates: dict[str, deque[float]] | None = None) -> Group:
    """The status as rich renderables: a header line, the workers table, tenants, indexes with their
    tuning, queue depths."""
    if not status.running:
        return Group(Text(f"neurondb is not running (data directory {status.data_dir})", style="bold red"))
    header = Text.assemble(
        ("neurondb ", "bold"), (f"supervisor pid {status.supervisor_pid}", ""),
        (f"  up {seconds(status.uptime_s)}", ""), (f"  config generation {status.config_generation}", "dim"),
        (f"  {status.data_dir}", "dim"),
    )
    columns = ["worker", "pid", "state", "uptime", "heartbeat", "restarts", "processed", "failed", "rate/s"]
    if rates is not None:
        columns.append("")
    table = Table(*columns, "last error", expand=False)
    for w in status.workers:
        history = (rates or {}).get(w.name, deque())
        row = [w.name, str(w.pid or "-"), Text(w.state + ("" if w.enabled else " (disabled)"),
                                                 style=STATE_STYLE.get(w.state, "")),
               seconds(w.uptime_s), seconds(w.heartbeat_age_s), str(w.restarts), str(w.processed),
               str(w.failed), f"{history[-1]:.1f}" if history else "-"]
        if rates is not None:
            row.append(sparkline(history))
        row.append(Text(w.last_error[:60], style="red") if w.last_error else "")
        table.add_row(*row)
    parts: list = [header, table]
    if status.tenants:
        tenants = Table("tenant", "processed", "failed", "retried", "jobs/s", *([""] if rates is not None else []))
        for t in sorted(status.tenants, key=lambda t: -t.processed)[:10]:
            history = (rates or {}).get(f"tenant:{t.tenant}", deque())
            row = [t.tenant, str(t.processed), str(t.failed), str(t.retried), f"{history[-1]:.1f}" if history else "-"]
            if rates is not None:
                row.append(sparkline(history))
            tenants.add_row(*row)
        parts.append(tenants)
    if status.indexes:
        indexes = Table("index", "vectors", "in graph", "pending", "ef_search", "tuning", "state", "recall",
                        "p95", "task")
        for ix in status.indexes:
            task = f"{ix.task} {ix.task_progress:.0%}" if ix.task and ix.task_progress is not None else (ix.task or "")
            indexes.add_row(ix.name, str(ix.vectors), "-" if ix.graph_nodes is None else str(ix.graph_nodes),
                            "-" if ix.pending_changes is None else str(ix.pending_changes),
                            "-" if ix.ef_search is None else str(ix.ef_search), ix.tuning,
                            Text(ix.tuning_state, style=TUNING_STYLE.get(ix.tuning_state, "")),
                            "-" if ix.recall is None else f"{ix.recall:.3f}",
                            "-" if ix.p95_ms is None else f"{ix.p95_ms:.2f} ms", Text(task, style="yellow"))
        parts.append(indexes)
        # The tuner's conflict ("SLO unattainable: ..."), said where the operator looks.
        parts.extend(Text(f"{ix.name}: {ix.last_decision}", style="red") for ix in status.indexes
                     if ix.tuning_state == "unattainable" and ix.last_decision)
    if status.maintenance:
        running = Table("maintenance", "operation", "phase", "progress", "", "elapsed")
        for op in status.maintenance:
            bar = ProgressBar(total=op.total, completed=op.done, width=24) if op.total else Text("")
            running.add_row(f"{op.kind} {op.target}", op.operation, op.phase, bar,
                            f"{op.done}/{op.total}" if op.total else str(op.done or ""), seconds(op.elapsed_s))
        parts.append(running)
    if status.database_error:
        parts.append(Text(f"database: {status.database_error}", style="red"))
    else:
        for title, counts in (("queue", status.queue), ("llm jobs", status.llm_jobs)):
            line = "  ".join(f"{k} {counts.get(k, 0)}" for k in JOB_STATUSES)
            parts.append(Text(f"{title:9} {line}"))
        for name, c in status.caches.items():
            parts.append(Text(f"{name + ' cache':9} {c['entries']} entries (bound {c['max_entries']}), "
                              f"{c['expired']} expired and {c['evicted']} evicted by neuranmon"))
    return Group(*parts)


def watch(read: Callable[[], Status], interval: float = 1.0, history: int = 30) -> None:
    """Refresh every `interval` seconds until Ctrl-C; rates are processed-job deltas per second."""
    rates: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=history))
    last: dict[str, tuple[float, int]] = {}
    with Live(render(read(), rates), refresh_per_second=4, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                status = read()
                now = time.monotonic()
                counts = {w.name: w.processed for w in status.workers}
                counts.update({f"tenant:{t.tenant}": t.processed for t in status.tenants})
                for key, processed in counts.items():
                    if key in last:
                        t0, n0 = last[key]
                        rates[key].append(max(processed - n0, 0) / max(now - t0, 1e-6))
                    last[key] = (now, processed)
                live.update(render(status, rates))
        except KeyboardInterrupt:
            pass
