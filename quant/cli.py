"""Shared command-line pieces: flags defined once, validated types, config resolution, clean error exits.

Library code raises; `run_main` turns the expected errors into one `error: ...` line on stderr and a
non-zero exit (2 for bad input, 130 for an interruption), never a traceback.
"""
import argparse
import os
import random
import signal
import sys

import torch

from .admm import PENALTIES
from .methods import DEFAULTS, HYPERPARAMS, METHODS, parse_keep_fp
from .engine import SCHEDULES

MNIST_TRAIN = 60000


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line: the full usage (a dozen lines for train.py) would bury the message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def open_unit_interval(text: str) -> float:
    value = positive_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def unit_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_mode_arg(parser, choices=tuple(METHODS), required=True):
    parser.add_argument("--mode", choices=choices, required=required, help="quantization method")


def add_data_args(parser):
    parser.add_argument("--data-dir", "--data_dir", default="data",
                        help="folder with the four MNIST IDX files (raw or .gz, flat or MNIST/raw/); "
                             "downloaded there if absent (default: data)")
    parser.add_argument("--skip-checksum", action="store_true",
                        help="accept IDX files that differ from the published MNIST (synthetic test data)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = cuda if available, else cpu (default: auto)")


def add_train_args(parser):
    """Training flags shared by train.py and tune_hyperparams.py (None = the mode's default)."""
    parser.add_argument("--epochs", type=positive_int, default=3, help="training epochs (default: 3)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="peak learning rate (default: per mode, " +
                             ", ".join(f"{m} {d['lr']:g}" for m, d in DEFAULTS.items()) + ")")
    parser.add_argument("--batch-size", "--batch_size", type=positive_int, default=None,
                        help="mini-batch size (default: per mode, " +
                             ", ".join(f"{m} {d['batch_size']}" for m, d in DEFAULTS.items()) + ")")
    parser.add_argument("--schedule", choices=SCHEDULES, default=None, help="LR schedule (default: onecycle)")
    parser.add_argument("--weight-decay", "--weight_decay", type=float, default=None, help="Adam L2 (default: 0)")
    parser.add_argument("--shift", type=non_negative_int, default=None,
                        help="augmentation: translate each training image by up to N pixels, 0 = off (default: 2)")
    parser.add_argument("--val-size", "--val_size", type=non_negative_int, default=5000,
                        help="training images held out for validation (random, seeded; default: 5000)")
    parser.add_argument("--train-subset", type=positive_int, default=None,
                        help="train on only the first N images of the training split (quick runs)")
    parser.add_argument("--keep-fp", "--keep_fp", default="",
                        help="layers left full precision: first, last, or names (conv1,conv2,fc1,fc2); default: none")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms(True); needed for bitwise-repeatable CUDA runs "
                             "(the CPU path is deterministic for a given seed and thread count anyway)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (epoch summary lines only)")
    group = parser.add_argument_group("method hyperparameters (only for their mode)")
    group.add_argument("--delta-factor", "--delta_factor", type=open_unit_interval, default=None,
                       help="TWN: delta = f * mean|W| (default 0.7, the original code; the v3 paper writes 0.75)")
    group.add_argument("--per-channel", "--per_channel", action="store_const", const=True, default=None,
                       help="TWN: delta and alpha per output channel (paper v3, Alg. 1)")
    group.add_argument("--t", "--threshold", dest="t", type=open_unit_interval, default=None,
                       help="TTQ: delta = t * max|W| (default 0.05)")
    group.add_argument("--scale-lr", "--scale_lr", type=positive_float, default=None,
                       help="TTQ: lr multiplier for w_p, w_n (default 1.0, as the official code)")
    group.add_argument("--warmup-frac", "--warmup_frac", type=unit_fraction, default=None,
                       help="TTQ: first fraction of steps trained in full precision, then ternary; 0 = off "
                            f"(default {HYPERPARAMS['ttq']['warmup_frac']})")
    group.add_argument("--rho", type=positive_float, default=None, help="ADMM: initial penalty rho (default 1e-4)")
    group.add_argument("--rho-growth", "--rho_growth", type=positive_float, default=None,
                       help="ADMM: rho multiplier per ADMM round (default 1.2)")
    group.add_argument("--admm-rounds", "--admm_rounds", type=positive_int, default=None,
                       help="ADMM: G/U updates (each growing rho), spread evenly over the steps before the fine-tune "
                            f"(default {HYPERPARAMS['admm']['admm_rounds']}: every 50 steps at the default 3 epochs, batch 64)")
    group.add_argument("--admm-penalty", "--admm_penalty", dest="penalty", choices=PENALTIES, default=None,
                       help="ADMM: apply rho/2 ||W - G + U||^2 as a proximal step after each Adam step (prox) or "
                            "inside the loss (loss) (default prox)")
    group.add_argument("--finetune-frac", "--finetune_frac", type=unit_fraction, default=None,
                       help="ADMM: final fraction of steps trained with codes frozen (alpha, BN, biases); 0 = off (default 0.1)")


def resolve_config(parser, args, base: dict | None = None) -> dict:
    """Merge mode defaults < `base` (e.g. a tuned config) < explicit flags; reject flags of another mode."""
    from .runs import default_config

    mode = args.mode
    config = default_config(mode, epochs=args.epochs, seed=args.seed, val_size=args.val_size,
                            train_subset=args.train_subset)
    for key, value in (base or {}).items():
        if key == "hyperparams":
            config["hyperparams"].update(value)
        elif key in config and key not in ("mode", "seed", "epochs"):
            config[key] = value
    for key in ("lr", "batch_size", "schedule", "weight_decay", "shift"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    for mode_name, names in HYPERPARAMS.items():
        for name in names:
            value = getattr(args, name, None)
            if value is None:
                continue
            if mode_name != mode:
                flag = next(a.option_strings[0] for a in parser._actions if a.dest == name)
                parser.error(f"{flag} applies to --mode {mode_name}, not {mode}")
            config["hyperparams"][name] = value
    try:
        config["keep_fp"] = parse_keep_fp(args.keep_fp)
    except ValueError as e:
        parser.error(str(e))
    if mode == "fp" and config["keep_fp"]:
        parser.error("--keep-fp is meaningless with --mode fp (every layer is FP)")
    available = (args.train_subset or (MNIST_TRAIN - args.val_size))
    if args.val_size >= MNIST_TRAIN:
        parser.error(f"--val-size must be < {MNIST_TRAIN}")
    if config["batch_size"] > available:
        parser.error(f"--batch-size {config['batch_size']} is larger than the {available} training images")
    return config


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def format_table(rows: list[dict], columns: list[tuple]) -> str:
    """Fixed-width text table; columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], spec) if isinstance(row[k], (int, float)) else str(row[k]) for k, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_main(main, on_interrupt=None) -> None:
    """Run `main()`; expected errors -> one stderr line + exit 2, SIGINT/SIGTERM -> message + exit 130."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .engine import DivergenceError
    from .export import NotTernaryError
    from .results import ResultsError

    signal.signal(signal.SIGTERM, _raise_interrupt)
    expected = (DataError, CheckpointError, DivergenceError, NotTernaryError, ResultsError, ValueError, OSError)
    try:
        main()
    except KeyboardInterrupt:
        message = on_interrupt() if on_interrupt else "interrupted; files already written are intact"
        print(f"\ninterrupted: {message}", file=sys.stderr)
        sys.exit(130)
    except expected as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if not isinstance(e, DivergenceError) else 3)

