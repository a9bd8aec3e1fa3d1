"""Pack checkpoints into deployment files (quant/deploy_format.py) and ONNX (quant/onnx_export.py), verify them
against the checkpoint and tabulate their sizes: `pack_and_verify`, behind deployment_compression.py and
reproduce.py."""
import io
from functools import partial
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .data import MEAN, STD
from .deploy_format import code_patches, deployed_layers, forward, load_inference, pack, unpack
from .errors import QuantError
from .export import rebuild_model
from .files import atomic_write_bytes, atomic_write_csv, atomic_write_json
from .packing import ENCODINGS, entropy_bits, get_codec


class PackError(QuantError, RuntimeError):
    """A packed file's (or the ONNX model's) test predictions differ from its checkpoint's."""
    exit_code = 1


def predict(net, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def pixels_of(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels of MNIST images normalised by quant/data.py, recovered exactly (checked) for the ONNX input."""
    pixels = torch.round((x.double() * STD + MEAN) * 255).clamp(0, 255).to(torch.uint8)
    if not torch.equal(pixels.float().div_(255).sub_(MEAN).div_(STD), x):
        raise QuantError("test images are not normalised MNIST pixels; cannot recover the raw input for ONNX")
    return pixels


def size_report(export: dict, fold_bn: bool = True) -> list[dict]:
    """Per weight layer plus a "total" row: weights, their bytes as FP32 and in every encoding (code blocks only,
    as stored: BN folding negates some channels' codes; a layer kept FP counts 4 B/weight everywhere), the order-0
    bound order0_bytes = n H / 8 (packing.entropy_bits) and gap_entropy = bytes_entropy - order0_bytes."""
    stored, network = deployed_layers(export, fold_bn)
    weights = {**stored["float"], **{f"{layer}.weight": e["codes"] for layer, e in stored["ternary"].items()}}
    rows = []
    for name, patch in code_patches(network, lambda name: list(weights[name].shape)).items():
        w, ternary = weights[name], name not in stored["float"]
        n, h = w.numel(), entropy_bits(w) if ternary else None
        rows.append({"layer": name.removesuffix(".weight"), "ternary": ternary, "weights": n, "fp32_bytes": 4 * n,
                     **{f"bytes_{e}": len(get_codec(e).encode(w, patch)) if ternary else 4 * n for e in ENCODINGS},
                     "zero_fraction": (w == 0).sum().item() / n, "order0_bits": h,
                     "order0_bytes": n * h / 8 if ternary else 4 * n})
    total = {"layer": "total", "ternary": all(r["ternary"] for r in rows)}
    for key in ("weights", "fp32_bytes", *(f"bytes_{e}" for e in ENCODINGS), "order0_bytes"):
        total[key] = sum(r[key] for r in rows)
    total["zero_fraction"] = sum(r["zero_fraction"] * r["weights"] for r in rows) / total["weights"]
    total["order0_bits"] = 8 * total["order0_bytes"] / total["weights"]
    for r in (*rows, total):
        for e in ENCODINGS:
            r[f"bits_per_weight_{e}"] = 8 * r[f"bytes_{e}"] / r["weights"]
            r[f"compression_{e}"] = r["fp32_bytes"] / r[f"bytes_{e}"]
        r["gap_entropy"] = r["bytes_entropy"] - r["order0_bytes"]
    return [*rows, total]


def pack_checkpoint(path: Path, encodings=tuple(ENCODINGS), mnist=None, fold_bn: bool = True,
                    float_dtype: str = "fp32", onnx: bool = False, reference: torch.Tensor | None = None,
                    ckpt: dict | None = None) -> dict:
    """Write the deployment files (and, with onnx, <stem>.onnx) of one checkpoint and return its summary. With
    `mnist`, every file is loaded back alone and its test predictions compared with the checkpoint's ternary
    model (mismatches_<format>): `reference`, where the caller has those predictions already (on the CPU, as
    `predict` makes them), else computed here. `ckpt` is the checkpoint at `path` where the caller has loaded it
    already. "layers" is present only if it was packed."""
    ckpt = ckpt or load_checkpoint(path)
    export, model, buffer = ckpt["export"], rebuild_model(ckpt["export"]), io.BytesIO()
    torch.save(model.state_dict(), buffer)  # what shipping the model unpacked would cost
    summary = {"checkpoint": str(path), "mode": ckpt["mode"], "checkpoint_bytes": path.stat().st_size,
               "fp32_state_dict_bytes": buffer.getbuffer().nbytes}
    if not export["ternary"]:
        summary["note"] = (f"{path}: not packed ({ckpt['mode']} checkpoint has no ternary layer; "
                           f"{summary['checkpoint_bytes']:,} B on disk)")
        return summary
    summary.update(fold_bn=fold_bn, float_dtype=float_dtype)
    if mnist is not None:
        reference = predict(model, mnist.test_x) if reference is None else reference
        summary["test_acc_checkpoint"] = 100.0 * (reference == mnist.test_y).sum().item() / len(mnist.test_y)
    metadata = {"checkpoint": path.name, "mode": ckpt["mode"], "seed": ckpt.get("seed")}

    ran = []  # (network, weights, test predictions) of each distinct decoded .tern file

    def predictions(net, x):
        # The encodings differ only in how the codes are stored: files that decode to the same ops and bitwise the
        # same tensors (dtype and strides too) predict alike, so each distinct decoded network runs once.
        if getattr(net, "func", None) is not forward:
            return predict(net, x)
        ops, weights, _ = net.args
        for other_ops, other, preds in ran:
            if ops == other_ops and weights.keys() == other.keys() and all(
                    (w.dtype, w.stride()) == (other[k].dtype, other[k].stride()) and torch.equal(w, other[k])
                    for k, w in weights.items()):
                return preds
        ran.append((ops, weights, predict(net, x)))
        return ran[-1][2]

    def write(fmt: str, suffix: str, data: bytes, load, x):
        out = path.with_name(f"{path.stem}{suffix}")
        atomic_write_bytes(out, data)
        summary[f"file_{fmt}"], summary[f"file_bytes_{fmt}"] = str(out), out.stat().st_size
        if mnist is not None:
            preds = predictions(load(out), x(mnist.test_x))
            summary[f"test_acc_{fmt}"] = 100.0 * (preds == mnist.test_y).sum().item() / len(mnist.test_y)
            summary[f"mismatches_{fmt}"] = int((preds != reference).sum())

    data = None
    for encoding in encodings:
        data = pack(export, encoding, fold_bn=fold_bn, float_dtype=float_dtype, metadata=metadata)
        write(encoding, f".{encoding}.tern", data, load_inference, lambda x: x)
    if onnx:
        from .onnx_export import load_onnx, to_onnx  # onnx and onnxruntime only when asked for

        graph = to_onnx(*unpack(data or pack(export, "2bit", fold_bn=fold_bn, float_dtype=float_dtype)))
        write("onnx", ".onnx", graph, load_onnx, pixels_of)
    summary["layers"] = size_report(export, fold_bn)
    return summary


def pack_and_verify(paths, encodings=tuple(ENCODINGS), mnist=None, onnx: bool = False, fold_bn: bool = True,
                    float_dtype: str = "fp32", results_dir: Path | None = None, command: str = "",
                    show=lambda summary: None, map_fn=map, done: dict | None = None) -> dict:
    """Pack every checkpoint in `paths`, verify (with `mnist`), write deployment.json (nested) and deployment.csv
    (a row per layer and total, checkpoint columns repeated) into results_dir. `map_fn` runs pack_checkpoint over
    the paths (a process pool's map packs them side by side), except those in `done` ({path: summary} of
    checkpoints the caller packed already, with the same options); `show(summary)` is called once per packed one.
    Returns {"checkpoints": packed, "not_packed": checkpoints without ternary layers}; then raises PackError if
    any verified file's predictions differ from its checkpoint's."""
    job = partial(pack_checkpoint, encodings=encodings, mnist=mnist, fold_bn=fold_bn, float_dtype=float_dtype,
                  onnx=onnx)
    paths, done = [Path(p) for p in paths], {Path(p): s for p, s in (done or {}).items()}
    todo = [p for p in paths if p not in done]
    fresh = dict(zip(todo, map_fn(job, todo)))
    summaries = [done[p] if p in done else fresh[p] for p in paths]
    packed, not_packed = [s for s in summaries if "layers" in s], [s for s in summaries if "layers" not in s]
    for s in packed:
        show(s)
    if results_dir is not None and packed:
        results_dir = Path(results_dir)
        atomic_write_json(results_dir / "deployment.json", {"command": command, "checkpoints": packed,
                                                            "not_packed": not_packed})
        rows = [{**{k: v for k, v in s.items() if k != "layers"}, **layer} for s in packed for layer in s["layers"]]
        atomic_write_csv(results_dir / "deployment.csv", rows, list(dict.fromkeys(k for row in rows for k in row)))
    differ = [f"{s['checkpoint']} {key.removeprefix('mismatches_')}" for s in packed for key in s
              if key.startswith("mismatches_") and s[key]]
    if differ:
        raise PackError(f"packed predictions differ from the checkpoint's for {', '.join(differ)}")
    return {"checkpoints": packed, "not_packed": not_packed}
