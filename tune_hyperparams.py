"""Grid-search training hyperparameters on the validation split (never the test set).

Each trial trains a short budget (default 1 epoch on 20,000 images) and scores the deployed ternary model
on 5,000 held-out training images. Every trial is written to results/tuning/{mode}_tuning.json and the best
config per mode to results/tuning/tuning_summary.json, which `train.py --use-tuned` reads. Interrupted, a
rerun of the same command skips the recorded trials.

Example:
    python tune_hyperparams.py --mode all --data-dir ../shared/mnist
    python tune_hyperparams.py --mode ttq --set lr=1e-3,3e-3 --set t=0.05,0.1 --epochs 2 --workers 2

Second stage (quant/confirm.py): `--confirm K` retrains the defaults and the K best configs of each mode's
recorded search at the full budget (3 epochs, all training images) on seeds 0, 1, 2, scores them on the
validation split, and writes results/tuning/{mode}_confirm.json and confirm_summary.json:
    python tune_hyperparams.py --mode all --confirm 2 --data-dir ../shared/mnist
"""
import argparse
import json
from pathlib import Path

from quant import confirm, tuning
from quant.cli import (ArgumentParser, add_config_flags, add_data_args, add_mode_arg, pick_device, positive_int,
                       run_main)
from quant.methods import METHODS

STATE = {"out_dir": None}


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
                        help="trials run in parallel processes, each with cores/N torch threads (default: 1)")
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
        overrides = tuning.read_grid_json(args.grid) if args.grid else {}
        for spec in args.set:
            key, values = tuning.parse_set(spec)
            overrides[key] = values
        args.grids = tuning.build_grids(args.modes, overrides)
        args.device = pick_device(args.device)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    return args


def main():
    args = parse_args()
    STATE["out_dir"] = args.out_dir
    if args.confirm is not None:
        summary = confirm.confirm(args.modes, args.confirm, seeds=args.confirm_seeds, precision=args.precision,
                                  data_dir=args.data_dir, skip_checksum=args.skip_checksum, tuning_dir=args.out_dir,
                                  device=args.device)
        for mode in args.modes:
            for precision, entry in summary.get(mode, {}).items():
                print(f"  {mode:5s} {precision}: {entry['choice']}  {json.dumps(entry['config'])}")
        return
    tuning.search(args.grids, epochs=args.epochs, train_subset=args.train_subset, val_size=args.val_size,
                  seed=args.seed, precision=args.precision, data_dir=args.data_dir, skip_checksum=args.skip_checksum,
                  workers=args.workers, out_dir=args.out_dir, device=args.device)
    summary = tuning.read_summary(args.out_dir)
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
    return (f"every finished trial is saved in {STATE['out_dir']}; rerun the same command to resume"
            if STATE["out_dir"] else "nothing written")


if __name__ == "__main__":
    run_main(main, on_interrupt)
