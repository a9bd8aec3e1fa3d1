"""Hyperparameter search on the validation split, as Optuna studies: grids, the trial, and the tuned config.

A trial trains LeNet-5 for a short budget on the training split minus the validation split, then scores the
*deployed* model (`rebuild_model(method.export(model))`, the codes x scales that eval and packing see) on the
validation split. The test set is never read: choosing on it would make every reported test accuracy optimistic.

Each mode has one study per budget (epochs, train_subset, val_size, seed, precision, data checksum) in an RDB
storage (a SQLite file beside the outputs, or any URL Optuna accepts). A rerun runs only the configs without a
finished trial; a trial that died is failed and queued again; a config finished twice (concurrent workers may
both take the last grid point) counts once. The outputs are rewritten atomically from the study after each trial:

    {mode}_tuning.json   {"mode": m, "trials": [{"config", "val_acc", "val_loss", "seconds", "seed", ...}]}
    tuning_summary.json  {mode: {"config", "val_acc", "val_loss", "choice", "best", "trials", "budget", ...}}
"""
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

from .config import KEYS, checked_mode, default_config, tunable_keys, validate
from .config import MODES as METHODS
from .data import load_mnist
from .engine import DivergenceError
from .errors import ConfigError, QuantError
from .files import atomic_write_json
from .runs import train_run

SUMMARY, DATABASE = "tuning_summary.json", "studies.db"
TRAIN_KEYS = tuple(tunable_keys("fp"))  # the tunable training knobs of every mode
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT, GRACE = 2, 10  # seconds between a running trial's heartbeats; silence after which its worker is dead

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


def build_grids(modes: list[str], overrides: dict | None = None) -> dict:
    """{mode: grid}: the default grids with `overrides` ({key: values} for each listed mode that has the key,
    or {mode: {key: values}}) replacing the keys they name, every value checked."""
    overrides = dict(overrides or {})
    per_mode = {m: overrides.pop(m) for m in list(overrides) if m in METHODS}
    valid = {m: tunable_keys(m) for m in modes}
    known = list(dict.fromkeys(k for m in modes for k in valid[m]))
    for mode, grid in per_mode.items():
        if mode not in modes or not isinstance(grid, dict):
            raise ConfigError(f"the grid names mode {mode}, which is not being tuned (--mode {' / '.join(modes)})"
                             if mode not in modes else f"the grid of {mode} must be a JSON object {{key: [values]}}")
    for key in overrides.keys() - set(known):
        which = f"mode {modes[0]} has no" if len(modes) == 1 else f"none of the modes {', '.join(modes)} has a"
        raise ConfigError(f"{which} tunable key {key!r} (valid keys: {', '.join(known)})")
    grids = {m: {**GRIDS[m], **{k: v for k, v in overrides.items() if k in valid[m]}, **per_mode.get(m, {})}
             for m in modes}
    for mode, grid in grids.items():
        for key, values in grid.items():
            if key not in valid[mode]:
                raise ConfigError(f"mode {mode} has no tunable key {key!r} (valid keys: {', '.join(valid[mode])})")
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
    config = default_config(mode, **{k: v for k, v in params.items() if k in TRAIN_KEYS},
                            hyperparams={k: v for k, v in params.items() if k not in TRAIN_KEYS},
                            **{k: v for k, v in budget.items() if k != "data_checksum"})
    return {**config, **budget}


def expand(mode: str, grid: dict, budget: dict) -> list[dict]:
    """Every full trial config of the grid's Cartesian product, in product order."""
    return [trial_config(mode, dict(zip(grid, values)), budget) for values in itertools.product(*grid.values())]


def run_trial(config: dict, data, device="cpu", on_epoch=None) -> dict:
    """Train one config on `data`'s training split; score the deployed model on its validation split (which
    the engine sees only when `on_epoch`, the pruner, wants each epoch's score)."""
    record, start = {"config": config, "seed": config["seed"]}, time.perf_counter()
    try:
        val = train_run(config, data, device, log=lambda _: None, epoch_validation=on_epoch is not None,
                        on_epoch=on_epoch)["val"]
        record.update(val_acc=val["acc"], val_loss=val["loss"] if math.isfinite(val["loss"]) else None)  # JSON: no inf
    except DivergenceError as e:  # a diverging lr is a result of the search, not a crash
        record.update(val_acc=None, val_loss=None, error=str(e))
    return {**record, "seconds": round(time.perf_counter() - start, 3),
            "threads": torch.get_num_threads(),  # seconds depend on it (and on what else the machine runs)
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _read_json(path: Path, empty: dict) -> dict:
    """The JSON object in `path` (`empty` if absent); a foreign or broken file is an error, never overwritten."""
    try:
        doc = json.loads(path.read_text()) if path.exists() else empty
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantError(f"{path}: not valid JSON ({e}); move it aside and rerun to rewrite it") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("trials", []), list):
        raise QuantError(f"{path}: not a tuning file; move it aside and rerun to rewrite it")
    return doc


def read_trials(out_dir, mode: str) -> list[dict]:
    """Every trial of `mode` recorded in `out_dir` ([] if none)."""
    return _read_json(Path(out_dir) / f"{mode}_tuning.json", {"trials": []})["trials"]


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


def knobs(config: dict) -> dict:
    """The tunable part of a config: training knobs and method hyperparameters."""
    return {**{k: config[k] for k in TRAIN_KEYS}, "hyperparams": dict(config["hyperparams"])}


def summarize(trials: list[dict], budget: dict) -> dict | None:
    """The summary entry of the trials with `budget`; None if none scored.

    `best` has the highest validation accuracy (then the lowest loss); it is chosen unless the defaults score
    within one standard error of it, a short trial's noise (the one-standard-error rule; Hastie, Tibshirani,
    Friedman, Elements of Statistical Learning, 7.10): the defaults came from full-length runs on several seeds.
    """
    same = [t for t in trials if all(t["config"].get(k) == v for k, v in budget.items())]
    scored = [t for t in same if t.get("val_acc") is not None]
    if not scored:
        return None
    best = max(scored, key=lambda t: (t["val_acc"], -(t["val_loss"] if t["val_loss"] is not None else math.inf)))
    default = next((t for t in scored if is_default(t["config"])), None)
    se = standard_error(best["val_acc"], budget["val_size"])
    keep_default = default is not None and best["val_acc"] - default["val_acc"] <= se
    chosen, pruned = default if keep_default else best, sum("pruned" in t for t in same)
    return {"config": knobs(chosen["config"]), "val_acc": chosen["val_acc"], "val_loss": chosen["val_loss"],
            "seed": chosen["seed"], "choice": "defaults" if keep_default else "best",
            "best": {"config": knobs(best["config"]), "val_acc": best["val_acc"], "val_loss": best["val_loss"]},
            "defaults_val_acc": None if default is None else default["val_acc"], "standard_error": se,
            "trials": len(same), "diverged": len(same) - len(scored) - pruned, "pruned": pruned, "budget": budget,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def open_study(url: str, mode: str, budget: dict, sampler=None, pruner=None) -> optuna.Study:
    """`mode`'s study for `budget` in the RDB storage at `url` (created if new), with heartbeats on."""
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # an interrupted trial: no traceback (a crash raises anyway)
    for attempt in range(10):
        try:  # SQLite admits one writer at a time: wait for the lock rather than fail (Optuna FAQ, SQLite concurrency)
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {},
                heartbeat_interval=HEARTBEAT, grace_period=GRACE,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
            break
        except (ImportError, sqlalchemy.exc.SQLAlchemyError) as e:  # a bad URL, no driver, no server...
            if not isinstance(e, sqlalchemy.exc.DBAPIError) or attempt == 9:  # ...or workers creating the tables
                raise QuantError(f"cannot open the study storage {url}: {str(e).splitlines()[0]}") from None
            time.sleep(0.5)
    name = (f"{mode}-{budget['epochs']}ep-{budget['train_subset'] or 'all'}img-{budget['val_size']}val"
            f"-seed{budget['seed']}-{budget['precision']}-{budget['data_checksum'][:12]}")
    return optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


def finished(study: optuna.Study, states=DONE) -> dict:
    """{trial key: record} of the study's trials in `states` (default: finished), each config once (its first)."""
    records = {}
    for t in sorted(study.get_trials(deepcopy=False, states=states), key=lambda t: t.number):
        records.setdefault(trial_key(t.user_attrs["record"]["config"]), t.user_attrs["record"])
    return records


def write_outputs(study: optuna.Study, mode: str, budget: dict, out_dir, order: list[str] = ()) -> None:
    """Rewrite {mode}_tuning.json (the study's configs, in `order` of trial keys first) and the mode's summary."""
    records, rank = finished(study), {key: i for i, key in enumerate(order)}
    found = [records[k] for k in sorted(records, key=lambda k: rank.get(k, len(rank)))]
    # Trials of other budgets (other studies) stay in the file; the summary ranks this budget's.
    others = [t for t in read_trials(out_dir, mode) if any(t["config"].get(k) != v for k, v in budget.items())]
    atomic_write_json(Path(out_dir) / f"{mode}_tuning.json", {"mode": mode, "trials": others + found})
    summary, entry = read_summary(out_dir), summarize(found, budget)
    undated = [{k: v for k, v in (e or {}).items() if k != "updated"} for e in (entry, summary.get(mode))]
    if entry is not None and undated[0] != undated[1]:  # unchanged: keep the file and its time stamp
        summary[mode] = entry
        atomic_write_json(Path(out_dir) / SUMMARY, {m: summary[m] for m in [*METHODS, *summary] if m in summary})


def _suggest(trial, key: str, values: list):
    """The sampler's pick for `key`: from the grid's values, or (TPE) their range, log-scaled if it excludes 0."""
    spec = KEYS[key]
    if spec.type in (str, bool) or isinstance(spec.type, tuple):
        return trial.suggest_categorical(key, (False, True) if spec.type is bool else spec.type)  # every choice
    if spec.type is int:
        return trial.suggest_int(key, min(values), max(values))
    return trial.suggest_float(key, min(values), max(values), log=spec.range.startswith(("(0", "> 0")))


def search(grids: dict, *, epochs: int = 1, train_subset: int | None = 20000, val_size: int = KEYS["val_size"].default,
           seed: int = KEYS["seed"].default, precision: str = KEYS["precision"].default, data_dir="data",
           skip_checksum: bool = False, out_dir="results/tuning", storage=None, sampler: str = "grid",
           trials: int | None = None, prune: bool = False, device="cpu", log=print) -> list[dict]:
    """Run each mode's study (`grids` from `build_grids`) until every grid config, or with TPE `trials` trials,
    has finished here or in other processes on the storage; write the outputs; return the records run here.
    `prune`: Optuna's MedianPruner on each epoch's validation accuracy."""
    if val_size < 1 or (sampler == "tpe") != (trials is not None):
        raise ConfigError("tuning needs --val-size >= 1" if val_size < 1 else
                         "--trials N goes with --sampler tpe, and --sampler tpe needs it")
    data = load_mnist(data_dir, val_size=val_size, split_seed=seed, train_subset=train_subset,
                      verify_checksum=not skip_checksum)
    budget = {"epochs": epochs, "train_subset": train_subset, "val_size": val_size, "seed": seed,
              "precision": precision, "data_checksum": data.checksum}
    url = storage or f"sqlite:///{Path(out_dir) / DATABASE}"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    log(f"tuning {', '.join(grids)} in {url}: {epochs} epoch(s) on {len(data.train_y)} images, scored on "
        f"{len(data.val_y)} validation images, {torch.get_num_threads()} torch thread(s)")
    ran = []
    for mode, grid in grids.items():
        points = {trial_key(trial_config(mode, p, budget)): p
                  for p in (dict(zip(grid, values)) for values in itertools.product(*grid.values()))}
        sampler_ = (optuna.samplers.GridSampler(grid, seed=seed) if trials is None else
                    optuna.samplers.TPESampler(constant_liar=True))  # unseeded: each worker samples its own
        pruner = optuna.pruners.MedianPruner() if prune else optuna.pruners.NopPruner()
        study, total = open_study(url, mode, budget, sampler_, pruner), trials or len(points)

        def left() -> int:  # grid: configs without a finished trial; TPE: trials (a repeated config counts too)
            if trials:
                return total - len(study.get_trials(deepcopy=False, states=DONE))
            return len(points.keys() - finished(study).keys())

        def objective(trial):
            config = trial_config(mode, {k: _suggest(trial, k, v) for k, v in grid.items()}, budget)
            old = finished(study, (TrialState.COMPLETE,)).get(trial_key(config))  # e.g. from an earlier grid
            if old is not None:
                trial.set_user_attr("record", old)
                return old["val_acc"] or 0.0
            t0 = time.perf_counter()

            def report(row):  # --prune: the median rule on each epoch's validation accuracy
                trial.report(row["val_acc"], row["epoch"])
                if row["epoch"] < epochs and trial.should_prune():
                    trial.set_user_attr("record", {"config": config, "seed": seed, "val_acc": None, "val_loss": None,
                                                   "pruned": row["epoch"],
                                                   "seconds": round(time.perf_counter() - t0, 3)})
                    raise optuna.TrialPruned()

            record = run_trial(config, data, device, on_epoch=report if prune else None)
            trial.set_user_attr("record", record)
            ran.append(record)
            return record["val_acc"] or 0.0  # diverged: the worst score, for the sampler

        def progress(_, trial):  # after each trial here: the outputs, from the study, and one line
            if trial.state in DONE:
                write_outputs(study, mode, budget, out_dir, list(points))
                r, n, elapsed = trial.user_attrs["record"], total - left(), time.perf_counter() - start
                score = ("diverged" if "error" in r else f"pruned at epoch {r['pruned']}") if r["val_acc"] is None \
                    else f"val acc {r['val_acc']:.2f}% loss {r['val_loss'] or math.inf:.4f}"
                params = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in trial.params.items())
                eta = elapsed / max(n - first, 1) * (total - n)
                log(f"[{mode} {n}/{total}] {params}  {score}  {r['seconds']:.1f}s  "
                    f"elapsed {timedelta(seconds=round(elapsed))}  ETA {timedelta(seconds=round(eta))}")

        start, first = time.perf_counter(), total - left()
        log(f"{mode}: {first} of {total} trials already finished in study {study.study_name}")
        while left() > 0:
            # GridSampler never returns to a point whose trial failed (interrupted, or crashed without its
            # heartbeat's retry queued): once it has visited every point, queue the missing ones.
            if trials is None and sampler_.is_exhausted(study) and not study.get_trials(states=(TrialState.WAITING,)):
                for key in points.keys() - finished(study).keys():
                    study.enqueue_trial(points[key])
            study.optimize(objective, callbacks=[progress, *([optuna.study.MaxTrialsCallback(total, states=DONE)]
                                                            if trials else [])])
        write_outputs(study, mode, budget, out_dir, list(points))
    return ran


def tuned_config(mode: str, run_search: bool = False, data_dir="data", seed: int = KEYS["seed"].default,
                 skip_checksum: bool = False, out_dir="results/tuning", log=print, **search_kwargs) -> dict:
    """The best recorded config for `mode` (its `knobs`); with `run_search`, first run the default search, its
    budget overridden by `search_kwargs` (epochs, train_subset, val_size)."""
    checked_mode(mode)  # an unknown mode: ConfigError naming the valid ones
    if run_search:
        search(build_grids([mode]), data_dir=data_dir, seed=seed, skip_checksum=skip_checksum, out_dir=out_dir,
               log=log, **search_kwargs)
    summary = read_summary(out_dir)
    if mode not in summary:
        raise ConfigError(f"no tuned config for {mode} in {Path(out_dir) / SUMMARY}; "
                         f"run python tune_hyperparams.py --mode {mode} first")
    return knobs(summary[mode]["config"])
