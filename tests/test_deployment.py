"""quant/deployment.py and deployment_compression.py: a trained checkpoint packed in every encoding and as
ONNX, each file verified against the checkpoint (and decoded by the spec-only decoder), the size report
recomputed independently, a prediction mismatch reported as an error, the results files written."""
import csv
import json
import math

import numpy as np
import pytest
import torch

import spec_decoder
from conftest import assert_one_line_error, call_script, run_script
from quant import deployment, packing
from quant.checkpoint import load_checkpoint, save_checkpoint
from quant.data import load_mnist, read_idx
from quant.deploy_format import unpack
from quant.errors import QuantError
from quant.export import rebuild_model
from test_deploy_format import make_export

FORMATS = [*packing.ENCODINGS, "onnx"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_mnist):
    """A TTQ checkpoint trained for one epoch on the synthetic digits (w_p != w_n, per-channel after folding)."""
    root = tmp_path_factory.mktemp("deploy")
    path = root / "checkpoints" / "ttq_seed0.pth"
    result = call_script("train.py", "--mode", "ttq", "--epochs", "2", "--val-size", "64", "--data-dir",
                         synthetic_mnist, "--skip-checksum", "--no-progress", "--out", path, cwd=root)
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def mnist(synthetic_mnist):
    return load_mnist(synthetic_mnist, test_only=True, verify_checksum=False)


@pytest.fixture(scope="module")
def packed(trained, mnist, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    shown = []
    out = deployment.pack_and_verify([trained], mnist=mnist, onnx=True, results_dir=results, command="test",
                                     show=shown.append)
    return out, shown, results


def test_every_format_is_written_and_verified(packed, trained):
    out, shown, _ = packed
    (summary,) = out["checkpoints"]
    assert shown == [summary] and out["not_packed"] == []
    for fmt in FORMATS:
        path = trained.with_name(f"ttq_seed0.{fmt}.tern" if fmt != "onnx" else "ttq_seed0.onnx")
        assert summary[f"file_{fmt}"] == str(path) and summary[f"file_bytes_{fmt}"] == path.stat().st_size
        assert summary[f"mismatches_{fmt}"] == 0 and summary[f"test_acc_{fmt}"] == summary["test_acc_checkpoint"]
    assert summary["test_acc_checkpoint"] > 50  # a trained model: the predictions compared are not all one class


def test_spec_decoder_reads_the_trained_files(packed, trained, mnist, synthetic_mnist):
    """The NumPy decoder written from the specification predicts the checkpoint's classes on raw test pixels."""
    images, _ = read_idx(synthetic_mnist / "t10k-images-idx3-ubyte", 0x803, (28, 28), None, None)
    with torch.no_grad():
        expected = rebuild_model(load_checkpoint(trained)["export"])(mnist.test_x).argmax(1).numpy()
    assert len(set(expected.tolist())) >= 5
    for encoding in packing.ENCODINGS:
        manifest, tensors = spec_decoder.read(trained.with_name(f"ttq_seed0.{encoding}.tern").read_bytes())
        assert np.array_equal(spec_decoder.run(manifest, tensors, images[:, None]).argmax(1), expected), encoding


def test_pixels_of_recovers_the_raw_images(mnist, synthetic_mnist):
    images, _ = read_idx(synthetic_mnist / "t10k-images-idx3-ubyte", 0x803, (28, 28), None, None)
    assert torch.equal(deployment.pixels_of(mnist.test_x), torch.from_numpy(images[:, None].copy()))
    with pytest.raises(QuantError, match="not normalised MNIST pixels"):
        deployment.pixels_of(mnist.test_x + 1e-3)


def test_results_files(packed):
    out, _, results = packed
    table = json.loads((results / "deployment.json").read_text())
    assert table["command"] == "test" and table["checkpoints"][0]["checkpoint"] == out["checkpoints"][0]["checkpoint"]
    with open(results / "deployment.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == ["conv1", "conv2", "fc1", "fc2", "total"]
    for column in ("file_bytes_entropy", "file_bytes_onnx", "bytes_entropy", "order0_bytes", "gap_entropy",
                   "bits_per_weight_entropy", "mismatches_onnx"):
        assert rows[-1][column] != "", column


def test_size_report_recomputed():
    """Every column re-derived: fixed-rate sizes from n, the entropy column from the packed file's own block
    lengths, the order-0 bound from the stored codes' frequencies, a kept-FP layer at 4 bytes per weight."""
    export = make_export("mixed")
    rows = {r["layer"]: r for r in deployment.size_report(export)}
    assert list(rows) == ["conv1", "conv2", "fc1", "fc2", "total"]
    conv1 = rows["conv1"]  # kept FP: 4 bytes/weight everywhere
    assert not conv1["ternary"] and conv1["weights"] == 800
    assert conv1["bytes_2bit"] == conv1["bytes_base3"] == conv1["bytes_entropy"] == conv1["fp32_bytes"] == 3200
    manifest, tensors = unpack(deployment.pack(export, "entropy"))
    lengths = {r["name"].removesuffix(".weight"): r["length"] for r in manifest["ternary"]}
    for layer in ("conv2", "fc1", "fc2"):
        row, codes = rows[layer], tensors[f"{layer}.weight"].flatten().tolist()  # stored (folded) codes
        n = len(codes)
        counts = [codes.count(v) for v in (-1, 0, 1)]
        h = -sum(c / n * math.log2(c / n) for c in counts if c)
        assert row["weights"] == n and row["bytes_2bit"] == -(-n // 4) and row["bytes_base3"] == -(-n // 5)
        assert row["bytes_entropy"] == lengths[layer]
        assert row["order0_bits"] == pytest.approx(h) and row["order0_bytes"] == pytest.approx(n * h / 8)
        assert row["gap_entropy"] == pytest.approx(lengths[layer] - n * h / 8)
        assert row["zero_fraction"] == counts[1] / n
        assert row["bits_per_weight_entropy"] == pytest.approx(8 * lengths[layer] / n)
    fc2 = rows["fc2"]
    assert fc2["bits_per_weight_2bit"] == 2.0 and fc2["bits_per_weight_base3"] == 1.6
    assert fc2["compression_2bit"] == 16.0 and fc2["compression_base3"] == 20.0
    total = rows["total"]
    assert total["weights"] == 581_408 and total["fp32_bytes"] == 4 * 581_408
    assert total["bytes_2bit"] == 3200 + 51_200 // 4 + 524_288 // 4 + 5120 // 4
    assert total["bytes_entropy"] == 3200 + sum(lengths.values())


def test_checkpoints_packed_by_the_caller_are_not_packed_again(packed, trained, mnist, tmp_path):
    (summary,) = packed[0]["checkpoints"]
    mapped = []
    out = deployment.pack_and_verify([trained], ("2bit",), mnist, results_dir=tmp_path, done={str(trained): summary},
                                     map_fn=lambda job, paths: (mapped.extend(paths), map(job, paths))[1])
    assert mapped == [] and out["checkpoints"] == [summary]
    assert json.loads((tmp_path / "deployment.json").read_text())["checkpoints"] == [summary]


def test_a_given_reference_is_what_the_files_are_compared_with(trained, mnist, tmp_path):
    path = tmp_path / trained.name
    path.write_bytes(trained.read_bytes())
    wrong = deployment.predict(rebuild_model(load_checkpoint(path)["export"]), mnist.test_x)
    wrong[:3] = (wrong[:3] + 1) % 10
    summary = deployment.pack_checkpoint(path, ("2bit",), mnist, reference=wrong)
    assert summary["mismatches_2bit"] == 3
    assert summary["test_acc_checkpoint"] == 100.0 * (wrong == mnist.test_y).sum().item() / len(wrong)


def test_each_distinct_decoded_network_runs_on_the_test_set_once(trained, mnist, tmp_path, monkeypatch):
    """2bit and entropy decode to the same tensors and share one run; base3, made to decode every code negated,
    differs, runs on its own and has its mismatches counted."""
    path = tmp_path / trained.name
    path.write_bytes(trained.read_bytes())
    codec, real_predict, runs = packing.get_codec("base3"), deployment.predict, []
    real_decode = codec.decode
    monkeypatch.setattr(codec, "decode", lambda data, shape: -real_decode(data, shape))
    monkeypatch.setattr(deployment, "predict", lambda net, x: (runs.append(net), real_predict(net, x))[1])
    summary = deployment.pack_checkpoint(path, mnist=mnist)
    assert len(runs) == 3  # the checkpoint's model (the reference), 2bit (also entropy's), base3
    assert summary["mismatches_2bit"] == summary["mismatches_entropy"] == 0 < summary["mismatches_base3"]


def test_a_prediction_mismatch_is_an_error_after_the_results_are_written(trained, mnist, tmp_path, monkeypatch):
    real = deployment.load_inference
    monkeypatch.setattr(deployment, "load_inference", lambda path: (lambda x: -real(path)(x)))  # argmin
    with pytest.raises(deployment.PackError, match="ttq_seed0.pth 2bit"):
        deployment.pack_and_verify([trained], ("2bit",), mnist, results_dir=tmp_path)
    assert (tmp_path / "deployment.csv").exists()


def test_script_mismatch_exits_1_with_one_line(trained, synthetic_mnist, tmp_path, monkeypatch):
    real = deployment.load_inference
    monkeypatch.setattr(deployment, "load_inference", lambda path: (lambda x: -real(path)(x)))
    result = call_script("deployment_compression.py", "--checkpoint", trained, "--encoding", "base3", "--verify",
                         "--skip-checksum", "--data-dir", synthetic_mnist, "--results-dir", tmp_path)
    assert_one_line_error(result, expected_rc=1, contains=["base3"])


def test_script_packs_and_verifies(tmp_path, synthetic_mnist):
    ckpt = tmp_path / "checkpoints" / "twn.pth"
    save_checkpoint(ckpt, {"mode": "twn", "config": {}, "history": [], "metrics": {}, "seed": 0, "state_dict": {},
                           "export": make_export("mixed")})
    result = run_script("deployment_compression.py", "--checkpoint", ckpt, "--verify", "--onnx", "--skip-checksum",
                        "--data-dir", synthetic_mnist, "--results-dir", tmp_path / "results", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "results" / "deployment.json").read_text())["checkpoints"][0]
    for fmt in FORMATS:
        path = tmp_path / "checkpoints" / (f"twn.{fmt}.tern" if fmt != "onnx" else "twn.onnx")
        assert summary[f"file_bytes_{fmt}"] == path.stat().st_size
        assert summary[f"mismatches_{fmt}"] == 0
    assert unpack((tmp_path / "checkpoints" / "twn.entropy.tern").read_bytes())[0]["metadata"]["mode"] == "twn"
    assert summary["checkpoint_bytes"] == ckpt.stat().st_size
    csv_lines = (tmp_path / "results" / "deployment.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 5 and csv_lines[-1].count(",total,") == 1
    assert "entropy B" in result.stdout and "order-0 B" in result.stdout


def test_script_error_is_one_line(tmp_path):
    result = run_script("deployment_compression.py", "--checkpoint", tmp_path / "missing.pth", cwd=tmp_path)
    assert_one_line_error(result, expected_rc=2, contains=["missing.pth"])
