"""Draw the study's figures from the results folder alone and refresh the generated tables of report.md
and README.md (the text between <!-- BEGIN:name --> and <!-- END:name --> markers).

Figures (into the results folder): results_comparison.png, training_curves.png, weight_histograms.png,
sparsity_bytes.png, admm_residual.png. A figure whose inputs are missing is skipped with a one-line note.

Example:
    python plot_results.py
    python plot_results.py --results-dir results/quick --tag quick    # after reproduce.py --quick
"""
import argparse
from pathlib import Path

from quant.cli import ArgumentParser, run_main
from quant.plotting import plot_all
from quant.report import NoResults, refresh

DOCUMENTS = ["report.md", "README.md"]


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="folder to read (default: results)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: the results folder)")
    parser.add_argument("--tag", default="study", help="results.csv rows to use (default: study)")
    parser.add_argument("--report", nargs="*", type=Path, default=None,
                        help="documents whose tables to refresh (default: report.md README.md, only for --tag study)")
    parser.add_argument("--no-report", action="store_true", help="draw figures only")
    args = parser.parse_args()
    made = plot_all(args.results_dir, args.out, tag=args.tag)
    print(f"{sum(p is not None for p in made.values())} of {len(made)} figures written")
    documents = args.report if args.report is not None else (DOCUMENTS if args.tag == "study" else [])
    if args.no_report or not documents:
        return
    try:
        changed = refresh(documents, args.results_dir, args.tag)
        print(f"refreshed tables in {', '.join(map(str, changed))}" if changed else "report tables already up to date")
    except NoResults as e:
        print(f"report tables left unchanged: {e}")


if __name__ == "__main__":
    run_main(main)
