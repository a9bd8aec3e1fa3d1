"""Numbers of the study, read from results/ only, and the markdown tables of report.md / README.md.

Readers (also used by quant/plotting.py):
    study_rows        latest results.csv row per (mode, seed) with a tag ("study"); an old table without a
                      tag column reads as tag ""
    deployment_rows   results/deployment.csv rows (one per layer + "total" per checkpoint) of those runs
    summarize         per mode: seeds, accuracies, sizes, sparsity, as plain Python numbers
    predictions       per run: the 10,000 test predictions of results/predictions/ (checked against results.csv)

Tables live in the documents between markers, and only there:

    <!-- BEGIN:results_table -->
    ...rewritten by refresh()...
    <!-- END:results_table -->

`refresh` replaces the body of every marker pair whose name is in TABLES and leaves all other text alone,
so prose is never touched and running it twice changes nothing. Prose cites table cells, not numbers.
Intervals and tests come from quant.stats: a 95 % Student-t interval of each mean over seeds, and for each
pair of methods McNemar's exact test per seed plus a t-interval of the per-seed differences (paired_table).
"""
import csv
import io
import itertools
import json
import math
import re
import statistics
from pathlib import Path

import numpy as np

from .files import atomic_write_text
from .results import ResultsError, read_results
from .stats import CONFIDENCE, mcnemar_exact, paired_seeds, t_interval

# The order of quant.methods.METHODS (not imported: it would pull in torch; tests check they agree).
MODE_ORDER = ("fp", "twn", "ttq", "admm")
LABELS = {"fp": "FP32", "twn": "TWN", "ttq": "TTQ", "admm": "ADMM"}
LAYERS = ("conv1", "conv2", "fc1", "fc2")
MARKER = re.compile(r"<!-- BEGIN:(?P<name>[\w.-]+) -->(?P<body>.*?)<!-- END:(?P=name) -->", re.S)
NA = "n/a"
MAX_PREDICTIONS_BYTES = 1 << 20  # a predictions file holds 10,000 uint8 classes (~10 KB); refuse anything huge


class NoResults(ValueError):
    """results/ holds no rows for the requested tag (nothing to tabulate or plot)."""


def label(mode: str) -> str:
    return LABELS.get(mode, mode.upper())


def mode_key(mode: str):
    return (MODE_ORDER.index(mode), "") if mode in MODE_ORDER else (len(MODE_ORDER), mode)


def number(value) -> float:
    """A CSV cell as float; empty or unparsable cells are NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def seed_of(row: dict):
    """The seed as an int where it is one (old tables may lack the column: "")."""
    value = row.get("seed") or ""
    try:
        return int(float(value))
    except ValueError:
        return value


# ---------------------------------------------------------------- readers

def study_rows(results_dir, tag: str = "study") -> list[dict]:
    """Latest row per (mode, seed) of results.csv with `tag`, ordered by mode then seed (file order = age)."""
    _, rows = read_results(Path(results_dir) / "results.csv")
    latest = {}
    for row in rows:
        if (row.get("tag") or "") == tag and row.get("mode"):
            latest[(row["mode"], seed_of(row))] = row
    return [latest[k] for k in sorted(latest, key=lambda k: (mode_key(k[0]), str(k[1]).zfill(8)))]


def required_study_rows(results_dir, tag: str = "study") -> list[dict]:
    """study_rows, raising NoResults when results.csv is unreadable or has no `tag` rows."""
    try:
        rows = study_rows(results_dir, tag)
    except ResultsError as e:
        raise NoResults(str(e)) from None
    if not rows:
        raise NoResults(f"{Path(results_dir) / 'results.csv'} has no rows tagged {tag!r}")
    return rows


def read_csv(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def deployment_rows(results_dir, rows: list[dict]) -> list[dict]:
    """deployment.csv rows of the checkpoints in `rows` (all rows if none of them match: a hand-made table)."""
    table = read_csv(Path(results_dir) / "deployment.csv")
    wanted = {r.get("checkpoint") for r in rows}
    matched = [d for d in table if d.get("checkpoint") in wanted]
    return matched or table


def read_json(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def mean(values):
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def std(values):
    """Sample standard deviation (n - 1); NaN for fewer than two values."""
    values = [v for v in values if not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else math.nan


def summarize(results_dir, tag: str = "study") -> dict:
    """{mode: stats} over the latest `tag` runs; raises NoResults if there are none.

    Per mode: seeds, test_acc / val_acc / train_seconds (lists per seed), and from deployment.csv's "total" rows
    (lists per seed): file_2bit, file_base3, file_entropy, file_onnx (bytes on disk), fp32_state_dict (bytes),
    codes_2bit, codes_base3, codes_entropy, entropy_bytes / entropy_bits (the order-0 bound), coded_bits (the
    entropy code's bits/weight), zero_fraction, mismatches (every verified format); `size` = deployed bytes on
    disk (2-bit file; FP: the FP32 state_dict), `compression` = FP32 state_dict bytes / size.
    """
    rows = required_study_rows(results_dir, tag)
    totals = [d for d in deployment_rows(results_dir, rows) if d.get("layer") == "total"]
    fp32_any = [number(d.get("fp32_state_dict_bytes")) for d in totals]
    out = {}
    for row in rows:
        s = out.setdefault(row["mode"], {k: [] for k in (
            "seeds", "checkpoints", "test_acc", "val_acc", "train_seconds", "file_2bit", "file_base3",
            "file_entropy", "file_onnx", "fp32_state_dict", "codes_2bit", "codes_base3", "codes_entropy",
            "entropy_bytes", "entropy_bits", "coded_bits", "zero_fraction", "mismatches", "size", "compression")})
        s["seeds"].append(seed_of(row))
        s["checkpoints"].append(row.get("checkpoint", ""))
        for key in ("test_acc", "val_acc", "train_seconds"):
            s[key].append(number(row.get(key)))
        dep = [d for d in totals if d.get("checkpoint") == row.get("checkpoint")]
        if not dep and row["mode"] != "fp":  # a hand-made deployment.csv: match by mode and seed order
            same_mode = [d for d in totals if d.get("mode") == row["mode"]]
            dep = same_mode[len(s["seeds"]) - 1:len(s["seeds"])]
        if dep:
            d = dep[0]
            for key, col in (("file_2bit", "file_bytes_2bit"), ("file_base3", "file_bytes_base3"),
                             ("fp32_state_dict", "fp32_state_dict_bytes"), ("codes_2bit", "bytes_2bit"),
                             ("codes_base3", "bytes_base3"), ("entropy_bytes", "order0_bytes"),
                             ("entropy_bits", "order0_bits"), ("zero_fraction", "zero_fraction"),
                             ("file_entropy", "file_bytes_entropy"), ("file_onnx", "file_bytes_onnx"),
                             ("codes_entropy", "bytes_entropy"), ("coded_bits", "bits_per_weight_entropy")):
                s[key].append(number(d.get(col)))
            s["mismatches"].append(sum(number(v or 0) for k, v in d.items() if k.startswith("mismatches_")))
            s["size"].append(s["file_2bit"][-1])
            s["compression"].append(s["fp32_state_dict"][-1] / s["file_2bit"][-1])
        elif row["mode"] == "fp" and fp32_any:
            # FP ships as its FP32 state_dict; same architecture, so any packed checkpoint's figure is its size.
            s["fp32_state_dict"].append(mean(fp32_any))
            s["size"].append(mean(fp32_any))
            s["compression"].append(1.0)
    return dict(sorted(out.items(), key=lambda kv: mode_key(kv[0])))


def read_classes(path) -> tuple[np.ndarray | None, str]:
    """(class indices, "") from a predictions .npy file (1-D uint8, values 0-9), or (None, why not)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_PREDICTIONS_BYTES:
            return None, f"{path.name} is over {MAX_PREDICTIONS_BYTES:,} bytes"
        values = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    except FileNotFoundError:
        return None, f"no {path.name}"
    except (OSError, ValueError, EOFError) as e:
        return None, f"{path.name} is unreadable ({e})"
    if values.dtype != np.uint8 or values.ndim != 1 or (values.size and values.max() > 9):
        return None, f"{path.name} is not a 1-D uint8 array of classes 0-9"
    return values, ""


def predictions(results_dir, rows: list[dict]) -> tuple[dict, list[str]]:
    """({(mode, seed): per-image correctness, a bool array}, [why each other run is left out]).

    A run counts only if results/predictions/{mode}_seed{s}.npy matches test_labels.npy in length and gives
    results.csv's test accuracy, so a file left over from another run of the same name is never paired.
    """
    folder = Path(results_dir) / "predictions"
    labels, why = read_classes(folder / "test_labels.npy")
    if labels is None:
        return {}, [why] if rows else []
    correct, left_out = {}, []
    for row in rows:
        mode, seed = row["mode"], seed_of(row)
        preds, why = read_classes(folder / f"{mode}_seed{seed}.npy")
        if preds is not None and len(preds) != len(labels):
            why = f"{len(preds):,} predictions for {len(labels):,} labels"
        elif preds is not None:
            right = preds == labels
            if abs(100 * right.mean() - number(row.get("test_acc"))) <= 1e-3:
                correct[(mode, seed)] = right
                continue
            why = f"accuracy {100 * right.mean():.4f} % differs from results.csv's {row.get('test_acc')}"
        left_out.append(f"{label(mode)} seed {seed}: {why}")
    return correct, left_out


def layer_stats(results_dir, tag: str = "study") -> dict:
    """{layer: {"weights", "fp32", "codes_2bit", "codes_base3", and {mode: [per seed]} of "zero" (fraction),
    "entropy" (order-0 bound, B) and "coded" (entropy-coded, B)}} from deployment.csv."""
    rows = study_rows(results_dir, tag)
    out = {}
    for d in deployment_rows(results_dir, rows):
        if d.get("layer") not in LAYERS or (d.get("ternary") or "True") != "True":
            continue
        s = out.setdefault(d["layer"], {"weights": number(d.get("weights")), "fp32": number(d.get("fp32_bytes")),
                                        "codes_2bit": number(d.get("bytes_2bit")),
                                        "codes_base3": number(d.get("bytes_base3")), "zero": {}, "entropy": {},
                                        "coded": {}})
        s["zero"].setdefault(d.get("mode", "?"), []).append(number(d.get("zero_fraction")))
        s["entropy"].setdefault(d.get("mode", "?"), []).append(number(d.get("order0_bytes")))
        s["coded"].setdefault(d.get("mode", "?"), []).append(number(d.get("bytes_entropy")))
    return {k: out[k] for k in LAYERS if k in out}


# ---------------------------------------------------------------- formatting

def fmt(value, spec: str = ".2f") -> str:
    return NA if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def p_value(p) -> str:
    return NA if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def ci(values, spec: str = ".2f") -> str:
    """'[low, high]': the 95 % Student-t interval of the mean over seeds; n/a for fewer than two seeds."""
    _, low, high = t_interval(values)
    return NA if math.isnan(low) else f"[{fmt(low, spec)}, {fmt(high, spec)}]"


def pm(values, spec: str = ".2f") -> str:
    """'mean ± std' (sample std over seeds), or the mean alone for one seed."""
    m, s = mean(values), std(values)
    if math.isnan(m):
        return NA
    return fmt(m, spec) if math.isnan(s) else f"{fmt(m, spec)} ± {fmt(s, spec)}"


def markdown(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def results_table(stats: dict) -> str:
    fp = mean(stats["fp"]["test_acc"]) if "fp" in stats else math.nan
    rows = []
    for mode, s in stats.items():
        delta = mean(s["test_acc"]) - fp
        rows.append([label(mode), str(len(s["seeds"])), pm(s["test_acc"]), ci(s["test_acc"]),
                     "baseline" if mode == "fp" else fmt(delta, "+.2f"),
                     fmt(mean(s["size"]) / 1024, ",.1f"), fmt(mean(s["compression"]), ".1f") + "×"
                     if s["compression"] else NA,
                     "—" if mode == "fp" else pm([100 * z for z in s["zero_fraction"]], ".1f")])
    return markdown(["Method", "Seeds", "Test accuracy (%)", f"{100 * CONFIDENCE:.0f} % CI of the mean (%)",
                     "Δ vs FP32 (pp)", "Deployed size (KiB)", "Compression vs FP32", "Zero codes (%)"], rows)


def seeds_table(stats: dict) -> str:
    seeds = sorted({seed for s in stats.values() for seed in s["seeds"]}, key=lambda v: str(v).zfill(8))
    rows = []
    for mode, s in stats.items():
        by_seed = dict(zip(s["seeds"], s["test_acc"]))
        rows.append([label(mode), *[fmt(by_seed.get(seed, math.nan)) for seed in seeds], pm(s["val_acc"]),
                     fmt(mean(s["train_seconds"]), ".1f")])
    return markdown(["Method", *[f"Test acc. seed {seed} (%)" for seed in seeds], "Validation acc. (%)",
                     "Training time per run (s)"], rows)


def deployment_table(stats: dict) -> str:
    rows = []
    for mode, s in stats.items():
        if mode == "fp" or not s["file_2bit"]:
            continue
        rows.append([label(mode), *(fmt(mean(s[k]), ",.0f") for k in ("file_2bit", "file_base3", "file_entropy",
                                                                      "file_onnx", "codes_2bit", "codes_base3",
                                                                      "codes_entropy", "entropy_bytes")),
                     fmt(mean(s["coded_bits"]), ".3f"), fmt(mean(s["entropy_bits"]), ".3f"),
                     fmt(mean(s["fp32_state_dict"]), ",.0f"), fmt(sum(s["mismatches"]), ".0f")])
    if not rows:
        return "*No deployment files yet: run `python reproduce.py` (or `deployment_compression.py --verify`).*"
    return markdown(["Method", "2-bit file (B)", "Base-3 file (B)", "Entropy file (B)", "ONNX file (B)",
                     "Codes 2-bit (B)", "Codes base-3 (B)", "Codes entropy-coded (B)", "Order-0 bound (B)",
                     "Entropy code (bit/weight)", "Order-0 bound (bit/weight)", "FP32 state_dict (B)",
                     "Packed ≠ checkpoint predictions"], rows)


def layers_table(layers: dict) -> str:
    if not layers:
        return "*No deployment files yet: run `python reproduce.py`.*"
    modes = sorted({m for s in layers.values() for m in s["zero"]}, key=mode_key)
    rows = [[name, fmt(s["weights"], ",.0f"), fmt(s["fp32"], ",.0f"), fmt(s["codes_2bit"], ",.0f"),
             fmt(s["codes_base3"], ",.0f"), *[pm([100 * z for z in s["zero"].get(m, [])], ".1f") for m in modes]]
            for name, s in layers.items()]
    return markdown(["Layer", "Weights", "FP32 (B)", "2-bit (B)", "Base-3 (B)",
                     *[f"{label(m)} zero codes (%)" for m in modes]], rows)


def paired_table(results_dir, tag: str = "study") -> str:
    """Each ternary method against FP32 and each pair of ternary methods, paired on seeds and test images.

    Per pair A − B over the seeds both ran: mean accuracy difference, its t-interval over the per-seed
    differences and that paired t-test's p-value (quant.stats.paired_seeds), the images only A / only B
    classifies correctly and McNemar's exact p-value per seed (quant.stats.mcnemar_exact), and a verdict
    read off the interval alone.
    """
    correct, left_out = predictions(results_dir, study_rows(results_dir, tag))
    if not correct:
        why = f" ({left_out[0]})" if left_out else ""
        return f"*No per-image test predictions in results/predictions/{why}: run `python reproduce.py`.*"
    modes = sorted({m for m, _ in correct}, key=mode_key)
    ternary = [m for m in modes if m != "fp"]
    pairs = [(m, "fp") for m in ternary if "fp" in modes] + list(itertools.combinations(ternary, 2))
    rows, most = [], 0
    for a, b in pairs:
        seeds = sorted({s for m, s in correct if m == a} & {s for m, s in correct if m == b}, key=lambda v: str(v).zfill(8))
        most = max(most, len(seeds))
        tests = [mcnemar_exact(correct[(a, s)], correct[(b, s)]) for s in seeds]
        d = paired_seeds([100 * correct[(a, s)].mean() for s in seeds], [100 * correct[(b, s)].mean() for s in seeds])
        verdict = ("needs ≥ 2 seeds" if math.isnan(d["low"]) else f"{label(a)} higher: interval excludes 0"
                   if d["low"] > 0 else f"{label(b)} higher: interval excludes 0" if d["high"] < 0
                   else "not resolved: interval includes 0")
        rows.append([f"{label(a)} − {label(b)}", str(len(seeds)), fmt(d["mean"], "+.3f"),
                     NA if math.isnan(d["low"]) else f"[{d['low']:+.3f}, {d['high']:+.3f}]", p_value(d["p"]),
                     ", ".join(f"{t['a_only']}/{t['b_only']}" for t in tests), ", ".join(p_value(t["p"]) for t in tests),
                     verdict])
    if most < 2:
        return (f"*The paired comparison needs ≥ 2 seeds with per-image test predictions per method; results/ has "
                f"{most} (`python reproduce.py` runs seeds 0-4).*")
    note = f"\n\n*Runs left out: {'; '.join(left_out)}.*" if left_out else ""
    return markdown(["Comparison A − B", "Seeds", "Mean A − B (pp)", f"{100 * CONFIDENCE:.0f} % CI (pp)",
                     "p (paired t, seeds)", "Images only A / only B right, per seed", "McNemar exact p, per seed",
                     "Verdict (95 % CI)"], rows, "lrrrrrrl") + note


def config_table(results_dir, tag: str = "study") -> str:
    rows, grouped = [], {}
    for row in study_rows(results_dir, tag):
        grouped.setdefault(row["mode"], []).append(row)
    for mode, runs in grouped.items():
        cell = lambda key: ", ".join(dict.fromkeys(str(r.get(key) or "") for r in runs)) or NA
        hp = ", ".join(dict.fromkeys(", ".join(f"{k}={v}" for k, v in json.loads(r.get("hyperparams") or "{}").items())
                                     for r in runs)) or "—"
        rows.append([label(mode), cell("lr"), cell("batch_size"), cell("schedule"), cell("shift"), cell("epochs"), hp])
    return markdown(["Method", "Peak lr", "Batch", "Schedule", "Shift (px)", "Epochs", "Method hyperparameters"],
                    rows, "lrrlrrl")


def setup_table(results_dir) -> str:
    info = read_json(Path(results_dir) / "study.json")
    if not info:
        return "*No results/study.json yet: run `python reproduce.py`.*"
    plan = info.get("plan", {})
    subset = plan.get("train_subset")
    rows = [["Command", f"`{info.get('command', NA)}`"],
            ["CPU (lscpu model name)", str(info.get("cpu", NA))],
            ["Logical CPUs / torch threads", f"{info.get('logical_cpus', NA)} / {info.get('torch_threads', NA)}"],
            ["torch / Python", f"{info.get('torch', NA)} / {info.get('python', NA)}"],
            ["Device", str(info.get("device", NA))],
            ["Seeds", " ".join(map(str, plan.get("seeds", []))) or NA],
            ["Validation images (random split per seed)", fmt(plan.get("val_size"), ",d")],
            ["Training images", "all remaining" if subset is None else fmt(subset, ",d")],
            ["Wall-clock, train + evaluate + pack (s)", fmt(info.get("seconds_train_eval_pack"), ".0f")],
            ["Wall-clock, whole reproduce.py run (s)", fmt(info.get("seconds_total"), ".0f")]]
    return markdown(["Setting", "Value"], rows, "ll")


# Published reference points (fixed; never recomputed). Seed study: /work/shared/seed-study/README.md, one
# unseeded run per method, tuned on the test set. TWN paper: Li et al., arXiv 1605.04711, LeNet-5 on MNIST.
SEED_STUDY = {"fp": 98.96, "twn": 95.46, "ttq": 94.60, "admm": 98.67}
TWN_PAPER = {"fp": 99.41, "twn": 99.35}


def comparison_table(stats: dict) -> str:
    rows = [[label(mode), pm(s["test_acc"]), fmt(SEED_STUDY.get(mode, math.nan)) if mode in SEED_STUDY else "—",
             fmt(TWN_PAPER[mode]) if mode in TWN_PAPER else "—"] for mode, s in stats.items()]
    return markdown(["Method", "This study: test acc. (%)", "Seed study (%)", "TWN paper (%)"], rows)


def _knob_text(config: dict, defaults: dict) -> str:
    """A candidate config as the flags in which it differs from the defaults."""
    flat = lambda c: {**{k: v for k, v in c.items() if k != "hyperparams"}, **c["hyperparams"]}
    mine, base = flat(config), flat(defaults)
    changed = [f"{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"{k.replace('_', '-')} {v}"
               for k, v in mine.items() if base.get(k) != v]
    return "defaults" if not changed else ", ".join(changed)


def confirm_table(results_dir) -> str:
    """The confirmation stage (quant/confirm.py): each candidate's full-length validation accuracy over seeds,
    its paired difference from the defaults ± one standard error, and the one-standard-error choice."""
    summary = read_json(Path(results_dir) / "tuning" / "confirm_summary.json") or {}
    rows = []
    for mode in sorted(summary, key=mode_key):
        for precision, entry in summary[mode].items():
            if len(entry["candidates"]) < 2:  # the defaults alone: runs for the precision table
                continue
            defaults = next(c for c in entry["candidates"] if c.get("defaults"))["config"]
            for c in sorted(entry["candidates"], key=lambda c: not c.get("defaults")):
                chosen = "**chosen**" if c["config"] == entry["config"] else ""
                diff = "—" if c.get("defaults") else f"{c['diff_vs_defaults']:+.2f} ± {c['diff_se']:.2f}"
                rows.append([label(mode), precision, _knob_text(c["config"], defaults), str(len(c["val_accs"])),
                             f"{c['mean']:.2f} ± {c['std']:.2f}", diff, chosen])
    if not rows:
        return "*No confirmation runs yet: `python tune_hyperparams.py --mode all --confirm K`.*"
    return markdown(["Method", "Precision", "Candidate (vs defaults)", "Seeds", "Val accuracy (%)",
                     "Δ vs defaults (pp) ± SE", "Choice"], rows, "lllrrrl")


def precision_table(results_dir) -> str:
    """bf16 against FP32 training of each mode's defaults on the validation split, paired on seeds."""
    summary = read_json(Path(results_dir) / "tuning" / "confirm_summary.json") or {}
    rows = []
    for mode in sorted(summary, key=mode_key):
        runs = {}
        for precision in ("fp32", "bf16"):
            entry = summary[mode].get(precision)
            default = entry and next((c for c in entry["candidates"] if c.get("defaults")), None)
            if default:
                runs[precision] = dict(zip(entry["seeds"], default["val_accs"]))
        if len(runs) < 2:
            continue
        seeds = sorted(set(runs["fp32"]) & set(runs["bf16"]))
        fp32, bf16 = [runs["fp32"][s] for s in seeds], [runs["bf16"][s] for s in seeds]
        d = paired_seeds(bf16, fp32)
        verdict = ("within noise (interval contains 0)" if d["low"] <= 0 <= d["high"] else
                   "bf16 higher" if d["low"] > 0 else "bf16 lower") if not math.isnan(d["low"]) else NA
        rows.append([label(mode), str(len(seeds)), pm(fp32), pm(bf16), f"{d['mean']:+.2f}",
                     f"[{fmt(d['low'], '+.2f')}, {fmt(d['high'], '+.2f')}]", p_value(d["p"]), verdict])
    if not rows:
        return ("*No paired precision runs yet: `python tune_hyperparams.py --mode all --confirm 0 --precision fp32` "
                "and `... --precision bf16`.*")
    return markdown(["Method", "Seeds", "FP32 val (%)", "bf16 val (%)", "bf16 − FP32 (pp)", "95 % CI", "paired-t p",
                     "Verdict"], rows, "lrrrrrrl")


def speed_table(results_dir) -> str:
    """Training throughput and the benchmark's ratios against their bars, from results/benchmarks.json."""
    bench = read_json(Path(results_dir) / "benchmarks.json")
    if not bench:
        return "*No benchmark yet: `python benchmarks/bench.py --data-dir ../shared/mnist`.*"
    rows = []
    for key, name in (("floor", "floor (fwd + bwd + Adam, one batch in memory)"), ("real_epoch", "real epoch")):
        for precision, suffix in (("FP32", ""), ("bf16", "_bf16")):
            for what, r in bench.get(key + suffix, {}).items():
                label_ = f"{name}, batch {what}" if key == "floor" else f"{name}, {label(what)}"
                rows.append([label_, precision, f"{r['images_per_s']:,.0f}", f"{r['ms_per_step']:.1f}"])
    if "naive" in bench:
        rows.append(["naive torchvision DataLoader epoch", "FP32", f"{bench['naive']['images_per_s']:,.0f}",
                     f"{bench['naive']['ms_per_step']:.1f}"])
    table = markdown(["Measurement (fastest of the rounds)", "Precision", "img/s", "ms/step"], rows, "llrr")
    rows = []
    for name, r in bench.get("ratios", {}).items():
        values = r["value"] if isinstance(r["value"], dict) else {"": r["value"]}
        for key, value in values.items():
            rounds = [v[key] if key else v for v in r.get("per_round", [])]
            spread = f"{min(rounds):.2f}–{max(rounds):.2f}" if rounds else "—"
            ok = value <= r["bar"] if r["bar_is"] == "max" else value >= r["bar"]
            rows.append([f"{name} {label(key) if key else ''}".strip(), f"{value:.2f}", spread,
                         f"{'≤' if r['bar_is'] == 'max' else '≥'} {r['bar']:g}", "yes" if ok else "**no**"])
    runs = {p: read_json(Path(results_dir) / "speed" / f"seed0_{p}.json") for p in ("fp32", "auto")}
    if all(runs.values()):  # reproduce.py --seeds 0 at each precision, one run after the other
        value = runs["auto"]["seconds_total"] / runs["fp32"]["seconds_total"]
        rows.append([f"reproduce.py --seeds 0 wall time, default precision / FP32 "
                     f"({runs['auto']['seconds_total']:.0f} s / {runs['fp32']['seconds_total']:.0f} s)",
                     f"{value:.2f}", "—", "≤ 0.7", "yes" if value <= 0.7 else "**no**"])
    m = bench["machine"]
    ratios = markdown(["Ratio", "Median of rounds", "Rounds min–max", "Bar", "Met"], rows, "lrrll")
    return (f"{table}\n\n{ratios}\n\n*{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, "
            f"{m['torch_threads']} threads, device {m['device']}, {bench['rounds']} rounds.*")


def tables(results_dir, tag: str = "study") -> dict:
    """{marker name: markdown} for every generated table."""
    stats = summarize(results_dir, tag)
    return {"results_table": results_table(stats), "seeds_table": seeds_table(stats),
            "deployment_table": deployment_table(stats), "layers_table": layers_table(layer_stats(results_dir, tag)),
            "config_table": config_table(results_dir, tag), "setup_table": setup_table(results_dir),
            "comparison_table": comparison_table(stats), "paired_table": paired_table(results_dir, tag),
            "confirm_table": confirm_table(results_dir), "precision_table": precision_table(results_dir),
            "speed_table": speed_table(results_dir)}


TABLES = ("results_table", "seeds_table", "deployment_table", "layers_table", "config_table", "setup_table",
          "comparison_table", "paired_table", "confirm_table", "precision_table", "speed_table")


def fill(text: str, generated: dict) -> str:
    """`text` with the body of each known marker pair replaced by its table (others left as they are)."""
    def replace(m):
        name = m["name"]
        if name not in generated:
            return m[0]
        return f"<!-- BEGIN:{name} -->\n{generated[name]}\n<!-- END:{name} -->"
    return MARKER.sub(replace, text)


def marker_names(text: str) -> list[str]:
    return [m["name"] for m in MARKER.finditer(text)]


def refresh(documents, results_dir="results", tag: str = "study") -> list[Path]:
    """Rewrite the generated tables in each existing document; returns the documents that changed.

    Raises NoResults if results_dir has no `tag` rows (documents are then left untouched).
    """
    generated = tables(results_dir, tag)
    changed = []
    for doc in map(Path, documents):
        if not doc.exists():
            continue
        text = doc.read_text(encoding="utf-8")
        new = fill(text, generated)
        if new != text:
            atomic_write_text(doc, new)
            changed.append(doc)
    return changed
