"""results/results.csv, one row per evaluation, and the fixed-width text tables the scripts print.

An append rewrites the whole table atomically under `results.csv.lock`, so concurrent evals never lose or interleave a
row, a crash never leaves half a row, and an older table (fewer or reordered columns) keeps every row: the new header
is the union of the old and current columns.
"""
import csv
from pathlib import Path

from .errors import QuantError
from .files import atomic_write_csv, locked

COLUMNS = [
    "timestamp", "mode", "checkpoint", "tag", "seed", "epochs", "lr", "batch_size", "schedule", "shift", "precision", "keep_fp",
    "hyperparams", "test_acc", "test_loss", "val_acc", "total_params", "quantized_params", "bits_per_weight",
    "compression", "zero_frac", "eval_seconds", "train_seconds", "data_checksum", "git_commit",
]


class ResultsError(QuantError, ValueError):
    """results.csv exists but cannot be parsed as a table; it is left untouched."""


def read_results(path) -> tuple[list[str], list[dict]]:
    """(columns, rows) of a results CSV; ([], []) if it does not exist."""
    path = Path(path)
    if not path.exists():
        return [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), list(reader.fieldnames or [])
    for i, row in enumerate(rows, start=2):
        if None in row or None in row.values():
            raise ResultsError(f"{path}: line {i} does not match the header; fix or move the file (nothing was written)")
    return columns, rows


def append_result(path, row: dict) -> None:
    """Append `row` to the CSV at `path` safely (see module docstring)."""
    path = Path(path)
    with locked(path):
        columns, rows = read_results(path)
        atomic_write_csv(path, rows + [row], list(dict.fromkeys(columns + COLUMNS + list(row))))


def format_table(rows: list[dict], columns: list[tuple]) -> str:
    """Fixed-width text table; columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]] + [[format(row[k], spec) if isinstance(row[k], (int, float)) else str(row[k])
                                             for k, _, spec in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
