"""quant/data.py: IDX decoding against hand-built bytes, every corruption a DataError naming the file and
`--data-dir`, the real files against the published SHA-256 sums, seeded splits and batch slicing."""
import gzip
import struct
import hashlib
import shutil

import numpy as np
import pytest
import torch

from conftest import IDX_NAMES, N_TEST, N_TRAIN, synthetic_split, write_idx
from quant import data as qdata
from quant.data import DataError, batches, load_mnist, read_idx, split_indices

# Published SHA-256 of the decoded (gunzipped) MNIST files, copied from the dataset's checksum lists.
PUBLISHED_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# Class frequencies of the real MNIST training and test labels (well-known counts, e.g. 6742 ones).
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(array: np.ndarray) -> bytes:
    """Reference IDX encoder, independent of write_idx: magic 0x0000080{ndim}, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def assert_data_error(excinfo, path, *words):
    message = str(excinfo.value)
    assert str(path) in message, message
    assert "--data-dir" in message, message
    assert "\n" not in message
    for word in words:
        assert word in message, message


# ---------------------------------------------------------------- reading IDX files

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape", [(7, 28, 28), (13,), (0,)])
def test_read_idx_decodes_reference_bytes(tmp_path, gz, shape):
    array = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    raw = idx_bytes(array)
    path = tmp_path / "f"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    dims = shape[1:]
    decoded, digest = read_idx(path, 0x803 if len(shape) == 3 else 0x801, dims, shape[0], None)
    np.testing.assert_array_equal(decoded, array)
    assert digest == hashlib.sha256(raw).hexdigest()  # the sum is over the decoded bytes, gz or not


@pytest.mark.parametrize("gz", [False, True])
def test_write_idx_matches_reference_encoder(tmp_path, gz):
    images, labels = synthetic_split(5, seed=3)
    for array in (images, labels):
        write_idx(tmp_path / "f", array, gz=gz)
        written = (tmp_path / "f").read_bytes()
        assert (gzip.decompress(written) if gz else written) == idx_bytes(array)


def test_wrong_magic(tmp_path, synthetic_mnist):
    # A labels file where the images file belongs: the magic number gives it away.
    path = tmp_path / "train-images-idx3-ubyte"
    shutil.copy(synthetic_mnist / "train-labels-idx1-ubyte", path)
    with pytest.raises(DataError) as e:
        read_idx(path, 0x803, (28, 28), None, None)
    assert_data_error(e, path, "magic")


@pytest.mark.parametrize("keep", [0, 3, 11, 16 + 28 * 28 * 5 + 17])
def test_truncated(tmp_path, synthetic_mnist, keep):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes((synthetic_mnist / path.name).read_bytes()[:keep])
    with pytest.raises(DataError) as e:
        read_idx(path, 0x803, (28, 28), None, None)
    assert_data_error(e, path)


def test_padded(tmp_path, synthetic_mnist):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes((synthetic_mnist / path.name).read_bytes() + b"\0")
    with pytest.raises(DataError) as e:
        read_idx(path, 0x801, (), None, None)
    assert_data_error(e, path, "padded")


@pytest.mark.parametrize("damage", ["truncated", "flipped", "header"])
def test_corrupt_gzip(tmp_path, synthetic_mnist_gz, damage):
    good = (synthetic_mnist_gz / "train-images-idx3-ubyte.gz").read_bytes()
    bad = {"truncated": good[: len(good) // 2],
           "flipped": good[:12] + bytes(b ^ 0xFF for b in good[12:-8]) + good[-8:],  # corrupt deflate stream
           "header": b"\x1f\x8b" + bytes(range(200))}[damage]
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(bad)
    with pytest.raises(DataError) as e:
        read_idx(path, 0x803, (28, 28), None, None)
    assert_data_error(e, path)


@pytest.mark.parametrize("gz", [False, True])
def test_a_file_larger_than_mnist_is_refused_without_reading_it_all(tmp_path, gz):
    """60,001 labels (MNIST's largest split holds 60,000): raw, or a gzip bomb of a few hundred bytes."""
    path = tmp_path / "train-labels-idx1-ubyte"
    raw = struct.pack(">ii", 0x801, 60_001) + bytes(60_001)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError) as e:
        read_idx(path, 0x801, (), None, None)
    assert_data_error(e, path, "larger than")


def test_data_after_the_gzip_stream_is_refused(tmp_path, synthetic_mnist_gz):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes((synthetic_mnist_gz / path.name).read_bytes() * 2)
    with pytest.raises(DataError) as e:
        read_idx(path, 0x803, (28, 28), None, None)
    assert_data_error(e, path)


def test_wrong_checksum_names_file_and_fix(synthetic_mnist):
    path = synthetic_mnist / "t10k-labels-idx1-ubyte"
    with pytest.raises(DataError) as e:
        read_idx(path, 0x801, (), None, PUBLISHED_SHA256["t10k-labels-idx1-ubyte"])
    assert_data_error(e, path, "SHA-256")


def test_wrong_count(synthetic_mnist):
    path = synthetic_mnist / "t10k-labels-idx1-ubyte"
    with pytest.raises(DataError) as e:
        read_idx(path, 0x801, (), 10000, None)
    assert_data_error(e, path, "shape")


# ---------------------------------------------------------------- load_mnist on synthetic folders

def expected_normalised(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float64) / 255 - 0.1307) / 0.3081)[:, None].astype(np.float32)


@pytest.mark.parametrize("layout", ["raw", "gz", "torchvision", "torchvision-gz"])
def test_load_mnist_layouts(tmp_path, synthetic_mnist, synthetic_mnist_gz, layout):
    source = synthetic_mnist_gz if layout.endswith("gz") else synthetic_mnist
    if layout.startswith("torchvision"):
        folder = tmp_path / "root"
        shutil.copytree(source, folder / "MNIST" / "raw")
    else:
        folder = source
    d = load_mnist(folder, val_size=0, verify_checksum=False, allow_download=False)
    train_x, train_y = synthetic_split(N_TRAIN, 0)
    test_x, test_y = synthetic_split(N_TEST, 1)
    np.testing.assert_allclose(d.train_x.numpy(), expected_normalised(train_x), atol=1e-5)
    np.testing.assert_array_equal(d.train_y.numpy(), train_y)
    np.testing.assert_allclose(d.test_x.numpy(), expected_normalised(test_x), atol=1e-5)
    np.testing.assert_array_equal(d.test_y.numpy(), test_y)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.val_x.shape == (0, 1, 28, 28)


def test_raw_and_gz_give_same_checksum(synthetic_mnist, synthetic_mnist_gz):
    a = load_mnist(synthetic_mnist, val_size=10, verify_checksum=False, allow_download=False)
    b = load_mnist(synthetic_mnist_gz, val_size=10, verify_checksum=False, allow_download=False)
    assert a.checksum == b.checksum
    sums = "".join(hashlib.sha256((synthetic_mnist / n).read_bytes()).hexdigest() for n in IDX_NAMES)
    assert a.checksum == hashlib.sha256(sums.encode()).hexdigest()


def test_verified_load_rejects_synthetic_data(synthetic_mnist):
    with pytest.raises(DataError) as e:
        load_mnist(synthetic_mnist, verify_checksum=True, allow_download=False)
    assert "--data-dir" in str(e.value) and str(synthetic_mnist) in str(e.value)


def test_missing_file(mnist_copy):
    (mnist_copy / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError) as e:
        load_mnist(mnist_copy, verify_checksum=False, allow_download=False)
    assert "t10k-images-idx3-ubyte" in str(e.value) and "--data-dir" in str(e.value)


def test_data_dir_is_a_file(tmp_path):
    path = tmp_path / "mnist.txt"
    path.write_text("not a folder")
    with pytest.raises(DataError) as e:
        load_mnist(path, verify_checksum=False)
    assert str(path) in str(e.value) and "--data-dir" in str(e.value)


def test_image_and_label_counts_must_agree(mnist_copy):
    write_idx(mnist_copy / "train-labels-idx1-ubyte", np.zeros(N_TRAIN - 1, np.uint8))
    with pytest.raises(DataError, match="differ in count"):
        load_mnist(mnist_copy, val_size=10, verify_checksum=False, allow_download=False)


def test_missing_folder_with_failing_download(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise ConnectionError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    folder = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_mnist(folder)
    message = str(e.value)
    assert "download failed" in message and "Network is unreachable" in message
    assert str(folder) in message and "--data-dir" in message and "\n" not in message


def test_no_download_when_files_present(synthetic_mnist, monkeypatch):
    monkeypatch.setattr(qdata, "download", lambda *a: pytest.fail("downloaded although the files exist"))
    load_mnist(synthetic_mnist, val_size=10, verify_checksum=False)


def test_test_only_skips_training_files(mnist_copy):
    (mnist_copy / "train-images-idx3-ubyte").write_bytes(b"garbage")
    d = load_mnist(mnist_copy, test_only=True, verify_checksum=False, allow_download=False)
    assert len(d.train_y) == len(d.val_y) == 0 and len(d.test_y) == N_TEST


# ---------------------------------------------------------------- the real MNIST

def test_real_mnist_matches_published_sums(real_mnist):
    for name, expected in PUBLISHED_SHA256.items():
        path = qdata.find_idx_file(real_mnist, name)
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        assert hashlib.sha256(raw).hexdigest() == expected, name
    d = load_mnist(real_mnist, val_size=5000, allow_download=False)  # verify_checksum=True by default
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (55000, 5000, 10000)
    all_train = torch.cat([d.train_y, d.val_y])
    assert torch.bincount(all_train, minlength=10).tolist() == TRAIN_COUNTS
    assert torch.bincount(d.test_y, minlength=10).tolist() == TEST_COUNTS
    # Normalisation: over the full training set the pixels have mean ~0 and std ~1 by construction.
    assert abs(d.train_x.mean().item()) < 0.01 and abs(d.train_x.std().item() - 1) < 0.01


# ---------------------------------------------------------------- splits and batches

@pytest.mark.parametrize("n,val", [(10, 0), (10, 3), (100, 99), (512, 64)])
def test_split_is_a_disjoint_cover(n, val):
    train, val_idx = split_indices(n, val, seed=5)
    assert len(val_idx) == val and len(train) == n - val
    assert set(train.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train.tolist() + val_idx.tolist()) == list(range(n))


def test_split_deterministic_per_seed_and_differs_across_seeds():
    assert all(torch.equal(a, b) for a, b in zip(split_indices(1000, 100, 7), split_indices(1000, 100, 7)))
    vals = {tuple(split_indices(1000, 100, seed)[1].tolist()) for seed in range(5)}
    assert len(vals) == 5


@pytest.mark.parametrize("val", [-1, 10, 11])
def test_split_rejects_bad_val_size(val):
    with pytest.raises(DataError, match="--val-size"):
        split_indices(10, val, 0)


def test_load_mnist_split_and_subset(synthetic_mnist):
    full = load_mnist(synthetic_mnist, val_size=0, verify_checksum=False, allow_download=False)
    a = load_mnist(synthetic_mnist, val_size=64, split_seed=1, verify_checksum=False, allow_download=False)
    b = load_mnist(synthetic_mnist, val_size=64, split_seed=1, verify_checksum=False, allow_download=False)
    c = load_mnist(synthetic_mnist, val_size=64, split_seed=2, verify_checksum=False, allow_download=False)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.val_x, c.val_x)
    # The split rows are exactly the rows split_indices names, train and val disjoint.
    train_idx, val_idx = split_indices(N_TRAIN, 64, 1)
    assert torch.equal(a.train_x, full.train_x[train_idx]) and torch.equal(a.val_y, full.train_y[val_idx])
    sub = load_mnist(synthetic_mnist, val_size=64, split_seed=1, train_subset=100, verify_checksum=False,
                     allow_download=False)
    assert torch.equal(sub.train_x, a.train_x[:100]) and torch.equal(sub.val_x, a.val_x)


def test_batches_in_order_cover_everything():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    got = list(batches(x, y, 3))
    assert [len(b) for _, b in got] == [3, 3, 3, 1]  # evaluation keeps a trailing single sample
    assert torch.equal(torch.cat([b for _, b in got]), y)
    assert all(torch.equal(bx[:, 0].long(), by) for bx, by in got)


@pytest.mark.parametrize("n,size", [(10, 3), (11, 5), (12, 4), (7, 7)])
def test_shuffled_batches_are_a_seeded_permutation(n, size):
    x, y = torch.arange(float(n))[:, None], torch.arange(n)
    got = list(batches(x, y, size, torch.Generator().manual_seed(3)))
    seen = torch.cat([b for _, b in got])
    assert all(torch.equal(bx[:, 0].long(), by) for bx, by in got)  # images stay with their labels
    assert len(set(seen.tolist())) == len(seen)
    dropped = n - len(seen)
    assert dropped == (1 if n % size == 1 else 0)  # only a lone trailing sample is dropped (BatchNorm)
    again = torch.cat([b for _, b in batches(x, y, size, torch.Generator().manual_seed(3))])
    assert torch.equal(seen, again)
    other = torch.cat([b for _, b in batches(x, y, size, torch.Generator().manual_seed(4))])
    assert not torch.equal(seen, other)
