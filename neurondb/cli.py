"""The `neurondb` command: the operator's interface, on top of everything else (nothing imports it)."""

from __future__ import annotations

import dataclasses
import fcntl
import fnmatch
import functools
import logging
import math
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson
import psycopg
from rich.console import Console
from rich.table import Table

from neurondb import db, log
from neurondb.instance import Instance
from neurondb.migrate import MigrationError
from neurondb.paths import DataDir, resolve_data_dir
from neurondb.queries import query
from neurondb.queue import JOB_STATUSES
from neurondb.settings import PREFIX, Config, Setting, SettingError, lookup, parse_value, reset_auto, set_auto, shorten

if TYPE_CHECKING:
    from neurondb.status import Status

console = Console()

# Errors the operator can act on: shown as one clear line, exit status 1, no traceback.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (SettingError, db.NotInitialized, MigrationError)


def expected_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the operator-facing errors into click errors; anything else is a bug and keeps its traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from neurondb.pgserver import PostgresError

        try:
            return func(*args, **kwargs)
        except (*EXPECTED_ERRORS, PostgresError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def instance_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """`-D/--data-dir` and `--dsn` on every command, as PostgreSQL's tools take -D."""

    @click.option("-D", "--data-dir", "data_dir", envvar="NEURONDB_DATA", type=click.Path(file_okay=False),
                  help="Data directory (default: $NEURONDB_DATA, else /var/lib/neurondb as root, else "
                       "$XDG_DATA_HOME/neurondb, normally ~/.local/share/neurondb).")
    @click.option("--dsn", envvar="NEURONDB_DSN",
                  help="Use this PostgreSQL server instead of the embedded one (also $NEURONDB_DSN).")
    @functools.wraps(func)
    def wrapper(data_dir: str | None, dsn: str | None, **kwargs: Any) -> Any:
        inst = Instance(DataDir(resolve_data_dir(data_dir)), dsn)
        try:
            return func(inst, **kwargs)
        except psycopg.OperationalError as exc:
            if exc.sqlstate is not None:   # the server answered (a timeout, a lock): not an unreachable server
                raise
            raise click.ClickException(_unreachable(inst, exc)) from exc

    return expected_errors(wrapper)


def _unreachable(inst: Instance, exc: psycopg.OperationalError) -> str:
    """What to tell an operator whose command could not reach (or lost) the database, and how to fix it."""
    reason = db.first_line(exc).rsplit("failed: ", 1)[-1]
    root = inst.datadir.root
    if not inst.embedded:
        dsn = db.redact(db.resolve_dsn(inst.datadir, inst.explicit_dsn))
        return (f"cannot reach the PostgreSQL server at {dsn}: {reason} (check that it runs and accepts "
                f"connections, or give another --dsn)")
    server = inst.server()
    if not server.is_running():
        return (f"the embedded PostgreSQL of {root} is stopped: start it with `neurondb db start -D {root}` "
                f"(the database alone) or `neurondb start -D {root}` (the service)")
    return (f"cannot reach the embedded PostgreSQL of {root}: {reason} (`neurondb db status -D {root}` tells "
            f"whether it runs; its log is {server.log_file})")


class _Main(click.Group):
    """The `neurondb` group: every click error, the commands' own and click's usage errors alike, is shown
    as one line `error: ...` on stderr (exit 1, 2 for usage), rather than click's multi-line usage block."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:   # a bare `neurondb jobs`: its help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})   # inherited by every command
@click.version_option(package_name="neurondb")
def main() -> None:
    """neurondb: background workers for PostgreSQL (queue, auto-tuner, index maintenance, LLM jobs)."""


@main.command()
@instance_options
def init(inst: Instance) -> None:
    """Create the data directory, start the embedded PostgreSQL (unless --dsn) and install the schema."""
    log.setup("neurondb init", inst.datadir.log_dir / "neurondb.log", level=logging.WARNING)
    report = inst.init()
    applied = ", ".join(report.migrations_applied) or "schema up to date"
    console.print(f"data directory  {inst.datadir.root}")
    console.print(f"database        {db.redact(report.dsn)} ({'embedded' if report.embedded else 'external'})")
    console.print(f"migrations      {applied}")
    console.print(f"done in {report.seconds:.2f}s")


@main.command()
@click.option("--print", "print_sql", is_flag=True, required=True,
              help="Print the SQL to standard output (the only action: nothing is applied).")
@click.option("--pending", is_flag=True,
              help="Only the migrations this installation's database has not applied yet (reads "
                   "neurondb.schema_migrations; the server must be running). Default: all of them, in order, "
                   "for an empty database, without connecting anywhere.")
@instance_options
def schema(inst: Instance, print_sql: bool, pending: bool) -> None:
    """Print the SQL `neurondb init` would apply, for DBAs who apply migrations themselves: one psql script
    that records each migration in neurondb.schema_migrations, so a later `init` finds it applied."""
    from neurondb import migrate

    migrations = migrate.available()
    if pending:     # an unreachable server: the one-line message of instance_options
        with inst.connect("schema") as conn:
            migrations = migrate.pending(migrate.applied_checksums(conn))
    click.echo(migrate.script(migrations), nl=False)


@main.command()
@instance_options
def dsn(inst: Instance) -> None:
    """Print the DSN of this installation's database (it contains the password: keep it private)."""
    click.echo(db.resolve_dsn(inst.datadir, inst.explicit_dsn))


@main.command()
@click.option("--demo/--no-demo", default=True, show_default=True,
              help="Create a demo index and keep a light workload of embed, rerank and search going.")
@instance_options
def run(inst: Instance, demo: bool) -> None:
    """The main job on the embedded default: initialise, start the service, show its live status;
    Ctrl-C stops it (fast shutdown) and the embedded PostgreSQL."""
    import threading

    from neurondb import demo as demo_workload
    from neurondb.status import read_status
    from neurondb.tui import watch as live

    log.setup("neurondb", inst.datadir.log_file, level=logging.WARNING)
    report = inst.init()
    console.print(f"data directory {inst.datadir.root}   log {inst.datadir.log_file}")
    console.print(f"database       {db.redact(report.dsn)} ({'embedded' if report.embedded else 'external'})")
    console.print(f"connect        psql \"$(neurondb dsn -D {inst.datadir.root})\"")
    try:
        _daemonize_supervisor(inst)
    except click.ClickException as exc:
        if "already running" not in exc.message:
            raise
        console.print("the service was already running: showing it (Ctrl-C stops it)")
    stop = threading.Event()
    if demo:
        with inst.connect("demo") as conn:
            if demo_workload.seed(conn):
                console.print("demo: index `demo` created, 300 documents queued for embedding")
        threading.Thread(target=demo_workload.trickle, args=(inst, stop), daemon=True).start()
        console.print(f"demo: try  neurondb search demo --text 'restarts failed jobs' -D {inst.datadir.root}")
    console.print("[bold]neurondb is running[/bold]: Ctrl-C stops it")
    try:
        live(lambda: read_status(inst.datadir, inst.explicit_dsn))
    finally:
        stop.set()
        _stop_service(inst, "fast", timeout=90.0, with_db=True)


@main.group("db")
def db_group() -> None:
    """The embedded PostgreSQL server."""


@db_group.command("start")
@instance_options
def db_start(inst: Instance) -> None:
    """Start the embedded PostgreSQL (no-op when running)."""
    inst.datadir.init()
    server = inst.server()
    server.init()
    click.echo(db.redact(server.start()))


@db_group.command("stop")
@click.option("-m", "--mode", type=click.Choice(["smart", "fast", "immediate"]), default="fast")
@instance_options
def db_stop(inst: Instance, mode: str) -> None:
    """Stop the embedded PostgreSQL (no-op when stopped)."""
    inst.server().stop(mode)


@db_group.command("status")
@instance_options
def db_status(inst: Instance) -> None:
    """Exit 0 when the embedded PostgreSQL runs, 3 when it does not (like pg_ctl status). With an external
    database (--dsn, or recorded by `init --dsn`) there is no server to run here: say so and whether it
    accepts a connection, exit 0 if it does and 1 if not."""
    if not inst.embedded:
        dsn = db.resolve_dsn(inst.datadir, inst.explicit_dsn)
        try:
            db.connect(dsn, "cli", connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            click.echo(f"external database {db.redact(dsn)}: cannot connect: {db.first_line(exc)}")
            raise SystemExit(1) from None
        click.echo(f"external database {db.redact(dsn)}: accepts connections")
        raise SystemExit(0)
    running = inst.server().is_running()
    click.echo("running" if running else "stopped")
    raise SystemExit(0 if running else 3)


@main.group()
def config() -> None:
    """Settings, like PostgreSQL's GUCs: show, set (ALTER SYSTEM), reset."""


def _setting(name: str) -> Setting:
    """The setting NAME names on the command line, where the `neurondb.` prefix may be left out (the files
    and `neurondb.alter_system()` keep requiring it, as PostgreSQL does for an extension's settings)."""
    if not name.strip().lower().startswith(PREFIX):
        try:
            return lookup(PREFIX + name.strip())
        except SettingError:
            pass
    return lookup(name)


@config.command("show")
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@instance_options
def config_show(inst: Instance, pattern: str | None, as_json: bool) -> None:
    """Show settings whose name matches PATTERN (a substring, or a glob with * and ? matched with or
    without the `neurondb.` prefix). A bad line in the files is left out with a warning naming it."""
    config, problems = Config.load_lenient(inst.datadir)
    for problem in problems:
        click.echo(f"warning: {problem.splitlines()[0]} (line ignored)", err=True)
    rows = config.rows()
    if pattern:
        glob = pattern.lower() if any(c in pattern for c in "*?[") else f"*{pattern.lower()}*"
        rows = [r for r in rows if fnmatch.fnmatchcase(r["name"], glob)
                or fnmatch.fnmatchcase(r["name"].removeprefix(PREFIX), glob)]
        if not rows:
            raise click.ClickException(f"no setting matches {pattern!r} (`neurondb config show` lists them all)")
    if as_json:
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    columns = ("name", "setting", "unit", "context", "source", "range", "description")
    cells = []
    for r in rows:
        rng = "|".join(r["enumvals"]) if r.get("enumvals") else (
            f"{r['min_val']}..{r['max_val']}" if r.get("min_val") is not None else "")
        setting = r["setting"] + (" (pending restart)" if r.get("pending_restart") else "")
        cells.append((r["name"], setting, r.get("unit") or "", r["context"], r["source"], rng, r["short_desc"]))
    if not sys.stdout.isatty():     # for scripts: a header line, then one tab-separated line per setting
        for line in (columns, *cells):
            click.echo("\t".join(v.replace("\t", " ").replace("\n", " ") for v in line))
        return
    table = Table(*columns)
    table.columns[0].no_wrap = True
    for line in cells:
        table.add_row(*line)
    console.print(table)


@config.command("set")
@click.argument("name")
@click.argument("value")
@instance_options
def config_set(inst: Instance, name: str, value: str) -> None:
    """Write NAME = VALUE to neurondb.auto.conf after validating it (like ALTER SYSTEM SET)."""
    inst.datadir.init()
    setting = set_auto(inst.datadir, _setting(name).name, value)
    how = ("`neurondb reload` applies it" if setting.context == "sighup"
           else "takes effect at the next `neurondb start` (context postmaster)")
    click.echo(f"{setting.name} = '{value}' written to {inst.datadir.auto_conf}; {how}")


@config.command("reset")
@click.argument("name")
@instance_options
def config_reset(inst: Instance, name: str) -> None:
    """Remove NAME from neurondb.auto.conf (like ALTER SYSTEM RESET)."""
    setting = reset_auto(inst.datadir, _setting(name).name)
    click.echo(f"{setting.name} removed from {inst.datadir.auto_conf}")


@config.command("describe")
@click.argument("name")
@expected_errors
def config_describe(name: str) -> None:
    """Describe one setting: type, unit, default, range, context, whether SQL may set it."""
    s = _setting(name)
    who = "" if s.sql_settable else ", not settable from SQL"
    click.echo(f"{s.name} ({s.vartype}{', unit ' + s.unit if s.unit else ''}, context {s.context}{who})")
    click.echo(f"  {s.short_desc}")
    click.echo(f"  default {s.default}" + (f", range {s.min}..{s.max}" if s.min is not None else "")
               + (f", one of {', '.join(s.enumvals)}" if s.enumvals else ""))


# -- the service ------------------------------------------------------------------------------------------

def _daemonize_supervisor(inst: Instance, timeout: float = 60.0) -> int:
    """Fork the supervisor into its own session (double fork, stdio to the log) and wait until it says it is
    ready or why it is not. Returns its pid."""
    from neurondb.supervisor import Supervisor, SupervisorError, read_pid, wait_for_previous

    try:
        wait_for_previous(inst.datadir, say=click.echo)
    except SupervisorError as exc:
        raise click.ClickException(str(exc)) from None
    _say_if_compiling()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.setsid()
        if os.fork():
            os._exit(0)
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_RDWR)
            logfd = os.open(inst.datadir.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(logfd, 2)
            os.close(devnull)
            os.close(logfd)
            log.setup("supervisor", inst.datadir.log_file, stderr=False, level=_log_level(inst))
            code = Supervisor(inst, ready_fd=ready_w).run()
        except SupervisorError:
            pass   # said through the ready pipe; the log may be a running instance's, not ours to write
        except Exception:
            logging.getLogger("neurondb.supervisor").exception("supervisor failed")
        finally:
            os._exit(code)
    os.close(ready_w)
    os.waitpid(pid, 0)
    message = _read_line(ready_r, timeout)
    os.close(ready_r)
    if message != "ready":
        detail = message.removeprefix("error: ") if message else "the supervisor exited without saying why"
        raise click.ClickException(f"{detail}\n{_log_tail(inst)}")
    return read_pid(inst.datadir.pid_file)


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data and time.monotonic() < deadline:
        readable, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not readable:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _log_tail(inst: Instance, lines: int = 15) -> str:
    try:
        tail = inst.datadir.log_file.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return ""
    return "last lines of " + str(inst.datadir.log_file) + ":\n" + "\n".join(tail)


def _log_level(inst: Instance) -> int:
    return getattr(logging, str(Config.load(inst.datadir).get("neurondb.log_level")).upper(), logging.INFO)


@main.command()
@click.option("--foreground", is_flag=True,
              help="Stay in the foreground, logging to stderr too; speaks systemd's notify protocol when "
                   "$NOTIFY_SOCKET is set (deploy/neurondb.service).")
@instance_options
def start(inst: Instance, foreground: bool) -> None:
    """Start the supervisor and its workers (and the embedded PostgreSQL if it is not running)."""
    from neurondb.sdnotify import Notifier
    from neurondb.supervisor import Supervisor, SupervisorError, wait_for_previous

    inst.datadir.init()
    Config.load(inst.datadir)   # refuse bad settings here, with file:line, before forking anything
    if not foreground:
        _start_daemon(inst)
        return
    try:
        wait_for_previous(inst.datadir, say=click.echo)
        log.setup("supervisor", inst.datadir.log_file, level=_log_level(inst))
        _say_if_compiling()
        raise SystemExit(Supervisor(inst, notifier=Notifier.from_env()).run())
    except SupervisorError as exc:
        raise click.ClickException(str(exc)) from exc


def _start_daemon(inst: Instance) -> None:
    """`neurondb start` without --foreground, also the second half of `neurondb restart`."""
    from neurondb.supervisor import SupervisorError

    try:
        pid = _daemonize_supervisor(inst)
    except SupervisorError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"neurondb started (supervisor pid {pid}, data directory {inst.datadir.root})")


def _say_if_compiling() -> None:
    """The first start after an install compiles the index kernels (about 12 s, silent otherwise); the
    supervisor is forked from this process, so the kernels loaded here are the ones it uses."""
    from neurondb.index import hnsw

    if not hnsw.kernels_cached():
        click.echo("compiling the index kernels (first start only)...")


def _wait_stopped(inst: Instance, pid: int, timeout: float) -> bool:
    """True once the supervisor `pid` is gone and no process of this installation holds its lock (the
    workers inherit it)."""
    from neurondb.status import pid_alive

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid_alive(pid):
            time.sleep(0.02)
            continue
        try:
            fd = os.open(inst.datadir.lock_file, os.O_RDWR)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.05)
        finally:
            os.close(fd)
    return False


def _stop_service(inst: Instance, mode: str, timeout: float, with_db: bool) -> None:
    """Signal the supervisor and wait until every process of the installation is gone; `with_db` then stops
    the embedded PostgreSQL too (otherwise it keeps running, so the next start is a warm one)."""
    from neurondb.status import pid_alive
    from neurondb.supervisor import SHUTDOWN_SIGNALS, read_pid

    pid = read_pid(inst.datadir.pid_file)
    if pid_alive(pid):
        signum = next(s for s, m in SHUTDOWN_SIGNALS.items() if m == mode)
        os.kill(pid, signum)
        if not _wait_stopped(inst, pid, timeout):
            raise click.ClickException(f"neurondb did not stop within {timeout:.0f}s (supervisor pid {pid})")
        click.echo(f"neurondb stopped ({mode})")
    else:
        click.echo("neurondb is not running")
    if with_db and inst.embedded and inst.datadir.pgdata.exists():
        inst.server().stop("fast")
        click.echo("embedded PostgreSQL stopped")


_MODE_OPTION = click.option(
    "-m", "--mode", type=click.Choice(["smart", "fast", "immediate"]), default="fast", show_default=True,
    help="smart: finish current batches; fast: hand batches back; immediate: kill at once.")
_TIMEOUT_OPTION = click.option("-t", "--timeout", default=90.0, show_default=True,
                               help="Seconds to wait for the stop.")


@main.command()
@_MODE_OPTION
@_TIMEOUT_OPTION
@click.option("--with-db", is_flag=True, help="Also stop the embedded PostgreSQL (fast), after the workers.")
@instance_options
def stop(inst: Instance, mode: str, timeout: float, with_db: bool) -> None:
    """Stop the supervisor and its workers; the embedded PostgreSQL keeps running unless --with-db."""
    _stop_service(inst, mode, timeout, with_db)


@main.command()
@_MODE_OPTION
@_TIMEOUT_OPTION
@instance_options
def restart(inst: Instance, mode: str, timeout: float) -> None:
    """Stop the supervisor and its workers, then start them again (like pg_ctl restart; also when not
    running). The embedded PostgreSQL keeps running; settings of context postmaster take effect."""
    inst.datadir.init()
    Config.load(inst.datadir)   # a bad setting refuses the restart before anything is stopped
    _stop_service(inst, mode, timeout, with_db=False)
    _start_daemon(inst)


@main.command()
@instance_options
def reload(inst: Instance) -> None:
    """Re-read the settings (like pg_ctl reload); reports what changed, waits for restart or was rejected."""
    from neurondb.status import pid_alive
    from neurondb.supervisor import RELOAD_REPORT, read_pid

    pid = read_pid(inst.datadir.pid_file)
    if not pid_alive(pid):
        raise click.ClickException("neurondb is not running")
    # The supervisor stamps its report with the (system-wide) monotonic time its reload began: a report
    # stamped after the signal was sent is the outcome of a reload that read the files as they are now.
    sent = time.monotonic()
    os.kill(pid, signal.SIGHUP)
    deadline = sent + 10
    while (report := _read_report(inst.datadir.root / RELOAD_REPORT)) is None or report["started_mono"] < sent:
        if time.monotonic() > deadline:
            raise click.ClickException("the supervisor did not acknowledge the reload within 10s; see the log")
        time.sleep(0.05)
    click.echo(f"configuration reloaded (generation {report['generation']})")
    for _level, text in report["lines"]:
        click.echo(f"  {text}")


@main.command()
@instance_options
def logrotate(inst: Instance) -> None:
    """Make every process reopen the log file (like pg_ctl logrotate): run it after renaming the file."""
    from neurondb.status import pid_alive
    from neurondb.supervisor import read_pid

    pid = read_pid(inst.datadir.pid_file)
    if not pid_alive(pid):
        raise click.ClickException("neurondb is not running")
    os.kill(pid, signal.SIGUSR1)
    click.echo(f"neurondb signaled to reopen its log file {inst.datadir.log_file}")


def _read_report(path: Path) -> dict | None:
    """The supervisor's last reload report, None before the first one (it is replaced atomically)."""
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Live view, refreshed every second until Ctrl-C; with --json, one JSON "
              "object per line every second.")
@instance_options
def status(inst: Instance, as_json: bool, watch: bool) -> None:
    """Supervisor, workers, queues, and indexes with their tuning. Exit 0 healthy, 1 a worker is FATAL, 3 not
    running."""
    from neurondb.status import read_status
    from neurondb.tui import render, tsv, watch_json
    from neurondb.tui import watch as live

    def read() -> Status:
        return read_status(inst.datadir, inst.explicit_dsn)

    if watch:
        watch_json(read) if as_json else live(read)
        return
    snapshot = read()
    if as_json:
        click.echo(orjson.dumps(snapshot.to_dict(), option=orjson.OPT_INDENT_2).decode())
    elif not sys.stdout.isatty():
        click.echo(tsv(snapshot))
    else:
        console.print(render(snapshot))
    raise SystemExit(snapshot.exit_code)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@instance_options
def health(inst: Instance, as_json: bool) -> None:
    """For probes and systemd, like pg_isready: exit 0 healthy, 1 degraded (the reasons are printed), 2 down."""
    from neurondb.observability.health import WorkerHealth, evaluate
    from neurondb.status import read_status

    snapshot = read_status(inst.datadir, inst.explicit_dsn)
    timeout = Config.load_lenient(inst.datadir)[0].get_seconds("worker_heartbeat_timeout")
    verdict = evaluate(snapshot.running, [WorkerHealth(w.name, w.state, w.heartbeat_age_s) for w in snapshot.workers],
                       snapshot.database_error, timeout)
    if as_json:
        click.echo(orjson.dumps(verdict.to_dict()).decode())
    else:
        click.echo(verdict.word + "".join(f"\n  {reason}" for reason in verdict.reasons))
    raise SystemExit(verdict.code)


# -- the queue --------------------------------------------------------------------------------------------

def _json_arg(text: str | None, what: str) -> dict:
    if not text:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise click.BadParameter(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _print_rows(rows: list[dict], as_json: bool) -> None:
    if as_json:
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2, default=str).decode())
        return
    if not rows:
        click.echo("(none)")
        return
    table = Table(*rows[0].keys())
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row.values()))
    console.print(table)


@main.group()
def jobs() -> None:
    """The job queue (neuranq): enqueue, inspect, retry, cancel, dead letters."""


@jobs.command("enqueue")
@click.argument("job_type")
@click.argument("payload", required=False)
@click.option("--tenant", default="default", show_default=True)
@click.option("--priority", default=0, show_default=True, type=click.IntRange(-32768, 32767),
              help="Higher runs first.")
@click.option("--delay", type=click.FloatRange(min=0), help="Seconds before it may run.")
@click.option("--max-retries", type=click.IntRange(0, 100), help="Default: neurondb.neuranq_max_retries.")
@click.option("--dedupe-key", help="Merge into a pending job of this type with the same key.")
@instance_options
def jobs_enqueue(inst: Instance, job_type: str, payload: str | None, tenant: str, priority: int,
                 delay: float | None, max_retries: int | None, dedupe_key: str | None) -> None:
    """Enqueue a job of JOB_TYPE with a JSON PAYLOAD; prints its id."""
    from datetime import datetime, timedelta, timezone

    from neurondb import queue

    run_at = datetime.now(timezone.utc) + timedelta(seconds=delay) if delay else None
    with inst.connect("cli") as conn:
        try:
            job_id = queue.enqueue(conn, job_type, _json_arg(payload, "PAYLOAD"), tenant_id=tenant,
                                   priority=priority, run_at=run_at, max_retries=max_retries, dedupe_key=dedupe_key)
        except psycopg.errors.ProgramLimitExceeded as exc:   # the queue is full (neurondb.neuranq_queue_depth)
            raise click.ClickException(f"{db.first_line(exc)} ({exc.diag.message_hint})") from None
    click.echo(job_id)


@jobs.command("show")
@click.argument("job_id", type=int)
@instance_options
def jobs_show(inst: Instance, job_id: int) -> None:
    """One job with its result and attempt history, as JSON."""
    from neurondb import queue

    with inst.connect("cli") as conn:
        job = queue.get(conn, job_id)
    if job is None:
        raise click.ClickException(f"no job {job_id}")
    click.echo(orjson.dumps(job, option=orjson.OPT_INDENT_2, default=str).decode())


@jobs.command("list")
@click.option("--status", type=click.Choice(JOB_STATUSES))
@click.option("--type", "job_type")
@click.option("--tenant")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100000))
@click.option("--json", "as_json", is_flag=True)
@instance_options
def jobs_list(inst: Instance, status: str | None, job_type: str | None, tenant: str | None, limit: int,
              as_json: bool) -> None:
    """Recent jobs, newest first."""
    from neurondb import queue

    with inst.connect("cli") as conn:
        _print_rows(queue.list_jobs(conn, status=status, job_type=job_type, tenant_id=tenant, limit=limit), as_json)


@jobs.command("cancel")
@click.argument("job_id", type=int)
@instance_options
def jobs_cancel(inst: Instance, job_id: int) -> None:
    """Cancel a pending or running job: it ends cancelled ('cancelled by <role>'), without a dead letter."""
    from neurondb import queue

    with inst.connect("cli") as conn:
        if not queue.cancel(conn, job_id):
            raise click.ClickException(f"job {job_id} does not exist or has already finished")
    click.echo(f"job {job_id} cancelled")


@jobs.command("retry")
@click.argument("job_id", type=int)
@instance_options
def jobs_retry(inst: Instance, job_id: int) -> None:
    """Run a failed or cancelled job again, with fresh retries (a dead letter of it is marked replayed)."""
    from neurondb import queue

    with inst.connect("cli") as conn:
        if not queue.retry(conn, job_id):
            raise click.ClickException(f"job {job_id} does not exist or is neither failed nor cancelled")
    click.echo(f"job {job_id} queued again")


@jobs.group("dlq")
def dlq() -> None:
    """Dead letters: jobs that exhausted their retries."""


@dlq.command("list")
@click.option("--type", "job_type")
@click.option("--tenant")
@click.option("--all", "include_replayed", is_flag=True, help="Include replayed ones.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100000))
@click.option("--json", "as_json", is_flag=True)
@instance_options
def dlq_list(inst: Instance, job_type: str | None, tenant: str | None, include_replayed: bool, limit: int,
             as_json: bool) -> None:
    """Dead letters, newest first."""
    from neurondb import queue

    with inst.connect("cli") as conn:
        _print_rows(queue.dlq_list(conn, job_type=job_type, tenant_id=tenant, include_replayed=include_replayed,
                                   limit=limit), as_json)


@dlq.command("replay")
@click.option("--type", "job_type")
@click.option("--tenant")
@click.option("--id", "dlq_ids", type=int, multiple=True, help="Dead-letter ids (repeatable).")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 1000000))
@instance_options
def dlq_replay(inst: Instance, job_type: str | None, tenant: str | None, dlq_ids: tuple[int, ...],
               limit: int) -> None:
    """Enqueue matching dead letters again as new jobs."""
    from neurondb import queue

    with inst.connect("cli") as conn:
        pairs = queue.dlq_replay(conn, job_type=job_type, tenant_id=tenant, dlq_ids=list(dlq_ids) or None,
                                 limit=limit)
    click.echo(f"replayed {len(pairs)} dead letters" + "".join(f"\n  {d} -> job {j}" for d, j in pairs))


# -- indexes and search -----------------------------------------------------------------------------------

@main.group()
def index() -> None:
    """Vector indexes: create, list, stats, tune, drop, rebuild."""


@index.command("create")
@click.argument("name")
@click.option("--dim", type=click.IntRange(1, 16000), required=True, help="Vector dimensions.")
@click.option("--metric", type=click.Choice(["l2", "cosine", "ip"]), default="cosine", show_default=True)
@click.option("--m", "m", type=click.IntRange(2, 128), default=16, show_default=True, help="HNSW links per node.")
@click.option("--ef-construction", type=click.IntRange(4, 4096), default=200, show_default=True)
@click.option("--ef-search", type=click.IntRange(1, 4096), help="Default: neurondb.hnsw_default_ef_search.")
@click.option("--provider", help="Embedding provider for embed jobs and text search (default neurondb.llm_provider).")
@click.option("--model", help="Embedding model (default: the provider's).")
@instance_options
def index_create(inst: Instance, name: str, dim: int, metric: str, m: int, ef_construction: int,
                 ef_search: int | None, provider: str | None, model: str | None) -> None:
    """Register index NAME; its graph is built in shared memory by the running service."""
    with inst.connect("cli") as conn:
        try:
            conn.execute("SELECT neurondb.create_index(%s, %s, %s, %s, %s, %s, %s, %s)",
                         (name, dim, metric, m, ef_construction, provider, model, ef_search))
        except (psycopg.errors.DuplicateObject, psycopg.errors.CheckViolation) as exc:
            raise click.ClickException(str(exc).splitlines()[0]) from None
    click.echo(f"index {name} created ({dim} dimensions, {metric}, m {m}, ef_construction {ef_construction})")


@index.command("list")
@click.option("--json", "as_json", is_flag=True)
@instance_options
def index_list(inst: Instance, as_json: bool) -> None:
    """Indexes with their sizes (neurondb.vector_stats)."""
    with inst.connect("cli") as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        rows = cur.execute("SELECT index_name, dim, metric, vectors, graph_nodes, tombstones, memory, ef_search,"
                           " pending_changes, task FROM neurondb.vector_stats ORDER BY index_name").fetchall()
    _print_rows(rows, as_json)


@index.command("stats")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@instance_options
def index_stats(inst: Instance, name: str, as_json: bool) -> None:
    """Vectors, tombstones, memory, levels, edges, entry point, snapshot age of index NAME."""
    with inst.connect("cli") as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute("SELECT * FROM neurondb.vector_stats WHERE index_name = %s", (name,)).fetchone()
    if row is None:
        raise click.ClickException(f"no index {name!r}")
    if as_json:
        click.echo(orjson.dumps(row, option=orjson.OPT_INDENT_2, default=str).decode())
        return
    table = Table("statistic", "value")
    for key, value in row.items():
        table.add_row(key, "" if value is None else str(value))
    console.print(table)


# The options' values are checked as settings' are, with the same one-line messages; --ef's range is the
# catalog's, --target-latency's the global target's.
_TUNE_EF = Setting("--ef", "integer", None, "sighup", "ef_search of the index", min=1, max=4096)
_TUNE_LATENCY = dataclasses.replace(lookup("neurondb.neuranmon_target_latency"), name="--target-latency", aliases=())


def _tune_ef(raw: str) -> int:
    return int(parse_value(_TUNE_EF, raw))


def _tune_recall(raw: str) -> float | None:
    """--target-recall: a number in (0, 1] (the column's constraint), or `default` for the global setting."""
    if raw.strip().lower() == "default":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:        # NaN fails too
        raise SettingError(f'invalid value for parameter "--target-recall": "{shorten(raw)}": expected a number '
                           'in (0, 1], or "default" (neurondb.neuranmon_target_recall)')
    return value


def _tune_latency(raw: str) -> float | None:
    """--target-latency: a time as the global setting takes it (bare numbers are ms; us, ms, s, ...), or
    `default`."""
    if raw.strip().lower() == "default":
        return None
    return float(parse_value(_TUNE_LATENCY, raw))


def _number(value: float | None, spec: str = ".3f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _tuning_rows(row: dict) -> list[tuple[str, str]]:
    """neurondb.tuning_status of one index, as an operator reads it."""
    ef = str(row["catalog_ef_search"])
    if row["catalog_ef_search"] != row["ef_search"]:
        ef += f" (the graph last reported {row['ef_search']}; the running service applies it within 2 s)"
    replayed = "recall (replayed)" if row["evaluated_ef_search"] is None else \
        f"recall (replayed at ef {row['evaluated_ef_search']})"
    mode = {"auto": "auto (neuranmon tunes ef_search)", "pinned": "pinned (neuranmon leaves ef_search alone)"}

    def target(value: float | None, own: bool, spec: str, unit: str, setting: str) -> str:
        return _number(value, spec, unit) + (" (this index's own)" if own else f" (global {setting})")

    return [
        ("ef_search", ef),
        ("tuning", mode[row["tuning"]]),
        ("target recall", target(row["target_recall"], row["own_target_recall"], "g", "",
                                 "neurondb.neuranmon_target_recall")),
        ("target latency", target(row["target_latency_ms"], row["own_target_latency"], "g", " ms p95",
                                  "neurondb.neuranmon_target_latency")),
        ("state", row["state"]),
        ("last decision", row["last_decision"] or "-"),
        (replayed, f"{_number(row['recall'])} (95 % lower bound {_number(row['recall_low'])})"),
        ("recall (real searches)", _number(row["measured_recall"])),
        ("latency (real searches)", "  ".join(f"{p} {_number(row[f'{p}_ms'], '.2f', ' ms')}"
                                              for p in ("p50", "p95", "p99"))),
        ("predicted p95", _number(row["predicted_p95_ms"], ".2f", " ms")),
        ("queries measured", "-" if row["queries"] is None else str(row["queries"])),
        ("evaluated at", "-" if row["evaluated_at"] is None else str(row["evaluated_at"])),
        ("last change", "-" if row["last_change_at"] is None else str(row["last_change_at"])),
    ]


def _tune_changes(row: dict) -> list[str]:
    """What `neurondb index tune` changed, from the old and new values the update returned."""
    def shown(value: object, unit: str = "") -> str:
        return "global" if value is None else f"{value:g}{unit}" if isinstance(value, float) else str(value)

    changes = []
    for column, unit in (("ef_search", ""), ("tuning", ""), ("target_recall", ""), ("target_latency_ms", " ms")):
        old, new = row[f"old_{column}"], row[column]
        if old != new:
            changes.append(f"{column} {shown(old, unit)} -> {shown(new, unit)}")
    if row["old_ef_search"] != row["ef_search"] and row["tuning"] == "auto":
        changes[0] += " (the tuner's new starting point)"
    return changes


@index.command("tune")
@click.argument("name")
@click.option("--ef", "ef", metavar="N", help="Set ef_search (1..4096); on an auto index the tuner starts from it.")
@click.option("--pin/--unpin", "pin", default=None,
              help="Pinned: the tuner leaves ef_search alone; unpinned: it tunes it (tuning = auto).")
@click.option("--target-recall", metavar="X|default", help="This index's recall@k target, 0 < X <= 1; "
              "`default`: neurondb.neuranmon_target_recall.")
@click.option("--target-latency", metavar="TIME|default", help="This index's p95 latency target (20ms, 0.5s; "
              "bare numbers are ms); `default`: neurondb.neuranmon_target_latency.")
@click.option("--json", "as_json", is_flag=True)
@instance_options
def index_tune(inst: Instance, name: str, ef: str | None, pin: bool | None, target_recall: str | None,
               target_latency: str | None, as_json: bool) -> None:
    """Show how neuranmon tunes index NAME (neurondb.tuning_status); with options, change it first."""
    change = {"index": name, "ef": None if ef is None else _tune_ef(ef),
              "tuning": None if pin is None else "pinned" if pin else "auto",
              "set_recall": target_recall is not None,
              "recall": None if target_recall is None else _tune_recall(target_recall),
              "set_latency": target_latency is not None,
              "latency_ms": None if target_latency is None else _tune_latency(target_latency)}
    changed: list[str] = []
    with inst.connect("cli") as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        if ef is not None or pin is not None or target_recall is not None or target_latency is not None:
            updated = cur.execute(query("tune_cli", "tune"), change).fetchone()
            if updated is None:
                raise click.ClickException(f"no index {name!r}")
            changed = _tune_changes(updated)
        row = cur.execute(query("tune_cli", "tuning_of"), {"index": name}).fetchone()
    if row is None:
        raise click.ClickException(f"no index {name!r}")
    if as_json:
        click.echo(orjson.dumps(row, option=orjson.OPT_INDENT_2, default=str).decode())
        return
    if changed:
        click.echo(f"index {name}: " + "; ".join(changed))
    table = Table("tuning", "value")
    for key, value in _tuning_rows(row):
        table.add_row(key, value)
    console.print(table)


@index.command("drop")
@click.argument("name")
@instance_options
def index_drop(inst: Instance, name: str) -> None:
    """Drop index NAME with its vectors."""
    with inst.connect("cli") as conn:
        if not conn.execute("SELECT neurondb.drop_index(%s)", (name,)).fetchone()[0]:
            raise click.ClickException(f"no index {name!r}")
    for path in (inst.datadir.root / "indexes").glob(f"{name}.snap"):
        path.unlink()
    click.echo(f"index {name} dropped")


@index.command("rebuild")
@click.argument("name")
@click.option("--now", is_flag=True, help="Rebuild at once instead of in neurondb.neurandefrag_maintenance_window.")
@instance_options
def index_rebuild(inst: Instance, name: str, now: bool) -> None:
    """Rebuild the graph of NAME from its rows (new levels, a fresh graph) in the background: searches keep using
    the current graph until the new one is published. Runs in the maintenance window, or at once with --now
    (then shows its progress and waits for it)."""
    _ask_maintenance(inst, name, "rebuild", now)


@index.command("compact")
@click.argument("name")
@instance_options
def index_compact(inst: Instance, name: str) -> None:
    """Compact the graph of NAME now: a copy of its live nodes, renumbered, replaces it (needs the memory of a
    compact copy while it runs); shows its progress and waits for it."""
    _ask_maintenance(inst, name, "compaction", True)


def _ask_maintenance(inst: Instance, name: str, operation: str, now: bool) -> None:
    """Ask neurandefrag for `operation` on index `name` (a request row and a NOTIFY), and with `now` follow it
    to its end with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from neurondb.status import read_status

    running = read_status(inst.datadir, inst.explicit_dsn, with_database=False).running
    if now and not running:
        raise click.ClickException(f"neurondb is not running: its neurandefrag does the {operation}; start it "
                                   f"with neurondb start -D {inst.datadir.root}")
    with inst.connect("cli") as conn:
        asked, last_id, _ = conn.execute(query("defrag", "ask"), {"index": name, "operation": operation,
                                                                 "now": now}).fetchone()
        if not asked:
            raise click.ClickException(f"no index {name!r}")
        if not now:
            window = conn.execute("SELECT setting FROM neurondb.neurondb_settings "
                                  "WHERE name = 'neurondb.neurandefrag_maintenance_window'").fetchone()
            click.echo(f"{operation} of {name} requested: it runs in the maintenance window "
                       f"{window[0] if window else '(unknown)'} (neurondb.neurandefrag_maintenance_window)"
                       f"{'' if running else ' once neurondb runs'}; --now runs it at once")
            return
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task(f"{operation} of {name}: waiting for neurandefrag", total=None)
            while (outcome := conn.execute(query("defrag", "outcome"), {"index": name, "operation": operation,
                                                                        "last_id": last_id}).fetchone()) is None \
                    or outcome[0] == "running":
                row = conn.execute(query("defrag", "progress_of"), {"index": name, "operation": operation}).fetchone()
                if row is not None:
                    bar.update(task, description=f"{operation} of {name}: {row[0]}", completed=row[1], total=row[2])
                time.sleep(0.2)
    status, error, nodes, duration_ms, _ = outcome
    if status != "completed":
        raise click.ClickException(f"{operation} of {name} {status}: {error}")
    click.echo(f"{operation} of {name} done: {nodes} nodes in {duration_ms / 1000:.1f} s")


@main.command()
@click.argument("index_name")
@click.option("--text", help="Query text (embedded with the index's provider; hybrid with full-text search).")
@click.option("--vector", "vector_json", help="Query vector as a JSON array.")
@click.option("--vector-file", type=click.File("rb"), help="Query vector: a JSON array, or a .npy file.")
@click.option("-k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--ef", type=click.IntRange(1, 10000), help="Default: the index's current (tuned) ef_search.")
@click.option("--tenant")
@click.option("--hybrid-weight", type=click.FloatRange(0, 1), help="Weight of vector similarity (default: index's).")
@click.option("--content", is_flag=True, help="Show content and metadata.")
@click.option("--json", "as_json", is_flag=True)
@instance_options
def search(inst: Instance, index_name: str, text: str | None, vector_json: str | None, vector_file, k: int,
           ef: int | None, tenant: str | None, hybrid_weight: float | None, content: bool, as_json: bool) -> None:
    """Search INDEX_NAME by --text and/or a vector."""
    import io

    import numpy as np

    from neurondb.client import Client, SearchError

    vector = None
    try:
        if vector_json:
            vector = np.asarray(orjson.loads(vector_json), dtype=np.float32)
        elif vector_file is not None:
            data = vector_file.read()
            vector = np.load(io.BytesIO(data)) if data[:6] == b"\x93NUMPY" else \
                np.asarray(orjson.loads(data), dtype=np.float32)
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        raise click.BadParameter(f"the query vector must be a JSON array of numbers (or a .npy file): {exc}") from None
    with Client(inst) as client:
        try:
            hits = client.search(index_name, vector=vector, text=text, k=k, ef=ef, tenant=tenant,
                                 hybrid_weight=hybrid_weight, with_content=content)
        except SearchError as exc:
            raise click.ClickException(str(exc)) from None
    rows = [{"rank": i + 1, "doc_id": h.doc_id, "score": round(h.score, 6), "tenant": h.tenant_id,
             **({"content": h.content, "metadata": h.metadata} if content else {})} for i, h in enumerate(hits)]
    _print_rows(rows, as_json)


# -- LLM jobs (neuranllm) ---------------------------------------------------------------------------------

_LLM_OPERATIONS = ("completion", "embedding", "reranking", "complete", "embed", "rerank")


@main.group("llm")
def llm_group() -> None:
    """LLM jobs (neuranllm): submit completions, embeddings and rerankings; inspect them."""


@llm_group.command("submit")
@click.argument("operation", type=click.Choice(_LLM_OPERATIONS, case_sensitive=False))
@click.argument("input_text", required=False)
@click.option("--model", help="Model (default neurondb.llm_model, else the provider's).")
@click.option("--provider", help="Provider (default: neurondb.llm_routes, else neurondb.llm_provider).")
@click.option("--system", "system_prompt", help="System prompt of a completion.")
@click.option("--text", "input_texts", multiple=True, help="A text to embed (repeatable): one job, several vectors.")
@click.option("--document", "documents", multiple=True, help="A reranking candidate (repeatable).")
@click.option("--params", help='JSON object: temperature, max_tokens, top_p, stop, seed, ... or {"top_n": N}.')
@click.option("--tenant", default="default", show_default=True)
@click.option("--priority", default=0, show_default=True, type=click.IntRange(-32768, 32767),
              help="Higher runs first.")
@click.option("--max-retries", type=click.IntRange(0, 100), help="Default: neurondb.neuranllm_max_retries.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=None, is_flag=False, flag_value=60.0,
              help="Wait (up to N seconds, default 60) and print the finished job as JSON.")
@instance_options
def llm_submit(inst: Instance, operation: str, input_text: str | None, model: str | None, provider: str | None,
               system_prompt: str | None, input_texts: tuple[str, ...], documents: tuple[str, ...],
               params: str | None, tenant: str, priority: int, max_retries: int | None,
               wait_s: float | None) -> None:
    """Submit an LLM job; prints its id. INPUT_TEXT is the prompt, the text to embed or the rerank query
    ('-' reads it from standard input). A job the configured provider cannot serve (a completion on the
    default `local` provider) is refused before it is written, with the reason."""
    from neurondb import llm
    from neurondb.providers import ProviderError

    if input_text == "-":
        input_text = click.get_text_stream("stdin").read()
    config = Config.load(inst.datadir)
    with inst.connect("cli") as conn:
        try:
            job_id = llm.submit(conn, operation, model, input_text, system_prompt=system_prompt,
                                input_texts=list(input_texts) or None, documents=list(documents) or None,
                                parameters=_json_arg(params, "--params"), tenant_id=tenant, priority=priority,
                                max_retries=max_retries, provider=provider, config=config)
        except ProviderError as exc:
            raise click.ClickException(str(exc)) from None
        except psycopg.errors.InvalidParameterValue as exc:
            raise click.ClickException(str(exc).splitlines()[0]) from None
        if wait_s is None:
            click.echo(job_id)
            return
        try:
            job = llm.wait(conn, job_id, timeout=wait_s)
        except TimeoutError:
            raise click.ClickException(f"job {job_id} not finished after {wait_s:g} s "
                                       f"(`neurondb llm show {job_id}` later)") from None
    click.echo(orjson.dumps(job, option=orjson.OPT_INDENT_2, default=str).decode())
    if job["status"] == "failed":
        raise SystemExit(1)


@llm_group.command("show")
@click.argument("job_id", type=int)
@instance_options
def llm_show(inst: Instance, job_id: int) -> None:
    """One LLM job with its inputs, results, tokens, latency and attempt history, as JSON."""
    from neurondb import llm

    with inst.connect("cli") as conn:
        job = llm.get(conn, job_id)
    if job is None:
        raise click.ClickException(f"no LLM job {job_id}")
    click.echo(orjson.dumps(job, option=orjson.OPT_INDENT_2, default=str).decode())


@llm_group.command("list")
@click.option("--status", type=click.Choice(["pending", "processing", "completed", "failed"]))
@click.option("--operation", type=click.Choice(_LLM_OPERATIONS, case_sensitive=False))
@click.option("--tenant")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100000))
@click.option("--json", "as_json", is_flag=True)
@instance_options
def llm_list(inst: Instance, status: str | None, operation: str | None, tenant: str | None, limit: int,
             as_json: bool) -> None:
    """Recent LLM jobs, newest first (without inputs and results: `neurondb llm show` has them)."""
    from neurondb import llm

    with inst.connect("cli") as conn:
        _print_rows(llm.list_jobs(conn, status=status, operation=operation, tenant_id=tenant, limit=limit), as_json)
