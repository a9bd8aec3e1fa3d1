"""The seed study behind report.md: every (mode, seed) trained, evaluated, packed, plotted and tabulated.

MNIST is decoded once per process and each seed's validation split re-drawn from it (data.resplit). `run_one`
trains (or reuses) one (mode, seed) into checkpoints/{mode}_seed{s}.pth, appends its results.csv row and writes
results/history/, weights/ (latent-weight histograms, delta, code mix) and predictions/ (the 10,000 test
predictions, for the report's paired tests), then packs and verifies it (quant.deployment); `run_study` runs them
on `workers` processes and rewrites results/deployment.csv/.json and study.json. Plots and the report
(quant.plotting.plot_all, quant.report.refresh) read only the results folder, never a checkpoint.
`Plan.quick()` (one seed, 5,000 training images, one epoch, tag "quick") writes to results/quick/ and
checkpoints/quick_*.pth, so a pipeline check never mixes with the study's numbers.
"""
import contextlib
import io
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint, write_history_csv
from .cli import keep_freed_memory
from .config import KEYS, MODES, checked_mode, default_config
from .data import MNIST, load_mnist, resplit
from .deployment import PackError, pack_and_verify, pack_checkpoint  # noqa: F401 (reproduce.py catches PackError)
from .files import atomic_write_bytes, atomic_write_json
from .packing import code_mix
from .results import append_result, read_results
from .runs import evaluate_checkpoint, train_checkpoint


@dataclass
class Plan:
    """What one study run trains and where it writes (defaults: the full study of report.md)."""
    modes: list = field(default_factory=lambda: list(MODES))
    seeds: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    epochs: int = KEYS["epochs"].default
    train_subset: int | None = None
    val_size: int = KEYS["val_size"].default
    tag: str = "study"
    results_dir: Path = Path("results")
    checkpoint_dir: Path = Path("checkpoints")
    prefix: str = ""  # checkpoint file prefix ("quick_" keeps quick runs apart under the same .gitignore rule)
    data_dir: Path = Path("data")
    verify_checksum: bool = True
    device: str = "cpu"
    precision: str = KEYS["precision"].default  # "bf16": forward under autocast (quant.engine); "auto": bf16 where native
    reuse: bool = False  # skip training where a checkpoint with the identical config already exists
    progress: bool = True
    workers: int = 1  # processes training side by side, each with cores // workers torch threads (run_study)

    @classmethod
    def quick(cls, **overrides) -> "Plan":
        """One seed, 5,000 training images, one epoch, tag "quick", results/quick/: a minutes-long pipeline check."""
        base = {"seeds": [0], "epochs": 1, "train_subset": 5000, "tag": "quick",
                "results_dir": Path("results/quick"), "prefix": "quick_"}
        return cls(**{**base, **overrides})


def run_name(mode: str, seed) -> str:
    """The file stem shared by a run's checkpoint, history CSV and weights JSON."""
    return f"{mode}_seed{seed}"


def weight_summary(ckpt: dict, bins: int = 100) -> dict:
    """Per weight layer: histogram of the latent weights over [-max|W|, max|W|] and, if ternary, delta,
    scales and the fractions of deployed codes -1 / 0 / +1 (what weight_histograms.png draws)."""
    state, export = ckpt["state_dict"], ckpt["export"]
    layers = []
    for name in ("conv1", "conv2", "fc1", "fc2"):
        w = state[f"{name}.weight"].detach().double().reshape(-1).numpy()
        limit = float(np.abs(w).max()) or 1.0
        counts, edges = np.histogram(w, bins=bins, range=(-limit, limit))
        entry = {"layer": name, "shape": list(state[f"{name}.weight"].shape), "weights": int(w.size),
                 "edges": edges.tolist(), "counts": counts.tolist(), "mean_abs": float(np.abs(w).mean()),
                 "max_abs": float(np.abs(w).max()),
                 # ADMM hard-projects W before its frozen-code fine-tune, so its latent W holds <= 3 values
                 "latent_distinct": int(min(np.unique(w).size, 1000)), "ternary": name in export["ternary"]}
        if entry["ternary"]:
            layer = export["ternary"][name]
            entry.update({key: [float(v) for v in layer[key].reshape(-1)] for key in ("delta", "w_p", "w_n")},
                         code_fractions=code_mix(layer["codes"]))
        layers.append(entry)
    return {"mode": ckpt["mode"], "seed": ckpt["seed"], "bins": bins,
            "source": "checkpoint state_dict (latent weights) and export (codes, scales, delta)", "layers": layers}


def write_predictions(path: Path, values) -> None:
    """Class indices (0-9) as a 1-D uint8 .npy file, written atomically (10,000 test images: about 10 KB)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(values, dtype=np.uint8), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def cpu_model() -> str:
    """The CPU model name as `lscpu` reports it (else /proc/cpuinfo's, else platform's)."""
    for command, pattern in ((["lscpu"], r"^Model name:\s*(.+)$"), (["cat", "/proc/cpuinfo"], r"^model name\s*:\s*(.+)$")):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            match = re.search(pattern, subprocess.run(command, capture_output=True, text=True, timeout=5).stdout, re.M)
            if match:
                return match.group(1).strip()
    return platform.processor() or platform.machine()


def train_or_reuse(plan: Plan, config: dict, data: MNIST, path: Path, log=print) -> dict:
    """Train into `path`, or with plan.reuse load an existing checkpoint whose config and data match."""
    if plan.reuse and path.exists():
        try:
            ckpt = load_checkpoint(path, config["mode"])
            if ckpt["config"] == config and ckpt.get("data_checksum") == data.checksum:
                log(f"reusing {path} (same config and data)")
                return ckpt
            log(f"{path} has another config or data; retraining")
        except CheckpointError as e:
            log(f"{e}; retraining")
    return train_checkpoint(config, data, path, device=plan.device, progress=plan.progress, log=log)


def without_training(full: MNIST) -> MNIST:
    """`full` without its training images: what packing and verifying a checkpoint reads."""
    return replace(full, train_x=full.train_x[:0], train_y=full.train_y[:0])


def run_one(plan: Plan, full: MNIST, mode: str, seed: int, log=print) -> dict:
    """Train (or reuse), evaluate, write the artefacts of, pack and verify one (mode, seed); returns its results
    row, its record for study.json and its packing summary (pack_checkpoint's)."""
    data = resplit(full, plan.val_size, seed, plan.train_subset)
    config = default_config(mode, seed=seed, epochs=plan.epochs, val_size=plan.val_size,
                            train_subset=plan.train_subset, precision=plan.precision)
    name = run_name(mode, seed)
    path = plan.checkpoint_dir / f"{plan.prefix}{name}.pth"
    ckpt = train_or_reuse(plan, config, data, path, log)
    result = evaluate_checkpoint(path, mode, data, tag=plan.tag, device=plan.device, ckpt=ckpt)
    write_history_csv(plan.results_dir / "history" / f"{name}.csv", ckpt["history"])
    atomic_write_json(plan.results_dir / "weights" / f"{name}.json", weight_summary(ckpt))
    write_predictions(plan.results_dir / "predictions" / f"{name}.npy", result["preds"])
    log(f"{mode} seed {seed}: test accuracy {result['row']['test_acc']:.2f}% "
        f"(validation {result['row']['val_acc']:.2f}%)")
    # Packed here, while other workers still train; the CPU predictions just made are the files' reference.
    packed = pack_checkpoint(path, mnist=without_training(full), onnx=True, ckpt=ckpt,
                             reference=result["preds"] if torch.device(plan.device).type == "cpu" else None)
    return {"row": result["row"], "packed": packed,
            "run": {"mode": mode, "seed": seed, "checkpoint": str(path),
                    "train_seconds": ckpt["metrics"]["train_seconds"], "threads": torch.get_num_threads()}}


_WORKER = {}  # a worker process's plan and unsplit MNIST, loaded once by _start_worker


def _start_worker(plan: Plan, threads: int) -> None:
    keep_freed_memory()  # what run_main does in the parent
    torch.set_num_threads(threads)
    _WORKER.update(plan=plan, full=load_mnist(plan.data_dir, val_size=0, verify_checksum=plan.verify_checksum))


def _run_in_worker(job: tuple) -> dict:
    return run_one(_WORKER["plan"], _WORKER["full"], *job, log=lambda line: print(line, flush=True))


def run_study(plan: Plan, log=print) -> dict:
    """Train, evaluate, write artefacts, pack and verify; returns {"rows": results rows, "seconds": wall time}.

    With plan.workers > 1 the runs (each packed by its worker) go to that many processes, longest first, with the
    caller's torch thread count (reproduce.py: cores // workers): one-thread runs side by side beat one two-thread
    run whose threads wait on each other at every operator. A run's numbers depend on its thread count (summation
    order), which study.json records. Rows reach results.csv in plan order. Plots and tables: plot_all, report.refresh.
    """
    for mode in plan.modes:  # a ConfigError before MNIST is decoded
        checked_mode(mode)
    start = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results_path = plan.results_dir / "results.csv"
    full = load_mnist(plan.data_dir, val_size=0, verify_checksum=plan.verify_checksum)
    write_predictions(plan.results_dir / "predictions" / "test_labels.npy", full.test_y)
    jobs = [(mode, seed) for seed in plan.seeds for mode in plan.modes]
    workers = max(1, min(plan.workers, len(jobs)))
    with contextlib.ExitStack() as stack:
        if workers == 1:
            mapper, results = map, (run_one(plan, full, *job, log) for job in jobs)
        else:
            log(f"{len(jobs)} runs on {workers} worker processes, {torch.get_num_threads()} torch thread(s) each")
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                           initializer=_start_worker,
                                                           initargs=(replace(plan, progress=False),
                                                                     torch.get_num_threads())))
            mapper = pool.map
            # Longest first, so the workers finish together: every mode trains the same epochs on the same images,
            # so a run's steps go as 1 / its batch size.
            batch = {mode: default_config(mode)["batch_size"] for mode in plan.modes}
            futures = {job: pool.submit(_run_in_worker, job) for job in sorted(jobs, key=lambda job: batch[job[0]])}
            results = (futures[job].result() for job in jobs)
        rows, runs, packed = [], [], {}
        for done in results:  # in plan order
            append_result(results_path, done["row"])
            rows.append(done["row"])
            runs.append(done["run"])
            packed[Path(done["run"]["checkpoint"])] = done["packed"]
        # Every checkpoint of the tag (also from earlier runs of other modes), as deployment.csv is rewritten whole.
        latest = {(r.get("mode"), r.get("seed")): r["checkpoint"]
                  for r in read_results(results_path)[1] if (r.get("tag") or "") == plan.tag}
        checkpoints = [Path(p) for p in dict.fromkeys(latest.values()) if p and Path(p).exists()]
        command = "deployment_compression.py --verify --onnx " + " ".join(f"--checkpoint {p}" for p in checkpoints)
        show = (lambda s: log(f"packed {s['checkpoint']}: " + ", ".join(
            f"{key[11:]} {s[key]:,} B ({s[f'mismatches_{key[11:]}']} differing predictions)"
            for key in s if key.startswith("file_bytes_"))))
        if not pack_and_verify(checkpoints, mnist=without_training(full), onnx=True, results_dir=plan.results_dir,
                               command=command, show=show, map_fn=mapper, done=packed)["checkpoints"]:
            log("no ternary checkpoint to pack; deployment.csv left as it is")
    seconds = time.perf_counter() - start
    atomic_write_json(plan.results_dir / "study.json", {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "started": started,
        "seconds_train_eval_pack": round(seconds, 1), "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
        "workers": workers, "torch_threads": runs[0]["threads"] if runs else torch.get_num_threads(),
        "torch": str(torch.__version__), "python": platform.python_version(),
        "device": str(plan.device), "n_seeds": len(plan.seeds),
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},
        "runs": runs})
    return {"rows": rows, "seconds": seconds}
