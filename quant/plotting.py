"""The study's figures, drawn from results/ alone (never a checkpoint) as matplotlib Figures (no pyplot state);
FIGURES lists them. A figure whose inputs are absent raises NoResults, which plot_all turns into a one-line note."""
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator

from .report import (LAYERS, NoResults, label, layer_stats, mean, mode_key, read_json, seed_key, std,
                     study_rows, summarize)
from .results import read_results

COLORS = {"fp": "#4d4d4d", "twn": "#1f77b4", "ttq": "#d62728", "admm": "#2ca02c"}
MARKERS = {"fp": "o", "twn": "s", "ttq": "^", "admm": "D"}
STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]  # one line style per seed (five by default)
# How Figure 2 marks a validation point, by the history's val_ternary column (None: an older file without it).
POINTS = {True: ("o", None, "validation on ternary weights"),
          False: ("o", "white", "validation on full-precision weights (FP32, TTQ's warm-up, ADMM before projection)"),
          None: ("x", None, "weights not recorded (history without val_ternary)")}


def color(mode: str) -> str:
    return COLORS.get(mode, "#9467bd")


def _epoch_axis(ax, epochs) -> None:
    """Integer epoch ticks (matplotlib would label a one-epoch run 0.96 ... 1.04)."""
    ax.set_xticks(range(1, max(epochs, default=1) + 1))
    ax.set_xlim(0.7, max(epochs, default=1) + 0.3)


def _runs(results_dir, tag, folder: str, suffix: str) -> list[tuple[str, str, Path, dict]]:
    """(mode, seed, path, results.csv row) of folder/{mode}_seed{s}{suffix} for the latest tagged runs, in mode and
    seed order."""
    base = Path(results_dir) / folder
    found = [(r["mode"], r.get("seed", ""), base / f"{r['mode']}_seed{r.get('seed', '')}{suffix}", r)
             for r in study_rows(results_dir, tag)]
    if not (found := [f for f in found if f[2].exists()]):
        raise NoResults(f"no {folder}/*{suffix} files in {results_dir}")
    return found


def _spread_labels(ys: list[float], min_gap: float) -> list[float]:
    """Label heights near `ys` (in order) moved apart until neighbours are >= min_gap apart (50 passes at most)."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed = [ys[i] for i in order]
    for _ in range(50):
        for a in range(len(placed) - 1):  # sequential: each push sees the previous one
            if (short := min_gap - (placed[a + 1] - placed[a])) > 0:
                placed[a] -= short / 2
                placed[a + 1] += short / 2
    return [placed[order.index(i)] for i in range(len(ys))]


def plot_comparison(results_dir, tag="study") -> Figure:
    """Figure 1: test accuracy against deployed size on disk, mean ± std over seeds."""
    points = {m: s for m, s in summarize(results_dir, tag).items() if s["size"]}
    if not points:
        raise NoResults(f"no deployment sizes: {Path(results_dir) / 'deployment.csv'} is missing or has no "
                        f"'total' rows (run deployment_compression.py --verify)")
    n_seeds = max(len(s["seeds"]) for s in points.values())
    fig = Figure(figsize=(7.5, 5.8), layout="constrained")
    ax = fig.subplots()
    # Every ternary model packs to (almost) the same number of bytes; nudge them apart on the log axis.
    sizes = {m: mean(s["size"]) for m, s in points.items()}
    same = [m for m in points if m != "fp"]
    crowd = [m for m in same if sum(abs(math.log(sizes[m] / sizes[o])) < 0.05 for o in same) > 1]
    xs = {m: sizes[m] * 1.06 ** (crowd.index(m) - (len(crowd) - 1) / 2 if m in crowd else 0) / 1024 for m in points}
    ys = {m: mean(s["test_acc"]) for m, s in points.items()}
    lo, hi = min(min(s["test_acc"]) for s in points.values()), max(max(s["test_acc"]) for s in points.values())
    span = max(hi - lo, 0.5)
    if "fp" in ys:
        ax.axhline(ys["fp"], color=color("fp"), lw=0.8, ls=":", zorder=1, label="FP32 mean accuracy")
    for mode, s in points.items():
        err, n = std(s["test_acc"]), len(s["seeds"])
        ax.errorbar(xs[mode], ys[mode], yerr=0 if math.isnan(err) else err, fmt=MARKERS.get(mode, "o"), ms=8,
                    color=color(mode), capsize=5, lw=1.5, zorder=3,
                    label=f"{label(mode)}: mean ± sample std ({n} seed{'s' * (n > 1)})")
        ax.scatter([xs[mode]] * len(s["test_acc"]), s["test_acc"], s=12, color=color(mode), alpha=0.45, zorder=2,
                   edgecolors="none")
    ax.scatter([], [], s=12, color="gray", alpha=0.45, label="individual seeds")
    ax.set(xscale="log", xlim=(min(sizes.values()) / 1024 / 2.5, max(sizes.values()) / 1024 * 2.5),
           ylim=(lo - 0.45 * span, hi + 0.45 * span), ylabel="MNIST test accuracy (%)")
    bottom, top = ax.get_ylim()  # labels right of each point, spread so close accuracies never overprint
    for mode, y in zip(points, _spread_labels(list(ys.values()), 0.09 * (top - bottom))):  # 0.09: two text lines
        text = (f"{label(mode)}: {ys[mode]:.2f}%\n{sizes[mode] / 1024:,.0f} KiB"
                + ("" if mode == "fp" else f", {mean(points[mode]['compression']):.1f}× smaller"))
        ax.annotate(text, xy=(xs[mode], ys[mode]), xytext=(xs[mode] * 1.35, y), textcoords="data", fontsize=8.5,
                    va="center", color=color(mode), arrowprops={"arrowstyle": "-", "color": color(mode), "lw": 0.6})
    ax.set_xlabel("deployed model size on disk (KiB, log scale)\n"
                  "ternary: packed 2-bit file, BatchNorm folded; FP32: torch.save(state_dict)", fontsize=9)
    runs = f"{n_seeds} seed{'s' * (n_seeds > 1)}" + ("" if tag == "study" else f", results tagged '{tag}'")
    ax.set_title(f"LeNet-5 on MNIST: accuracy vs deployed size ({runs})"
                 + ("\nternary points nudged sideways for legibility; their files are equal in size" if crowd else ""),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    fig.legend(fontsize=8, loc="outside lower center", ncol=3, frameon=False)
    return fig


def plot_training_curves(results_dir, tag="study") -> Figure:
    """Figure 2: validation accuracy and loss per epoch, seeds overlaid; hollow markers were scored on
    full-precision, not ternary, weights; a star is the deployed model's validation accuracy."""
    runs = _runs(results_dir, tag, "history", ".csv")
    modes = list(dict.fromkeys(mode for mode, *_ in runs))  # runs come in mode order
    fig = Figure(figsize=(3.4 * len(modes) + 0.6, 6.2), layout="constrained")
    axes = fig.subplots(2, len(modes), sharex=True, squeeze=False)
    all_epochs, kinds = [], set()
    seeds = sorted({seed for _, seed, _, _ in runs}, key=seed_key)
    for (ax_acc, ax_loss), mode in zip(axes.T, modes):
        stars, unrecorded = [], False
        for _, seed, path, row in (r for r in runs if r[0] == mode):
            hist = read_results(path)[1]
            epochs = [int(float(h["epoch"])) for h in hist]
            ternary = [{"1": True, "0": False}.get(h.get("val_ternary")) for h in hist]  # None: not recorded
            all_epochs += epochs
            unrecorded |= None in ternary
            for ax, key in ((ax_acc, "val_acc"), (ax_loss, "val_loss")):
                values = [float(h[key]) for h in hist]
                ax.plot(epochs, values, ls=STYLES[seeds.index(seed) % len(STYLES)], color=color(mode),
                        label=f"seed {seed}")
                for kind in dict.fromkeys(ternary):
                    points = [(e, v) for e, v, t in zip(epochs, values, ternary) if t is kind]
                    ax.plot(*zip(*points), ls="none", marker=POINTS[kind][0], ms=4.5, color=color(mode),
                            mfc=POINTS[kind][1] or color(mode), mew=1.1)
                    kinds.add(kind)
            if row.get("val_acc") and epochs:
                stars.append((epochs[-1], float(row["val_acc"])))
        if stars:  # after the seed lines, so the legend lists seeds first
            ax_acc.plot(*zip(*stars), "*", ms=11, color="black", zorder=5, label="deployed model", ls="none")
        if ax_acc.get_ylim()[1] > 100:
            ax_acc.set_ylim(top=100.2)
        ax_acc.set_title(label(mode) + ("\n(before the hard projection, epochs\nrun on latent, not ternary, weights)"
                                        if mode == "admm" and unrecorded else ""), fontsize=10)
        ax_loss.set_xlabel("epoch")
        ax_acc.legend(fontsize=7, loc="lower right")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        _epoch_axis(ax, all_epochs)
    axes[0, 0].set_ylabel("validation accuracy (%)")
    axes[1, 0].set_ylabel("validation loss (cross-entropy, nats)")
    plan = (read_json(Path(results_dir) / "study.json") or {}).get("plan", {})
    held_out = f"{plan['val_size']:,} held-out training images" if plan.get("val_size") else "held-out validation split"
    fig.suptitle(f"Validation accuracy and loss per epoch ({held_out}; ★ = deployed model after export)",
                 fontsize=10)
    fig.legend(handles=[Line2D([], [], ls="none", marker=POINTS[k][0], color="0.3", mfc=POINTS[k][1] or "0.3",
                               label=POINTS[k][2]) for k in (True, False, None) if k in kinds],
               fontsize=8, loc="outside lower center", ncol=3, frameon=False)
    return fig


def plot_weight_histograms(results_dir, tag="study") -> Figure:
    """Figure 3: latent weights per layer and mode (the lowest seed), ±delta and the deployed code mix."""
    first = {}
    for mode, seed, path, _ in _runs(results_dir, tag, "weights", ".json"):  # seeds look alike, panels would not
        first.setdefault(mode, (seed, path))
    projected = set()  # modes whose checkpoint stores W after a hard projection (ADMM)
    fig = Figure(figsize=(3.3 * len(first) + 0.6, 2.3 * len(LAYERS) + 0.8), layout="constrained")
    axes = fig.subplots(len(LAYERS), len(first), squeeze=False)
    for col, (mode, (_, path)) in enumerate(first.items()):
        layers = {entry["layer"]: entry for entry in json.loads(path.read_text())["layers"]}
        for row, (name, ax) in enumerate(zip(LAYERS, axes[:, col])):
            if (entry := layers.get(name)) is None:
                ax.set_axis_off()
                continue
            counts = np.asarray(entry["counts"])
            ax.stairs(counts, np.asarray(entry["edges"]), fill=True, color=color(mode), alpha=0.75)
            ax.set(yscale="log", ylim=(0.7, max(counts.max(), 1) * 2))
            ax.yaxis.set_minor_locator(NullLocator())  # 16 log axes' minor ticks took half the drawing time
            ax.locator_params(axis="x", nbins=5)  # ADMM's narrow ranges otherwise get labels that overlap
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
    seeds = ", ".join(f"{label(m)} seed {seed}" for m, (seed, _) in first.items())
    note = (f"\n{' and '.join(sorted(projected))}: the checkpoint keeps W after the final hard projection W ← Π(W), "
            "so the latent weights sit on the three levels" if projected else "")
    fig.suptitle("Latent weights after training, 100 bins; grey band |W| ≤ Δ (deployed as 0), dashed lines ±Δ; "
                 f"codes = share of deployed −1 / 0 / +1\n({seeds}){note}", fontsize=9)
    return fig


def plot_sparsity_bytes(results_dir, tag="study") -> Figure:
    """Figure 4: zero fraction of the deployed codes; bytes per layer per encoding against the order-0 bound."""
    if not (layers := layer_stats(results_dir, tag)):
        raise NoResults(f"no per-layer rows in {Path(results_dir) / 'deployment.csv'} "
                        f"(run deployment_compression.py --verify)")
    names = list(layers)
    modes = sorted({m for s in layers.values() for m in s["zero_fraction"]}, key=mode_key)
    per_layer = lambda key, m, f=mean: [f(layers[n][key].get(m, [])) for n in names]  # noqa: E731
    fig = Figure(figsize=(12.5, 4.8), layout="constrained")
    ax_z, ax_b = fig.subplots(1, 2)
    x = np.arange(len(names))
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        ax_z.bar(x + (i - (len(modes) - 1) / 2) * width, [100 * v for v in per_layer("zero_fraction", mode)], width,
                 yerr=[0 if math.isnan(e) else 100 * e for e in per_layer("zero_fraction", mode, std)], capsize=3,
                 color=color(mode), label=label(mode))
    ax_z.set_xticks(x, [f"{n}\n({layers[n]['weights']:,.0f} weights)" for n in names], fontsize=8)
    highest = max((100 * max(v) for s in layers.values() for v in s["zero_fraction"].values() if v), default=50)
    ax_z.set(ylabel="deployed codes equal to 0 (%)", ylim=(0, min(100, highest * 1.25 + 5)))
    ax_z.set_title("Sparsity of the deployed ternary codes (mean ± std over seeds)", fontsize=10)
    ax_z.legend(fontsize=8)
    ax_z.grid(axis="y", alpha=0.3)
    series = [("FP32", [layers[n]["fp32_bytes"] for n in names], "0.6", None),
              ("2-bit codes", [layers[n]["bytes_2bit"] for n in names], "#444444", None),
              ("base-3 codes", [layers[n]["bytes_base3"] for n in names], "#888888", "//")]
    series += [(f"entropy-coded, {label(m)}", per_layer("bytes_entropy", m), color(m), None) for m in modes]
    width = 0.8 / len(series)
    for i, (name, vals, c, hatch) in enumerate(series):
        at = x + (i - (len(series) - 1) / 2) * width
        ax_b.bar(at, vals, width, color=c, hatch=hatch, label=name, edgecolor="white" if hatch else None, lw=0)
        if i >= 3:  # each mode's order-0 bound as a black tick across its entropy-coded bar
            ax_b.plot(at, per_layer("order0_bytes", modes[i - 3]), "_", color="black", ms=max(4.0, 60 * width),
                      mew=1.6, label="order-0 entropy bound" if i == 3 else None)
    ax_b.set(yscale="log", xticks=x, xticklabels=names, ylabel="bytes per layer (log scale)")
    ax_b.set_title("Bytes per layer: FP32, fixed-rate, entropy-coded; — = order-0 bound\n"
                   "(code blocks only; scales, biases and the file header excluded)", fontsize=10)
    ax_b.legend(fontsize=7, ncol=2, loc="upper left")
    ax_b.set_ylim(top=max(layers[n]["fp32_bytes"] for n in names) * 30)
    ax_b.grid(axis="y", which="both", alpha=0.25)
    return fig


def plot_admm_residual(results_dir, tag="study") -> Figure:
    """Figure 5: ADMM's primal residual ||W - G|| / ||W|| and penalty rho per epoch."""
    runs = [(seed, path) for mode, seed, path, _ in _runs(results_dir, tag, "history", ".csv") if mode == "admm"]
    if not runs:
        raise NoResults(f"no history/admm_seed*.csv in {results_dir}")
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    all_epochs = []
    for i, (seed, path) in enumerate(runs):
        if hist := [h for h in read_results(path)[1] if h.get("primal_residual") not in (None, "")]:
            all_epochs += [int(float(h["epoch"])) for h in hist]
            for ax, key, c in zip(axes, ("primal_residual", "rho"), (color("admm"), "#8c564b")):
                ax.plot(all_epochs[-len(hist):], [float(h[key]) for h in hist], ls=STYLES[i % len(STYLES)], marker="o",
                        color=c, label=f"seed {seed}")
    if not all_epochs:
        raise NoResults("ADMM history files have no primal_residual column")
    for ax, ylabel, title in zip(axes, ("primal residual ‖W − G‖ / ‖W‖ (log)", "penalty ρ (log)"),
                                 ("Distance of latent W from its ternary copy G",
                                  "ADMM penalty ρ (grows after every G/U update)")):
        ax.set(yscale="log", xlabel="epoch (value at its end)", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        _epoch_axis(ax, all_epochs)
        ax.set_title(title, fontsize=10)
    fig.suptitle("ADMM: constraint violation and penalty over training", fontsize=11)
    return fig


FIGURES = {"results_comparison.png": plot_comparison, "training_curves.png": plot_training_curves,
           "weight_histograms.png": plot_weight_histograms, "sparsity_bytes.png": plot_sparsity_bytes,
           "admm_residual.png": plot_admm_residual}


def plot_all(results_dir="results", out_dir=None, tag="study", log=print) -> dict:
    """Draw every figure into out_dir (default: results_dir); {file name: path, or None if skipped}."""
    out_dir = Path(out_dir or results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, draw in FIGURES.items():
        try:
            draw(results_dir, tag).savefig(made.setdefault(name, out_dir / name), dpi=150)
            log(f"wrote {made[name]}")
        except (ValueError, KeyError, OSError) as e:  # NoResults is a ValueError
            made[name] = None
            log(f"skipped {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return made
