"""quant/checkpoint.py: a saved checkpoint loads back equal, and every bad file (missing, empty, truncated,
random, foreign, future version, other mode, code-carrying pickle) is one CheckpointError line, never a crash
and never executed code."""
import csv
import os
import pickle

import pytest
import torch

from conftest import bad_checkpoints, make_checkpoint
from quant.checkpoint import FORMAT_VERSION, KIND, CheckpointError, load_checkpoint, save_checkpoint, write_history_csv


EXPECTED_WORDS = {
    "missing": "no such checkpoint", "empty": "empty", "truncated": "corrupt", "random": "corrupt",
    "text": "corrupt", "foreign-dict": "not a checkpoint", "bare-state-dict": "not a checkpoint",
    "tensor": "not a checkpoint", "future-version": "999", "lacks-export": "export", "other-mode": "'ttq'",
    "code-torch": "refused", "code-pickle": "corrupt",
}


def test_round_trip(tmp_path):
    ckpt = make_checkpoint()
    path = tmp_path / "sub" / "fp.pth"  # parent folder created on demand
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path, "fp")
    assert loaded["kind"] == KIND and loaded["format_version"] == FORMAT_VERSION
    for key in ("mode", "config", "history", "seed", "metrics", "data_checksum"):
        assert loaded[key] == ckpt[key], key
    assert loaded["state_dict"].keys() == ckpt["state_dict"].keys()
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in ckpt["state_dict"].items())
    assert loaded["export"]["float"].keys() == ckpt["export"]["float"].keys()
    assert all(torch.equal(loaded["export"]["float"][k], v) for k, v in ckpt["export"]["float"].items())
    assert load_checkpoint(path)["mode"] == "fp"  # mode=None accepts any mode
    assert sorted(os.listdir(path.parent)) == ["fp.pth"]  # no temp file left behind


def test_round_trip_of_a_ternary_export(tmp_path):
    ckpt = make_checkpoint("twn")
    save_checkpoint(tmp_path / "twn.pth", ckpt)
    loaded = load_checkpoint(tmp_path / "twn.pth", "twn")["export"]["ternary"]
    assert loaded.keys() == ckpt["export"]["ternary"].keys() and loaded
    for name, layer in ckpt["export"]["ternary"].items():
        for key, tensor in layer.items():
            assert torch.equal(loaded[name][key], tensor) and loaded[name][key].dtype == tensor.dtype


def test_save_replaces_atomically(tmp_path):
    path = tmp_path / "fp.pth"
    first, second = make_checkpoint(), make_checkpoint()
    second["seed"] = 7
    save_checkpoint(path, first)
    save_checkpoint(path, second)
    assert load_checkpoint(path, "fp")["seed"] == 7
    assert os.listdir(tmp_path) == ["fp.pth"]


@pytest.mark.parametrize("case", list(EXPECTED_WORDS))
def test_bad_checkpoint_is_one_clear_error(tmp_path, case):
    marker = tmp_path / "MARKER"
    path = bad_checkpoints(tmp_path, marker)[case]
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, "fp")
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    assert EXPECTED_WORDS[case] in message, message
    assert not marker.exists(), "loading the checkpoint executed code from it"


def test_wrong_mode_names_both_modes(tmp_path):
    save_checkpoint(tmp_path / "fp.pth", make_checkpoint("fp"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "fp.pth", "twn")
    assert "'fp'" in str(e.value) and "twn" in str(e.value) and "--mode fp" in str(e.value)


def test_history_csv_round_trip(tmp_path):
    history = [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25, "rho": 0.001}]
    write_history_csv(tmp_path / "h.csv", history)
    with open(tmp_path / "h.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["epoch", "train_loss", "rho"]
    assert [float(r["train_loss"]) for r in rows] == [0.5, 0.25]
    assert rows[0]["rho"] == "" and float(rows[1]["rho"]) == 0.001


def test_code_payloads_are_live(tmp_path):
    """Control for the test above: an unsafe loader really would run the payload and create the marker."""
    marker = tmp_path / "MARKER"
    paths = bad_checkpoints(tmp_path, marker)
    pickle.loads(paths["code-pickle"].read_bytes())
    assert marker.exists()
    marker.unlink()
    torch.load(paths["code-torch"], weights_only=False)
    assert marker.exists()
