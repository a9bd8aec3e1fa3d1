"""Hyperparameter search on the validation split as Optuna studies, one per mode and budget: the grids, the
trial, the outputs rewritten from the study after each trial ({mode}_tuning.json: every finished config once;
tuning_summary.json: each mode's choice) and the tuned config. A trial scores the *deployed* model (codes x
scales) on the validation split; the test set is never read: choosing on it would bias every test accuracy."""
import itertools
import json
import math
import time
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import optuna
import sqlalchemy.exc
import torch
from optuna.trial import TrialState

from .config import KEYS, MODES, checked_mode, default_config, knobs, tunable_keys, validate
from .data import load_mnist
from .engine import DivergenceError
from .errors import ConfigError, QuantError
from .files import atomic_write_json
from .runs import train_run

SUMMARY, DATABASE = "tuning_summary.json", "studies.db"
DONE = (TrialState.COMPLETE, TrialState.PRUNED)

# Default grids: 69 trials of 1 epoch on 20,000 images (~6-9 min on 2 CPU cores). lr spans the useful Adam
# range; each method's knobs bracket its paper's value: TWN's delta_factor 0.7 (arXiv 1605.04711, Eq. 6),
# TTQ's t = 0.05 (arXiv 1612.01064, Eq. 9), ADMM's rho schedule (arXiv 1707.09870, Eqs. 8-11).
GRIDS = {
    "fp": {"lr": [1e-3, 3e-3, 1e-2], "batch_size": [64, 128, 256]},
    "twn": {"lr": [1e-3, 3e-3, 1e-2], "batch_size": [64, 128], "delta_factor": [0.5, 0.7, 0.9]},
    "ttq": {"lr": [1e-3, 3e-3, 1e-2], "batch_size": [64, 128], "t": [0.02, 0.05, 0.1]},
    "admm": {"lr": [3e-3, 1e-2], "batch_size": [64, 128], "rho": [1e-5, 1e-4, 1e-3], "admm_rounds": [23, 46]},
}


def build_grids(modes: list[str], overrides: dict | None = None) -> dict:
    """{mode: grid}: the default grids with `overrides` ({key: values} for each listed mode that has the key,
    or {mode: {key: values}}) replacing the keys they name, every value checked."""
    overrides = dict(overrides or {})
    per_mode = {m: overrides.pop(m) for m in list(overrides) if m in MODES}
    for grid, among in [*((g, [m]) for m, g in per_mode.items()), (overrides, modes)]:
        if among[0] not in modes or not isinstance(grid, dict):
            raise ConfigError(f"the grid of {among[0]} must be a JSON object {{key: [values]}}" if among[0] in modes else
                              f"the grid names mode {among[0]}, which is not being tuned (--mode {' / '.join(modes)})")
        known = list(dict.fromkeys(k for m in among for k in tunable_keys(m)))
        for key in (k for k in grid if k not in known):
            which = f"mode {among[0]} has no" if len(among) == 1 else f"none of the modes {', '.join(among)} has a"
            raise ConfigError(f"{which} tunable key {key!r} (valid keys: {', '.join(known)})")
    grids = {m: {**GRIDS[m], **{k: v for k, v in overrides.items() if k in tunable_keys(m)}, **per_mode.get(m, {})}
             for m in modes}
    for mode, grid in grids.items():
        for key, values in grid.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise ConfigError(f"{key}: empty list of values")
            grid[key] = list(dict.fromkeys(validate(mode, key, v) for v in values))  # no duplicates, same order
    return grids


def trial_key(config: dict) -> str:
    """Canonical JSON of a trial's config: equal configs give equal keys whatever their key order."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def trial_config(mode: str, params: dict, budget: dict) -> dict:
    """train.py's full config for `mode` (unlisted keys at its defaults) with `params` and the tuning budget."""
    return {**default_config(mode, **params, **{k: v for k, v in budget.items() if k != "data_checksum"}), **budget}


def run_trial(config: dict, data, device="cpu", on_epoch=None) -> dict:
    """Train `config`, score its deployed model on the validation split (seen in training only by `on_epoch`)."""
    record, start = {"config": config, "seed": config["seed"]}, time.perf_counter()
    try:
        val = train_run(config, data, device, log=lambda _: None, epoch_validation=on_epoch is not None,
                        on_epoch=on_epoch)["val"]
        record.update(val_acc=val["acc"], val_loss=val["loss"] if math.isfinite(val["loss"]) else None)  # JSON: no inf
    except DivergenceError as e:  # a diverging lr is a result of the search, not a crash
        record.update(val_acc=None, val_loss=None, error=str(e))
    except optuna.TrialPruned as e:
        record.update(val_acc=None, val_loss=None, pruned=e.args[0])
    return {**record, "seconds": round(time.perf_counter() - start, 3), "threads": torch.get_num_threads(),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # seconds depend on threads


def read_json(path: Path, empty: dict) -> dict:
    """The JSON object in `path` (`empty` if absent); a foreign or broken file is an error, never overwritten."""
    try:
        doc = json.loads(path.read_text()) if path.exists() else empty
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantError(f"{path}: not valid JSON ({e}); move it aside and rerun to rewrite it") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in empty):
        raise QuantError(f"{path}: not a tuning file; move it aside and rerun to rewrite it")
    return doc


def rank(trial: dict) -> tuple:  # sort key of a scored trial: validation accuracy, then the lower loss
    return trial["val_acc"], -(trial["val_loss"] if trial["val_loss"] is not None else math.inf)


def summarize(trials: list[dict], budget: dict) -> dict | None:
    """The summary entry of the trials of one `budget` (None if none scored). `best` has the highest validation
    accuracy (then the lowest loss); it is chosen unless the defaults score within one binomial standard error
    of it, a short trial's noise (the one-standard-error rule; Hastie, Tibshirani, Friedman, Elements of
    Statistical Learning, 7.10): the defaults came from full-length runs."""
    scored = [t for t in trials if t.get("val_acc") is not None]
    if not scored:
        return None
    best, defaults = max(scored, key=rank), knobs(default_config(scored[0]["config"]["mode"]))
    default = next((t for t in scored if knobs(t["config"]) == defaults), None)
    se = 100 * math.sqrt(best["val_acc"] / 100 * (1 - best["val_acc"] / 100) / budget["val_size"])  # binomial
    keep_default = default is not None and best["val_acc"] - default["val_acc"] <= se
    chosen, pruned = default if keep_default else best, sum("pruned" in t for t in trials)
    return {"config": knobs(chosen["config"]), "val_acc": chosen["val_acc"], "val_loss": chosen["val_loss"],
            "seed": chosen["seed"], "choice": "defaults" if keep_default else "best",
            "best": {"config": knobs(best["config"]), "val_acc": best["val_acc"], "val_loss": best["val_loss"]},
            "defaults_val_acc": None if default is None else default["val_acc"], "standard_error": se,
            "trials": len(trials), "diverged": len(trials) - len(scored) - pruned, "pruned": pruned,
            "budget": budget, "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def open_study(url: str, name: str, sampler, pruner) -> optuna.Study:
    """The study `name` at `url` (created if new), with heartbeats: a trial whose worker died is queued again."""
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # an interrupted trial: no traceback (a crash raises anyway)
    for attempt in range(10):
        try:  # SQLite admits one writer at a time: wait for the lock rather than fail (Optuna FAQ)
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {},
                heartbeat_interval=2, grace_period=10,  # seconds: between heartbeats; silence that means a dead worker
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
            return optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                       direction="maximize", load_if_exists=True)
        except (ImportError, sqlalchemy.exc.SQLAlchemyError) as e:  # a bad URL, no driver, no server...
            if not isinstance(e, sqlalchemy.exc.DBAPIError) or attempt == 9:  # ...or workers creating the tables
                raise QuantError(f"cannot open the study storage {url}: {str(e).splitlines()[0]}") from None
            time.sleep(0.5)


def finished(study: optuna.Study) -> dict:
    """{trial key: record} of the study's finished trials, each config once (its first, in trial order)."""
    records = {}
    for t in study.get_trials(deepcopy=False, states=DONE):
        records.setdefault(trial_key(t.user_attrs["record"]["config"]), t.user_attrs["record"])
    return records


def write_outputs(study: optuna.Study, mode: str, budget: dict, out_dir, order: list[str]) -> None:
    """Rewrite {mode}_tuning.json (other budgets' trials, then this study's in `order`) and the summary."""
    records, path = finished(study), Path(out_dir) / f"{mode}_tuning.json"
    found = [records[k] for k in sorted(records, key=lambda k: order.index(k) if k in order else len(order))]
    others = [t for t in read_json(path, {"trials": []})["trials"]
              if any(t["config"].get(k) != v for k, v in budget.items())]
    atomic_write_json(path, {"mode": mode, "trials": others + found})
    summary, entry = read_json(Path(out_dir) / SUMMARY, {}), summarize(found, budget)
    undated = [{k: v for k, v in (e or {}).items() if k != "updated"} for e in (entry, summary.get(mode))]
    if entry is not None and undated[0] != undated[1]:  # unchanged: keep the file and its time stamp
        summary[mode] = entry
        atomic_write_json(Path(out_dir) / SUMMARY, {m: summary[m] for m in [*MODES, *summary] if m in summary})


def _suggest(trial, key: str, values: list):
    """The sampler's pick for `key`: from the grid's values, or (TPE) their range, log-scaled if it excludes 0."""
    spec = KEYS[key]
    if spec.type is bool or isinstance(spec.type, tuple):
        return trial.suggest_categorical(key, (False, True) if spec.type is bool else spec.type)  # every choice
    if spec.type is int:
        return trial.suggest_int(key, min(values), max(values))
    return trial.suggest_float(key, min(values), max(values), log=spec.range.startswith(("(0", "> 0")))


def search(grids: dict, *, epochs=1, train_subset=20000, val_size=KEYS["val_size"].default, seed=KEYS["seed"].default,
           precision=KEYS["precision"].default, data_dir="data", skip_checksum=False, out_dir="results/tuning",
           storage=None, trials=None, prune=False, shared=False, device="cpu", log=print) -> list[dict]:
    """Run each mode's study until every grid config (or `trials` TPE trials) has finished, here or in other
    processes on the storage; write the outputs; return the records run here. `prune`: Optuna's MedianPruner.
    TPE samples from `seed` (the same seed, the same trials) unless `shared`: other processes work the same
    study, and seeded copies would all propose the same points."""
    if val_size < 1:
        raise ConfigError("tuning needs --val-size >= 1")
    data = load_mnist(data_dir, val_size=val_size, split_seed=seed, train_subset=train_subset,
                      verify_checksum=not skip_checksum)
    budget = {"epochs": epochs, "train_subset": train_subset, "val_size": val_size, "seed": seed,
              "precision": precision, "data_checksum": data.checksum}
    url, ran = storage or f"sqlite:///{Path(out_dir) / DATABASE}", []
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    log(f"tuning {', '.join(grids)} in {url}: {epochs} epoch(s) on {len(data.train_y)} images, scored on "
        f"{len(data.val_y)} validation images, {torch.get_num_threads()} torch thread(s)")
    for mode, grid in grids.items():
        points = {trial_key(trial_config(mode, p, budget)): p
                  for p in (dict(zip(grid, values)) for values in itertools.product(*grid.values()))}
        name = (f"{mode}-{epochs}ep-{train_subset or 'all'}img-{val_size}val-seed{seed}-{precision}"
                f"-{data.checksum[:12]}")  # one study per mode and budget: a rerun finds it
        sampler_ = (optuna.samplers.GridSampler(grid, seed=seed) if trials is None else
                    optuna.samplers.TPESampler(seed=None if shared else seed, constant_liar=True))
        study = open_study(url, name, sampler_, optuna.pruners.MedianPruner() if prune else optuna.pruners.NopPruner())
        total = trials or len(points)

        def left() -> int:  # grid: configs without a finished trial; TPE: trials (a repeated config counts too)
            return total - len(study.get_trials(states=DONE)) if trials else len(points.keys() - finished(study).keys())

        def objective(trial):
            config = trial_config(mode, {k: _suggest(trial, k, v) for k, v in grid.items()}, budget)

            def report(row):  # --prune: the median rule on each epoch's validation accuracy
                trial.report(row["val_acc"], row["epoch"])
                if row["epoch"] < epochs and trial.should_prune():
                    raise optuna.TrialPruned(row["epoch"])
            record = finished(study).get(trial_key(config))  # e.g. from an earlier, smaller grid
            if record is None:
                record = run_trial(config, data, device, on_epoch=report if prune else None)
                ran.append(record)
            trial.set_user_attr("record", record)
            if "pruned" in record:
                raise optuna.TrialPruned()
            return record["val_acc"] or 0.0  # diverged: the worst score, for the sampler

        def progress(_, trial):  # after each trial here: the outputs, from the study, and one line
            if trial.state in DONE:
                write_outputs(study, mode, budget, out_dir, list(points))
                r, n, elapsed = trial.user_attrs["record"], total - left(), time.perf_counter() - start
                score = (f"val acc {r['val_acc']:.2f}% loss {r['val_loss'] or math.inf:.4f}" if r["val_acc"] is not None
                         else "diverged" if "error" in r else f"pruned at epoch {r['pruned']}")
                params = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
                eta = elapsed / max(n - first, 1) * (total - n)
                log(f"[{mode} {n}/{total}] {params}  {score}  {r['seconds']:.1f}s  "
                    f"elapsed {timedelta(seconds=round(elapsed))}  ETA {timedelta(seconds=round(eta))}")

        start, first = time.perf_counter(), total - left()
        log(f"{mode}: {first} of {total} trials already finished in study {name}")
        while left() > 0:
            # GridSampler never revisits a point whose trial failed: once it has visited all, queue the missing ones.
            if trials is None and sampler_.is_exhausted(study) and not study.get_trials(states=(TrialState.WAITING,)):
                for key in points.keys() - finished(study).keys():
                    study.enqueue_trial(points[key])
            stop = [optuna.study.MaxTrialsCallback(total, states=DONE)] if trials else []
            study.optimize(objective, callbacks=[progress, *stop])
        write_outputs(study, mode, budget, out_dir, list(points))
    return [r for r in ran if "pruned" not in r]


def tuned_config(mode: str, run_search: bool = False, out_dir="results/tuning", **search_kwargs) -> dict:
    """The best recorded config for `mode` (its `knobs`), after the default search if `run_search`."""
    if run_search:
        search(build_grids([checked_mode(mode)]), out_dir=out_dir, **search_kwargs)
    if checked_mode(mode) not in (summary := read_json(Path(out_dir) / SUMMARY, {})):
        raise ConfigError(f"no tuned config for {mode} in {Path(out_dir) / SUMMARY}; "
                          f"run python tune_hyperparams.py --mode {mode} first")
    return knobs(summary[mode]["config"])
