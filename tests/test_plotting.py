"""quant/plotting.py and plot_results.py: every figure is drawn from a synthetic results/ folder alone,
missing or old-format inputs skip a figure with one line instead of a traceback, and the per-run weights
JSON that the histograms draw holds what the checkpoint says."""
import time

import numpy as np
import pytest
import torch

from conftest import run_script
from quant import plotting
from quant.methods import get_method
from quant.model import LeNet5
from quant.study import weight_summary
from test_report import make_results

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the IHDR chunk: a real, non-empty image."""
    data = path.read_bytes()
    assert data[:8] == PNG, f"{path.name} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_every_figure_is_drawn_quickly(tmp_path):
    results = make_results(tmp_path)
    notes = []
    start = time.perf_counter()
    made = plotting.plot_all(results, log=notes.append)
    seconds = time.perf_counter() - start
    assert set(made) == set(plotting.FIGURES) and all(made.values()), notes
    for name, path in made.items():
        assert path.parent == results and path.name == name
        width, height = png_size(path)
        assert width >= 800 and height >= 500 and path.stat().st_size > 20_000, (name, width, height)
    assert seconds < 30, f"plotting took {seconds:.1f}s (budget 20 s on a quiet machine)"
    assert not [n for n in notes if n.startswith("skipped")]


def test_empty_folder_skips_every_figure_with_one_line(tmp_path):
    notes = []
    made = plotting.plot_all(tmp_path / "nothing", out_dir=tmp_path / "png", log=notes.append)
    assert all(p is None for p in made.values())
    assert len(notes) == len(plotting.FIGURES)
    assert all(n.startswith("skipped ") and "\n" not in n for n in notes)
    assert not list((tmp_path / "png").glob("*.png"))


def test_missing_deployment_skips_only_the_figures_that_need_it(tmp_path):
    results = make_results(tmp_path, deployment=False, weights=False)
    notes = []
    made = plotting.plot_all(results, log=notes.append)
    skipped = {name for name, path in made.items() if path is None}
    assert skipped == {"results_comparison.png", "sparsity_bytes.png", "weight_histograms.png"}, notes
    assert any("deployment" in n for n in notes)


def test_old_schema_results_csv_is_read(tmp_path):
    """A results.csv from before the tag column (columns reordered too) still plots, as tag ""."""
    results = make_results(tmp_path)
    old = "seed,test_acc,mode,checkpoint\n" + "".join(
        f"{s},{acc},{m},checkpoints/{m}_seed{s}.pth\n"
        for m, acc in (("fp", 99.0), ("twn", 98.5), ("ttq", 98.1), ("admm", 98.3)) for s in (0, 1))
    (results / "results.csv").write_text(old)
    path = plotting.plot_all(results, tmp_path / "png", tag="", log=lambda _: None)["results_comparison.png"]
    assert png_size(path)[0] >= 800
    with pytest.raises(plotting.NoResults, match="no rows tagged 'study'"):
        plotting.plot_comparison(results, tag="study")


def test_malformed_results_csv_is_a_note_not_a_traceback(tmp_path):
    (tmp_path / "results.csv").write_text("mode,test_acc\nfp,99.0,extra,cells\n")
    notes = []
    made = plotting.plot_all(tmp_path, log=notes.append)
    assert all(p is None for p in made.values())
    assert any("does not match the header" in n for n in notes)


def test_script_never_prints_a_traceback(tmp_path):
    done = run_script("plot_results.py", "--results-dir", tmp_path / "absent", cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stderr
    assert done.stdout.count("skipped") == len(plotting.FIGURES)
    assert "0 of 5 figures written" in done.stdout
    assert "report tables left unchanged" in done.stdout


@pytest.mark.parametrize("mode", ["fp", "twn", "ttq", "admm"])
def test_weight_summary_matches_the_checkpoint(mode):
    torch.manual_seed(0)
    model = LeNet5()
    method = get_method(mode)
    method.attach(model)
    if mode == "admm":
        method.finish(model, [])  # what training ends with: W <- Pi(W), codes frozen
    if mode == "ttq":
        method.after_step(model, 1, 1)  # the end of a (1-step) run: past the FP warm-up, ternary
    ckpt = {"mode": mode, "seed": 3, "state_dict": model.state_dict(), "export": method.export(model)}
    summary = weight_summary(ckpt, bins=50)
    assert [e["layer"] for e in summary["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    for entry in summary["layers"]:
        w = model.state_dict()[f"{entry['layer']}.weight"].double().numpy().ravel()
        assert sum(entry["counts"]) == w.size == entry["weights"]
        edges = np.asarray(entry["edges"])
        assert len(edges) == 51 and np.isclose(edges[0], -np.abs(w).max()) and np.isclose(edges[-1], np.abs(w).max())
        assert entry["ternary"] == (mode != "fp")
        if mode == "fp":
            assert "code_fractions" not in entry
            continue
        codes = ckpt["export"]["ternary"][entry["layer"]]["codes"].numpy().ravel()
        fractions = entry["code_fractions"]
        assert fractions == pytest.approx({"-1": np.mean(codes == -1), "0": np.mean(codes == 0),
                                           "+1": np.mean(codes == 1)})
        assert entry["delta"] == pytest.approx(ckpt["export"]["ternary"][entry["layer"]]["delta"].tolist())
        assert (entry["latent_distinct"] <= 3) == (mode == "admm")


def marked_epochs(ax, hollow: bool) -> list[float]:
    """Epochs of the circle markers of one panel, hollow (white face) or filled."""
    from matplotlib.colors import to_rgba

    out = []
    for line in ax.get_lines():
        if line.get_marker() == "o" and line.get_linestyle() == "None":
            if (to_rgba(line.get_markerfacecolor()) == to_rgba("white")) == hollow:
                out += list(line.get_xdata())
    return sorted(out)


def test_training_curves_mark_full_precision_validation_points_hollow(tmp_path):
    results = make_results(tmp_path)
    ternary = {"fp": [0, 0, 0], "twn": [1, 1, 1], "ttq": [0, 1, 1], "admm": [0, 0, 1]}
    for path in (results / "history").glob("*.csv"):
        mode = path.name.split("_seed")[0]
        lines = path.read_text().splitlines()
        path.write_text("\n".join([lines[0] + ",val_ternary"] + [f"{row},{t}" for row, t in zip(lines[1:], ternary[mode])])
                        + "\n")
    fig = plotting.plot_training_curves(results)
    for col, mode in enumerate(("fp", "twn", "ttq", "admm")):
        for ax in fig.axes[col], fig.axes[4 + col]:  # accuracy and loss panels
            hollow = [e for e, t in enumerate(ternary[mode], 1) if not t] * 2  # two seeds
            filled = [e for e, t in enumerate(ternary[mode], 1) if t] * 2
            assert marked_epochs(ax, hollow=True) == sorted(hollow), mode
            assert marked_epochs(ax, hollow=False) == sorted(filled), mode
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[0] == "validation on ternary weights" and legend[1].startswith("validation on full-precision")
    assert len(legend) == 2
    assert "not ternary" not in fig.axes[3].get_title()  # the hollow points say it now


def test_training_curves_from_histories_without_val_ternary(tmp_path):
    """Older history files lack the column: their points are drawn as 'not recorded', and ADMM keeps its note."""
    results = make_results(tmp_path)
    fig = plotting.plot_training_curves(results)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["weights not recorded (history without val_ternary)"]
    assert not marked_epochs(fig.axes[0], hollow=True) and not marked_epochs(fig.axes[0], hollow=False)
    assert "not ternary" in fig.axes[3].get_title()
