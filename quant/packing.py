"""Codecs for ternary codes (int8 values in {-1, 0, +1}): 2bit and base3 (fixed rate, docs/deployment_format.md
section 3) and entropy (a context model driving an interleaved rANS coder, section 4: Duda, arXiv 1311.2540,
Sec. 3; interleaving as in Giesen, arXiv 1402.3392), plus the code mix, the order-0 entropy bound and
dequantisation.

Every codec encodes one layer's codes in C order (shape [O, ...]) to `bytes` and decodes them given the shape.
Every byte string decodes to at most one code sequence; decoders reject anything else (invalid fields, non-zero
padding, a rANS stream that does not end exactly where it should), so a damaged block is never mis-decoded.
"""
import math
from types import SimpleNamespace

import numpy as np
import torch

from .errors import QuantError


class PackingError(QuantError, ValueError):
    """Codes outside {-1, 0, +1}, or packed bytes that are not a valid encoding of the given shape."""


def _need(ok, message: str):
    if not ok:
        raise PackingError(message)


def as_codes(codes) -> np.ndarray:
    """An int tensor/ndarray as a numpy int8 array of the same shape, checking every value is -1, 0 or +1."""
    a = np.asarray(codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else codes)
    _need(a.dtype.kind in "iu", f"ternary codes must be integers, got dtype {a.dtype}")
    if a.size and (a.min() < -1 or a.max() > 1):
        raise PackingError(f"ternary codes must be in {{-1, 0, +1}}, found values in [{a.min()}, {a.max()}]")
    return a.astype(np.int8)


def code_counts(codes) -> dict:
    """How many codes are -1, 0 and +1: the one place the code mix is counted (fractions: `code_mix`)."""
    counts = np.bincount(as_codes(codes).reshape(-1).astype(np.int64) + 1, minlength=3)
    return {"-1": int(counts[0]), "0": int(counts[1]), "+1": int(counts[2])}


def code_mix(codes) -> dict:
    """Fractions of the codes equal to -1, 0 and +1 (0.0 each for no codes)."""
    counts = code_counts(codes)
    n = sum(counts.values())
    return {v: c / n if n else 0.0 for v, c in counts.items()}


def entropy_bits(codes) -> float:
    """Order-0 empirical entropy H = -sum_v p_v log2 p_v, in bits/weight (0 for no codes): n H / 8 bytes is the
    least a code treating the weights as independent draws can reach; a context model can go below it."""
    p = np.array(list(code_mix(codes).values()))
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def dequantize(codes: torch.Tensor, w_p: torch.Tensor, w_n: torch.Tensor) -> torch.Tensor:
    """W = w_p * [T = +1] - w_n * [T = -1] (TTQ, arXiv 1612.01064, Eq. 6), scales [1] or one per output channel."""
    shape = (-1,) + (1,) * (codes.ndim - 1)
    return (codes > 0) * w_p.float().reshape(shape) - (codes < 0) * w_n.float().reshape(shape)


class FixedRate:
    """`per_byte` codes per byte as base-`base` digits, first code least significant; `digits[code + 1]`."""

    def __init__(self, name: str, base: int, per_byte: int, digits):
        self.name, self.per_byte = name, per_byte
        self.digits = np.array(digits, np.uint16)
        self.powers = (base ** np.arange(per_byte)).astype(np.uint16)
        self.fields = np.arange(256)[:, None] // self.powers % base  # decode tables indexed by byte value
        self.valid = (np.arange(256) < base ** per_byte) & np.isin(self.fields, self.digits).all(1)
        self.code_of = np.zeros(base, np.int8)
        self.code_of[self.digits] = (-1, 0, 1)

    def nbytes(self, n: int) -> int:
        return -(-n // self.per_byte)

    def encode(self, codes, patch=None) -> bytes:
        a = as_codes(codes).reshape(-1)
        digits = np.pad(self.digits[a + 1], (0, -a.size % self.per_byte)).reshape(-1, self.per_byte)
        return (digits @ self.powers).astype(np.uint8).tobytes()

    def decode(self, data: bytes, shape) -> np.ndarray:
        b, n = np.frombuffer(data, dtype=np.uint8), math.prod(shape)
        _need(b.size == self.nbytes(n), f"{self.name} block holds {b.size} bytes, {n} codes need {self.nbytes(n)}")
        bad = np.flatnonzero(~self.valid[b])
        if bad.size:
            raise PackingError(f"invalid {self.name} byte 0x{b[bad[0]]:02x} at byte {bad[0]}")
        fields = self.fields[b].reshape(-1)
        _need(not fields[n:].any(), f"non-zero padding after the last {self.name} code")
        return self.code_of[fields[:n]].reshape(shape)


# ---------------------------------------------------------------- entropy code (docs section 4)
RANS_BITS = 8  # the frequencies of a context sum to 2^8
RANS_LOW = 1 << 16  # state interval [2^16, 2^24): a multiple of 2^8, so one byte renormalises
STATE_BYTES = 3
# Lanes: the largest divisor of O not above min(MAX_LANES, n // LANE_CODES) (LeNet-5's fc1: 64).
MAX_LANES, LANE_CODES, MAX_CLASSES = 64, 2048, 16
MAX_STEPS = 1 << 15  # codes per lane a decoder accepts (fc1: 8,192), bounding its loop
_NONE = 3  # a(missing neighbour)
_HEADER = 5  # K, patch H, patch W, uint16 lane count
_UNUSED_CONTEXT = (85, 86, 85)  # frequencies for a context a class never meets


def _contexts(sym: np.ndarray, patch) -> np.ndarray:
    """Context 4 a(left) + a(up) of every symbol of sym [O, R], each row split into H x W patches in C order."""
    s = sym.reshape(sym.shape[0], -1, *patch)
    left, up = np.full_like(s, _NONE), np.full_like(s, _NONE)
    left[..., 1:] = s[..., :-1]
    up[..., 1:, :] = s[..., :-1, :]
    return (4 * left + up).reshape(sym.shape)


def _table(counts: np.ndarray) -> np.ndarray:
    """Symbol counts per context [16, 3] -> frequencies [16, 3]: integers >= 1 summing to 256, about 256 p."""
    total = counts.sum(1, keepdims=True)
    table = np.maximum(1, np.rint(counts * 256 / np.maximum(total, 1))).astype(np.int64)
    table[total[:, 0] == 0] = _UNUSED_CONTEXT
    table[np.arange(16), table.argmax(1)] += 256 - table.sum(1)  # the largest entry absorbs the rounding
    return table


def _row_classes(row_counts: np.ndarray, k: int) -> np.ndarray:
    """Rows (symbol counts per context, [O, 16, 3]) into k classes, k-means style: k equal groups by zero
    fraction, then alternately a table per class and each row to the class coding it in the fewest bits."""
    zeros = row_counts[:, :, 1].sum(1) / np.maximum(row_counts.sum((1, 2)), 1)
    classes = np.argsort(np.argsort(zeros, kind="stable"), kind="stable") * k // len(row_counts)
    for _ in range(8):
        logs = np.log2(np.stack([_table(row_counts[classes == j].sum(0)) for j in range(k)]) / 256)
        classes = (-(row_counts[:, None] * logs[None]).sum((2, 3))).argmin(1)
    return classes


def pack_entropy(codes, patch=(1, 1)) -> bytes:
    """Codes [O, ...] -> context-modelled rANS block. `patch` (H, W) splits each row (a conv's kernel, the
    feature map a linear layer reads); any patch that tiles the row decodes exactly, the right one codes smaller."""
    a = as_codes(codes)
    _need(a.ndim >= 1 and a.size > 0, "the entropy code needs a non-empty array of codes")
    rows, (height, width) = a.shape[0], patch
    sym = a.reshape(rows, -1).astype(np.int64) + 1
    _need(1 <= height <= 255 and 1 <= width <= 255 and sym.shape[1] % (height * width) == 0,
          f"patch {height}x{width} does not tile rows of {sym.shape[1]} codes")
    ctx = _contexts(sym, patch)
    row_counts = np.stack([np.bincount(row, minlength=48) for row in 3 * ctx + sym]).reshape(rows, 16, 3)
    candidates = []
    for k in (1, 2, 4, 8, 16)[:rows.bit_length()]:  # the class count giving the smallest block, tables included
        classes = _row_classes(row_counts, k)
        tables = np.stack([_table(row_counts[classes == j].sum(0)) for j in range(k)])
        bits = -(row_counts * np.log2(tables[classes] / 256)).sum() + 8 * 32 * k + (k - 1).bit_length() * rows
        candidates.append((bits, k, classes, tables))
    _, k, classes, tables = min(candidates, key=lambda c: c[0])  # the first of equals, as a strict < would keep
    lanes = max(d for d in range(1, max(1, min(MAX_LANES, a.size // LANE_CODES)) + 1) if rows % d == 0)
    freq, cum = (v[classes[:, None], ctx, sym].reshape(lanes, -1).T.copy()  # [step, lane], of each code
                 for v in (tables, np.cumsum(tables, -1) - tables))
    limit, x, out = freq * RANS_LOW, np.full(lanes, RANS_LOW, np.int64), []
    for t in range(freq.shape[0] - 1, -1, -1):  # encode backwards so that the decoder runs forwards
        emit = x >= limit[t]
        out.append(x[emit])  # lanes ascending: the order the decoder reads them at step t
        np.right_shift(x, 8, out=x, where=emit)
        q, r = np.divmod(x, freq[t])
        x = (q << RANS_BITS) + r + cum[t]
    class_ids = np.unpackbits(classes.astype("<u2").view(np.uint8).reshape(rows, 2), axis=1, bitorder="little")
    class_ids = np.packbits(class_ids[:, :(k - 1).bit_length()].reshape(-1), bitorder="little")
    states = (x[:, None] >> (8 * np.arange(STATE_BYTES))) & 255
    header = [bytes([k, height, width]), lanes.to_bytes(2, "little"), tables[:, :, :2].astype(np.uint8).tobytes()]
    return b"".join([*header, class_ids.tobytes(), states.astype(np.uint8).tobytes(),
                     (np.concatenate(out[::-1]) & 255).astype(np.uint8).tobytes()])


def unpack_entropy(data: bytes, shape) -> np.ndarray:
    """Inverse of `pack_entropy`: int8 codes of `shape`; PackingError on any block that is not exactly valid."""
    b = np.frombuffer(data, dtype=np.uint8)
    rows, n = int(shape[0]), math.prod(shape)
    row_len = n // rows
    _need(b.size >= _HEADER, f"entropy block of {b.size} bytes is shorter than its {_HEADER}-byte header")
    k, height, width, lanes = int(b[0]), int(b[1]), int(b[2]), int(b[3]) | int(b[4]) << 8
    _need(1 <= k <= min(MAX_CLASSES, rows), f"{k} row classes for {rows} rows (1 to {min(MAX_CLASSES, rows)})")
    _need(height and width and row_len % (height * width) == 0,
          f"patch {height}x{width} does not tile rows of {row_len} codes")
    _need(lanes and rows % lanes == 0 and n // lanes <= MAX_STEPS, f"{lanes} lanes for {rows} rows of {row_len} "
          f"codes: the lane count must divide the rows and leave at most {MAX_STEPS} codes per lane")
    class_bits = (k - 1).bit_length()
    class_end = _HEADER + 32 * k + -(-class_bits * rows // 8)
    body = class_end + STATE_BYTES * lanes
    _need(b.size >= body, f"entropy block of {b.size} bytes is shorter than its {body}-byte header")
    t2 = b[_HEADER:_HEADER + 32 * k].reshape(k, 16, 2).astype(np.int64)
    _need((t2 > 0).all() and (t2.sum(-1) <= 255).all(), "entropy table holds a zero frequency")
    tables = np.concatenate([t2, 256 - t2.sum(-1, keepdims=True)], -1)  # [K, 16, 3]
    bits = np.unpackbits(b[_HEADER + 32 * k:class_end], bitorder="little")
    classes = (bits[:class_bits * rows].reshape(rows, class_bits).astype(np.int64) << np.arange(class_bits)).sum(1)
    _need((classes < k).all() and not bits[class_bits * rows:].any(),
          f"row class outside 0..{k - 1}, or non-zero padding after the row classes")
    # decode tables indexed by 256 * (16 class + context) + slot: symbol, frequency, slot - cumulative frequency
    slot = np.arange(256)
    symbol = (slot >= tables[..., :1]).astype(np.int64) + (slot >= tables[..., :1] + tables[..., 1:2])
    freq = np.take_along_axis(tables, symbol, -1).reshape(-1)
    bias = (slot - np.take_along_axis(np.cumsum(tables, -1) - tables, symbol, -1)).reshape(-1)
    symbol = symbol.reshape(-1)
    x = (b[class_end:body].reshape(lanes, STATE_BYTES).astype(np.int64) << (8 * np.arange(STATE_BYTES))).sum(1)
    _need((x >= RANS_LOW).all(), f"rANS lane state below {RANS_LOW}")
    stream, pos, steps, patch_len = b[body:], 0, n // lanes, height * width
    lane_rows = np.arange(lanes) * (rows // lanes)
    out = np.empty((steps, lanes), np.int64)
    none_left, none_up = np.full(lanes, 4 * 256 * _NONE), np.full(lanes, 256 * _NONE)
    for t in range(steps):
        if t % row_len == 0:
            row_base = 4096 * classes[lane_rows + t // row_len]
        h, w = divmod(t % patch_len, width)
        at = row_base + (x & 255) + (1024 * out[t - 1] if w else none_left) + (256 * out[t - width] if h else none_up)
        out[t] = symbol[at]
        x = freq[at] * (x >> RANS_BITS) + bias[at]
        need = x < RANS_LOW
        m = int(np.count_nonzero(need))
        if m:
            _need(pos + m <= stream.size, "rANS stream ends before the last code")
            x[need] = (x[need] << 8) | stream[pos:pos + m]
            pos += m
    _need(pos == stream.size and (x == RANS_LOW).all(),
          "rANS stream does not end where its codes do (corrupt or extended block)")
    return (out.T.reshape(shape) - 1).astype(np.int8)


# encode(codes [O, ...], patch (H, W)) -> bytes; decode(bytes, shape) -> int8 codes; nbytes(n): exact block
# length, None for a variable-length code
ENCODINGS = {"2bit": FixedRate("2bit", 4, 4, (0b10, 0b00, 0b01)), "base3": FixedRate("base3", 3, 5, (0, 1, 2)),
             "entropy": SimpleNamespace(encode=pack_entropy, decode=unpack_entropy, nbytes=None)}


def get_codec(name: str):
    _need(name in ENCODINGS, f"unknown encoding {name!r}; valid: {', '.join(ENCODINGS)}")
    return ENCODINGS[name]
