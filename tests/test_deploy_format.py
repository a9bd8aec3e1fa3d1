"""quant/deploy_format.py: round trips, the file-only loader against rebuild_model (with and without BN
folding, negative gamma included), exact sizes, a decoder written from docs/deployment_format.md alone
(tests/spec_decoder.py) agreeing on every encoding, the worked example of that document, and rejection of
every corrupt, inconsistent or crafted file as one DeployFormatError line, fast and in bounded memory.

The file layout is re-derived here from the specification (struct + hashlib), not borrowed from the module.
"""
import copy
import functools
import hashlib
import json
import math
import re
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spec_decoder
from quant import deploy_format as df
from quant.data import normalise
from quant.deploy_format import DeployFormatError
from quant.export import build_export, dequantize, rebuild_model
from quant.model import BN_OF_LAYER, LeNet5
from quant.packing import ENCODINGS as CODECS

ENCODINGS = list(CODECS)

ROOT = Path(__file__).resolve().parents[1]
MAGIC = b"TERNLNT\0"
FAN_IN = {"conv1": 25, "conv2": 800, "fc1": 1024, "fc2": 512}
N_BIASES = 32 + 64 + 512 + 10


@functools.lru_cache(maxsize=None)
def make_export(variant: str, seed: int = 0) -> dict:
    """A LeNet5 export with random codes and scales (~1/sqrt(fan_in), so logits are O(1..10)) and random BN.

    "all": the four layers ternary, per-layer scales w_p != w_n (as TTQ).  "twn": the same with w_p = w_n.
    "mixed": conv1 kept FP, conv2 per-channel scales, fc1 and fc2 per-layer.  Both BNs get non-trivial
    running stats and some negative gammas.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LeNet5()
    for bn in (model.bn1, model.bn2):
        c = bn.num_features
        bn.weight.data = torch.randn(c, generator=gen) * 0.5 + 1.0
        bn.weight.data[::3] *= -1  # gamma < 0 on a third of the channels
        bn.bias.data = torch.randn(c, generator=gen) * 0.3
        bn.running_mean = torch.randn(c, generator=gen) * 0.5
        bn.running_var = torch.rand(c, generator=gen) * 1.5 + 0.25
        bn.num_batches_tracked.fill_(123)
    for _, layer in model.quant_layers():
        layer.bias.data = torch.randn(layer.bias.shape, generator=gen) * 0.1
    ternary = {}
    for name, layer in model.quant_layers():
        if variant == "mixed" and name == "conv1":
            continue
        shape = layer.weight.shape
        codes = (torch.rand(shape, generator=gen) * 3).floor().to(torch.int8) - 1
        groups = shape[0] if (variant == "mixed" and name == "conv2") else 1
        scale = lambda: (torch.rand(groups, generator=gen) + 0.5) / math.sqrt(FAN_IN[name])
        w_p = scale()
        ternary[name] = {"codes": codes, "w_p": w_p, "w_n": w_p.clone() if variant == "twn" else scale(),
                         "delta": torch.zeros(groups)}
    return build_export(model, ternary)


def inputs(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def packed(variant: str, encoding: str, fold_bn: bool, float_dtype: str = "fp32") -> bytes:
    return df.pack(make_export(variant), encoding, fold_bn, float_dtype)


@functools.lru_cache(maxsize=None)
def reference_logits(variant: str) -> torch.Tensor:
    """Logits of quant.export.rebuild_model (the training-side model) on `inputs()`."""
    with torch.no_grad():
        return rebuild_model(make_export(variant))(inputs())


def split(data: bytes) -> tuple[dict, bytes]:
    """(manifest, payload) by the documented layout: magic 8 | uint16 version | uint32 M | zlib manifest | payload | sha256."""
    (manifest_len,) = struct.unpack_from("<I", data, 10)
    return json.loads(zlib.decompress(data[14:14 + manifest_len])), data[14 + manifest_len:-32]


def seal(manifest, payload: bytes, magic: bytes = MAGIC, version: int = 2, raw_manifest: bytes | None = None) -> bytes:
    """A file with a correct digest around whatever manifest/payload/magic/version a test wants to check."""
    body = raw_manifest if raw_manifest is not None else zlib.compress(json.dumps(manifest).encode())  # NaN allowed
    data = magic + struct.pack("<HI", version, len(body)) + body + payload
    return data + hashlib.sha256(data).digest()


# ---------------------------------------------------------------- layout and round trip

def test_layout_as_documented():
    data = packed("all", "2bit", True)
    assert data[:8] == MAGIC
    assert struct.unpack_from("<H", data, 8) == (2,)
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()
    manifest, payload = split(data)
    assert manifest["payload_bytes"] == len(payload)
    assert manifest["encoding"] == "2bit" and manifest["bn_folded"] is True
    assert manifest["input"] == {"shape": [1, 28, 28], "divisor": 255.0, "mean": [0.1307], "std": [0.3081]}
    records = sorted(manifest["ternary"] + manifest["float"], key=lambda r: r["offset"])
    assert records[0]["offset"] == 0 and all(a["offset"] + a["length"] == b["offset"] for a, b in zip(records, records[1:]))
    for rec in manifest["float"]:  # little-endian IEEE floats in C order at payload-relative offsets
        raw = payload[rec["offset"]:rec["offset"] + rec["length"]]
        np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(rec["shape"]), df.unpack(data)[1][rec["name"]])


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("float_dtype", ["fp32", "fp16"])
def test_round_trip_unfolded(encoding, float_dtype):
    export = make_export("mixed")
    manifest, tensors = df.unpack(df.pack(export, encoding, fold_bn=False, float_dtype=float_dtype))
    assert manifest["encoding"] == encoding and manifest["bn_folded"] is False
    assert {r["name"] for r in manifest["ternary"]} == {"conv2.weight", "fc1.weight", "fc2.weight"}
    for layer, entry in export["ternary"].items():
        assert tensors[f"{layer}.weight"].dtype == torch.int8
        assert torch.equal(tensors[f"{layer}.weight"], entry["codes"])
        assert torch.equal(tensors[f"{layer}.w_p"], entry["w_p"])  # scales always fp32, exact
        assert torch.equal(tensors[f"{layer}.w_n"], entry["w_n"])
    assert tensors["conv2.w_p"].shape == (64,)
    half = {"fp32": torch.float32, "fp16": torch.float16}[float_dtype]
    stored = [k for k in export["float"] if not k.endswith("num_batches_tracked")]
    assert "conv1.weight" in stored and "bn1.running_var" in stored
    for key in stored:
        assert torch.equal(tensors[key], export["float"][key].to(half)), key
    assert not any(k.endswith("num_batches_tracked") for k in tensors)


def test_equal_levels_are_stored_once():
    """TWN / ADMM (w_p = w_n): one alpha block per layer, named by both w_p and w_n."""
    manifest, tensors = df.unpack(packed("twn", "2bit", True))
    for rec in manifest["ternary"]:
        layer = rec["name"].removesuffix(".weight")
        assert rec["w_p"] == rec["w_n"] == f"{layer}.alpha"
    assert not any(name.endswith((".w_p", ".w_n")) for name in tensors)
    ttq = split(packed("all", "2bit", True))[1]
    assert len(split(packed("twn", "2bit", True))[1]) == len(ttq) - 4 * (32 + 64 + 1 + 1)  # one fp32 per group saved


def test_pack_leaves_the_export_alone():
    export = make_export("mixed")
    snapshot = copy.deepcopy(export)
    df.pack(export, "entropy", fold_bn=True)
    assert export["ternary"].keys() == snapshot["ternary"].keys() and export["float"].keys() == snapshot["float"].keys()
    for layer, entry in snapshot["ternary"].items():
        assert all(torch.equal(entry[k], export["ternary"][layer][k]) for k in entry)
    assert all(torch.equal(v, export["float"][k]) for k, v in snapshot["float"].items())


def test_folded_file_has_no_bn_and_ternary_codes():
    export = make_export("all")
    manifest, tensors = df.unpack(packed("all", "base3", True))
    assert manifest["bn_folded"] is True
    assert [op["op"] for op in manifest["network"]].count("batch_norm") == 0
    assert not any(name.startswith("bn") for name in tensors)
    for layer in ("conv1", "conv2"):
        codes = tensors[f"{layer}.weight"]
        assert set(codes.unique().tolist()) <= {-1, 0, 1}
        assert tensors[f"{layer}.w_p"].shape == (codes.shape[0],)
        assert (tensors[f"{layer}.w_p"] >= 0).all() and (tensors[f"{layer}.w_n"] >= 0).all()
        # channels with gamma < 0 have their codes negated, the others are unchanged
        flipped = export["float"][f"{BN_OF_LAYER[layer]}.weight"] < 0
        original = export["ternary"][layer]["codes"]
        assert torch.equal(codes[flipped], -original[flipped]) and torch.equal(codes[~flipped], original[~flipped])
    assert torch.equal(tensors["fc1.weight"], export["ternary"]["fc1"]["codes"])


def test_code_patches_follow_the_network():
    shapes = {"conv1.weight": [32, 1, 5, 5], "conv2.weight": [64, 32, 5, 5], "fc1.weight": [512, 1024],
              "fc2.weight": [10, 512], "conv1.bias": [32], "conv2.bias": [64], "fc1.bias": [512], "fc2.bias": [10]}
    network = [op for op in df.LENET5_NETWORK if op["op"] != "batch_norm"]
    patches = df.code_patches(network, lambda name: shapes[name])
    # fc1 reads the flattened 64 x 4 x 4 map: 28 -5+1 = 24, /2 = 12, -5+1 = 8, /2 = 4
    assert patches == {"conv1.weight": (5, 5), "conv2.weight": (5, 5), "fc1.weight": (4, 4), "fc2.weight": (1, 1)}
    assert df.trace_shapes(network, df.INPUT_SHAPE, lambda name: shapes[name])[-1] == [10]


# ---------------------------------------------------------------- the specification is enough

def pixels(n: int = 64, seed: int = 2) -> np.ndarray:
    """uint8 images [n, 1, 28, 28]: noise plus a bright square, as MNIST-like as a random model needs."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 80, (n, 28, 28), dtype=np.uint8)
    for i in range(n):
        r, c = rng.integers(0, 20, 2)
        images[i, r:r + 8, c:c + 8] = 255
    return images[:, None]


@pytest.mark.parametrize("variant, encoding, fold_bn, float_dtype", [
    ("all", "2bit", True, "fp32"), ("mixed", "base3", False, "fp32"), ("twn", "entropy", True, "fp32"),
    ("mixed", "entropy", True, "fp16"), ("all", "entropy", False, "fp32")])
def test_spec_decoder_predicts_as_the_checkpoint(variant, encoding, fold_bn, float_dtype):
    """tests/spec_decoder.py, written from docs/deployment_format.md with NumPy only, reads the file and
    normalises raw pixels as the manifest says; its logits match the checkpoint's ternary model's to 1e-4
    (fp16: 2e-2). A random model predicts nearly one class; test_deployment.py repeats this on a trained one."""
    images = pixels()
    with torch.no_grad():
        expected = rebuild_model(make_export(variant))(normalise(images[:, 0]))
    manifest, tensors = spec_decoder.read(packed(variant, encoding, fold_bn, float_dtype))
    logits = spec_decoder.run(manifest, tensors, images)
    assert np.array_equal(logits.argmax(1), expected.argmax(1).numpy())
    fp16 = float_dtype == "fp16"
    np.testing.assert_allclose(logits, expected.numpy(), atol=2e-2 if fp16 else 1e-4, rtol=1e-2 if fp16 else 0)
    assert expected.abs().max() > 0.25  # logits far above the 1e-4 tolerance


def test_normalisation_from_the_manifest_matches_training():
    images = pixels(8)
    manifest = df.unpack(packed("all", "2bit", True))[0]
    assert torch.equal(df.normalize(manifest["input"], images), normalise(images[:, 0]))
    huge = {"divisor": 2**64, "mean": [2**63], "std": [2**70]}  # valid integers past int64 still normalise
    assert torch.isfinite(df.normalize(huge, images)).all()


DOC = ROOT / "docs" / "deployment_format.md"


def test_worked_example_decodes_as_documented():
    """The conv1 block printed in the specification decodes, with the spec-only decoder, to the kernel the
    document shows, and its header fields and first lane state read as the text says."""
    text = DOC.read_text()
    hex_block = text.split("<!-- conv1 block")[1].split("```")[1]
    block = bytes.fromhex("".join(line[6:] for line in hex_block.strip().splitlines()))
    assert len(block) == 193 and block[:5] == bytes([1, 5, 5, 1, 0])
    assert int.from_bytes(block[37:40], "little") == 2_937_627
    codes = spec_decoder.decode_entropy(block, [32, 1, 5, 5])
    kernel = text.split("<!-- conv1 channel 0 -->")[1].split("```")[1]
    assert codes[0, 0].tolist() == [[int(v) for v in line.split()] for line in kernel.strip().splitlines()]
    assert np.array_equal(df.get_codec("entropy").decode(block, (32, 1, 5, 5)), codes)
    header = re.search(r"0000  ((?:[0-9a-f]{2} ?){8})\s+((?:[0-9a-f]{2} ?){2})\s+((?:[0-9a-f]{2} ?){4})", text)
    assert bytes.fromhex(header.group(1)) == MAGIC and bytes.fromhex(header.group(2)) == b"\x02\x00"
    assert int.from_bytes(bytes.fromhex(header.group(3)), "little") == 510


# ---------------------------------------------------------------- the loader computes the model

@pytest.mark.parametrize("variant", ["all", "mixed"])
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("fold_bn", [True, False])
def test_loader_matches_rebuild_model(variant, encoding, fold_bn):
    export = make_export(variant)
    for bn in ("bn1", "bn2"):
        assert (export["float"][f"{bn}.weight"] < 0).any() and export["float"][f"{bn}.running_var"].std() > 0.1
    expected = reference_logits(variant)
    assert expected.abs().max() > 1.0  # large enough that 1e-4 is a real tolerance
    got = df.load_inference(packed(variant, encoding, fold_bn))(inputs())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_loader_fp16_close():
    got = df.load_inference(packed("mixed", "2bit", True, "fp16"))(inputs())
    torch.testing.assert_close(got, reference_logits("mixed"), atol=2e-2, rtol=1e-2)


def test_loader_reads_path_and_checks_input(tmp_path):
    path = tmp_path / "m.tern"
    path.write_bytes(packed("all", "2bit", True))
    net = df.load_inference(path)
    assert net(inputs(3)).shape == (3, 10)
    path.write_bytes(b"\0" * (df.MAX_FILE_BYTES + 1))
    with pytest.raises(DeployFormatError, match="larger than"):
        df.load_inference(path)
    net = df.load_inference(packed("all", "2bit", True))
    assert net(inputs(3)).shape == (3, 10)
    with pytest.raises(ValueError, match="expected"):
        net(torch.zeros(2, 1, 32, 32))


def test_loader_imports_no_model_code(tmp_path):
    path = tmp_path / "m.tern"
    path.write_bytes(packed("mixed", "entropy", True))
    code = (
        "import sys, torch; from quant.deploy_format import load_inference\n"
        f"out = load_inference({str(path)!r})(torch.zeros(2, 1, 28, 28))\n"
        "assert out.shape == (2, 10)\n"
        "extra = sorted(m for m in sys.modules if m.startswith('quant.') and m not in ('quant.deploy_format', 'quant.packing', 'quant.errors'))\n"
        "assert not extra, extra\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, timeout=60)


def test_network_description_matches_model():
    convs = [op for op in df.LENET5_NETWORK if op["op"] == "conv2d"]
    after = {op["weight"].split(".")[0]: df.LENET5_NETWORK[i + 1]["weight"].split(".")[0]
             for i, op in enumerate(df.LENET5_NETWORK) if op in convs}
    assert after == BN_OF_LAYER
    assert all(op["eps"] == LeNet5().bn1.eps for op in df.LENET5_NETWORK if op["op"] == "batch_norm")


# ---------------------------------------------------------------- folding math

def test_bn_affine_matches_batchnorm():
    bn = torch.nn.BatchNorm1d(5).eval()
    gen = torch.Generator().manual_seed(3)
    bn.weight.data, bn.bias.data = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    bn.running_mean, bn.running_var = torch.randn(5, generator=gen), torch.rand(5, generator=gen) + 0.1
    y = torch.randn(7, 5, generator=gen)
    s, t = df.bn_affine(bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var, bn.eps)
    torch.testing.assert_close((s * y + t).float(), bn(y).detach())
    # by hand: gamma 2, var 3, eps 1 -> s = 2 / 2 = 1;  beta 1, mean 4 -> t = 1 - 1 * 4 = -3
    s, t = df.bn_affine(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([4.0]), torch.tensor([3.0]), eps=1.0)
    assert s.item() == 1.0 and t.item() == -3.0


def test_fold_ternary_hand_example():
    codes = torch.tensor([[1, -1, 0], [1, -1, 0]], dtype=torch.int8)
    new_codes, w_p, w_n = df.fold_ternary(codes, torch.tensor([2.0]), torch.tensor([3.0]),
                                          torch.tensor([0.5, -2.0], dtype=torch.float64))
    # channel 0: s = 0.5 scales both levels; channel 1: s = -2, W = [-4, 6, 0], codes flip, levels swap
    assert new_codes.tolist() == [[1, -1, 0], [-1, 1, 0]]
    assert w_p.tolist() == [1.0, 6.0] and w_n.tolist() == [1.5, 4.0]
    assert dequantize(new_codes, w_p, w_n).tolist() == [[1.0, -1.5, 0.0], [-4.0, 6.0, 0.0]]


# ---------------------------------------------------------------- sizes

def expected_payload(code_bytes: int, fold_bn: bool, float_bytes: int, scale_groups: int) -> int:
    """Codes + fp32 scales (w_p and w_n) + biases (+ 4 BN vectors per BN channel when not folded)."""
    floats = N_BIASES + (0 if fold_bn else 4 * (32 + 64))
    return code_bytes + 4 * 2 * scale_groups + float_bytes * floats


@pytest.mark.parametrize("encoding, code_bytes", [("2bit", 145_352), ("base3", 116_282)])
@pytest.mark.parametrize("fold_bn", [True, False])
@pytest.mark.parametrize("float_dtype, float_bytes", [("fp32", 4), ("fp16", 2)])
def test_exact_file_size(encoding, code_bytes, fold_bn, float_dtype, float_bytes):
    data = packed("all", encoding, fold_bn, float_dtype)
    manifest, payload = split(data)
    groups = (32 + 64 + 1 + 1) if fold_bn else 4  # folding turns the conv scales per-channel
    assert len(payload) == expected_payload(code_bytes, fold_bn, float_bytes, groups)
    (manifest_len,) = struct.unpack_from("<I", data, 10)
    assert len(data) == 14 + manifest_len + len(payload) + 32
    assert manifest_len < 1200


def test_entropy_file_size_is_its_blocks():
    data = packed("all", "entropy", True)
    manifest, payload = split(data)
    code_bytes = sum(r["length"] for r in manifest["ternary"])
    assert len(payload) == expected_payload(code_bytes, True, 4, 32 + 64 + 1 + 1)
    # uniformly random codes carry log2(3) bits each: the code cannot beat base-3 by much here
    assert 0.98 * 116_282 < code_bytes < 116_282 + 600


def test_size_targets():
    assert len(packed("all", "2bit", True)) <= 150 * 1000
    assert len(packed("all", "base3", True)) <= 125 * 1000


# ---------------------------------------------------------------- rejection of bad exports

@pytest.mark.parametrize("break_it, match", [
    (lambda e: e["ternary"]["fc1"].update(codes=e["ternary"]["fc1"]["codes"] * 2), "fc1"),
    (lambda e: e["ternary"]["conv2"].update(w_p=torch.ones(3)), "scales"),
    (lambda e: e["float"].pop("fc2.bias"), "fc2.bias"),
    (lambda e: e["float"].pop("bn2.running_var"), "bn2.running_var"),
    (lambda e: e["ternary"].update(fc3=e["ternary"]["fc2"]), "fc3"),
])
def test_pack_rejects_bad_exports(break_it, match):
    export = make_export("mixed")
    export = {"ternary": {k: dict(v) for k, v in export["ternary"].items()}, "float": dict(export["float"])}
    break_it(export)
    with pytest.raises(DeployFormatError, match=match):
        df.pack(export)


def test_pack_rejects_bad_options():
    with pytest.raises(DeployFormatError, match="2bit, base3, entropy"):
        df.pack(make_export("all"), encoding="1bit")
    with pytest.raises(DeployFormatError, match="fp32, fp16"):
        df.pack(make_export("all"), float_dtype="bf16")
    export = make_export("all")
    export = {"ternary": export["ternary"], "float": {**export["float"], "fc2.bias": torch.full((10,), 1e6)}}
    df.pack(export, float_dtype="fp32")
    with pytest.raises(DeployFormatError, match="fc2.bias.*fp16"):  # 1e6 overflows fp16 (max 65504)
        df.pack(export, float_dtype="fp16")


# ---------------------------------------------------------------- rejection of corrupt files

def one_line_rejection(data: bytes, match: str, seconds: float = 1.0, peak_bytes: int = 64 << 20) -> str:
    """load_inference(data) must raise DeployFormatError matching `match`, as one line, within `seconds`,
    and (a second run, traced by tracemalloc, which sees Python and NumPy allocations) within `peak_bytes`."""
    start = time.perf_counter()
    with pytest.raises(DeployFormatError, match=match) as info:
        df.load_inference(data)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert elapsed < seconds, f"{elapsed:.2f} s to reject: {message}"
    tracemalloc.start()
    try:
        with pytest.raises(DeployFormatError):
            df.load_inference(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < peak_bytes, f"{peak / 2**20:.0f} MiB allocated to reject: {message}"
    return message


def test_bad_magic_and_versions():
    manifest, payload = split(packed("all", "2bit", True))
    assert df.unpack(seal(manifest, payload))[0] == manifest  # the test's own sealing is valid
    one_line_rejection(seal(manifest, payload, magic=b"TERNLNT\x01"), "magic")
    one_line_rejection(seal(manifest, payload, version=3), "newer")
    one_line_rejection(seal(manifest, payload, version=1), "version 1 is no longer read")


def test_checksum_is_checked_before_the_version():
    """A damaged file whose version field also changed is reported as damaged, not as "update the code"."""
    data = bytearray(packed("all", "2bit", True))
    data[8] = 3  # version 3, digest not recomputed
    one_line_rejection(bytes(data), "SHA-256")


def test_truncation_and_extension():
    data = packed("all", "base3", True)
    for cut in (0, 1, 8, 13, 14, 45, 46, 100, len(data) // 2, len(data) - 32, len(data) - 1):
        with pytest.raises(DeployFormatError):
            df.unpack(data[:cut])
    for tail in (b"\0", b"\xff" * 32, data[-32:]):
        with pytest.raises(DeployFormatError, match="SHA-256"):
            df.unpack(data + tail)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_flipped_byte_anywhere(encoding):
    """Every byte of header, manifest and trailer, and every 97th payload byte, flipped one bit at a time."""
    data = packed("all", encoding, True)
    manifest, payload = split(data)
    head = len(data) - len(payload) - 32
    positions = [*range(head), *range(head, len(data) - 32, 97), len(data) - 33, *range(len(data) - 32, len(data))]
    buf = bytearray(data)
    for i, pos in enumerate(positions):
        buf[pos] ^= 1 << (i % 8)
        with pytest.raises(DeployFormatError):
            df.unpack(bytes(buf))
        buf[pos] = data[pos]
    assert bytes(buf) == data and df.unpack(data)[0] == manifest


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_damage_rejected(data):
    original = packed("mixed", data.draw(st.sampled_from(ENCODINGS)), True)
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "flip+extend"]))
    damaged = bytearray(original)
    if "flip" in kind:
        for pos in data.draw(st.lists(st.integers(0, len(original) - 1), min_size=1, max_size=4, unique=True)):
            damaged[pos] ^= data.draw(st.integers(1, 255))
    if kind == "truncate":
        damaged = damaged[:data.draw(st.integers(0, len(original) - 1))]
    if "extend" in kind:
        damaged += data.draw(st.binary(min_size=1, max_size=64))
    with pytest.raises(DeployFormatError):
        df.unpack(bytes(damaged))


# ---------------------------------------------------------------- a valid digest over an inconsistent manifest

def edit(path: str, value):
    """A manifest edit: set manifest[path...] = value, path like 'float.3.length' (ints index lists)."""
    def apply(manifest):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        target = functools.reduce(lambda node, key: node[key], parents, manifest)
        target[last] = value(target[last]) if callable(value) else value
    return apply


MANIFEST_BREAKS = {
    "payload_bytes": (edit("payload_bytes", lambda v: v - 1), "payload_bytes"),
    "offset_overlap": (edit("float.0.offset", lambda v: v - 1), "offset"),
    "length": (edit("ternary.0.length", lambda v: v + 1), "length"),
    "shape": (edit("ternary.0.shape", [32, 1, 5, 4]), "needs"),
    "shape_zero": (edit("float.1.shape", [0]), "malformed"),
    "shape_type": (edit("float.1.shape", "32"), "malformed"),
    "shape_5d": (edit("float.1.shape", [1, 1, 1, 1, 32]), "malformed"),
    "encoding": (edit("encoding", "3bit"), "encoding"),
    "encoding_two_lines": (edit("encoding", "2bit\nerror: a second line"), "encoding"),
    "name_two_lines": (edit("network.0.bias", "conv1.bias\nerror: a second line"), "missing tensor"),
    "dtype": (edit("float.0.dtype", "fp64"), "dtype"),
    "dtype_list": (edit("float.0.dtype", ["fp32"]), "dtype"),
    "duplicate": (edit("float.1.name", "conv1.w_p"), "twice"),
    "missing_tensor": (edit("network.0.bias", "conv9.bias"), "missing tensor"),
    "unhashable_ref": (edit("network.0.weight", {"a": 1}), "missing tensor"),
    "unknown_op": (edit("network.2.op", "gelu"), "unknown op"),
    "extra_op_key": (edit("network.2.stride", 2), "keys"),
    "extra_key": (edit("compression", "none"), "keys"),
    "scale_ref": (edit("ternary.1.w_n", "fc1.bias"), "w_n"),
    "ternary_as_bn": (edit("network.1.weight", "conv1.weight"), "ternary block"),
    "eps": (edit("network.1.eps", -1.0), "eps"),
    "eps_zero": (edit("network.1.eps", 0), "eps"),
    "input_shape": (edit("input.shape", [784]), "input shape"),
    "input_std": (edit("input.std", [0.0]), "std"),
    "input_mean_count": (edit("input.mean", [0.1, 0.2]), "mean"),
    "metadata_nested": (edit("metadata", {"a": {"b": 1}}), "metadata"),
    "bn_folded_lies": (edit("bn_folded", True), "bn_folded"),
    "unused_block": (edit("network.11.bias", None), "read by nothing"),  # fc2 without its bias
    "not_object": (lambda m: m.clear(), "keys"),
}


@pytest.mark.parametrize("name", MANIFEST_BREAKS)
def test_inconsistent_manifest_rejected(name):
    change, match = MANIFEST_BREAKS[name]
    manifest, payload = split(packed("all", "2bit", False))
    manifest = json.loads(json.dumps(manifest))
    change(manifest)
    one_line_rejection(seal(manifest, payload), match)


def test_unparsable_manifest_rejected():
    _, payload = split(packed("all", "2bit", True))
    for raw in (b"{not json", b"\xff\xfe{}", b"[1, 2]", zlib.compress(b"{not json"), zlib.compress(b"\xff\xfe{}"),
                zlib.compress(b"[1, 2]"), zlib.compress(b"{}")[:-2], zlib.compress(b"{}") + b"\0"):
        one_line_rejection(seal(None, payload, raw_manifest=raw), "manifest")


@pytest.mark.parametrize("encoding, bad_byte, match", [("2bit", 0xFF, "invalid 2bit"), ("base3", 250, "invalid base3"),
                                                       ("entropy", 0, "zero frequency")])
def test_invalid_code_bytes_rejected(encoding, bad_byte, match):
    manifest, payload = split(packed("all", encoding, True))
    payload = bytearray(payload)
    payload[manifest["ternary"][1]["offset"] + 7] = bad_byte
    one_line_rejection(seal(manifest, bytes(payload)), f"conv2.weight.*{match}")


def test_non_finite_float_rejected():
    manifest, payload = split(packed("all", "2bit", True))
    rec = next(r for r in manifest["float"] if r["name"] == "fc2.bias")
    payload = bytearray(payload)
    payload[rec["offset"]:rec["offset"] + 4] = np.float32(np.nan).tobytes()
    one_line_rejection(seal(manifest, bytes(payload)), "non-finite")


def test_network_that_does_not_fit_its_tensors_rejected():
    manifest, payload = split(packed("all", "2bit", True))
    manifest["ternary"][0]["shape"] = [32, 25, 1, 1]  # same byte count, wrong conv geometry
    one_line_rejection(seal(manifest, payload), "op 0 \\(conv2d\\): weight \\[32, 25, 1, 1\\] does not fit")


# ---------------------------------------------------------------- crafted files (valid digest, hostile content)

def zlib_bomb(inflated_mib: int) -> bytes:
    """A valid zlib stream of ~1 MB that inflates to `inflated_mib` MiB of JSON: one compressed 1 MiB block
    of spaces repeated (each full flush resets the history, so the blocks are identical) and the right Adler-32."""
    head, chunk, tail = b'{"metadata":"', b" " * (1 << 20), b'"}'
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    end = deflate.compress(tail) + deflate.flush()
    adler = zlib.adler32(head)
    for _ in range(inflated_mib):
        adler = zlib.adler32(chunk, adler)
    return b"\x78\xda" + start + block * inflated_mib + end + zlib.adler32(tail, adler).to_bytes(4, "big")


def nested(depth: int) -> bytes:
    return zlib.compress(b'{"encoding":' + b"[" * depth + b"]" * depth + b"}", 9)


def without_last_layer(manifest: dict, payload: bytes) -> tuple[dict, bytes]:
    """The file minus fc2 (its op and blocks), payload re-tiled: a consistent network ending in 512 outputs."""
    manifest = copy.deepcopy(manifest)
    manifest["network"].pop()
    drop = {"fc2.weight", "fc2.bias", "fc2.w_p", "fc2.w_n"}
    kept, offset = [], 0
    for kind in ("ternary", "float"):
        manifest[kind] = [r for r in manifest[kind] if r["name"] not in drop]
    for rec in sorted(manifest["ternary"] + manifest["float"], key=lambda r: r["offset"]):
        kept.append(payload[rec["offset"]:rec["offset"] + rec["length"]])
        rec["offset"], offset = offset, offset + rec["length"]
    manifest["payload_bytes"] = offset
    return manifest, b"".join(kept)


def crafted(case: str) -> bytes:
    manifest, payload = split(packed("all", "2bit", True))
    raw = None
    if case == "dimension_1e30":
        manifest["ternary"][0]["shape"] = [10**30, 1, 5, 5]
    elif case == "product_wraps_int64":  # 2^32 * 2^32 = 2^64 = 0 in int64: once passed the length check
        manifest["float"][0]["shape"], manifest["float"][0]["length"] = [2**32, 2**32], 0
    elif case == "product_over_limit":  # every dimension allowed, the product 2^64 is not
        manifest["float"][0]["shape"] = [65536, 65536, 65536, 65536]
    elif case == "input_shape_1e30":
        manifest["input"]["shape"] = [1, 10**30, 28]
    elif case == "pool_kernel_1e30":
        next(op for op in manifest["network"] if op["op"] == "max_pool2d")["kernel_size"] = 10**30
    elif case == "pool_kernel_too_big":
        next(op for op in manifest["network"] if op["op"] == "max_pool2d")["kernel_size"] = 25
    elif case == "nested_200000":
        raw = nested(200_000)
    elif case == "nested_30000":  # 60 KB of JSON, under the inflate cap: the parser's depth limit answers
        raw = nested(30_000)
    elif case == "inflates_to_1_gib":
        raw = zlib_bomb(1024)
    elif case == "eps_infinity":  # an unfolded file keeps its batch_norm ops
        manifest, payload = split(packed("all", "2bit", False))
        raw = zlib.compress(json.dumps(manifest).replace('"eps": 1e-05', '"eps": Infinity', 1).encode())
    elif case == "eps_integer_of_400_digits":  # within Python's integer limit, beyond the double range
        manifest, payload = split(packed("all", "2bit", False))
        raw = zlib.compress(json.dumps(manifest).replace('"eps": 1e-05', '"eps": 1' + "0" * 400, 1).encode())
    elif case == "std_nan":
        manifest["input"]["std"] = [float("nan")]
    elif case == "mean_1e999":
        raw = zlib.compress(json.dumps(manifest).replace('"mean": [0.1307]', '"mean": [1e999]').encode())
    elif case == "integer_of_5000_digits":
        raw = zlib.compress(json.dumps(manifest).replace(f'"payload_bytes": {len(payload)}',
                                                         '"payload_bytes": ' + "9" * 5000).encode())
    elif case == "not_10_logits":
        manifest, payload = without_last_layer(manifest, payload)
    elif case == "entropy_one_lane_for_fc1":  # 524,288 codes in one lane: minutes of decoding, refused at once
        manifest, payload = split(packed("all", "entropy", True))
        rec = next(r for r in manifest["ternary"] if r["name"] == "fc1.weight")
        block = bytes([1, 4, 4, 1, 0]) + bytes([85, 86]) * 16 + bytes([0, 0, 1])
        delta = len(block) - rec["length"]
        payload = payload[:rec["offset"]] + block + payload[rec["offset"] + rec["length"]:]
        for r in manifest["ternary"] + manifest["float"]:
            r["offset"] += delta if r["offset"] > rec["offset"] else 0
        rec["length"] = len(block)
        manifest["payload_bytes"] += delta
    else:
        raise KeyError(case)
    return seal(manifest, payload, raw_manifest=raw)


CRAFTED = {  # case -> what the one-line error says
    "dimension_1e30": "malformed ternary record",
    "product_wraps_int64": "malformed float record",
    "product_over_limit": "more than 4194304 elements",
    "input_shape_1e30": "input shape",
    "pool_kernel_1e30": "kernel_size",
    "pool_kernel_too_big": "kernel 25 does not fit",
    "nested_200000": "inflates past 65536 bytes",
    "nested_30000": "nested too deeply",
    "inflates_to_1_gib": "inflates past 65536 bytes",
    "eps_infinity": "finite",
    "eps_integer_of_400_digits": "finite",
    "std_nan": "finite",
    "mean_1e999": "finite",
    "integer_of_5000_digits": "manifest is not valid",
    "not_10_logits": r"ends in shape \[N, 512\], not \[N, 10\] logits",
    "entropy_one_lane_for_fc1": "fc1.weight: .* at most 32768 codes per lane",
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_file_is_a_one_line_error(case):
    """Each case once crashed, hung or misled a reader; now each is refused within a second and 64 MiB."""
    data = crafted(case)
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]  # a valid digest: only the content is hostile
    one_line_rejection(data, CRAFTED[case])


def test_the_bomb_really_inflates_to_a_gibibyte():
    body = zlib_bomb(4)
    assert len(zlib.decompress(body)) == 4 * 2**20 + 15
    assert len(zlib_bomb(1024)) < 1_100_000


JSON_NUMBERS = (st.integers(-2, 10**6) | st.integers(-2**70, 2**70) | st.sampled_from(
    [2**31, 2**32, 2**53 + 1, 2**63, 2**64, 10**30, -2**63]) | st.floats(allow_nan=True, allow_infinity=True))
JSON_VALUES = st.recursive(st.none() | st.booleans() | JSON_NUMBERS | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=8)


def leaf_paths(node, prefix=()):
    """Paths to every value in a JSON tree (containers included)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from leaf_paths(child, prefix + (key,))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_manifest_never_crashes(data):
    """Any JSON value -- integers far past int64, NaN, infinities, nested containers -- put anywhere in the
    manifest (sealed validly) loads or raises DeployFormatError, one line."""
    manifest, payload = split(packed("all", data.draw(st.sampled_from(["2bit", "entropy"])), False))
    path = data.draw(st.sampled_from(list(leaf_paths(manifest))))
    target = functools.reduce(lambda node, key: node[key], path[:-1], manifest)
    target[path[-1]] = data.draw(JSON_VALUES)
    try:
        df.load_inference(seal(manifest, payload))
    except DeployFormatError as e:
        assert "\n" not in str(e)
