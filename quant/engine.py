"""One training engine for every mode: Adam + an LR schedule over in-memory batches, with method hooks.

Per step:  loss = CE(model(x), y) + method.extra_loss();  Adam step;  schedule step;  method.after_step.
With precision "bf16" the forward pass runs under `torch.autocast` in bfloat16 (convolutions and matrix
products in bf16, the quantizers' thresholds and scales in FP32 since autocast leaves those ops alone);
the loss, the backward's accumulation into the FP32 master weights, Adam and every evaluation stay FP32.
Per epoch: validation loss/accuracy on the held-out split, one summary line, one history row.
At the end: method.finish (e.g. ADMM's hard projection) and method.export (codes + scales).
"""
import contextlib
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import MNIST, batches, random_shift
from .errors import QuantError

SCHEDULES = ("onecycle", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "auto")
# Steps between reads of the running loss/accuracy (and NaN checks); each read waits for the device to finish.
SYNC_EVERY = 20


class DivergenceError(QuantError, RuntimeError):
    """The training loss became NaN or infinite (or, caught by quant/runs.py, absurdly large)."""

    exit_code = 3


def make_optimizer(groups: list[dict], lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam over `groups`; foreach=True: bitwise the same as the default per-parameter loop, ~20 % faster."""
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, foreach=True)


class RunningStats:
    """An epoch's running loss and accuracy as tensors, read back (and NaN-checked in step order, so a NaN is
    reported with its exact step) every SYNC_EVERY steps: `.item()` per step would stall a GPU each step."""

    def __init__(self, epoch: int, lr: float):
        self.epoch, self.lr = epoch, lr
        self.seen, self.correct, self.loss_sum = 0, 0, 0.0
        self.pending = []  # (step, loss tensor, correct-count tensor, batch size)

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.pending.append((step, loss.detach(), (logits.argmax(1) == y).sum(), len(y)))

    def sync(self) -> None:
        if not self.pending:
            return
        steps, losses, corrects, sizes = zip(*self.pending)
        self.pending = []
        for step, value, n in zip(steps, torch.stack(losses).tolist(), sizes):
            if not math.isfinite(value):
                raise DivergenceError(f"loss became {value} at epoch {self.epoch}, step {step} "
                                      f"(lr {self.lr:g} is probably too high); no checkpoint written")
            self.seen += n
            self.loss_sum += value * n
        self.correct += int(torch.stack(corrects).sum())


def native_bf16(device) -> bool:
    """True where `device` computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (oneDNN's bf16 kernels elsewhere emulate it and are slower than FP32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return device.type == "cpu" and any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device) -> str:
    """"auto" -> "bf16" where the device has native bf16, else "fp32"; "fp32" and "bf16" are kept as asked."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Batches per epoch: full batches plus the remainder when it has >= 2 images (BatchNorm needs two)."""
    return n_images // batch_size + (n_images % batch_size >= 2)


def make_scheduler(optimizer, schedule: str, total_steps: int):
    """OneCycle (Smith & Topin 2017: warm-up 20 %, cosine anneal), cosine decay to 0, or constant.

    Each parameter group peaks at the lr it was created with.
    """
    if schedule == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]
        if total_steps < 4:  # too short for a warm-up and an anneal phase: hold the peak
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        # OneCycleLR divides by the warm-up length in steps minus one, so keep at least two warm-up steps.
        pct_start = max(0.2, 2 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps, pct_start=pct_start)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise ValueError(f"unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict:
    """Mean cross-entropy loss, accuracy (%) and predictions of `model` on (x, y), in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum, preds = 0.0, []
    for xb, yb in batches(x, y, batch_size):
        logits = model(xb.to(device))
        loss_sum += F.cross_entropy(logits, yb.to(device), reduction="sum").item()
        preds.append(logits.argmax(1).cpu())
    preds = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    n = max(len(y), 1)
    return {"loss": loss_sum / n, "acc": 100.0 * (preds == y).sum().item() / n, "preds": preds}


def train(model, method, data: MNIST, *, epochs: int, lr: float, batch_size: int, schedule: str, weight_decay: float,
          shift: int, seed: int, precision: str, device="cpu", progress: bool = True, log=print,
          on_epoch=None) -> list[dict]:
    """Train `model` in place with `method`'s hooks; return the per-epoch history.

    `shift` > 0 translates each training image by up to that many pixels (augmentation; 0 = off).
    `precision` is "fp32" or "bf16" (resolve "auto" with `resolve_precision` first).
    `on_epoch(row)`, if given, sees each epoch's history row as it is made (tuning's pruner); it may raise to stop.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train: precision must be fp32 or bf16, got {precision!r}")
    device = torch.device(device)
    # built once: a context manager per step is Python overhead on the hot path, and FP32 needs none at all
    forward_precision = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else contextlib.nullcontext())
    model.to(device)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    groups = [{"params": g["params"], "lr": lr * g["lr_mult"]} for g in method.param_groups(model)]
    optimizer = make_optimizer(groups, lr, weight_decay)
    total_steps = epochs * steps_per_epoch(len(train_y), batch_size)
    scheduler = make_scheduler(optimizer, schedule, total_steps)
    shuffle = torch.Generator(device="cpu").manual_seed(seed)
    history, step = [], 0
    for epoch in range(1, epochs + 1):
        model.train()
        start, stats = time.perf_counter(), RunningStats(epoch, lr)
        bar = tqdm(total=len(train_y), desc=f"{method.name} epoch {epoch}/{epochs}", unit="img",
                   disable=not progress, leave=False, mininterval=0.5)
        for x, y in batches(train_x, train_y, batch_size, shuffle):
            if shift:
                x = random_shift(x, shift, shuffle)
            with forward_precision:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            extra = method.extra_loss()
            total = loss if extra is None else loss + extra
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            method.after_step(model, step, total_steps)
            stats.add(step, total, logits, y)
            bar.update(len(y))
            if step % SYNC_EVERY == 0:
                stats.sync()
                bar.set_postfix(loss=f"{stats.loss_sum / stats.seen:.4f}", acc=f"{100 * stats.correct / stats.seen:.2f}%",
                                img_s=f"{stats.seen / (time.perf_counter() - start):.0f}")
        stats.sync()
        bar.close()
        seen, correct, loss_sum = stats.seen, stats.correct, stats.loss_sum
        val = evaluate(model, data.val_x, data.val_y) if len(data.val_y) else {"loss": float("nan"), "acc": float("nan")}
        row = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": 100 * correct / max(seen, 1),
               "val_loss": val["loss"], "val_acc": val["acc"], "lr": scheduler.get_last_lr()[0],
               "seconds": time.perf_counter() - start}
        stats = method.epoch_stats()
        row.update(stats)
        history.append(row)
        extras = "".join(f"  {k} {v:.4g}" for k, v in stats.items())
        log(f"[{method.name}] epoch {epoch}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}%  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2f}%  {row['seconds']:.1f}s{extras}")
        if on_epoch is not None:
            on_epoch(row)
    method.finish(model, batches(train_x[:5000], train_y[:5000], 500))
    return history
