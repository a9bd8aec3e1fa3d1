"""Second tuning stage: the short search's best configs, retrained at the full budget on several seeds.

A short trial (1 epoch on 20,000 images, one seed) ranks configs cheaply, but a short budget favours small
batches and high learning rates, and one seed cannot tell a real gain from noise. So the top K configs of
each mode's short search, plus the mode's defaults, are trained again at the study's full budget (all
55,000 training images, 3 epochs) on seeds 0, 1, 2, each scored by its *deployed* model on that seed's
validation split, exactly as the study's `train.py` run of that seed would be (same split, same init). The
test set is never read.

The choice is the one-standard-error rule with multi-seed evidence (Hastie, Tibshirani, Friedman, Elements
of Statistical Learning, Sec. 7.10): the defaults are kept unless the best candidate's mean validation
accuracy beats theirs by more than one standard error of the paired per-seed difference.

Files, rewritten atomically after every run (a rerun skips recorded runs):

    {mode}_confirm.json    {"mode": m, "runs": [{"config", "seed", "precision", "epochs", "val_acc", "val_loss", ...}]}
    confirm_summary.json   {mode: {"config", "choice", "candidates": [{"config", "val_accs", "mean", ...}], ...}}
"""
import json
import statistics
from pathlib import Path

from .config import KEYS, default_config
from .data import load_mnist
from .engine import resolve_precision
from .errors import QuantError
from .files import atomic_write_json
from .tuning import TRAIN_KEYS, is_default, knobs, read_trials, run_trial

SUMMARY = "confirm_summary.json"


def candidates(mode: str, trials: list[dict], k: int) -> list[dict]:
    """The mode's defaults, then the k best distinct scored short-search configs (by val acc, then loss)."""
    scored = sorted((t for t in trials if t.get("val_acc") is not None),
                    key=lambda t: (-t["val_acc"], t["val_loss"] if t["val_loss"] is not None else float("inf")))
    chosen = [knobs(default_config(mode))]
    for trial in scored:
        if len(chosen) > k:
            break
        if not is_default(trial["config"]) and knobs(trial["config"]) not in chosen:
            chosen.append(knobs(trial["config"]))
    return chosen


def read_runs(out_dir, mode: str) -> list[dict]:
    path = Path(out_dir) / f"{mode}_confirm.json"
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text())
        return list(doc["runs"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise QuantError(f"{path}: not a confirmation file; move it aside to start afresh") from None


def _same(run: dict, config: dict, seed: int, precision: str, epochs: int) -> bool:
    return (run["config"] == config and run["seed"] == seed and run["precision"] == precision
            and run["epochs"] == epochs)


def choose(runs: list[dict], mode: str, precision: str, epochs: int, seeds: list[int]) -> dict | None:
    """Summary entry: per-candidate accuracies over `seeds` and the one-standard-error choice."""
    table = []
    for run in runs:
        if run["precision"] != precision or run["epochs"] != epochs or run["seed"] not in seeds:
            continue
        entry = next((c for c in table if c["config"] == run["config"]), None)
        if entry is None:
            entry = {"config": run["config"], "accs": {}}
            table.append(entry)
        entry["accs"][run["seed"]] = run["val_acc"]
    complete = [c for c in table if all(c["accs"].get(s) is not None for s in seeds)]
    default = next((c for c in complete if c["config"] == knobs(default_config(mode))), None)
    if default is None:
        return None
    base = dict(default["accs"])
    for c in complete:
        accs = [c["accs"][s] for s in seeds]
        # rounded: accuracies count whole images, so a tie with the standard error must not turn on float noise
        diffs = [round(c["accs"][s] - base[s], 9) for s in seeds]
        c.update(defaults=c is default, val_accs=accs, mean=statistics.fmean(accs), std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                 diff_vs_defaults=statistics.fmean(diffs),
                 diff_se=statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0)
        del c["accs"]
    best = max(complete, key=lambda c: c["mean"])
    adopt = best is not default and round(best["diff_vs_defaults"] - best["diff_se"], 9) > 0
    return {"config": (best if adopt else default)["config"], "choice": "best" if adopt else "defaults",
            "precision": precision, "epochs": epochs, "seeds": seeds, "candidates": complete}


def confirm(modes: list[str], k: int, *, seeds=(0, 1, 2), epochs: int = KEYS["epochs"].default,
            val_size: int = KEYS["val_size"].default, precision=KEYS["precision"].default, data_dir="data", skip_checksum: bool = False, tuning_dir="results/tuning", device="cpu", log=print) -> dict:
    """Train every missing (candidate, seed) run of `modes` at the full budget; return the summary entries."""
    precision = resolve_precision(precision, device)
    seeds = list(seeds)
    todo = {mode: candidates(mode, read_trials(tuning_dir, mode), k) for mode in modes}
    for seed in seeds:
        data = None
        for mode, configs in todo.items():
            for config in configs:
                runs = read_runs(tuning_dir, mode)
                if any(_same(r, config, seed, precision, epochs) for r in runs):
                    continue
                if data is None:
                    data = load_mnist(data_dir, val_size=val_size, split_seed=seed,
                                      verify_checksum=not skip_checksum)
                full = default_config(mode, **{k_: config[k_] for k_ in TRAIN_KEYS}, hyperparams=config["hyperparams"],
                                      epochs=epochs, seed=seed, val_size=val_size, precision=precision)
                record = run_trial(full, data, device)
                runs.append({"config": config, "seed": seed, "precision": precision, "epochs": epochs,
                             "val_acc": record["val_acc"], "val_loss": record["val_loss"],
                             "seconds": record["seconds"], "threads": record["threads"],
                             "finished": record["finished"]})
                atomic_write_json(Path(tuning_dir) / f"{mode}_confirm.json", {"mode": mode, "runs": runs})
                log(f"[confirm {mode} seed {seed} {precision}] {json.dumps(config)}  val acc "
                    f"{record['val_acc']}  {record['seconds']:.0f}s")
    summary_path = Path(tuning_dir) / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for mode in modes:
        entry = choose(read_runs(tuning_dir, mode), mode, precision, epochs, seeds)
        if entry is not None:
            summary.setdefault(mode, {})[precision] = entry
    atomic_write_json(summary_path, summary)
    return summary
