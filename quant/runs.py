"""One run from a config, and one evaluation: train.py, eval.py, the tuner, the study and the benchmark share them.
`train_run` builds, trains and exports a config and scores the deployed model on validation, in memory;
`train_checkpoint` saves it; `evaluate_checkpoint` scores a checkpoint's deployed model on the test set."""
import json
import math
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from .checkpoint import environment, load_checkpoint, save_checkpoint, write_history_csv
from .data import MNIST
from .engine import DivergenceError, evaluate, resolve_precision, train
from .export import check_ternary, layer_table, rebuild_model, size_summary
from .methods import get_method
from .model import LeNet5
from .results import append_result

# Cross-entropy ten times that of uniform guessing (ln 10): a loss this high means training blew up.
DIVERGED_LOSS = 10 * math.log(10)
TRAIN_ARGS = ("epochs", "lr", "batch_size", "schedule", "weight_decay", "shift", "seed")  # engine.train's, from a config


def build(config: dict, device="cpu"):
    """(model, method): LeNet-5 initialised from config["seed"] with config's method attached, on `device`."""
    torch.manual_seed(config["seed"])
    model = LeNet5().to(device)  # before attach: ADMM's G and U are created on the weights' device
    method = get_method(config["mode"], keep_fp=config["keep_fp"], **config["hyperparams"])
    method.attach(model)
    return model.to(device), method


def train_run(config: dict, data: MNIST, device="cpu", progress: bool = False, log=print,
              epoch_validation: bool = True, on_epoch=None) -> dict:
    """Build and train `config` on `data`, export it and score the deployed model on the validation split.

    Returns {"model", "method", "history", "export", "val" (evaluate's dict), "precision" (the resolved one),
    "train_seconds"}. Training never sees the test split; epoch_validation=False hides the validation split
    from it too (a tuning trial scores only the deployed model). `on_epoch` gets each history row (a pruner).
    """
    model, method = build(config, device)
    precision = resolve_precision(config["precision"], device)
    none_x, none_y = data.val_x[:0], data.val_y[:0]
    seen = replace(data, test_x=none_x, test_y=none_y, **({} if epoch_validation else {"val_x": none_x, "val_y": none_y}))
    start = time.perf_counter()
    history = train(model, method, seen, **{k: config[k] for k in TRAIN_ARGS}, precision=precision, device=device,
                    progress=progress, log=log, on_epoch=on_epoch)
    train_seconds = time.perf_counter() - start
    # Huge but finite losses (e.g. --lr 1e6) slip past the engine's NaN check; never keep such a model.
    split = "val" if len(seen.val_y) else "train"
    loss = history[-1][f"{split}_loss"]
    if not math.isfinite(loss) or loss > DIVERGED_LOSS:
        raise DivergenceError(f"training diverged: final {split} loss {loss:.4g} (uniform guessing scores "
                              f"{math.log(10):.2f}); lr {config['lr']:g} is probably too high")
    export = method.export(model.cpu())
    check_ternary(export)
    nan = {"acc": float("nan"), "loss": float("nan")}
    val = evaluate(rebuild_model(export), data.val_x, data.val_y) if len(data.val_y) else nan
    return {"model": model, "method": method, "history": history, "export": export, "val": val,
            "precision": precision, "train_seconds": train_seconds}


def train_checkpoint(config: dict, data: MNIST, out, device="cpu", progress: bool = True, log=print) -> dict:
    """`train_run`, then save the checkpoint atomically at `out` (and its history CSV next to it); returns it."""
    run = train_run(config, data, device, progress, log)
    ckpt = {
        "mode": config["mode"], "config": config, "history": run["history"], "seed": config["seed"],
        "metrics": {"val_acc": run["val"]["acc"], "val_loss": run["val"]["loss"], "train_seconds": run["train_seconds"]},
        "precision": run["precision"], "data_checksum": data.checksum,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "state_dict": {k: v.cpu() for k, v in run["model"].state_dict().items()}, "export": run["export"],
        **environment(),
    }
    save_checkpoint(out, ckpt)
    write_history_csv(history_path(out), run["history"])
    return ckpt


def history_path(checkpoint) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_history.csv")


def evaluate_checkpoint(path, mode: str | None, data: MNIST, results_path=None, tag: str = "", device="cpu",
                        ckpt: dict | None = None) -> dict:
    """Evaluate the deployed model of checkpoint `path` on the test set; append a row unless results_path is None.

    `ckpt` is the checkpoint at `path` where the caller has loaded it already. Returns {"row": results row,
    "layers": per-layer table rows, "preds": test predictions, "checkpoint": the checkpoint}.
    """
    ckpt = ckpt or load_checkpoint(path, mode)
    model = rebuild_model(ckpt["export"]).to(device)
    start = time.perf_counter()
    test = evaluate(model, data.test_x, data.test_y)
    seconds = time.perf_counter() - start
    config = ckpt["config"]
    row = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mode": ckpt["mode"],
        "checkpoint": str(path), "tag": tag, "seed": ckpt["seed"], "epochs": config["epochs"], "lr": config["lr"],
        "batch_size": config["batch_size"], "schedule": config["schedule"], "shift": config.get("shift", 0),
        "precision": ckpt.get("precision", "fp32"),
        "keep_fp": ",".join(config["keep_fp"]),
        "hyperparams": json.dumps(config["hyperparams"], sort_keys=True), "test_acc": round(test["acc"], 4),
        "test_loss": round(test["loss"], 6), "val_acc": round(ckpt["metrics"]["val_acc"], 4),
        **size_summary(ckpt["export"]), "eval_seconds": round(seconds, 3),
        "train_seconds": round(ckpt["metrics"]["train_seconds"], 2), "data_checksum": ckpt.get("data_checksum", ""),
        "git_commit": ckpt.get("git_commit") or "",
    }
    if results_path is not None:
        append_result(results_path, row)
    return {"row": row, "layers": layer_table(ckpt["export"]), "preds": test["preds"], "checkpoint": ckpt}
