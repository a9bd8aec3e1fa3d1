"""What every script shares on the command line: the flags of the config table (quant/config.py), device
choice, seeding, and `run_main`, which turns a QuantError (bad input, missing or corrupt files, a diverged run)
or an OSError into one `error: ...` line and a non-zero exit; any other exception is a bug and keeps its traceback.
"""
import argparse
import ctypes
import os
import random
import signal
import sys

import numpy as np
import torch

from . import config
from .errors import QuantError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line: the full usage (a dozen lines for train.py) would bury the message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def flag_type(key: config.Key):
    """An argparse `type` that checks a value against `key`'s type and range, its message kept in the error."""
    def parse(text):
        try:
            return config.check(key, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


# Counts that are not hyperparameters (seeds, threads, workers, rounds).
positive_int, non_negative_int = (flag_type(config.Key("n", None, int, low, "")) for low in (">= 1", ">= 0"))


def add_config_flags(parser, *names: str) -> None:
    """Flags for the config keys `names`, each with the table's type, range, help and default. A key that a
    tuned config may set, or whose default differs per mode, defaults to None: "not given", so `given` leaves
    it to the tuned config or the mode's default."""
    for key in (config.KEYS[name] for name in names):
        unset = key.tunable or key.mode is not None or isinstance(key.default, dict)
        kind = ({"action": "store_const", "const": True} if key.type is bool else
                {"choices": key.type} if isinstance(key.type, tuple) else {"type": flag_type(key)})
        parser.add_argument(*config.flags(key), dest=key.name, default=None if unset else key.default,
                            help=f"{key.help} (default: {config.describe_default(key)})", **kind)


def given(args) -> dict:
    return {name: getattr(args, name) for name in config.KEYS if getattr(args, name, None) is not None}


def add_mode_arg(parser, choices=config.MODES):
    parser.add_argument("--mode", choices=choices, required=True, help="quantization method")


def add_data_args(parser):
    parser.add_argument("--data-dir", "--data_dir", default="data",
                        help="folder with the four MNIST IDX files (raw or .gz, flat or MNIST/raw/); "
                             "downloaded there if absent (default: data)")
    parser.add_argument("--skip-checksum", action="store_true",
                        help="accept IDX files that differ from the published MNIST (synthetic test data)")
    add_config_flags(parser, "seed")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = cuda if available, else cpu (default: auto)")


def add_train_args(parser):
    """Training flags: every training key of the table, then each method's own hyperparameters."""
    add_config_flags(parser, *(n for n, k in config.KEYS.items() if k.mode is None and n != "seed"))
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms(True); needed for bitwise-repeatable CUDA runs "
                             "(the CPU path is deterministic for a given seed and thread count anyway)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (epoch summary lines only)")
    add_config_flags(parser.add_argument_group("method hyperparameters (only for their mode)"),
                     *(n for n, k in config.KEYS.items() if k.mode is not None))


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise QuantError("--device cuda requested but CUDA is not available; use --device cpu")
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it back to the kernel
    (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD). Every step and evaluation batch allocates tensors of
    100 KB to 70 MB; by default glibc maps each from the kernel and unmaps it when freed, so the next one
    page-faults in fresh zeroed pages (evaluating the 10,000 test images: 2.4 s, 1.2 s with this). The arithmetic
    is unchanged. A no-op where the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, TypeError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's <malloc.h> parameter numbers
    for param, value in ((m_mmap_threshold, 1 << 30), (m_trim_threshold, 1 << 30), (m_top_pad, 64 << 20)):
        mallopt(param, value)


def run_main(main, on_interrupt=None) -> None:
    """Run `main()`; a QuantError or OSError -> one stderr line + its exit code (2; 3 for a diverged run),
    SIGINT/SIGTERM -> message + exit 130."""
    keep_freed_memory()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt, as Ctrl-C does
    try:
        main()
    except KeyboardInterrupt:
        message = on_interrupt() if on_interrupt else "interrupted; files already written are intact"
        print(f"\ninterrupted: {message}", file=sys.stderr)
        sys.exit(130)
    except (QuantError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
