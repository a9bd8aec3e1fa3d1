"""Evaluate a checkpoint's deployed model (rebuilt from exactly its exported codes and scales) on the
MNIST test set, print the per-layer table and append one row to results/results.csv.

Example:
    python eval.py --mode ttq --data-dir ../shared/mnist
"""
import argparse
from pathlib import Path

from quant.checkpoint import load_checkpoint
from quant.cli import ArgumentParser, add_data_args, add_mode_arg, pick_device, run_main, seed_everything
from quant.data import load_mnist
from quant.results import format_table
from quant.runs import evaluate_checkpoint

LAYER_COLUMNS = [("layer", "layer", ""), ("shape", "shape", ""), ("params", "params", "d"),
                 ("distinct", "distinct", "d"), ("bits", "bits", "d"), ("neg_pct", "% -1", ".1f"),
                 ("zero_pct", "% 0", ".1f"), ("pos_pct", "% +1", ".1f"), ("delta", "delta", ".4g"),
                 ("w_p", "w_p/alpha", ".4g"), ("w_n", "w_n", ".4g")]


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mode_arg(parser)
    add_data_args(parser)
    parser.add_argument("--checkpoint", default=None, help="checkpoint to evaluate (default: checkpoints/{mode}.pth)")
    parser.add_argument("--results", default="results/results.csv", help="CSV to append to (default: results/results.csv)")
    parser.add_argument("--tag", default="", help="free-text label stored in the row (reproduce.py uses 'study')")
    parser.add_argument("--no-append", action="store_true", help="print only, do not touch the results CSV")
    args = parser.parse_args()
    seed_everything(args.seed)
    path = Path(args.checkpoint or f"checkpoints/{args.mode}.pth")
    device = pick_device(args.device)
    ckpt = load_checkpoint(path, args.mode)  # fail on a bad checkpoint before spending time on the data
    data = load_mnist(args.data_dir, test_only=True, verify_checksum=not args.skip_checksum)
    result = evaluate_checkpoint(path, args.mode, data, None if args.no_append else args.results, args.tag, device,
                                 ckpt=ckpt)
    row = result["row"]
    print(format_table(result["layers"], LAYER_COLUMNS))
    print(f"\n{args.mode}: test accuracy {row['test_acc']:.2f}%  loss {row['test_loss']:.4f}  "
          f"({len(data.test_y)} images, {row['eval_seconds']:.2f}s)  {row['bits_per_weight']:.2f} bits/weight, "
          f"{row['compression']:.1f}x vs FP32, {100 * row['zero_frac']:.1f}% zero codes")
    if not args.no_append:
        print(f"appended to {args.results}")


if __name__ == "__main__":
    run_main(main)
