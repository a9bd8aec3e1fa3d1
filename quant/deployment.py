"""Pack checkpoints into deployment files, verify them against the checkpoint, and tabulate their sizes.

Used by deployment_compression.py (and reproduce.py through it). The file format is quant/deploy_format.py.
"""
import csv
import io
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .deploy_format import load_inference, pack, size_report
from .export import rebuild_model
from .files import atomic_write_bytes, atomic_write_json, atomic_write_text

ENCODINGS = ("2bit", "base3")


def predict(net, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (preds == labels).sum().item() / len(labels)


def state_dict_bytes(export: dict) -> int:
    """Size of torch.save(state_dict) of the same model in FP32: what shipping it unpacked would cost."""
    buffer = io.BytesIO()
    torch.save(rebuild_model(export).state_dict(), buffer)
    return buffer.getbuffer().nbytes


def pack_checkpoint(path: Path, encodings, mnist=None, fold_bn: bool = True, float_dtype: str = "fp32") -> dict:
    """Write the deployment files of one checkpoint and return its summary ("layers" only if it was packed)."""
    ckpt = load_checkpoint(path)
    export = ckpt["export"]
    summary = {"checkpoint": str(path), "mode": ckpt["mode"], "checkpoint_bytes": path.stat().st_size,
               "fp32_state_dict_bytes": state_dict_bytes(export)}
    if not export["ternary"]:
        summary["note"] = (f"{path}: not packed ({ckpt['mode']} checkpoint has no ternary layer; "
                           f"{summary['checkpoint_bytes']:,} B on disk)")
        return summary
    summary.update(fold_bn=fold_bn, float_dtype=float_dtype)
    if mnist is not None:
        reference = predict(rebuild_model(export), mnist.test_x)
        summary["test_acc_checkpoint"] = accuracy(reference, mnist.test_y)
    for encoding in encodings:
        out = path.with_name(f"{path.stem}.{encoding}.tern")
        atomic_write_bytes(out, pack(export, encoding, fold_bn=summary["fold_bn"], float_dtype=summary["float_dtype"],
                                     metadata={"checkpoint": path.name, "mode": ckpt["mode"], "seed": ckpt.get("seed")}))
        summary[f"file_{encoding}"] = str(out)
        summary[f"file_bytes_{encoding}"] = out.stat().st_size
        if mnist is not None:
            preds = predict(load_inference(out), mnist.test_x)
            summary[f"test_acc_{encoding}"] = accuracy(preds, mnist.test_y)
            summary[f"mismatches_{encoding}"] = int((preds != reference).sum())
    summary["layers"] = size_report(export)
    return summary


def write_results(results_dir: Path, summaries: list[dict], not_packed: list[dict], command: str) -> None:
    """deployment.json (nested) and deployment.csv (one row per layer and total, checkpoint columns repeated)."""
    atomic_write_json(results_dir / "deployment.json", {"command": command, "checkpoints": summaries,
                                                        "not_packed": not_packed})
    rows = [{**{k: v for k, v in s.items() if k != "layers"}, **layer} for s in summaries for layer in s["layers"]]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(results_dir / "deployment.csv", buffer.getvalue())
