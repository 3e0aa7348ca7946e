"""`neurondb report`: one self-contained HTML page of charts, for an operator without Prometheus.

It draws neuranmon's history (neurondb_metrics_history, observability/history.py) over the last `--since`
and the auto-tuner's latest recall-vs-ef and latency-vs-ef curves (neurondb_tuning_state.curve). The
charts are inline SVG drawn by matplotlib (the optional extra `neurondb[report]`); the page has no
JavaScript, loads nothing and links nowhere, so it opens in a browser without network access. A section
without data says so instead of showing an empty chart.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import psycopg

from neurondb.queries import query
from neurondb.settings import Setting, parse_value

SINCE = Setting("--since", "integer", 3600, "sighup", "How far back the report goes.", unit="s", min=1,
                max=2_147_483_647)
NO_DATA = "No data"
_XMLNS = re.compile(r'\s+xmlns(:\w+)?="[^"]*"')

# One time series: its label and its points.
Series = dict[str, tuple[list[datetime], list[float]]]


class ReportError(RuntimeError):
    """The report cannot be made (matplotlib is missing); the message says what to do."""


def parse_since(text: str) -> int:
    """'1h', '24h', '30min', '7d' or plain seconds as seconds; SettingError naming --since otherwise."""
    return int(parse_value(SINCE, text))   # type: ignore[call-overload]


@dataclass
class Section:
    title: str
    text: str                       # what the chart shows and where it comes from
    svg: str | None                 # None: no data


def build(conn: psycopg.Connection, since_s: int) -> str:
    """The report's HTML page for the last `since_s` seconds."""
    figure = _figure_class()
    history: dict[str, Series] = {}
    for metric, subject, at, value in conn.execute(query("history", "series"), {"since_s": since_s}):
        times, values = history.setdefault(metric, {}).setdefault(subject, ([], []))
        times.append(at.astimezone(timezone.utc))
        values.append(value)
    curves: dict[str, tuple[list[int], list[float | None], list[float | None]]] = {}
    for index, ef, recall, kernel_ms in conn.execute(query("history", "curves")):
        efs, recalls, latencies = curves.setdefault(index, ([], [], []))
        efs.append(ef)
        recalls.append(recall)
        latencies.append(kernel_ms)

    def chart(*panels: tuple[str, Series], style: Callable[[str], dict] = lambda label: {}) -> str | None:
        """One row of time-series panels (title, series); None when every panel is empty."""
        if not any(series for _, series in panels):
            return None
        fig = figure(figsize=(4.6 * len(panels), 3.0), layout="constrained")
        for ax, (ylabel, series) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
            for label, (times, values) in sorted(series.items()):
                ax.plot(times, values, label=label or ylabel, **style(label))
            ax.set_ylabel(ylabel)
            ax.set_xlabel("time (UTC)")
            ax.grid(alpha=0.3)
            ax.tick_params(axis="x", labelrotation=30)
            if series:
                ax.legend(fontsize="small")
        return _svg(fig)

    latency: Series = {}
    for metric, suffix in (("search_p50_ms", "p50"), ("search_p99_ms", "p99")):
        latency |= {f"{index} {suffix}": points for index, points in history.get(metric, {}).items()}
    colour = {index: f"C{i % 10}" for i, index in enumerate(sorted({label.rsplit(" ", 1)[0] for label in latency}))}
    jobs = {"completed": history.get("jobs_per_second", {}).get("", ([], [])),
            "failed": history.get("jobs_failed_per_second", {}).get("", ([], []))}
    llm = {"attempts/s": history.get("llm_attempts_per_second", {}).get("", ([], [])),
           "errors/s": history.get("llm_errors_per_second", {}).get("", ([], []))}
    sections = [
        Section("Queue depth by status", "Jobs pending, being processed, and dead letters not replayed.",
                chart(("jobs", history.get("queue_depth", {})))),
        Section("Jobs per second", "Jobs the queue workers completed, and failed for good, per second.",
                chart(("jobs/s", {k: v for k, v in jobs.items() if v[0]}))),
        Section("Search latency per index", "Client-observed p50 (solid) and p99 (dashed) of each sample "
                "interval's searches, in ms.",
                chart(("ms", latency), style=lambda label: {"linestyle": "--" if label.endswith("p99") else "-",
                                                            "color": colour[label.rsplit(" ", 1)[0]]})),
        Section("Recall and ef_search per index", "The auto-tuner's measured recall@k at the ef it chose, and "
                "that ef.", chart(("recall", history.get("recall", {})), ("ef_search", history.get("ef_search", {})))),
        Section("LLM attempts and errors per second", "LLM job attempts per second, and those that failed or "
                "are retried.", chart(("per second", {k: v for k, v in llm.items() if v[0]}))),
        Section("Auto-tuner curves", "The latest tuning cycle's recall and search-kernel latency at each ef "
                "it measured, per index.", _curves(figure, curves)),
    ]
    return _page(sections, since_s)


def _curves(figure: Any, curves: dict[str, tuple[list[int], list[float | None], list[float | None]]]) -> str | None:
    if not curves:
        return None
    from matplotlib.ticker import ScalarFormatter  # matplotlib is there: _figure_class found it

    fig = figure(figsize=(9.2, 3.0), layout="constrained")
    recall_ax, latency_ax = fig.subplots(1, 2)
    for index, (efs, recalls, latencies) in sorted(curves.items()):
        recall_ax.plot(efs, recalls, marker="o", label=index)
        latency_ax.plot(efs, latencies, marker="o", label=index)
    for ax, ylabel in ((recall_ax, "recall@k"), (latency_ax, "kernel latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())     # 64, not 2^6
        ax.set_xlabel("ef_search")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _svg(fig)


def _figure_class() -> Any:
    """matplotlib's Figure (drawn without pyplot, so no display and no global state), or ReportError."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("neurondb report needs matplotlib: install neurondb[report]") from None
    return Figure


def _svg(fig: Any) -> str:
    """The figure as an inline <svg> element: no XML prologue, no metadata block, no namespace URLs (an
    HTML parser puts <svg> in the SVG namespace itself), so the page holds no URL at all."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buf.getvalue()
    return _XMLNS.sub("", text[text.index("<svg"):])


def _duration(seconds: int) -> str:
    """86400 -> '1 d', 5400 -> '90 min': the largest unit that divides it."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _page(sections: list[Section], since_s: int) -> str:
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    body = []
    for s in sections:
        chart = s.svg if s.svg is not None else f'<p class="nodata">{NO_DATA} for this section in the period.</p>'
        body.append(f"<section>\n<h2>{html.escape(s.title)}</h2>\n<p>{html.escape(s.text)}</p>\n{chart}\n</section>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>neurondb report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 72em; }}
section {{ margin-bottom: 2em; }}
.nodata {{ color: #888; font-style: italic; }}
svg {{ max-width: 100%; height: auto; }}
</style>
</head>
<body>
<h1>neurondb report</h1>
<p>The last {_duration(since_s)} of neuranmon's history (neurondb.neurondb_metrics_history), generated {generated}.</p>
{chr(10).join(body)}
</body>
</html>
"""
