"""quant/results.py: appends keep every old row whatever the old header, a malformed table is refused
untouched, and concurrent or killed appenders never lose, merge or cut a row."""
import csv
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from quant.results import COLUMNS, ResultsError, append_result, read_results


def read_csv(path):
    """Independent reader: (header, rows as dicts); fails if any row's length differs from the header."""
    with open(path, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    header, body = table[0], table[1:]
    assert all(len(row) == len(header) for row in body), "ragged CSV"
    return header, [dict(zip(header, row)) for row in body]


def test_first_append_creates_table(tmp_path):
    path = tmp_path / "results" / "results.csv"
    append_result(path, {"mode": "fp", "test_acc": 99.1, "extra_metric": 3})
    header, rows = read_csv(path)
    assert header == COLUMNS + ["extra_metric"]
    assert rows == [{**{c: "" for c in header}, "mode": "fp", "test_acc": "99.1", "extra_metric": "3"}]


def test_awkward_values_round_trip(tmp_path):
    path = tmp_path / "results.csv"
    value = '{"rho": 0.001, "note": "a, \\"quoted\\"\nmultiline"}'
    append_result(path, {"mode": "admm", "hyperparams": value})
    append_result(path, {"mode": "fp", "hyperparams": "{}"})
    _, rows = read_csv(path)
    assert [r["hyperparams"] for r in rows] == [value, "{}"]
    assert read_results(path)[1][0]["hyperparams"] == value


OLD_TABLES = {
    "fewer columns": "mode,test_acc\nfp,99.0\ntwn,98.5\n",
    "reordered": "test_acc,seed,mode\n99.0,0,fp\n98.5,1,twn\n",
    "unknown column": "mode,test_acc,legacy_note\nfp,99.0,hello\ntwn,98.5,\"a,b\"\n",
}


@pytest.mark.parametrize("name", list(OLD_TABLES))
def test_old_schema_keeps_all_rows(tmp_path, name):
    path = tmp_path / "results.csv"
    path.write_text(OLD_TABLES[name])
    old_header, old_rows = read_csv(path)
    append_result(path, {"mode": "ttq", "test_acc": 97.0, "seed": 2})
    header, rows = read_csv(path)
    assert set(old_header) <= set(header) and set(COLUMNS) <= set(header)
    assert len(rows) == len(old_rows) + 1
    for old, new in zip(old_rows, rows):
        assert {k: new[k] for k in old} == old  # every old value kept under its own column
        assert all(new[k] == "" for k in header if k not in old)
    assert (rows[-1]["mode"], rows[-1]["test_acc"], rows[-1]["seed"]) == ("ttq", "97.0", "2")


def test_malformed_table_is_refused_untouched(tmp_path):
    path = tmp_path / "results.csv"
    text = "mode,test_acc\nfp,99.0\ntwn,98.5,surplus\n"
    path.write_text(text)
    with pytest.raises(ResultsError, match="line 3"):
        append_result(path, {"mode": "fp"})
    assert path.read_text() == text


APPENDER = """
import sys
from quant.results import append_result
worker, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    append_result(sys.argv[3], {"mode": "fp", "seed": worker, "epochs": i, "hyperparams": '{"a": 1, "b": "x,y"}'})
"""


def start_appender(path, worker, n):
    return subprocess.Popen([sys.executable, "-c", APPENDER, str(worker), str(n), str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_appends_from_processes_lose_nothing(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("mode,test_acc\nfp,99.0\n")  # an old-schema table to start from
    workers, n = 3, 40
    procs = [start_appender(path, w, n) for w in range(workers)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    _, rows = read_csv(path)
    assert len(rows) == 1 + workers * n
    assert rows[0]["test_acc"] == "99.0"
    got = sorted((int(r["seed"]), int(r["epochs"])) for r in rows[1:])
    assert got == sorted((w, i) for w in range(workers) for i in range(n))
    assert all(r["hyperparams"] == '{"a": 1, "b": "x,y"}' for r in rows[1:])


def test_killed_appender_leaves_whole_rows(tmp_path):
    path = tmp_path / "results.csv"
    proc = start_appender(path, 0, 100000)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 10000):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    _, rows = read_csv(path)  # still a valid table
    assert [int(r["epochs"]) for r in rows] == list(range(len(rows))) and len(rows) > 10
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("results.csv", "results.csv.lock")]
    assert all(name.startswith(".") and name.endswith(".tmp") for name in leftovers), leftovers
