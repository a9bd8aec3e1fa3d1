"""Shared fixtures: synthetic MNIST-shaped IDX folders, the real MNIST (skipped when absent), script runners.

The synthetic data is learnable on purpose: class k is a bright 6x6 square at one of ten grid positions on
low noise, so a model trained for one epoch must beat chance and a "training lowers the loss" test can fail.
Its SHA-256 sums are not MNIST's, so every consumer passes `verify_checksum=False` / `--skip-checksum`.
"""
import io
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from quant.checkpoint import FORMAT_VERSION, KIND  # noqa: E402
from quant.methods import get_method  # noqa: E402
from quant.model import LeNet5  # noqa: E402

# One intra-op thread: on this project's 2 shared cores a 1-epoch synthetic run took twice as long with 2 threads
# as with 1. It also fixes the thread count that CPU bitwise reproducibility depends on.
torch.set_num_threads(1)

REAL_MNIST = REPO.parent / "shared" / "mnist"
N_TRAIN, N_TEST = 512, 128
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# A port nothing listens on: any download attempt in a subprocess fails at once instead of reaching the net.
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 images [n, 28, 28] and labels [n]: label k = a bright square at grid cell k, on noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 4)
        images[i, 2 + 8 * r:8 + 8 * r, 2 + 6 * c:8 + 6 * c] = 255
    return images, labels.astype(np.uint8)


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    """Write a uint8 array as an IDX file (magic, big-endian dims, then the bytes), raw or gzip-compressed."""
    import gzip
    import struct

    magic = 0x803 if array.ndim == 3 else 0x801
    data = struct.pack(f">i{array.ndim}i", magic, *array.shape) + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    Path(path).write_bytes(gzip.compress(data, compresslevel=1) if gz else data)


def make_mnist_folder(folder, gz: bool = False, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0) -> Path:
    """Write the four IDX files (raw or .gz) into `folder`; returns `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = synthetic_split(n_train, seed)
    test_x, test_y = synthetic_split(n_test, seed + 1)
    suffix = ".gz" if gz else ""
    for name, array in zip(IDX_NAMES, (train_x, train_y, test_x, test_y)):
        write_idx(folder / f"{name}{suffix}", array, gz=gz)
    return folder


@pytest.fixture(scope="session")
def synthetic_mnist(tmp_path_factory) -> Path:
    """Read-only (by convention) folder of raw synthetic IDX files; copy it before corrupting anything."""
    return make_mnist_folder(tmp_path_factory.mktemp("mnist_raw"))


@pytest.fixture(scope="session")
def synthetic_mnist_gz(tmp_path_factory) -> Path:
    """The same synthetic data as `synthetic_mnist`, gzip-compressed."""
    return make_mnist_folder(tmp_path_factory.mktemp("mnist_gz"), gz=True)


@pytest.fixture
def mnist_copy(tmp_path, synthetic_mnist) -> Path:
    """A private, writable copy of the raw synthetic folder (for tests that corrupt or delete files)."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    for f in synthetic_mnist.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.fixture(scope="session")
def real_mnist() -> Path:
    if not all(any((REAL_MNIST / f"{n}{s}").is_file() for s in ("", ".gz")) for n in IDX_NAMES):
        pytest.skip(f"real MNIST IDX files not found in {REAL_MNIST}")
    return REAL_MNIST


def script_env(**extra) -> dict:
    """Environment for a script subprocess: offline, unbuffered, one thread (the machine has 2 busy cores)."""
    env = {**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    env.update(extra)
    return env


def run_script(script: str, *args, cwd=None, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run REPO/`script` with this interpreter (`script` "-c": args[0] is code); cwd defaults to the repo root."""
    target = [script] if script == "-c" else [str(REPO / script)]
    return subprocess.run([sys.executable, *target, *map(str, args)], cwd=cwd or REPO,
                          env=env or script_env(), capture_output=True, text=True, timeout=timeout)


def run_all(jobs: dict, max_parallel: int = 4) -> dict:
    """Run many scripts at once: {name: (script, args, kwargs for run_script)} -> {name: CompletedProcess}.

    Each script subprocess spends most of its time importing torch; overlapping them keeps the suite fast.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_parallel) as pool:
        futures = {name: pool.submit(run_script, script, *args, **kwargs) for name, (script, args, kwargs) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def start_script(script: str, *args, cwd=None, env: dict | None = None) -> subprocess.Popen:
    """Start REPO/`script` in the background (stdout and stderr piped, text)."""
    return subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd or REPO,
                            env=env or script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 90) -> str:
    """Read `proc`'s stdout until a line containing `needle` arrives; returns what was read. Fails on timeout/exit."""
    import select

    fd, text, deadline = proc.stdout.fileno(), "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.05)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:  # EOF: the process ended without printing the line
                break
            text += chunk.decode(errors="replace")
            if needle in text:
                return text
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"never saw {needle!r} (exit {proc.returncode}); stdout {text[-2000:]!r}; stderr {err[-2000:]}")


def call_script(script: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """Run REPO/`script` as __main__ inside this process (no interpreter start, torch already imported).

    For the many failure cases: the same code path as the command line (argparse, run_main's error
    mapping), returned as a CompletedProcess. A traceback-worthy bug propagates and errors the test.
    """
    import contextlib
    import runpy

    saved = sys.argv, os.getcwd(), signal.getsignal(signal.SIGTERM)
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        sys.argv = [script, *map(str, args)]
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(REPO / script), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        signal.signal(signal.SIGTERM, saved[2])
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 60) -> tuple[str, str]:
    """Send `sig`, wait, and return the remaining (stdout, stderr)."""
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return out, err


def assert_one_line_error(result, expected_rc=None, contains=()):
    """A clean failure: non-zero exit (or `expected_rc`), no traceback, one stderr line naming `contains`."""
    err = result.stderr
    assert result.returncode != 0, f"expected failure, got exit 0; stdout {result.stdout[-1000:]}"
    if expected_rc is not None:
        assert result.returncode == expected_rc, f"exit {result.returncode}, wanted {expected_rc}; stderr {err}"
    assert "Traceback" not in err and "Traceback" not in result.stdout, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr should be one line, got {len(lines)}:\n{err}"
    for text in contains:
        assert text in err, f"{text!r} not in stderr: {err}"


def files_in(folder) -> dict:
    """{name: bytes} of every file directly in `folder` (for before/after comparisons)."""
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


# ---------------------------------------------------------------- checkpoints good and bad

def train_steps(method, model, x, y, steps: int, lr: float, recalibration=None) -> list[float]:
    """The engine's per-step hook sequence (quant/engine.py) on one fixed batch, for tests that look at a
    method between steps: Adam over its groups, loss + extra_loss, after_step; then finish(recalibration)
    if batches are given. Returns each step's total loss."""
    import torch.nn.functional as F

    opt = torch.optim.Adam([{"params": g["params"], "lr": lr * g["lr_mult"]} for g in method.param_groups(model)])
    model.train()
    losses = []
    for step in range(1, steps + 1):
        loss = F.cross_entropy(model(x), y)
        extra = method.extra_loss()
        loss = loss if extra is None else loss + extra
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(model, step, steps)
        losses.append(loss.item())
    if recalibration is not None:
        method.finish(model, recalibration)
    return losses


def make_checkpoint(mode="fp") -> dict:
    """A checkpoint dict shaped like train.py's, from an untrained model."""
    torch.manual_seed(0)
    model = LeNet5()
    method = get_method(mode)
    method.attach(model)
    return {"mode": mode, "config": {"lr": 3e-3, "batch_size": 128, "keep_fp": [], "hyperparams": {}},
            "history": [{"epoch": 1, "train_loss": 0.5, "val_acc": 97.5}], "seed": 0,
            "metrics": {"val_acc": 97.5, "val_loss": 0.1, "train_seconds": 1.0}, "data_checksum": "ab" * 32,
            "state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "export": method.export(model)}


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class WritesMarker:
    """Unpickling this calls open(marker, "w"): proof that a loader executed code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_checkpoints(folder, marker) -> dict:
    """name -> path of every kind of checkpoint eval must refuse (also used by the eval.py script tests)."""
    good = make_checkpoint()
    valid = torch_bytes({"kind": KIND, "format_version": FORMAT_VERSION, **good})
    cases = {
        "empty": b"",
        "truncated": valid[: len(valid) // 2],
        "random": os.urandom(4096),
        "text": b"this is not a checkpoint\n",
        "foreign-dict": torch_bytes({"model": good["state_dict"]}),  # a valid torch file, not ours
        "bare-state-dict": torch_bytes(good["state_dict"]),
        "tensor": torch_bytes(torch.zeros(3)),
        "future-version": torch_bytes({"kind": KIND, "format_version": 999, **good}),
        "lacks-export": torch_bytes({"kind": KIND, "format_version": FORMAT_VERSION,
                                     **{k: v for k, v in good.items() if k != "export"}}),
        "other-mode": torch_bytes({"kind": KIND, "format_version": FORMAT_VERSION, **good, "mode": "ttq"}),
        "code-torch": torch_bytes({"kind": KIND, "format_version": FORMAT_VERSION, **good,
                                   "payload": WritesMarker(marker)}),
        "code-pickle": pickle.dumps({"kind": KIND, "payload": WritesMarker(marker)}),
    }
    paths = {}
    for name, data in cases.items():
        paths[name] = folder / f"{name}.pth"
        paths[name].write_bytes(data)
    paths["missing"] = folder / "missing.pth"
    return paths
