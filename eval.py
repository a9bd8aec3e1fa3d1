"""Evaluate a checkpoint's deployed model (rebuilt from its exported codes and scales) on the MNIST test set
and append one row to results/results.csv.

Example:
    python eval.py --mode ttq --data-dir ../shared/mnist
"""
import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from quant.checkpoint import environment, load_checkpoint
from quant.cli import add_data_args, add_mode_arg, format_table, pick_device, run_main, seed_everything
from quant.data import load_mnist
from quant.engine import evaluate
from quant.export import layer_table, rebuild_model, size_summary
from quant.results import append_result

LAYER_COLUMNS = [("layer", "layer", ""), ("shape", "shape", ""), ("params", "params", "d"),
                 ("distinct", "distinct", "d"), ("bits", "bits", "d"), ("neg_pct", "% -1", ".1f"),
                 ("zero_pct", "% 0", ".1f"), ("pos_pct", "% +1", ".1f"), ("delta", "delta", ".4g"),
                 ("w_p", "w_p/alpha", ".4g"), ("w_n", "w_n", ".4g")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mode_arg(parser)
    add_data_args(parser)
    parser.add_argument("--checkpoint", default=None, help="checkpoint to evaluate (default: checkpoints/{mode}.pth)")
    parser.add_argument("--results", default="results/results.csv", help="CSV to append to (default: results/results.csv)")
    parser.add_argument("--no-append", action="store_true", help="print only, do not touch the results CSV")
    args = parser.parse_args()
    seed_everything(args.seed)
    path = Path(args.checkpoint or f"checkpoints/{args.mode}.pth")
    ckpt = load_checkpoint(path, args.mode)
    model = rebuild_model(ckpt["export"]).to(pick_device(args.device))
    data = load_mnist(args.data_dir, test_only=True, verify_checksum=not args.skip_checksum)
    start = time.perf_counter()
    test = evaluate(model, data.test_x, data.test_y)
    seconds = time.perf_counter() - start
    print(format_table(layer_table(ckpt["export"]), LAYER_COLUMNS))
    sizes = size_summary(ckpt["export"])
    config = ckpt["config"]
    print(f"\n{args.mode}: test accuracy {test['acc']:.2f}%  loss {test['loss']:.4f}  "
          f"({len(data.test_y)} images, {seconds:.2f}s)  {sizes['bits_per_weight']:.2f} bits/weight, "
          f"{sizes['compression']:.1f}x vs FP32, {100 * sizes['zero_frac']:.1f}% zero codes")
    if args.no_append:
        return
    append_result(args.results, {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mode": args.mode,
        "checkpoint": str(path), "seed": ckpt["seed"], "epochs": config["epochs"], "lr": config["lr"],
        "batch_size": config["batch_size"], "schedule": config["schedule"], "keep_fp": ",".join(config["keep_fp"]),
        "hyperparams": json.dumps(config["hyperparams"], sort_keys=True), "test_acc": round(test["acc"], 4),
        "test_loss": round(test["loss"], 6), "val_acc": round(ckpt["metrics"]["val_acc"], 4), **sizes,
        "eval_seconds": round(seconds, 3), "train_seconds": round(ckpt["metrics"]["train_seconds"], 2),
        "data_checksum": ckpt.get("data_checksum", ""), "git_commit": environment()["git_commit"] or "",
    })
    print(f"appended to {args.results}")


if __name__ == "__main__":
    run_main(main)
