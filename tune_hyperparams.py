"""Search training hyperparameters on the validation split (never the test set), as Optuna studies.

Each trial trains a short budget (default 1 epoch on 20,000 images) and scores the deployed ternary model
on 5,000 held-out training images. The studies live in results/tuning/studies.db (SQLite) or any database
`--storage` names; every finished trial is written to results/tuning/{mode}_tuning.json and the best config
per mode to results/tuning/tuning_summary.json, which `train.py --use-tuned` reads. Interrupted or killed,
a rerun of the same command runs only the unfinished trials; the same command on several machines with one
`--storage postgresql://...` shares the work.

Example:
    python tune_hyperparams.py --mode all --data-dir ../shared/mnist
    python tune_hyperparams.py --mode ttq --set lr=1e-3,3e-3 --set t=0.05,0.1 --epochs 2 --workers 2
    python tune_hyperparams.py --mode admm --sampler tpe --trials 40 --epochs 3 --prune --storage postgresql://host/db

Second stage (quant/confirm.py): `--confirm K` retrains the defaults and the K best configs of each mode's
recorded search at the full budget (3 epochs, all training images) on seeds 0, 1, 2, scores them on the
validation split, and writes results/tuning/{mode}_confirm.json and confirm_summary.json:
    python tune_hyperparams.py --mode all --confirm 2 --data-dir ../shared/mnist
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from quant import confirm, tuning
from quant.cli import (ArgumentParser, add_config_flags, add_data_args, add_mode_arg, pick_device, positive_int,
                       run_main)
from quant.methods import METHODS

STATE = {"saved": None}


def parse_set(spec: str) -> tuple[str, list[str]]:
    """'batch-size=64,128' -> ('batch_size', ['64', '128']) (values are checked by tuning.build_grids)."""
    key, sep, values = spec.partition("=")
    if not sep or not key.strip() or not values.strip():
        raise ValueError(f"--set {spec!r}: expected key=v1,v2,...")
    return key.strip().replace("-", "_"), [v.strip() for v in values.split(",")]


def read_grid_json(text: str) -> dict:
    """A grid from inline JSON text (starting with '{') or a JSON file path."""
    inline = text.lstrip().startswith("{")
    try:
        grid = json.loads(text if inline else Path(text).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--grid: {'inline text' if inline else text} is not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"--grid: cannot read {text} ({e.strerror}); pass a JSON file or inline JSON") from None
    if not isinstance(grid, dict):
        raise ValueError("--grid: expected a JSON object {key: [values]} or {mode: {key: [values]}}")
    return grid


def parse_args():
    defaults = "; ".join(f"{m}: " + ", ".join(f"{k} {'/'.join(f'{v:g}' for v in vs)}" for k, vs in g.items())
                         for m, g in tuning.GRIDS.items())
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mode_arg(parser, choices=(*METHODS, "all"))
    parser.add_argument("--grid", default=None,
                        help="JSON file or inline JSON {key: [values]} (or {mode: {key: [values]}}) replacing "
                             f"those keys of the default grids ({defaults})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                        help="replace one key's values in the grid (repeatable; applied after --grid), "
                             "e.g. --set lr=1e-3,3e-3; keys: lr, batch_size, schedule, weight_decay, shift and the "
                             "mode's own hyperparameters")
    parser.add_argument("--epochs", type=positive_int, default=1, help="training epochs per trial (default: 1)")
    parser.add_argument("--train-subset", "--train_subset", type=positive_int, default=20000,
                        help="train each trial on the first N images of the training split (default: 20000)")
    add_config_flags(parser, "val_size", "precision")  # val_size: the images that score every trial
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="run N copies of this command on the same studies, each with cores/N torch threads "
                             "(default: 1)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of --workers N's copies
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL shared by every worker and machine, e.g. postgresql://user@host/db "
                             f"(default: sqlite:///OUT_DIR/{tuning.DATABASE})")
    parser.add_argument("--sampler", choices=("grid", "tpe"), default="grid",
                        help="grid: every point of the grids (default); tpe: Optuna's TPE over the ranges they span, "
                             "seeded by --seed unless --workers or --storage shares the study")
    parser.add_argument("--trials", type=positive_int, default=None,
                        help="with --sampler tpe: stop when the study has N finished trials")
    parser.add_argument("--prune", action="store_true",
                        help="stop trials whose per-epoch validation accuracy is below the median of earlier "
                             "trials at that epoch (Optuna's MedianPruner; needs --epochs >= 2)")
    parser.add_argument("--out-dir", "--out_dir", default="results/tuning",
                        help="folder for {mode}_tuning.json and tuning_summary.json (default: results/tuning)")
    parser.add_argument("--confirm", type=int, default=None, metavar="K",
                        help="instead of searching, retrain the defaults and the K best recorded configs per mode "
                             "at the full budget (3 epochs, all training images) on --confirm-seeds")
    parser.add_argument("--confirm-seeds", default="0,1,2", help="seeds of the --confirm runs (default: 0,1,2)")
    add_data_args(parser)
    args = parser.parse_args()
    if args.confirm is not None and args.confirm < 0:
        parser.error("--confirm must be >= 0")
    try:
        args.confirm_seeds = [int(s) for s in args.confirm_seeds.split(",")]
    except ValueError:
        parser.error(f"--confirm-seeds: {args.confirm_seeds!r} is not a comma-separated list of integers")
    args.modes = list(METHODS) if args.mode == "all" else [args.mode]
    # Every grid value is checked here, so a typo costs a one-line error before any data is read.
    try:
        if (args.sampler == "tpe") != (args.trials is not None):
            raise ValueError("--trials N goes with --sampler tpe, and --sampler tpe needs it")
        overrides = read_grid_json(args.grid) if args.grid else {}
        for spec in args.set:
            key, values = parse_set(spec)
            overrides[key] = values
        args.grids = tuning.build_grids(args.modes, overrides)
        args.device = pick_device(args.device)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    return args


def run_workers(n: int) -> None:
    """--workers N: N copies of this command work the same studies (as on N machines); wait for them all."""
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--worker"]) for _ in range(n)]
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for proc in procs:  # interrupted: stop the copies (each queues its unfinished trial again)
            proc.terminate()
            proc.wait()
    if any(codes):
        raise ValueError(f"worker exit codes {codes} (see above); rerun the same command to resume")


def main():
    args = parse_args()
    if args.confirm is not None:
        STATE["saved"] = f"every finished run is saved in {args.out_dir}"
        summary = confirm.confirm(args.modes, args.confirm, seeds=args.confirm_seeds, val_size=args.val_size,
                                  precision=args.precision, data_dir=args.data_dir, skip_checksum=args.skip_checksum,
                                  tuning_dir=args.out_dir, device=args.device)
        for mode in args.modes:
            for precision, entry in summary.get(mode, {}).items():
                print(f"  {mode:5s} {precision}: {entry['choice']}  {json.dumps(entry['config'])}")
        return
    STATE["saved"] = ("every finished trial is saved in the study "
                      f"({args.storage or f'sqlite:///{Path(args.out_dir) / tuning.DATABASE}'})")
    if args.worker:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.workers))
    elif args.workers > 1:
        run_workers(args.workers)  # then the search below finds every trial finished and writes the outputs
    tuning.search(args.grids, epochs=args.epochs, train_subset=args.train_subset, val_size=args.val_size,
                  seed=args.seed, precision=args.precision, data_dir=args.data_dir, skip_checksum=args.skip_checksum,
                  out_dir=args.out_dir, storage=args.storage, trials=args.trials, prune=args.prune,
                  shared=args.worker or args.storage is not None, device=args.device)
    if args.worker:
        return
    summary = tuning.read_json(Path(args.out_dir) / tuning.SUMMARY, {})
    print(f"\ntuned configs ({Path(args.out_dir) / tuning.SUMMARY}; the defaults are kept unless a config beats them "
          "by more than one standard error):")
    for mode in args.modes:
        entry = summary.get(mode)
        if entry is None:
            print(f"  {mode:5s} every trial diverged")
            continue
        config = {**{k: v for k, v in entry["config"].items() if k != "hyperparams"}, **entry["config"]["hyperparams"]}
        print(f"  {mode:5s} val acc {entry['val_acc']:.2f}%  ({entry['trials']} trials)  {json.dumps(config)}")
        if entry.get("choice") == "defaults" and entry["best"]["config"] != entry["config"]:
            print(f"        (the defaults: the best trial, {entry['best']['val_acc']:.2f}%, is within one standard "
                  f"error, {entry['standard_error']:.2f} points)")
    if Path(args.out_dir) == Path("results/tuning"):  # where train.py --use-tuned looks
        print(f"train with them: python train.py --mode {args.modes[0]} --use-tuned ...")


def on_interrupt():
    return f"{STATE['saved']}; rerun the same command to resume" if STATE["saved"] else "nothing written"


if __name__ == "__main__":
    run_main(main, on_interrupt)
