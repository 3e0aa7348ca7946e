#!/usr/bin/env python3
"""Benchmark the supervisor's lifecycle paths with real processes and signals (issue 3).

Prints, as median / p95 / n:

- restart latency: SIGKILL a worker -> its slot shows a new pid with a fresh heartbeat, over 20 kills rotating
  over the workers, once with the default `worker_restart_interval` (500 ms) and once with a short one
  (`--restart-interval`, default 50 ms) to show the floor the supervisor itself adds;
- reload latency: SIGHUP to the supervisor -> every worker has applied the new configuration generation;
- start-to-healthy: `neurondb start` invoked -> every worker has a pid, state idle/running, heartbeat < 1 s;
- stop time: `neurondb stop -m fast` (and once each smart / immediate).

Why a script and not a test: these are figures to quote and compare across changes, not pass/fail checks,
and on a shared, noisy machine a single run is a sample; the tests keep the generous bounds of the issue.

It drives the real CLI (`python -m neurondb start|stop|reload -D DIR`) and reads worker state the way
`neurondb status` does (`neurondb.status.read_status`), so what it measures is what an operator sees.
Everything lives in a fresh temporary data directory under /tmp (the embedded PostgreSQL runs as a system
user that must be able to traverse the parent directory), which is stopped and removed at the end, also on
Ctrl-C or an error. With `--dsn`, that server is used instead of the embedded one: give it a scratch
database, because the `neurondb` schema is created there and left in place.

    .venv/bin/python scripts/bench_supervisor.py [--dsn DSN] [--restart-interval MS] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from benchlib import OUTCOMES, BenchError, Scratch, code_version, guarded, install_sigterm_handler, log, p95

from neurondb import db
from neurondb.shm import names
from neurondb.status import Status, WorkerStatus, pid_alive
from neurondb.supervisor import read_pid

DEFAULT_RESTART_INTERVAL_MS = 500   # the setting's built-in default: what an installation gets
CRASH_WINDOW_MS = 1000              # the minimum `neurondb.worker_crash_window` allows
# Between two kills of the same worker we wait the crash window plus this margin: the supervisor stamps a
# crash when it reaps it, a little after our kill, and a crash still inside the window doubles the delay.
CRASH_WINDOW_MARGIN_S = 0.3
RESTART_POLL_S = 0.001              # polling period while a latency is being measured
LIFECYCLE_POLL_S = 0.002            # polling beside a running CLI command (start/stop)
HEALTHY_HEARTBEAT_S = 1.0
BASE_NAPTIME_MS = 1000
# neurondb/log.py's line prefix: local time to the millisecond, pid, process name, level.
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \[(\d+)\] (\S+) (\w+): (.*)$")


@dataclass
class Series:
    """One measured quantity: its samples in seconds and how they are summarised."""

    label: str
    samples: list[float] = field(default_factory=list)
    note: str = ""

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples)
        if not s:
            return {"n": 0}
        return {"n": len(s), "median_ms": statistics.median(s) * 1000, "p95_ms": p95(s) * 1000,
                "min_ms": s[0] * 1000, "max_ms": s[-1] * 1000}


def healthy(status: Status) -> bool:
    """The issue's definition, also used by the test harness: every worker has a pid, is idle or running
    and heartbeated less than a second ago."""
    return status.running and bool(status.workers) and all(
        w.pid and w.state in ("idle", "running") and w.heartbeat_age_s is not None
        and w.heartbeat_age_s < HEALTHY_HEARTBEAT_S
        for w in status.workers
    )


class Bench(Scratch):
    """One temporary neurondb installation, driven through its CLI, with what the measurements need on top
    of benchlib's plumbing: log timestamps, health polling and the timed lifecycle commands."""

    def __init__(self, dsn: str | None) -> None:
        super().__init__("neurondb-bench-", dsn, owner="scripts/bench_supervisor.py", settings={
            "neurondb.worker_max_crashes": "1000",   # 20+ kills must never mark a worker FATAL
            "neurondb.worker_crash_window": f"{CRASH_WINDOW_MS}ms",  # so backoff does not compound
            "neurondb.worker_restart_interval": f"{DEFAULT_RESTART_INTERVAL_MS}ms",
            "neurondb.neuranq_naptime": f"{BASE_NAPTIME_MS}ms",
        })
        self.anomalies: list[str] = []
        self.worker_names: list[str] = []

    # -- log and polling ------------------------------------------------------------------------------

    def log_size(self) -> int:
        try:
            return self.datadir.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    def log_event(self, offset: int, process: str, message: str) -> float | None:
        """Wall-clock time (ms resolution) of the first line since `offset` by `process` that starts with
        `message`. The log is the only place that says when the supervisor itself acted, which splits a
        CLI command's time into the command's own start-up and the service's work."""
        try:
            with open(self.datadir.log_file, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return None
        for line in text.splitlines():
            m = LOG_LINE.match(line)
            if m and m.group(3) == process and m.group(5).startswith(message):
                return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        return None

    def wait_healthy(self, timeout: float = 15.0) -> Status:
        def check() -> Status | None:
            s = self.status()
            return s if healthy(s) else None
        return self.wait_for(check, timeout, "every worker to be healthy")

    # -- setup and teardown ---------------------------------------------------------------------------

    def init(self) -> None:
        self.datadir.init()
        self.write_conf()
        self.cli("init", timeout=180)
        # `init` leaves the embedded server running; stop it so that every timed start is alike (each
        # `neurondb stop` stops the server too, so each later `neurondb start` starts it again).
        self.cli("stop")

    def cli_startup(self, n: int) -> list[float]:
        """What any `neurondb` command costs before it does anything (interpreter, imports): the fixed part
        of the start and stop figures, to subtract when comparing the service's own work."""
        samples = []
        for _ in range(n):
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "neurondb", "--version"], env=self.env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
            samples.append(time.monotonic() - t0)
        return samples

    # -- start and stop -------------------------------------------------------------------------------

    def timed_start(self, timeout: float = 20.0) -> tuple[float, float, float | None]:
        """(seconds until the CLI returned, seconds until healthy, seconds until the supervisor logged that it
        was ready), all from invoking `neurondb start`. Health is polled while the command runs: the workers
        may be healthy before it has exited."""
        offset = self.log_size()
        t0_wall, t0 = time.time(), time.monotonic()
        proc, out = self.popen("start")
        cli_at = healthy_at = None
        while cli_at is None or healthy_at is None:
            now = time.monotonic()
            if cli_at is None and proc.poll() is not None:
                cli_at = now
                self.finish(proc, out, "start")
            if healthy_at is None and healthy(self.status()):
                healthy_at = time.monotonic()
            if now - t0 > timeout:
                proc.kill()
                raise BenchError(f"not healthy {timeout:g}s after `neurondb start`\n{self.log_tail()}")
            time.sleep(LIFECYCLE_POLL_S)
        self.worker_names = [w.name for w in self.status().workers]
        ready = self.log_event(offset, "supervisor", "supervisor started (pid")
        return cli_at - t0, healthy_at - t0, None if ready is None else ready - t0_wall

    def timed_stop(self, mode: str, timeout: float = 90.0) -> dict[str, float]:
        """From invoking `neurondb stop -m mode`: `down` supervisor and workers gone, `cli` the command
        returned (it also stops the embedded PostgreSQL, which `down` excludes); from the log, `signal` the
        supervisor received the request and `service` its time from request to exit."""
        status = self.status()
        pids = [status.supervisor_pid, *(w.pid for w in status.workers if w.pid)]
        offset = self.log_size()
        t0_wall, t0 = time.time(), time.monotonic()
        proc, out = self.popen("stop", "-m", mode)
        down_at = cli_at = None
        while cli_at is None:
            now = time.monotonic()
            if down_at is None and not any(pid_alive(p) for p in pids):
                down_at = now
            if proc.poll() is not None:
                cli_at = time.monotonic()
            elif now - t0 > timeout:
                proc.kill()
                raise BenchError(f"`neurondb stop -m {mode}` still running after {timeout:g}s\n{self.log_tail()}")
            time.sleep(LIFECYCLE_POLL_S)
        self.finish(proc, out, f"stop -m {mode}")
        leftovers = names.list_objects(self.prefix)
        if leftovers:
            self.anomalies.append(f"stop -m {mode} left shared memory objects: {', '.join(leftovers)}")
        if down_at is None:   # gone between our last poll and the CLI's exit
            down_at = cli_at
        times = {"down": down_at - t0, "cli": cli_at - t0}
        received = self.log_event(offset, "supervisor", f"received {mode} shutdown request")
        stopped = self.log_event(offset, "supervisor", "supervisor stopped")
        if received is not None:
            times["signal"] = received - t0_wall
            if stopped is not None:
                times["service"] = stopped - received
        return times

    def lifecycle(self, results: dict[str, Series], starts: int) -> None:
        modes = ["fast"] * starts + ["smart", "immediate"]
        for i, mode in enumerate(modes, 1):
            cli_s, healthy_s, ready_s = self.timed_start()
            results["start_cli"].samples.append(cli_s)
            results["start_healthy"].samples.append(healthy_s)
            if ready_s is not None:
                results["start_ready"].samples.append(ready_s)
            time.sleep(0.2)   # let the first batches settle, so a stop does not race the start
            stop = self.timed_stop(mode)
            for key, seconds in stop.items():
                results[f"stop_{mode}_{key}"].samples.append(seconds)
            log(f"cycle {i}/{len(modes)}: start->healthy {healthy_s * 1000:.0f} ms, stop -m {mode}: "
                + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in stop.items()))

    # -- restart latency ------------------------------------------------------------------------------

    def restarts(self, interval_ms: int, kills: int) -> dict[str, Series]:
        """SIGKILL `kills` workers in rotation; per kill, when the slot showed it reaped, a new pid, and a
        heartbeat from that new pid."""
        self.write_conf(worker_restart_interval=f"{interval_ms}ms")
        self.cli("reload")
        status = self.wait_healthy()
        tag = f"{interval_ms}ms"
        series = {
            "reaped": Series(f"restart {tag}: SIGKILL -> reaped (slot 'crashed')"),
            "new_pid": Series(f"restart {tag}: SIGKILL -> new pid in slot"),
            "heartbeat": Series(f"restart {tag}: SIGKILL -> new heartbeat"),
        }
        workers = self.worker_names = [w.name for w in status.workers]
        last_kill: dict[str, float] = {}
        for i in range(kills):
            name = workers[i % len(workers)]
            wait = last_kill.get(name, -math.inf) + CRASH_WINDOW_MS / 1000 + CRASH_WINDOW_MARGIN_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            before = _worker(self.wait_healthy(), name)
            last_kill[name] = time.monotonic()
            reaped, new_pid, beat, after = self._kill_and_watch(before)
            series["reaped"].samples.append(reaped)
            series["new_pid"].samples.append(new_pid)
            series["heartbeat"].samples.append(beat)
            # The supervisor writes the slot's restart count just after fork(), so the new worker may show
            # its pid and heartbeat a moment before the count: give it a second before calling it wrong.
            count = self._restart_count(name, before.restarts + 1, timeout=1.0)
            if count != before.restarts + 1:
                self.anomalies.append(f"{name}: restarts went {before.restarts} -> {count} after one kill")
            log(f"kill {i + 1}/{kills} {name} (pid {before.pid} -> {after.pid}): reaped {reaped * 1000:.1f} ms, "
                f"new pid {new_pid * 1000:.1f} ms, heartbeat {beat * 1000:.1f} ms")
        over = statistics.median(series["heartbeat"].samples) * 1000 - interval_ms
        series["heartbeat"].note = f"median {over:.0f} ms above worker_restart_interval = {interval_ms} ms"
        return series

    def _restart_count(self, name: str, expected: int, timeout: float) -> int:
        """The worker's restart count once it equals `expected`, or whatever it is after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            count = _worker(self.status(), name).restarts
            if count == expected or time.monotonic() > deadline:
                return count
            time.sleep(0.01)

    def _kill_and_watch(self, before: WorkerStatus, timeout: float = 15.0) -> tuple[float, float, float,
                                                                                   WorkerStatus]:
        kill_wall = time.time()
        t0 = time.monotonic()
        os.kill(before.pid, signal.SIGKILL)
        reaped = new_pid = None
        while True:
            w = _worker(self.status(), before.name)
            now = time.monotonic()   # after the read: a figure is when we saw it, never before it happened
            if w.state == "fatal":
                raise BenchError(f"{before.name} was marked FATAL: {w.last_error}\n{self.log_tail()}")
            if reaped is None and (w.state == "crashed" or w.pid != before.pid):
                reaped = now
            if w.pid and w.pid != before.pid:
                new_pid = new_pid or now
                # read_status gives the age as of its own clock reading, a hair before ours
                if w.heartbeat_age_s is not None and time.time() - w.heartbeat_age_s >= kill_wall:
                    assert reaped is not None
                    return reaped - t0, new_pid - t0, now - t0, w
            if now - t0 > timeout:
                raise BenchError(f"{before.name} (pid {before.pid}) not back {timeout:g}s after SIGKILL: {w}\n"
                                 f"{self.log_tail()}")
            time.sleep(RESTART_POLL_S)

    # -- reload latency -------------------------------------------------------------------------------

    def reloads(self, n: int) -> dict[str, Series]:
        """Change a sighup setting in the file, SIGHUP the supervisor (its pid from the pid file's first
        line), and time until the supervisor bumped the generation and until every worker applied it."""
        series = {
            "ack": Series("reload: SIGHUP -> supervisor bumped config generation"),
            "applied": Series("reload: SIGHUP -> all workers applied"),
        }
        self.wait_healthy()
        for i in range(n):
            naptime = BASE_NAPTIME_MS + 100 * (i % 5 + 1) if i % 2 == 0 else BASE_NAPTIME_MS
            self.write_conf(neuranq_naptime=f"{naptime}ms")
            before = self.status().config_generation
            sup = read_pid(self.datadir.pid_file)
            t0 = time.monotonic()
            os.kill(sup, signal.SIGHUP)
            ack = None
            while True:
                s = self.status()
                now = time.monotonic()
                if ack is None and s.config_generation > before:
                    ack = now
                if ack is not None and s.workers and all(
                    w.pid and w.config_generation == s.config_generation for w in s.workers
                ):
                    break
                if now - t0 > 15:
                    raise BenchError(f"reload {i + 1} not applied by every worker within 15s: {s}\n{self.log_tail()}")
                time.sleep(RESTART_POLL_S)
            series["ack"].samples.append(ack - t0)
            series["applied"].samples.append(now - t0)
            self._check_naptime(i + 1, naptime, s, now)
            log(f"reload {i + 1}/{n}: generation {s.config_generation}, ack {(ack - t0) * 1000:.1f} ms, "
                f"all workers {(now - t0) * 1000:.1f} ms")
            time.sleep(0.1)
        return series


    def _check_naptime(self, reload_no: int, naptime: int, applied: Status, applied_at: float) -> None:
        """Every neuranq slot that reported the new generation should show the new naptime. If it shows
        it only a little later, the worker published the generation before the setting: status readers
        (and this benchmark) can see "applied" while the old value is still displayed."""
        if all(w.naptime_ms == naptime for w in applied.workers if w.kind == "neuranq"):
            return
        late = None
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if all(w.naptime_ms == naptime for w in self.status().workers if w.kind == "neuranq"):
                late = time.monotonic() - applied_at
                break
            time.sleep(RESTART_POLL_S)
        shown = [w.naptime_ms for w in applied.workers if w.kind == "neuranq"]
        self.anomalies.append(
            f"reload {reload_no}: neuranq reported generation {applied.config_generation} with naptime {shown} ms, "
            f"expected {naptime} ms; "
            + (f"shown {late * 1000:.1f} ms later (generation published before the setting)" if late is not None
               else "still not shown after 1 s")
        )


def _worker(status: Status, name: str) -> WorkerStatus:
    for w in status.workers:
        if w.name == name:
            return w
    raise BenchError(f"no worker {name!r} in status (service running: {status.running})")


# -- report -------------------------------------------------------------------------------------------


def render(settings: dict[str, Any], results: dict[str, Series], anomalies: list[str]) -> str:
    width = max(len(s.label) for s in results.values())
    lines = ["neurondb supervisor benchmark", ""]
    lines += [f"  {k:<26} {v}" for k, v in settings.items()]
    lines += ["", f"  {'':<{width}}  {'n':>3}  {'median':>9}  {'p95':>9}  {'min':>9}  {'max':>9}"]
    for s in results.values():
        m = s.summary()
        if not m["n"]:
            continue
        lines.append(f"  {s.label:<{width}}  {m['n']:>3}  {m['median_ms']:>7.1f}ms  {m['p95_ms']:>7.1f}ms  "
                     f"{m['min_ms']:>7.1f}ms  {m['max_ms']:>7.1f}ms")
    lines += ["", "  p95 is nearest-rank (an observed value; with n <= 20 it is the 2nd largest or the max)."]
    lines += [f"  {s.label}: {s.note}" for s in results.values() if s.note and s.samples]
    if anomalies:
        lines += ["", "anomalies:"] + [f"  - {a}" for a in anomalies]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="use this PostgreSQL (a scratch database) instead of the embedded one")
    parser.add_argument("--restart-interval", type=int, default=50, metavar="MS",
                        help="second restart run with this worker_restart_interval, to show the floor "
                             f"(default 50; {DEFAULT_RESTART_INTERVAL_MS} runs only the default)")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs per restart run (default 20)")
    parser.add_argument("--reloads", type=int, default=10, help="SIGHUP reloads (default 10)")
    parser.add_argument("--starts", type=int, default=5,
                        help="start/stop -m fast cycles, plus one smart and one immediate (default 5)")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser.add_argument("--keep", action="store_true", help="keep the data directory (service still stopped)")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.reloads < 1 or args.starts < 1 or args.restart_interval < 0:
        parser.error("--kills, --reloads and --starts must be >= 1, --restart-interval >= 0")

    install_sigterm_handler()
    bench = Bench(args.dsn)
    intervals = [DEFAULT_RESTART_INTERVAL_MS]
    if args.restart_interval != DEFAULT_RESTART_INTERVAL_MS:
        intervals.append(args.restart_interval)
    results: dict[str, Series] = {
        "cli_startup": Series("CLI start-up alone (`neurondb --version`)"),
        "start_ready": Series("start: invoked -> supervisor logged ready"),
        "start_healthy": Series("start: invoked -> all workers healthy"),
        "start_cli": Series("start: invoked -> command returned"),
    }
    for mode in ("fast", "smart", "immediate"):
        results[f"stop_{mode}_signal"] = Series(f"stop -m {mode}: invoked -> supervisor got signal (log)")
        results[f"stop_{mode}_service"] = Series(f"stop -m {mode}: signal -> supervisor exited (log)")
        results[f"stop_{mode}_down"] = Series(f"stop -m {mode}: invoked -> supervisor+workers gone")
        results[f"stop_{mode}_cli"] = Series(f"stop -m {mode}: invoked -> command returned")
    load_before = os.getloadavg()
    t_begin = time.monotonic()

    def run() -> None:
        log(f"data directory {bench.root} ({'server ' + db.redact(args.dsn) if args.dsn else 'embedded PostgreSQL'})")
        bench.init()
        results["cli_startup"].samples = bench.cli_startup(5)
        log(f"start/stop: {args.starts} cycles with -m fast, then smart, immediate")
        bench.lifecycle(results, args.starts)
        bench.timed_start()
        for interval in intervals:
            log(f"restart latency: {args.kills} kills, worker_restart_interval = {interval} ms")
            for key, s in bench.restarts(interval, args.kills).items():
                results[f"restart_{interval}_{key}"] = s
        log(f"reload latency: {args.reloads} reloads")
        results.update({f"reload_{k}": s for k, s in bench.reloads(args.reloads).items()})

    code = guarded(run, lambda: bench.cleanup(args.keep))
    settings = {
        "outcome": OUTCOMES[code],
        "database": f"external {db.redact(args.dsn)}" if args.dsn
                    else "embedded PostgreSQL (each start starts it, each stop stops it)",
        "workers": ", ".join(bench.worker_names) or "?",
        "worker_restart_interval": ", ".join(f"{i} ms" for i in intervals),
        "worker_crash_window": f"{CRASH_WINDOW_MS} ms (same worker killed at most once per "
                               f"{CRASH_WINDOW_MS / 1000 + CRASH_WINDOW_MARGIN_S:g} s)",
        "worker_max_crashes": bench.settings["neurondb.worker_max_crashes"],
        "neuranq_naptime": f"{BASE_NAPTIME_MS} ms, reloads alternate it with 1100..1500 ms",
        "poll interval": f"{RESTART_POLL_S * 1000:g} ms (restart, reload), {LIFECYCLE_POLL_S * 1000:g} ms "
                         "(start, stop); figures are when a poll saw it",
        "machine": f"{os.cpu_count()} CPUs, load avg {load_before[0]:.2f} before / {os.getloadavg()[0]:.2f} after",
        "python": sys.version.split()[0],
        "neurondb code": code_version(),
        "wall time": f"{time.monotonic() - t_begin:.1f} s",
    }
    if args.json:
        print(json.dumps({"settings": settings, "anomalies": bench.anomalies, "ok": code == 0, "exit_code": code,
                          "results": {k: {"label": s.label, **s.summary(), "samples_ms":
                                          [round(x * 1000, 3) for x in s.samples]}
                                      for k, s in results.items() if s.samples}}, indent=2))
    else:
        print(render(settings, results, bench.anomalies))
    return code


if __name__ == "__main__":
    sys.exit(main())
