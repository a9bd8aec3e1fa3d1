"""quant/confirm.py: the candidates are the defaults plus the K best distinct short-search configs, a rerun
trains nothing, and the one-standard-error choice over seeds follows hand-computed paired differences."""
import json
import statistics

from quant import confirm
from quant.config import default_config


def trial(mode, acc, loss=0.1, **overrides):
    return {"config": default_config(mode, **overrides), "val_acc": acc, "val_loss": loss}


def test_candidates_are_defaults_then_k_best_distinct():
    trials = [trial("fp", 98.0, lr=1e-2), trial("fp", 98.0, 0.05, lr=1e-3), trial("fp", 99.0),  # 99.0 = defaults
              trial("fp", 97.0, batch_size=64), {**trial("fp", None, lr=1.0), "val_loss": None}]
    got = confirm.candidates("fp", trials, 2)
    assert got[0] == confirm.knobs(default_config("fp"))
    assert [c["lr"] for c in got[1:]] == [1e-3, 1e-2]  # tie on accuracy: the lower loss first
    assert len(confirm.candidates("fp", trials, 0)) == 1


def runs_for(mode, config, accs, precision="fp32"):
    return [{"config": config, "seed": s, "precision": precision, "epochs": 3, "val_acc": a, "val_loss": 0.1}
            for s, a in enumerate(accs)]


def test_choice_keeps_defaults_within_one_paired_standard_error():
    default = confirm.knobs(default_config("twn"))
    other = confirm.knobs(default_config("twn", lr=1e-3))
    base = [99.0, 99.2, 99.1]
    noisy = [99.3, 99.1, 99.2]  # diffs +0.3, -0.1, +0.1: mean 0.1, paired SE 0.115 -> keep the defaults
    entry = confirm.choose(runs_for("twn", default, base) + runs_for("twn", other, noisy), "twn", "fp32", 3, [0, 1, 2])
    diffs = [b - a for a, b in zip(base, noisy)]
    cand = next(c for c in entry["candidates"] if c["config"] == other)
    assert abs(cand["diff_vs_defaults"] - statistics.fmean(diffs)) < 1e-9
    assert abs(cand["diff_se"] - statistics.stdev(diffs) / 3 ** 0.5) < 1e-9
    assert entry["choice"] == "defaults" and entry["config"] == default
    steady = [99.2, 99.4, 99.3]  # +0.2 on every seed: adopted
    entry = confirm.choose(runs_for("twn", default, base) + runs_for("twn", other, steady), "twn", "fp32", 3, [0, 1, 2])
    assert entry["choice"] == "best" and entry["config"] == other
    tie = [99.0 - 0.08, 99.2 + 0.16, 99.1 + 0.16]  # diffs -0.08, +0.16, +0.16: mean 0.08, paired SE 0.08
    entry = confirm.choose(runs_for("twn", default, base) + runs_for("twn", other, tie), "twn", "fp32", 3, [0, 1, 2])
    assert entry["choice"] == "defaults"
    # other precisions, or a missing seed, are not mixed in
    assert confirm.choose(runs_for("twn", default, base[:2]), "twn", "fp32", 3, [0, 1, 2]) is None
    assert confirm.choose(runs_for("twn", default, base, "bf16"), "twn", "fp32", 3, [0, 1, 2]) is None


def test_confirm_trains_missing_runs_only(tmp_path, synthetic_mnist):
    trials = [trial("fp", 90.0, lr=1e-2), trial("fp", 80.0)]
    (tmp_path / "fp_tuning.json").write_text(json.dumps({"mode": "fp", "trials": trials}))
    kwargs = dict(seeds=[0, 1], epochs=1, val_size=64, precision="fp32", data_dir=synthetic_mnist, skip_checksum=True,
                  tuning_dir=tmp_path, log=lambda line: None)
    summary = confirm.confirm(["fp"], 1, **kwargs)
    runs = confirm.read_runs(tmp_path, "fp")
    assert len(runs) == 4 and {r["seed"] for r in runs} == {0, 1}
    assert all(0 <= r["val_acc"] <= 100 for r in runs)
    assert summary["fp"]["fp32"]["choice"] in ("defaults", "best")
    before = (tmp_path / "fp_confirm.json").read_text()
    confirm.confirm(["fp"], 1, **kwargs)
    assert (tmp_path / "fp_confirm.json").read_text() == before
