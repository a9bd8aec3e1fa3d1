"""quant/report.py: the study's numbers are read from results/ only, every number the generated tables print
is recomputed here by another route (pandas) and compared cell by cell, refreshing is idempotent and never
touches prose, and the committed report.md agrees with the committed results/."""
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from quant import report
from quant.results import append_result

MODES = ("fp", "twn", "ttq", "admm")
SEEDS = (0, 1)
LAYER_WEIGHTS = {"conv1": 800, "conv2": 51200, "fc1": 524288, "fc2": 5120}
LABEL_TO_MODE = {"FP32": "fp", "TWN": "twn", "TTQ": "ttq", "ADMM": "admm"}
# Published numbers the comparison table cites: the seed study's README table and TWN paper, LeNet-5 on MNIST.
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


def make_results(root, modes=MODES, seeds=SEEDS, epochs=3, weights=True, deployment=True) -> Path:
    """A results folder as reproduce.py writes it, with made-up but plausible numbers (seeded)."""
    rng = np.random.default_rng(7)
    results = Path(root) / "results"
    (results / "history").mkdir(parents=True, exist_ok=True)
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
            append_result(results / "results.csv", {**row, "test_acc": round(base + rng.normal(0, 0.15), 4)})
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
                coded = int(n * h / 8 * rng.uniform(0.8, 1.05)) + 40
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
        "seconds_train_eval_pack": 512.3, "plan": {"seeds": list(seeds), "val_size": 5000, "train_subset": None}}))
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


NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def numbers_in(cell: str) -> list[tuple[float, int]]:
    """(value, decimals shown) of every number in a cell ('98.76 ± 0.05' -> two numbers)."""
    return [(float(t.replace(",", "")), len(t.split(".")[1]) if "." in t else 0) for t in NUMBER.findall(cell)]


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
           "setup_table": {}, "comparison_table": {}}
    for mode, g in df.groupby("mode"):
        name = label[mode]
        t = totals[totals["mode"] == mode] if len(totals) else totals
        r = exp["results_table"]
        r[(name, "Seeds")] = [len(g)]
        r[(name, "Test accuracy (%)")] = pair(g["test_acc"])
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
        st[("Logical CPUs / torch threads", "Value")] = [info["logical_cpus"], info["torch_threads"]]
        st[("torch / Python", "Value")] = f"{info['torch']} / {info['python']}"
        st[("Device", "Value")] = info["device"]
        st[("Seeds", "Value")] = [*info["plan"]["seeds"]]
        st[("Validation images (random split per seed)", "Value")] = [info["plan"]["val_size"]]
        subset = info["plan"].get("train_subset")
        st[("Training images", "Value")] = "all remaining" if subset is None else [subset]
        st[("Wall-clock, train + evaluate + pack (s)", "Value")] = [info["seconds_train_eval_pack"]]
    return exp


def check_tables(text: str, results_dir: Path) -> int:
    """Assert every number in every generated table equals its recomputed value; returns cells checked."""
    parsed, expected = parse_tables(text), expected_values(Path(results_dir))
    checked = 0
    for table in report.TABLES:
        assert table in parsed, f"table {table} missing from the document"
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
                for (value, decimals), w in zip(found, want):
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
    assert report.fill(first, report.tables(results_dir)) == first
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


def test_committed_report_matches_committed_results():
    results, doc = REPO / "results", REPO / "report.md"
    if not (results / "results.csv").exists() or not report.study_rows(results):
        pytest.skip("results/results.csv has no 'study' rows yet (run python reproduce.py)")
    text = doc.read_text()
    assert report.fill(text, report.tables(results)) == text, "report.md is stale: run python plot_results.py"
    assert check_tables(text, results) > 30
    readme = REPO / "README.md"
    if readme.exists() and "<!-- BEGIN:results_table -->" in readme.read_text():
        assert parse_tables(readme.read_text())["results_table"] == parse_tables(text)["results_table"]


def test_committed_report_prose_repeats_no_generated_number():
    """Numbers that change with every rerun live only in the tables; prose refers to the tables."""
    results, doc = REPO / "results", REPO / "report.md"
    text = doc.read_text()
    assert set(report.TABLES) <= set(report.marker_names(text)), "report.md lacks a table marker"
    if not (results / "results.csv").exists() or not report.study_rows(results):
        pytest.skip("results/results.csv has no 'study' rows yet (run python reproduce.py)")
    prose = re.sub(r"<!-- BEGIN:(\w+) -->.*?<!-- END:\1 -->", "", text, flags=re.S)
    published = {f"{v:.2f}" for v in (*SEED_STUDY.values(), *TWN_PAPER.values())}
    for mode, s in report.summarize(results).items():
        for value in (f"{report.mean(s['test_acc']):.2f}", f"{report.mean(s['size']) / 1024:,.1f}"):
            if value not in published:  # a published number may coincide with ours and be quoted legitimately
                assert value not in prose, f"prose repeats generated number {value} ({mode}); cite the table instead"
