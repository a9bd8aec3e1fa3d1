"""quant/methods.py: the registry lookup and its errors, what each method attaches, the optimizer groups,
TTQ's positivity clamp and warm-up, ADMM's hooks, BN recalibration (cumulative average, recomputed by hand)
and whether each epoch's validation ran on ternary weights (`val_ternary`)."""
import pytest
import torch

from conftest import train_steps
from quant.config import MODES, hyperparams, parse_keep_fp
from quant.methods import METHODS, get_method, recalibrate_bn
from quant.model import QUANT_LAYERS, LeNet5
from quant.ttq import TTQQuantizer
from quant.twn import TWNQuantizer


def fresh_model():
    torch.manual_seed(0)
    return LeNet5()


def attached(mode, keep_fp=(), **hparams):
    model = fresh_model()
    method = get_method(mode, keep_fp=keep_fp, **hparams)
    method.attach(model)
    return model, method


# ---------------------------------------------------------------- registry
def test_registry_is_consistent():
    assert tuple(METHODS) == MODES == ("fp", "twn", "ttq", "admm")
    for mode, cls in METHODS.items():
        method = get_method(mode)
        assert isinstance(method, cls) and method.name == mode
        assert method.hparams == hyperparams(mode)


def test_unknown_mode_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_method("bwn")
    message = str(err.value)
    assert "bwn" in message
    for mode in METHODS:
        assert mode in message


@pytest.mark.parametrize("mode", [m for m in METHODS if hyperparams(m)])
def test_unknown_hyperparameter_lists_valid_names(mode):
    with pytest.raises(ValueError) as err:
        get_method(mode, bogus_knob=1)
    message = str(err.value)
    assert "bogus_knob" in message
    for name in hyperparams(mode):
        assert name in message


def test_hyperparameter_of_another_mode_is_rejected():
    with pytest.raises(ValueError, match="a hyperparameter of --mode ttq"):
        get_method("twn", t=0.05)  # TTQ's threshold is not a TWN knob
    with pytest.raises(ValueError, match="a hyperparameter of --mode twn"):
        get_method("fp", delta_factor=0.7)
    with pytest.raises(ValueError, match="penalty: 'l1' is not one of prox, loss"):
        get_method("admm", penalty="l1")


def test_overrides_merge_with_defaults_and_reach_the_quantizers():
    model, method = attached("twn", delta_factor=0.75)
    assert method.hparams == {**hyperparams("twn"), "delta_factor": 0.75}
    for _, layer in model.quant_layers():
        assert isinstance(layer.quantizer, TWNQuantizer)
        assert layer.quantizer.delta_factor == 0.75 and layer.quantizer.per_channel is False
    model, method = attached("ttq", t=0.2)
    assert all(isinstance(l.quantizer, TTQQuantizer) and l.quantizer.t == 0.2 for _, l in model.quant_layers())


@pytest.mark.parametrize("mode", [m for m in METHODS if m != "fp"])
def test_keep_fp_layers_get_no_quantizer(mode):
    model, method = attached(mode, keep_fp=parse_keep_fp("first,last"))
    assert [n for n, _ in method.quantized(model)] == ["conv2", "fc1"]
    assert model.conv1.quantizer is None and model.fc2.quantizer is None


def test_fp_attaches_nothing():
    model, method = attached("fp")
    assert method.quantized(model) == [] and method.extra_loss() is None
    assert all(layer.quantizer is None for _, layer in model.quant_layers())
    assert method.export(model)["ternary"] == {}


# ---------------------------------------------------------------- hooks
@pytest.mark.parametrize("mode", list(METHODS))
def test_param_groups_cover_every_trainable_tensor_once(mode):
    model, method = attached(mode)
    groups = method.param_groups(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a tensor in two groups makes torch.optim raise"
    assert {id(p) for p in model.parameters()} <= set(ids)
    if mode == "ttq":
        scale_group = [g for g in groups if any(p is model.conv1.quantizer.w_p for p in g["params"])]
        assert len(scale_group) == 1 and scale_group[0]["lr_mult"] == hyperparams("ttq")["scale_lr"]
        assert len(scale_group[0]["params"]) == 2 * len(QUANT_LAYERS)
    if mode == "admm":
        assert {id(f.alpha) for f in method.frozen.values()} <= set(ids)
    torch.optim.Adam([{"params": g["params"], "lr": 1e-3 * g["lr_mult"]} for g in groups])


@pytest.mark.parametrize("mode", list(METHODS))
def test_methods_train_through_the_hooks(mode):
    """One step through the engine's hook sequence changes the weights and keeps the loss finite."""
    model, method = attached(mode)
    before = model.fc1.weight.detach().clone()
    x, y = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)), torch.arange(8)
    (loss,) = train_steps(method, model, x, y, steps=1, lr=1e-3)
    assert torch.isfinite(torch.tensor(loss))
    assert not torch.equal(before, model.fc1.weight.detach())


def test_ttq_after_step_keeps_scales_positive():
    model, method = attached("ttq", warmup_frac=0.0)  # ternary from the first step
    with torch.no_grad():
        model.conv1.quantizer.w_p.fill_(-0.5)
        model.fc1.quantizer.w_n.fill_(-2.0)
        model.fc2.quantizer.w_p.fill_(0.3)
    method.after_step(model, 1, 10)
    assert model.conv1.quantizer.w_p.item() == pytest.approx(1e-8)
    assert model.fc1.quantizer.w_n.item() == pytest.approx(1e-8)
    assert model.fc2.quantizer.w_p.item() == pytest.approx(0.3)


def test_ttq_warmup_trains_fp_then_ternarizes_at_its_step():
    model, method = attached("ttq", warmup_frac=0.5)
    assert not model.fc1.quantizer.active and method.epoch_stats() == {"val_ternary": 0}
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model.fc2.quantizer(model.fc2.weight), model.fc2.weight)  # FP during the warm-up
    method.after_step(model, 1, 4)  # the warm-up is int(0.5 * 4) = 2 steps
    assert not any(layer.quantizer.active for _, layer in model.quant_layers())
    with torch.no_grad():
        model.fc1.weight.mul_(3.0)  # the weights moved during the warm-up
    method.after_step(model, 2, 4)
    assert method.epoch_stats() == {"val_ternary": 1}
    for _, layer in model.quant_layers():
        q = layer.quantizer
        assert q.active and q.w_p.item() == q.w_n.item()
        assert len(torch.unique(q(layer.weight))) <= 3
    codes = model.fc1.quantizer.export(model.fc1.weight)["codes"]
    by_hand = (model.fc1.weight.abs() * (codes != 0)).sum() / (codes != 0).sum()
    assert model.fc1.quantizer.w_p.item() == pytest.approx(by_hand.item(), rel=1e-5)
    model.eval()
    assert model(x).shape == (4, 10)


def test_admm_prox_penalty_is_a_step_not_a_loss():
    model, method = attached("admm", rho=0.5, finetune_frac=0.5, admm_rounds=1)
    assert method.extra_loss() is None  # the default penalty is the proximal step
    with torch.no_grad():
        model.fc2.weight.add_(0.1)
    W = {n: l.weight.detach().clone() for n, l in model.quant_layers()}
    target = {n: method.state.G[n] - method.state.U[n] for n in W}
    method.after_step(model, 1, 6)  # 1 round over the 3-step phase, at step 2: only the prox step
    for name, layer in model.quant_layers():
        # argmin_V rho/2 ||V - G + U||^2 + 1/2 ||V - W||^2, by its closed form
        torch.testing.assert_close(layer.weight.detach(), (W[name] + 0.5 * target[name]) / 1.5)
    assert method.state.rho == 0.5


def test_admm_extra_loss_is_the_penalty_until_frozen():
    model, method = attached("admm", rho=0.5, finetune_frac=0.5, admm_rounds=2, penalty="loss")
    with torch.no_grad():
        model.fc2.weight.add_(0.1)
    by_hand = 0.25 * sum(((l.weight - method.state.G[n]) ** 2).sum() for n, l in model.quant_layers())
    assert method.extra_loss().item() == pytest.approx(by_hand.item(), rel=1e-5)
    method.after_step(model, 1, 4)  # step 1 of 4, fine-tune is the last 2: an ADMM round
    assert method.state.rho == 0.5 * hyperparams("admm")["rho_growth"] and not method.finetuning
    assert method.epoch_stats()["val_ternary"] == 0  # the latent W is not ternary yet
    method.after_step(model, 2, 4)  # the fine-tune starts: weights projected, codes frozen, no penalty
    assert method.finetuning and method.extra_loss() is None and method.epoch_stats()["val_ternary"] == 1
    for name, layer in model.quant_layers():
        assert layer.quantizer is method.frozen[name]
        assert len(torch.unique(layer.weight)) <= 3


@pytest.mark.parametrize("mode,ternary", [("fp", 0), ("twn", 1)])
def test_val_ternary_of_fp_and_twn(mode, ternary):
    assert attached(mode)[1].epoch_stats() == {"val_ternary": ternary}
    assert attached("twn", keep_fp=list(QUANT_LAYERS))[1].epoch_stats() == {"val_ternary": 0}  # nothing quantized


def test_recalibrate_bn_is_the_cumulative_average():
    model = fresh_model()
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(4, 1, 28, 28, generator=gen), None) for _ in range(3)]
    with torch.no_grad():
        model.bn1.running_mean.fill_(7.0)  # stale statistics must be discarded
        means = [model.conv1(x).mean(dim=(0, 2, 3)) for x, _ in batches]
        variances = [model.conv1(x).var(dim=(0, 2, 3), unbiased=True) for x, _ in batches]
    recalibrate_bn(model, batches)
    torch.testing.assert_close(model.bn1.running_mean, sum(means) / 3, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_var, sum(variances) / 3, rtol=1e-4, atol=1e-5)
    assert not model.training and model.bn1.momentum == 0.1
