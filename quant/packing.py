"""Fixed-rate codecs for ternary codes (int8 values in {-1, 0, +1}, any length), plus their entropy bound.

Both codecs take the codes flattened in C order and return `bytes`; decoding needs the code count `n`.

2-bit, 4 codes per byte (2 bits/weight). Field of code i = bits 2(i mod 4)..2(i mod 4)+1 of byte i // 4,
so the first code sits in the lowest two bits (byte j = sum_{i=0..3} f_{4j+i} * 4^i).
Field map: bit 0 = "is +1", bit 1 = "is -1":

    0b00 = 0      0b01 = +1      0b10 = -1      0b11 = invalid (decode error)

Padding fields of the last byte are 0b00; anything else there is a decode error.

Base-3, 5 codes per byte (1.6 bits/weight; METHODS.md §5: 3^5 = 243 <= 256, 99.06 % of the log2(3) limit).
Digit d = code + 1 in {0, 1, 2}; byte j = sum_{i=0..4} d_{5j+i} * 3^i, first code least significant.
Bytes > 242 are invalid. Padding digits are 0, so a last byte holding r < 5 codes must be < 3^r.

Both are vectorised (table lookups and one small matrix product, no Python loop per code): LeNet-5's
581,408 codes pack or unpack in about 1-2 ms. Every byte string decodes to at most one code sequence and
every code sequence has exactly one encoding (the decoders reject non-canonical padding), so
pack(unpack(b)) == b whenever unpack succeeds.
"""
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

_POW4 = np.array([1, 4, 16, 64], dtype=np.uint16)
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint16)
_2BIT_FIELD_OF_CODE = np.array([0b10, 0b00, 0b01], dtype=np.uint16)  # indexed by code + 1
# decode tables indexed by byte value: fields (b // 4^i) % 4 and digits (b // 3^i) % 3
_2BIT_FIELDS = (np.arange(256)[:, None] // _POW4[None, :]) % 4
_2BIT_VALID = (_2BIT_FIELDS != 3).all(axis=1)
_2BIT_CODES = ((_2BIT_FIELDS & 1) - (_2BIT_FIELDS >> 1)).astype(np.int8)  # 0b11 rows are never used
_BASE3_DIGITS = ((np.arange(243)[:, None] // _POW3[None, :]) % 3).astype(np.int8)


class PackingError(ValueError):
    """Codes outside {-1, 0, +1}, or packed bytes that are not a valid encoding of n codes."""


def as_codes(codes) -> np.ndarray:
    """Flatten an int tensor/ndarray to a 1-D numpy int8 array, checking every value is -1, 0 or +1."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    a = np.asarray(codes).reshape(-1)
    if a.dtype.kind not in "iu":
        raise PackingError(f"ternary codes must be integers, got dtype {a.dtype}")
    if a.size and (a.min() < -1 or a.max() > 1):
        raise PackingError(f"ternary codes must be in {{-1, 0, +1}}, found values in [{a.min()}, {a.max()}]")
    return a.astype(np.int8)


def nbytes_2bit(n: int) -> int:
    """ceil(n / 4)."""
    return -(-n // 4)


def nbytes_base3(n: int) -> int:
    """ceil(n / 5)."""
    return -(-n // 5)


def pack_2bit(codes) -> bytes:
    """Codes -> 2-bit fields (0 -> 0b00, +1 -> 0b01, -1 -> 0b10), four per byte, first code lowest."""
    a = as_codes(codes)
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
    a = as_codes(codes)
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


class Codec(NamedTuple):
    encode: Callable  # codes -> bytes
    decode: Callable  # (bytes, n) -> int8 ndarray [n]
    nbytes: Callable  # n -> packed length in bytes


ENCODINGS = {
    "2bit": Codec(pack_2bit, unpack_2bit, nbytes_2bit),
    "base3": Codec(pack_base3, unpack_base3, nbytes_base3),
}


def get_codec(name: str) -> Codec:
    """Look up an encoding by name ("2bit" or "base3")."""
    if name not in ENCODINGS:
        raise PackingError(f"unknown encoding {name!r}; valid: {', '.join(ENCODINGS)}")
    return ENCODINGS[name]


def entropy_bits(codes) -> float:
    """Empirical entropy H = -sum_v p_v log2 p_v over v in {-1, 0, +1}, in bits/weight (0 for no codes).

    n * H / 8 bytes is the least any code for this fixed model's symbol frequencies can reach
    (an order-0 entropy coder); fixed-rate codes cannot go below log2(3) = 1.585.
    """
    a = as_codes(codes)
    if a.size == 0:
        return 0.0
    p = np.bincount(a.astype(np.int64) + 1, minlength=3) / a.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())
