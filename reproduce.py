"""Reproduce the study of report.md: train FP, TWN, TTQ and ADMM for several seeds, evaluate each deployed
model on the MNIST test set, pack and verify the ternary ones, draw the figures, refresh the report tables.

Writes checkpoints/{mode}_seed{s}.pth and, in results/: results.csv rows tagged "study", history/, weights/,
predictions/ (each model's 10,000 test predictions, for the paired tests), deployment.csv/.json, study.json
(with the wall time of the whole run) and the PNGs. --quick (one seed, 5,000 images, one epoch, tag "quick")
writes results/quick/ and checkpoints/quick_*.pth instead and leaves report.md alone.

Example:
    python reproduce.py --data-dir ../shared/mnist            # the full study (5 seeds x 4 modes x 3 epochs)
    python reproduce.py --quick --data-dir ../shared/mnist    # a pipeline check in about a minute
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from quant.cli import ArgumentParser, add_config_flags, non_negative_int, pick_device, positive_int, run_main
from quant.files import atomic_write_json
from quant.methods import METHODS
from quant.study import PackError, Plan, run_study

DOCUMENTS = ("report.md", "README.md")
BUDGET_S = 15 * 60  # the full study should fit in this on the project's 2-core machine


def parse_args():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=None,
                        help="seeds, each its own init, validation split and batch order (default: 0 1 2 3 4; --quick: 0)")
    parser.add_argument("--modes", nargs="+", choices=tuple(METHODS), default=list(METHODS),
                        help=f"methods to run (default: {' '.join(METHODS)})")
    parser.add_argument("--quick", action="store_true",
                        help="one seed, --train-subset 5000, 1 epoch, tag 'quick', into results/quick/")
    parser.add_argument("--epochs", type=positive_int, default=None, help="epochs per run (default: 3; --quick: 1)")
    parser.add_argument("--train-subset", "--train_subset", type=positive_int, default=None,
                        help="train on the first N images of each split (default: all; --quick: 5000)")
    add_config_flags(parser, "val_size", "precision")
    parser.add_argument("--data-dir", "--data_dir", type=Path, default=Path("data"),
                        help="folder with the four MNIST IDX files, downloaded there if absent (default: data)")
    parser.add_argument("--skip-checksum", action="store_true", help="accept non-MNIST IDX files (synthetic test data)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="training device; auto = cuda if available (default: auto)")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="runs trained side by side in separate processes (default: one per CPU core on the "
                             "CPU, 1 on a GPU)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads per run (default: torch's default thread count // workers)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: results (--quick: results/quick)")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"), help="default: checkpoints")
    parser.add_argument("--reuse", action="store_true",
                        help="skip training where a checkpoint with the same config and data exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-report", action="store_true", help=f"do not refresh the tables in {', '.join(DOCUMENTS)}")
    return parser.parse_args()


def main():
    start = time.perf_counter()
    args = parse_args()
    device = pick_device(args.device)
    workers = args.workers or (1 if device.type == "cuda" else os.cpu_count() or 1)
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads() // workers))  # torch's cores, shared
    given = {k: v for k, v in {"seeds": args.seeds, "epochs": args.epochs, "train_subset": args.train_subset,
                               "results_dir": args.results_dir}.items() if v is not None}
    common = {"modes": args.modes, "val_size": args.val_size, "checkpoint_dir": args.checkpoint_dir, "data_dir": args.data_dir,
              "verify_checksum": not args.skip_checksum, "device": device, "reuse": args.reuse, "workers": workers,
              "precision": args.precision, "progress": not args.no_progress}
    plan = Plan.quick(**given, **common) if args.quick else Plan(**given, **common)
    if args.quick:
        plan.seeds = plan.seeds[:1]
    try:
        run_study(plan)
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    from quant.plotting import plot_all  # matplotlib only once there is something to draw
    from quant.report import NoResults, refresh

    plot_all(plan.results_dir, tag=plan.tag)
    seconds = time.perf_counter() - start
    info_path = plan.results_dir / "study.json"  # the whole run's wall time, up to the table refresh (< 1 s)
    atomic_write_json(info_path, {**json.loads(info_path.read_text()), "seconds_total": round(seconds, 1)})
    if plan.tag == "study" and not args.no_report:
        try:
            changed = refresh(DOCUMENTS, plan.results_dir, plan.tag)
            print(f"refreshed tables in {', '.join(map(str, changed))}" if changed else "report tables unchanged")
        except NoResults as e:
            print(f"report tables left unchanged: {e}")
    print(f"done in {seconds / 60:.1f} min; results in {plan.results_dir}/"
          + (f" (over the {BUDGET_S // 60}-minute budget)" if not args.quick and seconds > BUDGET_S else ""))


if __name__ == "__main__":
    run_main(main)
