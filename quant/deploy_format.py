"""The deployment file: one self-contained, checksummed binary holding a ternary LeNet-5 ready to run.

Layout (integers little-endian):

    offset      size  field
    0           8     magic b"TERNLNT\\0"
    8           2     uint16 format version (VERSION = 1)
    10          4     uint32 manifest length M
    14          M     manifest, compact UTF-8 JSON, zlib-compressed (RFC 1950; ~1.8 KB -> ~0.6 KB)
    14 + M      P     payload, P = manifest["payload_bytes"]
    14 + M + P  32    SHA-256 of bytes [0, 14 + M + P)

`unpack` checks magic, version, digest and exact length, then that the manifest's blocks tile the payload
with lengths matching their shapes, that the network refers only to stored tensors, and that the codes
decode; any failure raises DeployFormatError (a ValueError), so a damaged file is never mis-decoded.

Manifest keys:
    encoding       "2bit" | "base3"   code maps and bit order in quant/packing.py
    bn_folded      bool               True: BatchNorm is folded into the preceding layer (no batch_norm ops)
    input_shape    [1, 28, 28]
    payload_bytes  P
    ternary        [{name, shape, offset, length, w_p, w_n}]  a packed code block; w_p / w_n name fp32 float
                   blocks of 1 or shape[0] values; weight = w_p * [T = +1] - w_n * [T = -1] (TTQ Eq. 6)
    float          [{name, shape, dtype "fp32" | "fp16", offset, length}]  scales, biases, BN, FP-kept weights
    network        ordered ops, e.g. {"op": "conv2d", "weight": "conv1.weight", "bias": "conv1.bias"}, {"op": "relu"}
    metadata       free-form provenance (checkpoint, mode, ...)

Scales are always stored fp32 (a few hundred bytes; they multiply every weight); `float_dtype` applies to
the rest. BatchNorm's num_batches_tracked is not stored (eval-mode BN never reads it).

BN folding (eval-mode BN uses running statistics; eps = 1e-5, PyTorch's default):
    BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta = s * y + t,   s = gamma / sqrt(var + eps),  t = beta - s * mean
so for y = W * x + b:  BN(y) = (s W) * x + s (b - mean) + beta, per output channel. A ternary W keeps its codes:
w_p' = s w_p, w_n' = s w_n. Where gamma < 0 makes s < 0, that channel's codes are negated and its levels
swapped, w_p' = |s| w_n, w_n' = |s| w_p, which is the same weight (s W = |s| (w_n [-T = +1] - w_p [-T = -1]))
and keeps w_p, w_n the magnitudes they are in the export. Negation is exact in floating point, so the folded
weight equals round(s * W) element for element. An FP-kept conv folds into its weight: W' = s W.

The loader (`unpack`, `load_inference`) uses only this file, torch and numpy: it imports no model code.
"""
import functools
import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .packing import PackingError, entropy_bits, get_codec, nbytes_2bit, nbytes_base3

MAGIC = b"TERNLNT\0"
VERSION = 1
_HEADER = struct.Struct("<8sHI")  # magic, version, manifest length
_DIGEST_BYTES = 32  # SHA-256
FLOAT_DTYPES = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2")}
BN_EPS = 1e-5
INPUT_SHAPE = [1, 28, 28]

# LeNet5.forward (quant/model.py) written as data; tests check it computes the same logits as the model.
LENET5_NETWORK = (
    {"op": "conv2d", "weight": "conv1.weight", "bias": "conv1.bias"},
    {"op": "batch_norm", "weight": "bn1.weight", "bias": "bn1.bias", "running_mean": "bn1.running_mean",
     "running_var": "bn1.running_var", "eps": BN_EPS},
    {"op": "relu"},
    {"op": "max_pool2d", "kernel_size": 2},
    {"op": "conv2d", "weight": "conv2.weight", "bias": "conv2.bias"},
    {"op": "batch_norm", "weight": "bn2.weight", "bias": "bn2.bias", "running_mean": "bn2.running_mean",
     "running_var": "bn2.running_var", "eps": BN_EPS},
    {"op": "relu"},
    {"op": "max_pool2d", "kernel_size": 2},
    {"op": "flatten"},
    {"op": "linear", "weight": "fc1.weight", "bias": "fc1.bias"},
    {"op": "relu"},
    {"op": "linear", "weight": "fc2.weight", "bias": "fc2.bias"},
)
# tensor fields and scalar parameters of each op (a None bias is allowed for conv2d / linear)
_OP_TENSORS = {"conv2d": ("weight", "bias"), "linear": ("weight", "bias"),
               "batch_norm": ("weight", "bias", "running_mean", "running_var"),
               "relu": (), "max_pool2d": (), "flatten": ()}


class DeployFormatError(ValueError):
    """A deployment file (or an export about to become one) is malformed, corrupt or unsupported."""


# ---------------------------------------------------------------- BN folding (pure functions)

def bn_affine(gamma, beta, mean, var, eps: float = BN_EPS):
    """Eval-mode BN as y -> s * y + t: s = gamma / sqrt(var + eps), t = beta - s * mean (float64)."""
    s = gamma.double() / torch.sqrt(var.double() + eps)
    return s, beta.double() - s * mean.double()


def fold_ternary(codes: torch.Tensor, w_p: torch.Tensor, w_n: torch.Tensor, s: torch.Tensor):
    """Codes and per-channel levels of s * W, W = w_p [T = +1] - w_n [T = -1], s one value per output channel.

    s >= 0: w_p' = s w_p, w_n' = s w_n.  s < 0: T' = -T, w_p' = |s| w_n, w_n' = |s| w_p.
    """
    w_p, w_n = (v.double().reshape(-1).expand(s.numel()) for v in (w_p, w_n))
    neg, mag = s < 0, s.abs()
    sign = torch.where(neg, -1, 1).to(torch.int8).reshape(-1, *[1] * (codes.ndim - 1))
    return codes * sign, torch.where(neg, mag * w_n, mag * w_p).float(), torch.where(neg, mag * w_p, mag * w_n).float()


def fold_batch_norm(export: dict, network) -> tuple[dict, list]:
    """Fold every batch_norm op that directly follows a conv2d / linear op into that layer.

    Returns a new export-like dict (BN tensors removed, ternary scales per channel, biases folded) and the
    network without those batch_norm ops. The input export is not modified.
    """
    ternary, floats, ops = dict(export["ternary"]), dict(export["float"]), []
    for op in network:
        if not (op["op"] == "batch_norm" and ops and ops[-1]["op"] in ("conv2d", "linear")):
            ops.append(dict(op))
            continue
        layer_op = ops[-1]
        gamma, beta, mean, var = (floats.pop(op[k]) for k in _OP_TENSORS["batch_norm"])
        s, t = bn_affine(gamma, beta, mean, var, op["eps"])
        layer = _layer_of(layer_op["weight"])
        if layer in ternary:
            entry = ternary[layer]
            codes, w_p, w_n = fold_ternary(entry["codes"], entry["w_p"], entry["w_n"], s)
            ternary[layer] = {**entry, "codes": codes, "w_p": w_p, "w_n": w_n}
        else:
            w = floats[layer_op["weight"]]
            floats[layer_op["weight"]] = (s.reshape(-1, *[1] * (w.ndim - 1)) * w.double()).float()
        layer_op["bias"] = layer_op.get("bias") or f"{layer}.bias"  # a bias-free layer gains one
        b = floats[layer_op["bias"]].double() if layer_op["bias"] in floats else torch.zeros_like(s)
        floats[layer_op["bias"]] = (s * b + t).float()
    return {"ternary": ternary, "float": floats}, ops


def _layer_of(weight_name: str) -> str:
    """Export layer name of a weight tensor ("conv1.weight" -> "conv1"), as quant/export.py keys them."""
    return weight_name.removesuffix(".weight")


def _weight_layers(network) -> dict:
    """{weight tensor name: export layer name} of the conv2d / linear ops, the layers that may be ternary."""
    return {op["weight"]: _layer_of(op["weight"]) for op in network if op["op"] in ("conv2d", "linear")}


def _tensor_names(network) -> list[str]:
    """Every tensor the network reads, in forward order, without repeats."""
    names = [op[k] for op in network for k in _OP_TENSORS[op["op"]] if op.get(k) is not None]
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------- writing

def pack(export: dict, encoding: str = "2bit", fold_bn: bool = True, float_dtype: str = "fp32",
         metadata: dict | None = None) -> bytes:
    """Serialise an export (quant/export.py) as a deployment file (layout in the module docstring)."""
    try:
        codec = get_codec(encoding)
    except PackingError as e:
        raise DeployFormatError(str(e)) from None
    if float_dtype not in FLOAT_DTYPES:
        raise DeployFormatError(f"unknown float dtype {float_dtype!r}; valid: {', '.join(FLOAT_DTYPES)}")
    network = [dict(op) for op in LENET5_NETWORK]
    weight_layers = _weight_layers(network)
    is_ternary = lambda name: weight_layers.get(name) in export["ternary"]
    missing = [name for name in _tensor_names(network) if name not in export["float"] and not is_ternary(name)]
    if missing:
        raise DeployFormatError(f"cannot pack: the export lacks {', '.join(missing)}")
    for layer, entry in export["ternary"].items():
        groups, out_channels = entry["w_p"].numel(), entry["codes"].shape[0]
        if groups not in (1, out_channels) or entry["w_n"].numel() != groups:
            raise DeployFormatError(f"cannot pack {layer}: {groups} / {entry['w_n'].numel()} scales "
                                    f"for {out_channels} output channels")
    unused = set(export["ternary"]) - set(weight_layers.values())
    if unused:
        raise DeployFormatError(f"cannot pack: ternary layers {sorted(unused)} are not in the LeNet-5 network")
    if fold_bn:
        export, network = fold_batch_norm(export, network)
    ternary, floats, blocks = [], [], []
    offset = 0

    def add(records: list, record: dict, block: bytes):
        nonlocal offset
        records.append({**record, "offset": offset, "length": len(block)})
        blocks.append(block)
        offset += len(block)

    def add_float(name: str, tensor: torch.Tensor, dtype: str):
        with np.errstate(over="ignore"):  # overflow to inf is reported just below
            array = tensor.detach().cpu().numpy().astype(FLOAT_DTYPES[dtype])
        if not np.isfinite(array).all():
            raise DeployFormatError(f"cannot pack {name}: non-finite values as {dtype}")
        add(floats, {"name": name, "shape": list(array.shape), "dtype": dtype}, array.tobytes())

    for name in _tensor_names(network):
        if is_ternary(name):
            layer = weight_layers[name]
            entry = export["ternary"][layer]
            codes = entry["codes"]
            try:
                block = codec.encode(codes)
            except PackingError as e:
                raise DeployFormatError(f"cannot pack {layer}: {e}") from None
            add(ternary, {"name": name, "shape": list(codes.shape), "w_p": f"{layer}.w_p", "w_n": f"{layer}.w_n"}, block)
            add_float(f"{layer}.w_p", entry["w_p"].reshape(-1), "fp32")
            add_float(f"{layer}.w_n", entry["w_n"].reshape(-1), "fp32")
        else:
            add_float(name, export["float"][name], float_dtype)
    manifest = {"encoding": encoding, "bn_folded": bool(fold_bn), "input_shape": INPUT_SHAPE,
                "payload_bytes": offset, "ternary": ternary, "float": floats, "network": network,
                "metadata": metadata or {}}
    return seal(manifest, b"".join(blocks))


def seal(manifest: dict, payload: bytes) -> bytes:
    """Header + manifest + payload + SHA-256 trailer."""
    body = zlib.compress(json.dumps(manifest, separators=(",", ":"), allow_nan=False, default=str).encode("utf-8"), 9)
    data = _HEADER.pack(MAGIC, VERSION, len(body)) + body + payload
    return data + hashlib.sha256(data).digest()


# ---------------------------------------------------------------- reading

def unpack(data: bytes) -> tuple[dict, dict]:
    """Verify and decode a deployment file: (manifest, {name: tensor}).

    Codes come back as int8 tensors of their layer's shape, floats in their stored dtype (fp32 or fp16).
    """
    data = bytes(data)
    if len(data) < _HEADER.size + _DIGEST_BYTES:
        raise DeployFormatError(f"{len(data)} bytes is too short for a ternary deployment file")
    magic, version, manifest_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DeployFormatError(f"bad magic {magic!r} (expected {MAGIC!r}): not a ternary deployment file")
    if version > VERSION:
        raise DeployFormatError(f"format version {version} is newer than this reader (version {VERSION}); "
                                "update the code to read it")
    if version != VERSION:
        raise DeployFormatError(f"unsupported format version {version} (this reader handles {VERSION})")
    if hashlib.sha256(data[:-_DIGEST_BYTES]).digest() != data[-_DIGEST_BYTES:]:
        raise DeployFormatError(f"SHA-256 mismatch over {len(data)} bytes: the file is corrupt, truncated or extended")
    start = _HEADER.size + manifest_len
    if start > len(data) - _DIGEST_BYTES:
        raise DeployFormatError(f"manifest length {manifest_len} runs past the end of the file")
    try:
        manifest = json.loads(zlib.decompress(data[_HEADER.size:start]).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeployFormatError(f"manifest is not zlib-compressed UTF-8 JSON ({e})") from None
    payload = data[start:-_DIGEST_BYTES]
    _check_manifest(manifest, len(payload))
    codec = get_codec(manifest["encoding"])
    tensors = {}
    for rec in manifest["ternary"]:
        block = payload[rec["offset"]:rec["offset"] + rec["length"]]
        try:
            codes = codec.decode(block, _numel(rec["shape"]))
        except PackingError as e:
            raise DeployFormatError(f"{rec['name']}: {e}") from None
        tensors[rec["name"]] = torch.from_numpy(codes.copy()).reshape(rec["shape"])
    for rec in manifest["float"]:
        array = np.frombuffer(payload, FLOAT_DTYPES[rec["dtype"]], _numel(rec["shape"]), rec["offset"])
        if not np.isfinite(array).all():
            raise DeployFormatError(f"{rec['name']}: non-finite values")
        tensors[rec["name"]] = torch.from_numpy(array.copy()).reshape(rec["shape"])
    return manifest, tensors


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _is_int(value, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum


def _lookup(table: dict, key):
    """table[key] if key is a string present in table, else None (manifest values may be any JSON)."""
    return table.get(key) if isinstance(key, str) else None


def _check_manifest(manifest, payload_len: int) -> None:
    """Raise DeployFormatError unless the manifest describes exactly this payload and a runnable network."""
    def fail(message):
        raise DeployFormatError(f"bad manifest: {message}")

    if not isinstance(manifest, dict):
        fail("not a JSON object")
    for key, kind in (("encoding", str), ("bn_folded", bool), ("input_shape", list), ("ternary", list),
                      ("float", list), ("network", list)):
        if not isinstance(manifest.get(key), kind):
            fail(f"missing or mistyped {key!r}")
    if not _is_int(manifest.get("payload_bytes")):
        fail("missing or mistyped 'payload_bytes'")
    if manifest["encoding"] not in ("2bit", "base3"):
        fail(f"unknown encoding {manifest['encoding']!r}")
    if manifest["payload_bytes"] != payload_len:
        fail(f"payload_bytes {manifest['payload_bytes']} but the file holds {payload_len} payload bytes")
    if not (len(manifest["input_shape"]) == 3 and all(_is_int(d, 1) for d in manifest["input_shape"])):
        fail(f"input_shape {manifest['input_shape']} is not [C, H, W]")
    codec = get_codec(manifest["encoding"])
    records = {}
    for kind in ("ternary", "float"):
        for rec in manifest[kind]:
            if not (isinstance(rec, dict) and isinstance(rec.get("name"), str) and isinstance(rec.get("shape"), list)
                    and rec["shape"] and all(_is_int(d, 1) for d in rec["shape"])
                    and _is_int(rec.get("offset")) and _is_int(rec.get("length"))):
                fail(f"malformed {kind} record {rec!r:.200}")
            if rec["name"] in records:
                fail(f"tensor {rec['name']!r} stored twice")
            if kind == "float" and _lookup(FLOAT_DTYPES, rec.get("dtype")) is None:
                fail(f"{rec['name']}: unknown dtype {rec.get('dtype')!r}")
            n = _numel(rec["shape"])
            expected = codec.nbytes(n) if kind == "ternary" else n * FLOAT_DTYPES[rec["dtype"]].itemsize
            if rec["length"] != expected:
                fail(f"{rec['name']}: length {rec['length']} but shape {rec['shape']} needs {expected} bytes")
            records[rec["name"]] = (kind, rec)
    end = 0
    for _, rec in sorted(records.values(), key=lambda kr: kr[1]["offset"]):
        if rec["offset"] != end:
            fail(f"{rec['name']}: offset {rec['offset']}, expected {end} (blocks must tile the payload)")
        end += rec["length"]
    if end != payload_len:
        fail(f"blocks cover {end} of {payload_len} payload bytes")
    for rec in manifest["ternary"]:
        for key in ("w_p", "w_n"):
            kind, scale = _lookup(records, rec.get(key)) or (None, None)
            if kind != "float" or _numel(scale["shape"]) not in (1, rec["shape"][0]):
                fail(f"{rec['name']}: {key} must name a float block of 1 or {rec['shape'][0]} values")
    for op in manifest["network"]:
        if not (isinstance(op, dict) and _lookup(_OP_TENSORS, op.get("op")) is not None):
            fail(f"unknown op {op!r:.200}; valid: {', '.join(_OP_TENSORS)}")
        for key in _OP_TENSORS[op["op"]]:
            if not (key == "bias" and op.get(key) is None) and _lookup(records, op.get(key)) is None:
                fail(f"op {op['op']} refers to missing tensor {op.get(key)!r}")
        if op["op"] == "batch_norm" and not (isinstance(op.get("eps"), float) and op["eps"] > 0):
            fail(f"batch_norm eps {op.get('eps')!r} is not a positive float")
        if op["op"] == "max_pool2d" and not _is_int(op.get("kernel_size"), 1):
            fail(f"max_pool2d kernel_size {op.get('kernel_size')!r} is not a positive int")


# ---------------------------------------------------------------- inference

def dequantize(codes: torch.Tensor, w_p: torch.Tensor, w_n: torch.Tensor) -> torch.Tensor:
    """W = w_p * [T = +1] - w_n * [T = -1], scales per output channel (as quant.export.dequantize)."""
    shape = (-1,) + (1,) * (codes.ndim - 1)
    return (codes > 0) * w_p.float().reshape(shape) - (codes < 0) * w_n.float().reshape(shape)


def dequantized_weights(manifest: dict, tensors: dict) -> dict:
    """Every tensor the network reads, as float32: ternary blocks dequantised, fp16 widened.

    4-D (conv) weights are laid out channels_last, as the training model keeps them: the CPU's oneDNN
    convolutions then pass channels_last activations through BN and pooling (packed-file inference: 6,201
    img/s in results/benchmarks.json at commit 19b4cfc, before this layout; 11,439 at commit 6078179).
    """
    weights = {name: t.float() for name, t in tensors.items() if t.is_floating_point()}
    for rec in manifest["ternary"]:
        weights[rec["name"]] = dequantize(tensors[rec["name"]], weights[rec["w_p"]], weights[rec["w_n"]])
    # empty_like + copy_ rather than .contiguous(): a conv weight with one input channel already counts as
    # channels_last-contiguous, and .contiguous() would keep its NCHW strides.
    return {name: torch.empty_like(w, memory_format=torch.channels_last).copy_(w) if w.ndim == 4 else w
            for name, w in weights.items()}


def _conv2d(x, op, w):
    return F.conv2d(x, w[op["weight"]], w.get(op.get("bias")))


def _linear(x, op, w):
    return F.linear(x, w[op["weight"]], w.get(op.get("bias")))


def _batch_norm(x, op, w):
    return F.batch_norm(x, w[op["running_mean"]], w[op["running_var"]], w[op["weight"]], w[op["bias"]],
                        training=False, eps=op["eps"])


OPS = {"conv2d": _conv2d, "linear": _linear, "batch_norm": _batch_norm,
       "relu": lambda x, op, w: F.relu(x), "max_pool2d": lambda x, op, w: F.max_pool2d(x, op["kernel_size"]),
       "flatten": lambda x, op, w: x.flatten(1)}


def forward(network: list, weights: dict, input_shape: tuple, x: torch.Tensor) -> torch.Tensor:
    """Run the manifest's ops in order on x [N, *input_shape] and return the logits."""
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"input of shape {list(x.shape)}, expected [N, {', '.join(map(str, input_shape))}]")
    with torch.inference_mode():
        x = x.float()
        for op in network:
            x = OPS[op["op"]](x, op, weights)
    return x


def load_inference(source) -> functools.partial:
    """A callable x [N, 1, 28, 28] (normalised) -> logits built from a deployment file (path or bytes) alone.

    The file is decoded and dequantised once here, so each call costs what the FP network costs.
    """
    data = Path(source).read_bytes() if isinstance(source, (str, os.PathLike)) else source
    manifest, tensors = unpack(data)
    net = functools.partial(forward, manifest["network"], dequantized_weights(manifest, tensors),
                            tuple(manifest["input_shape"]))
    try:  # a dry run turns shape mismatches between ops and tensors into a load error
        net(torch.zeros(1, *manifest["input_shape"]))
    except RuntimeError as e:
        raise DeployFormatError(f"network does not run on the stored tensors: {str(e).splitlines()[0]}") from None
    return net


# ---------------------------------------------------------------- sizes

def size_report(export: dict) -> list[dict]:
    """Per weight layer plus a "total" row: weights, bytes as FP32 / 2-bit / base-3 / entropy bound, ratios.

    Counts weights only (scales, biases, BN and the file header are in the file size, not here). A layer kept
    FP counts 4 bytes/weight in every column. entropy_bytes = n * H / 8 with H from packing.entropy_bits.
    """
    rows = []
    for name, layer in _weight_layers(LENET5_NETWORK).items():
        if layer in export["ternary"]:
            codes = export["ternary"][layer]["codes"]
            n, h = codes.numel(), entropy_bits(codes)
            row = {"layer": layer, "ternary": True, "weights": n, "fp32_bytes": 4 * n, "bytes_2bit": nbytes_2bit(n),
                   "bytes_base3": nbytes_base3(n), "zero_fraction": (codes == 0).sum().item() / n,
                   "entropy_bits": h, "entropy_bytes": n * h / 8}
        else:
            weight = export["float"][name]
            n = weight.numel()
            row = {"layer": layer, "ternary": False, "weights": n, "fp32_bytes": 4 * n, "bytes_2bit": 4 * n,
                   "bytes_base3": 4 * n, "zero_fraction": (weight == 0).sum().item() / n,
                   "entropy_bits": None, "entropy_bytes": 4 * n}
        rows.append(row)
    total = {"layer": "total", "ternary": all(r["ternary"] for r in rows)}
    for key in ("weights", "fp32_bytes", "bytes_2bit", "bytes_base3", "entropy_bytes"):
        total[key] = sum(r[key] for r in rows)
    total["zero_fraction"] = sum(r["zero_fraction"] * r["weights"] for r in rows) / total["weights"]
    total["entropy_bits"] = 8 * total["entropy_bytes"] / total["weights"]
    rows.append(total)
    for r in rows:
        for enc in ("2bit", "base3"):
            r[f"bits_per_weight_{enc}"] = 8 * r[f"bytes_{enc}"] / r["weights"]
            r[f"compression_{enc}"] = r["fp32_bytes"] / r[f"bytes_{enc}"]
        r["compression_entropy"] = r["fp32_bytes"] / r["entropy_bytes"] if r["entropy_bytes"] else None
    return rows
