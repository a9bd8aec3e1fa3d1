"""quant/export.py, parametrized over the method registry: every method's export is ternary (≤ 3 values per
scale group, int8 codes in {−1,0,1}), rebuilds into a plain LeNet5 with the training model's logits,
survives a save/load round trip, is rejected when tampered with, and its size numbers match hand counts."""
import copy
import io

import pytest
import torch

from quant import export as export_mod
from quant.export import NotTernaryError, check_ternary, layer_table, rebuild_model, size_summary
from conftest import train_steps
from quant.config import parse_keep_fp
from quant.methods import METHODS, get_method
from quant.model import QUANT_LAYERS, LeNet5

# Counted from the architecture (TWN, arXiv 1605.04711, Sec. 3 and Table 1), not from the code under test.
WEIGHTS = {"conv1": 32 * 1 * 5 * 5, "conv2": 64 * 32 * 5 * 5, "fc1": 512 * 1024, "fc2": 10 * 512}
BIASES_AND_BN = 32 + 64 + 512 + 10 + 2 * 32 + 2 * 64  # biases + BN gamma/beta
TOTAL_PARAMS = 582_218
assert sum(WEIGHTS.values()) == 581_408 and sum(WEIGHTS.values()) + BIASES_AND_BN == TOTAL_PARAMS

# Every registry entry with its defaults, plus the variants whose export differs in shape or in path.
CONFIGS = {name: (name, {}) for name in METHODS}
CONFIGS.update({"twn-per-channel": ("twn", {"per_channel": True, "delta_factor": 0.75}),
                "admm-finish": ("admm", {"finetune_frac": 0.0, "admm_rounds": 4}),
                "admm-frozen-finetune": ("admm", {"finetune_frac": 0.5, "admm_rounds": 2})})


def train_briefly(method, model, steps=4, seed=0):
    """A few Adam steps through the engine's hooks, so BN statistics, TTQ's w_p/w_n and ADMM's G/U move away
    from their initial values; then `finish`."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    train_steps(method, model, x, y, steps, lr=2e-2, recalibration=[(x[:8], y[:8]), (x[8:], y[8:])])
    model.eval()


def fresh(mode, keep_fp=(), **hparams):
    torch.manual_seed(0)
    model = LeNet5()
    method = get_method(mode, keep_fp=keep_fp, **hparams)
    method.attach(model)
    return method, model


def probe():
    return torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="module", params=list(CONFIGS))
def trained(request):
    mode, hparams = CONFIGS[request.param]
    method, model = fresh(mode, **hparams)
    train_briefly(method, model)
    return request.param, method, model, method.export(model)


def dequantize_by_hand(entry):
    """W = where(T = +1, w_p[g], where(T = -1, -w_n[g], 0)) with g the row's scale group (or 0 per layer)."""
    codes = entry["codes"]
    rows = codes.reshape(codes.shape[0], -1)
    groups = entry["w_p"].numel()
    index = torch.arange(rows.shape[0]) if groups > 1 else torch.zeros(rows.shape[0], dtype=torch.long)
    w_p, w_n = entry["w_p"][index][:, None], entry["w_n"][index][:, None]
    w = torch.where(rows == 1, w_p, torch.where(rows == -1, -w_n, torch.zeros(())))
    return w.reshape(codes.shape)


def levels_by_hand(entry):
    """Per scale group, the set of deployed values."""
    w = dequantize_by_hand(entry)
    groups = entry["w_p"].numel()
    return {g: set(torch.unique(part).tolist()) for g, part in enumerate(w.reshape(groups, -1))}


# ---------------------------------------------------------------- every method
def test_export_is_ternary(trained):
    name, method, model, export = trained
    check_ternary(export)
    expected_ternary = set() if name == "fp" else set(QUANT_LAYERS)
    assert set(export["ternary"]) == expected_ternary
    assert not any(".quantizer." in k for k in export["float"])
    for layer_name in QUANT_LAYERS:
        assert (f"{layer_name}.weight" in export["float"]) == (layer_name not in expected_ternary)
    for layer_name, entry in export["ternary"].items():
        codes = entry["codes"]
        assert codes.dtype == torch.int8
        assert codes.shape == getattr(model, layer_name).weight.shape
        assert set(torch.unique(codes).tolist()) <= {-1, 0, 1}
        groups = entry["w_p"].numel()
        assert entry["w_n"].numel() == entry["delta"].numel() == groups
        assert groups == (codes.shape[0] if name == "twn-per-channel" else 1)
        assert entry["w_p"].dtype == entry["w_n"].dtype == torch.float32
        assert (entry["w_p"] > 0).all() and (entry["w_n"] > 0).all()
        for g, values in levels_by_hand(entry).items():
            assert len(values) <= 3, (layer_name, g, values)
        if name != "ttq":
            assert torch.equal(entry["w_p"], entry["w_n"])  # symmetric alpha
    if name == "admm-frozen-finetune":  # the codes froze mid-training and alpha trained afterwards
        assert method.finetuning
    if name == "ttq":  # w_p and w_n start equal and train independently: training must move them apart
        assert any(not torch.equal(e["w_p"], e["w_n"]) for e in export["ternary"].values())


def test_rebuild_gives_training_logits(trained):
    name, method, model, export = trained
    x = probe()
    with torch.no_grad():
        expected = model.eval()(x)
        got = rebuild_model(export)(x)
    assert not rebuild_model(export).training
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the weight the training model computes with is exactly the dequantized codes
    for layer_name, entry in export["ternary"].items():
        layer = getattr(model, layer_name)
        with torch.no_grad():
            used = layer.quantizer(layer.weight)
        assert torch.equal(used, dequantize_by_hand(entry)), layer_name
        if name == "admm-finish":  # the final projection overwrote the latent W itself
            assert torch.equal(layer.weight.detach(), dequantize_by_hand(entry))


def test_round_trip_through_torch_save(trained):
    _, _, _, export = trained
    buf = io.BytesIO()
    torch.save(export, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    check_ternary(loaded)
    x = probe()
    with torch.no_grad():
        torch.testing.assert_close(rebuild_model(loaded)(x), rebuild_model(export)(x), rtol=0, atol=0)


def test_layer_table(trained):
    name, _, _, export = trained
    rows = layer_table(export)
    assert [r["layer"] for r in rows] == list(QUANT_LAYERS)
    for row in rows:
        assert row["params"] == WEIGHTS[row["layer"]]
        if row["layer"] in export["ternary"]:
            codes = export["ternary"][row["layer"]]["codes"]
            n = WEIGHTS[row["layer"]]
            assert row["bits"] == 2
            assert row["neg_pct"] + row["zero_pct"] + row["pos_pct"] == pytest.approx(100.0)
            assert row["neg_pct"] == pytest.approx(100 * int((codes == -1).sum()) / n)
            assert row["zero_pct"] == pytest.approx(100 * int((codes == 0).sum()) / n)
            assert row["pos_pct"] == pytest.approx(100 * int((codes == 1).sum()) / n)
            if row["groups"] == 1:
                assert row["distinct"] <= 3
        else:
            assert row["bits"] == 32 and row["groups"] == 0


def test_size_summary(trained):
    name, _, _, export = trained
    s = size_summary(export)
    assert s["total_params"] == TOTAL_PARAMS
    if name == "fp":
        assert s["quantized_params"] == 0
        assert s["bits_per_weight"] == 32 and s["compression"] == 1 and s["zero_frac"] == 0.0
        return
    assert s["quantized_params"] == 581_408
    assert s["bits_per_weight"] == 2.0 and s["compression"] == 16.0
    zeros = sum(int((e["codes"] == 0).sum()) for e in export["ternary"].values())
    assert s["zero_frac"] == pytest.approx(zeros / 581_408)


# ---------------------------------------------------------------- keep_fp
@pytest.mark.parametrize("mode", [m for m in METHODS if m != "fp"])
def test_keep_first_and_last_in_fp(mode):
    keep = parse_keep_fp("first,last")
    method, model = fresh(mode, keep_fp=keep, **({"finetune_frac": 0.0} if mode == "admm" else {}))
    assert [n for n, _ in method.quantized(model)] == ["conv2", "fc1"]
    assert model.conv1.quantizer is None and model.fc2.quantizer is None
    if mode == "admm":  # ADMM trains plain W and installs its frozen quantizers only at the end
        assert set(method.state.layers) == {"conv2", "fc1"}
    else:
        assert model.conv2.quantizer is not None and model.fc1.quantizer is not None
    train_briefly(method, model, steps=2)
    export = method.export(model)
    check_ternary(export)
    assert set(export["ternary"]) == {"conv2", "fc1"}
    for name in ("conv1", "fc2"):
        assert torch.equal(export["float"][f"{name}.weight"], getattr(model, name).weight.detach())
        assert len(torch.unique(export["float"][f"{name}.weight"])) > 3  # really full precision
    x = probe()
    with torch.no_grad():
        torch.testing.assert_close(rebuild_model(export)(x), model(x), rtol=1e-5, atol=1e-5)

    s = size_summary(export)
    ternary, fp = WEIGHTS["conv2"] + WEIGHTS["fc1"], WEIGHTS["conv1"] + WEIGHTS["fc2"]
    bits = 2 * ternary + 32 * fp  # 1,150,976 + 189,440
    assert s["total_params"] == TOTAL_PARAMS
    assert s["quantized_params"] == ternary == 575_488
    assert s["bits_per_weight"] == pytest.approx(bits / 581_408)  # 2.3055
    assert s["compression"] == pytest.approx(32 * 581_408 / bits)  # 13.88x
    zeros = sum(int((export["ternary"][n]["codes"] == 0).sum()) for n in ("conv2", "fc1"))
    assert s["zero_frac"] == pytest.approx(zeros / ternary)
    rows = {r["layer"]: r for r in layer_table(export)}
    assert rows["conv1"]["bits"] == rows["fc2"]["bits"] == 32 and rows["fc1"]["bits"] == 2


# ---------------------------------------------------------------- tampering
@pytest.fixture(scope="module")
def valid_export():
    method, model = fresh("twn")
    export = method.export(model)
    check_ternary(export)
    return export


def tamper_code(value):
    def f(e):
        e["ternary"]["conv1"]["codes"][0, 0, 0, 0] = value
    return f


def set_scale(key, value):
    def f(e):
        e["ternary"]["fc1"][key] = value
    return f


# each tamper with the part of the error message that names what is wrong
TAMPERS = {
    "code 2": (tamper_code(2), "codes"),
    "code -2 (a 4th level)": (tamper_code(-2), "codes"),
    "codes stored as float weights": (lambda e: e["ternary"]["conv2"].update(
        codes=e["ternary"]["conv2"]["codes"].float() * 0.5), "codes"),
    "codes int32": (lambda e: e["ternary"]["fc2"].update(codes=e["ternary"]["fc2"]["codes"].to(torch.int32)), "codes"),
    "3 scales for 512 channels": (set_scale("w_p", torch.ones(3)), "scales"),
    "w_p per channel, w_n per layer": (set_scale("w_p", torch.ones(512)), "scales"),
    "w_n has 2 scales": (set_scale("w_n", torch.ones(2)), "scales"),
    "NaN w_p": (set_scale("w_p", torch.tensor([float("nan")])), "non-finite"),
    "inf w_n": (set_scale("w_n", torch.tensor([float("inf")])), "non-finite"),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_check_ternary_rejects_tampered(valid_export, tamper):
    bad = copy.deepcopy(valid_export)
    change, reason = TAMPERS[tamper]
    change(bad)
    with pytest.raises(NotTernaryError, match=reason):
        check_ternary(bad)
    with pytest.raises(NotTernaryError):
        rebuild_model(bad)
    check_ternary(valid_export)  # the original is untouched


def test_check_ternary_rejects_four_values_in_a_group(valid_export, monkeypatch):
    # Valid int8 codes and matching scales cannot produce a 4th value, so the last guard is reached only if
    # dequantization itself goes wrong; simulate that to keep the guard honest.
    real = export_mod.dequantize

    def broken(codes, w_p, w_n):
        w = real(codes, w_p, w_n)
        w.view(-1)[0] = 12345.0
        return w

    monkeypatch.setattr(export_mod, "dequantize", broken)
    with pytest.raises(NotTernaryError, match="distinct"):
        check_ternary(valid_export)
