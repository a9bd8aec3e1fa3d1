"""quant/report.py: the study's numbers are read from results/ only, every number the generated tables print
is recomputed here by another route (pandas; scipy's paired t-test; McNemar p-values as brute-force binomial
sums) and compared cell by cell, refreshing is idempotent and never touches prose, and the committed report.md
agrees with the committed results/."""
import csv
import itertools
import json
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import REPO, call_script
from quant import report
from quant.checkpoint import load_checkpoint
from quant.data import load_mnist
from quant.engine import evaluate
from quant.export import rebuild_model
from quant.results import append_result

MODES = ("fp", "twn", "ttq", "admm")
SEEDS = (0, 1)
LAYER_WEIGHTS = {"conv1": 800, "conv2": 51200, "fc1": 524288, "fc2": 5120}
LABEL_TO_MODE = {"FP32": "fp", "TWN": "twn", "TTQ": "ttq", "ADMM": "admm"}
N_TEST = 10_000
# Published numbers the comparison table cites: the seed study's README table and TWN paper, LeNet-5 on MNIST.
TABLES = ("results_table", "seeds_table", "deployment_table", "layers_table", "config_table", "setup_table",
          "comparison_table", "paired_table", "confirm_table", "precision_table", "speed_table")
SEED_STUDY = {"fp": 98.96, "twn": 95.46, "ttq": 94.60, "admm": 98.67}
TWN_PAPER = {"fp": 99.41, "twn": 99.35}


# ---------------------------------------------------------------- a synthetic results/ folder

def entropy(p):
    p = np.asarray([v for v in p if v > 0])
    return float(-(p * np.log2(p)).sum())


def write_csv(path, rows):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def fake_predictions(rng, labels, hard, accuracy) -> np.ndarray:
    """Test predictions with about `accuracy` % right; errors favour the shared `hard` images, as real models' do."""
    weights = np.ones(len(labels))
    weights[hard] = 50.0
    wrong = rng.choice(len(labels), round(len(labels) * (100 - accuracy) / 100), replace=False, p=weights / weights.sum())
    preds = labels.copy()
    preds[wrong] = (labels[wrong] + rng.integers(1, 10, len(wrong))) % 10
    return preds.astype(np.uint8)


def make_results(root, modes=MODES, seeds=SEEDS, epochs=3, weights=True, deployment=True, predictions=True) -> Path:
    """A results folder as reproduce.py writes it, with made-up but plausible numbers (seeded).

    With `predictions`, results/predictions/ holds test labels and each run's predictions, and results.csv's
    test_acc is the accuracy those predictions give (as evaluation writes both).
    """
    rng = np.random.default_rng(7)
    results = Path(root) / "results"
    (results / "history").mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, 10, N_TEST).astype(np.uint8)
    hard = rng.choice(N_TEST, 150, replace=False)
    if predictions:
        (results / "predictions").mkdir()
        np.save(results / "predictions" / "test_labels.npy", labels)
    # noise the readers must ignore: an untagged eval.py row and a quick-run row
    append_result(results / "results.csv", {"mode": "twn", "tag": "", "seed": 0, "test_acc": 12.5,
                                            "checkpoint": "checkpoints/twn.pth"})
    append_result(results / "results.csv", {"mode": "fp", "tag": "quick", "seed": 0, "test_acc": 50.0,
                                            "checkpoint": "checkpoints/quick_fp_seed0.pth"})
    hp = {"fp": {}, "twn": {"delta_factor": 0.7, "per_channel": False}, "ttq": {"scale_lr": 0.1, "t": 0.05},
          "admm": {"admm_rounds": 46, "finetune_frac": 0.1, "rho": 0.001, "rho_growth": 1.5}}
    deploy = []
    for seed in seeds:
        for mode in modes:
            ckpt = f"checkpoints/{mode}_seed{seed}.pth"
            base = {"fp": 99.0, "twn": 98.6, "ttq": 98.2, "admm": 98.4}.get(mode, 97.0)
            row = {"mode": mode, "checkpoint": ckpt, "tag": "study", "seed": seed, "epochs": epochs, "lr": 0.003,
                   "batch_size": 128, "schedule": "onecycle", "keep_fp": "", "hyperparams": json.dumps(hp[mode], sort_keys=True),
                   "val_acc": round(base + rng.normal(0, 0.2), 4), "train_seconds": round(30 + rng.random() * 20, 2)}
            if mode == "twn" and seed == 0:  # an older study row of the same run, superseded by the next one
                append_result(results / "results.csv", {**row, "test_acc": 10.0})
            accuracy = base + rng.normal(0, 0.15)
            if predictions:
                preds = fake_predictions(rng, labels, hard, accuracy)
                np.save(results / "predictions" / f"{mode}_seed{seed}.npy", preds)
                accuracy = 100 * float(np.mean(preds == labels))
            append_result(results / "results.csv", {**row, "test_acc": round(accuracy, 4)})
            history = []
            for epoch in range(1, epochs + 1):
                h = {"epoch": epoch, "train_loss": 0.5 / epoch, "train_acc": 90 + epoch, "val_loss": 0.3 / epoch,
                     "val_acc": base - 1 / epoch, "lr": 1e-3, "seconds": 30.0}
                if mode == "admm":
                    h.update(primal_residual=0.5 / epoch ** 2, rho=1e-3 * 1.5 ** (4 * epoch))
                history.append(h)
            write_csv(results / "history" / f"{mode}_seed{seed}.csv", history)
            if weights:
                write_weights(results / "weights" / f"{mode}_seed{seed}.json", mode, seed, rng)
            if mode == "fp":
                continue
            layers = []
            for name, n in LAYER_WEIGHTS.items():
                zero = float(np.clip(rng.normal({"twn": 0.38, "ttq": 0.04, "admm": 0.36}.get(mode, 0.3), 0.01), 0, 1))
                h = entropy([zero, (1 - zero) / 2, (1 - zero) / 2])
                coded = int(n * h / 8 * (0.8 + 0.25 * zero)) + 40  # no rng draw: the other columns stay as they were
                layers.append({"layer": name, "ternary": True, "weights": n, "fp32_bytes": 4 * n,
                               "bytes_2bit": -(-n // 4), "bytes_base3": -(-n // 5), "bytes_entropy": coded,
                               "zero_fraction": zero, "order0_bits": h, "order0_bytes": n * h / 8})
            total = {"layer": "total", "ternary": True}
            for key in ("weights", "fp32_bytes", "bytes_2bit", "bytes_base3", "bytes_entropy", "order0_bytes"):
                total[key] = sum(r[key] for r in layers)
            total["zero_fraction"] = sum(r["zero_fraction"] * r["weights"] for r in layers) / total["weights"]
            total["order0_bits"] = 8 * total["order0_bytes"] / total["weights"]
            for r in layers + [total]:
                r["bits_per_weight_entropy"] = 8 * r["bytes_entropy"] / r["weights"]
            summary = {"checkpoint": ckpt, "mode": mode, "checkpoint_bytes": 4_700_000,
                       "fp32_state_dict_bytes": 2_336_175, "fold_bn": True, "float_dtype": "fp32",
                       "file_2bit": ckpt.replace(".pth", ".2bit.tern"), "file_bytes_2bit": 149_156 + int(rng.integers(0, 3)),
                       "file_base3": ckpt.replace(".pth", ".base3.tern"), "file_bytes_base3": 120_087,
                       "file_bytes_entropy": total["bytes_entropy"] + 3_400, "file_bytes_onnx": 586_399,
                       "mismatches_2bit": 0, "mismatches_base3": 0, "mismatches_entropy": 0,
                       "mismatches_onnx": int(mode == "ttq" and seed == 1)}
            deploy += [{**summary, **r} for r in layers + [total]]
    if deployment:
        stale = dict(deploy[-1], checkpoint="checkpoints/twn.pth", file_bytes_2bit=1)  # not a study run
        write_csv(results / "deployment.csv", deploy + [stale])
    (results / "study.json").write_text(json.dumps({
        "command": "reproduce.py --data-dir ../shared/mnist", "cpu": "Test CPU 3000", "logical_cpus": 2,
        "torch_threads": 2, "torch": "2.14.1", "python": "3.11.2", "device": "cpu",
        "seconds_train_eval_pack": 512.3, "seconds_total": 540.7, "n_seeds": len(seeds), "plan": {"seeds": list(seeds), "val_size": 5000, "train_subset": None}}))
    return results


def write_weights(path, mode, seed, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = []
    for name, n in LAYER_WEIGHTS.items():
        w = rng.normal(0, 0.03, size=min(n, 20000))
        if mode == "admm":
            w = np.sign(w) * (np.abs(w) > 0.02) * 0.04
        limit = float(np.abs(w).max())
        counts, edges = np.histogram(w, bins=100, range=(-limit, limit))
        entry = {"layer": name, "shape": [n], "weights": n, "edges": edges.tolist(), "counts": counts.tolist(),
                 "mean_abs": float(np.abs(w).mean()), "max_abs": limit,
                 "latent_distinct": int(min(np.unique(w).size, 1000)), "ternary": mode != "fp"}
        if mode != "fp":
            delta = 0.7 * float(np.abs(w).mean())
            entry.update(delta=[delta], w_p=[0.05], w_n=[0.05], code_fractions={
                "-1": float((w < -delta).mean()), "0": float((np.abs(w) <= delta).mean()), "+1": float((w > delta).mean())})
        layers.append(entry)
    path.write_text(json.dumps({"mode": mode, "seed": seed, "bins": 100, "layers": layers}))


@pytest.fixture
def results_dir(tmp_path):
    return make_results(tmp_path)


DOC = """# Report

Some prose that mentions 98.76 as a literal and must survive.

<!-- BEGIN:results_table -->
stale
<!-- END:results_table -->

More prose.

<!-- BEGIN:seeds_table -->
<!-- END:seeds_table -->
<!-- BEGIN:deployment_table -->
<!-- END:deployment_table -->
<!-- BEGIN:layers_table -->
<!-- END:layers_table -->
<!-- BEGIN:config_table -->
<!-- END:config_table -->
<!-- BEGIN:setup_table -->
<!-- END:setup_table -->
<!-- BEGIN:comparison_table -->
<!-- END:comparison_table -->
<!-- BEGIN:paired_table -->
<!-- END:paired_table -->
<!-- BEGIN:someone_elses_block -->
hand-written, not ours
<!-- END:someone_elses_block -->
"""


# ---------------------------------------------------------------- an independent checker

def parse_tables(text: str) -> dict:
    """{marker name: list of {header: cell}} for every marker block holding a markdown table."""
    out = {}
    for m in re.finditer(r"<!-- BEGIN:([\w.-]+) -->(.*?)<!-- END:\1 -->", text, re.S):
        lines = [line.strip() for line in m.group(2).strip().splitlines() if line.strip().startswith("|")]
        if len(lines) < 2:
            continue
        cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
        header, body = cells[0], cells[2:]
        assert all(set(c) <= set(":-") for c in cells[1]), f"{m.group(1)}: second line is not a rule"
        out[m.group(1)] = [dict(zip(header, row)) for row in body]
    return out


NUMBER = re.compile(r"(<?)([-+]?\d[\d,]*(?:\.\d+)?)")


def numbers_in(cell: str) -> list[tuple[float, int, bool]]:
    """(value, decimals shown, an upper bound '<') of every number in a cell ('98.76 ± 0.05' -> two numbers)."""
    return [(float(t.replace(",", "")), len(t.split(".")[1]) if "." in t else 0, bool(lt))
            for lt, t in NUMBER.findall(cell)]


def brute_force_mcnemar(a_only: int, b_only: int) -> float:
    """Exact two-sided binomial p-value by its definition: the probability, under Binomial(n, 1/2), of every
    outcome no more likely than the observed one, summed in exact fractions."""
    n = a_only + b_only
    observed = math.comb(n, a_only)
    return float(sum(Fraction(math.comb(n, i), 2 ** n) for i in range(n + 1) if math.comb(n, i) <= observed))


def expected_paired(results_dir: Path, df: pd.DataFrame) -> dict:
    """{(row label, column): expected} of the paired table, from the .npy files read here with numpy."""
    folder = results_dir / "predictions"
    if not (folder / "test_labels.npy").exists():
        return {}
    labels = np.load(folder / "test_labels.npy")
    label = {v: k for k, v in LABEL_TO_MODE.items()}
    correct = {}
    for _, run in df.iterrows():
        path = folder / f"{run['mode']}_seed{run['seed']}.npy"
        if path.exists() and abs(100 * np.mean(np.load(path) == labels) - run["test_acc"]) < 1e-3:
            correct[(run["mode"], run["seed"])] = np.load(path) == labels
    ternary = [m for m in MODES[1:] if any(k[0] == m for k in correct)]
    out = {}
    for a, b in [(m, "fp") for m in ternary] + list(itertools.combinations(ternary, 2)):
        seeds = sorted({s for m, s in correct if m == a} & {s for m, s in correct if m == b}, key=int)
        name = f"{label[a]} − {label[b]}"
        acc_a = [100 * correct[(a, s)].mean() for s in seeds]
        acc_b = [100 * correct[(b, s)].mean() for s in seeds]
        counts = [(int((correct[(a, s)] & ~correct[(b, s)]).sum()), int((~correct[(a, s)] & correct[(b, s)]).sum()))
                  for s in seeds]
        out[(name, "Seeds")] = [len(seeds)]
        out[(name, "Mean A − B (pp)")] = [np.mean(acc_a) - np.mean(acc_b)] if seeds else None
        out[(name, "Images only A / only B right, per seed")] = [c for pair in counts for c in pair]
        out[(name, "McNemar exact p, per seed")] = [brute_force_mcnemar(*c) for c in counts]
        if len(seeds) < 2:
            out[(name, "Verdict (95 % CI)")] = "needs ≥ 2 seeds"
            continue
        test = stats.ttest_rel(acc_a, acc_b)
        low, high = test.confidence_interval(0.95)
        if np.std(np.subtract(acc_a, acc_b)) == 0:  # every seed the same difference: a point, no test
            low = high = np.mean(acc_a) - np.mean(acc_b)
        out[(name, "95 % CI (pp)")] = [low, high]
        out[(name, "p (paired t, seeds)")] = [test.pvalue]
        out[(name, "Verdict (95 % CI)")] = (f"{label[a]} higher: interval excludes 0" if low > 0 else
                                            f"{label[b]} higher: interval excludes 0" if high < 0 else
                                            "not resolved: interval includes 0")
    return out if any(v[0] >= 2 for k, v in out.items() if k[1] == "Seeds") else {}


def expected_values(results_dir: Path, tag="study") -> dict:
    """{table: {(row label, column): expected}} recomputed with pandas straight from the CSV/JSON files.

    expected is a list of floats (compared at the precision the cell shows) or a str (compared exactly).
    """
    df = pd.read_csv(results_dir / "results.csv", dtype=str, keep_default_na=False)
    if "tag" not in df:
        df["tag"] = ""
    df = df[df["tag"] == tag].drop_duplicates(["mode", "seed"], keep="last")
    for col in ("test_acc", "val_acc", "train_seconds"):
        df[col] = df[col].astype(float)
    dep = pd.read_csv(results_dir / "deployment.csv") if (results_dir / "deployment.csv").exists() else pd.DataFrame()
    if len(dep):
        dep = dep[dep["checkpoint"].isin(set(df["checkpoint"]))]
    totals = dep[dep["layer"] == "total"] if len(dep) else dep
    label = {v: k for k, v in LABEL_TO_MODE.items()}
    pair = lambda s: [s.mean(), s.std(ddof=1)] if len(s) > 1 else [s.mean()]
    fp_acc = df.loc[df["mode"] == "fp", "test_acc"].mean()
    fp32 = totals["fp32_state_dict_bytes"].mean() if len(totals) else math.nan
    exp = {"results_table": {}, "seeds_table": {}, "deployment_table": {}, "layers_table": {}, "config_table": {},
           "setup_table": {}, "comparison_table": {}, "paired_table": expected_paired(results_dir, df)}
    for mode, g in df.groupby("mode"):
        name = label[mode]
        t = totals[totals["mode"] == mode] if len(totals) else totals
        r = exp["results_table"]
        r[(name, "Seeds")] = [len(g)]
        r[(name, "Test accuracy (%)")] = pair(g["test_acc"])
        if len(g) > 1:  # (a zero spread gives scipy NaN bounds; the interval is then the mean itself)
            r[(name, "95 % CI of the mean (%)")] = ([*stats.t.interval(0.95, len(g) - 1, loc=g["test_acc"].mean(),
                                                                       scale=g["test_acc"].sem())]
                                                    if g["test_acc"].std() > 0 else [g["test_acc"].mean()] * 2)
        if mode != "fp":
            r[(name, "Δ vs FP32 (pp)")] = [g["test_acc"].mean() - fp_acc]
            r[(name, "Deployed size (KiB)")] = [t["file_bytes_2bit"].mean() / 1024]
            r[(name, "Compression vs FP32")] = [(t["fp32_state_dict_bytes"] / t["file_bytes_2bit"]).mean()]
            r[(name, "Zero codes (%)")] = pair(100 * t["zero_fraction"])
            d = exp["deployment_table"]
            for col, src in (("2-bit file (B)", "file_bytes_2bit"), ("Base-3 file (B)", "file_bytes_base3"),
                             ("Entropy file (B)", "file_bytes_entropy"), ("ONNX file (B)", "file_bytes_onnx"),
                             ("Codes 2-bit (B)", "bytes_2bit"), ("Codes base-3 (B)", "bytes_base3"),
                             ("Codes entropy-coded (B)", "bytes_entropy"), ("Order-0 bound (B)", "order0_bytes"),
                             ("Entropy code (bit/weight)", "bits_per_weight_entropy"),
                             ("Order-0 bound (bit/weight)", "order0_bits"),
                             ("FP32 state_dict (B)", "fp32_state_dict_bytes")):
                d[(name, col)] = [t[src].mean()] if src in t else report.NA  # a column older files lack
            d[(name, "Packed ≠ checkpoint predictions")] = [t.filter(like="mismatches_").to_numpy().sum()]
        else:
            r[(name, "Deployed size (KiB)")] = [fp32 / 1024]
            r[(name, "Compression vs FP32")] = [1.0]
        s = exp["seeds_table"]
        for _, run in g.iterrows():
            s[(name, f"Test acc. seed {run['seed']} (%)")] = [run["test_acc"]]
        s[(name, "Validation acc. (%)")] = pair(g["val_acc"])
        s[(name, "Training time per run (s)")] = [g["train_seconds"].mean()]
        cmp = exp["comparison_table"]
        cmp[(name, "This study: test acc. (%)")] = pair(g["test_acc"])
        if mode in SEED_STUDY:
            cmp[(name, "Seed study (%)")] = [SEED_STUDY[mode]]
        if mode in TWN_PAPER:
            cmp[(name, "TWN paper (%)")] = [TWN_PAPER[mode]]
        c = exp["config_table"]
        c[(name, "Peak lr")] = ", ".join(dict.fromkeys(g["lr"]))
        c[(name, "Batch")] = ", ".join(dict.fromkeys(g["batch_size"]))
        c[(name, "Schedule")] = ", ".join(dict.fromkeys(g["schedule"]))
        c[(name, "Epochs")] = ", ".join(dict.fromkeys(g["epochs"]))
        shifts = g["shift"].fillna("").astype(str) if "shift" in g else []
        c[(name, "Shift (px)")] = ", ".join(dict.fromkeys(v for v in shifts if v)) or "n/a"
        c[(name, "Method hyperparameters")] = ", ".join(dict.fromkeys(
            ", ".join(f"{k}={v}" for k, v in json.loads(h).items()) for h in g["hyperparams"])) or "—"
    if len(dep):
        layers = dep[dep["layer"] != "total"]
        for name, g in layers.groupby("layer"):
            lt = exp["layers_table"]
            lt[(name, "Weights")] = [g["weights"].iloc[0]]
            lt[(name, "FP32 (B)")] = [g["fp32_bytes"].iloc[0]]
            lt[(name, "2-bit (B)")] = [g["bytes_2bit"].iloc[0]]
            lt[(name, "Base-3 (B)")] = [g["bytes_base3"].iloc[0]]
            for mode, gm in g.groupby("mode"):
                lt[(name, f"{label[mode]} zero codes (%)")] = pair(100 * gm["zero_fraction"])
    info = json.loads((results_dir / "study.json").read_text()) if (results_dir / "study.json").exists() else {}
    if info:
        st = exp["setup_table"]
        st[("Command", "Value")] = f"`{info['command']}`"
        st[("CPU (lscpu model name)", "Value")] = info["cpu"]
        st[("Logical CPUs / worker processes / torch threads per run", "Value")] = [
            info["logical_cpus"], info.get("workers", 1), info["torch_threads"]]
        st[("torch / Python", "Value")] = f"{info['torch']} / {info['python']}"
        st[("Device", "Value")] = info["device"]
        st[("Seeds", "Value")] = [*info["plan"]["seeds"]]
        st[("Validation images (random split per seed)", "Value")] = [info["plan"]["val_size"]]
        subset = info["plan"].get("train_subset")
        st[("Training images", "Value")] = "all remaining" if subset is None else [subset]
        st[("Wall-clock, train + evaluate + pack (s)", "Value")] = [info["seconds_train_eval_pack"]]
        if "seconds_total" in info:
            st[("Wall-clock, whole reproduce.py run (s)", "Value")] = [info["seconds_total"]]
    return exp


# tables read from results/tuning/ and results/benchmarks.json, which have tests of their own below
OWN_TESTS = ("confirm_table", "precision_table", "speed_table")


def check_tables(text: str, results_dir: Path) -> int:
    """Assert every number in every generated table equals its recomputed value; returns cells checked."""
    parsed, expected = parse_tables(text), expected_values(Path(results_dir))
    checked = 0
    for table in TABLES:
        if table in OWN_TESTS:
            continue
        if table not in parsed:  # a one-line placeholder instead of a table: right only if there is nothing to show
            assert f"<!-- BEGIN:{table} -->" in text and not expected[table], f"table {table} missing from the document"
            continue
        for row in parsed[table]:
            first_col = next(iter(row))
            row_label = row[first_col]
            for col, cell in row.items():
                if col == first_col:
                    continue
                key = (row_label, col)
                want = expected[table].get(key)
                if isinstance(want, str):
                    assert cell == want, f"{table} {key}: {cell!r} != {want!r}"
                    checked += 1
                    continue
                found = numbers_in(cell)
                if not found:
                    assert want is None or all(math.isnan(w) for w in want), f"{table} {key}: no number in {cell!r}"
                    continue
                assert want is not None, f"{table} {key}: number {cell!r} that nothing in results/ accounts for"
                assert len(found) == len(want), f"{table} {key}: {cell!r} vs {want}"
                for (value, decimals, below), w in zip(found, want):
                    if below:
                        assert w < value, f"{table} {key}: {cell!r} vs {w}"
                    else:
                        assert abs(value - w) <= 0.5 * 10 ** -decimals + 1e-9, f"{table} {key}: {cell!r} vs {w}"
                checked += 1
    return checked


# ---------------------------------------------------------------- tests

def test_mode_order_matches_the_method_registry():
    from quant.methods import METHODS

    assert report.MODE_ORDER == tuple(METHODS)


def test_study_rows_take_the_latest_tagged_row_per_run(results_dir):
    rows = report.study_rows(results_dir)
    assert [(r["mode"], r["seed"]) for r in rows] == [(m, str(s)) for m in MODES for s in SEEDS]
    twn0 = next(r for r in rows if r["mode"] == "twn" and r["seed"] == "0")
    assert float(twn0["test_acc"]) != 10.0  # the superseded row
    assert [r["test_acc"] for r in report.study_rows(results_dir, "quick")] == ["50.0"]
    assert [r["test_acc"] for r in report.study_rows(results_dir, "")] == ["12.5"]


@pytest.mark.parametrize("text", [
    "mode,test_acc,seed\nfp,99.0,0\ntwn,98.5,0\nfp,99.2,0\n",      # no tag column, fewer columns
    "seed,test_acc,mode\n0,99.0,fp\n0,98.5,twn\n",                   # reordered
])
def test_old_schema_reads_as_untagged(tmp_path, text):
    (tmp_path / "results.csv").write_text(text)
    rows = report.study_rows(tmp_path, tag="")
    assert [r["mode"] for r in rows] == ["fp", "twn"]
    assert report.study_rows(tmp_path, tag="study") == []
    assert report.summarize(tmp_path, tag="")["fp"]["test_acc"][-1] in (99.0, 99.2)


def test_generated_tables_match_results_recomputed_independently(results_dir, tmp_path):
    doc = tmp_path / "report.md"
    doc.write_text(DOC)
    report.refresh([doc], results_dir)
    assert check_tables(doc.read_text(), results_dir) > 60


def test_checker_catches_a_wrong_number(results_dir, tmp_path):
    doc = tmp_path / "report.md"
    doc.write_text(DOC)
    report.refresh([doc], results_dir)
    text = doc.read_text()
    acc = report.summarize(results_dir)["twn"]["test_acc"]
    right = f"{sum(acc) / len(acc):.2f}"
    wrong = f"{float(right) + 0.01:.2f}"
    assert right in text
    with pytest.raises(AssertionError):
        check_tables(text.replace(right, wrong, 1), results_dir)


def test_refresh_is_idempotent_and_leaves_prose_alone(results_dir, tmp_path):
    doc, readme, plain = tmp_path / "report.md", tmp_path / "README.md", tmp_path / "NOTES.md"
    doc.write_text(DOC)
    readme.write_text("# Readme\n\n<!-- BEGIN:results_table -->\n<!-- END:results_table -->\n\nend\n")
    plain.write_text("no markers here\n")
    assert set(report.refresh([doc, readme, plain, tmp_path / "absent.md"], results_dir)) == {doc, readme}
    first = doc.read_text()
    assert report.refresh([doc, readme, plain], results_dir) == []
    assert doc.read_text() == first
    outside = lambda t: re.sub(r"<!-- BEGIN:(\w+) -->.*?<!-- END:\1 -->", "", t, flags=re.S)
    assert outside(first) == outside(DOC)
    assert "hand-written, not ours" in first and "stale" not in first
    assert plain.read_text() == "no markers here\n"
    readme_tables = parse_tables(readme.read_text())
    assert readme_tables["results_table"] == parse_tables(first)["results_table"]


def test_no_study_rows_leaves_documents_untouched(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    append_result(results / "results.csv", {"mode": "fp", "tag": "quick", "test_acc": 90.0})
    doc = tmp_path / "report.md"
    doc.write_text(DOC)
    with pytest.raises(report.NoResults, match="no rows tagged 'study'"):
        report.refresh([doc], results)
    assert doc.read_text() == DOC


def test_missing_deployment_gives_placeholders_not_numbers(tmp_path):
    results = make_results(tmp_path, deployment=False)
    tables = report.tables(results)
    assert "No deployment files yet" in tables["deployment_table"]
    fp_row = [line for line in tables["results_table"].splitlines() if line.startswith("| TWN")][0]
    assert fp_row.count(report.NA) >= 2


# ---------------------------------------------------------------- the paired table

def refreshed(results, tmp_path) -> str:
    doc = tmp_path / "report.md"
    doc.write_text(DOC)
    report.refresh([doc], results)
    return doc.read_text()


def test_paired_table_p_value_is_a_brute_force_binomial_sum(tmp_path):
    results = make_results(tmp_path, seeds=(0, 1, 2, 3, 4))
    text = refreshed(results, tmp_path)
    assert check_tables(text, results) > 100  # every cell of every table, the paired one included
    row = next(r for r in parse_tables(text)["paired_table"] if r["Comparison A − B"] == "TWN − ADMM")
    folder = results / "predictions"
    labels = np.load(folder / "test_labels.npy")
    twn, admm = np.load(folder / "twn_seed3.npy") == labels, np.load(folder / "admm_seed3.npy") == labels
    a_only, b_only = int(np.sum(twn & ~admm)), int(np.sum(~twn & admm))
    p = brute_force_mcnemar(a_only, b_only)
    assert 0.01 < p < 1  # a seed where the cell shows digits, not "<0.001"
    assert row["Images only A / only B right, per seed"].split(", ")[3] == f"{a_only}/{b_only}"
    assert abs(float(row["McNemar exact p, per seed"].split(", ")[3]) - p) <= 5e-4
    wrong = row["McNemar exact p, per seed"].split(", ")[3]
    with pytest.raises(AssertionError, match="McNemar"):
        check_tables(text.replace(f", {wrong}", f", {float(wrong) + 0.01:.3f}", 1), results)


def test_paired_table_verdicts_follow_the_interval(tmp_path):
    results = make_results(tmp_path, seeds=(0, 1, 2, 3, 4))
    rows = parse_tables(refreshed(results, tmp_path))["paired_table"]
    assert [r["Comparison A − B"] for r in rows] == ["TWN − FP32", "TTQ − FP32", "ADMM − FP32", "TWN − TTQ",
                                                     "TWN − ADMM", "TTQ − ADMM"]
    verdicts = set()
    for r in rows:
        low, high = (v for v, _, _ in numbers_in(r["95 % CI (pp)"]))
        a, b = r["Comparison A − B"].split(" − ")
        verdicts.add(r["Verdict (95 % CI)"])
        assert r["Verdict (95 % CI)"] == (f"{a} higher: interval excludes 0" if low > 0 else f"{b} higher: interval "
                                          "excludes 0" if high < 0 else "not resolved: interval includes 0")
        p = numbers_in(r["p (paired t, seeds)"])[0]
        assert (p[0] < 0.05 or p[2]) == ("excludes" in r["Verdict (95 % CI)"])
    assert len(verdicts) > 1  # the fake data separates some pairs and not others


def test_paired_table_needs_two_seeds(tmp_path):
    table = report.tables(make_results(tmp_path, seeds=(0,)))["paired_table"]
    assert table.startswith("*The paired comparison needs ≥ 2 seeds") and "|" not in table
    assert "results/ has 1" in table


def test_paired_table_without_predictions_says_so(tmp_path):
    table = report.tables(make_results(tmp_path, predictions=False))["paired_table"]
    assert table == ("*No per-image test predictions in results/predictions/ (no test_labels.npy): "
                     "run `python reproduce.py`.*")


def test_stale_or_broken_predictions_are_left_out_with_a_reason(tmp_path):
    results = make_results(tmp_path, seeds=(0, 1, 2))
    folder = results / "predictions"
    np.save(folder / "ttq_seed1.npy", np.load(folder / "fp_seed1.npy"))  # another run's file: accuracy differs
    np.save(folder / "admm_seed2.npy", np.zeros(N_TEST, np.int64))  # not uint8
    np.save(folder / "admm_seed0.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)  # never unpickled
    (folder / "twn_seed0.npy").write_bytes(b"\x93NUMPY" + b"\0" * report.MAX_PREDICTIONS_BYTES)  # over the bound
    (folder / "twn_seed2.npy").unlink()
    table = report.tables(results)["paired_table"]
    note = table.splitlines()[-1]
    assert note.startswith("*Runs left out: ")
    for run, why in (("TTQ seed 1", "differs from results.csv"), ("ADMM seed 2", "not a 1-D uint8"),
                     ("ADMM seed 0", "unreadable"), ("TWN seed 0", "over 1,048,576 bytes"), ("TWN seed 2", "no ")):
        assert re.search(f"{run}: [^;]*{why}", note), (run, note)
    seeds = {r["Comparison A − B"]: r["Seeds"] for r in parse_tables(f"<!-- BEGIN:t -->{table}<!-- END:t -->")["t"]}
    assert seeds == {"TWN − FP32": "1", "TTQ − FP32": "2", "ADMM − FP32": "1", "TWN − TTQ": "0", "TWN − ADMM": "1",
                     "TTQ − ADMM": "0"}
    for name in ("admm_seed2.npy", "admm_seed0.npy", "twn_seed0.npy"):  # the checker reads only well-formed files
        (folder / name).unlink()
    assert check_tables(refreshed(results, tmp_path), results) > 60


def test_reproduce_writes_predictions_that_fill_the_paired_table(synthetic_mnist, tmp_path):
    """The real pipeline on synthetic data: two seeds of FP and TWN (bf16 training, passed through to the config),
    then every table checked independently."""
    (tmp_path / "report.md").write_text(DOC)
    done = call_script("reproduce.py", "--modes", "fp", "twn", "--seeds", "0", "1", "--epochs", "1", "--val-size", "64",
                       "--train-subset", "96", "--precision", "bf16", "--skip-checksum", "--no-progress", "--data-dir", synthetic_mnist, "--results-dir", "results",
                       "--checkpoint-dir", "checkpoints", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = tmp_path / "results"
    labels = np.load(results / "predictions" / "test_labels.npy")
    data = load_mnist(synthetic_mnist, test_only=True, verify_checksum=False)
    assert labels.dtype == np.uint8 and np.array_equal(labels, data.test_y.numpy())
    for mode in ("fp", "twn"):
        for seed in (0, 1):
            preds = np.load(results / "predictions" / f"{mode}_seed{seed}.npy")
            assert preds.dtype == np.uint8 and preds.shape == labels.shape
            ckpt = load_checkpoint(tmp_path / "checkpoints" / f"{mode}_seed{seed}.pth")
            assert ckpt["config"]["precision"] == ckpt["precision"] == "bf16"
            expected = evaluate(rebuild_model(ckpt["export"]), data.test_x, data.test_y)["preds"]
            assert np.array_equal(preds, expected.numpy())
    info = json.loads((results / "study.json").read_text())
    assert info["n_seeds"] == 2 and info["seconds_total"] >= info["seconds_train_eval_pack"] > 0
    text = (tmp_path / "report.md").read_text()
    assert check_tables(text, results) > 40
    assert parse_tables(text)["paired_table"][0]["Seeds"] == "2"
    assert not list(results.glob("**/.*.tmp"))


def test_committed_report_matches_committed_results(tmp_path):
    results, doc = REPO / "results", REPO / "report.md"
    if not (results / "results.csv").exists() or not report.study_rows(results):
        pytest.skip("results/results.csv has no 'study' rows yet (run python reproduce.py)")
    text = doc.read_text()
    (tmp_path / "report.md").write_text(text, encoding="utf-8")
    assert report.refresh([tmp_path / "report.md"], results) == [], "report.md is stale: run python plot_results.py"
    assert check_tables(text, results) > 30
    readme = REPO / "README.md"
    if readme.exists() and "<!-- BEGIN:results_table -->" in readme.read_text():
        assert parse_tables(readme.read_text())["results_table"] == parse_tables(text)["results_table"]


def test_committed_report_prose_repeats_no_generated_number():
    """Numbers that change with every rerun live only in the tables; prose refers to the tables."""
    results, doc = REPO / "results", REPO / "report.md"
    text = doc.read_text()
    assert set(TABLES) <= {m["name"] for m in report.MARKER.finditer(text)}, "report.md lacks a table marker"
    if not (results / "results.csv").exists() or not report.study_rows(results):
        pytest.skip("results/results.csv has no 'study' rows yet (run python reproduce.py)")
    prose = re.sub(r"<!-- BEGIN:(\w+) -->.*?<!-- END:\1 -->", "", text, flags=re.S)
    published = {f"{v:.2f}" for v in (*SEED_STUDY.values(), *TWN_PAPER.values())}
    for mode, s in report.summarize(results).items():
        for value in (f"{report.mean(s['test_acc']):.2f}", f"{report.mean(s['size']) / 1024:,.1f}"):
            if value not in published:  # a published number may coincide with ours and be quoted legitimately
                assert value not in prose, f"prose repeats generated number {value} ({mode}); cite the table instead"


def test_confirm_and_precision_tables_follow_the_confirm_summary(tmp_path):
    from quant import confirm, report
    from quant.config import default_config

    default, other = confirm.knobs(default_config("twn")), confirm.knobs(default_config("twn", lr=1e-3))
    runs = lambda config, accs, precision: [{"config": config, "seed": s, "precision": precision, "epochs": 3,
                                             "val_acc": a, "val_loss": 0.1} for s, a in enumerate(accs)]
    fp32 = runs(default, [99.0, 99.2, 99.1], "fp32") + runs(other, [99.2, 99.4, 99.3], "fp32")
    bf16 = runs(default, [99.1, 99.1, 99.3], "bf16")
    summary = {"twn": {p: confirm.choose(fp32 + bf16, "twn", p, 3, [0, 1, 2]) for p in ("fp32", "bf16")}}
    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "confirm_summary.json").write_text(json.dumps(summary))
    table = report.confirm_table(tmp_path)
    assert "lr 0.001" in table and "+0.20 ± 0.00" in table and table.count("**chosen**") == 1
    assert "| bf16 |" not in table  # the defaults alone: shown in the precision table only
    row = next(line for line in report.precision_table(tmp_path).splitlines() if line.startswith("| TWN"))
    # bf16 - fp32 per seed: +0.1, -0.1, +0.2 -> mean +0.067, the interval contains 0
    assert "+0.07" in row and "within noise" in row and "| 3 |" in row


def test_speed_table_reads_the_benchmark_and_marks_missed_bars(tmp_path):
    from quant import report

    assert "No benchmark yet" in report.speed_table(tmp_path)
    bench = {"rounds": 3, "machine": {"cpu": "CPU X", "logical_cpus": 2, "torch": "2", "torch_threads": 2, "device": "cpu"},
             "floor": {"128": {"images_per_s": 1000.0, "ms_per_step": 12.8}},
             "real_epoch_bf16": {"fp": {"images_per_s": 1500.0, "ms_per_step": 8.5}},
             "ratios": {"naive_over_real": {"value": 1.2, "per_round": [1.1, 1.2, 1.4], "bar": 1.3, "bar_is": "min"}}}
    (tmp_path / "benchmarks.json").write_text(json.dumps(bench))
    (tmp_path / "speed").mkdir()
    for precision, seconds in (("fp32", 200.0), ("auto", 130.0)):
        (tmp_path / "speed" / f"seed0_{precision}.json").write_text(json.dumps({"seconds_total": seconds}))
    table = report.speed_table(tmp_path)
    assert "(130 s / 200 s) | 0.65 | — | ≤ 0.7 | yes |" in table
    assert "| real epoch, FP32 | bf16 | 1,500 | 8.5 |" in table
    assert "| naive_over_real | 1.20 | 1.10–1.40 | ≥ 1.3 | **no** |" in table and "CPU X" in table
