"""The study's figures, drawn from results/ alone (never a checkpoint), with matplotlib's Agg backend.

    results_comparison.png  test accuracy vs deployed size on disk, mean ± std over seeds   (results.csv, deployment.csv)
    training_curves.png     validation accuracy and loss per epoch, seeds overlaid; hollow    (history/*.csv, results.csv)
                            points were scored on full-precision, not ternary, weights
    weight_histograms.png   latent weights per layer and mode, ±delta and the code mix        (weights/*.json)
    sparsity_bytes.png      zero fraction of deployed codes; bytes per layer per encoding     (deployment.csv)
    admm_residual.png       ADMM primal residual ||W - G|| / ||W|| and rho per epoch          (history/admm_*.csv)

Each figure function raises MissingInput when its inputs are absent; plot_all turns that (or an unreadable
file) into a one-line note and goes on with the next figure.
"""
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .report import (LAYERS, NoResults, label, layer_stats, mean, mode_key, read_csv, read_json,  # noqa: E402
                     required_study_rows, std, study_rows, summarize)
from .results import ResultsError  # noqa: E402

DPI = 150
COLORS = {"fp": "#4d4d4d", "twn": "#1f77b4", "ttq": "#d62728", "admm": "#2ca02c"}
MARKERS = {"fp": "o", "twn": "s", "ttq": "^", "admm": "D"}
STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]  # one line style per seed (five by default)
# How Figure 2 marks a validation point, by the history's val_ternary column (None: an older file without it).
POINTS = {True: ("o", None, "validation on ternary weights"),
          False: ("o", "white", "validation on full-precision weights (FP32, TTQ's warm-up, ADMM before projection)"),
          None: ("x", None, "weights not recorded (history without val_ternary)")}


class MissingInput(FileNotFoundError):
    """A figure's input is not in the results folder."""


def color(mode: str) -> str:
    return COLORS.get(mode, "#9467bd")


def _epoch_axis(ax, epochs) -> None:
    """Integer epoch ticks (matplotlib would label a one-epoch run 0.96 ... 1.04)."""
    last = max(epochs, default=1)
    ax.set_xticks(range(1, last + 1))
    ax.set_xlim(0.7, last + 0.3)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _rows(results_dir, tag):
    try:
        return required_study_rows(results_dir, tag)
    except NoResults as e:
        raise MissingInput(str(e)) from None


def _runs(results_dir, tag, folder: str, suffix: str) -> list[tuple[str, object, Path]]:
    """(mode, seed, path) of results_dir/folder/{mode}_seed{s}{suffix} for the latest tagged runs.

    Without tagged rows (e.g. only artefacts were copied) every such file in the folder is used.
    """
    try:
        pairs = [(r["mode"], r.get("seed", "")) for r in study_rows(results_dir, tag)]
    except ResultsError:
        pairs = []
    base = Path(results_dir) / folder
    if pairs:
        found = [(m, s, base / f"{m}_seed{s}{suffix}") for m, s in pairs]
        found = [f for f in found if f[2].exists()]
    else:
        found = []
        for p in sorted(base.glob(f"*_seed*{suffix}")):
            mode, _, seed = p.name[:-len(suffix)].rpartition("_seed")
            found.append((mode, int(seed) if seed.isdigit() else seed, p))
    if not found:
        raise MissingInput(f"no {folder}/*{suffix} files in {results_dir}")
    return sorted(found, key=lambda f: (mode_key(f[0]), str(f[1]).zfill(8)))


# ---------------------------------------------------------------- 1. headline

def _spread_labels(ys: list[float], min_gap: float) -> list[float]:
    """Label heights near `ys` (in order) moved apart until neighbours are >= min_gap apart."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [ys[i] for i in order]
    for _ in range(50):
        moved = False
        for a in range(len(placed) - 1):
            gap = placed[a + 1] - placed[a]
            if gap < min_gap:
                shift = (min_gap - gap) / 2
                placed[a] -= shift
                placed[a + 1] += shift
                moved = True
        if not moved:
            break
    out = [0.0] * len(ys)
    for rank, i in enumerate(order):
        out[i] = placed[rank]
    return out


def plot_comparison(results_dir, out_dir, tag="study") -> Path:
    _rows(results_dir, tag)
    stats = summarize(results_dir, tag)
    points = {m: s for m, s in stats.items() if s["size"]}
    if not points:
        raise MissingInput(f"no deployment sizes: {Path(results_dir) / 'deployment.csv'} is missing or has no "
                           f"'total' rows (run deployment_compression.py --verify)")
    n_seeds = max(len(s["seeds"]) for s in points.values())
    fig, ax = plt.subplots(figsize=(7.5, 5.8), layout="constrained")
    # Every ternary model packs to (almost) the same number of bytes; nudge them apart on the log axis.
    sizes = {m: mean(s["size"]) for m, s in points.items()}
    same = [m for m in points if m != "fp"]
    crowd = [m for m in same if sum(abs(math.log(sizes[m] / sizes[o])) < 0.05 for o in same) > 1]
    nudge = {m: 1.06 ** (i - (len(crowd) - 1) / 2) for i, m in enumerate(crowd)}
    ys = {m: mean(s["test_acc"]) for m, s in points.items()}
    lo = min(min(s["test_acc"]) for s in points.values())
    hi = max(max(s["test_acc"]) for s in points.values())
    span = max(hi - lo, 0.5)
    if "fp" in ys:
        ax.axhline(ys["fp"], color=color("fp"), lw=0.8, ls=":", zorder=1, label="FP32 mean accuracy")
    for mode, s in points.items():
        x = sizes[mode] * nudge.get(mode, 1.0) / 1024
        err = std(s["test_acc"])
        ax.errorbar(x, ys[mode], yerr=0 if math.isnan(err) else err, fmt=MARKERS.get(mode, "o"), ms=8,
                    color=color(mode), capsize=5, lw=1.5, zorder=3,
                    label=f"{label(mode)}: mean ± sample std ({len(s['seeds'])} seed{'s' * (len(s['seeds']) > 1)})")
        ax.scatter([x] * len(s["test_acc"]), s["test_acc"], s=12, color=color(mode), alpha=0.45, zorder=2,
                   edgecolors="none")
    ax.scatter([], [], s=12, color="gray", alpha=0.45, label="individual seeds")
    ax.set_xscale("log")
    xs = [sizes[m] / 1024 for m in points]
    ax.set_xlim(min(xs) / 2.5, max(xs) * 2.5)
    ax.set_ylim(lo - 0.45 * span, hi + 0.45 * span)
    # Labels to the right of each point, spread vertically so close accuracies never overprint.
    modes = list(points)
    bottom, top = ax.get_ylim()
    label_y = _spread_labels([ys[m] for m in modes], 0.09 * (top - bottom))  # two text lines at this figure size
    for mode, y in zip(modes, label_y):
        x = sizes[mode] * nudge.get(mode, 1.0) / 1024
        s = points[mode]
        text = (f"{label(mode)}: {mean(s['test_acc']):.2f}%\n{sizes[mode] / 1024:,.0f} KiB"
                + ("" if mode == "fp" else f", {mean(s['compression']):.1f}× smaller"))
        ax.annotate(text, xy=(x, ys[mode]), xytext=(x * 1.35, y), textcoords="data", fontsize=8.5,
                    va="center", color=color(mode), arrowprops={"arrowstyle": "-", "color": color(mode), "lw": 0.6})
    ax.set_xlabel("deployed model size on disk (KiB, log scale)\n"
                  "ternary: packed 2-bit file, BatchNorm folded; FP32: torch.save(state_dict)", fontsize=9)
    ax.set_ylabel("MNIST test accuracy (%)")
    runs = f"{n_seeds} seed{'s' * (n_seeds > 1)}" + ("" if tag == "study" else f", results tagged '{tag}'")
    ax.set_title(f"LeNet-5 on MNIST: accuracy vs deployed size ({runs})"
                 + ("\nternary points nudged sideways for legibility; their files are equal in size" if crowd else ""),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    fig.legend(fontsize=8, loc="outside lower center", ncol=3, frameon=False)
    return _save(fig, Path(out_dir) / "results_comparison.png")


# ---------------------------------------------------------------- 2. training curves

def val_ternary(row: dict):
    """True / False: the epoch's validation point used ternary / full-precision weights; None if not recorded."""
    value = str(row.get("val_ternary") or "").strip().lower()
    return {"1": True, "1.0": True, "true": True, "0": False, "0.0": False, "false": False}.get(value)


def plot_training_curves(results_dir, out_dir, tag="study") -> Path:
    runs = _runs(results_dir, tag, "history", ".csv")
    modes = sorted({m for m, _, _ in runs}, key=mode_key)
    try:
        deployed = {(r["mode"], r.get("seed", "")): r for r in study_rows(results_dir, tag)}
    except ResultsError:
        deployed = {}
    fig, axes = plt.subplots(2, len(modes), figsize=(3.4 * len(modes) + 0.6, 6.2), layout="constrained",
                             sharex=True, squeeze=False)
    all_epochs, kinds = [], set()
    seeds = sorted({s for _, s, _ in runs}, key=lambda v: str(v).zfill(8))
    for col, mode in enumerate(modes):
        ax_acc, ax_loss = axes[0, col], axes[1, col]
        stars, unrecorded = [], False
        for m, seed, path in runs:
            if m != mode:
                continue
            hist = read_csv(path)
            epochs = [int(float(h["epoch"])) for h in hist]
            ternary = [val_ternary(h) for h in hist]
            all_epochs += epochs
            unrecorded |= None in ternary
            ls = STYLES[seeds.index(seed) % len(STYLES)]
            for ax, key in ((ax_acc, "val_acc"), (ax_loss, "val_loss")):
                values = [float(h[key]) for h in hist]
                ax.plot(epochs, values, ls=ls, color=color(mode), label=f"seed {seed}")
                for kind in dict.fromkeys(ternary):
                    marker, face, _ = POINTS[kind]
                    points = [(e, v) for e, v, t in zip(epochs, values, ternary) if t is kind]
                    ax.plot(*zip(*points), ls="none", marker=marker, ms=4.5, color=color(mode), mfc=face or color(mode),
                            mew=1.1)
                    kinds.add(kind)
            row = deployed.get((mode, str(seed)))
            if row and row.get("val_acc") and epochs:
                stars.append((epochs[-1], float(row["val_acc"])))
        if stars:  # after the seed lines, so the legend lists seeds first
            ax_acc.plot(*zip(*stars), "*", ms=11, color="black", zorder=5, label="deployed model", ls="none")
        if ax_acc.get_ylim()[1] > 100:
            ax_acc.set_ylim(top=100.2)
        ax_acc.set_title(label(mode) + ("\n(before the hard projection, epochs\nrun on latent, not ternary, weights)"
                                        if mode == "admm" and unrecorded else ""), fontsize=10)
        ax_loss.set_xlabel("epoch")
        ax_acc.grid(alpha=0.3)
        ax_loss.grid(alpha=0.3)
        ax_acc.legend(fontsize=7, loc="lower right")
    for ax in axes.flat:
        _epoch_axis(ax, all_epochs)
    axes[0, 0].set_ylabel("validation accuracy (%)")
    axes[1, 0].set_ylabel("validation loss (cross-entropy, nats)")
    plan = (read_json(Path(results_dir) / "study.json") or {}).get("plan", {})
    held_out = f"{plan['val_size']:,} held-out training images" if plan.get("val_size") else "held-out validation split"
    fig.suptitle(f"Validation accuracy and loss per epoch ({held_out}; ★ = deployed model after export)",
                 fontsize=10)
    fig.legend(handles=[plt.Line2D([], [], ls="none", marker=POINTS[k][0], color="0.3", mfc=POINTS[k][1] or "0.3",
                                   label=POINTS[k][2]) for k in (True, False, None) if k in kinds],
               fontsize=8, loc="outside lower center", ncol=3, frameon=False)
    return _save(fig, Path(out_dir) / "training_curves.png")


# ---------------------------------------------------------------- 3. weight histograms

def plot_weight_histograms(results_dir, out_dir, tag="study") -> Path:
    runs = _runs(results_dir, tag, "weights", ".json")
    first = {}
    for mode, seed, path in runs:  # one seed per mode (the lowest): seeds look alike, panels would not
        first.setdefault(mode, (seed, path))
    modes = sorted(first, key=mode_key)
    data = {m: json.loads(first[m][1].read_text()) for m in modes}
    projected = set()  # modes whose checkpoint stores W after a hard projection (ADMM)
    fig, axes = plt.subplots(len(LAYERS), len(modes), figsize=(3.3 * len(modes) + 0.6, 2.3 * len(LAYERS) + 0.8),
                             layout="constrained", squeeze=False)
    for col, mode in enumerate(modes):
        layers = {entry["layer"]: entry for entry in data[mode]["layers"]}
        for row, name in enumerate(LAYERS):
            ax = axes[row, col]
            entry = layers.get(name)
            if entry is None:
                ax.set_axis_off()
                continue
            edges, counts = np.asarray(entry["edges"]), np.asarray(entry["counts"])
            ax.stairs(counts, edges, fill=True, color=color(mode), alpha=0.75)
            ax.set_yscale("log")
            ax.set_ylim(0.7, max(counts.max(), 1) * 2)
            title = f"{label(mode)} · {name} ({entry['weights']:,} weights)"
            if entry.get("ternary"):
                delta = float(np.mean(entry["delta"]))
                ax.axvspan(-delta, delta, color="0.85", zorder=0)
                for d in (-delta, delta):
                    ax.axvline(d, color="black", ls="--", lw=0.9)
                f = entry["code_fractions"]
                title += f"\ncodes −1 {100 * f['-1']:.1f}% · 0 {100 * f['0']:.1f}% · +1 {100 * f['+1']:.1f}%"
                if entry.get("latent_distinct", 99) <= 3:
                    projected.add(label(mode))
            ax.set_xlim(-1.12 * entry["max_abs"], 1.12 * entry["max_abs"])
            ax.set_title(title, fontsize=8)
            ax.tick_params(labelsize=7)
            if row == len(LAYERS) - 1:
                ax.set_xlabel("latent weight value", fontsize=8)
            if col == 0:
                ax.set_ylabel("count (log scale)", fontsize=8)
    seeds = ", ".join(f"{label(m)} seed {first[m][0]}" for m in modes)
    note = (f"\n{' and '.join(sorted(projected))}: the checkpoint keeps W after the final hard projection W ← Π(W), "
            "so the latent weights sit on the three levels" if projected else "")
    fig.suptitle("Latent weights after training, 100 bins; grey band |W| ≤ Δ (deployed as 0), dashed lines ±Δ; "
                 f"codes = share of deployed −1 / 0 / +1\n({seeds}){note}", fontsize=9)
    return _save(fig, Path(out_dir) / "weight_histograms.png")


# ---------------------------------------------------------------- 4. sparsity and bytes

def plot_sparsity_bytes(results_dir, out_dir, tag="study") -> Path:
    _rows(results_dir, tag)
    layers = layer_stats(results_dir, tag)
    if not layers:
        raise MissingInput(f"no per-layer rows in {Path(results_dir) / 'deployment.csv'} "
                           f"(run deployment_compression.py --verify)")
    names = list(layers)
    modes = sorted({m for s in layers.values() for m in s["zero"]}, key=mode_key)
    fig, (ax_z, ax_b) = plt.subplots(1, 2, figsize=(12.5, 4.8), layout="constrained")
    x = np.arange(len(names))
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        vals = [100 * mean(layers[n]["zero"].get(mode, [])) for n in names]
        errs = [100 * std(layers[n]["zero"].get(mode, [])) for n in names]
        errs = [0 if math.isnan(e) else e for e in errs]
        ax_z.bar(x + (i - (len(modes) - 1) / 2) * width, vals, width, yerr=errs, capsize=3, color=color(mode),
                 label=label(mode))
    ax_z.set_xticks(x, [f"{n}\n({layers[n]['weights']:,.0f} weights)" for n in names], fontsize=8)
    ax_z.set_ylabel("deployed codes equal to 0 (%)")
    highest = max((100 * max(v) for s in layers.values() for v in s["zero"].values() if v), default=50)
    ax_z.set_ylim(0, min(100, highest * 1.25 + 5))
    ax_z.set_title("Sparsity of the deployed ternary codes (mean ± std over seeds)", fontsize=10)
    ax_z.legend(fontsize=8)
    ax_z.grid(axis="y", alpha=0.3)
    series = [("FP32", [layers[n]["fp32"] for n in names], "0.6", None),
              ("2-bit codes", [layers[n]["codes_2bit"] for n in names], "#444444", None),
              ("base-3 codes", [layers[n]["codes_base3"] for n in names], "#888888", "//")]
    series += [(f"entropy bound, {label(m)}", [mean(layers[n]["entropy"].get(m, [])) for n in names], color(m), "..")
               for m in modes]
    width = 0.8 / len(series)
    for i, (name, vals, c, hatch) in enumerate(series):
        ax_b.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, color=c, hatch=hatch, label=name,
                 edgecolor="white" if hatch else None, lw=0)
    ax_b.set_yscale("log")
    ax_b.set_xticks(x, names)
    ax_b.set_ylabel("bytes per layer (log scale)")
    ax_b.set_title("Weight storage per layer: FP32, fixed-rate codes, entropy bound\n"
                   "(codes only; scales, biases and the file header excluded)", fontsize=10)
    ax_b.legend(fontsize=7, ncol=2, loc="upper left")
    ax_b.set_ylim(top=max(layers[n]["fp32"] for n in names) * 30)
    ax_b.grid(axis="y", which="both", alpha=0.25)
    return _save(fig, Path(out_dir) / "sparsity_bytes.png")


# ---------------------------------------------------------------- 5. ADMM

def plot_admm_residual(results_dir, out_dir, tag="study") -> Path:
    runs = [r for r in _runs(results_dir, tag, "history", ".csv") if r[0] == "admm"]
    if not runs:
        raise MissingInput(f"no history/admm_seed*.csv in {results_dir}")
    fig, (ax_r, ax_rho) = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained", sharex=True)
    drawn, all_epochs = 0, []
    for i, (_, seed, path) in enumerate(runs):
        hist = [h for h in read_csv(path) if h.get("primal_residual") not in (None, "")]
        if not hist:
            continue
        epochs = [int(float(h["epoch"])) for h in hist]
        all_epochs += epochs
        ax_r.plot(epochs, [float(h["primal_residual"]) for h in hist], ls=STYLES[i % len(STYLES)], marker="o",
                  color=color("admm"), label=f"seed {seed}")
        ax_rho.plot(epochs, [float(h["rho"]) for h in hist], ls=STYLES[i % len(STYLES)], marker="o", color="#8c564b",
                    label=f"seed {seed}")
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise MissingInput("ADMM history files have no primal_residual column")
    for ax in (ax_r, ax_rho):
        ax.set_yscale("log")
        ax.set_xlabel("epoch (value at its end)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        _epoch_axis(ax, all_epochs)
    ax_r.set_ylabel("primal residual ‖W − G‖ / ‖W‖ (log)")
    ax_r.set_title("Distance of latent W from its ternary copy G", fontsize=10)
    ax_rho.set_ylabel("penalty ρ (log)")
    ax_rho.set_title("ADMM penalty ρ (grows after every G/U update)", fontsize=10)
    fig.suptitle("ADMM: constraint violation and penalty over training", fontsize=11)
    return _save(fig, Path(out_dir) / "admm_residual.png")


FIGURES = {
    "results_comparison.png": plot_comparison,
    "training_curves.png": plot_training_curves,
    "weight_histograms.png": plot_weight_histograms,
    "sparsity_bytes.png": plot_sparsity_bytes,
    "admm_residual.png": plot_admm_residual,
}


def plot_all(results_dir="results", out_dir=None, tag="study", log=print) -> dict:
    """Draw every figure into out_dir (default: results_dir); {file name: path, or None if skipped}."""
    out_dir = Path(out_dir or results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, draw in FIGURES.items():
        try:
            made[name] = draw(results_dir, out_dir, tag)
            log(f"wrote {made[name]}")
        except (MissingInput, NoResults, ResultsError, ValueError, KeyError, OSError) as e:
            plt.close("all")
            made[name] = None
            log(f"skipped {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return made
