"""quant/twn.py: Δ and α recomputed by plain-Python loops (per layer and per output channel, factors
0.7 and 0.75), hand-worked examples, the three-level property, and the identity STE (arXiv 1605.04711, Eqs. 3-6, Sec. 2.4)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.twn import TernarizeSTE, TWNQuantizer, twn_ternarize

FACTORS = [0.7, 0.75]


def twn_reference(values, delta_factor):
    """Eqs. 3, 5, 6 over a flat list of Python floats: (codes list, alpha, delta)."""
    n = len(values)
    delta = delta_factor * sum(abs(v) for v in values) / n
    kept = [abs(v) for v in values if abs(v) > delta]
    alpha = sum(kept) / len(kept) if kept else 0.0
    codes = [(1 if v > 0 else -1) if abs(v) > delta else 0 for v in values]
    return codes, alpha, delta


def groups_of(w: torch.Tensor, per_channel: bool):
    """The scale groups as lists of floats: one per output channel, or the whole tensor."""
    rows = w.double().reshape(w.shape[0], -1).tolist()
    return rows if per_channel else [[v for row in rows for v in row]]


def margin(values, delta):
    """Distance of the closest |w| to the threshold; float32 vs float64 rounding only matters below ~1e-6."""
    return min(abs(abs(v) - delta) for v in values)


# ---------------------------------------------------------------- hand-worked examples
def test_hand_example_factor_07_and_075_differ():
    # sum|W| = 2.46, mean = 0.351428...; 0.7 * mean = 0.2460 keeps -0.26, 0.75 * mean = 0.26357 drops it.
    w = torch.tensor([1.0, -0.5, 0.2, -0.1, 0.0, 0.4, -0.26])
    codes, alpha, delta = twn_ternarize(w, 0.7, False)
    assert codes.tolist() == [1, -1, 0, 0, 0, 1, -1]
    assert alpha.item() == pytest.approx((1.0 + 0.5 + 0.4 + 0.26) / 4, rel=1e-6)  # 0.54
    assert delta.item() == pytest.approx(0.7 * 2.46 / 7, rel=1e-6)
    codes, alpha, delta = twn_ternarize(w, 0.75, False)
    assert codes.tolist() == [1, -1, 0, 0, 0, 1, 0]
    assert alpha.item() == pytest.approx((1.0 + 0.5 + 0.4) / 3, rel=1e-6)
    assert delta.item() == pytest.approx(0.75 * 2.46 / 7, rel=1e-6)


def test_weight_exactly_at_threshold_is_zero():
    # mean|W| = 16/4 = 4, delta = 0.75 * 4 = 3 exactly in binary; Eq. 3 sends |W| <= delta to 0.
    for w3 in (3.0, -3.0):
        codes, alpha, delta = twn_ternarize(torch.tensor([8.0, -5.0, w3, 0.0]), 0.75, False)
        assert delta.item() == 3.0
        assert codes.tolist() == [1, -1, 0, 0]
        assert alpha.item() == 6.5


def test_per_channel_hand_example():
    # channel 0: |W| = 4, 2, 1, 1 -> mean 2, delta(0.75) = 1.5, keep 4 and 2 -> alpha 3
    # channel 1: |W| = 0.3, 0.1, 0.1, 0.1 -> mean 0.15, delta = 0.1125, keep 0.3 -> alpha 0.3
    w = torch.tensor([[4.0, -2.0, 1.0, -1.0], [-0.3, 0.1, -0.1, 0.1]]).reshape(2, 1, 2, 2)
    codes, alpha, delta = twn_ternarize(w, 0.75, per_channel=True)
    assert codes.shape == w.shape and codes.dtype == torch.int8
    assert codes.reshape(2, 4).tolist() == [[1, -1, 0, 0], [-1, 0, 0, 0]]
    assert alpha.tolist() == pytest.approx([3.0, 0.3], rel=1e-6)
    assert delta.tolist() == pytest.approx([1.5, 0.1125], rel=1e-6)
    # per layer the small channel is wiped out: mean = 8.6 / 8 = 1.075, delta = 0.80625
    codes, alpha, _ = twn_ternarize(w, 0.75, per_channel=False)
    assert codes.reshape(2, 4).tolist() == [[1, -1, 1, -1], [0, 0, 0, 0]]
    assert alpha.tolist() == pytest.approx([2.0], rel=1e-6)


def test_all_zero_group_gets_alpha_zero_not_nan():
    w = torch.zeros(3, 4)
    w[1] = torch.tensor([0.5, -1.0, 0.1, 2.0])
    codes, alpha, _ = twn_ternarize(w, 0.7, per_channel=True)
    assert torch.isfinite(alpha).all()
    assert alpha[0].item() == 0.0 and alpha[2].item() == 0.0
    assert (codes[0] == 0).all() and (codes[2] == 0).all()
    out = TWNQuantizer(0.7, per_channel=True)(torch.zeros(2, 3))
    assert torch.equal(out, torch.zeros(2, 3))


# ---------------------------------------------------------------- against the loop reference
SHAPES = [(7,), (5, 9), (6, 3, 5, 5), (4, 20)]  # weights of Linear [out, in] and Conv2d [out, in, kh, kw]


# per channel only for tensors with an output-channel axis (torch reads dim=() of a 1-D tensor as "all")
CASES = [(s, f, pc) for s in SHAPES for f in FACTORS for pc in (False, True) if len(s) > 1 or not pc]


@pytest.mark.parametrize("shape, delta_factor, per_channel", CASES)
def test_matches_loop_reference(shape, delta_factor, per_channel):
    gen = torch.Generator().manual_seed(hash((shape, delta_factor, per_channel)) % 2**31)
    w = torch.randn(shape, generator=gen) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=gen)
    codes, alpha, delta = twn_ternarize(w, delta_factor, per_channel)
    groups = groups_of(w, per_channel)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert alpha.shape == delta.shape == (len(groups),)
    flat_codes = codes.reshape(len(groups), -1).tolist()
    for g, values in enumerate(groups):
        ref_codes, ref_alpha, ref_delta = twn_reference(values, delta_factor)
        assert margin(values, ref_delta) > 1e-5, "test data too close to the threshold"
        assert flat_codes[g] == ref_codes
        assert alpha[g].item() == pytest.approx(ref_alpha, rel=1e-5)
        assert delta[g].item() == pytest.approx(ref_delta, rel=1e-5)
    # the STE forward is alpha * T with the same alpha and T
    out = TWNQuantizer(delta_factor, per_channel)(w)
    for g, values in enumerate(groups):
        ref_codes, ref_alpha, _ = twn_reference(values, delta_factor)
        got = out.reshape(len(groups), -1)[g].double().numpy()
        np.testing.assert_allclose(got, ref_alpha * np.array(ref_codes, dtype=np.float64), rtol=1e-5, atol=0)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=40),
       delta_factor=st.sampled_from(FACTORS), per_channel=st.booleans())
def test_every_output_is_one_of_three_levels(values, delta_factor, per_channel):
    w = torch.tensor(values, dtype=torch.float32)
    w = w.reshape(2, -1) if len(values) % 2 == 0 else w.reshape(1, -1)
    out = TWNQuantizer(delta_factor, per_channel)(w)
    codes, alpha, delta = twn_ternarize(w, delta_factor, per_channel)
    a = alpha.expand(w.shape[0]) if alpha.numel() == 1 else alpha
    d = delta.expand(w.shape[0]) if delta.numel() == 1 else delta
    assert len(a) == len(d) == len(out) == w.shape[0]
    for row, arow, crow, drow, wrow in zip(out, a, codes, d, w):
        levels = {-arow.item(), 0.0, arow.item()}
        assert set(row.tolist()) <= levels
        assert torch.equal(row, crow.float() * arow)
        # codes agree with Eq. 3 for this group's own delta, element by element
        for c, x in zip(crow.tolist(), wrow.tolist()):
            assert c == (0 if abs(x) <= drow.item() else int(math.copysign(1, x)))
    assert (alpha >= 0).all()


# ---------------------------------------------------------------- straight-through gradient
@pytest.mark.parametrize("per_channel", [False, True])
def test_ste_gradient_is_identity_linear_loss(per_channel):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 6, generator=gen, requires_grad=True)
    g = torch.randn(4, 6, generator=gen)
    (TWNQuantizer(0.7, per_channel)(w) * g).sum().backward()
    # dL/dW = dL/d(alpha T) = g everywhere, zeroed weights included; no term through delta or alpha
    assert torch.equal(w.grad, g)


def test_ste_gradient_nonlinear_loss_by_hand():
    w = torch.tensor([1.0, -0.5, 0.2, -0.1, 0.0, 0.4, -0.26], requires_grad=True)
    c = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    out = TernarizeSTE.apply(w, 0.7, False)
    (c * out ** 2).sum().backward()
    # out = 0.54 * [1, -1, 0, 0, 0, 1, -1] (see the hand example), dL/dout = 2 c out, passed straight through
    alpha = 0.54
    expected = [2 * ci * alpha * ti for ci, ti in zip(c.tolist(), [1, -1, 0, 0, 0, 1, -1])]
    assert w.grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_export_entry_matches_forward():
    w = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    for per_channel in (False, True):
        q = TWNQuantizer(0.75, per_channel)
        entry = q.export(w)
        assert torch.equal(entry["w_p"], entry["w_n"])
        scale = entry["w_p"].reshape(-1, 1, 1, 1)
        assert torch.equal(entry["codes"].float() * scale, q(w))
