"""The study's numbers, read from results/ only, and the markdown tables of report.md and README.md.

A table lives in a document between `<!-- BEGIN:name -->` and `<!-- END:name -->`; `refresh` rewrites the body of
every pair named by `tables` and nothing else, so prose is never touched and a second run changes nothing.
Intervals are 95 % Student-t intervals of a mean over seeds; methods are compared paired on seeds (t-interval of the
per-seed differences) and on test images (McNemar's exact test per seed), see quant.stats.
"""
import itertools
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from .files import atomic_write_text
from .results import ResultsError, read_results
from .stats import CONFIDENCE, mcnemar_exact, paired_seeds, t_interval

MODE_ORDER = ("fp", "twn", "ttq", "admm")  # quant.methods.METHODS' order (importing it would pull in torch)
LABELS = {"fp": "FP32", "twn": "TWN", "ttq": "TTQ", "admm": "ADMM"}
LAYERS = ("conv1", "conv2", "fc1", "fc2")
MARKER = re.compile(r"<!-- BEGIN:(?P<name>[\w.-]+) -->(?P<body>.*?)<!-- END:(?P=name) -->", re.S)
NA = "n/a"
MAX_PREDICTIONS_BYTES = 1 << 20  # a predictions file holds 10,000 uint8 classes (~10 KB); refuse anything huge
# The deployment.csv columns of a checkpoint's "total" row that summarize keeps, and their deployment_table header.
TOTALS = {"file_bytes_2bit": "2-bit file (B)", "file_bytes_base3": "Base-3 file (B)",
          "file_bytes_entropy": "Entropy file (B)", "file_bytes_onnx": "ONNX file (B)", "bytes_2bit": "Codes 2-bit (B)",
          "bytes_base3": "Codes base-3 (B)", "bytes_entropy": "Codes entropy-coded (B)",
          "order0_bytes": "Order-0 bound (B)", "bits_per_weight_entropy": "Entropy code (bit/weight)",
          "order0_bits": "Order-0 bound (bit/weight)", "fp32_state_dict_bytes": "FP32 state_dict (B)",
          "zero_fraction": None}
# Published reference points, never recomputed: the seed study's README table (one unseeded run per method, tuned
# on the test set) and the TWN paper (Li et al., arXiv 1605.04711, LeNet-5 on MNIST).
SEED_STUDY = {"fp": 98.96, "twn": 95.46, "ttq": 94.60, "admm": 98.67}
TWN_PAPER = {"fp": 99.41, "twn": 99.35}


class NoResults(ValueError):
    """results/ lacks what a table or figure needs (no rows for the requested tag, or an input file)."""


def label(mode: str) -> str:
    return LABELS.get(mode, mode.upper())


def mode_key(mode: str):
    return (MODE_ORDER.index(mode), "") if mode in MODE_ORDER else (len(MODE_ORDER), mode)


def seed_key(seed) -> str:
    return str(seed).zfill(8)


def number(value) -> float:
    """A CSV cell as float; empty or unparsable cells are NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def mean(values):
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def std(values):  # sample standard deviation (n - 1)
    values = [v for v in values if not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else math.nan


def read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


def study_rows(results_dir, tag: str = "study", required: bool = False) -> list[dict]:
    """Latest results.csv row per (mode, seed) with `tag` (file order = age), ordered by mode then seed. NoResults if
    results.csv is unreadable, or, with `required`, has no such rows."""
    path = Path(results_dir) / "results.csv"
    try:
        rows = read_results(path)[1]
    except ResultsError as e:
        raise NoResults(str(e)) from None
    latest = {(r["mode"], r.get("seed", "")): r for r in rows if (r.get("tag") or "") == tag and r.get("mode")}
    if required and not latest:
        raise NoResults(f"{path} has no rows tagged {tag!r}")
    return [latest[k] for k in sorted(latest, key=lambda k: (mode_key(k[0]), seed_key(k[1])))]


def deployment_rows(results_dir, rows: list[dict]) -> list[dict]:
    wanted = {r.get("checkpoint") for r in rows}
    return [d for d in read_results(Path(results_dir) / "deployment.csv")[1] if d.get("checkpoint") in wanted]


def summarize(results_dir, tag: str = "study") -> dict:
    """{mode: {key: [per seed]}} of the latest `tag` runs (NoResults if none): seeds, accuracies, TOTALS columns,
    mismatches, size (bytes deployed: the 2-bit file; FP: the FP32 state_dict) and compression (FP32 / size)."""
    rows = study_rows(results_dir, tag, required=True)
    totals = [d for d in deployment_rows(results_dir, rows) if d.get("layer") == "total"]
    out = {}
    for row in rows:
        s = out.setdefault(row["mode"], defaultdict(list))
        s["seeds"].append(row.get("seed", ""))
        for key in ("test_acc", "val_acc", "train_seconds"):
            s[key].append(number(row.get(key)))
        if dep := next((d for d in totals if d.get("checkpoint") == row.get("checkpoint")), None):
            for col in TOTALS:
                s[col].append(number(dep.get(col)))
            s["mismatches"].append(sum(number(v or 0) for k, v in dep.items() if k.startswith("mismatches_")))
            s["size"].append(s["file_bytes_2bit"][-1])
            s["compression"].append(s["fp32_state_dict_bytes"][-1] / s["file_bytes_2bit"][-1])
        elif row["mode"] == "fp" and totals:
            # FP ships as its FP32 state_dict; same architecture, so any packed checkpoint's figure is its size.
            fp32 = mean([number(d.get("fp32_state_dict_bytes")) for d in totals])
            s["fp32_state_dict_bytes"].append(fp32)
            s["size"].append(fp32)
            s["compression"].append(1.0)
    return out


def read_classes(path) -> tuple[np.ndarray | None, str]:
    """(class indices, "") from a predictions .npy file (1-D uint8, values 0-9), or (None, why not)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_PREDICTIONS_BYTES:
            return None, f"{path.name} is over {MAX_PREDICTIONS_BYTES:,} bytes"
        values = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None, f"no {path.name}"
    except (OSError, ValueError, EOFError) as e:
        return None, f"{path.name} is unreadable ({e})"
    if values.dtype != np.uint8 or values.ndim != 1 or (values.size and values.max() > 9):
        return None, f"{path.name} is not a 1-D uint8 array of classes 0-9"
    return values, ""


def predictions(results_dir, rows: list[dict]) -> tuple[dict, list[str]]:
    """({(mode, seed): per-image correctness}, [why each other run is left out]).

    A run counts only if results/predictions/{mode}_seed{s}.npy matches test_labels.npy in length and gives
    results.csv's test accuracy, so a file left over from another run of the same name is never paired.
    """
    folder = Path(results_dir) / "predictions"
    labels, why = read_classes(folder / "test_labels.npy")
    if labels is None:
        return {}, [why]
    correct, left_out = {}, []
    for row in rows:
        mode, seed = row["mode"], row.get("seed", "")
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
    """{layer: {"weights", "fp32_bytes", "bytes_2bit", "bytes_base3": one number, and "zero_fraction", "order0_bytes",
    "bytes_entropy": {mode: [per seed]}}}: deployment.csv's columns for the latest `tag` runs (NoResults if none)."""
    out = {}
    for d in deployment_rows(results_dir, study_rows(results_dir, tag, required=True)):
        if d.get("layer") in LAYERS and (d.get("ternary") or "True") == "True":
            s = out.setdefault(d["layer"], {k: number(d.get(k)) for k in ("weights", "fp32_bytes", "bytes_2bit",
                                                                          "bytes_base3")})
            for key in ("zero_fraction", "order0_bytes", "bytes_entropy"):
                s.setdefault(key, {}).setdefault(d.get("mode", "?"), []).append(number(d.get(key)))
    return {k: out[k] for k in LAYERS if k in out}


def fmt(value, spec: str = ".2f") -> str:
    return NA if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def p_value(p) -> str:
    return NA if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def interval(low, high, spec: str) -> str:
    return NA if math.isnan(low) else f"[{fmt(low, spec)}, {fmt(high, spec)}]"


def pm(values, spec: str = ".2f") -> str:
    """'mean ± std' (sample std over seeds), or the mean alone for one seed."""
    m, s = mean(values), std(values)
    return NA if math.isnan(m) else fmt(m, spec) if math.isnan(s) else f"{fmt(m, spec)} ± {fmt(s, spec)}"


def markdown(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    rule = ["---:" if a == "r" else ":---" for a in align or "l" + "r" * (len(header) - 1)]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows])


def results_table(stats: dict) -> str:
    fp = mean(stats["fp"]["test_acc"]) if "fp" in stats else math.nan
    rows = [[label(mode), str(len(s["seeds"])), pm(s["test_acc"]), interval(*t_interval(s["test_acc"])[1:], ".2f"),
             "baseline" if mode == "fp" else fmt(mean(s["test_acc"]) - fp, "+.2f"), fmt(mean(s["size"]) / 1024, ",.1f"),
             fmt(mean(s["compression"]), ".1f") + "×" if s["compression"] else NA,
             "—" if mode == "fp" else pm([100 * z for z in s["zero_fraction"]], ".1f")] for mode, s in stats.items()]
    return markdown(["Method", "Seeds", "Test accuracy (%)", f"{100 * CONFIDENCE:.0f} % CI of the mean (%)",
                     "Δ vs FP32 (pp)", "Deployed size (KiB)", "Compression vs FP32", "Zero codes (%)"], rows)


def seeds_table(stats: dict) -> str:
    seeds = sorted({seed for s in stats.values() for seed in s["seeds"]}, key=seed_key)
    rows = [[label(mode), *[fmt(dict(zip(s["seeds"], s["test_acc"])).get(seed, math.nan)) for seed in seeds],
             pm(s["val_acc"]), fmt(mean(s["train_seconds"]), ".1f")] for mode, s in stats.items()]
    return markdown(["Method", *[f"Test acc. seed {seed} (%)" for seed in seeds], "Validation acc. (%)",
                     "Training time per run (s)"], rows)


def deployment_table(stats: dict) -> str:
    columns = {col: header for col, header in TOTALS.items() if header}
    rows = [[label(mode), *(fmt(mean(s[col]), ".3f" if "bit/weight" in header else ",.0f")
                            for col, header in columns.items()),
             fmt(sum(s["mismatches"]), ".0f")] for mode, s in stats.items() if mode != "fp" and s["file_bytes_2bit"]]
    if not rows:
        return "*No deployment files yet: run `python reproduce.py` (or `deployment_compression.py --verify`).*"
    return markdown(["Method", *columns.values(), "Packed ≠ checkpoint predictions"], rows)


def layers_table(layers: dict) -> str:
    if not layers:
        return "*No deployment files yet: run `python reproduce.py`.*"
    modes = sorted({m for s in layers.values() for m in s["zero_fraction"]}, key=mode_key)
    rows = [[name, *(fmt(s[k], ",.0f") for k in ("weights", "fp32_bytes", "bytes_2bit", "bytes_base3")),
             *[pm([100 * z for z in s["zero_fraction"].get(m, [])], ".1f") for m in modes]]
            for name, s in layers.items()]
    return markdown(["Layer", "Weights", "FP32 (B)", "2-bit (B)", "Base-3 (B)",
                     *[f"{label(m)} zero codes (%)" for m in modes]], rows)


def paired_table(results_dir, tag: str = "study") -> str:
    """Each ternary method against FP32 and each pair of ternary methods, paired on the seeds both ran: mean
    difference, its t-interval and paired-t p, per seed the images only A / only B gets right and McNemar's exact p,
    and a verdict read off the interval alone."""
    correct, left_out = predictions(results_dir, study_rows(results_dir, tag))
    if not correct:
        why = f" ({left_out[0]})" if left_out else ""
        return f"*No per-image test predictions in results/predictions/{why}: run `python reproduce.py`.*"
    modes = sorted({m for m, _ in correct}, key=mode_key)
    ternary = [m for m in modes if m != "fp"]
    rows, most = [], 0
    for a, b in [(m, "fp") for m in ternary if "fp" in modes] + list(itertools.combinations(ternary, 2)):
        seeds = sorted({s for m, s in correct if m == a} & {s for m, s in correct if m == b}, key=seed_key)
        most = max(most, len(seeds))
        tests = [mcnemar_exact(correct[(a, s)], correct[(b, s)]) for s in seeds]
        d = paired_seeds([100 * correct[(a, s)].mean() for s in seeds], [100 * correct[(b, s)].mean() for s in seeds])
        verdict = ("needs ≥ 2 seeds" if math.isnan(d["low"]) else f"{label(a)} higher: interval excludes 0"
                   if d["low"] > 0 else f"{label(b)} higher: interval excludes 0" if d["high"] < 0
                   else "not resolved: interval includes 0")
        rows.append([f"{label(a)} − {label(b)}", str(len(seeds)), fmt(d["mean"], "+.3f"),
                     interval(d["low"], d["high"], "+.3f"), p_value(d["p"]),
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
    grouped = itertools.groupby(study_rows(results_dir, tag), key=lambda r: r["mode"])  # rows come in mode order
    join = lambda values: ", ".join(dict.fromkeys(values))  # noqa: E731  (distinct values in order)
    rows = [[label(mode), *(join(str(r.get(k) or "") for r in runs) or NA
                            for k in ("lr", "batch_size", "schedule", "shift", "epochs")),
             join(", ".join(f"{k}={v}" for k, v in json.loads(r.get("hyperparams") or "{}").items()) for r in runs)
             or "—"] for mode, runs in ((m, list(g)) for m, g in grouped)]
    return markdown(["Method", "Peak lr", "Batch", "Schedule", "Shift (px)", "Epochs", "Method hyperparameters"],
                    rows, "lrrlrrl")


def setup_table(results_dir) -> str:
    info = read_json(Path(results_dir) / "study.json")
    if not info:
        return "*No results/study.json yet: run `python reproduce.py`.*"
    plan, get = info.get("plan", {}), lambda k: info.get(k, NA)
    rows = [["Command", f"`{get('command')}`"], ["CPU (lscpu model name)", str(get("cpu"))],
            ["Logical CPUs / worker processes / torch threads per run",
             f"{get('logical_cpus')} / {info.get('workers', 1)} / {get('torch_threads')}"],
            ["torch / Python", f"{get('torch')} / {get('python')}"], ["Device", str(get("device"))],
            ["Seeds", " ".join(map(str, plan.get("seeds", []))) or NA],
            ["Validation images (random split per seed)", fmt(plan.get("val_size"), ",d")],
            ["Training images", "all remaining" if plan.get("train_subset") is None else fmt(plan["train_subset"], ",d")],
            ["Wall-clock, train + evaluate + pack (s)", fmt(info.get("seconds_train_eval_pack"), ".0f")],
            ["Wall-clock, whole reproduce.py run (s)", fmt(info.get("seconds_total"), ".0f")]]
    return markdown(["Setting", "Value"], rows, "ll")


def comparison_table(stats: dict) -> str:
    rows = [[label(mode), pm(s["test_acc"]), *(fmt(ref[mode]) if mode in ref else "—" for ref in (SEED_STUDY, TWN_PAPER))]
            for mode, s in stats.items()]
    return markdown(["Method", "This study: test acc. (%)", "Seed study (%)", "TWN paper (%)"], rows)


def confirm_table(results_dir) -> str:
    """The confirmation stage (quant/confirm.py): each candidate's full-length validation accuracy over seeds,
    its paired difference from the defaults ± one standard error, and the one-standard-error choice."""
    summary = read_json(Path(results_dir) / "tuning" / "confirm_summary.json") or {}
    flat = lambda c: {**{k: v for k, v in c.items() if k != "hyperparams"}, **c["hyperparams"]}  # noqa: E731
    rows = []
    for mode in sorted(summary, key=mode_key):
        for precision, entry in summary[mode].items():
            if len(entry["candidates"]) < 2:  # the defaults alone: runs for the precision table
                continue
            defaults = flat(next(c for c in entry["candidates"] if c.get("defaults"))["config"])
            for c in sorted(entry["candidates"], key=lambda c: not c.get("defaults")):
                changed = ", ".join(f"{k.replace('_', '-')} {format(v, 'g') if isinstance(v, float) else v}"
                                    for k, v in flat(c["config"]).items() if defaults.get(k) != v)
                rows.append([label(mode), precision, changed or "defaults", str(len(c["val_accs"])),
                             f"{c['mean']:.2f} ± {c['std']:.2f}",
                             "—" if c.get("defaults") else f"{c['diff_vs_defaults']:+.2f} ± {c['diff_se']:.2f}",
                             "**chosen**" if c["config"] == entry["config"] else ""])
    if not rows:
        return "*No confirmation runs yet: `python tune_hyperparams.py --mode all --confirm K`.*"
    return markdown(["Method", "Precision", "Candidate (vs defaults)", "Seeds", "Val accuracy (%)",
                     "Δ vs defaults (pp) ± SE", "Choice"], rows, "lllrrrl")


def precision_table(results_dir) -> str:
    """bf16 against FP32 training of each mode's defaults on the validation split, paired on seeds."""
    summary = read_json(Path(results_dir) / "tuning" / "confirm_summary.json") or {}
    rows = []
    for mode in sorted(summary, key=mode_key):
        runs = {p: dict(zip(e["seeds"], c["val_accs"])) for p in ("fp32", "bf16") if (e := summary[mode].get(p))
                for c in e["candidates"] if c.get("defaults")}
        if len(runs) < 2:
            continue
        seeds = sorted(set(runs["fp32"]) & set(runs["bf16"]))
        fp32, bf16 = [runs["fp32"][s] for s in seeds], [runs["bf16"][s] for s in seeds]
        d = paired_seeds(bf16, fp32)
        verdict = NA if math.isnan(d["low"]) else ("within noise (interval contains 0)" if d["low"] <= 0 <= d["high"]
                                                   else "bf16 higher" if d["low"] > 0 else "bf16 lower")
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
    runs = [(f"floor (fwd + bwd + Adam, one batch in memory), batch {what}" if key == "floor" else
             f"real epoch, {label(what)}", precision, r)
            for key in ("floor", "real_epoch") for precision, suffix in (("FP32", ""), ("bf16", "_bf16"))
            for what, r in bench.get(key + suffix, {}).items()]
    runs += [("naive torchvision DataLoader epoch", "FP32", bench["naive"])] if "naive" in bench else []
    table = markdown(["Measurement (fastest of the rounds)", "Precision", "img/s", "ms/step"],
                     [[name, precision, f"{r['images_per_s']:,.0f}", f"{r['ms_per_step']:.1f}"]
                      for name, precision, r in runs], "llrr")
    ratios = dict(bench.get("ratios", {}))
    wall = {p: read_json(Path(results_dir) / "speed" / f"seed0_{p}.json") for p in ("fp32", "auto")}
    if all(wall.values()):  # reproduce.py --seeds 0 at each precision, one run after the other
        auto, fp32 = wall["auto"]["seconds_total"], wall["fp32"]["seconds_total"]
        ratios[f"reproduce.py --seeds 0 wall time, default precision / FP32 ({auto:.0f} s / {fp32:.0f} s)"] = {
            "value": auto / fp32, "bar": 0.7, "bar_is": "max"}
    rows = []
    for name, r in ratios.items():
        for key, value in (r["value"] if isinstance(r["value"], dict) else {"": r["value"]}).items():
            rounds = [v[key] if key else v for v in r.get("per_round", [])]
            met = value <= r["bar"] if r["bar_is"] == "max" else value >= r["bar"]
            rows.append([f"{name} {label(key) if key else ''}".strip(), f"{value:.2f}",
                         f"{min(rounds):.2f}–{max(rounds):.2f}" if rounds else "—",
                         f"{'≤' if r['bar_is'] == 'max' else '≥'} {r['bar']:g}", "yes" if met else "**no**"])
    m = bench["machine"]
    ratios = markdown(["Ratio", "Median of rounds", "Rounds min–max", "Bar", "Met"], rows, "lrrll")
    return (f"{table}\n\n{ratios}\n\n*{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, "
            f"{m['torch_threads']} threads, device {m['device']}, {bench['rounds']} rounds.*")


def tables(results_dir, tag: str = "study") -> dict:
    stats = summarize(results_dir, tag)
    return {"results_table": results_table(stats), "seeds_table": seeds_table(stats),
            "deployment_table": deployment_table(stats), "layers_table": layers_table(layer_stats(results_dir, tag)),
            "config_table": config_table(results_dir, tag), "setup_table": setup_table(results_dir),
            "comparison_table": comparison_table(stats), "paired_table": paired_table(results_dir, tag),
            "confirm_table": confirm_table(results_dir), "precision_table": precision_table(results_dir),
            "speed_table": speed_table(results_dir)}


def refresh(documents, results_dir="results", tag: str = "study") -> list[Path]:
    """Rewrite the tables in each existing document; returns those changed (NoResults, nothing touched: no rows)."""
    generated, changed = tables(results_dir, tag), []
    for doc in (Path(d) for d in documents if Path(d).exists()):
        text = doc.read_text(encoding="utf-8")
        new = MARKER.sub(lambda m: f"<!-- BEGIN:{m['name']} -->\n{generated[m['name']]}\n<!-- END:{m['name']} -->"
                         if m["name"] in generated else m[0], text)
        if new != text:
            atomic_write_text(doc, new)
            changed.append(doc)
    return changed
