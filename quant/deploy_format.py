"""The deployment file: one self-contained, checksummed binary holding a ternary LeNet-5 ready to run.

docs/deployment_format.md is the specification (every field, the code blocks bit by bit, the semantics of
each op, the reader's limits, a worked example); this module writes and reads it. The layout:

    offset      size  field
    0           8     magic b"TERNLNT\\0"
    8           2     uint16 format version (VERSION = 2), little-endian like every integer here
    10          4     uint32 M, the length of the *compressed* manifest
    14          M     manifest: UTF-8 JSON, zlib-compressed (RFC 1950)
    14 + M      P     payload, P = manifest["payload_bytes"]; block offsets count from its first byte
    14 + M + P  32    SHA-256 of bytes [0, 14 + M + P)

The manifest names the encoding of the ternary codes (quant/packing.py), the input normalisation, every
tensor block (name, C-order shape, offset, length; floats little-endian IEEE 754) and the network as a list
of ops. A ternary weight is w_p [T = +1] - w_n [T = -1] (TTQ, arXiv 1612.01064, Eq. 6); where w_p = w_n
(TWN, ADMM) both name one block.

BN folding (eval-mode BN uses running statistics; eps = 1e-5, PyTorch's default):
    BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta = s * y + t,   s = gamma / sqrt(var + eps),  t = beta - s * mean
so for y = W * x + b:  BN(y) = (s W) * x + s (b - mean) + beta, per output channel. A ternary W keeps its codes:
w_p' = s w_p, w_n' = s w_n. Where gamma < 0 makes s < 0, that channel's codes are negated and its levels
swapped, w_p' = |s| w_n, w_n' = |s| w_p, which is the same weight (s W = |s| (w_n [-T = +1] - w_p [-T = -1]))
and keeps w_p, w_n the magnitudes they are in the export. Negation is exact in floating point, so the folded
weight equals round(s * W) element for element. An FP-kept conv folds into its weight: W' = s W.

Reading trusts nothing: `unpack` bounds the file size, checks the magic and then the SHA-256 before it reads
any other field, then the version; it inflates at most MAX_MANIFEST_BYTES of manifest, rejects NaN and
infinities, checks every key and type, bounds every dimension and product in Python integers before any
allocation, and follows the network's shapes op by op down to [N, 10] logits. Any failure raises
DeployFormatError (a QuantError) with a one-line message. The loader (`unpack`, `load_inference`) uses only
this file, quant/packing.py, quant/errors.py, torch and numpy: it imports no model code.
"""
import functools
import hashlib
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import QuantError
from .packing import PackingError, get_codec

MAGIC = b"TERNLNT\0"
VERSION = 2
_HEADER = struct.Struct("<8sHI")  # magic, version, manifest length
_DIGEST_BYTES = 32  # SHA-256
FLOAT_DTYPES = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2")}
BN_EPS = 1e-5
INPUT_SHAPE = [1, 28, 28]
NUM_CLASSES = 10
# Reader limits (LeNet-5's file is ~0.1 MB, 0.58 M elements, 12 ops, a ~2 KB manifest).
MAX_FILE_BYTES = 1 << 24
MAX_MANIFEST_BYTES = 1 << 16  # inflated
MAX_DIM = 1 << 16  # any one dimension
MAX_ELEMENTS = 1 << 22  # one tensor, all stored tensors together, any activation
MAX_OPS = 64

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
# tensor fields and scalar parameters of each op (a null bias is allowed for conv2d / linear)
_OP_TENSORS = {"conv2d": ("weight", "bias"), "linear": ("weight", "bias"),
               "batch_norm": ("weight", "bias", "running_mean", "running_var"),
               "relu": (), "max_pool2d": (), "flatten": ()}
_OP_SCALARS = {"batch_norm": ("eps",), "max_pool2d": ("kernel_size",)}


class DeployFormatError(QuantError, ValueError):
    """A deployment file (or an export about to become one) is malformed, corrupt or unsupported.

    The message is one line whatever the file holds: runs of whitespace (newlines in a crafted name) collapse.
    """

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


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


def trace_shapes(network, input_shape, shape_of) -> list:
    """Shapes (without N) entering each op and leaving the last: [input, after op 0, ...].

    `shape_of(name)` gives a tensor's shape. Raises DeployFormatError at the first op whose tensors do not
    fit its input (stride 1 / no padding convs, pool stride = kernel, flatten of [C, H, W], x W^T + b). Only
    Python integers are involved, so no product can overflow.
    """
    shapes = [list(input_shape)]
    for i, op in enumerate(network):
        shape, kind = shapes[-1], op["op"]

        def fail(message):
            raise DeployFormatError(f"network op {i} ({kind}): {message}")

        def vector(key, length):
            if op.get(key) is not None and shape_of(op[key]) != [length]:
                fail(f"{key} {op[key]!r} has shape {shape_of(op[key])}, expected [{length}]")

        if kind == "conv2d":
            w = shape_of(op["weight"])
            if len(shape) != 3 or len(w) != 4 or w[1] != shape[0] or w[2] > shape[1] or w[3] > shape[2]:
                fail(f"weight {w} does not fit an input of shape {shape}")
            vector("bias", w[0])
            shape = [w[0], shape[1] - w[2] + 1, shape[2] - w[3] + 1]
        elif kind == "linear":
            w = shape_of(op["weight"])
            if len(shape) != 1 or len(w) != 2 or w[1] != shape[0]:
                fail(f"weight {w} does not fit an input of shape {shape}")
            vector("bias", w[0])
            shape = [w[0]]
        elif kind == "batch_norm":
            for key in _OP_TENSORS["batch_norm"]:
                vector(key, shape[0])
        elif kind == "max_pool2d":
            k = op["kernel_size"]
            if len(shape) != 3 or k > shape[1] or k > shape[2]:
                fail(f"kernel {k} does not fit an input of shape {shape}")
            shape = [shape[0], shape[1] // k, shape[2] // k]
        elif kind == "flatten":
            shape = [math.prod(shape)]
        if math.prod(shape) > MAX_ELEMENTS:
            fail(f"activation of shape {shape} exceeds {MAX_ELEMENTS} elements")
        shapes.append(shape)
    return shapes


def code_patches(network, input_shape, shape_of) -> dict:
    """{weight name: (H, W)}: the patch each row of a layer's codes splits into for the entropy code's contexts.

    A conv's kernel (kh, kw); a linear layer right after a flatten of [C, H, W] reads C maps of H x W; any
    other linear layer (1, 1).
    """
    shapes, patches = trace_shapes(network, input_shape, shape_of), {}
    for i, op in enumerate(network):
        if op["op"] == "conv2d":
            patches[op["weight"]] = tuple(shape_of(op["weight"])[2:])
        elif op["op"] == "linear":
            before = shapes[i - 1] if i and network[i - 1]["op"] == "flatten" else []
            patches[op["weight"]] = tuple(before[1:]) if len(before) == 3 else (1, 1)
    return patches


# ---------------------------------------------------------------- writing

def deployed_layers(export: dict, fold_bn: bool = True) -> tuple[dict, list]:
    """The export and network as they are stored: BN folded (if asked) and checked against LeNet-5.

    Returns ({"ternary": ..., "float": ...}, network ops). Raises DeployFormatError if the export lacks a tensor
    the network reads, has a ternary layer the network does not have, or mis-sized scales.
    """
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
    return fold_batch_norm(export, network) if fold_bn else (export, network)


def pack(export: dict, encoding: str = "2bit", fold_bn: bool = True, float_dtype: str = "fp32",
         metadata: dict | None = None) -> bytes:
    """Serialise an export (quant/export.py) as a deployment file (docs/deployment_format.md)."""
    from .data import MEAN, STD  # the writer states the normalisation; the reader takes it from the file

    try:
        codec = get_codec(encoding)
    except PackingError as e:
        raise DeployFormatError(str(e)) from None
    if float_dtype not in FLOAT_DTYPES:
        raise DeployFormatError(f"unknown float dtype {float_dtype!r}; valid: {', '.join(FLOAT_DTYPES)}")
    export, network = deployed_layers(export, fold_bn)
    weight_layers = _weight_layers(network)
    ternary_of = lambda name: export["ternary"].get(weight_layers.get(name))
    shape_of = lambda name: list((ternary_of(name) or {}).get("codes", export["float"].get(name)).shape)
    patches = code_patches(network, INPUT_SHAPE, shape_of)
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
        entry = ternary_of(name)
        if entry is None:
            add_float(name, export["float"][name], float_dtype)
            continue
        layer = weight_layers[name]
        try:
            block = codec.encode(entry["codes"], patches[name])
        except PackingError as e:
            raise DeployFormatError(f"cannot pack {layer}: {e}") from None
        # scales stay fp32 whatever float_dtype says: they multiply every weight of their channel
        scales = {"w_p": f"{layer}.alpha", "w_n": f"{layer}.alpha"} if torch.equal(entry["w_p"], entry["w_n"]) else \
                 {"w_p": f"{layer}.w_p", "w_n": f"{layer}.w_n"}
        add(ternary, {"name": name, "shape": list(entry["codes"].shape), **scales}, block)
        for key in dict.fromkeys(scales.values()):
            add_float(key, entry["w_p" if key == scales["w_p"] else "w_n"].reshape(-1), "fp32")
    manifest = {"encoding": encoding, "bn_folded": bool(fold_bn),
                "input": {"shape": INPUT_SHAPE, "divisor": 255.0, "mean": [MEAN], "std": [STD]},
                "payload_bytes": offset, "ternary": ternary, "float": floats, "network": network,
                "metadata": metadata or {}}
    return seal(manifest, b"".join(blocks))


def seal(manifest: dict, payload: bytes) -> bytes:
    """Header + manifest + payload + SHA-256 trailer."""
    text = json.dumps(manifest, separators=(",", ":"), allow_nan=False, default=str)
    body = zlib.compress(text.encode("utf-8"), 9)
    data = _HEADER.pack(MAGIC, VERSION, len(body)) + body + payload
    return data + hashlib.sha256(data).digest()


# ---------------------------------------------------------------- reading

def unpack(data: bytes) -> tuple[dict, dict]:
    """Verify and decode a deployment file: (manifest, {name: tensor}).

    Codes come back as int8 tensors of their layer's shape, floats in their stored dtype (fp32 or fp16).
    """
    data = bytes(data)
    if not _HEADER.size + _DIGEST_BYTES <= len(data) <= MAX_FILE_BYTES:
        raise DeployFormatError(f"{len(data)} bytes is not the size of a ternary deployment file "
                                f"({_HEADER.size + _DIGEST_BYTES} to {MAX_FILE_BYTES})")
    magic, version, manifest_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DeployFormatError(f"bad magic {magic!r} (expected {MAGIC!r}): not a ternary deployment file")
    if hashlib.sha256(data[:-_DIGEST_BYTES]).digest() != data[-_DIGEST_BYTES:]:
        raise DeployFormatError(f"SHA-256 mismatch over {len(data)} bytes: the file is corrupt, truncated or extended")
    if version > VERSION:
        raise DeployFormatError(f"format version {version} is newer than this reader (version {VERSION}); "
                                "update the code to read it")
    if version != VERSION:
        raise DeployFormatError(f"format version {version} is no longer read (this reader handles {VERSION}); "
                                "pack the checkpoint again")
    start = _HEADER.size + manifest_len
    if start > len(data) - _DIGEST_BYTES:
        raise DeployFormatError(f"manifest length {manifest_len} runs past the end of the file")
    manifest = parse_manifest(data[_HEADER.size:start])
    payload = data[start:-_DIGEST_BYTES]
    records = _check_manifest(manifest, len(payload))
    codec = get_codec(manifest["encoding"])
    tensors = {}
    for rec in manifest["ternary"]:
        try:
            codes = codec.decode(payload[rec["offset"]:rec["offset"] + rec["length"]], tuple(rec["shape"]))
        except PackingError as e:
            raise DeployFormatError(f"{rec['name']}: {e}") from None
        tensors[rec["name"]] = torch.from_numpy(codes.copy())
    for rec in manifest["float"]:
        array = np.frombuffer(payload, FLOAT_DTYPES[rec["dtype"]], math.prod(rec["shape"]), rec["offset"])
        if not np.isfinite(array).all():
            raise DeployFormatError(f"{rec['name']}: non-finite values")
        tensors[rec["name"]] = torch.from_numpy(array.copy()).reshape(rec["shape"])
    assert tensors.keys() == records.keys()
    return manifest, tensors


def _reject_constant(name):
    raise ValueError(f"non-finite number {name}")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows a double")
    return value


def parse_manifest(body: bytes):
    """zlib-inflate (at most MAX_MANIFEST_BYTES) and parse the manifest JSON, rejecting NaN and infinities."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(body, MAX_MANIFEST_BYTES + 1)
    except zlib.error as e:
        raise DeployFormatError(f"manifest is not zlib-compressed ({e})") from None
    if len(text) > MAX_MANIFEST_BYTES:
        raise DeployFormatError(f"manifest inflates past {MAX_MANIFEST_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise DeployFormatError("manifest's zlib stream is truncated or followed by other bytes")
    try:
        return json.loads(text.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise DeployFormatError("manifest JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, non-finite numbers, over-long integers
        raise DeployFormatError(f"manifest is not valid UTF-8 JSON with finite numbers ({str(e).splitlines()[0]})") from None


def _is_int(value, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _is_number(value) -> bool:  # parse_manifest has already made every float finite
    return type(value) in (int, float) and math.isfinite(value)


def _check_manifest(manifest, payload_len: int) -> dict:
    """Raise DeployFormatError unless the manifest describes exactly this payload and a runnable network.

    Returns {name: record} of every stored block.
    """
    def fail(message):
        raise DeployFormatError(f"bad manifest: {message}")

    def check_keys(obj, keys: set, what: str):
        if not isinstance(obj, dict) or set(obj) != keys:
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            fail(f"{what} must be an object with keys {sorted(keys)}, got {got!r:.200}")

    check_keys(manifest, {"encoding", "bn_folded", "input", "payload_bytes", "ternary", "float", "network",
                          "metadata"}, "the manifest")
    try:
        codec = get_codec(manifest["encoding"]) if isinstance(manifest["encoding"], str) else None
    except PackingError:
        codec = None
    if codec is None:
        fail(f"unknown encoding {manifest['encoding']!r:.100}")
    if type(manifest["bn_folded"]) is not bool:
        fail("bn_folded must be true or false")
    if manifest["payload_bytes"] != payload_len or type(manifest["payload_bytes"]) is not int:
        fail(f"payload_bytes {manifest['payload_bytes']!r:.40} but the file holds {payload_len} payload bytes")
    if not (isinstance(manifest["metadata"], dict) and all(
            v is None or type(v) in (str, int, float, bool) for v in manifest["metadata"].values())):
        fail("metadata must be an object of strings, numbers, booleans or nulls")
    spec = manifest["input"]
    check_keys(spec, {"shape", "divisor", "mean", "std"}, "input")
    if not (isinstance(spec["shape"], list) and len(spec["shape"]) == 3
            and all(_is_int(d, 1, MAX_DIM) for d in spec["shape"]) and math.prod(spec["shape"]) <= MAX_ELEMENTS):
        fail(f"input shape {spec['shape']!r:.100} is not [C, H, W] of at most {MAX_ELEMENTS} elements")
    channels = spec["shape"][0]
    if not (_is_number(spec["divisor"]) and spec["divisor"] > 0):
        fail("input divisor must be a number > 0")
    for key in ("mean", "std"):
        if not (isinstance(spec[key], list) and len(spec[key]) == channels and all(map(_is_number, spec[key]))
                and (key == "mean" or all(v > 0 for v in spec[key]))):
            fail(f"input {key} must be {channels} number(s){' > 0' if key == 'std' else ''}")

    records, total = {}, 0
    for kind, keys in (("ternary", {"name", "shape", "offset", "length", "w_p", "w_n"}),
                       ("float", {"name", "shape", "dtype", "offset", "length"})):
        if not isinstance(manifest[kind], list):
            fail(f"{kind} must be a list")
        for rec in manifest[kind]:
            check_keys(rec, keys, f"a {kind} record")
            if not (isinstance(rec["name"], str) and isinstance(rec["shape"], list) and 1 <= len(rec["shape"]) <= 4
                    and all(_is_int(d, 1, MAX_DIM) for d in rec["shape"])
                    and _is_int(rec["offset"], 0, payload_len) and _is_int(rec["length"], 0, payload_len)):
                fail(f"malformed {kind} record {rec!r:.200}")
            if rec["name"] in records:
                fail(f"tensor {rec['name']!r} stored twice")
            n = math.prod(rec["shape"])
            total += n
            if n > MAX_ELEMENTS or total > MAX_ELEMENTS:
                fail(f"{rec['name']}: more than {MAX_ELEMENTS} elements stored")
            if kind == "float":
                if not (isinstance(rec["dtype"], str) and rec["dtype"] in FLOAT_DTYPES):
                    fail(f"{rec['name']}: unknown dtype {rec['dtype']!r:.40}")
                expected = n * FLOAT_DTYPES[rec["dtype"]].itemsize
            else:
                expected = codec.nbytes(n) if codec.nbytes else rec["length"]  # a variable-length code checks itself
            if rec["length"] != expected:
                fail(f"{rec['name']}: length {rec['length']} but shape {rec['shape']} needs {expected} bytes")
            records[rec["name"]] = rec
    end = 0
    for rec in sorted(records.values(), key=lambda r: r["offset"]):
        if rec["offset"] != end:
            fail(f"{rec['name']}: offset {rec['offset']}, expected {end} (blocks must tile the payload)")
        end += rec["length"]
    if end != payload_len:
        fail(f"blocks cover {end} of {payload_len} payload bytes")

    is_float = lambda name: isinstance(name, str) and name in records and "dtype" in records[name]
    used = set()
    for rec in manifest["ternary"]:
        for key in ("w_p", "w_n"):
            if not (is_float(rec[key]) and len(records[rec[key]]["shape"]) == 1
                    and records[rec[key]]["shape"][0] in (1, rec["shape"][0])):
                fail(f"{rec['name']}: {key} must name a float block of 1 or {rec['shape'][0]} values")
            used.add(rec[key])
    network = manifest["network"]
    if not (isinstance(network, list) and 1 <= len(network) <= MAX_OPS):
        fail(f"network must be a list of 1 to {MAX_OPS} ops")
    for i, op in enumerate(network):
        kind = op.get("op") if isinstance(op, dict) else None
        if not (isinstance(kind, str) and kind in _OP_TENSORS):
            fail(f"op {i}: unknown op {op!r:.100}; valid: {', '.join(_OP_TENSORS)}")
        check_keys(op, {"op", *_OP_TENSORS[kind], *_OP_SCALARS.get(kind, ())}, f"op {i} ({kind})")
        for key in _OP_TENSORS[kind]:
            name = op[key]
            if key == "bias" and name is None:
                continue
            if not (isinstance(name, str) and name in records):
                fail(f"op {i} ({kind}) refers to missing tensor {name!r:.100}")
            if "dtype" not in records[name] and not (key == "weight" and kind in ("conv2d", "linear")):
                fail(f"op {i} ({kind}): {key} {name!r} is a ternary block; only conv2d / linear weights may be")
            used.add(name)
        if kind == "batch_norm" and not (_is_number(op["eps"]) and op["eps"] > 0):
            fail(f"op {i}: batch_norm eps {op['eps']!r:.40} is not a number > 0")
        if kind == "max_pool2d" and not _is_int(op["kernel_size"], 1, MAX_DIM):
            fail(f"op {i}: max_pool2d kernel_size {op['kernel_size']!r:.40} is not an integer in 1..{MAX_DIM}")
    if manifest["bn_folded"] and any(op["op"] == "batch_norm" for op in network):
        fail("bn_folded is true but the network has batch_norm ops")
    if set(records) - used:
        fail(f"blocks {sorted(set(records) - used)} are read by nothing")
    shapes = trace_shapes(network, spec["shape"], lambda name: records[name]["shape"])
    if shapes[-1] != [NUM_CLASSES]:
        raise DeployFormatError(f"network ends in shape [N, {', '.join(map(str, shapes[-1]))}], "
                                f"not [N, {NUM_CLASSES}] logits")
    return records


# ---------------------------------------------------------------- inference

def normalize(spec: dict, pixels) -> torch.Tensor:
    """Raw pixels [N, C, H, W] -> the network's input, ((pixels / divisor) - mean[c]) / std[c] in float32."""
    c = len(spec["mean"])
    x = torch.as_tensor(pixels).float().div_(spec["divisor"])
    if c == 1:  # the same scalar operations as quant/data.py, so the two agree bit for bit
        return x.sub_(spec["mean"][0]).div_(spec["std"][0])
    return x.sub_(torch.tensor(spec["mean"]).reshape(c, 1, 1)).div_(torch.tensor(spec["std"]).reshape(c, 1, 1))


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
    """Run the manifest's ops in order on x [N, *input_shape] (normalised) and return the logits."""
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"input of shape {list(x.shape)}, expected [N, {', '.join(map(str, input_shape))}]")
    with torch.inference_mode():
        x = x.float()
        for op in network:
            x = OPS[op["op"]](x, op, weights)
    return x


def read_file(source) -> bytes:
    """The bytes of a deployment file given as a path or as bytes, refusing files over MAX_FILE_BYTES."""
    if not isinstance(source, (str, os.PathLike)):
        return bytes(source)
    with open(source, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise DeployFormatError(f"{source}: larger than {MAX_FILE_BYTES} bytes, not a ternary deployment file")
    return data


def load_inference(source) -> functools.partial:
    """A callable x [N, 1, 28, 28] (normalised; see `normalize`) -> logits, from a deployment file alone.

    The file is decoded and dequantised once here, so each call costs what the FP network costs.
    """
    manifest, tensors = unpack(read_file(source))
    return functools.partial(forward, manifest["network"], dequantized_weights(manifest, tensors),
                             tuple(manifest["input"]["shape"]))
