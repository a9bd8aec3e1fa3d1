"""Train LeNet-5 on MNIST in one mode and save a self-describing checkpoint (+ per-epoch history CSV).

Example:
    python train.py --mode twn --data-dir ../shared/mnist
"""
import argparse
import time
from pathlib import Path

from quant.cli import (ArgumentParser, add_data_args, add_mode_arg, add_train_args, given, pick_device, run_main,
                       seed_everything)
from quant.config import resolve
from quant.data import load_mnist
from quant.errors import QuantError
from quant.runs import history_path, train_checkpoint

STATE = {"out": None, "saved": False}


def parse_args():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mode_arg(parser)
    add_train_args(parser)
    add_data_args(parser)
    parser.add_argument("--out", default=None, help="checkpoint path (default: checkpoints/{mode}.pth)")
    parser.add_argument("--tune", action="store_true",
                        help="run a short validation search for this mode first, then train with its best config")
    parser.add_argument("--use-tuned", "--use_tuned", action="store_true",
                        help="start from the best config in results/tuning/tuning_summary.json (explicit flags win)")
    return parser.parse_args()


def main():
    args = parse_args()
    base = None
    if args.tune or args.use_tuned:
        from quant.tuning import tuned_config

        base = tuned_config(args.mode, run_search=args.tune, data_dir=args.data_dir, seed=args.seed,
                            skip_checksum=args.skip_checksum)
    config = resolve(args.mode, given(args), base)
    out = Path(args.out or f"checkpoints/{args.mode}.pth")
    STATE["out"] = out
    device = pick_device(args.device)
    seed_everything(args.seed, args.deterministic)
    data = load_mnist(args.data_dir, val_size=config["val_size"], split_seed=args.seed,
                      train_subset=config["train_subset"], verify_checksum=not args.skip_checksum)
    if config["batch_size"] > len(data.train_y):  # resolve can only check against full MNIST's size
        raise QuantError(f"--batch-size {config['batch_size']} is larger than the {len(data.train_y)} training images")
    print(f"training {args.mode} on {len(data.train_y)} images ({len(data.val_y)} held out for validation), "
          f"{config['epochs']} epochs, lr {config['lr']:g}, batch {config['batch_size']}, {config['schedule']}, "
          f"precision {config['precision']}, device {device}, seed {args.seed}"
          + (f", tuned config from {base.get('source', 'results/tuning/tuning_summary.json')}" if base else ""))
    ckpt = train_checkpoint(config, data, out, device=device, progress=not args.no_progress)
    STATE["saved"] = True
    print(f"saved {out} and {history_path(out)} (deployed-model val acc {ckpt['metrics']['val_acc']:.2f}%, "
          f"{ckpt['metrics']['train_seconds']:.1f}s training, precision {ckpt['precision']})")


def on_interrupt():
    out = STATE["out"]
    if STATE["saved"]:
        return f"checkpoint {out} was saved; its history CSV may be missing"
    if out is not None and out.exists():
        return f"nothing written by this run; last good checkpoint is {out} ({time.ctime(out.stat().st_mtime)})"
    return "nothing written by this run" + (f"; no checkpoint exists at {out} yet" if out else "")


if __name__ == "__main__":
    run_main(main, on_interrupt)
