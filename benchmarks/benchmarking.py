"""Speed of the training, evaluation and deployment paths, measured in one process so the ratios compare like with like.

    floor        forward + backward + Adam step of LeNet-5 on one pre-made batch (no data path), per batch size:
                 one continuous pass of as many steps as a training epoch has, timed like the real epoch
    real_epoch   quant.engine.train for one full epoch per mode with its default config (shift augmentation
                 included): in-memory batches, method hooks, the tqdm bar drawn into os.devnull, validation at
                 the epoch's end and method.finish
    naive        torchvision.datasets.MNIST + DataLoader(num_workers=0) + ToTensor/Normalize, same model,
                 optimizer, batch size and training images, one epoch
    evaluate     quant.engine.evaluate on the test set (batches of 1,000)
    deployment   pack / unpack / load_inference per encoding (2-bit, base-3, entropy); inference from the packed file
                 vs the FP model (quant.export.rebuild_model of an FP export) over the test set
    quantizers   per-step cost of each method's own work on the four layers, in ms
    bf16         where the CPU/GPU has native bfloat16 (or when asked): the floor and every mode's real epoch
                 again with the forward under torch.autocast(bfloat16), as `train.py --precision bf16` runs

An epoch's `loop_seconds` is its steps only: the history row's seconds minus a separately timed validation
pass over the same split; `epoch_seconds` is the whole train() call. Ratios are of seconds per image (or
per step), so "x over floor" = 1.05 means 5 % slower than the floor. Every timing is time.perf_counter after
a warm-up; cheap ones are the median of repeats, floor passes and full epochs run once per round.

Every timed pipeline runs once per round. The throughput tables keep each pipeline's fastest round; each
training ratio is formed within every round, from measurements taken a minute apart at most, and the
headline is the median over rounds (a shared machine drifts by 10-20 % over minutes, which a ratio of two
"fastest" rounds taken at different times would turn into error).
"""
import contextlib
import gzip
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from quant import admm
from quant.config import MODES, default_config, hyperparams
from quant.data import MEAN, STD, MNIST, find_idx_file, split_indices
from quant.deploy_format import load_inference, pack, unpack
from quant.engine import evaluate, make_optimizer, steps_per_epoch, train
from quant.export import rebuild_model
from quant.model import LeNet5
from quant.packing import ENCODINGS
from quant.runs import TRAIN_ARGS, build
from quant.ttq import TTQQuantizer
from quant.twn import TWNQuantizer

# name -> (how the measured value is formed, bar, "max" if the value must stay at or below the bar else "min")
BARS = {
    "fp_epoch_over_floor": ("FP real epoch s/img / floor s/img (steps only)", 1.10, "max"),
    "ternary_step_over_fp_step": ("each ternary mode's s/step / FP s/step (steps only)", 1.25, "max"),
    "naive_over_real": ("naive torchvision pipeline s/img / real FP epoch s/img (steps only)", 1.3, "min"),
    "packed_over_fp_inference": ("packed-file inference img/s / FP model img/s", 0.8, "min"),
    "bf16_epoch_over_bf16_floor": ("bf16 FP real epoch s/img / bf16 floor s/img (steps only)", 1.10, "max"),
    "fp_fp32_step_over_bf16_step": ("FP mode: FP32 s/step / bf16 s/step (steps only)", 1.4, "min"),
    "ternary_fp32_step_over_bf16_step": ("each ternary mode: FP32 s/step / bf16 s/step (steps only)", 1.3, "min"),
}


# ---------------------------------------------------------------- timing

def sync(device) -> None:
    """Wait for queued device work, so a clock read after it measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu") -> float:
    """Seconds one call of `fn` takes, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_seconds(fn, repeats: int, warmup: int = 1, device="cpu") -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


# ---------------------------------------------------------------- machine

def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (falls back to platform.processor())."""
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def machine_info(device) -> dict:
    import torchvision

    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
            "load_average_before": list(os.getloadavg())}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------- 1. compute floor

def floor_steps(x: torch.Tensor, y: torch.Tensor, steps: int, device, precision: str):
    """A function running `steps` forward + backward + Adam steps (the engine's optimizer) of a fresh LeNet-5
    on the one batch (x, y); with precision "bf16" the forward runs under autocast, as in the engine."""
    torch.manual_seed(0)
    model = LeNet5().to(device).train()
    optimizer = make_optimizer([{"params": list(model.parameters())}], lr=1e-3, weight_decay=0.0)
    x, y = x.to(device), y.to(device)

    def run():
        for _ in range(steps):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return run


def floor(data: MNIST, batch_size: int, steps: int, repeats: int, device, precision: str) -> dict:
    """Images/s of forward + backward + Adam on one batch already in memory: the median of `repeats` passes of
    `steps` steps, after a 5-step warm-up."""
    x, y = data.train_x[:batch_size], data.train_y[:batch_size]
    floor_steps(x, y, 5, device, precision)()  # warm-up: allocator, oneDNN primitives
    run = floor_steps(x, y, steps, device, precision)
    seconds = median_seconds(run, repeats, warmup=0, device=device)
    n = min(batch_size, len(data.train_y))
    return {"batch_size": n, "precision": precision, "steps": steps, "repeats": repeats, "seconds": seconds,
            "ms_per_step": 1e3 * seconds / steps, "images_per_s": n * steps / seconds}


def profile_floor(x: torch.Tensor, y: torch.Tensor, steps: int, top: int = 15) -> list[dict]:
    """Where a floor step's CPU time goes: the `top` operators by self time (torch.profiler), in ms per step
    and as a share of all operators' self time."""
    from torch.profiler import ProfilerActivity, profile

    run = floor_steps(x, y, steps, "cpu", "fp32")
    run()  # warm-up: allocator, oneDNN primitives
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "calls_per_step": e.count / steps, "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "share": e.self_cpu_time_total / total} for e in events[:top]]


# ---------------------------------------------------------------- 2. the real training epoch

def real_epoch(mode: str, data: MNIST, batch_size: int, seed: int, device, precision: str,
               warmup_batches: int) -> tuple[dict, dict]:
    """One full epoch of quant.engine.train in `mode` with its default config, after `warmup_batches` untimed
    steps; returns (timings, export)."""
    # TTQ without its FP warm-up, so that every timed step is a ternary step
    config = default_config(mode, epochs=1, batch_size=batch_size, seed=seed,
                            hyperparams={"warmup_frac": 0.0} if mode == "ttq" else {})

    warm = warmup_batches * batch_size
    warm_data = MNIST(data.train_x[:warm], data.train_y[:warm], data.val_x[:batch_size],
                      data.val_y[:batch_size], data.test_x[:0], data.test_y[:0], data.checksum)
    kwargs = dict(**{k: config[k] for k in TRAIN_ARGS}, precision=precision, device=device, log=lambda line: None)
    train(*build(config, device), warm_data, progress=False, **kwargs)  # warm-up: allocator, kernels, oneDNN primitives
    model, method = build(config, device)  # as runs.train_run builds it
    history = []
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # tqdm writes to stderr
        epoch_seconds = timed(lambda: history.extend(train(model, method, data, progress=True, **kwargs)), device)
    row = history[0]
    val_seconds = timed(lambda: evaluate(model, data.val_x, data.val_y), device) if len(data.val_y) else 0.0
    loop_seconds = row["seconds"] - val_seconds
    steps = steps_per_epoch(len(data.train_y), batch_size)
    model.cpu()
    timings = {"mode": mode, "precision": precision, "images": len(data.train_y), "steps": steps, "batch_size": batch_size,
               "progress_bar": "tqdm, drawn into os.devnull", "epoch_seconds": epoch_seconds,
               "loop_seconds": loop_seconds, "validation_seconds": val_seconds,
               "finish_seconds": epoch_seconds - row["seconds"], "ms_per_step": 1e3 * loop_seconds / steps,
               "images_per_s": len(data.train_y) / loop_seconds,
               "images_per_s_with_validation_and_finish": len(data.train_y) / epoch_seconds,
               "train_loss": row["train_loss"], "val_acc": row["val_acc"], "config": config}
    return timings, method.export(model)


# ---------------------------------------------------------------- 3. the naive torchvision pipeline

def torchvision_root(data_dir, folder: Path) -> Path:
    """`folder`/MNIST/raw/ holding the four IDX files uncompressed, as torchvision.datasets.MNIST reads them."""
    from quant.data import FILES

    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        source = find_idx_file(Path(data_dir), name)
        if source is None:
            raise FileNotFoundError(f"{data_dir}: missing {name}[.gz] for the torchvision pipeline")
        with (gzip.open if source.suffix == ".gz" else open)(source, "rb") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return folder


def naive_epoch(data_dir, batch_size: int, val_size: int, split_seed: int = 0, train_subset=None, device="cpu") -> dict:
    """One epoch the way a first script would load MNIST, over the training images load_mnist keeps for the
    same val_size / split_seed / train_subset."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as tmp:
        root = torchvision_root(data_dir, Path(tmp))
        start = time.perf_counter()
        dataset = datasets.MNIST(root, train=True, download=False,
                                 transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))]))
        load_seconds = time.perf_counter() - start  # reading the raw IDX files into memory
    indices, _ = split_indices(len(dataset), val_size, split_seed)
    subset = Subset(dataset, indices[:train_subset].tolist())
    torch.manual_seed(split_seed)
    model = LeNet5().to(device).train()
    optimizer = make_optimizer([{"params": list(model.parameters())}], lr=1e-3, weight_decay=0.0)

    def run(loader, max_batches=None):
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    loader = lambda: DataLoader(subset, batch_size=batch_size, shuffle=True, num_workers=0,
                                generator=torch.Generator().manual_seed(split_seed))
    run(loader(), max_batches=4)  # warm-up
    seconds = timed(lambda: run(loader()), device)
    steps = -(-len(subset) // batch_size)
    return {"images": len(subset), "steps": steps, "batch_size": batch_size, "num_workers": 0,
            "dataset_load_seconds": load_seconds, "seconds": seconds, "ms_per_step": 1e3 * seconds / steps,
            "images_per_s": len(subset) / seconds}


# ---------------------------------------------------------------- 4. evaluation

def evaluation(export: dict, data: MNIST, repeats: int, device="cpu") -> dict:
    model = rebuild_model(export).to(device)
    seconds = median_seconds(lambda: evaluate(model, data.test_x, data.test_y), repeats, device=device)
    return {"images": len(data.test_y), "batch_size": 1000, "repeats": repeats, "seconds": seconds,
            "images_per_s": len(data.test_y) / seconds}


# ---------------------------------------------------------------- 5. deployment file

def deployment(ternary_export: dict, fp_export: dict, x: torch.Tensor, batch_size: int, repeats: int) -> dict:
    """Pack/unpack/load times per encoding, and inference img/s from the packed file vs the FP model (CPU)."""
    out = {"encodings": {}}
    for encoding in ENCODINGS:
        blob = pack(ternary_export, encoding)
        out["encodings"][encoding] = {
            "file_bytes": len(blob),
            "pack_ms": 1e3 * median_seconds(lambda: pack(ternary_export, encoding), repeats),
            "unpack_ms": 1e3 * median_seconds(lambda: unpack(blob), repeats),
            "load_inference_ms": 1e3 * median_seconds(lambda: load_inference(blob), repeats),
        }
    packed = load_inference(pack(ternary_export, "2bit"))  # base-3 decodes to the same tensors
    fp_model = rebuild_model(fp_export)

    def infer(net):
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                net(x[i:i + batch_size])

    for name, net in (("packed_2bit", packed), ("fp_model", fp_model)):
        seconds = median_seconds(lambda: infer(net), repeats)
        out[f"inference_{name}"] = {"images": len(x), "batch_size": batch_size, "seconds": seconds,
                                    "images_per_s": len(x) / seconds}
    return out


# ---------------------------------------------------------------- 6. per-step cost of each quantizer

def default_admm_interval(n_images: int) -> int:
    """Steps between ADMM rounds in a default `train.py --mode admm` run on n_images training images."""
    config = default_config("admm")
    hp = config["hyperparams"]
    total = config["epochs"] * steps_per_epoch(n_images, config["batch_size"])
    return admm.round_interval(admm.admm_phase_steps(total, hp["finetune_frac"]), hp["admm_rounds"])


def quantizer_overhead(iterations: int, repeats: int, admm_interval: int, device="cpu") -> dict:
    """ms per training step that each method adds on LeNet-5's four layers (forward + backward of its own ops)."""
    torch.manual_seed(0)
    model = LeNet5().to(device)
    layers = dict(model.quant_layers())
    weights = [layer.weight for layer in layers.values()]
    grads = [torch.randn_like(w) for w in weights]  # stand-in for dL/d(quantized W)

    def through(quantizers):
        def step():
            for _ in range(iterations):
                outs = [q(w) for q, w in zip(quantizers, weights)]
                torch.autograd.backward(outs, grads)
                model.zero_grad(set_to_none=True)
        return step

    ms = lambda fn, n=iterations: 1e3 * median_seconds(fn, repeats, device=device) / n
    state = admm.ADMMState(layers, rho=hyperparams("admm")["rho"], rho_growth=1.0)  # growth 1: repeats time the same work
    for u in state.U.values():
        u.normal_(0, 0.01)  # a non-trivial dual, as after a few rounds

    def penalty():
        for _ in range(iterations):
            state.penalty().backward()
            model.zero_grad(set_to_none=True)

    def prox():
        for _ in range(iterations):
            state.prox_step()

    update_ms = ms(state.update, 1)
    return {"iterations": iterations, "repeats": repeats,
            "twn_ms_per_step": ms(through([TWNQuantizer(**hyperparams("twn")).to(device) for _ in weights])),
            "ttq_ms_per_step": ms(through([TTQQuantizer(w, hyperparams("ttq")["t"]).to(device) for w in weights])),
            "admm_prox_ms_per_step": ms(prox),
            "admm_penalty_ms_per_step": ms(penalty),
            "admm_update_ms": update_ms, "admm_interval": admm_interval,
            "admm_update_ms_per_step": update_ms / admm_interval}


# ---------------------------------------------------------------- ratios and the whole run

def keep_fastest(table: dict, key: str, timings: dict) -> None:
    """table[key] = the faster (higher images_per_s) of its current value and `timings`; counts the rounds."""
    old = table.get(key)
    rounds = (old or {}).get("rounds_measured", 0) + 1
    best = timings if old is None or timings["images_per_s"] > old["images_per_s"] else old
    table[key] = {**best, "rounds_measured": rounds}


def training_ratios(floor_: dict, epochs: dict, naive: dict, batch_size: int, floor_bf16: dict | None = None,
                    epochs_bf16: dict | None = None) -> dict:
    """The training ratios of one set of measurements (seconds over seconds); the bf16 ones where measured."""
    fp = epochs["fp"]
    out = {
        "fp_epoch_over_floor": floor_[str(batch_size)]["images_per_s"] / fp["images_per_s"],
        "ternary_step_over_fp_step": {m: e["ms_per_step"] / fp["ms_per_step"] for m, e in epochs.items() if m != "fp"},
        "naive_over_real": fp["images_per_s"] / naive["images_per_s"],
    }
    if floor_bf16 and epochs_bf16:
        speedup = {m: epochs[m]["ms_per_step"] / e["ms_per_step"] for m, e in epochs_bf16.items()}
        out.update(bf16_epoch_over_bf16_floor=floor_bf16[str(batch_size)]["images_per_s"] / epochs_bf16["fp"]["images_per_s"],
                   fp_fp32_step_over_bf16_step=speedup["fp"],
                   ternary_fp32_step_over_bf16_step={m: v for m, v in speedup.items() if m != "fp"})
    return out


def median_over_rounds(values: list):
    """The median of a list of numbers, or per key of a list of {key: number}."""
    if isinstance(values[0], dict):
        return {key: statistics.median(v[key] for v in values) for key in values[0]}
    return statistics.median(values)


def ratios(results: dict, batch_size: int, per_round: list[dict] | None = None) -> dict:
    """The four headline ratios, each with its bar.

    The training ratios are the median over `per_round` (training_ratios of each round's own measurements);
    without rounds, or for the packed-inference ratio (measured once, its two sides interleaved), the value
    comes from `results`' tables. `from_fastest_rounds` keeps the ratio of the fastest rounds for comparison.
    """
    fastest = training_ratios(results["floor"], results["real_epoch"], results["naive"], batch_size,
                              results.get("floor_bf16"), results.get("real_epoch_bf16"))
    rounds = per_round or [fastest]
    deployment_ = results["deployment"]
    packed = deployment_["inference_packed_2bit"]["images_per_s"] / deployment_["inference_fp_model"]["images_per_s"]
    out = {}
    for name, (meaning, bar, kind) in BARS.items():
        ok = lambda v: v <= bar if kind == "max" else v >= bar
        entry = {"bar": bar, "bar_is": kind, "meaning": meaning}
        if name in fastest:
            entry.update(value=median_over_rounds([r[name] for r in rounds]), per_round=[r[name] for r in rounds],
                         from_fastest_rounds=fastest[name])
        elif name == "packed_over_fp_inference":
            entry.update(value=packed)
        else:  # a bf16 ratio of a run without bf16
            continue
        value = entry["value"]
        entry["pass"] = all(map(ok, value.values())) if isinstance(value, dict) else ok(value)
        out[name] = entry
    return out


def run(data: MNIST, data_dir, *, val_size: int, train_subset=None, quick: bool = False, batch_sizes=(64, 128),
        train_batch_size: int = 128, modes=MODES, seed: int, device="cpu", rounds: int | None = None,
        bf16: bool = False, log=print) -> dict:
    """Every measurement above, in order; returns the JSON-ready results.

    `rounds` (default 5, --quick 1) interleaved repetitions of every timed pipeline: the tables keep each
    pipeline's fastest round, the training ratios are the median of the rounds' own ratios. `bf16` adds, in
    every round after the FP32 pipelines, the bf16 floor (training batch size) and each mode's bf16 real epoch.

    `data` is load_mnist(data_dir, val_size, split_seed=seed, train_subset) (the caller may trim its test set);
    the naive pipeline re-reads `data_dir` through torchvision and trains on the same images.
    """
    if "fp" not in modes or len(modes) < 2:
        raise ValueError("the benchmark needs mode fp and at least one ternary mode")
    batch_sizes = sorted({*batch_sizes, train_batch_size})
    device = torch.device(device)
    repeats, warmup_batches = (2, 1) if quick else (5, 4)  # --quick: a smoke run, its timings not meaningful
    rounds = rounds or (1 if quick else 5)
    results = {"quick": quick, "machine": machine_info(device), "rounds": rounds, "floor": {}, "real_epoch": {},
               "per_round_ms_per_step": []}
    if bf16:
        results.update(floor_bf16={}, real_epoch_bf16={})
    # A shared machine drifts by 10-20 % over minutes. Every timed pipeline runs once per round and the rounds
    # interleave them; the tables keep each pipeline's fastest round (the least-disturbed run), and each ratio
    # is formed within a round, then the median over rounds taken. Ratios of fastest rounds taken minutes apart
    # varied by up to 0.15 between runs of the same code (naive / real 1.27 to 1.42), hence the pairing and
    # five rounds. In a round the FP epoch follows the floor and the naive epoch follows the FP epoch.
    exports, per_round = {}, []
    for round_ in range(1, rounds + 1):
        this = {"floor": {}, "real_epoch": {}}
        for bs in batch_sizes:
            log(f"[round {round_}/{rounds}] floor, batch {bs}")
            # an epoch's worth of steps in one pass, as the real epoch runs, so that the short stalls of a shared
            # machine weigh on both alike (the median of five 50-step passes skipped them: floor / FP 1.12)
            steps = 3 if quick else steps_per_epoch(len(data.train_y), bs)
            this["floor"][str(bs)] = floor(data, bs, steps, 2 if quick else 1, device, "fp32")
            keep_fastest(results["floor"], str(bs), this["floor"][str(bs)])
        for mode in ["fp", *(m for m in modes if m != "fp")]:
            log(f"[round {round_}/{rounds}] real epoch, {mode} ({len(data.train_y)} images)")
            this["real_epoch"][mode], exports[mode] = real_epoch(mode, data, train_batch_size, seed, device, "fp32",
                                                                 warmup_batches)
            keep_fastest(results["real_epoch"], mode, this["real_epoch"][mode])
            if mode == "fp":
                log(f"[round {round_}/{rounds}] naive torchvision epoch")
                this["naive"] = naive_epoch(data_dir, train_batch_size, val_size, seed, train_subset, device)
                keep_fastest(results, "naive", this["naive"])
        if bf16:  # the same pipelines again under bf16 autocast: its floor first, then each mode's epoch
            log(f"[round {round_}/{rounds}] bf16 floor, batch {train_batch_size}")
            steps = 3 if quick else steps_per_epoch(len(data.train_y), train_batch_size)
            this["floor_bf16"] = {str(train_batch_size): floor(data, train_batch_size, steps, 2 if quick else 1,
                                                               device, "bf16")}
            keep_fastest(results["floor_bf16"], str(train_batch_size), this["floor_bf16"][str(train_batch_size)])
            this["real_epoch_bf16"] = {}
            for mode in ["fp", *(m for m in modes if m != "fp")]:
                log(f"[round {round_}/{rounds}] bf16 real epoch, {mode}")
                this["real_epoch_bf16"][mode], _ = real_epoch(mode, data, train_batch_size, seed, device, "bf16",
                                                              warmup_batches)
                keep_fastest(results["real_epoch_bf16"], mode, this["real_epoch_bf16"][mode])
        per_round.append(training_ratios(this["floor"], this["real_epoch"], this["naive"], train_batch_size,
                                         this.get("floor_bf16"), this.get("real_epoch_bf16")))
        results["per_round_ms_per_step"].append({
            "floor": {bs: t["ms_per_step"] for bs, t in this["floor"].items()}, "naive": this["naive"]["ms_per_step"],
            "real_epoch": {mode: t["ms_per_step"] for mode, t in this["real_epoch"].items()},
            **({"floor_bf16": {bs: t["ms_per_step"] for bs, t in this["floor_bf16"].items()},
                "real_epoch_bf16": {m: t["ms_per_step"] for m, t in this["real_epoch_bf16"].items()}} if bf16 else {})})
    if results["naive"]["images"] != len(data.train_y):
        raise ValueError(f"the naive pipeline saw {results['naive']['images']} training images, the real one "
                         f"{len(data.train_y)}: pass the val_size / train_subset that loaded `data`")
    log("evaluation")
    results["evaluate"] = evaluation(exports["fp"], data, repeats, device)
    log("deployment file")
    ternary = next(exports[m] for m in modes if m != "fp")
    results["deployment"] = deployment(ternary, exports["fp"], data.test_x, 1000, repeats)
    results["deployment"]["ternary_export_from"] = next(m for m in modes if m != "fp")
    log("quantizer overhead")
    results["quantizers"] = quantizer_overhead(3 if quick else 20, repeats, default_admm_interval(len(data.train_y)), device)
    results["ratios"] = ratios(results, train_batch_size, per_round)
    results["machine"]["load_average_after"] = list(os.getloadavg())
    return results


def format_report(results: dict) -> str:
    """Throughputs per section, then the ratios against their bars, as fixed-width text."""
    from quant.results import format_table

    rows = [{"what": f"floor fwd+bwd+Adam, batch {bs}", "img_s": r["images_per_s"], "ms": r["ms_per_step"]}
            for bs, r in results["floor"].items()]
    rows += [{"what": f"real epoch {m} (steps only)", "img_s": r["images_per_s"], "ms": r["ms_per_step"]}
             for m, r in results["real_epoch"].items()]
    rows += [{"what": f"real epoch {m} (+ validation, finish)", "img_s": r["images_per_s_with_validation_and_finish"],
              "ms": 1e3 * r["epoch_seconds"] / r["steps"]} for m, r in results["real_epoch"].items()]
    rows += [{"what": f"bf16 floor fwd+bwd+Adam, batch {bs}", "img_s": r["images_per_s"], "ms": r["ms_per_step"]}
             for bs, r in results.get("floor_bf16", {}).items()]
    rows += [{"what": f"bf16 real epoch {m} (steps only)", "img_s": r["images_per_s"], "ms": r["ms_per_step"]}
             for m, r in results.get("real_epoch_bf16", {}).items()]
    naive, ev, dep = results["naive"], results["evaluate"], results["deployment"]
    rows += [{"what": "naive torchvision DataLoader epoch", "img_s": naive["images_per_s"], "ms": naive["ms_per_step"]},
             {"what": "evaluate, test set", "img_s": ev["images_per_s"], "ms": "-"}]
    rows += [{"what": f"inference {k[len('inference_'):]}, batch {v['batch_size']}", "img_s": v["images_per_s"],
              "ms": "-"} for k, v in dep.items() if k.startswith("inference_")]
    lines = [format_table(rows, [("what", "measurement", ""), ("img_s", "img/s", ".0f"), ("ms", "ms/step", ".2f")]), ""]
    rows = [{"what": f"{enc}: pack / unpack / load_inference", "ms": f"{r['pack_ms']:.1f} / {r['unpack_ms']:.1f} / "
             f"{r['load_inference_ms']:.1f}"} for enc, r in dep["encodings"].items()]
    q = results["quantizers"]
    rows += [{"what": "TWN threshold + STE, fwd+bwd, 4 layers", "ms": f"{q['twn_ms_per_step']:.2f} per step"},
             {"what": "TTQ, fwd+bwd, 4 layers", "ms": f"{q['ttq_ms_per_step']:.2f} per step"},
             {"what": "ADMM proximal step (default)", "ms": f"{q['admm_prox_ms_per_step']:.2f} per step"},
             {"what": "ADMM penalty in the loss, fwd+bwd (--admm-penalty loss)",
              "ms": f"{q['admm_penalty_ms_per_step']:.2f} per step"},
             {"what": f"ADMM projection update (every {q['admm_interval']} steps)",
              "ms": f"{q['admm_update_ms']:.1f} per update ({q['admm_update_ms_per_step']:.2f} per step)"}]
    lines += [format_table(rows, [("what", "cost", ""), ("ms", "ms", "")]), ""]
    rows = []
    for name, r in results["ratios"].items():
        values = r["value"] if isinstance(r["value"], dict) else {"": r["value"]}
        for key, value in values.items():
            ok = value <= r["bar"] if r["bar_is"] == "max" else value >= r["bar"]
            rounds = [v[key] if key else v for v in r.get("per_round", [])]
            rows.append({"ratio": f"{name} {key}".strip(), "value": value,
                         "rounds": f"{min(rounds):.3f}-{max(rounds):.3f}" if rounds else "-",
                         "bar": f"{'<=' if r['bar_is'] == 'max' else '>='} {r['bar']:g}", "ok": "yes" if ok else "NO"})
    lines.append(format_table(rows, [("ratio", "ratio", ""), ("value", "median", ".3f"), ("rounds", "rounds min-max", ""),
                                     ("bar", "bar", ""), ("ok", "ok", "")]))
    m = results["machine"]
    lines.append(f"\n{m['cpu']}, {m['usable_cpus']} usable CPUs, torch {m['torch']} with {m['torch_threads']} threads, "
                 f"device {m['device']}; load average {m['load_average_before'][0]:.2f} before, "
                 f"{m['load_average_after'][0]:.2f} after" + (" (QUICK run: not meaningful)" if results["quick"] else ""))
    return "\n".join(lines)
