"""The operator's surface of the auto-tuner: `neurondb index tune` shows and changes an index's tuning, and
`neurondb status` shows each index's ef, mode, state, recall and p95, through the real service and CLI."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import orjson
import psycopg

import neurondb
from tests.service import Service, wait_for
from tests.test_cli import neurondb as run_cli
from tests.test_tuner import DIM, header_ef, search_load, wait_loaded

N = 1000
TUNER = {"neurondb.neuranmon_naptime": "1s"}


def load(conn: psycopg.Connection) -> None:
    """Index `docs` (ef_search 40) with N random vectors."""
    conn.execute("SELECT neurondb.create_index('docs', %s, 'l2', 8, 40, ef_search => 40)", (DIM,))
    base = np.random.default_rng(1).standard_normal((N, DIM)).astype(np.float32)
    with conn.cursor().copy("COPY neurondb.neurondb_vectors (index_name, doc_id, embedding) FROM STDIN") as copy:
        for i, v in enumerate(base):
            copy.write_row(("docs", f"d{i}", v.tolist()))


def catalog(conn: psycopg.Connection) -> tuple:
    return conn.execute("SELECT ef_search, tuning, target_recall, target_latency_ms FROM neurondb.neurondb_indexes "
                        "WHERE index_name = 'docs'").fetchone()


def test_tune_shows_and_changes_the_tuning(tmp_path: Path, fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        load(conn)
        svc = Service(tmp_path / "data", fresh_dsn, TUNER, env={"COLUMNS": "200"})   # rich: no wrapping
        svc.start()
        try:
            queries = np.random.default_rng(2).standard_normal((500, DIM)).astype(np.float32)
            with neurondb.connect(str(svc.datadir.root), fresh_dsn) as client:
                wait_loaded(client)

                def measured() -> bool:
                    # 5 % keep their vector: 100 sampled take ~2,000. Checked in PostgreSQL, so that every search
                    # takes longer than the smallest latency target (0.1 ms), set below to show the conflict: a
                    # search answered from shared memory alone can be faster than that.
                    search_load(client, queries, 1, consistent=True)
                    return conn.execute("SELECT recall IS NOT NULL AND p95_ms IS NOT NULL "
                                        "FROM neurondb.tuning_status").fetchone()[0]
                wait_for(measured, 60.0, "the tuner to measure the index")

            def evaluation() -> tuple:
                return conn.execute("SELECT ef_search, recall, recall_low, p95_ms FROM neurondb.neurondb_tuning_state"
                                    ).fetchone()

            def shown_unchanged() -> tuple[tuple, str] | None:
                """The output with the evaluation it shows (the tuner rewrites it every cycle)."""
                before, out = evaluation(), svc.cli("index", "tune", "docs").stdout
                return (before, out) if evaluation() == before else None
            (ef, recall, low, p95), shown = wait_for(shown_unchanged, 20.0, "one evaluation to print")
            assert re.search(rf"recall \(replayed at ef {ef}\)\s+│ {recall:.3f} \(95 % lower bound {low:.3f}\)",
                             shown), shown
            assert f"p95 {p95:.2f} ms" in shown and "auto (neuranmon tunes ef_search)" in shown, shown
            assert "0.95 (global neurondb.neuranmon_target_recall)" in shown, shown
            assert "100 ms p95 (global neurondb.neuranmon_target_latency)" in shown, shown
            as_json = orjson.loads(svc.cli("index", "tune", "docs", "--json").stdout)
            assert as_json["index_name"] == "docs" and as_json["tuning"] == "auto", as_json
            assert as_json["queries"] >= 100 and as_json["recall"] is not None and as_json["p95_ms"] is not None
            assert as_json["own_target_recall"] is False and as_json["target_recall"] == 0.95

            status = orjson.loads(svc.cli("status", "--json").stdout)
            (ix,) = status["indexes"]
            assert ix["name"] == "docs" and ix["tuning"] == "auto" and ix["ef_search"] >= 10, ix
            assert ix["tuning_state"] in ("converged", "exploring", "unattainable"), ix
            assert ix["recall"] is not None and ix["p95_ms"] is not None and ix["target_recall"] == 0.95, ix
            # A latency target below any search's: the conflict is said in status.
            svc.cli("index", "tune", "docs", "--target-latency", "0.1ms")
            wait_for(lambda: "docs: SLO unattainable: recall 0.950 needs ef" in svc.cli("status").stdout, 10.0,
                     "status to show the conflict")

            # 60 and 17 are on no rung of the tuner's ladder (tuning.ef_ladder): the tuner cannot have set them.
            out = svc.cli("index", "tune", "docs", "--ef", "60", "--pin", "--target-recall", "0.98",
                          "--target-latency", "20ms").stdout
            assert re.search(r"ef_search \d+ -> 60; tuning auto -> pinned; target_recall global -> 0.98; "
                             r"target_latency_ms 0.1 ms -> 20 ms", out), out
            assert catalog(conn) == (60, "pinned", 0.98, 20.0)
            wait_for(lambda: header_ef(svc) == 60, 2.0, "--ef to reach the graph's header")
            assert "0.98 (this index's own)" in svc.cli("index", "tune", "docs").stdout

            svc.cli("index", "tune", "docs", "--unpin", "--target-recall", "default", "--target-latency", "0.5s")
            assert catalog(conn)[1:] == ("auto", None, 500.0)
            svc.cli("index", "tune", "docs", "--target-latency", "default")
            assert catalog(conn)[1:] == ("auto", None, None)
            out = svc.cli("index", "tune", "docs", "--ef", "17").stdout
            assert re.search(r"ef_search \d+ -> 17 \(the tuner's new starting point\)", out), out
        finally:
            svc.close()


def test_tune_refuses_bad_values_in_one_line(tmp_path: Path, fresh_dsn: str) -> None:
    d = tmp_path / "d"
    assert run_cli("init", "--dsn", fresh_dsn, data_dir=d).returncode == 0
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        load(conn)
        before = catalog(conn)
        for args, expected in [
            (("--ef", "0"), ['"--ef": "0"', "outside the valid range 1 .. 4096"]),
            (("--ef", "5000"), ['"--ef": "5000"', "1 .. 4096"]),
            (("--ef", "many"), ['"--ef": "many"', "expected an integer in 1 .. 4096"]),
            (("--target-recall", "0"), ['"--target-recall": "0"', "(0, 1]", '"default"']),
            (("--target-recall", "1.5"), ['"--target-recall": "1.5"', "(0, 1]"]),
            (("--target-recall", "nan"), ['"--target-recall": "nan"', "(0, 1]"]),
            (("--target-recall", "x" * 500), ['"--target-recall": "xxx', '..."', "(0, 1]"]),
            (("--target-latency", "20x"), ['"--target-latency": "20x"', 'invalid unit "x"', "0.1 .. 60000 ms"]),
            (("--target-latency", "-5ms"), ['"--target-latency": "-5ms"', "outside the valid range"]),
            (("--target-latency", "soon"), ['"--target-latency": "soon"', "units: us, ms, s"]),
            (("--pin", "--target-recall", "2"), ['"--target-recall": "2"']),      # nothing applied, not the pin
        ]:
            result = run_cli("index", "tune", "docs", *args, data_dir=d)
            assert result.returncode == 1, (args, result.stdout, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
            assert all(text in result.stderr for text in expected), (args, result.stderr)
        assert catalog(conn) == before
        for args in (("nope",), ("nope", "--pin")):
            result = run_cli("index", "tune", *args, data_dir=d)
            assert result.returncode == 1 and result.stderr.strip() == "error: no index 'nope'", result.stderr
        assert run_cli("index", "tune", "docs", "--ef", data_dir=d).returncode == 2     # usage: no value
        shown = run_cli("index", "tune", "docs", data_dir=d)     # no service has measured it yet
        assert shown.returncode == 0 and "waiting" in shown.stdout, shown.stdout
