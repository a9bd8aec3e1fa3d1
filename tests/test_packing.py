"""quant/packing.py: round trips, byte-identical agreement with one-code-at-a-time references, every
invalid byte rejected, and the entropy bound against hand computations (METHODS.md §5)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import packing
from quant.packing import PackingError

LENGTHS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 1001, 1003]
ENCODINGS = list(packing.ENCODINGS)


def pack_2bit_reference(codes) -> bytes:
    """Deliberately slow: code i sets field 0b00 / 0b01 / 0b10 for 0 / +1 / -1 at bit 2*(i % 4) of byte i // 4."""
    out = bytearray((len(codes) + 3) // 4)
    for i, c in enumerate(codes):
        out[i // 4] |= {0: 0b00, 1: 0b01, -1: 0b10}[int(c)] << (2 * (i % 4))
    return bytes(out)


def pack_base3_reference(codes) -> bytes:
    """Deliberately slow: byte i // 5 accumulates (code + 1) * 3^(i % 5)."""
    out = bytearray((len(codes) + 4) // 5)
    for i, c in enumerate(codes):
        out[i // 5] += (int(c) + 1) * 3 ** (i % 5)
    return bytes(out)


REFERENCES = {"2bit": pack_2bit_reference, "base3": pack_base3_reference}


def random_codes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1, 2, n).astype(np.int8)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_and_reference(encoding, n):
    codec = packing.get_codec(encoding)
    codes = random_codes(n, seed=n)
    data = codec.encode(codes)
    assert data == REFERENCES[encoding](codes)
    assert len(data) == math.ceil(n * {"2bit": 2, "base3": 1.6}[encoding] / 8) == codec.nbytes(n)
    decoded = codec.decode(data, n)
    assert decoded.dtype == np.int8 and np.array_equal(decoded, codes)
    # torch int8 input of any shape packs the same as its flattened numpy form
    assert codec.encode(torch.from_numpy(codes).reshape(-1, 1)) == data


@settings(max_examples=200, deadline=None)
@given(codes=st.lists(st.sampled_from([-1, 0, 1]), max_size=64), encoding=st.sampled_from(ENCODINGS))
def test_round_trip_property(codes, encoding):
    codec = packing.get_codec(encoding)
    data = codec.encode(np.array(codes, dtype=np.int8))
    assert data == REFERENCES[encoding](codes)
    assert codec.decode(data, len(codes)).tolist() == codes


def test_hand_packed_bytes():
    # 2-bit: fields of [0, +1, -1, 0] at bits 0, 2, 4, 6 -> 0b00_10_01_00
    assert packing.pack_2bit(np.array([0, 1, -1, 0], np.int8)) == bytes([0b00100100])
    assert packing.pack_2bit(np.array([-1] * 4 + [1], np.int8)) == bytes([0b10101010, 0b01])
    # base-3: digits [0, 1, 2, 0, 1] -> 0 + 1*3 + 2*9 + 0*27 + 1*81 = 102; all +1 -> 242
    assert packing.pack_base3(np.array([-1, 0, 1, -1, 0], np.int8)) == bytes([102])
    assert packing.pack_base3(np.array([1] * 5 + [0], np.int8)) == bytes([242, 1])


def test_lenet_sizes_match_methods_sheet():
    # METHODS.md §5: 581,408 weights -> 145,352 B (2-bit), 116,282 B (5 per byte)
    assert packing.nbytes_2bit(581_408) == 145_352
    assert packing.nbytes_base3(581_408) == 116_282


def test_every_2bit_byte():
    """All 256 bytes as 4 codes: exactly those without a 0b11 field decode, and re-encode to themselves."""
    valid = 0
    for b in range(256):
        fields = [(b >> (2 * i)) & 3 for i in range(4)]
        if 3 in fields:
            with pytest.raises(PackingError, match="0b11"):
                packing.unpack_2bit(bytes([b]), 4)
        else:
            valid += 1
            codes = packing.unpack_2bit(bytes([b]), 4)
            assert codes.tolist() == [{0: 0, 1: 1, 2: -1}[f] for f in fields]
            assert packing.pack_2bit(codes) == bytes([b])
    assert valid == 3 ** 4


def test_every_base3_byte():
    """All 256 bytes as 5 codes: 0..242 decode and re-encode to themselves, 243..255 are rejected."""
    for b in range(256):
        if b > 242:
            with pytest.raises(PackingError, match="> 242"):
                packing.unpack_base3(bytes([b]), 5)
        else:
            codes = packing.unpack_base3(bytes([b]), 5)
            assert sum((c + 1) * 3 ** i for i, c in enumerate(codes.tolist())) == b
            assert packing.pack_base3(codes) == bytes([b])


@pytest.mark.parametrize("encoding, data, n", [
    ("2bit", bytes([0b01000000]), 3),   # 4th field of a 3-code byte must be 0b00
    ("2bit", bytes([0, 0b0100]), 5),    # 2nd byte holds 1 code; field 1 is padding
    ("base3", bytes([3]), 1),           # one code: byte must be < 3
    ("base3", bytes([9]), 2),           # two codes: byte must be < 9
    ("base3", bytes([0, 81]), 9),       # 2nd byte holds 4 codes: must be < 81
])
def test_nonzero_padding_rejected(encoding, data, n):
    with pytest.raises(PackingError, match="padding"):
        packing.get_codec(encoding).decode(data, n)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_wrong_length_rejected(encoding):
    codec = packing.get_codec(encoding)
    data = codec.encode(random_codes(11))
    for bad in (data[:-1], data + b"\0", b""):
        with pytest.raises(PackingError, match="bytes"):
            codec.decode(bad, 11)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("codes", [np.array([0, 2, 1]), np.array([-2]), np.array([0.0, 1.0]),
                                   torch.tensor([1, 0, 127], dtype=torch.int8)])
def test_non_ternary_codes_rejected(encoding, codes):
    with pytest.raises(PackingError):
        packing.get_codec(encoding).encode(codes)


def test_unknown_encoding_lists_valid_names():
    with pytest.raises(PackingError, match="2bit, base3"):
        packing.get_codec("3bit")


def test_entropy_hand_computed():
    # p = (1/4, 1/2, 1/4): H = 2 * (1/4 * 2) + 1/2 * 1 = 1.5
    assert packing.entropy_bits(np.array([-1, 0, 0, 1])) == pytest.approx(1.5)
    assert packing.entropy_bits(np.zeros(7, np.int8)) == 0.0
    assert packing.entropy_bits(np.array([], np.int8)) == 0.0
    assert packing.entropy_bits(np.array([-1, 0, 1] * 5)) == pytest.approx(math.log2(3))
    # METHODS.md §5: sparsity s with +-1 equally likely gives H(s) = h2(s) + (1 - s); s = 0.6 -> 1.371
    codes = np.array([0] * 6 + [1] * 2 + [-1] * 2)
    h2 = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    assert packing.entropy_bits(torch.from_numpy(codes)) == pytest.approx(h2 + 0.4)
    assert round(h2 + 0.4, 3) == 1.371
