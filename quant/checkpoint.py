"""Self-describing checkpoints, written atomically and read with `torch.load(weights_only=True)`.

A checkpoint is a plain dict: kind, format_version, mode, config, history, metrics, seed, versions,
git commit, dataset checksum, the latent `state_dict` and the `export` (codes + scales, see export.py)
that eval and packing consume. weights_only=True means a pickle carrying code is refused, never run.
"""
import io
import pickle
import platform
import re
import subprocess
import warnings
from pathlib import Path

import torch

from .errors import QuantError
from .files import atomic_write_bytes, atomic_write_csv

KIND = "ternary-lenet5-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("mode", "config", "history", "metrics", "seed", "state_dict", "export")


class CheckpointError(QuantError, ValueError):
    """A checkpoint is missing, unreadable, foreign, from another version or another mode."""


def save_checkpoint(path, ckpt: dict) -> None:
    """Serialise in memory, then temp file + fsync + rename: a crash never leaves half a checkpoint."""
    buffer = io.BytesIO()
    torch.save({"kind": KIND, "format_version": FORMAT_VERSION, **ckpt}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path, mode: str | None = None) -> dict:
    """Load and validate a checkpoint; any problem becomes one CheckpointError line."""
    path = Path(path)
    hint = f"train one with `python train.py --mode {mode}`" if mode else "pass --checkpoint PATH"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; {hint}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty; {hint}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, ...: torch raises many types
        # weights_only=True reports both "this pickle imports code" and plain garbage as UnpicklingError.
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and culprit:
            raise CheckpointError(f"{path}: refused to load: it references {culprit.group(1)}, a Python object beyond "
                                  f"plain tensors and containers, which weights_only=True never executes") from None
        why = "not a torch.save file" if isinstance(e, pickle.UnpicklingError) else type(e).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt ({why}); {hint}") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a checkpoint written by this project's train.py")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt.get('format_version')!r}, "
                              f"this code reads version {FORMAT_VERSION}; retrain or use the matching code version")
    if missing := [k for k in REQUIRED if k not in ckpt]:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if mode is not None and ckpt["mode"] != mode:
        raise CheckpointError(f"{path}: holds a {ckpt['mode']!r} model, not {mode!r}; "
                              f"pass --mode {ckpt['mode']} or a --checkpoint trained with --mode {mode}")
    return ckpt


def environment() -> dict:
    """Library versions and git commit, recorded so a result can be traced to the code that made it."""
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"versions": {"python": platform.python_version(), "torch": str(torch.__version__),
                         "torchvision": str(torchvision.__version__)}, "git_commit": commit}


def write_history_csv(path, history: list[dict]) -> None:
    atomic_write_csv(path, history, list(dict.fromkeys(k for row in history for k in row)))
