"""The study runner: side-by-side worker processes give the same numbers, rows and files as one process."""
import csv
import json
from pathlib import Path

import numpy as np
import torch

from quant.study import Plan, run_study

VARYING = ("timestamp", "checkpoint", "eval_seconds", "train_seconds")  # wall times and paths differ by design


def study(tmp_path, data_dir, workers: int) -> dict:
    out = tmp_path / f"w{workers}"
    plan = Plan(modes=["fp", "twn", "admm"], seeds=[0, 1], epochs=1, train_subset=96, val_size=64, data_dir=data_dir,
                verify_checksum=False, results_dir=out / "results", checkpoint_dir=out / "checkpoints",
                progress=False, workers=workers, precision="fp32")
    run_study(plan, log=lambda line: None)
    with open(out / "results" / "results.csv", newline="") as f:
        rows = [{k: v for k, v in row.items() if k not in VARYING} for row in csv.DictReader(f)]
    deployment = json.loads((out / "results" / "deployment.json").read_text())
    not_packed = sorted(Path(s["checkpoint"]).name for s in deployment["not_packed"])
    deployment = deployment["checkpoints"]
    return {"rows": rows, "out": out, "not_packed": not_packed, "threads": json.loads((out / "results" / "study.json").read_text())["torch_threads"],
            "bytes": [{k: v for k, v in s.items() if k.startswith(("file_bytes_", "mismatches_"))} for s in deployment]}


def test_workers_match_one_process(tmp_path, synthetic_mnist):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # workers inherit the caller's thread count; one process must use the same
    try:
        one, two = study(tmp_path, synthetic_mnist, 1), study(tmp_path, synthetic_mnist, 2)
    finally:
        torch.set_num_threads(threads)
    assert one["threads"] == two["threads"] == 1
    assert [(r["mode"], r["seed"]) for r in two["rows"]] == [(m, s) for s in ("0", "1") for m in ("fp", "twn", "admm")]
    assert one["rows"] == two["rows"] and one["bytes"] == two["bytes"]
    assert one["not_packed"] == two["not_packed"] == ["fp_seed0.pth", "fp_seed1.pth"]  # listed, not packed
    assert len(two["bytes"]) == 4 and all(v == 0 for s in two["bytes"] for k, v in s.items() if k.startswith("mismatches_"))
    for name in ("fp_seed1", "twn_seed0", "admm_seed1"):
        a, b = (np.load(r["out"] / "results" / "predictions" / f"{name}.npy") for r in (one, two))
        assert np.array_equal(a, b)
        packed = [(r["out"] / "checkpoints" / f"{name}.entropy.tern") for r in (one, two)]
        assert name.startswith("fp") or packed[0].read_bytes() == packed[1].read_bytes()
