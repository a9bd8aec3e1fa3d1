"""quant/admm.py: the exact projection against brute force over all of {−1,0,1}^n, never worse than TWN's
rule or the paper's alternating α/2 scheme; the dual update, penalty, its gradient and the primal residual
recomputed by hand; the schedule's rounds counted; the final hard projection of the ADMM method (Leng et al.,
arXiv 1707.09870, Sec. 3)."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import train_steps
from quant import methods
from quant.admm import ADMMState, FrozenTernary, admm_phase_steps, project_ternary, round_interval, schedule
from quant.config import MNIST_TRAIN, default_config
from quant.engine import steps_per_epoch
from quant.export import check_ternary
from quant.model import QUANT_LAYERS, LeNet5, QuantLinear

ALL_CODES = {n: np.array(list(itertools.product((-1, 0, 1), repeat=n)), dtype=np.float64) for n in range(1, 8)}


def brute_force(v: np.ndarray):
    """Every T in {-1,0,1}^n with its optimal alpha = <v,T>/<T,T> (T = 0: alpha = 0): (errors, codes)."""
    T = ALL_CODES[len(v)]
    tt = (T * T).sum(1)
    alpha = np.where(tt > 0, T @ v / np.maximum(tt, 1), 0.0)
    return ((v[None, :] - alpha[:, None] * T) ** 2).sum(1), T


def sq_error(v: np.ndarray, codes, alpha) -> float:
    return float(((v - float(alpha) * np.asarray(codes, dtype=np.float64).reshape(v.shape)) ** 2).sum())


def twn_rule_error(v: np.ndarray, factor: float) -> float:
    a = np.abs(v)
    T = np.sign(v) * (a > factor * a.mean())
    alpha = a[T != 0].mean() if (T != 0).any() else 0.0
    return sq_error(v, T, alpha)


def alternating_error(v: np.ndarray, rounds: int = 5) -> float:
    """The paper's iterative quantization: T = round(v / alpha) (0 iff |v| <= alpha/2), alpha = <v,T>/<T,T>."""
    alpha = np.abs(v).mean()
    T = np.zeros_like(v)
    for _ in range(rounds):
        T = np.sign(v) * (np.abs(v) > alpha / 2)
        if not T.any():
            break
        alpha = (v @ T) / (T @ T)
    return sq_error(v, T, alpha if T.any() else 0.0)


# ---------------------------------------------------------------- the exact projection
def check_against_brute_force(values):
    v32 = torch.tensor(values, dtype=torch.float32)
    v = v32.double().numpy()
    codes, alpha, delta = project_ternary(v32)
    assert codes.dtype == torch.int8 and codes.shape == v32.shape
    assert set(codes.tolist()) <= {-1, 0, 1} and alpha.item() >= 0
    errors, T = brute_force(v)
    best = errors.min()
    got = sq_error(v, codes.numpy(), alpha.item())
    scale = max(float(v @ v), 1e-30)
    assert got <= best + 1e-6 * scale, f"projection error {got} > brute-force optimum {best}"
    winners = np.flatnonzero(errors <= best + 1e-9 * scale)
    if len(winners) == 1 and best > 0:
        assert codes.tolist() == T[winners[0]].astype(int).tolist()
        nz = T[winners[0]] != 0
        assert alpha.item() == pytest.approx(np.abs(v[nz]).mean(), rel=1e-6)
    # delta is the largest |v| left at zero
    zero_abs = np.abs(v)[codes.numpy() == 0]
    assert delta.item() == pytest.approx(zero_abs.max() if zero_abs.size else 0.0, abs=1e-7)


def test_hand_example():
    # |v| sorted 3, 1, 0.5: k=1 -> 9/1 = 9, k=2 -> 16/2 = 8, k=3 -> 20.25/3 = 6.75; best k = 1, alpha = 3
    codes, alpha, delta = project_ternary(torch.tensor([-1.0, 3.0, 0.5]))
    assert codes.tolist() == [0, 1, 0] and alpha.item() == 3.0 and delta.item() == 1.0
    # |v| = 2, 2, 1.8, 0.1: k=3 -> 5.8^2/3 = 11.21 beats k=2 (8) and k=4 (11.9^2/... = 35.4/4 = 8.85)
    codes, alpha, _ = project_ternary(torch.tensor([2.0, -2.0, 1.8, 0.1]))
    assert codes.tolist() == [1, -1, 1, 0] and alpha.item() == pytest.approx(5.8 / 3, rel=1e-6)


@pytest.mark.parametrize("n", range(1, 8))
def test_matches_brute_force_seeded(n):
    rng = np.random.default_rng(n)
    for trial in range(40):
        kind = trial % 4
        if kind == 0:
            values = rng.standard_normal(n)
        elif kind == 1:
            values = rng.laplace(size=n)
        elif kind == 2:
            values = rng.uniform(-1, 1, n) * rng.choice([1e-3, 1.0, 1e3])
        else:  # ties and exact zeros
            values = rng.integers(-3, 4, n).astype(float)
        check_against_brute_force(values.astype(np.float32).tolist())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=1, max_size=7))
def test_matches_brute_force_property(values):
    check_against_brute_force(values)


@pytest.mark.parametrize("seed", range(30))
def test_never_worse_than_twn_rule_or_alternating(seed):
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(2, 2000))
    dist = seed % 3
    v = (rng.standard_normal(n) if dist == 0 else rng.laplace(size=n) if dist == 1 else rng.uniform(-1, 1, n))
    v = v.astype(np.float32)
    codes, alpha, _ = project_ternary(torch.from_numpy(v).reshape(-1, 1) if seed % 2 else torch.from_numpy(v))
    v = v.astype(np.float64)
    got = sq_error(v, codes.numpy().reshape(-1), alpha.item())
    tol = 1e-6 * float(v @ v)
    assert got <= twn_rule_error(v, 0.7) + tol
    assert got <= twn_rule_error(v, 0.75) + tol
    assert got <= alternating_error(v, 5) + tol


def test_strictly_better_than_twn_rule_on_a_skewed_vector():
    # one large weight and many small ones: TWN's 0.7*mean keeps the small ones, the exact projection does not
    v = np.array([10.0] + [0.5] * 20 + [0.0] * 20)
    codes, alpha, _ = project_ternary(torch.tensor(v, dtype=torch.float32))
    assert sq_error(v, codes.numpy(), alpha.item()) < twn_rule_error(v, 0.7) - 1.0


def test_all_zero_and_single_nonzero():
    for shape in [(5,), (2, 3, 2, 2)]:
        codes, alpha, delta = project_ternary(torch.zeros(shape))
        assert codes.dtype == torch.int8 and codes.shape == shape
        assert (codes == 0).all() and alpha.item() == 0.0 and delta.item() == 0.0
    codes, alpha, delta = project_ternary(torch.tensor([0.0, -0.0, -4.0, 0.0]))
    assert codes.tolist() == [0, 0, -1, 0] and alpha.item() == 4.0 and delta.item() == 0.0


# ---------------------------------------------------------------- ADMM state: G, U, rho, penalty
def small_layers(seed=0):
    torch.manual_seed(seed)
    return {"a": QuantLinear(3, 2), "b": QuantLinear(2, 3)}  # 6 weights each: brute force is 729 codes


def brute_projection(w: torch.Tensor) -> torch.Tensor:
    v = w.detach().double().flatten().numpy()
    errors, T = brute_force(v)
    i = int(errors.argmin())
    tt = (T[i] * T[i]).sum()
    alpha = (T[i] @ v) / tt if tt else 0.0
    return torch.tensor(alpha * T[i], dtype=torch.float64).reshape(w.shape)


def test_initial_state():
    layers = small_layers()
    state = ADMMState(layers, rho=0.1, rho_growth=1.5)
    for name, layer in layers.items():
        assert torch.equal(state.U[name], torch.zeros_like(layer.weight))
        torch.testing.assert_close(state.G[name].double(), brute_projection(layer.weight), rtol=1e-6, atol=1e-7)


def test_update_penalty_gradient_and_residual():
    layers = small_layers(1)
    rho, growth = 0.1, 1.5
    state = ADMMState(layers, rho=rho, rho_growth=growth)
    gen = torch.Generator().manual_seed(2)
    for round_ in range(3):
        with torch.no_grad():  # stand-in for SGD steps between ADMM rounds
            for layer in layers.values():
                layer.weight.add_(0.3 * torch.randn(layer.weight.shape, generator=gen))
        W = {n: layer.weight.detach().clone() for n, layer in layers.items()}
        U_old = {n: state.U[n].clone() for n in layers}
        if round_ == 0:
            assert all((u == 0).all() for u in U_old.values())
        state.update()
        rho *= growth
        assert state.rho == pytest.approx(rho)
        for n in layers:
            G = brute_projection(W[n] + U_old[n])
            torch.testing.assert_close(state.G[n].double(), G, rtol=1e-5, atol=1e-6)
            # scaled dual: lambda = rho * U is unchanged by the rho increase, so U shrinks by the growth factor
            torch.testing.assert_close(state.U[n], (U_old[n] + W[n] - state.G[n]) / growth)
            assert len(torch.unique(state.G[n])) <= 3
            assert torch.equal(state.G[n], state.codes[n].float() * state.alpha[n])
        if round_ >= 1:
            assert any((state.U[n] != 0).any() for n in layers), "the dual should have accumulated by now"

        # penalty = rho/2 * sum ||W - G + U||^2, by explicit loops
        by_hand = 0.0
        for n in layers:
            w, g, u = W[n].flatten().tolist(), state.G[n].flatten().tolist(), state.U[n].flatten().tolist()
            by_hand += sum((wi - gi + ui) ** 2 for wi, gi, ui in zip(w, g, u))
        by_hand *= rho / 2
        for layer in layers.values():
            layer.weight.grad = None
        penalty = state.penalty()
        assert penalty.item() == pytest.approx(by_hand, rel=1e-5)
        penalty.backward()
        for n, layer in layers.items():
            torch.testing.assert_close(layer.weight.grad, rho * (W[n] - state.G[n] + state.U[n]))
            assert layer.bias.grad is None  # the penalty touches weights only

        # primal residual = ||W - G|| / ||W|| over all quantized layers together
        num = sum(((W[n] - state.G[n]) ** 2).sum().item() for n in layers)
        den = sum((W[n] ** 2).sum().item() for n in layers)
        assert state.primal_residual() == pytest.approx((num / den) ** 0.5, rel=1e-5)


def test_prox_step_is_the_penalty_proximal_map():
    layers = small_layers(4)
    state = ADMMState(layers, rho=0.3, rho_growth=2.0)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.mul_(1.7)
    state.update()  # U != 0 from here on, rho = 0.6
    W = {n: layer.weight.detach().clone().requires_grad_(True) for n, layer in layers.items()}
    state.prox_step()
    for n, layer in layers.items():
        # the minimiser V of rho/2 ||V - G + U||^2 + 1/2 ||V - W||^2 zeroes its gradient
        V = layer.weight.detach()
        grad = state.rho * (V - state.G[n] + state.U[n]) + (V - W[n].detach())
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)
        torch.testing.assert_close(V, (W[n].detach() + 0.6 * (state.G[n] - state.U[n])) / 1.6)


def test_residual_zero_when_weights_are_ternary():
    layers = small_layers(3)
    with torch.no_grad():
        layers["a"].weight.copy_(torch.tensor([[0.5, 0.0, -0.5], [0.5, 0.5, 0.0]]))
        layers["b"].weight.copy_(torch.tensor([[2.0, -2.0], [0.0, 2.0], [-2.0, 0.0]]))
    state = ADMMState(layers, rho=1.0, rho_growth=1.0)
    assert state.primal_residual() == 0.0 and state.penalty().item() == 0.0
    state.update()
    assert all((state.U[n] == 0).all() for n in layers) and state.rho == 1.0


def test_frozen_ternary():
    codes = torch.tensor([[1, 0, -1]], dtype=torch.int8)
    f = FrozenTernary(codes, torch.tensor(0.25))
    out = f(torch.zeros(1, 3))
    assert out.tolist() == [[0.25, 0.0, -0.25]]
    out.sum().backward()
    assert f.alpha.grad.item() == 0.0  # 1 + 0 - 1
    entry = f.export(None)
    assert torch.equal(entry["codes"], codes) and entry["w_p"] is f.alpha and entry["w_n"] is f.alpha


# ---------------------------------------------------------------- the schedule: rounds, not a step interval
def test_round_interval_spreads_the_rounds_over_the_phase():
    assert round_interval(2322, 46) == 50  # the default run: 3 epochs x 860 steps, minus the 10 % fine-tune
    assert round_interval(2299, 46) == 49  # 46 x 50 = 2300 steps no longer fit
    assert round_interval(2300, 46) == 49  # the 46th round at step 2300 would fall on the projection
    assert round_interval(10, 3) == 3
    assert round_interval(0, 5) == 1 and round_interval(4, 10) == 1


def test_default_admm_run_rounds_every_50_steps():
    config = default_config("admm")
    total = config["epochs"] * steps_per_epoch(MNIST_TRAIN - config["val_size"], config["batch_size"])
    assert total == 2580  # 859 full batches of 64 and one of 24, three times
    hp = config["hyperparams"]
    assert round_interval(admm_phase_steps(total, hp["finetune_frac"]), hp["admm_rounds"]) == 50


def count_rounds(total_steps, **hparams):
    """Run the ADMM method's after_step over `total_steps` steps; returns (steps with a round, method)."""
    torch.manual_seed(0)
    model = LeNet5()
    method = methods.get_method("admm", **hparams)
    method.attach(model)
    rounds = []
    original = method.state.update
    method.state.update = lambda: (rounds.append(step), original())
    for step in range(1, total_steps + 1):
        method.after_step(model, step, total_steps)
    return rounds, method


@pytest.mark.parametrize("total_steps", [25, 30, 97])
def test_admm_runs_all_its_rounds_before_the_projection(total_steps):
    # 25 steps: a 20-step phase that 5 rounds every 4 steps would fill exactly, its last round on the projection
    rounds, method = count_rounds(total_steps, rho=1e-3, rho_growth=2.0, admm_rounds=5, finetune_frac=0.2)
    phase = admm_phase_steps(total_steps, 0.2)
    assert len(rounds) == 5 and rounds[-1] < phase  # all five rounds, each followed by ADMM steps
    assert method.state.rho == pytest.approx(1e-3 * 2.0 ** 5)  # the same final rho for a short and a long run
    assert method.finetuning


def test_schedule_by_hand():
    # 12 steps, fine-tune 1/4: phase of 9 steps, 2 rounds every (9 - 1) // 2 = 4 steps, projection after step 9
    actions = [schedule(step, 12, 2, 0.25) for step in range(1, 13)]
    assert actions == [None, None, None, "round", None, None, None, "round", "freeze", None, None, None]
    # no fine-tune: the rounds only (finish() projects after the last step)
    assert [schedule(step, 6, 2, 0.0) for step in range(1, 7)] == [None, "round", None, "round", None, None]


# ---------------------------------------------------------------- the method's final projection
@pytest.mark.parametrize("penalty", ["prox", "loss"])
def test_finish_projects_weights_exactly_and_export_is_ternary(penalty):
    torch.manual_seed(0)
    model = LeNet5()
    method = methods.get_method("admm", finetune_frac=0.0, admm_rounds=2, penalty=penalty)
    method.attach(model)
    assert (method.extra_loss() is None) == (penalty == "prox")
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    train_steps(method, model, x, y, steps=3, lr=1e-2)
    assert not method.finetuning  # finetune_frac 0: no frozen phase during training
    hp = method.hparams
    assert method.state.rho == pytest.approx(hp["rho"] * hp["rho_growth"] ** 2)  # rounds after steps 1 and 2
    latent = {n: getattr(model, n).weight.detach().clone() for n in QUANT_LAYERS}
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    method.finish(model, batches)
    # BN statistics re-estimated for the projected conv1: the cumulative average of the batch means
    with torch.no_grad():
        means = [model.conv1(b).mean(dim=(0, 2, 3)) for b, _ in batches]
    torch.testing.assert_close(model.bn1.running_mean, (means[0] + means[1]) / 2, rtol=1e-4, atol=1e-6)
    export = method.export(model)
    check_ternary(export)
    for n in QUANT_LAYERS:
        w = getattr(model, n).weight.detach()
        assert len(torch.unique(w)) <= 3, n
        codes, alpha, _ = project_ternary(latent[n])
        assert torch.equal(w, codes.float() * alpha)  # W <- Pi(W) of the latent weights at the end
        entry = export["ternary"][n]
        assert torch.equal(entry["codes"], codes)
        assert len(torch.unique(entry["codes"].float() * entry["w_p"])) <= 3
        assert entry["w_p"].item() == pytest.approx(alpha.item())
    assert not model.training
