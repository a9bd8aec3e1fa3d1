"""quant/tuning.py and tune_hyperparams.py: every trial recorded, reruns skip recorded trials (also after
SIGINT / SIGKILL), bad grids refused before any work, concurrent writers lose nothing, and trials are
scored on the validation split with the deployed model, never on the test set."""
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import tune_hyperparams
from conftest import REPO, script_env, start_script, stop, wait_for_line
from quant import runs, tuning
from quant.model import LeNet5

VAL = 64  # of the 512 synthetic training images
BUDGET = {"epochs": 1, "train_subset": None, "val_size": VAL, "seed": 0, "skip_checksum": True}


def fp_grid(*lrs):
    return {"fp": {"lr": list(lrs), "batch_size": [64]}}


def trials_in(out_dir, mode):
    return json.loads((out_dir / f"{mode}_tuning.json").read_text())["trials"]


def test_tiny_grid_records_every_trial_and_the_best(tmp_path, synthetic_mnist):
    grid = {"twn": {"lr": [1e-3, 3e-3], "batch_size": [64], "delta_factor": [0.6, 0.8]}}
    lines = []
    records = tuning.search(grid, data_dir=synthetic_mnist, out_dir=tmp_path, log=lines.append, **BUDGET)
    trials = trials_in(tmp_path, "twn")
    assert len(records) == len(trials) == 4
    assert {(t["config"]["lr"], t["config"]["hyperparams"]["delta_factor"]) for t in trials} == \
        set(itertools.product([1e-3, 3e-3], [0.6, 0.8]))
    for t in trials:
        assert 0 <= t["val_acc"] <= 100 and math.isfinite(t["val_loss"]) and t["val_loss"] > 0
        assert t["seconds"] > 0 and t["seed"] == 0 and t["config"]["val_size"] == VAL
        assert t["config"]["hyperparams"]["per_channel"] is False  # unlisted keys take the mode's defaults
    progress = [line for line in lines if line.startswith("[twn ")]
    assert len(progress) == 4 and all("val acc" in line and "ETA" in line for line in progress)

    best = max(trials, key=lambda t: (t["val_acc"], -t["val_loss"]))
    entry = json.loads((tmp_path / tuning.SUMMARY).read_text())["twn"]
    assert entry["trials"] == 4 and entry["val_acc"] == best["val_acc"]
    assert entry["config"]["lr"] == best["config"]["lr"]
    assert entry["config"]["hyperparams"] == best["config"]["hyperparams"]
    # what train.py --use-tuned merges: training knobs and hyperparameters, never the tuning budget
    tuned = tuning.tuned_config("twn", out_dir=tmp_path)
    assert set(tuned) == {"lr", "batch_size", "schedule", "weight_decay", "shift", "hyperparams"}
    assert tuned["lr"] == best["config"]["lr"]


def test_rerun_with_a_larger_grid_runs_only_the_new_trial(tmp_path, synthetic_mnist):
    first = tuning.search(fp_grid(1e-3, 2e-3, 3e-3), data_dir=synthetic_mnist, out_dir=tmp_path, log=lambda _: None, **BUDGET)
    before = trials_in(tmp_path, "fp")
    second = tuning.search(fp_grid(1e-3, 2e-3, 3e-3, 5e-3), data_dir=synthetic_mnist, out_dir=tmp_path,
                           log=lambda _: None, **BUDGET)
    after = trials_in(tmp_path, "fp")
    assert len(first) == 3 and [r["config"]["lr"] for r in second] == [5e-3]
    assert len(after) == 4 and after[:3] == before  # recorded trials untouched
    assert json.loads((tmp_path / tuning.SUMMARY).read_text())["fp"]["trials"] == 4


def test_another_budget_is_another_trial(tmp_path, synthetic_mnist):
    tuning.search(fp_grid(1e-3), data_dir=synthetic_mnist, out_dir=tmp_path, log=lambda _: None, **BUDGET)
    again = tuning.search(fp_grid(1e-3), data_dir=synthetic_mnist, out_dir=tmp_path, log=lambda _: None,
                          **{**BUDGET, "epochs": 2})
    assert len(again) == 1 and len(trials_in(tmp_path, "fp")) == 2
    summary = json.loads((tmp_path / tuning.SUMMARY).read_text())["fp"]
    assert summary["trials"] == 1 and summary["budget"]["epochs"] == 2  # ranks only the latest budget


def test_interrupted_and_killed_searches_resume(tmp_path, synthetic_mnist):
    out = tmp_path / "tuning"
    args = ["tune_hyperparams.py", "--mode", "fp", "--set", "lr=1e-3,2e-3,3e-3,4e-3,5e-3,6e-3", "--set",
            "batch_size=64", "--data-dir", synthetic_mnist, "--skip-checksum", "--val-size", VAL,
            "--train-subset", 448, "--out-dir", out]
    # Ctrl-C after the first trial: exit 130, a resume hint, and only whole trials on disk.
    proc = start_script(*args)
    wait_for_line(proc, "[fp 1/6]")
    _, err = stop(proc, signal.SIGINT)
    assert proc.returncode == 130 and "rerun the same command" in err and "Traceback" not in err, err
    n_int = len(trials_in(out, "fp"))
    assert 1 <= n_int < 6
    # SIGKILL after the next trial, reading the files all the while: they must parse at every moment.
    proc = start_script(*args)
    wait_for_line(proc, f"[fp 1/{6 - n_int}]")
    for _ in range(20):
        trials_in(out, "fp")
        json.loads((out / tuning.SUMMARY).read_text())
    stop(proc, signal.SIGKILL)
    killed = trials_in(out, "fp")
    assert n_int < len(killed) < 6
    # Finish in-process: the library must key the CLI's trials the same way and skip them.
    lines = []
    tuning.search(fp_grid(1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3), data_dir=synthetic_mnist, out_dir=out,
                  log=lines.append, **{**BUDGET, "train_subset": 448})
    assert f"{len(killed)} already recorded" in lines[0]
    assert sum(line.startswith("[fp ") for line in lines) == 6 - len(killed)
    final = trials_in(out, "fp")
    assert len(final) == 6 and final[:len(killed)] == killed
    assert len({tuning.trial_key(t["config"]) for t in final}) == 6


def test_unknown_key_is_refused_by_the_library_naming_the_valid_keys():
    with pytest.raises(ValueError, match="valid keys: lr, batch_size, schedule, weight_decay, shift, delta_factor, per_channel"):
        tuning.validate_grid("twn", {"rho": [1e-3]})
    with pytest.raises(ValueError, match="none of the modes fp, twn has a tunable key 't'"):
        tuning.build_grids(["fp", "twn"], {"t": [0.1]})
    assert "t" in tuning.build_grids(["fp", "ttq"], {"t": [0.1]})["ttq"]  # applied to the modes that have it


@pytest.mark.parametrize("grid, message", [
    ({"lr": [0]}, "lr: must be > 0"), ({"lr": ["abc"]}, "not a number"), ({"lr": [float("nan")]}, "finite"),
    ({"batch_size": [1.5]}, "integer >= 2"), ({"batch_size": [True]}, "not a number"), ({"lr": []}, "empty"),
    ({"delta_factor": [1.0]}, "(0, 1)"), ({"schedule": ["step"]}, "not one of onecycle"),
])
def test_bad_values_are_refused(grid, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tuning.validate_grid("twn", grid)


def test_values_are_normalised_so_equal_configs_share_a_key():
    grid = tuning.validate_grid("fp", {"lr": ["1e-3", 0.001, 3e-3], "batch_size": ["64", 64.0]})
    assert grid == {"lr": [0.001, 0.003], "batch_size": [64]}
    a, b = tuning.expand("fp", {"lr": [0.001]}, {"seed": 0}), tuning.expand("fp", {"lr": [1e-3]}, {"seed": 0})
    assert tuning.trial_key(a[0]) == tuning.trial_key(dict(reversed(list(b[0].items()))))


@pytest.mark.parametrize("argv, message", [
    (["--set", "rho=1e-3"], "mode fp has no tunable key 'rho' (valid keys: lr, batch_size, schedule, weight_decay, shift)"),
    (["--set", "lr=0"], "must be > 0"), (["--set", "lr=abc"], "not a number"), (["--set", "lr"], "key=v1,v2"),
    (["--grid", '{"lr": [-1]}'], "must be > 0"), (["--grid", "{not json"], "is not valid JSON"),
    (["--grid", "missing.json"], "cannot read missing.json"),
    (["--grid", '{"ttq": {"t": [0.1]}}'], "not being tuned"),
])
def test_cli_bad_grid_values_exit_2_with_one_line(monkeypatch, capsys, tmp_path, argv, message):
    monkeypatch.setattr(sys, "argv", ["tune_hyperparams.py", "--mode", "fp", "--out-dir", str(tmp_path / "out"), *argv])
    with pytest.raises(SystemExit) as exit_info:
        tune_hyperparams.parse_args()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


WRITER = """
import sys, time
from pathlib import Path
from quant import tuning
out, worker = Path(sys.argv[1]), int(sys.argv[2])
(out / f"ready{worker}").touch()
while not (out / "go").exists():
    time.sleep(0.005)
for i in range(30):
    budget = {"epochs": 1, "train_subset": None, "val_size": 64, "seed": 0, "data_checksum": "x"}
    config = tuning.expand("fp", {"lr": [(worker * 100 + i + 1) * 1e-5]}, budget)[0]
    tuning.record_trial(out, {"config": config, "seed": 0, "val_acc": 50.0 + i, "val_loss": 1.0, "seconds": 0.0})
"""


def test_two_writers_of_the_same_files_lose_nothing(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(w)], cwd=REPO, env=script_env(),
                              stderr=subprocess.PIPE, text=True) for w in (0, 1)]
    deadline = time.monotonic() + 60  # start both together, after their imports, so their writes interleave
    while not all((tmp_path / f"ready{w}").exists() for w in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    for proc in procs:
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    trials = trials_in(tmp_path, "fp")
    assert len(trials) == 60 and len({tuning.trial_key(t["config"]) for t in trials}) == 60
    assert json.loads((tmp_path / tuning.SUMMARY).read_text())["fp"]["trials"] == 60


def test_scoring_uses_the_deployed_model_on_the_validation_split_never_the_test_set(tmp_path, synthetic_mnist,
                                                                                     monkeypatch):
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
    [record] = tuning.search(grid, data_dir=synthetic_mnist, out_dir=tmp_path, log=lambda _: None, **BUDGET)

    data, trained_on = seen["data"], seen["train_data"]
    assert trained_on.train_x is data.train_x and len(trained_on.test_y) == 0 and len(trained_on.val_y) == 0
    train_rows = {row.numpy().tobytes() for row in data.train_x}
    assert not any(row.numpy().tobytes() in train_rows for row in data.val_x)  # val is held out of training
    [(model, x, y)] = seen["scored"]
    assert x is data.val_x and y is data.val_y
    assert type(model) is LeNet5 and all(layer.quantizer is None for _, layer in model.quant_layers())
    for _, layer in model.quant_layers():  # the deployed model: at most {-w_n, 0, +w_p} per layer
        assert len(torch.unique(layer.weight)) <= 3
    with torch.no_grad():
        acc = 100.0 * (model(data.val_x).argmax(1) == data.val_y).float().mean().item()
    assert record["val_acc"] == pytest.approx(acc)


def test_workers_run_trials_in_separate_processes(tmp_path, synthetic_mnist, monkeypatch):
    def not_here(*args, **kwargs):
        raise AssertionError("with --workers 2 a trial must run in a worker process, not the parent")

    monkeypatch.setattr(tuning, "run_trial", not_here)
    records = tuning.search(fp_grid(1e-3, 2e-3), data_dir=synthetic_mnist, out_dir=tmp_path, workers=2,
                            log=lambda _: None, **BUDGET)
    assert len(records) == len(trials_in(tmp_path, "fp")) == 2
    assert all(r["threads"] == max(1, (os.cpu_count() or 1) // 2) for r in records)


def test_tuned_config_without_a_search_says_what_to_run(tmp_path):
    with pytest.raises(ValueError, match="run python tune_hyperparams.py --mode ttq first"):
        tuning.tuned_config("ttq", out_dir=tmp_path)


# ---------------------------------------------------------------- which config --use-tuned gets
SUMMARY_BUDGET = {"epochs": 1, "train_subset": 20000, "val_size": 5000, "seed": 0, "data_checksum": "c"}


def scored_fp_trials(default_acc, other_acc):
    """Two recorded FP trials: the defaults (lr 3e-3, batch 128) and lr 1e-2, with the given accuracies."""
    configs = tuning.expand("fp", {"lr": [3e-3, 1e-2], "batch_size": [128]}, SUMMARY_BUDGET)
    assert tuning.is_default(configs[0]) and not tuning.is_default(configs[1])
    return [{"config": c, "val_acc": acc, "val_loss": 0.05, "seed": 0} for c, acc in zip(configs, (default_acc, other_acc))]


def test_standard_error_is_binomial():
    assert tuning.standard_error(98.0, 5000) == pytest.approx(100 * math.sqrt(0.98 * 0.02 / 5000))  # 0.198 points
    assert tuning.standard_error(100.0, 5000) == 0.0


def test_defaults_are_kept_when_the_best_is_within_one_standard_error():
    entry = tuning.summarize(scored_fp_trials(97.96, 98.10), SUMMARY_BUDGET)  # 0.14 < 0.19 points apart
    assert entry["choice"] == "defaults" and entry["config"]["lr"] == 3e-3 and entry["val_acc"] == 97.96
    assert entry["best"]["config"]["lr"] == 1e-2 and entry["best"]["val_acc"] == 98.10
    assert entry["defaults_val_acc"] == 97.96 and entry["standard_error"] == pytest.approx(0.1931, abs=1e-4)  # at 98.10 %


def test_a_config_that_beats_the_defaults_by_more_than_one_standard_error_wins():
    entry = tuning.summarize(scored_fp_trials(97.86, 98.32), SUMMARY_BUDGET)
    assert entry["choice"] == "best" and entry["config"]["lr"] == 1e-2 and entry["val_acc"] == 98.32


def test_without_the_defaults_among_the_trials_the_best_wins():
    trials = scored_fp_trials(99.0, 98.0)[1:]  # only lr 1e-2 recorded
    entry = tuning.summarize(trials, SUMMARY_BUDGET)
    assert entry["choice"] == "best" and entry["defaults_val_acc"] is None and entry["config"]["lr"] == 1e-2


def test_a_rerun_with_nothing_left_to_run_rewrites_the_summary(tmp_path, synthetic_mnist):
    tuning.search(fp_grid(1e-3, 2e-3), data_dir=synthetic_mnist, out_dir=tmp_path, log=lambda _: None, **BUDGET)
    summary_path = tmp_path / tuning.SUMMARY
    written = json.loads(summary_path.read_text())
    summary_path.unlink()  # e.g. a summary written by an older version, or lost
    again = tuning.search(fp_grid(1e-3, 2e-3), data_dir=synthetic_mnist, out_dir=tmp_path, log=lambda _: None, **BUDGET)
    assert again == []  # no trial ran
    rewritten = json.loads(summary_path.read_text())
    assert rewritten["fp"]["config"] == written["fp"]["config"] and rewritten["fp"]["trials"] == 2
    before = summary_path.read_bytes()
    tuning.search(fp_grid(1e-3, 2e-3), data_dir=synthetic_mnist, out_dir=tmp_path, log=lambda _: None, **BUDGET)
    assert summary_path.read_bytes() == before  # nothing changed: not rewritten, the time stamp stays
