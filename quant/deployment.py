"""Pack checkpoints into deployment files (and ONNX), verify them against the checkpoint, tabulate their sizes.

`pack_and_verify` is the one pipeline behind deployment_compression.py and reproduce.py. The file format is
docs/deployment_format.md (quant/deploy_format.py, codecs in quant/packing.py); the ONNX graph is built by
quant/onnx_export.py.
"""
import csv
import io
from functools import partial
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .data import MEAN, STD
from .deploy_format import INPUT_SHAPE, code_patches, deployed_layers, load_inference, pack, unpack
from .errors import QuantError
from .export import rebuild_model
from .files import atomic_write_bytes, atomic_write_json, atomic_write_text
from .packing import ENCODINGS, code_mix, entropy_bits, get_codec


class PackError(QuantError, RuntimeError):
    """A packed file's (or the ONNX model's) test predictions differ from its checkpoint's."""
    exit_code = 1


def predict(net, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (preds == labels).sum().item() / len(labels)


def pixels_of(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels of MNIST images normalised by quant/data.py, recovered exactly (checked) for the ONNX input."""
    pixels = torch.round((x.double() * STD + MEAN) * 255).clamp(0, 255).to(torch.uint8)
    if not torch.equal(pixels.float().div_(255).sub_(MEAN).div_(STD), x):
        raise QuantError("test images are not normalised MNIST pixels; cannot recover the raw input for ONNX")
    return pixels


def state_dict_bytes(export: dict) -> int:
    """Size of torch.save(state_dict) of the same model in FP32: what shipping it unpacked would cost."""
    buffer = io.BytesIO()
    torch.save(rebuild_model(export).state_dict(), buffer)
    return buffer.getbuffer().nbytes


def size_report(export: dict, fold_bn: bool = True) -> list[dict]:
    """Per weight layer plus a "total" row: weights and their bytes as FP32 and in every encoding, the order-0
    entropy bound, and how far the entropy code lands from it.

    Measured on the codes as stored (BN folding negates the codes of channels with gamma < 0). Counts code
    blocks only (scales, biases and the file header are in the file size, not here); bytes_entropy is the
    real block length (tables, row classes and lane states included). A layer kept FP counts 4 bytes/weight
    in every column. order0_bytes = n * H / 8, H from packing.entropy_bits; gap_entropy = bytes_entropy -
    order0_bytes (negative: the context model beats the order-0 bound).
    """
    stored, network = deployed_layers(export, fold_bn)
    shape_of = lambda name: list(stored["float"][name].shape if name in stored["float"]
                                 else stored["ternary"][name.removesuffix(".weight")]["codes"].shape)
    patches = code_patches(network, INPUT_SHAPE, shape_of)
    rows = []
    for name, patch in patches.items():
        layer = name.removesuffix(".weight")
        if layer in stored["ternary"]:
            codes = stored["ternary"][layer]["codes"]
            n, h = codes.numel(), entropy_bits(codes)
            row = {"layer": layer, "ternary": True, "weights": n, "fp32_bytes": 4 * n,
                   **{f"bytes_{e}": len(get_codec(e).encode(codes, patch)) for e in ENCODINGS},
                   "zero_fraction": code_mix(codes)["0"], "order0_bits": h, "order0_bytes": n * h / 8}
        else:
            weight = stored["float"][name]
            n = weight.numel()
            row = {"layer": layer, "ternary": False, "weights": n, "fp32_bytes": 4 * n,
                   **{f"bytes_{e}": 4 * n for e in ENCODINGS},
                   "zero_fraction": (weight == 0).sum().item() / n, "order0_bits": None, "order0_bytes": 4 * n}
        rows.append(row)
    total = {"layer": "total", "ternary": all(r["ternary"] for r in rows)}
    for key in ("weights", "fp32_bytes", *(f"bytes_{e}" for e in ENCODINGS), "order0_bytes"):
        total[key] = sum(r[key] for r in rows)
    total["zero_fraction"] = sum(r["zero_fraction"] * r["weights"] for r in rows) / total["weights"]
    total["order0_bits"] = 8 * total["order0_bytes"] / total["weights"]
    rows.append(total)
    for r in rows:
        for e in ENCODINGS:
            r[f"bits_per_weight_{e}"] = 8 * r[f"bytes_{e}"] / r["weights"]
            r[f"compression_{e}"] = r["fp32_bytes"] / r[f"bytes_{e}"]
        r["gap_entropy"] = r["bytes_entropy"] - r["order0_bytes"]
    return rows


def pack_checkpoint(path: Path, encodings=tuple(ENCODINGS), mnist=None, fold_bn: bool = True,
                    float_dtype: str = "fp32", onnx: bool = False) -> dict:
    """Write the deployment files (and, with onnx, <stem>.onnx) of one checkpoint and return its summary.

    With `mnist`, every file is loaded back alone and its test predictions compared with the checkpoint's
    ternary model (mismatches_<encoding>, mismatches_onnx). "layers" is present only if it was packed.
    """
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
    metadata = {"checkpoint": path.name, "mode": ckpt["mode"], "seed": ckpt.get("seed")}
    data = None
    for encoding in encodings:
        out = path.with_name(f"{path.stem}.{encoding}.tern")
        data = pack(export, encoding, fold_bn=fold_bn, float_dtype=float_dtype, metadata=metadata)
        atomic_write_bytes(out, data)
        summary[f"file_{encoding}"] = str(out)
        summary[f"file_bytes_{encoding}"] = out.stat().st_size
        if mnist is not None:
            preds = predict(load_inference(out), mnist.test_x)
            summary[f"test_acc_{encoding}"] = accuracy(preds, mnist.test_y)
            summary[f"mismatches_{encoding}"] = int((preds != reference).sum())
    if onnx:
        from .onnx_export import load_onnx, to_onnx  # onnx and onnxruntime only when asked for

        model = to_onnx(*unpack(data or pack(export, "2bit", fold_bn=fold_bn, float_dtype=float_dtype)))
        out = path.with_name(f"{path.stem}.onnx")
        atomic_write_bytes(out, model)
        summary["file_onnx"], summary["file_bytes_onnx"] = str(out), out.stat().st_size
        if mnist is not None:
            preds = predict(load_onnx(out), pixels_of(mnist.test_x))
            summary["test_acc_onnx"] = accuracy(preds, mnist.test_y)
            summary["mismatches_onnx"] = int((preds != reference).sum())
    summary["layers"] = size_report(export, fold_bn)
    return summary


def differing(summaries: list[dict]) -> list[str]:
    """"<checkpoint> <format>" for every verified file whose predictions differ from its checkpoint's."""
    return [f"{s['checkpoint']} {key.removeprefix('mismatches_')}" for s in summaries for key in s
            if key.startswith("mismatches_") and s[key]]


def pack_and_verify(paths, encodings=tuple(ENCODINGS), mnist=None, onnx: bool = False, fold_bn: bool = True,
                    float_dtype: str = "fp32", results_dir: Path | None = None, command: str = "",
                    show=lambda summary: None, map_fn=map) -> dict:
    """Pack every checkpoint in `paths`, verify (with `mnist`), write deployment.csv/.json into results_dir.

    `map_fn` runs pack_checkpoint over the paths (a process pool's map packs them side by side).
    `show(summary)` is called once per packed checkpoint, before any PackError, so a caller can print it.
    Returns {"checkpoints": packed summaries, "not_packed": summaries of checkpoints without ternary layers};
    raises PackError if any verified file's predictions differ from its checkpoint's.
    """
    pack = partial(pack_checkpoint, encodings=encodings, mnist=mnist, fold_bn=fold_bn, float_dtype=float_dtype, onnx=onnx)
    summaries = list(map_fn(pack, [Path(p) for p in paths]))
    packed, not_packed = [s for s in summaries if "layers" in s], [s for s in summaries if "layers" not in s]
    for s in packed:
        show(s)
    if results_dir is not None and packed:
        write_results(Path(results_dir), packed, not_packed, command)
    differ = differing(packed)
    if differ:
        raise PackError(f"packed predictions differ from the checkpoint's for {', '.join(differ)}")
    return {"checkpoints": packed, "not_packed": not_packed}


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
