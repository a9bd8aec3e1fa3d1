"""quant/tuning.py and tune_hyperparams.py: every grid point finished once, in Optuna studies that reruns resume
(after SIGINT or SIGKILL, only the missing points run), shared by worker processes on SQLite and by two tuners
on a real PostgreSQL server; bad grids refused before any work; the 1-SE rule; and trials scored on the
validation split with the deployed model, never on the test set."""
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch

import tune_hyperparams
from conftest import call_script, start_script, stop, wait_for_line
from quant import runs, tuning
from quant.config import default_config
from quant.model import LeNet5

VAL = 64  # of the 512 synthetic training images
BUDGET = {"epochs": 1, "train_subset": None, "val_size": VAL, "seed": 0, "skip_checksum": True}


def fp_grid(*lrs):
    return {"fp": {"lr": list(lrs), "batch_size": [64]}}


def search(out_dir, data_dir, grids, log=lambda _: None, **budget):
    return tuning.search(tuning.build_grids(list(grids), grids), data_dir=data_dir, out_dir=out_dir, log=log,
                         **{**BUDGET, **budget})


def trials_in(out_dir, mode):
    return json.loads((out_dir / f"{mode}_tuning.json").read_text())["trials"]


def study(out_dir, mode, storage=None) -> optuna.Study:
    """`mode`'s one study in the storage (default: the SQLite file in `out_dir`)."""
    url = storage or f"sqlite:///{out_dir / tuning.DATABASE}"
    [name] = [n for n in optuna.get_all_study_names(url) if n.startswith(f"{mode}-")]
    return optuna.load_study(study_name=name, storage=url)


def key(config):
    return (config["lr"], config["batch_size"])


def test_tiny_grid_finishes_every_point_once_and_records_the_best(tmp_path, synthetic_mnist):
    grid = {"twn": {"lr": [1e-3, 3e-3], "batch_size": [64], "delta_factor": [0.6, 0.8]}}
    lines = []
    records = search(tmp_path, synthetic_mnist, grid, lines.append)
    trials = trials_in(tmp_path, "twn")
    assert len(records) == len(trials) == 4
    # written in the grid's product order, whatever order GridSampler ran them in
    assert [(t["config"]["lr"], t["config"]["hyperparams"]["delta_factor"]) for t in trials] == \
        list(itertools.product([1e-3, 3e-3], [0.6, 0.8]))
    for t in trials:
        assert 0 <= t["val_acc"] <= 100 and math.isfinite(t["val_loss"]) and t["val_loss"] > 0
        assert t["seconds"] > 0 and t["seed"] == 0 and t["config"]["val_size"] == VAL
        assert t["config"]["hyperparams"]["per_channel"] is False  # unlisted keys take the mode's defaults
    progress = [line for line in lines if line.startswith("[twn ")]
    assert [line.split("]")[0] for line in progress] == [f"[twn {n}/4" for n in range(1, 5)]
    assert all("val acc" in line and "ETA" in line for line in progress)
    in_study = study(tmp_path, "twn").get_trials()
    assert [t.state for t in in_study] == [optuna.trial.TrialState.COMPLETE] * 4
    assert sorted(t.system_attrs["grid_id"] for t in in_study) == [0, 1, 2, 3]  # GridSampler: each point once
    assert sorted(t.value for t in in_study) == sorted(t["val_acc"] for t in trials)

    best = max(trials, key=lambda t: (t["val_acc"], -t["val_loss"]))
    entry = json.loads((tmp_path / tuning.SUMMARY).read_text())["twn"]
    assert entry["trials"] == 4 and entry["val_acc"] == best["val_acc"]
    assert entry["config"]["lr"] == best["config"]["lr"]
    assert entry["config"]["hyperparams"] == best["config"]["hyperparams"]
    # what train.py --use-tuned merges: training knobs and hyperparameters, never the tuning budget
    tuned = tuning.tuned_config("twn", out_dir=tmp_path)
    assert set(tuned) == {"lr", "batch_size", "schedule", "weight_decay", "shift", "hyperparams"}
    assert tuned["lr"] == best["config"]["lr"]


def test_a_rerun_runs_nothing_and_rewrites_a_lost_summary(tmp_path, synthetic_mnist):
    search(tmp_path, synthetic_mnist, fp_grid(1e-3, 2e-3))
    summary_path = tmp_path / tuning.SUMMARY
    written = json.loads(summary_path.read_text())
    summary_path.unlink()  # e.g. lost, or written by an older version
    lines = []
    assert search(tmp_path, synthetic_mnist, fp_grid(1e-3, 2e-3), lines.append) == []  # no trial ran
    assert "fp: 2 of 2 trials already finished" in lines[1] and len(study(tmp_path, "fp").trials) == 2
    rewritten = json.loads(summary_path.read_text())
    assert rewritten["fp"]["config"] == written["fp"]["config"] and rewritten["fp"]["trials"] == 2
    before = summary_path.read_bytes()
    search(tmp_path, synthetic_mnist, fp_grid(1e-3, 2e-3))
    assert summary_path.read_bytes() == before  # nothing changed: not rewritten, the time stamp stays


def test_a_larger_grid_trains_only_the_new_point(tmp_path, synthetic_mnist):
    first = search(tmp_path, synthetic_mnist, fp_grid(1e-3, 2e-3, 3e-3))
    before = trials_in(tmp_path, "fp")
    second = search(tmp_path, synthetic_mnist, fp_grid(1e-3, 2e-3, 3e-3, 5e-3))
    after = trials_in(tmp_path, "fp")
    assert len(first) == 3 and [r["config"]["lr"] for r in second] == [5e-3]
    assert len(after) == 4 and after[:3] == before  # finished trials reused as they are
    assert json.loads((tmp_path / tuning.SUMMARY).read_text())["fp"]["trials"] == 4


def test_another_budget_is_another_study(tmp_path, synthetic_mnist):
    search(tmp_path, synthetic_mnist, fp_grid(1e-3))
    again = search(tmp_path, synthetic_mnist, fp_grid(1e-3), epochs=2)
    assert len(again) == 1 and len(trials_in(tmp_path, "fp")) == 2
    assert len(optuna.get_all_study_names(f"sqlite:///{tmp_path / tuning.DATABASE}")) == 2
    summary = json.loads((tmp_path / tuning.SUMMARY).read_text())["fp"]
    assert summary["trials"] == 1 and summary["budget"]["epochs"] == 2  # ranks only the latest budget


def wait_for_running_trial(out_dir, timeout=90):
    """Poll the tuner's SQLite study until a trial with its parameters is running: the moment to kill it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(t.params for t in study(out_dir, "fp").get_trials(states=(optuna.trial.TrialState.RUNNING,))):
                return
        except (ValueError, KeyError, optuna.exceptions.StorageInternalError):
            pass  # no storage or study yet
        time.sleep(0.05)
    pytest.fail("the tuner never started a trial")


def test_interrupted_and_killed_searches_rerun_only_the_missing_points(tmp_path, synthetic_mnist):
    # 16 short trials: enough work left after the first starts that no signal arrives after the last has finished
    out, lrs = tmp_path / "tuning", [round(k * 1e-3, 3) for k in range(1, 17)]
    args = ["tune_hyperparams.py", "--mode", "fp", "--set", "lr=" + ",".join(map(str, lrs)), "--set",
            "batch_size=64", "--data-dir", synthetic_mnist, "--skip-checksum", "--val-size", VAL,
            "--train-subset", 448, "--out-dir", out]
    # Ctrl-C mid-trial: exit 130 and a resume hint; Optuna marks the interrupted trial failed.
    proc = start_script(*args)
    wait_for_line(proc, "[fp 1/16]")
    wait_for_running_trial(out)
    _, err = stop(proc, signal.SIGINT)
    assert proc.returncode == 130 and "rerun the same command" in err and "Traceback" not in err, err
    assert optuna.trial.TrialState.FAIL in [t.state for t in study(out, "fp").get_trials()]
    # SIGKILL mid-trial: the trial stays "running" in the study, with nobody behind it.
    proc = start_script(*args)
    wait_for_line(proc, "[fp ")
    wait_for_running_trial(out)
    stop(proc, signal.SIGKILL)
    killed = trials_in(out, "fp")  # the files parse: written atomically
    json.loads((out / tuning.SUMMARY).read_text())
    assert 1 <= len(killed) < 16
    # Finish in-process: the library finds the CLI's study, trains exactly the missing points, counts each once.
    lines = []
    rerun = search(out, synthetic_mnist, fp_grid(*lrs), lines.append, train_subset=448)
    assert f"fp: {len(killed)} of 16 trials already finished" in lines[1]
    assert sorted(key(r["config"]) for r in rerun) == sorted(set(key(t["config"]) for t in trials_in(out, "fp")) -
                                                              set(key(t["config"]) for t in killed))
    final = trials_in(out, "fp")
    assert len(final) == 16 and {key(t["config"]) for t in final} == {(lr, 64) for lr in lrs}
    assert [t for t in final if key(t["config"]) in {key(k["config"]) for k in killed}] == killed  # untouched
    states = [t.state for t in study(out, "fp").get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 16  # the killed trial is never counted
    assert json.loads((out / tuning.SUMMARY).read_text())["fp"]["trials"] == 16


def test_worker_processes_share_one_sqlite_study(tmp_path, synthetic_mnist, monkeypatch):
    def not_here(*args, **kwargs):
        raise AssertionError("with --workers 2 the trials run in the worker processes, not the parent")

    monkeypatch.setattr(tuning, "run_trial", not_here)
    result = call_script("tune_hyperparams.py", "--mode", "fp", "--set", "lr=1e-3,2e-3,3e-3", "--set", "batch_size=64,128",
                         "--data-dir", synthetic_mnist, "--skip-checksum", "--val-size", VAL, "--workers", 2,
                         "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    trials = trials_in(tmp_path, "fp")
    assert sorted(key(t["config"]) for t in trials) == sorted(itertools.product([1e-3, 2e-3, 3e-3], [64, 128]))
    assert all(t["threads"] == max(1, (os.cpu_count() or 1) // 2) for t in trials)
    assert json.loads((tmp_path / tuning.SUMMARY).read_text())["fp"]["trials"] == 6
    assert "fp: 6 of 6 trials already finished" in result.stdout  # the parent's own pass found nothing left


# ---------------------------------------------------------------- two tuners, one real PostgreSQL server

def pg_bin(name):
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(found[-1]) if found else shutil.which(name)


@pytest.fixture
def postgres():
    """A PostgreSQL server of its own on a free local port, stopped at the end; yields a database URL."""
    if pg_bin("initdb") is None or pg_bin("pg_ctl") is None:
        reason = "no PostgreSQL server binaries (initdb, pg_ctl; Debian: apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must install them")
        pytest.skip(reason)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    root = Path(tempfile.mkdtemp(prefix="quant-pg-"))
    if as_postgres:
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"

    def run(*cmd):
        subprocess.run([*as_postgres, *cmd], check=True, capture_output=True, timeout=60)

    try:
        run(pg_bin("initdb"), "-D", data, "-A", "trust", "-U", "postgres")
        run(pg_bin("pg_ctl"), "-D", data, "-w", "-l", root / "log", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
        run(pg_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "tuning")
        yield f"postgresql://postgres@127.0.0.1:{port}/tuning"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_postgres, pg_bin("pg_ctl"), "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_tuners_on_one_postgresql_study_finish_every_point_once(tmp_path, synthetic_mnist, postgres):
    lrs = [1e-3, 2e-3, 3e-3, 4e-3]
    args = ["--mode", "fp", "--set", "lr=" + ",".join(map(str, lrs)), "--set", "batch_size=64,128", "--data-dir",
            synthetic_mnist, "--skip-checksum", "--val-size", VAL, "--storage", postgres]
    procs = [start_script("tune_hyperparams.py", *args, "--out-dir", tmp_path / name) for name in ("a", "b")]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    points = sorted(itertools.product(lrs, [64, 128]))
    for name in ("a", "b"):  # each machine's outputs hold every point exactly once
        assert sorted(key(t["config"]) for t in trials_in(tmp_path / name, "fp")) == points
        assert json.loads((tmp_path / name / tuning.SUMMARY).read_text())["fp"]["trials"] == len(points)
    trials = study(None, "fp", postgres).get_trials()
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}  # nothing failed, nothing left running
    assert sorted({(t.params["lr"], t.params["batch_size"]) for t in trials}) == points


# ---------------------------------------------------------------- samplers and pruning

def test_tpe_samples_the_range_the_grid_spans(tmp_path, synthetic_mnist):
    grid = {"ttq": {"lr": [1e-3, 1e-2], "batch_size": [64, 128], "t": [0.05]}}
    records = search(tmp_path, synthetic_mnist, grid, trials=3)
    assert len(records) == 3 and len(study(tmp_path, "ttq").trials) == 3
    for r in records:
        assert 1e-3 <= r["config"]["lr"] <= 1e-2 and 64 <= r["config"]["batch_size"] <= 128
        assert r["config"]["hyperparams"]["t"] == 0.05
    assert search(tmp_path, synthetic_mnist, grid, trials=3) == []  # the study already has 3
    # a space of one point: trained once, the repeats reuse its result, and the search still ends
    one = search(tmp_path / "one", synthetic_mnist, fp_grid(3e-3), trials=3)
    assert len(one) == 1 and len(study(tmp_path / "one", "fp").trials) == 3 and len(trials_in(tmp_path / "one", "fp")) == 1


def test_tpe_with_the_same_seed_samples_the_same_trials_unless_shared(tmp_path, synthetic_mnist, monkeypatch):
    grid = {"fp": {"lr": [1e-3, 1e-2], "batch_size": [64, 128]}}
    runs = [search(tmp_path / name, synthetic_mnist, grid, trials=3) for name in ("a", "b")]
    assert [r["config"] for r in runs[0]] == [r["config"] for r in runs[1]]
    seeds = []
    real = optuna.samplers.TPESampler
    monkeypatch.setattr(optuna.samplers, "TPESampler", lambda seed, **kw: (seeds.append(seed), real(seed=seed, **kw))[1])
    search(tmp_path / "c", synthetic_mnist, grid, trials=1, shared=True)  # --workers copies, a shared --storage
    assert seeds == [None]


def test_pruned_trials_are_finished_and_recorded_as_pruned(tmp_path, synthetic_mnist, monkeypatch):
    # A pruner that always prunes, in place of the median rule (which needs five finished trials to compare with).
    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda: optuna.pruners.ThresholdPruner(lower=101.0))
    lines = []
    records = search(tmp_path, synthetic_mnist, fp_grid(1e-3, 3e-3), lines.append, epochs=2, prune=True)
    assert records == []  # no trial ran to the end
    trials = trials_in(tmp_path, "fp")
    assert [t["pruned"] for t in trials] == [1, 1] and all(t["val_acc"] is None and t["seconds"] > 0 for t in trials)
    assert sum("pruned at epoch 1" in line for line in lines) == 2
    for t in study(tmp_path, "fp").trials:  # reported: the engine's epoch-1 validation accuracy
        assert t.state == optuna.trial.TrialState.PRUNED and 0 <= t.intermediate_values[1] <= 100
    assert search(tmp_path, synthetic_mnist, fp_grid(1e-3, 3e-3), epochs=2, prune=True) == []  # pruned = finished


# ---------------------------------------------------------------- grids refused before any work

def test_unknown_key_is_refused_by_the_library_naming_the_valid_keys():
    with pytest.raises(ValueError, match="valid keys: lr, batch_size, schedule, weight_decay, shift, delta_factor, per_channel"):
        tuning.build_grids(["twn"], {"twn": {"rho": [1e-3]}})
    with pytest.raises(ValueError, match="none of the modes fp, twn has a tunable key 't'"):
        tuning.build_grids(["fp", "twn"], {"t": [0.1]})
    assert "t" in tuning.build_grids(["fp", "ttq"], {"t": [0.1]})["ttq"]  # applied to the modes that have it


@pytest.mark.parametrize("grid, message", [
    ({"lr": [0]}, "lr: must be > 0"), ({"lr": ["abc"]}, "not a number"), ({"lr": [float("nan")]}, "finite"),
    ({"batch_size": [1.5]}, "not an integer"), ({"batch_size": [True]}, "not an integer"), ({"lr": []}, "empty"),
    ({"batch_size": [1]}, "must be >= 2"), ({"delta_factor": [1.0]}, "in (0, 1)"),
    ({"schedule": ["step"]}, "is not one of onecycle"), ({"per_channel": ["maybe"]}, "is not one of False, True"),
])
def test_bad_values_are_refused(grid, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tuning.build_grids(["twn"], grid)


def test_values_are_normalised_so_equal_configs_share_a_key():
    grid = tuning.build_grids(["twn"], {"lr": ["1e-3", 0.001, 3e-3], "batch_size": ["64", 64.0],
                                        "per_channel": ["true", True, "0"]})["twn"]
    assert grid == {"lr": [0.001, 0.003], "batch_size": [64], "delta_factor": [0.5, 0.7, 0.9], "per_channel": [True, False]}
    a, b = tuning.trial_config("fp", {"lr": 0.001}, {"seed": 0}), tuning.trial_config("fp", {"lr": "1e-3"}, {"seed": 0})
    assert tuning.trial_key(a) == tuning.trial_key(dict(reversed(list(b.items()))))


@pytest.mark.parametrize("argv, message", [
    (["--set", "rho=1e-3"], "mode fp has no tunable key 'rho' (valid keys: lr, batch_size, schedule, weight_decay, shift)"),
    (["--set", "lr=0"], "must be > 0"), (["--set", "lr=abc"], "not a number"), (["--set", "lr"], "key=v1,v2"),
    (["--grid", '{"lr": [-1]}'], "must be > 0"), (["--grid", "{not json"], "is not valid JSON"),
    (["--grid", "missing.json"], "cannot read missing.json"),
    (["--grid", '{"ttq": {"t": [0.1]}}'], "not being tuned"),
    (["--sampler", "tpe"], "--sampler tpe needs it"), (["--trials", "5"], "--trials N goes with --sampler tpe"),
])
def test_cli_bad_grid_values_exit_2_with_one_line(monkeypatch, capsys, tmp_path, argv, message):
    monkeypatch.setattr("sys.argv", ["tune_hyperparams.py", "--mode", "fp", "--out-dir", str(tmp_path / "out"), *argv])
    with pytest.raises(SystemExit) as exit_info:
        tune_hyperparams.parse_args()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_storage_that_cannot_be_opened_is_one_error_line(tmp_path, synthetic_mnist):
    result = call_script("tune_hyperparams.py", "--mode", "fp", "--data-dir", synthetic_mnist, "--skip-checksum",
                         "--val-size", VAL, "--out-dir", tmp_path, "--storage", "nosuchdb://x/y")
    assert result.returncode == 2 and "error: cannot open the study storage nosuchdb://x/y" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


# ---------------------------------------------------------------- the score: deployed model, validation split

@pytest.mark.parametrize("prune", [False, True])
def test_scoring_uses_the_deployed_model_on_the_validation_split_never_the_test_set(tmp_path, synthetic_mnist,
                                                                                     monkeypatch, prune):
    seen = {}
    real_load, real_train, real_evaluate = tuning.load_mnist, runs.train, runs.evaluate

    def load_with_poisoned_test_set(*args, **kwargs):
        data = real_load(*args, **kwargs)
        data.test_x = torch.full_like(data.test_x, float("nan"))  # any use yields NaN or a crash
        data.test_y = torch.full_like(data.test_y, -1)
        seen["data"] = data
        return data

    def spy_train(model, method, data, **kwargs):
        seen["train_data"] = data
        return real_train(model, method, data, **kwargs)

    def spy_evaluate(model, x, y, *args, **kwargs):
        seen.setdefault("scored", []).append((model, x, y))
        return real_evaluate(model, x, y, *args, **kwargs)

    monkeypatch.setattr(tuning, "load_mnist", load_with_poisoned_test_set)
    monkeypatch.setattr(runs, "train", spy_train)  # a trial is runs.train_run
    monkeypatch.setattr(runs, "evaluate", spy_evaluate)
    grid = {"ttq": {"lr": [3e-3], "batch_size": [64], "t": [0.05]}}
    [record] = search(tmp_path, synthetic_mnist, grid, epochs=2 if prune else 1, prune=prune)

    data, trained_on = seen["data"], seen["train_data"]
    assert trained_on.train_x is data.train_x and len(trained_on.test_y) == 0
    # the pruner's per-epoch score needs the validation split in training; otherwise training never sees it
    assert (trained_on.val_x is data.val_x) if prune else len(trained_on.val_y) == 0
    train_rows = {row.numpy().tobytes() for row in data.train_x}
    assert not any(row.numpy().tobytes() in train_rows for row in data.val_x)  # val is held out of training
    [(model, x, y)] = seen["scored"]
    assert x is data.val_x and y is data.val_y
    assert type(model) is LeNet5 and all(layer.quantizer is None for _, layer in model.quant_layers())
    for _, layer in model.quant_layers():  # the deployed model: at most {-w_n, 0, +w_p} per layer
        assert len(torch.unique(layer.weight)) <= 3
    with torch.no_grad():
        acc = 100.0 * (model(data.val_x).argmax(1) == data.val_y).float().mean().item()
    assert record["val_acc"] == pytest.approx(acc) == study(tmp_path, "ttq").best_value


def test_tuned_config_without_a_search_says_what_to_run(tmp_path):
    with pytest.raises(ValueError, match="run python tune_hyperparams.py --mode ttq first"):
        tuning.tuned_config("ttq", out_dir=tmp_path)


# ---------------------------------------------------------------- which config --use-tuned gets
SUMMARY_BUDGET = {"epochs": 1, "train_subset": 20000, "val_size": 5000, "seed": 0, "data_checksum": "c"}


def scored_fp_trials(default_acc, other_acc):
    """Two recorded FP trials: the defaults (lr 3e-3, batch 128) and lr 1e-2, with the given accuracies."""
    configs = [tuning.trial_config("fp", {"lr": lr, "batch_size": 128}, SUMMARY_BUDGET) for lr in (3e-3, 1e-2)]
    assert [tuning.knobs(c) == tuning.knobs(default_config("fp")) for c in configs] == [True, False]
    return [{"config": c, "val_acc": acc, "val_loss": 0.05, "seed": 0} for c, acc in zip(configs, (default_acc, other_acc))]


def test_defaults_are_kept_when_the_best_is_within_one_standard_error():
    entry = tuning.summarize(scored_fp_trials(97.96, 98.10), SUMMARY_BUDGET)  # 0.14 < 0.19 points apart
    assert entry["choice"] == "defaults" and entry["config"]["lr"] == 3e-3 and entry["val_acc"] == 97.96
    assert entry["best"]["config"]["lr"] == 1e-2 and entry["best"]["val_acc"] == 98.10
    # the binomial standard error at the best trial's 98.10 % on 5,000 images: 0.1931 points
    assert entry["defaults_val_acc"] == 97.96 and entry["standard_error"] == pytest.approx(100 * math.sqrt(0.981 * 0.019 / 5000))
    assert entry["standard_error"] == pytest.approx(0.1931, abs=1e-4)


def test_a_config_that_beats_the_defaults_by_more_than_one_standard_error_wins():
    entry = tuning.summarize(scored_fp_trials(97.86, 98.32), SUMMARY_BUDGET)
    assert entry["choice"] == "best" and entry["config"]["lr"] == 1e-2 and entry["val_acc"] == 98.32


def test_without_the_defaults_among_the_trials_the_best_wins():
    trials = scored_fp_trials(99.0, 98.0)[1:]  # only lr 1e-2 recorded
    entry = tuning.summarize(trials, SUMMARY_BUDGET)
    assert entry["choice"] == "best" and entry["defaults_val_acc"] is None and entry["config"]["lr"] == 1e-2
