"""`neurondb status` as a table, and `--watch` as a live `rich` view with job rates as sparklines.

Plain characters and colours only, so it works over SSH and inside tmux."""

from __future__ import annotations

import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable

import orjson
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


Section = tuple[str, list[str], list[list[str]]]     # (name, column headers, rows of plain text)


def sections(status: Status) -> list[Section]:
    """The status as plain, untruncated rows, one section per table: the one source of both the rich view
    and the tab-separated output for scripts (`tsv`)."""
    if not status.running:
        return [("service", ["running", "data_dir"], [["no", status.data_dir]])]
    out: list[Section] = [("service", ["supervisor_pid", "uptime_s", "config_generation", "data_dir", "metrics"],
                           [[str(status.supervisor_pid), _num(status.uptime_s, ".1f"), str(status.config_generation),
                             status.data_dir, status.metrics_url or ""]])]
    out.append(("worker", ["worker", "pid", "state", "uptime", "heartbeat", "restarts", "processed", "failed",
                           "in_flight", "last_error"],
                [[w.name, str(w.pid or "-"), w.state + ("" if w.enabled else " (disabled)"), seconds(w.uptime_s),
                  seconds(w.heartbeat_age_s), str(w.restarts), str(w.processed), str(w.failed), str(w.in_flight),
                  w.last_error]
                 for w in status.workers]))
    out.append(("tenant", ["tenant", "processed", "failed", "retried"],
                [[t.tenant, str(t.processed), str(t.failed), str(t.retried)]
                 for t in sorted(status.tenants, key=lambda t: -t.processed)]))
    out.append(("index", ["index", "vectors", "in graph", "pending", "ef_search", "tuning", "state", "recall",
                          "p95", "task"],
                [[ix.name, str(ix.vectors), _num(ix.graph_nodes, "d"), _num(ix.pending_changes, "d"),
                  _num(ix.ef_search, "d"), ix.tuning, ix.tuning_state, _num(ix.recall, ".3f"),
                  "-" if ix.p95_ms is None else f"{ix.p95_ms:.2f} ms",
                  f"{ix.task} {ix.task_progress:.0%}" if ix.task and ix.task_progress is not None else (ix.task or "")]
                 for ix in status.indexes]))
    out.append(("maintenance", ["target", "operation", "phase", "done", "total", "elapsed"],
                [[f"{op.kind} {op.target}", op.operation, op.phase, str(op.done), _num(op.total, "d"),
                  seconds(op.elapsed_s)] for op in status.maintenance]))
    if not status.database_error:
        out.append(("jobs", ["table", *JOB_STATUSES], [[title, *(str(counts.get(k, 0)) for k in JOB_STATUSES)]
                                                       for title, counts in (("queue", status.queue),
                                                                             ("llm", status.llm_jobs))]))
        out.append(("cache", ["cache", "entries", "max_entries", "expired", "evicted"],
                    [[f"{name} cache", *(str(c[k]) for k in ("entries", "max_entries", "expired", "evicted"))]
                     for name, c in status.caches.items()]))
    # The tuner's conflicts ("SLO unattainable: ..."), said where the operator looks.
    out.append(("note", ["message"], [[f"{ix.name}: {ix.last_decision}"] for ix in status.indexes
                                      if ix.tuning_state == "unattainable" and ix.last_decision]))
    return out


def tsv(status: Status) -> str:
    """Tab-separated rows for scripts: per section a header line `#section<TAB>column...`, then one line per
    row starting with the section's name (so `grep '^worker'` picks the workers). Tabs and newlines inside a
    value become spaces; nothing is cut."""
    lines = []
    for name, columns, rows in sections(status):
        lines.append("\t".join([f"#{name}", *columns]))
        lines.extend("\t".join([name, *(_cell(v) for v in row)]) for row in rows)
    if status.database_error:
        lines.append(f"database_error\t{_cell(status.database_error)}")
    return "\n".join(lines)


def render(status: Status, rates: dict[str, deque[float]] | None = None) -> Group:
    """The status as rich renderables: a header line, the workers table, tenants, indexes with their
    tuning, maintenance in progress, queue depths. Names and pids are never cut (they wrap instead)."""
    if not status.running:
        return Group(Text(f"neurondb is not running (data directory {status.data_dir})", style="bold red"))
    parts_by_name = {name: (columns, rows) for name, columns, rows in sections(status)}
    header = Text.assemble(
        ("neurondb ", "bold"), (f"supervisor pid {status.supervisor_pid}", ""),
        (f"  up {seconds(status.uptime_s)}", ""), (f"  config generation {status.config_generation}", "dim"),
        (f"  {status.data_dir}", "dim"), (f"  {status.metrics_url}" if status.metrics_url else "", "dim"),
    )
    columns, rows = parts_by_name["worker"]
    table = _table([*columns[:-1], "rate/s", *([""] if rates is not None else []), "last error"], rows)
    for w, row in zip(status.workers, rows, strict=True):
        history = (rates or {}).get(w.name, deque())
        cells: list = [*row[:2], Text(row[2], style=STATE_STYLE.get(w.state, "")), *row[3:-1],
                       f"{history[-1]:.1f}" if history else "-"]
        if rates is not None:
            cells.append(sparkline(history))
        cells.append(Text(w.last_error[:60], style="red") if w.last_error else "")
        table.add_row(*cells)
    parts: list = [header, table]
    if status.tenants:
        columns, rows = parts_by_name["tenant"]
        tenants = _table([*columns, "jobs/s", *([""] if rates is not None else [])], rows)
        for row in rows[:10]:
            history = (rates or {}).get(f"tenant:{row[0]}", deque())
            tenants.add_row(*row, f"{history[-1]:.1f}" if history else "-",
                            *([sparkline(history)] if rates is not None else []))
        parts.append(tenants)
    if status.indexes:
        columns, rows = parts_by_name["index"]
        indexes = _table(columns, rows)
        for ix, row in zip(status.indexes, rows, strict=True):
            indexes.add_row(*row[:6], Text(row[6], style=TUNING_STYLE.get(ix.tuning_state, "")), *row[7:9],
                            Text(row[9], style="yellow"))
        parts.append(indexes)
        parts.extend(Text(message, style="red") for (message,) in parts_by_name["note"][1])
    if status.maintenance:
        running = _table(["maintenance", "operation", "phase", "progress", "", "elapsed"],
                         parts_by_name["maintenance"][1])
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


def _table(columns: list[str], rows: list[list[str]]) -> Table:
    """A rich table whose first two columns (a name, a pid or count) are never cut: as wide as their
    longest value, and folded rather than cut with an ellipsis if the terminal is narrower still."""
    table = Table(*columns, expand=False)
    for i, column in enumerate(table.columns[:2]):
        column.overflow = "fold"
        column.min_width = max([len(str(column.header)), *(len(row[i]) for row in rows)])
    return table


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cell(value: str) -> str:
    return value.replace("\t", " ").replace("\n", " ")


def watch_json(read: Callable[[], Status], interval: float = 1.0) -> None:
    """One JSON object per line every `interval` seconds until Ctrl-C (or the reader of the pipe goes)."""
    try:
        while True:
            sys.stdout.write(orjson.dumps(read().to_dict()).decode() + "\n")
            sys.stdout.flush()
            time.sleep(interval)
    except (KeyboardInterrupt, BrokenPipeError):
        pass


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
