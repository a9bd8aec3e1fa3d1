"""Measure training, evaluation and deployment speed on this machine in one run; write results/benchmarks.json.

What is measured and how: benchmarks/benchmarking.py. Run it on an otherwise idle machine (the JSON records the
load average before and after); the full run trains one 55,000-image epoch per mode plus one naive epoch.

Example:
    python benchmarks/bench.py --data-dir ../shared/mnist                                 # ~20 min on 2 cores (bf16 rounds included)
    python benchmarks/bench.py --quick --data-dir ../shared/mnist --out /tmp/bench.json   # a few seconds
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find quant/ and benchmarks/

import torch  # noqa: E402

from benchmarks import benchmarking  # noqa: E402
from quant.cli import (ArgumentParser, add_config_flags, add_data_args, pick_device, positive_int,  # noqa: E402
                       run_main, seed_everything)
from quant.config import KEYS  # noqa: E402
from quant.data import load_mnist  # noqa: E402
from quant.engine import PRECISIONS, native_bf16  # noqa: E402
from quant.files import atomic_write_json  # noqa: E402

QUICK_TRAIN_IMAGES = 2560  # 20 steps of 128


def parse_args():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    # CPU unless asked: the committed figures describe this project's CPU machines
    parser.set_defaults(device="cpu")
    next(a for a in parser._actions if a.dest == "device").help = "auto = cuda if available, else cpu (default: cpu)"
    parser.add_argument("--out", default="results/benchmarks.json", help="JSON output (default: results/benchmarks.json)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: {QUICK_TRAIN_IMAGES} training images per epoch, 1,000 validation and test "
                             "images, few repeats (numbers are not meaningful)")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="interleaved repetitions of every timed pipeline; tables keep the fastest round, "
                             "ratios are the median of the rounds' own ratios (default: 5; --quick: 1)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads for the whole run (default: torch's default)")
    default = KEYS["precision"].default  # what train.py trains with unless told otherwise
    parser.add_argument("--precision", choices=PRECISIONS, default=default,
                        help="besides FP32, also time bf16 autocast training: auto = where the device has native "
                             f"bf16, bf16 = always, fp32 = never (default: {default}, train.py's)")
    add_config_flags(parser, "val_size", "train_subset")  # --quick: train_subset QUICK_TRAIN_IMAGES
    return parser.parse_args()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    subset = args.train_subset or (QUICK_TRAIN_IMAGES if args.quick else None)
    data = load_mnist(args.data_dir, val_size=args.val_size, split_seed=args.seed, train_subset=subset,
                      verify_checksum=not args.skip_checksum)
    if args.quick:  # trim the evaluated splits too (the training images stay those of --val-size's split)
        data.val_x, data.val_y = data.val_x[:1000], data.val_y[:1000]
        data.test_x, data.test_y = data.test_x[:1000], data.test_y[:1000]
    device = pick_device(args.device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and native_bf16(device))
    results = benchmarking.run(data, args.data_dir, val_size=args.val_size, train_subset=subset, quick=args.quick,
                               seed=args.seed, device=device, rounds=args.rounds, bf16=bf16,
                               log=lambda line: print(f"... {line}", flush=True))
    atomic_write_json(args.out, results)
    print(benchmarking.format_report(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
