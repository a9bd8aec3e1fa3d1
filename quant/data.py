"""MNIST as whole in-memory tensors: read (or download) the four IDX files once, verify, split, slice batches.

IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): big-endian int32 magic 0x00000803 (images,
then N, rows, cols) or 0x00000801 (labels, then N), then uint8 data. Decoded files are checked against
the published SHA-256 sums, so a corrupt or substituted file can never silently train a model.
Images are normalised with the usual MNIST mean/std (0.1307, 0.3081) and kept as one float32 tensor;
batches are slices of it, so there is no per-sample Dataset/PIL work in the training path.
"""
import hashlib
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .errors import QuantError

MEAN, STD = 0.1307, 0.3081

# name -> (IDX magic, dims after N, expected N, SHA-256 of the decoded file)
FILES = {
    "train-images-idx3-ubyte": (0x803, (28, 28), 60000, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels-idx1-ubyte": (0x801, (), 60000, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "t10k-images-idx3-ubyte": (0x803, (28, 28), 10000, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "t10k-labels-idx1-ubyte": (0x801, (), 10000, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
HINT = "pass --data-dir pointing at a folder with the four MNIST IDX files (e.g. --data-dir ../shared/mnist)"


class DataError(QuantError, ValueError):
    """MNIST is missing, corrupt, or could not be downloaded."""


@dataclass
class MNIST:
    train_x: torch.Tensor  # float32 [N, 1, 28, 28], normalised
    train_y: torch.Tensor  # int64 [N]
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    checksum: str  # SHA-256 over the four decoded files' SHA-256 sums


def find_idx_file(data_dir: Path, name: str) -> Path | None:
    """The file `name` (raw or .gz) in `data_dir` or torchvision's `data_dir/MNIST/raw/` layout."""
    candidates = (folder / f"{name}{gz}" for folder in (data_dir, data_dir / "MNIST" / "raw") for gz in ("", ".gz"))
    return next((path for path in candidates if path.is_file()), None)


def read_idx(path: Path, magic: int, dims: tuple, count: int | None, sha256: str | None) -> tuple[np.ndarray, str]:
    """Decode one IDX file (raw or gzip) into a uint8 array after checking magic, shape, length and SHA-256.

    Neither the file nor its decompressed content is read past the largest valid size (`count` images, or as
    many as MNIST's largest split holds), so a huge or crafted file (a gzip bomb) costs no more than MNIST.
    """
    ndim = 1 + len(dims)
    limit = 4 + 4 * ndim + (count or FILES["train-images-idx3-ubyte"][2]) * int(np.prod(dims))
    try:
        with open(path, "rb") as f:
            raw = f.read(2 * limit + 1024)  # room for gzip's overhead on incompressible data
        if raw[:2] == b"\x1f\x8b" and len(raw) < 2 * limit + 1024:
            inflater = zlib.decompressobj(wbits=31)  # one gzip member, as MNIST's .gz files are
            raw = inflater.decompress(raw, limit + 1)
            if len(raw) <= limit and (not inflater.eof or inflater.unused_data):
                raise EOFError("the gzip stream ends early or has data after it")
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: corrupt deflate stream
        raise DataError(f"{path}: cannot read ({e}); {HINT}") from None
    if len(raw) > limit:
        raise DataError(f"{path}: larger than any valid IDX file of this kind ({limit:,} bytes); {HINT}")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: too short to be an IDX file ({len(raw)} bytes); {HINT}")
    found_magic, *shape = struct.unpack(f">{1 + ndim}i", raw[:4 + 4 * ndim])
    if found_magic != magic:
        raise DataError(f"{path}: wrong IDX magic 0x{found_magic:08x}, expected 0x{magic:08x}; {HINT}")
    if tuple(shape[1:]) != tuple(dims) or (count is not None and shape[0] != count):
        raise DataError(f"{path}: IDX shape {tuple(shape)}, expected ({count or 'N'}, {', '.join(map(str, dims))}); {HINT}")
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path}: truncated or padded IDX data ({len(body)} bytes, expected {int(np.prod(shape))}); {HINT}")
    digest = hashlib.sha256(raw).hexdigest()
    if sha256 is not None and digest != sha256:
        raise DataError(f"{path}: SHA-256 {digest[:12]}... does not match the published MNIST sum "
                        f"{sha256[:12]}... (corrupt or not MNIST); {HINT}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape), digest


def download(data_dir: Path) -> None:
    """Fetch MNIST through torchvision into `data_dir/MNIST/raw/`; a failure becomes one DataError line."""
    try:
        import torchvision

        torchvision.datasets.MNIST(root=str(data_dir), download=True)  # fetches all four files
    except Exception as e:  # network errors come in many types; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"MNIST not found in {data_dir} and download failed ({first}); {HINT}") from None


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], (x / 255 - mean) / std."""
    x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255)
    return x.sub_(MEAN).div_(STD)


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (not stratified) seeded split of range(n) into (train, val) index tensors."""
    if not 0 <= val_size < max(n, 1):  # n = 0 (load_mnist's test_only): two empty sets
        raise DataError(f"--val-size {val_size} must be in [0, {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def load_mnist(data_dir="data", val_size: int = 0, split_seed: int = 0, train_subset: int | None = None,
               verify_checksum: bool = True, allow_download: bool = True, test_only: bool = False) -> MNIST:
    """Load the four IDX files from `data_dir` (downloading if absent), verify them, split off `val_size` random
    training images for validation (seeded by `split_seed`), then keep the first `train_subset` training images
    (quick runs). `test_only` skips decoding the training files (evaluation needs only the test set)."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"{data_dir} is not a folder; {HINT}")
    if allow_download and any(find_idx_file(data_dir, name) is None for name in FILES):
        download(data_dir)
    tensors, digests = [], []
    for name, (magic, dims, count, sha) in FILES.items():
        if test_only and name.startswith("train"):
            array = np.zeros((0, *dims), np.uint8)
        elif (path := find_idx_file(data_dir, name)) is None:
            raise DataError(f"{data_dir}: missing {name}[.gz]; {HINT}")
        else:
            array, digest = read_idx(path, magic, dims, *((count, sha) if verify_checksum else (None, None)))
            digests.append(digest)
        tensors.append(normalise(array) if dims else torch.from_numpy(array.astype(np.int64)))
    train_x, train_y, test_x, test_y = tensors
    for split, x, y in (("train", train_x, train_y), ("t10k", test_x, test_y)):
        if len(x) != len(y):
            raise DataError(f"{data_dir}: {split} images and labels differ in count; {HINT}")
    full = MNIST(train_x, train_y, train_x[:0], train_y[:0], test_x, test_y,
                 checksum=hashlib.sha256("".join(digests).encode()).hexdigest())
    return resplit(full, val_size, split_seed, train_subset)


def resplit(full: MNIST, val_size: int, seed: int, train_subset: int | None = None) -> MNIST:
    """load_mnist's split of `full` = load_mnist(val_size=0) (all training images in file order): the study
    re-draws each seed's validation split by this one index gather instead of decoding the files again."""
    if len(full.val_y):
        raise ValueError("resplit needs an unsplit load (load_mnist(..., val_size=0))")
    train_idx, val_idx = split_indices(len(full.train_y), val_size, seed)
    train_idx = train_idx[:train_subset]  # None: all
    return replace(full, train_x=full.train_x[train_idx], train_y=full.train_y[train_idx],
                   val_x=full.train_x[val_idx], val_y=full.train_y[val_idx])


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None):
    """Yield (x, y) mini-batches sliced from in-memory tensors, shuffled by `generator` if given (then a trailing
    batch of one sample is dropped: BatchNorm cannot train on it)."""
    n = len(y)
    # The permutation moves to x's device once: indexing CUDA data with a CPU index would copy (and wait) per batch.
    order = torch.randperm(n, generator=generator).to(x.device) if generator is not None else None
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if stop - start < 2 and generator is not None:
            break
        idx = slice(start, stop) if order is None else order[start:stop]
        yield x[idx], y[idx]


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an independent random (dy, dx) in [-max_shift, max_shift], filling with background:
    one flat gather over the padded batch (no per-sample Python loop), ~1 ms per 128 images, far below a step."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    s = max_shift
    padded = torch.nn.functional.pad(x, (s, s, s, s), value=(0.0 - MEAN) / STD).reshape(n, -1)
    dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=generator).to(x.device)
    pw = w + 2 * s
    window = (torch.arange(h, device=x.device)[:, None] * pw + torch.arange(w, device=x.device)[None, :]).reshape(-1)
    index = window[None, :] + (dy * pw + dx)[:, None]
    return torch.gather(padded, 1, index).reshape(n, 1, h, w)
