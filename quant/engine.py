"""One training engine for every mode: Adam + an LR schedule over in-memory batches, with method hooks.

Per step:  loss = CE(model(x), y) + method.extra_loss();  Adam step;  schedule step;  method.after_step.
Per epoch: validation loss/accuracy on the held-out split, one summary line, one history row.
At the end: method.finish (e.g. ADMM's hard projection) and method.export (codes + scales).
"""
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import MNIST, batches, random_shift

SCHEDULES = ("onecycle", "cosine", "constant")


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


def make_scheduler(optimizer, schedule: str, total_steps: int):
    """OneCycle (Smith & Topin 2017: warm-up 20 %, cosine anneal), cosine decay to 0, or constant.

    Each parameter group peaks at the lr it was created with.
    """
    if schedule == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps, pct_start=0.2)
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


def train(model, method, data: MNIST, *, epochs: int, lr: float, batch_size: int, schedule: str = "onecycle",
          weight_decay: float = 0.0, shift: int = 0, seed: int = 0, device="cpu", progress: bool = True,
          log=print) -> list[dict]:
    """Train `model` in place with `method`'s hooks; return the per-epoch history.

    `shift` > 0 translates each training image by up to that many pixels (augmentation; 0 = off).
    """
    model.to(device)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    groups = [{"params": g["params"], "lr": lr * g["lr_mult"]} for g in method.param_groups(model)]
    optimizer = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    n_batches = len(train_y) // batch_size + (len(train_y) % batch_size >= 2)
    total_steps = epochs * n_batches
    scheduler = make_scheduler(optimizer, schedule, total_steps)
    shuffle = torch.Generator(device="cpu").manual_seed(seed)
    history, step = [], 0
    for epoch in range(1, epochs + 1):
        model.train()
        start, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        bar = tqdm(total=len(train_y), desc=f"{method.name} epoch {epoch}/{epochs}", unit="img",
                   disable=not progress, leave=False, mininterval=0.5)
        for x, y in batches(train_x, train_y, batch_size, shuffle):
            if shift:
                x = random_shift(x, shift, shuffle)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            extra = method.extra_loss()
            total = loss if extra is None else loss + extra
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            method.after_step(model, step, total_steps)
            loss_value = total.item()
            if not math.isfinite(loss_value):
                raise DivergenceError(f"loss became {loss_value} at epoch {epoch}, step {step} "
                                      f"(lr {lr:g} is probably too high); no checkpoint written")
            seen += len(y)
            loss_sum += loss_value * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            bar.update(len(y))
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.2f}%",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
        bar.close()
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
    method.finish(model, batches(train_x[:5000], train_y[:5000], 500))
    return history
