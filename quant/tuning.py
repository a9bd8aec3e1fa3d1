"""Hyperparameter search on the validation split: grids, trials, the search loop, and the tuned config.

A trial trains LeNet-5 for a short budget (default 1 epoch on 20,000 images) on the training split minus
the validation split, then scores the *deployed* model -- `rebuild_model(method.export(model))`, exactly
the codes x scales that eval and packing see -- on the validation split. The test set is never read
here: choosing hyperparameters on it would make every reported test accuracy optimistic.

Files, rewritten atomically after every trial while holding a file lock (re-read, merge, write), so a
search killed at any moment leaves valid JSON, a rerun skips every recorded trial, and two tuners
writing the same file lose nothing:

    {mode}_tuning.json   {"mode": m, "trials": [{"config", "val_acc", "val_loss", "seconds", "seed", ...}]}
    tuning_summary.json  {mode: {"config", "val_acc", "val_loss", "choice", "best", "trials", "budget", ...}}

A trial is identified by the canonical JSON of its full config: hyperparameters, budget (epochs,
train_subset, val_size), seed and the data checksum. The summary ranks only trials with the budget of
the latest search: scores from different budgets are not comparable. Its config (what --use-tuned
trains) is the best trial's, unless the mode's defaults score within one standard error of it
(`summarize`).
"""
import concurrent.futures as futures
import itertools
import json
import math
import multiprocessing
import os
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from .config import MODES as METHODS
from .config import KEYS, default_config, tunable_keys, validate
from .data import load_mnist
from .engine import DivergenceError
from .errors import ConfigError, QuantError
from .files import atomic_write_json, locked
from .runs import train_run

SUMMARY = "tuning_summary.json"
TRAIN_KEYS = tuple(tunable_keys("fp"))  # the tunable training knobs of every mode
BUDGET_KEYS = ("epochs", "train_subset", "val_size", "seed", "precision", "data_checksum")

# Default grids: 69 trials, sized so `tune_hyperparams.py --mode all` (1 epoch on 20,000 images, ~5-8 s a
# trial on 2 CPU cores) takes about 6-9 minutes. lr spans the useful Adam range around the 3e-3 default;
# each method's own knobs bracket its paper's value: TWN's delta_factor 0.7 (arXiv 1605.04711, Eq. 6),
# TTQ's t = 0.05 (arXiv 1612.01064, Eq. 9), ADMM's rho schedule (Leng et al., arXiv 1707.09870, Eqs. 8-11).
# A short budget favours small batches (more steps), so treat that as a hint to confirm with a full-length
# run; ADMM's rounds keep its rho schedule the same at any budget (admm.round_interval).
GRIDS = {
    "fp": {"lr": [1e-3, 3e-3, 1e-2], "batch_size": [64, 128, 256]},
    "twn": {"lr": [1e-3, 3e-3, 1e-2], "batch_size": [64, 128], "delta_factor": [0.5, 0.7, 0.9]},
    "ttq": {"lr": [1e-3, 3e-3, 1e-2], "batch_size": [64, 128], "t": [0.02, 0.05, 0.1]},
    "admm": {"lr": [3e-3, 1e-2], "batch_size": [64, 128], "rho": [1e-5, 1e-4, 1e-3], "admm_rounds": [23, 46]},
}


def valid_keys(mode: str) -> list[str]:
    """Keys a grid for `mode` may have: the training knobs plus the method's own hyperparameters."""
    return tunable_keys(mode)


def validate_grid(mode: str, grid: dict) -> dict:
    """Check and normalise `grid` ({key: value or [values]}) for `mode`; ValueError names the valid keys."""
    if mode not in METHODS:
        raise ConfigError(f"unknown mode {mode!r} (choose from {', '.join(METHODS)})")
    if not isinstance(grid, dict):
        raise ConfigError(f"a grid must be a JSON object {{key: [values]}}, got {type(grid).__name__}")
    out = {}
    for key, values in grid.items():
        if key not in valid_keys(mode):
            raise ConfigError(f"mode {mode} has no tunable key {key!r} (valid keys: {', '.join(valid_keys(mode))})")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"{key}: empty list of values")
        normalised = [validate(mode, key, v) for v in values]
        out[key] = list(dict.fromkeys(normalised))  # drop duplicates, keep order
    return out


def build_grids(modes: list[str], overrides: dict | None = None) -> dict:
    """{mode: grid}: each mode's default grid with `overrides` replacing the keys they name.

    `overrides` is either flat ({key: values}, applied to every listed mode that has the key) or per mode
    ({mode: {key: values}}). A flat key that no listed mode has is refused with the valid keys.
    """
    if not isinstance(overrides or {}, dict):
        raise ConfigError("a grid must be a JSON object {key: [values]} or {mode: {key: [values]}}")
    overrides = dict(overrides or {})
    per_mode = {m: overrides.pop(m) for m in list(overrides) if m in METHODS}
    known = list(dict.fromkeys(k for m in modes for k in valid_keys(m)))
    for key in overrides:
        if key not in known:
            which = f"mode {modes[0]} has no" if len(modes) == 1 else f"none of the modes {', '.join(modes)} has a"
            raise ConfigError(f"{which} tunable key {key!r} (valid keys: {', '.join(known)})")
    grids = {}
    for mode in modes:
        grid = {**GRIDS[mode], **{k: v for k, v in overrides.items() if k in valid_keys(mode)}}
        grids[mode] = validate_grid(mode, {**grid, **per_mode.get(mode, {})})
    for mode in per_mode:
        if mode not in modes:
            raise ConfigError(f"the grid names mode {mode}, which is not being tuned (--mode {' / '.join(modes)})")
    return grids


def parse_set(spec: str) -> tuple[str, list[str]]:
    """'batch-size=64,128' -> ('batch_size', ['64', '128']) (values are checked later by validate_grid)."""
    key, sep, values = spec.partition("=")
    if not sep or not key.strip() or not values.strip():
        raise ConfigError(f"--set {spec!r}: expected key=v1,v2,...")
    return key.strip().replace("-", "_"), [v.strip() for v in values.split(",")]


def read_grid_json(text: str) -> dict:
    """A grid from inline JSON text (starting with '{') or a JSON file path."""
    inline = text.lstrip().startswith("{")
    try:
        grid = json.loads(text if inline else Path(text).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--grid: {'inline text' if inline else text} is not valid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"--grid: cannot read {text} ({e.strerror}); pass a JSON file or inline JSON") from None
    if not isinstance(grid, dict):
        raise ConfigError("--grid: expected a JSON object {key: [values]} or {mode: {key: [values]}}")
    return grid


def trial_key(config: dict) -> str:
    """Canonical JSON of a trial's config: equal configs give equal keys whatever their key order."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def expand(mode: str, grid: dict, budget: dict) -> list[dict]:
    """Every full trial config of the grid's Cartesian product: train.py's config for `mode` (so unlisted
    keys take the same defaults) with the grid's values and the tuning budget."""
    keys = list(grid)
    configs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        chosen = dict(zip(keys, values))
        config = default_config(mode, **{k: v for k, v in chosen.items() if k in TRAIN_KEYS},
                                hyperparams={k: v for k, v in chosen.items() if k not in TRAIN_KEYS},
                                **{k: v for k, v in budget.items() if k != "data_checksum"})
        configs.append({**config, **budget})
    return configs


def run_trial(config: dict, data, device="cpu") -> dict:
    """Train one config on `data`'s training split; score the deployed model on its validation split."""
    record = {"config": config, "seed": config["seed"]}
    start = time.perf_counter()
    try:
        val = train_run(config, data, device, log=lambda _: None, epoch_validation=False)["val"]
        loss = val["loss"] if math.isfinite(val["loss"]) else None  # JSON has no NaN/inf
        record.update(val_acc=val["acc"], val_loss=loss)
    except DivergenceError as e:  # a diverging lr is a result of the search, not a crash
        record.update(val_acc=None, val_loss=None, error=str(e))
    record["seconds"] = round(time.perf_counter() - start, 3)
    record["threads"] = torch.get_num_threads()  # seconds depend on it (and on what else the machine runs)
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return record


def _read_json(path: Path, empty: dict) -> dict:
    """The JSON object in `path` (`empty` if absent); a foreign or broken file is an error, never overwritten."""
    if not path.exists():
        return empty
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantError(f"{path}: not valid JSON ({e}); move it aside to start a fresh search") from None
    if not isinstance(doc, dict) or ("trials" in empty and not isinstance(doc.get("trials"), list)):
        raise QuantError(f"{path}: not a tuning file; move it aside to start a fresh search")
    return doc


def read_trials(out_dir, mode: str) -> list[dict]:
    """Every recorded trial of `mode` in `out_dir` ([] if none)."""
    return _read_json(Path(out_dir) / f"{mode}_tuning.json", {"mode": mode, "trials": []})["trials"]


def read_summary(out_dir) -> dict:
    """{mode: best-config entry} from `out_dir`/tuning_summary.json ({} if none)."""
    return _read_json(Path(out_dir) / SUMMARY, {})


def standard_error(acc: float, n: int) -> float:
    """Binomial standard error, in percentage points, of an accuracy of `acc` % measured on n images."""
    p = acc / 100
    return 100 * math.sqrt(p * (1 - p) / max(n, 1))


def is_default(config: dict) -> bool:
    """True if a trial's config is `train.py --mode M`'s own (its training knobs and hyperparameters)."""
    default = default_config(config["mode"])
    return all(config[k] == default[k] for k in (*TRAIN_KEYS, "keep_fp", "hyperparams"))


def summarize(trials: list[dict], budget: dict) -> dict | None:
    """The summary entry of the trials with `budget`; None if none scored.

    `best` is the highest validation accuracy (then the lowest loss). The config chosen for --use-tuned is
    `best` unless the mode's defaults were among the trials and score within one standard error of it: a
    short trial's margin below that is noise, and the defaults were chosen with full-length runs on several
    seeds (the one-standard-error rule; Hastie, Tibshirani, Friedman, Elements of Statistical Learning, 7.10).
    """
    same = [t for t in trials if all(t["config"].get(k) == v for k, v in budget.items())]
    scored = [t for t in same if t.get("val_acc") is not None]
    if not scored:
        return None
    best = max(scored, key=lambda t: (t["val_acc"], -(t["val_loss"] if t["val_loss"] is not None else math.inf)))
    default = next((t for t in scored if is_default(t["config"])), None)
    se = standard_error(best["val_acc"], budget["val_size"])
    keep_default = default is not None and best["val_acc"] - default["val_acc"] <= se
    chosen = default if keep_default else best

    def knobs(t):
        return {**{k: t["config"][k] for k in TRAIN_KEYS}, "hyperparams": t["config"]["hyperparams"]}

    return {"config": knobs(chosen), "val_acc": chosen["val_acc"], "val_loss": chosen["val_loss"], "seed": chosen["seed"],
            "choice": "defaults" if keep_default else "best",
            "best": {"config": knobs(best), "val_acc": best["val_acc"], "val_loss": best["val_loss"]},
            "defaults_val_acc": None if default is None else default["val_acc"], "standard_error": se,
            "trials": len(same), "diverged": len(same) - len(scored), "budget": budget,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def record_trial(out_dir, record: dict) -> list[dict]:
    """Merge one trial into {mode}_tuning.json and refresh tuning_summary.json; returns the mode's trials.

    Both files are re-read, merged and written atomically under their locks (always taken in the order
    mode file, then summary, so two tuners never deadlock), so concurrent tuners lose nothing.
    """
    out_dir = Path(out_dir)
    config = record["config"]
    mode = config["mode"]
    path, summary_path = out_dir / f"{mode}_tuning.json", out_dir / SUMMARY
    with locked(path):
        doc = _read_json(path, {"mode": mode, "trials": []})
        if trial_key(config) not in {trial_key(t["config"]) for t in doc["trials"]}:
            doc["trials"].append(record)
            atomic_write_json(path, doc)
        _write_summary(summary_path, mode, doc["trials"], {k: config[k] for k in BUDGET_KEYS})
    return doc["trials"]


def _undated(entry: dict | None) -> dict:
    return {k: v for k, v in (entry or {}).items() if k != "updated"}


def _write_summary(summary_path: Path, mode: str, trials: list[dict], budget: dict) -> None:
    with locked(summary_path):
        summary = _read_json(summary_path, {})
        entry = summarize(trials, budget)
        if entry is not None and _undated(entry) != _undated(summary.get(mode)):  # unchanged: keep file and time stamp
            summary[mode] = entry
            summary = {m: summary[m] for m in [*METHODS, *summary] if m in summary}
            atomic_write_json(summary_path, summary)


def refresh_summary(out_dir, mode: str, budget: dict) -> None:
    """Rewrite `mode`'s summary entry from its recorded trials with `budget` (a rerun with nothing left to run)."""
    out_dir = Path(out_dir)
    path = out_dir / f"{mode}_tuning.json"
    with locked(path):
        _write_summary(out_dir / SUMMARY, mode, _read_json(path, {"mode": mode, "trials": []})["trials"], budget)


def _describe(config: dict, keys) -> str:
    flat = {**config, **config["hyperparams"]}
    return " ".join(f"{k}={flat[k]:g}" if isinstance(flat[k], float) else f"{k}={flat[k]}" for k in keys)


def _score(record: dict) -> str:
    if record["val_acc"] is None:
        return "diverged"
    loss = f"{record['val_loss']:.4f}" if record["val_loss"] is not None else "inf"
    return f"val acc {record['val_acc']:.2f}% loss {loss}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours}:{minutes:02d}:{seconds % 60:02d}" if hours else f"{minutes}:{seconds % 60:02d}"


_WORKER = {}


def _init_worker(threads: int, data_kwargs: dict) -> None:
    # The parent handles Ctrl-C and stops the pool; workers ignoring SIGINT avoids a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock is a multiprocessing semaphore; a worker terminated on Ctrl-C would leave it
    # registered, and the resource tracker warns about it. Workers draw no bars: a thread lock suffices.
    tqdm.set_lock(threading.RLock())
    torch.set_num_threads(threads)
    _WORKER["data"] = load_mnist(**data_kwargs, allow_download=False)


def _pool_trial(config: dict, device) -> dict:
    return run_trial(config, _WORKER["data"], device)


def search(grids: dict, *, epochs: int = 1, train_subset: int | None = 20000, val_size: int = KEYS["val_size"].default,
           seed: int = KEYS["seed"].default, precision: str = KEYS["precision"].default, data_dir="data",
           skip_checksum: bool = False, workers: int = 1, out_dir="results/tuning", device="cpu", log=print) -> list[dict]:
    """Run every not-yet-recorded trial of `grids` ({mode: grid}); returns the records of this run's trials.

    workers > 1 runs trials in separate processes, each with cores // workers torch threads.
    """
    if val_size < 1:
        raise ConfigError("tuning needs a validation split: --val-size must be >= 1")
    grids = {mode: validate_grid(mode, grid) for mode, grid in grids.items()}
    data_kwargs = {"data_dir": data_dir, "val_size": val_size, "split_seed": seed, "train_subset": train_subset,
                   "verify_checksum": not skip_checksum}
    data = load_mnist(**data_kwargs)
    budget = {"epochs": epochs, "train_subset": train_subset, "val_size": val_size, "seed": seed, "precision": precision,
              "data_checksum": data.checksum}
    pending, total = [], 0
    for mode, grid in grids.items():
        done = {trial_key(t["config"]) for t in read_trials(out_dir, mode)}
        configs = expand(mode, grid, budget)
        total += len(configs)
        pending += [c for c in configs if trial_key(c) not in done]
    for mode in grids:
        if not any(c["mode"] == mode for c in pending):
            refresh_summary(out_dir, mode, budget)  # nothing to run: the summary still follows the current rules
    log(f"tuning {', '.join(grids)}: {total} trials, {total - len(pending)} already recorded in {out_dir}; "
        f"{epochs} epoch(s) on {len(data.train_y)} images, scored on {len(data.val_y)} validation images, "
        f"{workers} worker(s)")
    start, finished, skipped = time.perf_counter(), [], []

    def note(record):
        record_trial(out_dir, record)
        finished.append(record)
        config, n = record["config"], len(finished)
        elapsed = time.perf_counter() - start
        todo = len(pending) - len(skipped)
        log(f"[{config['mode']} {n}/{todo}] {_describe(config, grids[config['mode']])}  {_score(record)}  "
            f"{record['seconds']:.1f}s  elapsed {_clock(elapsed)}  ETA {_clock(elapsed / n * (todo - n))}")

    if workers == 1 or len(pending) <= 1:
        for config in pending:
            # Another tuner on the same files may have run this trial meanwhile.
            if trial_key(config) in {trial_key(t["config"]) for t in read_trials(out_dir, config["mode"])}:
                skipped.append(config)
                continue
            note(run_trial(config, data, device))
        return finished
    del data  # each worker loads its own copy
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(threads, data_kwargs))
    try:
        jobs = [pool.submit(_pool_trial, config, device) for config in pending]
        for job in futures.as_completed(jobs):
            note(job.result())
    except BaseException:
        # Stop at once (Ctrl-C, a failed trial): the finished trials are already on disk.
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)  # joins the dead workers and frees their queues
        raise
    pool.shutdown()
    return finished


def tuned_config(mode: str, run_search: bool = False, data_dir="data", seed: int = KEYS["seed"].default, skip_checksum: bool = False,
                 out_dir="results/tuning", log=print, **search_kwargs) -> dict:
    """The best recorded config for `mode` (lr, batch_size, schedule, weight_decay, shift, hyperparams).

    With `run_search`, first run the default (short) search for `mode`, with `search_kwargs` (epochs,
    train_subset, val_size, workers) overriding its budget; recorded trials are reused.
    """
    if mode not in METHODS:
        raise ConfigError(f"unknown mode {mode!r} (choose from {', '.join(METHODS)})")
    if run_search:
        search(build_grids([mode]), data_dir=data_dir, seed=seed, skip_checksum=skip_checksum, out_dir=out_dir,
               log=log, **search_kwargs)
    summary = read_summary(out_dir)
    if mode not in summary:
        raise ConfigError(f"no tuned config for {mode} in {Path(out_dir) / SUMMARY}; "
                         f"run python tune_hyperparams.py --mode {mode} first")
    entry = summary[mode]
    return {**{k: entry["config"][k] for k in TRAIN_KEYS}, "hyperparams": dict(entry["config"]["hyperparams"])}
