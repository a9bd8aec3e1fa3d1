"""Profile one training step at the compute floor (LeNet-5 forward + backward + Adam on one in-memory batch):
the operators that take the time, in ms per step and as a share. Writes results/profile_step.json.

The batch is seeded random noise of MNIST's shape: the floor's cost does not depend on the pixel values.

Example:
    python benchmarks/profile_step.py                     # batch 128, 20 steps, top 15 operators
    python benchmarks/profile_step.py --batch-size 64 --top 25
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: find quant/ and benchmarks/

import torch  # noqa: E402

from benchmarks import benchmarking  # noqa: E402
from quant.cli import ArgumentParser, add_config_flags, positive_int, run_main, seed_everything  # noqa: E402
from quant.config import KEYS  # noqa: E402
from quant.files import atomic_write_json  # noqa: E402
from quant.results import format_table  # noqa: E402

FP_BATCH = KEYS["batch_size"].default["fp"]


def parse_args():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", "--batch_size", type=positive_int, default=FP_BATCH,
                        help=f"batch size (default: {FP_BATCH}, FP's training batch)")
    parser.add_argument("--steps", type=positive_int, default=20, help="profiled steps (default: 20)")
    parser.add_argument("--top", type=positive_int, default=15, help="operators listed (default: 15)")
    add_config_flags(parser, "seed")
    parser.add_argument("--out", default="results/profile_step.json", help="JSON output (default: results/profile_step.json)")
    return parser.parse_args()


def main():
    args = parse_args()
    seed_everything(args.seed)
    x, y = torch.randn(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))
    rows = benchmarking.profile_floor(x, y, args.steps, args.top)
    print(format_table([{**row, "percent": 100 * row["share"]} for row in rows],
                       [("op", "operator", ""), ("calls_per_step", "calls/step", ".1f"), ("ms_per_step", "ms/step", ".2f"),
                        ("percent", "share %", ".1f")]))
    atomic_write_json(args.out, {"batch_size": args.batch_size, "steps": args.steps, "torch_threads": torch.get_num_threads(),
                                 "machine": benchmarking.machine_info("cpu"), "operators": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
