"""quant/runs.py: the one run builder. A tuning-style run never shows the validation or test split to training
yet scores the deployed model on validation; a checkpoint holds the run (resolved precision, history, export)
and evaluating it (from the path or the loaded dict) scores exactly the rebuilt model."""
import math

import pytest
import torch

from quant.checkpoint import load_checkpoint
from quant.config import default_config
from quant.data import load_mnist
from quant.engine import DivergenceError, evaluate
from quant.export import rebuild_model
from quant.runs import build, evaluate_checkpoint, history_path, train_checkpoint, train_run


@pytest.fixture(scope="module")
def synthetic(synthetic_mnist):
    return load_mnist(synthetic_mnist, val_size=64, split_seed=0, verify_checksum=False, allow_download=False)


def quick(mode, **overrides):
    # FP32 whatever the CPU: the default precision (auto) would train in bf16 only where it is native
    return default_config(mode, epochs=1, batch_size=64, val_size=64, **{"precision": "fp32", **overrides})


def test_build_is_seeded_and_attaches_the_method():
    (a, method), (b, _), (c, _) = build(quick("ttq")), build(quick("ttq")), build(quick("ttq", seed=1))
    assert torch.equal(a.fc1.weight, b.fc1.weight) and not torch.equal(a.fc1.weight, c.fc1.weight)
    assert method.name == "ttq" and all(layer.quantizer is not None for _, layer in a.quant_layers())


def test_a_trial_never_shows_validation_to_training(synthetic):
    run = train_run(quick("twn"), synthetic, log=lambda _: None, epoch_validation=False)
    assert math.isnan(run["history"][0]["val_acc"])  # no per-epoch validation of the latent model
    expected = evaluate(rebuild_model(run["export"]), synthetic.val_x, synthetic.val_y)
    assert run["val"]["acc"] == expected["acc"] > 50 and run["val"]["loss"] == expected["loss"]
    assert run["precision"] == "fp32" and run["train_seconds"] > 0


def test_a_huge_finite_loss_is_divergence(synthetic):
    with pytest.raises(DivergenceError, match="diverged"):
        train_run(quick("fp", lr=1e6), synthetic, log=lambda _: None)


def test_checkpoint_holds_the_run_and_evaluates_its_export(synthetic, tmp_path):
    config = quick("ttq")
    out = tmp_path / "ttq.pth"
    ckpt = train_checkpoint(config, synthetic, out, progress=False, log=lambda _: None)
    loaded = load_checkpoint(out, "ttq")
    assert loaded["config"] == config and loaded["precision"] == "fp32"
    assert history_path(out).is_file() and "val_ternary" in history_path(out).read_text().splitlines()[0]
    for name, layer in ckpt["export"]["ternary"].items():
        assert torch.equal(loaded["export"]["ternary"][name]["codes"], layer["codes"])
    by_path = evaluate_checkpoint(out, "ttq", synthetic)
    given = evaluate_checkpoint(out, "ttq", synthetic, ckpt=loaded)
    expected = evaluate(rebuild_model(loaded["export"]), synthetic.test_x, synthetic.test_y)
    assert by_path["row"]["test_acc"] == given["row"]["test_acc"] == round(expected["acc"], 4)
    assert torch.equal(by_path["preds"], expected["preds"]) and by_path["row"]["precision"] == "fp32"
