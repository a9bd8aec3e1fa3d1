"""The deployment file: one self-contained, checksummed binary holding a ternary LeNet-5 ready to run.

docs/deployment_format.md is the specification (layout section 1, manifest 2, code blocks 3-4, ops and BN
folding 5, reader limits 6); this module writes and reads it. A ternary weight is w_p [T = +1] - w_n [T = -1]
(TTQ, arXiv 1612.01064, Eq. 6); where w_p = w_n (TWN, ADMM) both name one block.

Reading trusts nothing (docs section 6): `unpack` checks the size, magic and SHA-256 before any other field,
bounds every size in Python integers before allocating and follows the network's shapes down to [N, 10] logits;
any failure is a one-line DeployFormatError. The loader imports only this file, quant/packing.py, quant/errors.py,
torch and numpy: no model code.
"""
import functools
import hashlib
import json
import math
import os
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from .errors import QuantError
from .packing import ENCODINGS, PackingError, dequantize, get_codec

MAGIC = b"TERNLNT\0"
VERSION = 2
_HEADER = struct.Struct("<8sHI")  # magic, version, compressed manifest length
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
# tensor fields of each op (a null bias is allowed for conv2d / linear)
_OP_TENSORS = {"conv2d": ("weight", "bias"), "linear": ("weight", "bias"),
               "batch_norm": ("weight", "bias", "running_mean", "running_var"),
               "relu": (), "max_pool2d": (), "flatten": ()}
# scalar parameters of each op, with the test a reader applies and what it asks for
_OP_SCALARS = {"batch_norm": {"eps": (lambda v: _is_number(v, 0), "a number > 0")},
               "max_pool2d": {"kernel_size": (lambda v: _is_int(v, 1, MAX_DIM), f"an integer in 1..{MAX_DIM}")}}


def _op(kind: str, name: str = "") -> dict:
    """An op reading the tensors <name>.weight, <name>.bias, ... (BN with PyTorch's default eps)."""
    op = {"op": kind, **{k: f"{name}.{k}" for k in _OP_TENSORS[kind]}}
    return {**op, "eps": BN_EPS} if kind == "batch_norm" else op


# LeNet5.forward (quant/model.py) written as data; tests check it computes the same logits as the model.
LENET5_NETWORK = (*(op for i in (1, 2) for op in (_op("conv2d", f"conv{i}"), _op("batch_norm", f"bn{i}"),
                                                   _op("relu"), {"op": "max_pool2d", "kernel_size": 2})),
                  _op("flatten"), _op("linear", "fc1"), _op("relu"), _op("linear", "fc2"))


class DeployFormatError(QuantError, ValueError):
    """A deployment file (or an export about to become one) is malformed, corrupt or unsupported; always one
    line (runs of whitespace, e.g. newlines in a crafted name, collapse)."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


def _need(ok, message: str):
    if not ok:
        raise DeployFormatError(message)


# ---------------------------------------------------------------- BN folding (docs section 5)

def bn_affine(gamma, beta, mean, var, eps: float = BN_EPS):
    """Eval-mode BN as y -> s * y + t: s = gamma / sqrt(var + eps), t = beta - s * mean (float64)."""
    s = gamma.double() / torch.sqrt(var.double() + eps)
    return s, beta.double() - s * mean.double()


def fold_ternary(codes: torch.Tensor, w_p: torch.Tensor, w_n: torch.Tensor, s: torch.Tensor):
    """Codes and per-channel levels of s * W, s one value per output channel. s >= 0: w_p' = s w_p, w_n' = s w_n;
    s < 0: T' = -T, w_p' = |s| w_n, w_n' = |s| w_p (the same weight; negation is exact)."""
    w_p, w_n = (v.double().reshape(-1).expand(s.numel()) for v in (w_p, w_n))
    neg, mag = s < 0, s.abs()
    sign = torch.where(neg, -1, 1).to(torch.int8).reshape(-1, *[1] * (codes.ndim - 1))
    return codes * sign, torch.where(neg, mag * w_n, mag * w_p).float(), torch.where(neg, mag * w_p, mag * w_n).float()


def fold_batch_norm(export: dict, network) -> tuple[dict, list]:
    """(export, network) with every batch_norm op right after a conv2d / linear op folded into that layer."""
    ternary, floats, ops = dict(export["ternary"]), dict(export["float"]), []
    for op in network:
        if not (op["op"] == "batch_norm" and ops and ops[-1]["op"] in ("conv2d", "linear")):
            ops.append(dict(op))
            continue
        layer_op = ops[-1]
        s, t = bn_affine(*(floats.pop(op[k]) for k in _OP_TENSORS["batch_norm"]), op["eps"])
        layer = layer_op["weight"].removesuffix(".weight")  # export layers: "conv1"
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


def _tensor_names(network) -> list[str]:
    """Every tensor the network reads, in forward order, without repeats."""
    return list(dict.fromkeys(op[k] for op in network for k in _OP_TENSORS[op["op"]] if op.get(k) is not None))


def trace_shapes(network, input_shape, shape_of) -> list:
    """Shapes (without N) entering each op and leaving the last: [input, after op 0, ...], `shape_of(name)` giving
    a tensor's shape. DeployFormatError at the first op that does not fit (semantics: docs section 5)."""
    shapes = [list(input_shape)]
    for i, op in enumerate(network):
        shape, kind = shapes[-1], op["op"]
        need = lambda ok, message: _need(ok, f"network op {i} ({kind}): {message}")
        if kind in ("conv2d", "linear"):
            w = shape_of(op["weight"])
            need(len(shape) == 3 and len(w) == 4 and w[1] == shape[0] and w[2] <= shape[1] and w[3] <= shape[2]
                 if kind == "conv2d" else len(shape) == 1 and len(w) == 2 and w[1] == shape[0],
                 f"weight {w} does not fit an input of shape {shape}")
            shape = [w[0], shape[1] - w[2] + 1, shape[2] - w[3] + 1] if kind == "conv2d" else [w[0]]
        elif kind == "max_pool2d":
            k = op["kernel_size"]
            need(len(shape) == 3 and k <= min(shape[1:]), f"kernel {k} does not fit an input of shape {shape}")
            shape = [shape[0], shape[1] // k, shape[2] // k]
        elif kind == "flatten":
            shape = [math.prod(shape)]
        for key in _OP_TENSORS[kind]:  # a bias, BN's four vectors: one value per output channel
            if op.get(key) is not None and (key != "weight" or kind == "batch_norm"):
                need(shape_of(op[key]) == [shape[0]],
                     f"{key} {op[key]!r} has shape {shape_of(op[key])}, expected [{shape[0]}]")
        need(math.prod(shape) <= MAX_ELEMENTS, f"activation of shape {shape} exceeds {MAX_ELEMENTS} elements")
        shapes.append(shape)
    return shapes


def code_patches(network, shape_of) -> dict:
    """{weight name: (H, W)}, the patch of the entropy code's contexts (docs section 4.2): a conv's kernel; for a
    linear layer right after a flatten of [C, H, W], (H, W); for any other linear layer (1, 1)."""
    shapes, patches = trace_shapes(network, INPUT_SHAPE, shape_of), {}
    for i, op in enumerate(network):
        if op["op"] == "conv2d":
            patches[op["weight"]] = tuple(shape_of(op["weight"])[2:])
        elif op["op"] == "linear":
            before = shapes[i - 1] if i and network[i - 1]["op"] == "flatten" else []
            patches[op["weight"]] = tuple(before[1:]) if len(before) == 3 else (1, 1)
    return patches


# ---------------------------------------------------------------- writing

def deployed_layers(export: dict, fold_bn: bool = True) -> tuple[dict, list]:
    """The export and LeNet-5 network as stored (BN folded if asked), checked: every tensor present, no foreign
    ternary layer, scales of 1 or O values."""
    network = [dict(op) for op in LENET5_NETWORK]
    weight_layers = {op["weight"]: op["weight"].removesuffix(".weight")
                     for op in network if op["op"] in ("conv2d", "linear")}
    missing = [name for name in _tensor_names(network)
               if name not in export["float"] and weight_layers.get(name) not in export["ternary"]]
    _need(not missing, f"cannot pack: the export lacks {', '.join(missing)}")
    for layer, entry in export["ternary"].items():
        groups, out_channels = entry["w_p"].numel(), entry["codes"].shape[0]
        _need(groups in (1, out_channels) and entry["w_n"].numel() == groups,
              f"cannot pack {layer}: {groups} / {entry['w_n'].numel()} scales for {out_channels} output channels")
    unused = set(export["ternary"]) - set(weight_layers.values())
    _need(not unused, f"cannot pack: ternary layers {sorted(unused)} are not in the LeNet-5 network")
    return fold_batch_norm(export, network) if fold_bn else (export, network)


def pack(export: dict, encoding: str = "2bit", fold_bn: bool = True, float_dtype: str = "fp32",
         metadata: dict | None = None) -> bytes:
    """Serialise an export (quant/export.py) as a deployment file."""
    from .data import MEAN, STD  # the writer states the normalisation; the reader takes it from the file

    _need(encoding in ENCODINGS, f"unknown encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
    _need(float_dtype in FLOAT_DTYPES, f"unknown float dtype {float_dtype!r}; valid: {', '.join(FLOAT_DTYPES)}")
    export, network = deployed_layers(export, fold_bn)
    ternary = {f"{layer}.weight": entry for layer, entry in export["ternary"].items()}
    stored = {**export["float"], **{name: entry["codes"] for name, entry in ternary.items()}}
    patches = code_patches(network, lambda name: list(stored[name].shape))
    records, blocks = {"ternary": [], "float": []}, []

    def add(kind: str, record: dict, block: bytes):
        records[kind].append({**record, "offset": sum(map(len, blocks)), "length": len(block)})
        blocks.append(block)

    def add_float(name: str, tensor: torch.Tensor, dtype: str):
        with np.errstate(over="ignore"):  # overflow to inf is reported just below
            array = tensor.detach().cpu().numpy().astype(FLOAT_DTYPES[dtype])
        _need(np.isfinite(array).all(), f"cannot pack {name}: non-finite values as {dtype}")
        add("float", {"name": name, "shape": list(array.shape), "dtype": dtype}, array.tobytes())

    for name in _tensor_names(network):
        entry, layer = ternary.get(name), name.removesuffix(".weight")
        if entry is None:
            add_float(name, export["float"][name], float_dtype)
            continue
        try:
            block = get_codec(encoding).encode(entry["codes"], patches[name])
        except PackingError as e:
            raise DeployFormatError(f"cannot pack {layer}: {e}") from None
        # scales stay fp32 whatever float_dtype says: they multiply every weight of their channel
        keys = ("alpha", "alpha") if torch.equal(entry["w_p"], entry["w_n"]) else ("w_p", "w_n")
        add("ternary", {"name": name, "shape": list(entry["codes"].shape),
                        "w_p": f"{layer}.{keys[0]}", "w_n": f"{layer}.{keys[1]}"}, block)
        for key, level in zip(dict.fromkeys(keys), ("w_p", "w_n")):
            add_float(f"{layer}.{key}", entry[level].reshape(-1), "fp32")
    payload = b"".join(blocks)
    manifest = {"encoding": encoding, "bn_folded": bool(fold_bn),
                "input": {"shape": INPUT_SHAPE, "divisor": 255.0, "mean": [MEAN], "std": [STD]},
                "payload_bytes": len(payload), **records, "network": network, "metadata": metadata or {}}
    body = zlib.compress(json.dumps(manifest, separators=(",", ":"), allow_nan=False, default=str).encode(), 9)
    data = _HEADER.pack(MAGIC, VERSION, len(body)) + body + payload
    return data + hashlib.sha256(data).digest()


# ---------------------------------------------------------------- reading

def unpack(data: bytes) -> tuple[dict, dict]:
    """Verify and decode a deployment file: (manifest, {name: tensor}), codes int8, floats in their stored dtype."""
    data = bytes(data)
    _need(_HEADER.size + _DIGEST_BYTES <= len(data) <= MAX_FILE_BYTES, f"{len(data)} bytes is not the size of a "
          f"ternary deployment file ({_HEADER.size + _DIGEST_BYTES} to {MAX_FILE_BYTES})")
    magic, version, manifest_len = _HEADER.unpack_from(data)
    _need(magic == MAGIC, f"bad magic {magic!r} (expected {MAGIC!r}): not a ternary deployment file")
    _need(hashlib.sha256(data[:-_DIGEST_BYTES]).digest() == data[-_DIGEST_BYTES:],
          f"SHA-256 mismatch over {len(data)} bytes: the file is corrupt, truncated or extended")
    _need(version <= VERSION, f"format version {version} is newer than this reader (version {VERSION}); update the "
          "code to read it")
    _need(version == VERSION, f"format version {version} is no longer read (this reader handles {VERSION}); pack "
          "the checkpoint again")
    start = _HEADER.size + manifest_len
    _need(start <= len(data) - _DIGEST_BYTES, f"manifest length {manifest_len} runs past the end of the file")
    manifest, payload = parse_manifest(data[_HEADER.size:start]), data[start:-_DIGEST_BYTES]
    _check_manifest(manifest, len(payload))
    tensors = {}
    for rec in manifest["ternary"]:
        try:
            codes = get_codec(manifest["encoding"]).decode(payload[rec["offset"]:rec["offset"] + rec["length"]],
                                                           tuple(rec["shape"]))
        except PackingError as e:
            raise DeployFormatError(f"{rec['name']}: {e}") from None
        tensors[rec["name"]] = torch.from_numpy(codes.copy())
    for rec in manifest["float"]:
        array = np.frombuffer(payload, FLOAT_DTYPES[rec["dtype"]], math.prod(rec["shape"]), rec["offset"])
        _need(np.isfinite(array).all(), f"{rec['name']}: non-finite values")
        tensors[rec["name"]] = torch.from_numpy(array.copy()).reshape(rec["shape"])
    return manifest, tensors


def _finite(text: str, kind=float):
    """A JSON number (or constant) as `kind`; ValueError for NaN, infinities and numbers beyond the double range
    (float() of such a literal, even an integer one, is inf)."""
    if not math.isfinite(float(text)):
        raise ValueError(f"non-finite number {text:.40}")
    return kind(text)


def parse_manifest(body: bytes):
    """zlib-inflate (at most MAX_MANIFEST_BYTES) and parse the manifest JSON, rejecting NaN and infinities."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(body, MAX_MANIFEST_BYTES + 1)
    except zlib.error as e:
        raise DeployFormatError(f"manifest is not zlib-compressed ({e})") from None
    _need(len(text) <= MAX_MANIFEST_BYTES, f"manifest inflates past {MAX_MANIFEST_BYTES} bytes")
    _need(inflater.eof and not inflater.unused_data, "manifest's zlib stream is truncated or followed by other bytes")
    try:
        return json.loads(text.decode("utf-8"), parse_constant=_finite, parse_float=_finite,
                          parse_int=functools.partial(_finite, kind=int))
    except RecursionError:
        raise DeployFormatError("manifest JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, non-finite numbers, over-long integers
        raise DeployFormatError(f"manifest is not valid UTF-8 JSON with finite numbers ({str(e).splitlines()[0]})") \
            from None


def _is_int(value, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _is_shape(value, ndims) -> bool:
    return isinstance(value, list) and len(value) in ndims and all(_is_int(d, 1, MAX_DIM) for d in value)


def _is_number(value, low=-math.inf) -> bool:  # > low; parse_manifest has made every number finite
    return type(value) in (int, float) and value > low


def _check_manifest(manifest, payload_len: int) -> None:
    """DeployFormatError unless the manifest describes exactly this payload and a runnable network (docs sections
    2, 5 and 6)."""
    need = lambda ok, message: _need(ok, f"bad manifest: {message}")

    def need_keys(obj, keys, what: str):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        need(isinstance(obj, dict) and set(obj) == set(keys), f"{what} must be an object with keys {sorted(keys)}, "
                                                              f"got {got!r:.200}")

    need_keys(manifest, ("encoding", "bn_folded", "input", "payload_bytes", "ternary", "float", "network",
                         "metadata"), "the manifest")
    need(isinstance(manifest["encoding"], str) and manifest["encoding"] in ENCODINGS,
         f"unknown encoding {manifest['encoding']!r:.100}")
    need(type(manifest["bn_folded"]) is bool, "bn_folded must be true or false")
    need(type(manifest["payload_bytes"]) is int and manifest["payload_bytes"] == payload_len,
         f"payload_bytes {manifest['payload_bytes']!r:.40} but the file holds {payload_len} payload bytes")
    need(isinstance(manifest["metadata"], dict) and all(v is None or type(v) in (str, int, float, bool)
                                                        for v in manifest["metadata"].values()),
         "metadata must be an object of strings, numbers, booleans or nulls")
    spec = manifest["input"]
    need_keys(spec, ("shape", "divisor", "mean", "std"), "input")
    need(_is_shape(spec["shape"], (3,)) and math.prod(spec["shape"]) <= MAX_ELEMENTS,
         f"input shape {spec['shape']!r:.100} is not [C, H, W] of at most {MAX_ELEMENTS} elements")
    need(_is_number(spec["divisor"], 0), "input divisor must be a number > 0")
    for key, low in (("mean", -math.inf), ("std", 0)):
        need(isinstance(spec[key], list) and len(spec[key]) == spec["shape"][0]
             and all(_is_number(v, low) for v in spec[key]),
             f"input {key} must be {spec['shape'][0]} number(s){' > 0' if low == 0 else ''}")

    records, total, nbytes = {}, 0, ENCODINGS[manifest["encoding"]].nbytes
    for kind, keys in (("ternary", ("name", "shape", "offset", "length", "w_p", "w_n")),
                       ("float", ("name", "shape", "dtype", "offset", "length"))):
        need(isinstance(manifest[kind], list), f"{kind} must be a list")
        for rec in manifest[kind]:
            need_keys(rec, keys, f"a {kind} record")
            need(isinstance(rec["name"], str) and _is_shape(rec["shape"], (1, 2, 3, 4))
                 and _is_int(rec["offset"], 0, payload_len) and _is_int(rec["length"], 0, payload_len),
                 f"malformed {kind} record {rec!r:.200}")
            need(rec["name"] not in records, f"tensor {rec['name']!r} stored twice")
            records[rec["name"]], n = rec, math.prod(rec["shape"])
            total += n
            need(total <= MAX_ELEMENTS, f"{rec['name']}: more than {MAX_ELEMENTS} elements stored")
            if kind == "float":
                need(isinstance(rec["dtype"], str) and rec["dtype"] in FLOAT_DTYPES,
                     f"{rec['name']}: unknown dtype {rec['dtype']!r:.40}")
            expected = (n * FLOAT_DTYPES[rec["dtype"]].itemsize if kind == "float"
                        else nbytes(n) if nbytes else rec["length"])  # a variable-length code checks itself
            need(rec["length"] == expected,
                 f"{rec['name']}: length {rec['length']} but shape {rec['shape']} needs {expected} bytes")
    end = 0
    for rec in sorted(records.values(), key=lambda r: r["offset"]):
        need(rec["offset"] == end, f"{rec['name']}: offset {rec['offset']}, expected {end} (blocks tile the payload)")
        end += rec["length"]
    need(end == payload_len, f"blocks cover {end} of {payload_len} payload bytes")

    used = set()
    for rec in manifest["ternary"]:
        for key in ("w_p", "w_n"):
            scale = records.get(rec[key]) if isinstance(rec[key], str) else None
            need(scale and "dtype" in scale and len(scale["shape"]) == 1 and scale["shape"][0] in (1, rec["shape"][0]),
                 f"{rec['name']}: {key} must name a float block of 1 or {rec['shape'][0]} values")
            used.add(rec[key])
    network = manifest["network"]
    need(isinstance(network, list) and 1 <= len(network) <= MAX_OPS, f"network must be a list of 1 to {MAX_OPS} ops")
    for i, op in enumerate(network):
        kind = op.get("op") if isinstance(op, dict) else None
        need(isinstance(kind, str) and kind in _OP_TENSORS, f"op {i}: unknown op {op!r:.100}; valid: "
                                                            f"{', '.join(_OP_TENSORS)}")
        need_keys(op, ("op", *_OP_TENSORS[kind], *_OP_SCALARS.get(kind, {})), f"op {i} ({kind})")
        for key in _OP_TENSORS[kind]:
            name = op[key]
            if key == "bias" and name is None:
                continue
            need(isinstance(name, str) and name in records, f"op {i} ({kind}) refers to missing tensor {name!r:.100}")
            need("dtype" in records[name] or (key == "weight" and kind in ("conv2d", "linear")),
                 f"op {i} ({kind}): {key} {name!r} is a ternary block; only conv2d / linear weights may be")
            used.add(name)
        for key, (ok, what) in _OP_SCALARS.get(kind, {}).items():
            need(ok(op[key]), f"op {i}: {kind} {key} {op[key]!r:.40} is not {what}")
    need(not (manifest["bn_folded"] and any(op["op"] == "batch_norm" for op in network)),
         "bn_folded is true but the network has batch_norm ops")
    need(used >= set(records), f"blocks {sorted(set(records) - used)} are read by nothing")
    out = trace_shapes(network, spec["shape"], lambda name: records[name]["shape"])[-1]
    _need(out == [NUM_CLASSES], f"network ends in shape [N, {', '.join(map(str, out))}], not [N, {NUM_CLASSES}] logits")


# ---------------------------------------------------------------- inference

def normalize(spec: dict, pixels) -> torch.Tensor:
    """Raw pixels [N, C, H, W] -> the network's input, ((pixels / divisor) - mean[c]) / std[c] in float32 (bit for
    bit as quant/data.py normalises MNIST)."""
    per_channel = lambda v: torch.tensor(v, dtype=torch.float32).reshape(-1, 1, 1)
    x = torch.as_tensor(pixels).float().div_(float(spec["divisor"]))
    return x.sub_(per_channel(spec["mean"])).div_(per_channel(spec["std"]))


OPS = {"conv2d": lambda x, op, w: F.conv2d(x, w[op["weight"]], w.get(op.get("bias"))),
       "linear": lambda x, op, w: F.linear(x, w[op["weight"]], w.get(op.get("bias"))),
       "batch_norm": lambda x, op, w: F.batch_norm(x, w[op["running_mean"]], w[op["running_var"]], w[op["weight"]],
                                                   w[op["bias"]], training=False, eps=op["eps"]),
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


def load_inference(source) -> functools.partial:
    """A callable x [N, 1, 28, 28] (normalised; see `normalize`) -> logits, from a deployment file (path or bytes)
    alone, decoded and dequantised once here."""
    data = source
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        _need(len(data) <= MAX_FILE_BYTES, f"{source}: larger than {MAX_FILE_BYTES} bytes, not a deployment file")
    manifest, tensors = unpack(data)
    weights = {name: t.float() for name, t in tensors.items() if t.is_floating_point()}
    for rec in manifest["ternary"]:
        weights[rec["name"]] = dequantize(tensors[rec["name"]], weights[rec["w_p"]], weights[rec["w_n"]])
    # quant/model.py's two exact speed-ups. Conv weights channels_last: oneDNN then keeps activations channels_last
    # through BN and pooling (about 1.8x faster; empty_like + copy_, not .contiguous(): a one-input-channel conv
    # weight already counts as channels_last). ReLU after a max-pool right behind it: maxpool(relu(z)) ==
    # relu(maxpool(z)) since both are monotone, and the ReLU sees 4x fewer values.
    weights = {name: torch.empty_like(w, memory_format=torch.channels_last).copy_(w) if w.ndim == 4 else w
               for name, w in weights.items()}
    network = list(manifest["network"])
    for i in range(len(network) - 1):
        if network[i]["op"] == "relu" and network[i + 1]["op"] == "max_pool2d":
            network[i:i + 2] = network[i + 1], network[i]
    return functools.partial(forward, network, weights, tuple(manifest["input"]["shape"]))
