"""A decoder for the ternary deployment file written from docs/deployment_format.md alone.

NumPy and the standard library only; it imports nothing from the project, so the tests that compare its
predictions with the project's prove the specification is enough to decode every encoding.

    manifest, tensors = read(data)         # verify and decode every block
    logits = run(manifest, tensors, pixels)  # pixels: uint8 [N, C, H, W]
"""
import hashlib
import json
import zlib

import numpy as np


class SpecError(Exception):
    pass


def read(data: bytes):
    if len(data) < 46 or data[:8] != b"TERNLNT\0":
        raise SpecError("not a ternary deployment file")
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise SpecError("checksum")
    if int.from_bytes(data[8:10], "little") != 2:
        raise SpecError("version")
    m = int.from_bytes(data[10:14], "little")
    manifest = json.loads(zlib.decompress(data[14:14 + m]))
    payload = data[14 + m:-32]
    if len(payload) != manifest["payload_bytes"]:
        raise SpecError("payload length")
    tensors = {}
    for rec in manifest["float"]:
        dtype = {"fp32": "<f4", "fp16": "<f2"}[rec["dtype"]]
        raw = payload[rec["offset"]:rec["offset"] + rec["length"]]
        tensors[rec["name"]] = np.frombuffer(raw, dtype).astype(np.float32).reshape(rec["shape"])
    decode = {"2bit": decode_2bit, "base3": decode_base3, "entropy": decode_entropy}[manifest["encoding"]]
    for rec in manifest["ternary"]:
        codes = decode(payload[rec["offset"]:rec["offset"] + rec["length"]], rec["shape"])
        shape = (-1,) + (1,) * (len(rec["shape"]) - 1)
        w_p, w_n = tensors[rec["w_p"]].reshape(shape), tensors[rec["w_n"]].reshape(shape)
        tensors[rec["name"]] = np.where(codes == 1, w_p, np.where(codes == -1, -w_n, np.float32(0)))
    return manifest, tensors


def decode_2bit(block: bytes, shape) -> np.ndarray:
    n = int(np.prod(shape))
    out = np.zeros(n, np.int8)
    for i in range(n):
        field = (block[i // 4] >> (2 * (i % 4))) & 3
        out[i] = {0: 0, 1: 1, 2: -1}[field]
    return out.reshape(shape)


def decode_base3(block: bytes, shape) -> np.ndarray:
    n = int(np.prod(shape))
    out = np.zeros(n, np.int8)
    for i in range(n):
        out[i] = (block[i // 5] // 3 ** (i % 5)) % 3 - 1
    return out.reshape(shape)


def decode_entropy(block: bytes, shape) -> np.ndarray:
    n, rows = int(np.prod(shape)), shape[0]
    per_row = n // rows
    k, h_patch, w_patch = block[0], block[1], block[2]
    lanes = block[3] + 256 * block[4]
    pos = 5
    t = np.zeros((k, 16, 3), np.int64)
    for cls in range(k):
        for c in range(16):
            t[cls, c] = block[pos], block[pos + 1], 256 - block[pos] - block[pos + 1]
            pos += 2
    bits = (k - 1).bit_length()
    classes = []
    for o in range(rows):
        classes.append(sum(((block[pos + (bits * o + j) // 8] >> ((bits * o + j) % 8)) & 1) << j for j in range(bits)))
    pos += (bits * rows + 7) // 8
    x = [int.from_bytes(block[pos + 3 * j:pos + 3 * j + 3], "little") for j in range(lanes)]
    pos += 3 * lanes
    per_lane = n // lanes
    sym = np.zeros(n, np.int64)
    # all lanes advance together; lane j's codes are the flat indices j * per_lane + step
    base = np.arange(lanes) * per_lane
    x = np.array(x, np.int64)
    lane_class = np.array(classes, np.int64)[base // per_row]
    patch = h_patch * w_patch
    for step in range(per_lane):
        i = base + step
        r = step % per_row
        if r == 0:
            lane_class = np.array(classes, np.int64)[i // per_row]
        h, w = (r % patch) // w_patch, (r % patch) % w_patch
        left = sym[i - 1] if w > 0 else np.full(lanes, 3)
        up = sym[i - w_patch] if h > 0 else np.full(lanes, 3)
        f = t[lane_class, 4 * left + up]  # [lanes, 3]
        c1, c2 = f[:, 0], f[:, 0] + f[:, 1]
        slot = x % 256
        s = np.where(slot < c1, 0, np.where(slot < c2, 1, 2))
        start = np.where(s == 0, 0, np.where(s == 1, c1, c2))
        x = f[np.arange(lanes), s] * (x // 256) + slot - start
        sym[i] = s
        for j in np.flatnonzero(x < 2 ** 16):  # ascending lanes
            x[j] = 256 * x[j] + block[pos]
            pos += 1
    if pos != len(block) or (x != 2 ** 16).any():
        raise SpecError("entropy stream does not end cleanly")
    return (sym - 1).astype(np.int8).reshape(shape)


def run(manifest, tensors, pixels: np.ndarray) -> np.ndarray:
    spec = manifest["input"]
    c = len(spec["mean"])
    x = pixels.astype(np.float32) / np.float32(spec["divisor"])
    x = (x - np.float32(spec["mean"]).reshape(1, c, 1, 1)) / np.float32(spec["std"]).reshape(1, c, 1, 1)
    for op in manifest["network"]:
        kind = op["op"]
        if kind == "conv2d":
            w = tensors[op["weight"]]
            o, i, kh, kw = w.shape
            n, _, hh, ww = x.shape
            cols = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # [N, I, H', W', kh, kw]
            x = np.einsum("nihwuv,oiuv->nohw", cols, w, optimize=True).astype(np.float32)
            if op["bias"] is not None:
                x = x + tensors[op["bias"]].reshape(1, o, 1, 1)
        elif kind == "batch_norm":
            shape = (1, -1) + (1,) * (x.ndim - 2)
            g, b = tensors[op["weight"]].reshape(shape), tensors[op["bias"]].reshape(shape)
            mean, var = tensors[op["running_mean"]].reshape(shape), tensors[op["running_var"]].reshape(shape)
            x = (x - mean) / np.sqrt(var + np.float32(op["eps"])) * g + b
        elif kind == "relu":
            x = np.maximum(x, np.float32(0))
        elif kind == "max_pool2d":
            k = op["kernel_size"]
            n, ch, hh, ww = x.shape
            x = x[:, :, :hh // k * k, :ww // k * k].reshape(n, ch, hh // k, k, ww // k, k).max(axis=(3, 5))
        elif kind == "flatten":
            x = x.reshape(len(x), -1)
        elif kind == "linear":
            x = x @ tensors[op["weight"]].T
            if op["bias"] is not None:
                x = x + tensors[op["bias"]]
    return x
