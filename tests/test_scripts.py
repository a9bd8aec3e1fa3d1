"""The scripts as a user runs them, on tiny synthetic data, offline.

Real subprocesses where only a fresh interpreter proves the point (--help of every script, a bad flag, an
offline download, the end-to-end train -> eval, signals, kills); the many other failure cases run the
scripts' `__main__` in-process (conftest.call_script: same argparse + run_main path, no torch re-import).
Every expected failure is exit code != 0 (2 for bad input), one stderr line without a traceback, and no side
effects: no download folder, no checkpoint, no results row, no executed payload. Interrupted or diverging
training leaves an existing good checkpoint byte-for-byte intact.
"""
import csv
import json
import shutil
import signal
import time

import pytest
import torch

from conftest import (REPO, assert_one_line_error, bad_checkpoints, call_script, files_in, run_all, run_script,
                      start_script, stop, wait_for_line)
from quant.checkpoint import load_checkpoint
from quant.data import load_mnist
from quant.engine import evaluate
from quant.export import rebuild_model

SCRIPTS = ["train.py", "eval.py", "tune_hyperparams.py", "plot_results.py", "deployment_compression.py", "reproduce.py"]
FAST = ["--epochs", "1", "--val-size", "64", "--no-progress", "--skip-checksum"]


def train_args(data_dir, out, *extra):
    return ["--mode", "fp", *FAST, "--data-dir", data_dir, "--out", out, *extra]


def read_csv(path):
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    assert all(len(row) == len(table[0]) for row in table), "ragged CSV"
    return [dict(zip(table[0], row)) for row in table[1:]]


# ---------------------------------------------------------------- real subprocesses, run at once

# One fresh interpreter runs every script's __main__ with --help in turn (one torch import instead of six)
# and reports {script: [exit code, stdout, stderr]} as JSON.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys
report = {}
for script in sys.argv[1:]:
    out, err, code = io.StringIO(), io.StringIO(), None
    sys.argv = [script, "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code = repr(e)
    report[script] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def subprocesses(tmp_path_factory, synthetic_mnist):
    """--help of every script, plus two failures as a user meets them in a fresh interpreter: a bad flag,
    and MNIST missing with the network unreachable (proxy env pointing at a closed port)."""
    root = tmp_path_factory.mktemp("subprocesses")
    existing = [s for s in SCRIPTS if (REPO / s).exists()]
    jobs = {"help": ("-c", [HELP_RUNNER, *existing], {})}
    jobs["bad flag"] = ("train.py", ["--mode", "fp", "--lr", "-1", "--data-dir", root / "d1", "--out", root / "o1.pth"],
                        {"cwd": root})
    jobs["offline download"] = ("train.py", ["--mode", "fp", "--epochs", "1", "--data-dir", root / "d3", "--out",
                                             root / "o3.pth"], {"cwd": root})
    return root, run_all(jobs)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0(subprocesses, script):
    _, results = subprocesses
    if not (REPO / script).exists():
        pytest.skip(f"{script} does not exist yet")
    assert results["help"].returncode == 0, results["help"].stderr
    code, out, err = json.loads(results["help"].stdout)[script]
    assert code in (0, None), f"{script} --help: exit {code}; {err[-2000:]}"
    assert out.startswith("usage:") and script in out
    assert "Traceback" not in err


def test_subprocess_failures(subprocesses):
    root, results = subprocesses
    assert_one_line_error(results["bad flag"], 2, ["--lr"])
    assert not any((root / n).exists() for n in ("d1", "o1.pth")), "a bad flag must stop all work"
    assert_one_line_error(results["offline download"], 2, ["download failed", str(root / "d3"), "--data-dir"])
    assert not (root / "o3.pth").exists()


# ---------------------------------------------------------------- failures, in-process through the same __main__

BAD_ARGS = {  # name -> (train.py flags, words the one error line must contain)
    "lr -1": (["--mode", "fp", "--lr", "-1"], ["--lr"]),
    "lr 0": (["--mode", "fp", "--lr", "0"], ["--lr"]),
    "lr nan": (["--mode", "fp", "--lr", "nan"], ["--lr"]),
    "batch-size 0": (["--mode", "fp", "--batch-size", "0"], ["--batch-size"]),
    "epochs 0": (["--mode", "fp", "--epochs", "0"], ["--epochs"]),
    "mode bogus": (["--mode", "bogus"], ["bogus"]),
    "admm rho 0": (["--mode", "admm", "--rho", "0"], ["--rho"]),
    "ttq t 1.5": (["--mode", "ttq", "--t", "1.5"], ["--t"]),
    "fp rho 1": (["--mode", "fp", "--rho", "1"], ["--rho", "admm"]),
    "batch > subset": (["--mode", "fp", "--train-subset", "100", "--batch-size", "200"], ["--batch-size", "100"]),
}


@pytest.mark.parametrize("name", list(BAD_ARGS))
def test_bad_arguments(tmp_path, name):
    argv, words = BAD_ARGS[name]
    result = call_script("train.py", *argv, "--no-progress", "--data-dir", tmp_path / "data", "--out",
                         tmp_path / "out.pth", cwd=tmp_path)
    assert_one_line_error(result, 2, words)
    assert result.stdout == "" and list(tmp_path.iterdir()) == []  # rejected before any work


def test_batch_larger_than_the_training_data(synthetic_mnist, tmp_path):
    result = call_script("train.py", *train_args(synthetic_mnist, tmp_path / "out.pth", "--batch-size", "449"),
                         cwd=tmp_path)
    assert_one_line_error(result, 2, ["--batch-size 449", "448 training images"])
    assert list(tmp_path.iterdir()) == []


def test_val_size_larger_than_the_data(synthetic_mnist, tmp_path):
    result = call_script("train.py", "--mode", "fp", "--val-size", "512", "--skip-checksum", "--data-dir",
                         synthetic_mnist, "--out", tmp_path / "out.pth", cwd=tmp_path)
    assert_one_line_error(result, 2, ["--val-size 512"])
    assert list(tmp_path.iterdir()) == []


DATA_ERRORS = {  # how to break a copy of the synthetic folder -> words the error line must contain
    "swap": ["train-images-idx3-ubyte", "magic"],
    "truncate": ["train-images-idx3-ubyte", "truncated"],
    "corrupt-gz": ["train-images-idx3-ubyte.gz", "cannot read"],
    "zero-length": ["t10k-labels-idx1-ubyte", "too short"],
    "verify": ["train-images-idx3-ubyte"],  # synthetic data without --skip-checksum is not MNIST
}


@pytest.mark.parametrize("how", list(DATA_ERRORS))
def test_broken_data_is_one_line(tmp_path, synthetic_mnist, synthetic_mnist_gz, how):
    folder = tmp_path / "data"
    shutil.copytree(synthetic_mnist_gz if how == "corrupt-gz" else synthetic_mnist, folder)
    images = folder / "train-images-idx3-ubyte"
    if how == "swap":  # a labels file where the images belong
        shutil.copy(folder / "train-labels-idx1-ubyte", images)
    elif how == "truncate":
        images.write_bytes(images.read_bytes()[:-100])
    elif how == "corrupt-gz":
        gz = folder / "train-images-idx3-ubyte.gz"
        good = gz.read_bytes()
        gz.write_bytes(good[:12] + bytes(b ^ 0xFF for b in good[12:-8]) + good[-8:])
    elif how == "zero-length":
        (folder / "t10k-labels-idx1-ubyte").write_bytes(b"")
    out = tmp_path / "out.pth"
    args = ["--mode", "fp", "--epochs", "1", "--val-size", "64", "--no-progress", "--data-dir", folder, "--out", out]
    result = call_script("train.py", *args, *([] if how == "verify" else ["--skip-checksum"]), cwd=tmp_path)
    assert_one_line_error(result, 2, [*DATA_ERRORS[how], "--data-dir"])
    assert not out.exists()


BAD_CHECKPOINTS = ["missing", "empty", "truncated", "random", "foreign-dict", "future-version", "other-mode",
                   "code-torch", "code-pickle"]


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_eval_refuses_bad_checkpoint(tmp_path, synthetic_mnist, case):
    marker, results = tmp_path / "MARKER", tmp_path / "results.csv"
    path = bad_checkpoints(tmp_path, marker)[case]
    result = call_script("eval.py", "--mode", "fp", "--checkpoint", path, "--data-dir", synthetic_mnist,
                         "--skip-checksum", "--results", results, cwd=tmp_path)
    assert_one_line_error(result, 2, [str(path)])
    assert not marker.exists(), "eval.py executed code from a checkpoint"
    assert not results.exists()


# ---------------------------------------------------------------- a good run end to end

@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_mnist):
    """train.py --mode fp on synthetic data, as a command: a.pth."""
    root = tmp_path_factory.mktemp("trained")
    result = run_script("train.py", *train_args(synthetic_mnist, root / "a.pth"), cwd=root)
    assert result.returncode == 0, result.stderr
    return root, {"a": result}


def test_train_writes_checkpoint_and_history(trained):
    root, runs = trained
    assert "Traceback" not in runs["a"].stderr
    ckpt = load_checkpoint(root / "a.pth", "fp")
    assert ckpt["config"]["epochs"] == 1 and ckpt["config"]["val_size"] == 64 and len(ckpt["history"]) == 1
    assert ckpt["metrics"]["val_acc"] > 50  # the synthetic classes are learnable
    history = read_csv(root / "a_history.csv")
    assert [int(row["epoch"]) for row in history] == [1]
    assert float(history[0]["val_acc"]) == pytest.approx(ckpt["history"][0]["val_acc"])
    assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]


def test_eval_appends_the_deployed_models_accuracy(trained, synthetic_mnist, tmp_path):
    root, _ = trained
    results = tmp_path / "results.csv"
    results.write_text("mode,test_acc\nold,1.0\n")  # an older, narrower table keeps its row
    result = run_script("eval.py", "--mode", "fp", "--checkpoint", root / "a.pth", "--data-dir", synthetic_mnist,
                        "--skip-checksum", "--results", results, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_csv(results)
    assert [r["mode"] for r in rows] == ["old", "fp"] and rows[0]["test_acc"] == "1.0"
    # Independent recomputation: rebuild the deployed model from the checkpoint and score the test set.
    data = load_mnist(synthetic_mnist, test_only=True, verify_checksum=False, allow_download=False)
    expected = evaluate(rebuild_model(load_checkpoint(root / "a.pth")["export"]), data.test_x, data.test_y)
    assert float(rows[1]["test_acc"]) == pytest.approx(expected["acc"], abs=1e-3)
    assert float(rows[1]["test_acc"]) > 50
    assert rows[1]["checkpoint"] == str(root / "a.pth") and int(rows[1]["epochs"]) == 1
    assert f"{expected['acc']:.2f}%" in result.stdout


def test_eval_reads_the_checkpoint_once(trained, synthetic_mnist, tmp_path, monkeypatch):
    root, _ = trained
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args[0]) or real_load(*args, **kwargs))
    result = call_script("eval.py", "--mode", "fp", "--checkpoint", root / "a.pth", "--data-dir", synthetic_mnist,
                         "--skip-checksum", "--no-append", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert loads == [root / "a.pth"]


def test_real_mnist_small_run(real_mnist, tmp_path):
    out, results = tmp_path / "fp.pth", tmp_path / "results.csv"
    # In-process (call_script): same __main__ code path, no second torch import; train.py already runs as a
    # real command on synthetic data above.
    train = call_script("train.py", "--mode", "fp", "--train-subset", "1000", "--val-size", "500", "--epochs", "1",
                        "--no-progress", "--data-dir", real_mnist, "--out", out, cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "training fp on 1000 images (500 held out" in train.stdout
    result = call_script("eval.py", "--mode", "fp", "--checkpoint", out, "--data-dir", real_mnist, "--results", results,
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (row,) = read_csv(results)
    assert "10000 images" in result.stdout
    assert float(row["test_acc"]) > 50  # 8 steps on 1000 images already beat chance (10 %) by far
    assert row["data_checksum"] == load_checkpoint(out)["data_checksum"] != ""


# ---------------------------------------------------------------- divergence and interruption

@pytest.fixture
def good_checkpoint(trained, tmp_path):
    """A folder holding a good fp.pth + fp_history.csv (copies of the trained run) and their bytes."""
    root, _ = trained
    folder = tmp_path / "ckpts"
    folder.mkdir()
    shutil.copy(root / "a.pth", folder / "fp.pth")
    shutil.copy(root / "a_history.csv", folder / "fp_history.csv")
    return folder / "fp.pth", files_in(folder)


def test_divergence_keeps_the_good_checkpoint(good_checkpoint, synthetic_mnist, tmp_path):
    out, before = good_checkpoint
    result = call_script("train.py", *train_args(synthetic_mnist, out, "--lr", "1e6"), cwd=tmp_path)
    assert_one_line_error(result, contains=["diverged", "1e+06"])
    assert result.returncode == 3  # cli.run_main: 3 = diverged
    assert files_in(out.parent) == before


SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}


@pytest.fixture(scope="module")
def interrupted(trained, synthetic_mnist, tmp_path_factory):
    """Start one long train.py per case at once, signal each after its first epoch; collect the outcomes."""
    root, _ = trained
    cases = {}
    for name, sig in SIGNALS.items():
        folder = tmp_path_factory.mktemp("interrupted")
        out = folder / "ckpts" / "fp.pth"
        out.parent.mkdir()
        shutil.copy(root / "a.pth", out)
        shutil.copy(root / "a_history.csv", out.parent / "fp_history.csv")
        before = files_in(out.parent)
        proc = start_script("train.py", *train_args(synthetic_mnist, out), "--epochs", "100000", "--train-subset", "128",
                            cwd=folder)
        cases[name] = (proc, sig, out, before)
    outcomes = {}
    try:
        for name, (proc, sig, out, before) in cases.items():
            wait_for_line(proc, "epoch 1/100000")
            _, err = stop(proc, sig)
            outcomes[name] = (proc.returncode, err, out, before, files_in(out.parent))
    finally:
        for proc, *_ in cases.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outcomes


@pytest.mark.parametrize("name", list(SIGNALS))
def test_interrupted_training_keeps_the_good_checkpoint(interrupted, name):
    returncode, err, out, before, after = interrupted[name]
    assert after == before  # same files, same bytes, no temp file
    if SIGNALS[name] == signal.SIGKILL:
        assert returncode == -signal.SIGKILL
        return
    assert returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), err
    assert f"last good checkpoint is {out}" in lines[0]


def test_interrupt_messages(tmp_path):
    import runpy

    train = runpy.run_path(str(REPO / "train.py"))  # not __main__: just the module's functions and STATE
    out = tmp_path / "new.pth"
    train["STATE"].update(out=out, saved=False)
    assert f"no checkpoint exists at {out} yet" in train["on_interrupt"]()
    out.write_bytes(b"x")
    assert f"last good checkpoint is {out}" in train["on_interrupt"]()
    train["STATE"]["saved"] = True
    assert f"checkpoint {out} was saved" in train["on_interrupt"]()


def test_killed_eval_leaves_results_csv_whole(trained, synthetic_mnist, tmp_path):
    root, _ = trained
    results = tmp_path / "results.csv"
    results.write_text("mode,test_acc,seed\n" + "".join(f"fp,{90 + i},{i}\n" for i in range(5)))
    before = read_csv(results)
    lock = tmp_path / "results.csv.lock"
    proc = start_script("eval.py", "--mode", "fp", "--checkpoint", root / "a.pth", "--data-dir", synthetic_mnist,
                        "--skip-checksum", "--results", results, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    stop(proc, signal.SIGKILL)  # the lock file appears as the append starts: kill it mid-append (or just after)
    assert lock.exists(), "eval never started appending"
    rows = read_csv(results)
    assert len(rows) in (5, 6)
    assert [{k: r[k] for k in before[0]} for r in rows[:5]] == before
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")} == {"results.csv", "results.csv.lock"}
