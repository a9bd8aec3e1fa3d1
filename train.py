"""Train LeNet-5 on MNIST in one mode and save a self-describing checkpoint.

Example:
    python train.py --mode twn --data-dir ../shared/mnist
"""
import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

from quant.checkpoint import environment, save_checkpoint, write_history_csv
from quant.cli import add_data_args, add_mode_arg, add_train_args, pick_device, resolve_config, run_main, seed_everything
from quant.data import load_mnist
from quant.engine import evaluate, train
from quant.export import check_ternary, rebuild_model
from quant.methods import get_method
from quant.model import LeNet5

STATE = {"out": None}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mode_arg(parser)
    add_train_args(parser)
    add_data_args(parser)
    parser.add_argument("--out", default=None, help="checkpoint path (default: checkpoints/{mode}.pth)")
    parser.add_argument("--tune", action="store_true", help="run a short validation grid search first, train with its best config")
    parser.add_argument("--use-tuned", action="store_true",
                        help="start from the best config in results/tuning/tuning_summary.json (explicit flags win)")
    args = parser.parse_args()
    return parser, args


def main():
    parser, args = parse_args()
    base = None
    if args.tune or args.use_tuned:
        from quant.tuning import tuned_config

        base = tuned_config(args.mode, run_search=args.tune, data_dir=args.data_dir, seed=args.seed,
                            skip_checksum=args.skip_checksum)
    config = resolve_config(parser, args, base)
    out = Path(args.out or f"checkpoints/{args.mode}.pth")
    STATE["out"] = out
    device = pick_device(args.device)
    seed_everything(args.seed, args.deterministic)
    data = load_mnist(args.data_dir, val_size=config["val_size"], split_seed=args.seed,
                      train_subset=config["train_subset"], verify_checksum=not args.skip_checksum)
    model = LeNet5()
    method = get_method(args.mode, keep_fp=config["keep_fp"], **config["hyperparams"])
    method.attach(model)
    model.to(device)
    print(f"training {args.mode} on {len(data.train_y)} images ({len(data.val_y)} held out for validation), "
          f"{config['epochs']} epochs, lr {config['lr']:g}, batch {config['batch_size']}, {config['schedule']}, "
          f"device {device}, seed {args.seed}")
    start = time.perf_counter()
    history = train(model, method, data, epochs=config["epochs"], lr=config["lr"], batch_size=config["batch_size"],
                    schedule=config["schedule"], weight_decay=config["weight_decay"], seed=args.seed, device=device,
                    progress=not args.no_progress)
    train_seconds = time.perf_counter() - start
    model.cpu()
    export = method.export(model)
    check_ternary(export)
    val = evaluate(rebuild_model(export), data.val_x, data.val_y) if len(data.val_y) else {"acc": float("nan"), "loss": float("nan")}
    save_checkpoint(out, {
        "mode": args.mode, "config": config, "history": history, "seed": args.seed,
        "metrics": {"val_acc": val["acc"], "val_loss": val["loss"], "train_seconds": train_seconds},
        "data_checksum": data.checksum, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "export": export, **environment(),
    })
    write_history_csv(out.with_name(f"{out.stem}_history.csv"), history)
    print(f"saved {out} (deployed-model val acc {val['acc']:.2f}%, {train_seconds:.1f}s training)")


def on_interrupt():
    out = STATE["out"]
    if out is not None and out.exists():
        return f"nothing written by this run; last good checkpoint is {out} ({time.ctime(out.stat().st_mtime)})"
    return "nothing written by this run" + (f"; no checkpoint exists at {out} yet" if out else "")


if __name__ == "__main__":
    run_main(main, on_interrupt)
