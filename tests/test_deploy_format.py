"""quant/deploy_format.py: round trips, the file-only loader against rebuild_model (with and without BN
folding, negative gamma included), exact sizes, and rejection of every corrupt or inconsistent file.

The file layout is re-derived here from the module docstring (struct + hashlib), not borrowed from the module.
"""
import copy
import functools
import hashlib
import json
import math
import struct
import zlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quant import deploy_format as df
from quant.deploy_format import DeployFormatError
from quant.export import build_export, dequantize, rebuild_model
from quant.model import BN_OF_LAYER, LeNet5

ROOT = Path(__file__).resolve().parents[1]
MAGIC = b"TERNLNT\0"
FAN_IN = {"conv1": 25, "conv2": 800, "fc1": 1024, "fc2": 512}
N_BIASES = 32 + 64 + 512 + 10


@functools.lru_cache(maxsize=None)
def make_export(variant: str, seed: int = 0) -> dict:
    """A LeNet5 export with random codes and scales (~1/sqrt(fan_in), so logits are O(1..10)) and random BN.

    "all": the four layers ternary, per-layer scales.  "mixed": conv1 kept FP, conv2 per-channel scales,
    fc1 and fc2 per-layer.  Both BNs get non-trivial running stats and some negative gammas.
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
        ternary[name] = {"codes": codes, "w_p": scale(), "w_n": scale(), "delta": torch.zeros(groups)}
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


def seal(manifest, payload: bytes, magic: bytes = MAGIC, version: int = 1, raw_manifest: bytes | None = None) -> bytes:
    """A file with a correct digest around whatever manifest/payload/magic/version a test wants to check."""
    body = raw_manifest if raw_manifest is not None else zlib.compress(json.dumps(manifest).encode())
    data = magic + struct.pack("<HI", version, len(body)) + body + payload
    return data + hashlib.sha256(data).digest()


# ---------------------------------------------------------------- layout and round trip

def test_layout_as_documented():
    data = packed("all", "2bit", True)
    assert data[:8] == MAGIC
    assert struct.unpack_from("<H", data, 8) == (1,)
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()
    manifest, payload = split(data)
    assert manifest["payload_bytes"] == len(payload)
    assert manifest["encoding"] == "2bit" and manifest["bn_folded"] is True


@pytest.mark.parametrize("encoding", ["2bit", "base3"])
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


def test_pack_leaves_the_export_alone():
    export = make_export("mixed")
    snapshot = copy.deepcopy(export)
    df.pack(export, "base3", fold_bn=True)
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


# ---------------------------------------------------------------- the loader computes the model

@pytest.mark.parametrize("variant", ["all", "mixed"])
@pytest.mark.parametrize("encoding", ["2bit", "base3"])
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
    with pytest.raises(ValueError, match="expected"):
        net(torch.zeros(2, 1, 32, 32))


def test_loader_imports_no_model_code(tmp_path):
    path = tmp_path / "m.tern"
    path.write_bytes(packed("mixed", "base3", True))
    code = (
        "import sys, torch; from quant.deploy_format import load_inference\n"
        f"out = load_inference({str(path)!r})(torch.zeros(2, 1, 28, 28))\n"
        "assert out.shape == (2, 10)\n"
        "extra = sorted(m for m in sys.modules if m.startswith('quant.') and m not in ('quant.deploy_format', 'quant.packing'))\n"
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


def test_size_targets():
    assert len(packed("all", "2bit", True)) <= 150 * 1000
    assert len(packed("all", "base3", True)) <= 125 * 1000


def test_size_report_recomputed():
    export = make_export("mixed")
    rows = {r["layer"]: r for r in df.size_report(export)}
    assert list(rows) == ["conv1", "conv2", "fc1", "fc2", "total"]
    conv1 = rows["conv1"]  # kept FP: 4 bytes/weight everywhere
    assert not conv1["ternary"] and conv1["weights"] == 800
    assert conv1["bytes_2bit"] == conv1["bytes_base3"] == conv1["fp32_bytes"] == 3200
    codes = export["ternary"]["fc2"]["codes"].flatten().tolist()
    counts = [codes.count(v) for v in (-1, 0, 1)]
    h = -sum(c / 5120 * math.log2(c / 5120) for c in counts if c)
    fc2 = rows["fc2"]
    assert fc2["weights"] == 5120 and fc2["bytes_2bit"] == 1280 and fc2["bytes_base3"] == 1024
    assert fc2["bits_per_weight_2bit"] == 2.0 and fc2["bits_per_weight_base3"] == 1.6
    assert fc2["compression_2bit"] == 16.0 and fc2["compression_base3"] == 20.0
    assert fc2["entropy_bits"] == pytest.approx(h) and fc2["entropy_bytes"] == pytest.approx(5120 * h / 8)
    assert fc2["zero_fraction"] == counts[1] / 5120
    total = rows["total"]
    assert total["weights"] == 581_408
    assert total["bytes_2bit"] == 3200 + 51_200 // 4 + 524_288 // 4 + 5120 // 4
    assert total["fp32_bytes"] == 4 * 581_408


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
    with pytest.raises(DeployFormatError, match="2bit, base3"):
        df.pack(make_export("all"), encoding="1bit")
    with pytest.raises(DeployFormatError, match="fp32, fp16"):
        df.pack(make_export("all"), float_dtype="bf16")
    export = make_export("all")
    export = {"ternary": export["ternary"], "float": {**export["float"], "fc2.bias": torch.full((10,), 1e6)}}
    df.pack(export, float_dtype="fp32")
    with pytest.raises(DeployFormatError, match="fc2.bias.*fp16"):  # 1e6 overflows fp16 (max 65504)
        df.pack(export, float_dtype="fp16")


# ---------------------------------------------------------------- rejection of corrupt files

def test_bad_magic_and_versions():
    manifest, payload = split(packed("all", "2bit", True))
    assert df.unpack(seal(manifest, payload))[0] == manifest  # the test's own sealing is valid
    with pytest.raises(DeployFormatError, match="magic"):
        df.unpack(seal(manifest, payload, magic=b"TERNLNT\x01"))
    with pytest.raises(DeployFormatError, match="newer"):
        df.unpack(seal(manifest, payload, version=2))
    with pytest.raises(DeployFormatError, match="version 0"):
        df.unpack(seal(manifest, payload, version=0))


def test_truncation_and_extension():
    data = packed("all", "base3", True)
    for cut in (0, 1, 8, 13, 14, 45, 46, 100, len(data) // 2, len(data) - 32, len(data) - 1):
        with pytest.raises(DeployFormatError):
            df.unpack(data[:cut])
    for tail in (b"\0", b"\xff" * 32, data[-32:]):
        with pytest.raises(DeployFormatError, match="SHA-256"):
            df.unpack(data + tail)


def test_flipped_byte_anywhere():
    """Every byte of header, manifest and trailer, and every 97th payload byte, flipped one bit at a time."""
    data = packed("all", "2bit", True)
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
    original = packed("mixed", "base3", True)
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
    "encoding": (edit("encoding", "3bit"), "encoding"),
    "dtype": (edit("float.0.dtype", "fp64"), "dtype"),
    "dtype_list": (edit("float.0.dtype", ["fp32"]), "dtype"),
    "duplicate": (edit("float.1.name", "conv1.w_p"), "twice"),
    "missing_tensor": (edit("network.0.bias", "conv9.bias"), "missing tensor"),
    "unhashable_ref": (edit("network.0.weight", {"a": 1}), "missing tensor"),
    "unknown_op": (edit("network.2.op", "gelu"), "unknown op"),
    "scale_ref": (edit("ternary.1.w_n", "fc1.bias"), "w_n"),
    "eps": (edit("network.1.eps", -1.0), "eps"),
    "input_shape": (edit("input_shape", [784]), "input_shape"),
    "not_object": (lambda m: m.clear(), "missing"),
}


@pytest.mark.parametrize("name", MANIFEST_BREAKS)
def test_inconsistent_manifest_rejected(name):
    change, match = MANIFEST_BREAKS[name]
    manifest, payload = split(packed("all", "2bit", False))
    manifest = json.loads(json.dumps(manifest))
    change(manifest)
    with pytest.raises(DeployFormatError, match=match):
        df.unpack(seal(manifest, payload))


def test_unparsable_manifest_rejected():
    _, payload = split(packed("all", "2bit", True))
    for raw in (b"{not json", b"\xff\xfe{}", b"[1, 2]"):
        with pytest.raises(DeployFormatError, match="manifest"):
            df.unpack(seal(None, payload, raw_manifest=raw))


@pytest.mark.parametrize("encoding, bad_byte, match", [("2bit", 0xFF, "0b11"), ("base3", 250, "242")])
def test_invalid_code_bytes_rejected(encoding, bad_byte, match):
    manifest, payload = split(packed("all", encoding, True))
    payload = bytearray(payload)
    payload[manifest["ternary"][1]["offset"] + 7] = bad_byte
    with pytest.raises(DeployFormatError, match=f"conv2.weight.*{match}"):
        df.unpack(seal(manifest, bytes(payload)))


def test_non_finite_float_rejected():
    manifest, payload = split(packed("all", "2bit", True))
    rec = next(r for r in manifest["float"] if r["name"] == "fc2.bias")
    payload = bytearray(payload)
    payload[rec["offset"]:rec["offset"] + 4] = np.float32(np.nan).tobytes()
    with pytest.raises(DeployFormatError, match="non-finite"):
        df.unpack(seal(manifest, bytes(payload)))


def test_unrunnable_network_rejected_at_load():
    manifest, payload = split(packed("all", "2bit", True))
    manifest["ternary"][0]["shape"] = [32, 25, 1, 1]  # same byte count, wrong conv geometry
    data = seal(manifest, payload)
    df.unpack(data)  # consistent as bytes...
    with pytest.raises(DeployFormatError, match="does not run"):
        df.load_inference(data)  # ...but not as a network


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=6)


def leaf_paths(node, prefix=()):
    """Paths to every value in a JSON tree (containers included)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from leaf_paths(child, prefix + (key,))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_manifest_never_crashes(data):
    """Any JSON value put anywhere in the manifest (sealed validly) loads or raises DeployFormatError."""
    manifest, payload = split(packed("all", "2bit", True))
    paths = [p for p in leaf_paths(manifest) if p[0] != "metadata"]
    path = data.draw(st.sampled_from(paths))
    target = functools.reduce(lambda node, key: node[key], path[:-1], manifest)
    target[path[-1]] = data.draw(JSON_VALUES)
    try:
        df.load_inference(seal(manifest, payload))
    except DeployFormatError:
        pass


# ---------------------------------------------------------------- the script, on a fabricated checkpoint

def test_script_packs_and_verifies(tmp_path, synthetic_mnist):
    from conftest import run_script
    from quant.checkpoint import save_checkpoint

    ckpt = tmp_path / "checkpoints" / "twn.pth"
    save_checkpoint(ckpt, {"mode": "twn", "config": {}, "history": [], "metrics": {}, "seed": 0, "state_dict": {},
                           "export": make_export("mixed")})
    result = run_script("deployment_compression.py", "--checkpoint", ckpt, "--verify", "--skip-checksum",
                        "--data-dir", synthetic_mnist, "--results-dir", tmp_path / "results", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "results" / "deployment.json").read_text())["checkpoints"][0]
    for encoding in ("2bit", "base3"):
        path = tmp_path / "checkpoints" / f"twn.{encoding}.tern"
        assert summary[f"file_bytes_{encoding}"] == path.stat().st_size
        assert summary[f"mismatches_{encoding}"] == 0
        assert df.unpack(path.read_bytes())[0]["metadata"]["mode"] == "twn"
    assert summary["checkpoint_bytes"] == ckpt.stat().st_size
    csv_lines = (tmp_path / "results" / "deployment.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 5 and csv_lines[-1].count(",total,") == 1


def test_script_error_is_one_line(tmp_path):
    from conftest import assert_one_line_error, run_script

    result = run_script("deployment_compression.py", "--checkpoint", tmp_path / "missing.pth", cwd=tmp_path)
    assert_one_line_error(result, expected_rc=2, contains=["missing.pth"])
