"""Second tuning stage: the short search's best configs, retrained at the full budget on several seeds.

A short trial (1 epoch on 20,000 images, one seed) ranks configs cheaply, but a short budget favours small
batches and high learning rates, and one seed cannot tell a real gain from noise. So the defaults and the
top K configs of each mode's short search are trained again at the study's full budget on seeds 0, 1, 2 and
scored on each seed's validation split, as the study's `train.py` run of that seed would be; the test set is
never read. The defaults are kept unless the best candidate's mean beats theirs by more than one standard
error of the paired per-seed difference (the one-standard-error rule; Hastie, Tibshirani, Friedman, Elements
of Statistical Learning, Sec. 7.10). Every run goes to {mode}_confirm.json as it finishes (a rerun skips
recorded runs), each mode's choice per precision to confirm_summary.json.
"""
import json
import statistics
from pathlib import Path

from .config import KEYS, default_config, knobs
from .data import load_mnist
from .engine import resolve_precision
from .files import atomic_write_json
from .tuning import rank, read_json, run_trial, trial_key

SUMMARY = "confirm_summary.json"


def candidates(mode: str, trials: list[dict], k: int) -> list[dict]:
    """The mode's defaults, then the k best distinct scored short-search configs (by val acc, then loss)."""
    chosen = [knobs(default_config(mode))]
    for trial in sorted((t for t in trials if t.get("val_acc") is not None), key=rank, reverse=True):
        if len(chosen) <= k and knobs(trial["config"]) not in chosen:
            chosen.append(knobs(trial["config"]))
    return chosen


def read_runs(out_dir, mode: str) -> list[dict]:
    return read_json(Path(out_dir) / f"{mode}_confirm.json", {"runs": []})["runs"]


def choose(runs: list[dict], mode: str, precision: str, epochs: int, seeds: list[int]) -> dict | None:
    """Summary entry: per-candidate accuracies over `seeds` and the one-standard-error choice; None until the
    defaults have a run on every seed."""
    accs = {}  # {config key: (config, {seed: val_acc})}, in order of first run
    for r in runs:
        if r["precision"] == precision and r["epochs"] == epochs and r["seed"] in seeds:
            accs.setdefault(trial_key(r["config"]), (r["config"], {}))[1][r["seed"]] = r["val_acc"]
    base = accs.get(trial_key(knobs(default_config(mode))), (None, {}))[1]
    if any(base.get(s) is None for s in seeds):
        return None
    table, spread = [], lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
    for config, acc in accs.values():
        if all(acc.get(s) is not None for s in seeds):
            # rounded: accuracies count whole images, so a tie with the standard error must not turn on float noise
            values, diffs = [acc[s] for s in seeds], [round(acc[s] - base[s], 9) for s in seeds]
            table.append({"config": config, "defaults": acc is base, "val_accs": values,
                          "mean": statistics.fmean(values), "std": spread(values),
                          "diff_vs_defaults": statistics.fmean(diffs), "diff_se": spread(diffs) / len(diffs) ** 0.5})
    best = max(table, key=lambda c: c["mean"])
    adopt = not best["defaults"] and round(best["diff_vs_defaults"] - best["diff_se"], 9) > 0
    return {"config": best["config"] if adopt else next(c for c in table if c["defaults"])["config"],
            "choice": "best" if adopt else "defaults", "precision": precision, "epochs": epochs, "seeds": seeds,
            "candidates": table}


def confirm(modes: list[str], k: int, *, seeds=(0, 1, 2), epochs: int = KEYS["epochs"].default,
            val_size: int = KEYS["val_size"].default, precision=KEYS["precision"].default, data_dir="data",
            skip_checksum: bool = False, tuning_dir="results/tuning", device="cpu", log=print) -> dict:
    """Train every missing (candidate, seed) run of `modes` at the full budget; return the summary entries."""
    precision, seeds = resolve_precision(precision, device), list(seeds)
    todo = {mode: candidates(mode, read_json(Path(tuning_dir) / f"{mode}_tuning.json", {"trials": []})["trials"], k)
            for mode in modes}
    for seed in seeds:
        data = None  # loaded by the first run this seed still needs
        for mode, config in ((m, c) for m in modes for c in todo[m]):
            runs = read_runs(tuning_dir, mode)
            if any((r["config"], r["seed"], r["precision"], r["epochs"]) == (config, seed, precision, epochs)
                   for r in runs):
                continue
            if data is None:
                data = load_mnist(data_dir, val_size=val_size, split_seed=seed, verify_checksum=not skip_checksum)
            record = run_trial(default_config(mode, **config, epochs=epochs, seed=seed, val_size=val_size,
                                              precision=precision), data, device)
            runs.append({"config": config, "seed": seed, "precision": precision, "epochs": epochs,
                         **{k: record[k] for k in ("val_acc", "val_loss", "seconds", "threads", "finished")}})
            atomic_write_json(Path(tuning_dir) / f"{mode}_confirm.json", {"mode": mode, "runs": runs})
            log(f"[confirm {mode} seed {seed} {precision}] {json.dumps(config)}  val acc {record['val_acc']}  "
                f"{record['seconds']:.0f}s")
    summary = read_json(Path(tuning_dir) / SUMMARY, {})
    for mode in modes:
        entry = choose(read_runs(tuning_dir, mode), mode, precision, epochs, seeds)
        if entry is not None:
            summary.setdefault(mode, {})[precision] = entry
    atomic_write_json(Path(tuning_dir) / SUMMARY, summary)
    return summary
