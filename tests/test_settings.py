"""The GUC-like settings: the registry against the source document, values, files, reload, ALTER SYSTEM.

The document is read itself (not a copy of its numbers), so a default that drifts from it fails here.
"""

from __future__ import annotations

import re
import stat
import threading
from pathlib import Path

import pytest

from neurondb.paths import DataDir
from neurondb.settings import (
    REGISTRY,
    Config,
    LlmRoute,
    Setting,
    SettingError,
    format_value,
    lookup,
    parse_llm_routes,
    parse_maintenance_window,
    parse_value,
    reset_auto,
    set_auto,
)

DOC = Path(__file__).resolve().parents[2] / "shared/seed/neurondb-background-workers.md"
DOC_SETTINGS = {
    "neurondb.neuranq_naptime", "neurondb.neuranq_queue_depth", "neurondb.neuranq_batch_size",
    "neurondb.neuranq_timeout", "neurondb.neuranq_max_retries", "neurondb.neuranq_enabled",
    "neurondb.neuranmon_naptime", "neurondb.neuranmon_sample_size", "neurondb.neuranmon_target_latency",
    "neurondb.neuranmon_target_recall", "neurondb.neuranmon_enabled", "neurondb.neurandefrag_naptime",
    "neurondb.neurandefrag_compact_threshold", "neurondb.neurandefrag_fragmentation_threshold",
    "neurondb.neurandefrag_maintenance_window", "neurondb.neurandefrag_enabled",
    "neurondb.neuranllm_naptime", "neurondb.neuranllm_batch_size", "neurondb.neuranllm_timeout",
    "neurondb.neuranllm_max_retries", "neurondb.neuranllm_enabled",
}


def _doc_text() -> str:
    if not DOC.exists():
        pytest.skip(f"source document not found at {DOC} (tests read it from the shared checkout)")
    return DOC.read_text(encoding="utf-8")


def _unquote_sql(raw: str) -> str:
    raw = raw.strip()
    return raw[1:-1].replace("''", "'") if raw.startswith("'") and raw.endswith("'") else raw


def _doc_config_lines() -> list[tuple[str, str]]:
    """`neurondb.X = value` lines of the document's ```sql blocks (its Configuration sections)."""
    blocks = re.findall(r"```sql\n(.*?)```", _doc_text(), re.S)
    line = re.compile(r"^\s*(neurondb\.\w+)\s*=\s*('(?:[^']|'')*'|[^\s;]+)", re.M)
    return [(m.group(1), _unquote_sql(m.group(2))) for block in blocks for m in line.finditer(block)]


def _doc_alter_system(section: str | None = None) -> list[tuple[str, str]]:
    """`ALTER SYSTEM SET neurondb.X = value;` statements, optionally only those of one `## section`."""
    text = _doc_text()
    if section is not None:
        text = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", text, re.S | re.M).group(1)
    found = re.findall(r"ALTER SYSTEM SET (neurondb\.\w+)\s*=\s*([^;]+);", text)
    return [(name, _unquote_sql(raw)) for name, raw in found]


@pytest.fixture
def datadir(tmp_path: Path) -> DataDir:
    d = DataDir(tmp_path / "data")
    d.init()
    return d


def _write_conf(datadir: DataDir, text: str) -> None:
    datadir.conf.write_text(text)


# ---------------------------------------------------------------- the registry against the document


def test_document_settings_have_the_documents_defaults() -> None:
    lines = _doc_config_lines()
    assert len(lines) == len(DOC_SETTINGS), lines
    for name, raw in lines:
        setting = lookup(name)
        assert parse_value(setting, raw) == setting.default, (name, raw, setting.default)
    assert {lookup(name).name for name, _ in lines} == DOC_SETTINGS


def test_document_misspelling_is_an_alias() -> None:
    names = [name for name, _ in _doc_config_lines()]
    assert "neurondb.neuronmon_target_latency" in names  # the document really spells it so
    assert lookup("neurondb.neuronmon_target_latency") is REGISTRY["neurondb.neuranmon_target_latency"]


@pytest.mark.parametrize(("name", "raw"), _doc_alter_system() if DOC.exists() else [])
def test_document_alter_system_statements_work(datadir: DataDir, name: str, raw: str) -> None:
    setting = set_auto(datadir, name, raw)
    assert setting.context == "sighup"  # the document applies all of them with pg_reload_conf()
    assert Config.load(datadir).get(name) == parse_value(setting, raw)


def test_performance_tuning_section_is_covered() -> None:
    tuning = _doc_alter_system("Performance Tuning")
    assert len(tuning) == 9
    assert ("neurondb.neuranmon_target_latency", "50.0") in tuning
    assert set(tuning) <= set(_doc_alter_system())


def test_registry_is_consistent() -> None:
    aliases: set[str] = set()
    for name, s in REGISTRY.items():
        assert name == s.name and name.startswith("neurondb.") and name == name.lower()
        assert s.vartype in ("bool", "integer", "real", "string", "enum")
        assert s.context in ("postmaster", "sighup")
        assert s.short_desc and s.short_desc.endswith("."), name
        assert parse_value(s, format_value(s, s.default)) == s.default, name
        assert parse_value(s, format_value(s, s.default, with_unit=True)) == s.default, name
        if s.vartype in ("integer", "real"):
            assert s.min is not None and s.max is not None and s.min <= s.default <= s.max, name
            assert isinstance(s.default, int if s.vartype == "integer" else float), name
        else:
            assert s.min is None and s.max is None and s.unit is None, name
        if s.vartype == "enum":
            assert s.default in s.enumvals, name
        for alias in s.aliases:
            assert alias not in REGISTRY and alias not in aliases
            aliases.add(alias)


@pytest.mark.parametrize(("name", "default", "context"), [
    ("neurondb.neuranq_workers", 1, "postmaster"),
    ("neurondb.metrics_listen_address", "127.0.0.1", "postmaster"),
    ("neurondb.metrics_port", 9188, "postmaster"),
    ("neurondb.neuranllm_concurrency", 16, "postmaster"),
    ("neurondb.neuranq_job_modules", "", "postmaster"),
    ("neurondb.llm_provider", "local", "sighup"),
    ("neurondb.tenant_rate_limit", 0.0, "sighup"),
    ("neurondb.job_retention", 7 * 86400, "sighup"),
    ("neurondb.worker_restart_interval", 500, "sighup"),
    ("neurondb.neuranq_enabled", True, "sighup"),
])
def test_implicit_settings(name: str, default: object, context: str) -> None:
    s = lookup(name)
    assert (s.default, s.context) == (default, context)


def test_ranges_a_dba_expects() -> None:
    def span(name: str) -> tuple[float | None, float | None]:
        return REGISTRY[name].min, REGISTRY[name].max

    assert span("neurondb.neuranq_naptime") == (100, 60000)
    assert span("neurondb.neuranmon_target_recall") == (0.5, 1.0)
    assert span("neurondb.neuranq_max_retries") == (0, 100)
    assert span("neurondb.neuranllm_max_retries") == (0, 100)
    assert REGISTRY["neurondb.neuranq_batch_size"].min == 1
    assert REGISTRY["neurondb.neuranllm_batch_size"].min == 1
    assert REGISTRY["neurondb.neuranq_naptime"].unit == "ms"


# ---------------------------------------------------------------- names and values


def test_lookup_is_case_insensitive_and_suggests() -> None:
    assert lookup("NeuronDB.NeuranQ_Naptime").name == "neurondb.neuranq_naptime"
    with pytest.raises(SettingError, match=r'"neuranq_naptime".*did you mean "neurondb.neuranq_naptime"'):
        lookup("neuranq_naptime")
    with pytest.raises(SettingError, match=r'did you mean "neurondb.neuranq_batch_size"'):
        lookup("neurondb.neuranq_batchsize")
    with pytest.raises(SettingError, match="unrecognized configuration parameter"):
        lookup("neurondb.nothing_like_it")


@pytest.mark.parametrize(("name", "raw", "expected"), [
    ("neurondb.neuranq_naptime", "500", 500),
    ("neurondb.neuranq_naptime", "500ms", 500),
    ("neurondb.neuranq_naptime", "500 ms", 500),
    ("neurondb.neuranq_naptime", "2s", 2000),
    ("neurondb.neuranq_naptime", "1.5s", 1500),
    ("neurondb.neuranq_naptime", "1min", 60000),
    ("neurondb.neuranq_naptime", "200000us", 200),
    ("neurondb.neuranmon_naptime", "1h", 3_600_000),
    ("neurondb.neuranmon_naptime", "1d", 86_400_000),
    ("neurondb.job_retention", "7d", 604800),
    ("neurondb.job_retention", "90", 90),
    ("neurondb.job_retention", "1500ms", 2),  # rounded to the setting's unit, as PostgreSQL does
    ("neurondb.http_max_response_size", "8MB", 8192),
    ("neurondb.http_max_response_size", "512kB", 512),
    ("neurondb.neuranmon_target_latency", "50.0", 50.0),
    ("neurondb.neuranmon_target_latency", "0.25s", 250.0),
    ("neurondb.neuranmon_target_recall", "0.98", 0.98),
    ("neurondb.tenant_rate_limit", "12.5", 12.5),
    ("neurondb.neuranq_batch_size", " 200 ", 200),
    ("neurondb.log_level", "WARNING", "warning"),
    ("neurondb.neurandefrag_maintenance_window", "22:30-01:00", "22:30-01:00"),
])
def test_values_parse(name: str, raw: str, expected: object) -> None:
    value = parse_value(lookup(name), raw)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("raw", "expected"), [
    ("on", True), ("off", False), ("true", True), ("false", False), ("yes", True), ("no", False),
    ("1", True), ("0", False), ("TRUE", True), ("Off", False), ("t", True), ("f", False), ("of", False),
])
def test_bools_like_postgres(raw: str, expected: bool) -> None:
    assert parse_value(REGISTRY["neurondb.neuranq_enabled"], raw) is expected


@pytest.mark.parametrize(("name", "raw", "fragments"), [
    ("neurondb.neuranq_naptime", "50", ["50 ms is outside", "100 .. 60000 ms"]),
    ("neurondb.neuranq_naptime", "2min", ["120000 ms is outside", "100 .. 60000 ms"]),
    ("neurondb.neuranq_naptime", "fast", ["an integer in 100 .. 60000 ms", "units: us, ms, s, min, h, d"]),
    ("neurondb.neuranq_naptime", "10kB", ['invalid unit "kB"', "100 .. 60000 ms"]),
    ("neurondb.neuranq_batch_size", "0", ["0 is outside", "1 .. 10000"]),
    ("neurondb.neuranq_batch_size", "2.5", ["an integer in 1 .. 10000"]),
    ("neurondb.neuranq_batch_size", "10ms", ["takes no unit", "1 .. 10000"]),
    ("neurondb.neuranq_max_retries", "-1", ["-1 is outside", "0 .. 100"]),
    ("neurondb.neuranmon_target_recall", "0.4", ["0.4 is outside", "0.5 .. 1"]),
    ("neurondb.neuranmon_target_recall", "high", ["a number in 0.5 .. 1"]),
    ("neurondb.neuranmon_target_latency", "nan", ["a number in 0.1 .. 60000 ms"]),
    ("neurondb.neuranq_enabled", "maybe", ["a Boolean: on, off, true, false, yes, no, 1, 0"]),
    ("neurondb.neuranq_enabled", "o", ["a Boolean"]),
    ("neurondb.log_level", "loud", ["one of: debug, info, warning, error"]),
    ("neurondb.llm_provider", "skynet", ["one of: local, openai, ollama"]),
    ("neurondb.neurandefrag_maintenance_window", "2am-4am", ["HH:MM-HH:MM"]),
    ("neurondb.neurandefrag_maintenance_window", "24:00-02:00", ["HH:MM-HH:MM", "00..23"]),
    ("neurondb.neurandefrag_maintenance_window", "02:00-02:00", ["empty"]),
    ("neurondb.metrics_listen_address", "not an address", ["IP address", "'*'"]),
    ("neurondb.http_allowlist", "api.example.com, bad host", ['"bad host"', "CIDR"]),
    ("neurondb.neuranq_job_modules", "my-app.jobs", ['"my-app.jobs"', "module name"]),
    ("neurondb.llm_endpoint", "ftp://example.com", ["http:// or https://"]),
    ("neurondb.llm_routes", "llama3", ["model=provider[@endpoint]"]),
    ("neurondb.llm_routes", "llama3=skynet", ['unknown provider "skynet"', "ollama"]),
    ("neurondb.llm_model", "a\nb", ["single line"]),
])
def test_bad_values_name_setting_value_and_range(name: str, raw: str, fragments: list[str]) -> None:
    with pytest.raises(SettingError) as info:
        parse_value(lookup(name), raw)
    message = str(info.value)
    assert f'parameter "{name}"' in message and f'"{raw}"' in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("setting", [s for s in REGISTRY.values() if s.vartype in ("integer", "real")],
                         ids=lambda s: s.name)
def test_every_numeric_setting_rejects_just_outside_its_range(setting: Setting) -> None:
    step = 1 if setting.vartype == "integer" else 0.001
    for raw in (format_value(setting, setting.min - step), format_value(setting, setting.max + step)):
        with pytest.raises(SettingError, match=re.escape(f'"{setting.name}": "{raw}"')) as info:
            parse_value(setting, raw)
        assert "outside the valid range" in str(info.value)
    assert parse_value(setting, format_value(setting, setting.min)) == setting.min
    assert parse_value(setting, format_value(setting, setting.max)) == setting.max


def test_format_value() -> None:
    assert format_value(REGISTRY["neurondb.neuranq_naptime"], 60000) == "60000"
    assert format_value(REGISTRY["neurondb.neuranq_naptime"], 60000, with_unit=True) == "1min"
    assert format_value(REGISTRY["neurondb.neuranq_naptime"], 1500, with_unit=True) == "1500ms"
    assert format_value(REGISTRY["neurondb.job_retention"], 604800, with_unit=True) == "7d"
    assert format_value(REGISTRY["neurondb.http_max_response_size"], 1024, with_unit=True) == "1MB"
    assert format_value(REGISTRY["neurondb.neuranmon_target_latency"], 100.0) == "100"
    assert format_value(REGISTRY["neurondb.neuranmon_target_recall"], 0.95) == "0.95"
    assert format_value(REGISTRY["neurondb.neuranq_enabled"], False) == "off"


def test_structured_string_formats() -> None:
    assert parse_maintenance_window("02:00-04:00") == (120, 240)
    assert parse_maintenance_window("23:00-01:30") == (1380, 90)  # wraps midnight
    assert parse_llm_routes("llama3=ollama@http://gpu1:11434, gpt-*=OpenAI") == [
        LlmRoute("llama3", "ollama", "http://gpu1:11434"), LlmRoute("gpt-*", "openai", ""),
    ]
    assert parse_llm_routes("") == []


# ---------------------------------------------------------------- files


def test_conf_syntax(datadir: DataDir) -> None:
    _write_conf(datadir, """\
# a comment line
neurondb.neuranq_naptime = 500ms     # trailing comment
neurondb.neuranq_batch_size 200
NEURONDB.NEURANQ_TIMEOUT=1min
neurondb.llm_model = 'it''s a \\'model\\' # not a comment'
neurondb.neuronmon_target_latency = 80
neurondb.neuranq_enabled = off
neurondb.neuranq_batch_size = 300
   \t
""")
    config = Config.load(datadir)
    assert config["neurondb.neuranq_naptime"] == 500
    assert config["neurondb.neuranq_batch_size"] == 300  # the later line wins
    assert config["neurondb.neuranq_timeout"] == 60000
    assert config["neurondb.llm_model"] == "it's a 'model' # not a comment"
    assert config.get("neurondb.neuranmon_target_latency") == 80.0
    assert config.get("neurondb.neuronmon_target_latency") == 80.0
    assert config["neurondb.neuranq_enabled"] is False
    assert config["neurondb.neuranllm_batch_size"] == 10


def test_auto_conf_wins_and_rows_say_where_from(datadir: DataDir) -> None:
    _write_conf(datadir, "neurondb.neuranq_naptime = 500\nneurondb.neuranq_batch_size = 50\n")
    set_auto(datadir, "neurondb.neuranq_naptime", "700ms")
    config = Config.load(datadir)
    assert config["neurondb.neuranq_naptime"] == 700
    rows = {row["name"]: row for row in config.rows()}
    assert len(rows) == len(REGISTRY)
    naptime = rows["neurondb.neuranq_naptime"]
    assert naptime["setting"] == "700" and naptime["unit"] == "ms"
    assert naptime["source"] == "configuration file"
    assert naptime["sourcefile"] == str(datadir.auto_conf) and naptime["sourceline"] == 2
    assert (naptime["min_val"], naptime["max_val"], naptime["boot_val"]) == ("100", "60000", "1000")
    assert naptime["context"] == "sighup" and naptime["vartype"] == "integer"
    assert naptime["pending_restart"] is False and naptime["rejected_value"] is None
    assert rows["neurondb.neuranq_batch_size"]["sourceline"] == 2
    assert rows["neurondb.neuranq_batch_size"]["sourcefile"] == str(datadir.conf)
    assert rows["neurondb.neuranllm_timeout"]["source"] == "default"
    assert rows["neurondb.neuranllm_timeout"]["sourcefile"] is None
    assert rows["neurondb.log_level"]["enumvals"] == ["debug", "info", "warning", "error"]
    assert rows["neurondb.neuranq_enabled"]["enumvals"] is None
    assert rows["neurondb.neuranq_enabled"]["min_val"] is None


def test_bad_file_reports_every_problem_with_file_and_line(datadir: DataDir) -> None:
    _write_conf(datadir, """\
neurondb.neuranq_naptime = 5
neurondb.neuranq_batch_size = 100
neuranq_enabled = on
neurondb.llm_model = 'unterminated
neurondb.neuranq_timeout = 1s extra
neurondb.neuranmon_target_recall =
neurondb.neuranmon_target_recall = 2
""")
    with pytest.raises(SettingError) as info:
        Config.load(datadir)
    problems = info.value.problems
    conf = str(datadir.conf)
    assert len(problems) == 6, problems
    assert any(p.startswith(f"{conf}:1: ") and "neurondb.neuranq_naptime" in p and "100 .. 60000 ms" in p
               for p in problems)
    assert any(p.startswith(f"{conf}:3: ") and 'did you mean "neurondb.neuranq_enabled"' in p for p in problems)
    assert any(p.startswith(f"{conf}:4: ") and "unterminated" in p for p in problems)
    assert any(p.startswith(f"{conf}:5: ") and "syntax error" in p for p in problems)
    assert any(p.startswith(f"{conf}:6: ") and "missing value" in p for p in problems)
    assert any(p.startswith(f"{conf}:7: ") and '"2"' in p and "0.5 .. 1" in p for p in problems)
    assert "6 errors" in str(info.value)


def test_an_overridden_bad_line_is_not_an_error(datadir: DataDir) -> None:
    _write_conf(datadir, "neurondb.neuranq_naptime = 5\n")
    set_auto(datadir, "neurondb.neuranq_naptime", "800")
    assert Config.load(datadir)["neurondb.neuranq_naptime"] == 800


def test_missing_files_mean_defaults(tmp_path: Path) -> None:
    config = Config.load(DataDir(tmp_path / "nowhere"))
    assert all(config[name] == s.default for name, s in REGISTRY.items())


# ---------------------------------------------------------------- reload


def test_reload_applies_sighup_defers_postmaster_rejects_invalid(datadir: DataDir) -> None:
    _write_conf(datadir, "neurondb.neuranq_batch_size = 50\nneurondb.neuranllm_timeout = 10s\n")
    config = Config.load(datadir)
    _write_conf(datadir, """\
neurondb.neuranq_naptime = 250ms
neurondb.neuranq_workers = 4
neurondb.neuranq_batch_size = 0
neurondb.no_such_setting = 1
""")
    result = config.reload()

    # sighup: applied, including neuranllm_timeout going back to its default after its line was removed
    assert ("neurondb.neuranq_naptime", 1000, 250) in result.changed
    assert ("neurondb.neuranllm_timeout", 10000, 30000) in result.changed
    assert config["neurondb.neuranq_naptime"] == 250 and config["neurondb.neuranllm_timeout"] == 30000
    # postmaster: pending, not applied
    assert result.pending_restart == [("neurondb.neuranq_workers", 1, 4)]
    assert config["neurondb.neuranq_workers"] == 1
    # invalid: rejected, old value kept; unknown name rejected too
    rejected = {name: (raw, msg) for name, raw, msg in result.rejected}
    assert rejected["neurondb.neuranq_batch_size"][0] == "0"
    assert f"{datadir.conf}:3: " in rejected["neurondb.neuranq_batch_size"][1]
    assert "1 .. 10000" in rejected["neurondb.neuranq_batch_size"][1]
    assert "unrecognized" in rejected["neurondb.no_such_setting"][1]
    assert config["neurondb.neuranq_batch_size"] == 50
    assert len(result.changed) == 2

    rows = {row["name"]: row for row in config.rows()}
    assert rows["neurondb.neuranq_workers"]["pending_restart"] is True
    assert rows["neurondb.neuranq_workers"]["setting"] == "1"
    assert rows["neurondb.neuranq_workers"]["pending_value"] == "4"
    assert rows["neurondb.neuranq_batch_size"]["setting"] == "50"
    assert rows["neurondb.neuranq_batch_size"]["rejected_value"] == "0"
    assert "1 .. 10000" in rows["neurondb.neuranq_batch_size"]["rejected_error"]
    assert rows["neurondb.neuranq_naptime"]["sourceline"] == 1

    # fixing the file clears the rejection; reverting the postmaster setting clears pending
    _write_conf(datadir, "neurondb.neuranq_naptime = 250ms\nneurondb.neuranq_batch_size = 75\n")
    result = config.reload()
    assert result.changed == [("neurondb.neuranq_batch_size", 50, 75)]
    assert result.pending_restart == [] and result.rejected == []
    rows = {row["name"]: row for row in config.rows()}
    assert rows["neurondb.neuranq_workers"]["pending_restart"] is False
    assert rows["neurondb.neuranq_batch_size"]["rejected_value"] is None


def test_reload_with_unchanged_files_changes_nothing(datadir: DataDir) -> None:
    _write_conf(datadir, "neurondb.neuranq_naptime = 250\nneurondb.metrics_port = 9999\n")
    config = Config.load(datadir)
    result = config.reload()
    assert (result.changed, result.pending_restart, result.rejected) == ([], [], [])


def test_reload_with_a_syntax_error_applies_nothing(datadir: DataDir) -> None:
    config = Config.load(datadir)
    _write_conf(datadir, "neurondb.neuranq_naptime = 250\nneurondb.neuranq_batch_size = 'half written\n")
    result = config.reload()
    assert result.changed == [] and config["neurondb.neuranq_naptime"] == 1000
    assert len(result.rejected) == 1
    assert f"{datadir.conf}:2: " in result.rejected[0][2] and "no changes were applied" in result.rejected[0][2]


def test_reload_sees_set_auto_and_reset_auto(datadir: DataDir) -> None:
    config = Config.load(datadir)
    set_auto(datadir, "neurondb.neuranmon_target_recall", "0.98")
    assert config.reload().changed == [("neurondb.neuranmon_target_recall", 0.95, 0.98)]
    reset_auto(datadir, "neurondb.neuranmon_target_recall")
    assert config.reload().changed == [("neurondb.neuranmon_target_recall", 0.98, 0.95)]


# ---------------------------------------------------------------- ALTER SYSTEM


def _auto_lines(datadir: DataDir) -> list[str]:
    return [line for line in datadir.auto_conf.read_text().splitlines() if not line.startswith("#")]


def test_set_auto_and_reset_auto_round_trip(datadir: DataDir) -> None:
    assert set_auto(datadir, "neurondb.neuranq_batch_size", "200").context == "sighup"
    assert set_auto(datadir, "neurondb.neuranq_workers", "2").context == "postmaster"
    set_auto(datadir, "neurondb.neuronmon_target_latency", "50.0")  # alias written under the real name
    set_auto(datadir, "neurondb.llm_model", "it's \\ odd")
    set_auto(datadir, "neurondb.neuranq_batch_size", "300")  # replaced in place
    assert _auto_lines(datadir) == [
        "neurondb.neuranq_batch_size = '300'",
        "neurondb.neuranq_workers = '2'",
        "neurondb.neuranmon_target_latency = '50.0'",
        "neurondb.llm_model = 'it''s \\\\ odd'",
    ]
    config = Config.load(datadir)
    assert config["neurondb.neuranq_batch_size"] == 300
    assert config["neurondb.neuranmon_target_latency"] == 50.0
    assert config["neurondb.llm_model"] == "it's \\ odd"

    assert reset_auto(datadir, "neurondb.neuronmon_target_latency").name == "neurondb.neuranmon_target_latency"
    reset_auto(datadir, "neurondb.neuranq_workers")
    reset_auto(datadir, "neurondb.neuranq_workers")  # resetting an absent setting is fine
    assert _auto_lines(datadir) == ["neurondb.neuranq_batch_size = '300'", "neurondb.llm_model = 'it''s \\\\ odd'"]
    assert Config.load(datadir)["neurondb.neuranmon_target_latency"] == 100.0


def test_set_auto_refuses_bad_values_without_touching_the_file(datadir: DataDir) -> None:
    set_auto(datadir, "neurondb.neuranq_batch_size", "200")
    before = datadir.auto_conf.read_text()
    with pytest.raises(SettingError, match=r'"neurondb.neuranq_naptime": "10".*100 .. 60000 ms'):
        set_auto(datadir, "neurondb.neuranq_naptime", "10")
    with pytest.raises(SettingError, match=r'did you mean "neurondb\.neuranq_naptime"'):
        set_auto(datadir, "neuranq_naptime", "500")
    assert datadir.auto_conf.read_text() == before


def test_set_auto_keeps_entries_it_cannot_judge(datadir: DataDir) -> None:
    datadir.auto_conf.write_text("neurondb.neuranq_batch_size = '0'\nneurondb.retired_setting = 'x'\n")
    set_auto(datadir, "neurondb.neuranq_naptime", "500")
    assert _auto_lines(datadir) == ["neurondb.neuranq_batch_size = '0'", "neurondb.retired_setting = 'x'",
                                    "neurondb.neuranq_naptime = '500'"]
    reset_auto(datadir, "neurondb.neuranq_batch_size")  # the way out of a bad ALTER SYSTEM entry
    assert "neurondb.neuranq_batch_size" not in datadir.auto_conf.read_text()


def test_set_auto_refuses_a_garbled_auto_conf(datadir: DataDir) -> None:
    datadir.auto_conf.write_text("neurondb.neuranq_naptime = 'oops\n")
    with pytest.raises(SettingError, match=rf"{re.escape(str(datadir.auto_conf))}:1: .*unterminated"):
        set_auto(datadir, "neurondb.neuranq_batch_size", "5")


def test_written_files_are_private(tmp_path: Path) -> None:
    datadir = DataDir(tmp_path)  # no init: set_auto creates auto.conf itself
    set_auto(datadir, "neurondb.neuranq_batch_size", "200")
    for path in (datadir.auto_conf, tmp_path / "neurondb.auto.conf.lock"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert Config.load(datadir)["neurondb.neuranq_batch_size"] == 200


def test_concurrent_set_auto_loses_no_entry(datadir: DataDir) -> None:
    names = [name for name, s in REGISTRY.items() if s.vartype == "integer" and s.min <= 1 <= s.max][:12]
    threads = [threading.Thread(target=set_auto, args=(datadir, name, "1")) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    config = Config.load(datadir)
    assert len(_auto_lines(datadir)) == len(names)
    assert all(config[name] == 1 for name in names)


def test_typed_reads_follow_the_declared_type(datadir: DataDir) -> None:
    _write_conf(datadir, "neurondb.neuranq_batch_size = 7\nneurondb.neuranllm_timeout = 2500\n"
                         "neurondb.neuranmon_target_recall = 0.9\n")
    config = Config.load(datadir)
    assert config.get_int("neurondb.neuranq_batch_size") == 7
    assert config.get_int("neuranq_batch_size") == 7                     # the prefix may be left out
    assert config.get_float("neuranmon_target_recall") == 0.9
    assert config.get_float("neuranq_batch_size") == 7.0                 # an integer read as a float
    assert config.get_seconds("neuranllm_timeout") == 2.5                # ms to seconds
    assert config.get_bool("neuranq_enabled") is True
    assert config.get_str("neurandefrag_maintenance_window") == REGISTRY[
        "neurondb.neurandefrag_maintenance_window"].default
    for read, name in ((config.get_int, "neuranmon_target_recall"), (config.get_bool, "neuranq_batch_size"),
                       (config.get_str, "neuranq_enabled"), (config.get_seconds, "neuranq_batch_size")):
        with pytest.raises(TypeError, match=name):
            read(name)
    with pytest.raises(SettingError, match="unrecognized"):
        config.get_int("no_such_setting")
