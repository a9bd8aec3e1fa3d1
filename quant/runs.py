"""One training run and one evaluation, as functions: train.py, eval.py, tuning and reproduce.py share them.

    train_checkpoint: seed -> LeNet5 + method -> engine.train -> export -> checkpoint (+ history CSV)
    evaluate_checkpoint: checkpoint -> model rebuilt from its export -> test set -> one results.csv row
"""
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .checkpoint import environment, load_checkpoint, save_checkpoint, write_history_csv
from .data import MNIST
from .engine import DivergenceError, evaluate, resolve_precision, train
from .export import check_ternary, layer_table, rebuild_model, size_summary
from .methods import DEFAULTS, HYPERPARAMS, get_method
from .model import LeNet5
from .results import append_result

# Cross-entropy ten times that of uniform guessing (ln 10): a loss this high means training blew up.
DIVERGED_LOSS = 10 * math.log(10)


def default_config(mode: str, **overrides) -> dict:
    """The full training config of `mode` with its defaults (README "Defaults"), then `overrides`.

    `hyperparams` in overrides updates the method's hyperparameters rather than replacing them.
    """
    config = {"mode": mode, "lr": DEFAULTS[mode]["lr"], "batch_size": DEFAULTS[mode]["batch_size"], "schedule": "onecycle",
              "weight_decay": 0.0, "shift": 2, "precision": "fp32", "epochs": 3, "seed": 0, "val_size": 5000, "train_subset": None,
              "keep_fp": [], "hyperparams": dict(HYPERPARAMS[mode])}
    for key, value in overrides.items():
        if key == "hyperparams":
            config["hyperparams"].update(value)
        elif key in config:
            config[key] = value
        else:
            raise ValueError(f"unknown config key {key!r} (valid: {', '.join(config)})")
    return config


def train_checkpoint(config: dict, data: MNIST, out, device="cpu", progress: bool = True, log=print) -> dict:
    """Train `config["mode"]` from a seeded init, save the checkpoint atomically at `out`, return it."""
    out = Path(out)
    torch.manual_seed(config["seed"])
    model = LeNet5().to(device)  # before attach: ADMM's G and U are created on the weights' device
    method = get_method(config["mode"], keep_fp=config["keep_fp"], **config["hyperparams"])
    method.attach(model)
    model.to(device)
    precision = resolve_precision(config.get("precision", "fp32"), device)
    start = time.perf_counter()
    history = train(model, method, data, epochs=config["epochs"], lr=config["lr"], batch_size=config["batch_size"],
                    schedule=config["schedule"], weight_decay=config["weight_decay"], shift=config.get("shift", 0),
                    seed=config["seed"], device=device, precision=precision, progress=progress, log=log)
    train_seconds = time.perf_counter() - start
    # Huge but finite losses (e.g. --lr 1e6) slip past the engine's NaN check; never save such a model.
    split = "val" if len(data.val_y) else "train"
    loss = history[-1][f"{split}_loss"]
    if not math.isfinite(loss) or loss > DIVERGED_LOSS:
        raise DivergenceError(f"training diverged: final {split} loss {loss:.4g} (uniform guessing scores "
                              f"{math.log(10):.2f}); lr {config['lr']:g} is probably too high; no checkpoint written")
    model.cpu()
    export = method.export(model)
    check_ternary(export)
    val = evaluate(rebuild_model(export), data.val_x, data.val_y) if len(data.val_y) else {"acc": float("nan"), "loss": float("nan")}
    ckpt = {
        "mode": config["mode"], "config": config, "history": history, "seed": config["seed"],
        "metrics": {"val_acc": val["acc"], "val_loss": val["loss"], "train_seconds": train_seconds},
        "precision": precision,
        "data_checksum": data.checksum, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "export": export, **environment(),
    }
    save_checkpoint(out, ckpt)
    write_history_csv(history_path(out), history)
    return ckpt


def history_path(checkpoint) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_history.csv")


def evaluate_checkpoint(path, mode: str | None, data: MNIST, results_path=None, tag: str = "", device="cpu") -> dict:
    """Evaluate the deployed model of checkpoint `path` on the test set; append a row unless results_path is None.

    Returns {"row": results row, "layers": per-layer table rows, "preds": test predictions}.
    """
    ckpt = load_checkpoint(path, mode)
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
