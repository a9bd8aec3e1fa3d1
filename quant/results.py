"""results/results.csv: one row per evaluation, appended under a file lock, rewritten atomically; and the
fixed-width text tables the scripts print.

Appending reads every existing row, adds the new one and writes the whole table to a temp file that
replaces the old one, all while holding `results.csv.lock`. So two concurrent evals never lose or
interleave a row, a crash never leaves half a row, and a table from an older version (fewer or
reordered columns) keeps all its rows: the new header is the union of old and current columns.
"""
import csv
import io
from pathlib import Path

from .errors import QuantError
from .files import atomic_write_text, locked

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
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    for i, row in enumerate(rows, start=2):
        if None in row or any(v is None for v in row.values()):
            raise ResultsError(f"{path}: line {i} does not match the header; fix or move the file "
                               f"(nothing was written)")
    return columns, rows


def append_result(path, row: dict) -> None:
    """Append `row` to the CSV at `path` safely (see module docstring)."""
    path = Path(path)
    with locked(path):
        columns, rows = read_results(path)
        columns = list(dict.fromkeys(columns + COLUMNS + list(row)))
        rows.append(row)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())


def format_table(rows: list[dict], columns: list[tuple]) -> str:
    """Fixed-width text table; columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], spec) if isinstance(row[k], (int, float)) else str(row[k]) for k, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
