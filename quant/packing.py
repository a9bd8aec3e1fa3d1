"""Codecs for ternary codes (int8 values in {-1, 0, +1}): two fixed-rate codes and one context-modelled
entropy code, plus the order-0 entropy bound and the code mix. docs/deployment_format.md (sections 3 and 4)
specifies every bit; this docstring is the summary.

    2bit     4 codes per byte, 2 bits/weight. Field of code i = bits 2(i mod 4)..2(i mod 4)+1 of byte i // 4
             (first code lowest); 0b00 = 0, 0b01 = +1, 0b10 = -1, 0b11 invalid; padding fields 0b00.
    base3    5 codes per byte, 1.6 bits/weight (3^5 = 243 <= 256). Byte j = sum_i (code_{5j+i} + 1) * 3^i,
             first code least significant; bytes > 242 invalid; padding digits 0.
    entropy  a context model driving an interleaved rANS coder (Duda, arXiv 1311.2540, Sec. 3; interleaving
             as in Giesen, arXiv 1402.3392). A code's probability depends on its left and upper neighbour
             inside its patch (a conv's 5x5 kernel, the 4x4 feature map a row of fc1 reads) and on its output
             row's class (rows grouped by their code statistics, up to 16 tables per layer), so it lands
             below the order-0 entropy bound, which counts symbol frequencies only.

Every codec takes the codes of one layer in C order (shape [O, ...], O output channels) and returns `bytes`;
decoding needs the shape. Every byte string decodes to at most one code sequence and the decoders reject
anything else (invalid fields, non-zero padding, a rANS stream that does not end exactly where it should),
so a damaged block is never mis-decoded. All three are vectorised with NumPy; the entropy decoder loops over
the codes of one lane (n / G steps for G interleaved lanes: 8,192 for LeNet-5's fc1).
"""
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from .errors import QuantError

_POW4 = np.array([1, 4, 16, 64], dtype=np.uint16)
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint16)
_2BIT_FIELD_OF_CODE = np.array([0b10, 0b00, 0b01], dtype=np.uint16)  # indexed by code + 1
# decode tables indexed by byte value: fields (b // 4^i) % 4 and digits (b // 3^i) % 3
_2BIT_FIELDS = (np.arange(256)[:, None] // _POW4[None, :]) % 4
_2BIT_VALID = (_2BIT_FIELDS != 3).all(axis=1)
_2BIT_CODES = ((_2BIT_FIELDS & 1) - (_2BIT_FIELDS >> 1)).astype(np.int8)  # 0b11 rows are never used
_BASE3_DIGITS = ((np.arange(243)[:, None] // _POW3[None, :]) % 3).astype(np.int8)


class PackingError(QuantError, ValueError):
    """Codes outside {-1, 0, +1}, or packed bytes that are not a valid encoding of the given shape."""


def as_codes(codes) -> np.ndarray:
    """An int tensor/ndarray as a numpy int8 array of the same shape, checking every value is -1, 0 or +1."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    a = np.asarray(codes)
    if a.dtype.kind not in "iu":
        raise PackingError(f"ternary codes must be integers, got dtype {a.dtype}")
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
    """Order-0 empirical entropy H = -sum_v p_v log2 p_v over v in {-1, 0, +1}, in bits/weight (0 for no codes).

    n * H / 8 bytes is the least a code that treats the weights as independent draws from the layer's
    symbol frequencies can reach; a context model (the entropy codec) can go below it.
    """
    p = np.array(list(code_mix(codes).values()))
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


# ---------------------------------------------------------------- fixed-rate codes

def nbytes_2bit(n: int) -> int:
    """ceil(n / 4)."""
    return -(-n // 4)


def nbytes_base3(n: int) -> int:
    """ceil(n / 5)."""
    return -(-n // 5)


def pack_2bit(codes) -> bytes:
    """Codes -> 2-bit fields (0 -> 0b00, +1 -> 0b01, -1 -> 0b10), four per byte, first code lowest."""
    a = as_codes(codes).reshape(-1)
    fields = np.pad(_2BIT_FIELD_OF_CODE[a + 1], (0, -a.size % 4)).reshape(-1, 4)
    return (fields @ _POW4).astype(np.uint8).tobytes()  # byte = sum_i field_i * 4^i


def unpack_2bit(data: bytes, n: int) -> np.ndarray:
    """Inverse of `pack_2bit`: int8 codes [n]; PackingError on a wrong length, a 0b11 field or non-zero padding."""
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size != nbytes_2bit(n):
        raise PackingError(f"2-bit block holds {b.size} bytes, {n} codes need {nbytes_2bit(n)}")
    bad = np.flatnonzero(~_2BIT_VALID[b])
    if bad.size:
        raise PackingError(f"invalid 2-bit field 0b11 in byte {bad[0]} (0x{b[bad[0]]:02x})")
    codes = _2BIT_CODES[b].reshape(-1)
    if codes[n:].any():
        raise PackingError("non-zero padding after the last 2-bit code")
    return codes[:n]


def pack_base3(codes) -> bytes:
    """Codes -> base-3 bytes, byte = sum_i (code_i + 1) * 3^i over 5 codes, first code least significant."""
    a = as_codes(codes).reshape(-1)
    digits = np.pad((a + 1).astype(np.uint16), (0, -a.size % 5)).reshape(-1, 5)
    return (digits @ _POW3).astype(np.uint8).tobytes()


def unpack_base3(data: bytes, n: int) -> np.ndarray:
    """Inverse of `pack_base3`: int8 codes [n]; PackingError on a wrong length, a byte > 242 or non-zero padding."""
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size != nbytes_base3(n):
        raise PackingError(f"base-3 block holds {b.size} bytes, {n} codes need {nbytes_base3(n)}")
    bad = np.flatnonzero(b > 242)
    if bad.size:
        raise PackingError(f"invalid base-3 byte {b[bad[0]]} > 242 at byte {bad[0]}")
    digits = _BASE3_DIGITS[b].reshape(-1)
    if digits[n:].any():
        raise PackingError("non-zero padding digits after the last base-3 code")
    return digits[:n] - 1


# ---------------------------------------------------------------- entropy code: context model + rANS
#
# Symbols s = code + 1 (0: -1, 1: 0, 2: +1). Context of a code: c = 4 a(left) + a(up), its neighbours one
# column left and one row up inside its H x W patch, a(neighbour) = its symbol, a(no neighbour) = 3 (16
# contexts). Each output row belongs to one of K classes; class k codes a symbol in context c with the
# frequencies t[k][c][0..2] (each >= 1, sum 2^8). Coder: byte-wise rANS with state in [2^16, 2^24) and
# G interleaved lanes; lane j holds rows j O/G .. (j+1) O/G - 1 and decodes one code per step.

RANS_BITS = 8  # frequency precision: the frequencies of a context sum to 2^8
RANS_LOW = 1 << 16  # state interval [RANS_LOW, 256 RANS_LOW): a multiple of 2^8, so one byte renormalises
STATE_BYTES = 3
# The encoder's lane count: the largest divisor of O not above min(MAX_LANES, n // LANE_CODES). Each lane
# costs its 3-byte state; each code per lane one step of the decoder's loop (LeNet-5: 64 lanes for fc1).
MAX_LANES = 64
LANE_CODES = 2048
MAX_CLASSES = 16
MAX_STEPS = 1 << 15  # codes per lane a decoder accepts (LeNet-5's fc1: 8,192), bounding its loop
_NONE = 3
_FIXED_HEADER = 5  # K, patch H, patch W, uint16 lane count
_UNUSED_CONTEXT = (85, 86, 85)  # frequencies for a context a class never meets


def _contexts(sym: np.ndarray, patch) -> np.ndarray:
    """Context 4 a(left) + a(up) of every symbol of sym [O, R], each row split into H x W patches in C order."""
    height, width = patch
    s = sym.reshape(sym.shape[0], -1, height, width)
    left = np.full_like(s, _NONE)
    left[..., 1:] = s[..., :-1]
    up = np.full_like(s, _NONE)
    up[..., 1:, :] = s[..., :-1, :]
    return (4 * left + up).reshape(sym.shape)


def _table(counts: np.ndarray) -> np.ndarray:
    """Symbol counts per context [16, 3] -> frequencies [16, 3]: integers >= 1 summing to 256, about 256 p."""
    total = counts.sum(1, keepdims=True)
    table = np.maximum(1, np.rint(counts * 256 / np.maximum(total, 1))).astype(np.int64)
    table[total[:, 0] == 0] = _UNUSED_CONTEXT
    table[np.arange(16), table.argmax(1)] += 256 - table.sum(1)  # the largest entry absorbs the rounding
    return table


def _row_classes(row_counts: np.ndarray, k: int, rounds: int = 8) -> np.ndarray:
    """Assign each row (its symbol counts per context, [O, 16, 3]) to one of k classes, k-means style.

    Starts from k equal groups by zero fraction and alternates fitting a table per class with moving each
    row to the class that codes it in the fewest bits. An encoder's choice only: the block stores the result.
    """
    rows = row_counts.shape[0]
    zeros = row_counts[:, :, 1].sum(1) / np.maximum(row_counts.sum((1, 2)), 1)
    classes = np.argsort(np.argsort(zeros, kind="stable"), kind="stable") * k // rows
    for _ in range(rounds):
        logs = np.log2(np.stack([_table(row_counts[classes == j].sum(0)) for j in range(k)]) / 256)
        classes = (-(row_counts[:, None] * logs[None]).sum((2, 3))).argmin(1)
    return classes


def _class_bits(k: int) -> int:
    return (k - 1).bit_length()


def pack_entropy(codes, patch=(1, 1)) -> bytes:
    """Codes [O, ...] -> context-modelled rANS block (layout in docs/deployment_format.md, "entropy").

    `patch` (H, W): each output row's codes, in C order, are H x W patches (a conv's kernel, the feature map
    a linear layer reads). Any patch that divides the row length decodes exactly; the right one codes smaller.
    """
    a = as_codes(codes)
    if a.ndim < 1 or a.size == 0:
        raise PackingError("the entropy code needs a non-empty array of codes")
    rows = a.shape[0]
    sym = a.reshape(rows, -1).astype(np.int64) + 1
    height, width = patch
    if not (1 <= height <= 255 and 1 <= width <= 255 and sym.shape[1] % (height * width) == 0):
        raise PackingError(f"patch {height}x{width} does not tile rows of {sym.shape[1]} codes")
    ctx = _contexts(sym, patch)
    row_counts = np.zeros((rows, 16 * 3), np.int64)
    np.add.at(row_counts, (np.repeat(np.arange(rows), sym.shape[1]), (3 * ctx + sym).reshape(-1)), 1)
    row_counts = row_counts.reshape(rows, 16, 3)
    best = None
    for k in (1, 2, 4, 8, 16):  # the class count that gives the smallest block (tables and class ids included)
        if k > rows:
            break
        classes = _row_classes(row_counts, k) if k > 1 else np.zeros(rows, np.int64)
        tables = np.stack([_table(row_counts[classes == j].sum(0)) for j in range(k)])
        bits = -(row_counts * np.log2(tables[classes] / 256)).sum() + 8 * 32 * k + _class_bits(k) * rows
        if best is None or bits < best[0]:
            best = (bits, k, classes, tables)
    _, k, classes, tables = best
    freq = tables[classes[:, None], ctx, sym]  # [O, R]: the frequency and cumulative frequency of each code
    cum = (np.cumsum(tables, -1) - tables)[classes[:, None], ctx, sym]
    lanes = max(d for d in range(1, max(1, min(MAX_LANES, a.size // LANE_CODES)) + 1) if rows % d == 0)
    freq, cum = freq.reshape(lanes, -1).T.copy(), cum.reshape(lanes, -1).T.copy()  # [step, lane]
    limit = freq * RANS_LOW
    x = np.full(lanes, RANS_LOW, np.int64)
    out = []
    for t in range(freq.shape[0] - 1, -1, -1):  # encode backwards so that the decoder runs forwards
        emit = x >= limit[t]
        out.append(x[emit])  # lanes ascending: the order the decoder reads them at step t (low byte kept below)
        np.right_shift(x, 8, out=x, where=emit)
        q, r = np.divmod(x, freq[t])
        x = (q << RANS_BITS) + r + cum[t]
    class_ids = np.unpackbits(classes.astype("<u2").view(np.uint8).reshape(rows, 2), axis=1, bitorder="little")
    class_ids = np.packbits(class_ids[:, :_class_bits(k)].reshape(-1), bitorder="little")
    states = (x[:, None] >> (8 * np.arange(STATE_BYTES))) & 255
    return b"".join([bytes([k, height, width]), lanes.to_bytes(2, "little"),
                     tables[:, :, :2].astype(np.uint8).tobytes(), class_ids.tobytes(),
                     states.astype(np.uint8).tobytes(), (np.concatenate(out[::-1]) & 255).astype(np.uint8).tobytes()])


def unpack_entropy(data: bytes, shape) -> np.ndarray:
    """Inverse of `pack_entropy`: int8 codes of `shape`; PackingError on any block that is not exactly valid."""
    b = np.frombuffer(data, dtype=np.uint8)
    rows, n = int(shape[0]), int(np.prod(shape, dtype=object))
    row_len = n // rows
    if b.size < _FIXED_HEADER:
        raise PackingError(f"entropy block of {b.size} bytes is shorter than its {_FIXED_HEADER}-byte header")
    k, height, width = (int(v) for v in b[:3])
    lanes = int(b[3]) | int(b[4]) << 8
    if not 1 <= k <= min(MAX_CLASSES, rows):
        raise PackingError(f"{k} row classes for {rows} rows (1 to {min(MAX_CLASSES, rows)})")
    if not (height and width and row_len % (height * width) == 0):
        raise PackingError(f"patch {height}x{width} does not tile rows of {row_len} codes")
    if not (lanes and rows % lanes == 0 and n // lanes <= MAX_STEPS):
        raise PackingError(f"{lanes} lanes for {rows} rows of {row_len} codes: the lane count must divide the "
                           f"rows and leave at most {MAX_STEPS} codes per lane")
    class_end = _FIXED_HEADER + 32 * k + -(-_class_bits(k) * rows // 8)
    body = class_end + STATE_BYTES * lanes
    if b.size < body:
        raise PackingError(f"entropy block of {b.size} bytes is shorter than its {body}-byte header")
    t2 = b[_FIXED_HEADER:_FIXED_HEADER + 32 * k].reshape(k, 16, 2).astype(np.int64)
    if (t2 == 0).any() or (t2.sum(-1) > 255).any():
        raise PackingError("entropy table holds a zero frequency")
    tables = np.concatenate([t2, 256 - t2.sum(-1, keepdims=True)], -1)  # [K, 16, 3]
    bits = np.unpackbits(b[_FIXED_HEADER + 32 * k:class_end], bitorder="little")
    class_bits = _class_bits(k)
    classes = (bits[:class_bits * rows].reshape(rows, class_bits).astype(np.int64) << np.arange(class_bits)).sum(1)
    if (classes >= k).any() or bits[class_bits * rows:].any():
        raise PackingError(f"row class outside 0..{k - 1}, or non-zero padding after the row classes")
    # decode tables indexed by 256 * (16 class + context) + slot: symbol, frequency, slot - cumulative frequency
    slot = np.arange(256)
    symbol = (slot >= tables[..., :1]).astype(np.int64) + (slot >= tables[..., :1] + tables[..., 1:2])
    freq = np.take_along_axis(tables, symbol, -1).reshape(-1)
    bias = (slot - np.take_along_axis(np.cumsum(tables, -1) - tables, symbol, -1)).reshape(-1)
    symbol = symbol.reshape(-1)
    x = (b[class_end:body].reshape(lanes, STATE_BYTES).astype(np.int64) << (8 * np.arange(STATE_BYTES))).sum(1)
    if (x < RANS_LOW).any():
        raise PackingError(f"rANS lane state below {RANS_LOW}")
    stream, pos = b[body:], 0
    steps, patch_len, rows_per_lane = n // lanes, height * width, rows // lanes
    lane_rows = np.arange(lanes) * rows_per_lane
    out = np.empty((steps, lanes), np.int64)
    none_left, none_up = np.full(lanes, 4 * 256 * _NONE), np.full(lanes, 256 * _NONE)
    for t in range(steps):
        if t % row_len == 0:
            row_base = 4096 * classes[lane_rows + t // row_len]
        h, w = divmod(t % patch_len, width)
        at = row_base + (1024 * out[t - 1] if w else none_left) + (256 * out[t - width] if h else none_up) + (x & 255)
        out[t] = symbol[at]
        x = freq[at] * (x >> RANS_BITS) + bias[at]
        need = x < RANS_LOW
        m = int(np.count_nonzero(need))
        if m:
            if pos + m > stream.size:
                raise PackingError("rANS stream ends before the last code")
            x[need] = (x[need] << 8) | stream[pos:pos + m]
            pos += m
    if pos != stream.size or (x != RANS_LOW).any():
        raise PackingError("rANS stream does not end where its codes do (corrupt or extended block)")
    return (out.T.reshape(shape) - 1).astype(np.int8)


# ---------------------------------------------------------------- registry

class Codec(NamedTuple):
    encode: Callable  # (codes [O, ...], patch (H, W)) -> bytes
    decode: Callable  # (bytes, shape) -> int8 ndarray of that shape
    nbytes: Callable | None  # code count -> exact block length, or None for a variable-length code


def _fixed(pack, unpack) -> tuple:
    return (lambda codes, patch=(1, 1): pack(codes),
            lambda data, shape: unpack(data, int(np.prod(shape, dtype=object))).reshape(shape))


ENCODINGS = {
    "2bit": Codec(*_fixed(pack_2bit, unpack_2bit), nbytes_2bit),
    "base3": Codec(*_fixed(pack_base3, unpack_base3), nbytes_base3),
    "entropy": Codec(pack_entropy, unpack_entropy, None),
}


def get_codec(name: str) -> Codec:
    """Look up an encoding by name (2bit, base3 or entropy)."""
    if name not in ENCODINGS:
        raise PackingError(f"unknown encoding {name!r}; valid: {', '.join(ENCODINGS)}")
    return ENCODINGS[name]
