"""quant/engine.py: evaluate() against a one-shot reference, training lowers the loss for every method,
a fixed seed reproduces weights and history bit for bit on CPU, and a non-finite loss stops training."""
import math

import pytest
import torch
import torch.nn.functional as F

from quant.config import default_config
from quant.data import load_mnist
from quant.engine import DivergenceError, evaluate, train
from quant.methods import METHODS, get_method
from quant.model import LeNet5
from quant.runs import train_run


@pytest.fixture(scope="module")
def synthetic(synthetic_mnist):
    return load_mnist(synthetic_mnist, val_size=64, split_seed=0, verify_checksum=False, allow_download=False)


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return LeNet5()


# engine.train's arguments besides epochs, lr and batch size, for the tests that call it directly
PLAIN = {"schedule": "onecycle", "weight_decay": 0.0, "shift": 0, "seed": 0, "precision": "fp32", "progress": False}


def run(mode, data, seed=0, epochs=1, lr=3e-3, **overrides):
    """runs.train_run of `mode`'s default config at batch 64, no augmentation: (model, method, history)."""
    # FP32 unless a test asks for bf16: the default precision (auto) depends on the CPU
    overrides = {"precision": "fp32", **overrides}
    config = default_config(mode, seed=seed, epochs=epochs, lr=lr, batch_size=64, shift=0, **overrides)
    result = train_run(config, data, log=lambda line: None)
    return result["model"], result["method"], result["history"]


def test_evaluate_matches_one_shot_reference():
    torch.manual_seed(1)
    model = LeNet5()
    model.bn1.running_mean.uniform_(-0.5, 0.5)  # non-trivial eval-mode statistics
    x, y = torch.randn(23, 1, 28, 28), torch.randint(0, 10, (23,))
    got = evaluate(model, x, y, batch_size=5)  # 5 batches, the last of 3 samples
    with torch.no_grad():
        logits = model.eval()(x)
    assert math.isclose(got["loss"], F.cross_entropy(logits, y).item(), rel_tol=1e-5)
    assert torch.equal(got["preds"], logits.argmax(1))
    assert got["acc"] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert not model.training


@pytest.mark.parametrize("mode", list(METHODS))
def test_training_lowers_the_loss_and_is_reproducible(synthetic, mode):
    before = evaluate(fresh_model(0), synthetic.train_x, synthetic.train_y)["loss"]
    model_a, method_a, history_a = run(mode, synthetic)
    model_b, method_b, history_b = run(mode, synthetic)
    # The trained network (whatever its method's quantizers do) fits the learnable synthetic classes.
    after = evaluate(model_a, synthetic.train_x, synthetic.train_y)
    assert after["loss"] < 0.5 * before, (before, after["loss"])
    assert after["acc"] > 50
    assert len(history_a) == 1 and history_a[0]["epoch"] == 1
    assert history_a[0]["train_loss"] < before
    # Same seed, same data, same thread count: bitwise identical weights and metrics.
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    drop = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]
    assert drop(history_a) == drop(history_b)


def test_different_seed_gives_different_weights(synthetic):
    model_a, _, _ = run("fp", synthetic, seed=0)
    model_b, _, _ = run("fp", synthetic, seed=1)
    assert not torch.equal(model_a.fc2.weight, model_b.fc2.weight)


def test_history_has_one_row_per_epoch_and_logs_each(synthetic):
    lines = []
    model = fresh_model()
    method = get_method("fp")
    history = train(model, method, synthetic, epochs=2, lr=3e-3, batch_size=128, **PLAIN, log=lines.append)
    assert [row["epoch"] for row in history] == [1, 2] and len(lines) == 2
    for row in history:
        assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= row.keys()
        assert 0 <= row["val_acc"] <= 100
    val = evaluate(model, synthetic.val_x, synthetic.val_y)
    assert history[-1]["val_loss"] == pytest.approx(val["loss"], rel=1e-6)


def test_nan_loss_raises_divergence_error(synthetic):
    class Poisoned(METHODS["fp"]):
        """FP whose extra loss turns NaN on the third step."""
        calls = 0

        def extra_loss(self):
            Poisoned.calls += 1
            return torch.tensor(float("nan") if Poisoned.calls == 3 else 0.0)

    model = fresh_model()
    with pytest.raises(DivergenceError, match="step 3") as e:
        train(model, Poisoned([], {}), synthetic, epochs=1, lr=3e-3, batch_size=64, **PLAIN, log=lambda _: None)
    assert "lr" in str(e.value)


@pytest.mark.parametrize("total_steps", range(1, 13))
def test_onecycle_survives_very_short_runs(total_steps):
    # OneCycleLR divides by (warm-up steps - 1): 5 total steps at pct_start 0.2 used to raise ZeroDivisionError.
    from quant.engine import make_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1e-3)
    scheduler = make_scheduler(optimizer, "onecycle", total_steps)
    lrs = []
    for _ in range(total_steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert all(0 < lr <= 1e-3 + 1e-12 for lr in lrs)


@pytest.mark.parametrize("mode", list(METHODS))
def test_bf16_trains_fp32_master_weights_and_lowers_the_loss(synthetic, mode):
    """bf16 autocast covers the forward only: parameters, scales and the export stay FP32, and it still learns."""
    model, method, history = run(mode, synthetic, epochs=2, precision="bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    export = method.export(model.cpu())
    for layer in export["ternary"].values():
        assert layer["w_p"].dtype == torch.float32 and layer["w_n"].dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in export["float"].values() if t.is_floating_point())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    fp32_model, _, _ = run(mode, synthetic, epochs=2)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), fp32_model.parameters()))


def test_resolve_precision(monkeypatch):
    import quant.engine as engine

    assert engine.resolve_precision("fp32", "cpu") == "fp32"
    assert engine.resolve_precision("bf16", "cpu") == "bf16"  # asked for: emulated where not native
    monkeypatch.setattr(engine, "native_bf16", lambda device: False)
    assert engine.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(engine, "native_bf16", lambda device: True)
    assert engine.resolve_precision("auto", "cpu") == "bf16"
    with pytest.raises(ValueError, match="choose from fp32, bf16, auto"):
        engine.resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="fp32 or bf16"):
        train(LeNet5(), get_method("fp"), None, epochs=1, lr=1e-3, batch_size=8, **{**PLAIN, "precision": "auto"})
