"""quant/files.py: atomic writes leave the old file whole (and no temp file) whenever the write fails midway,
keep file permissions like an ordinary write, and `locked` excludes a second holder."""
import json
import os
import stat
import threading
import time

import pytest

from quant import files
from quant.files import atomic_write_bytes, atomic_write_json, atomic_write_text, locked

OLD, NEW = b"old complete contents\n" * 100, b"new contents\n" * 1000


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "results.csv"
    path.write_bytes(OLD)
    return path


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "f.bin"  # folders created on demand
    atomic_write_bytes(path, OLD)
    assert path.read_bytes() == OLD
    atomic_write_bytes(path, NEW)
    assert path.read_bytes() == NEW
    assert os.listdir(path.parent) == ["f.bin"]


def test_text_and_json(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "ünïcode\n")
    assert (tmp_path / "t.txt").read_bytes() == "ünïcode\n".encode("utf-8")
    obj = {"a": [1, 2.5, None], "b": {"c": "d"}}
    atomic_write_json(tmp_path / "j.json", obj)
    assert json.loads((tmp_path / "j.json").read_text()) == obj


def fail(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("stage", ["fsync", "replace"])
def test_failure_midway_keeps_old_file(target, monkeypatch, stage):
    monkeypatch.setattr(files.os, stage, fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, NEW)
    monkeypatch.undo()
    assert target.read_bytes() == OLD
    assert os.listdir(target.parent) == [target.name]  # the temp file was removed


def test_failure_inside_write_keeps_old_file(target, monkeypatch):
    """The data is half written to the temp file when the write raises (e.g. SIGINT -> KeyboardInterrupt)."""
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def fileno(self):
            return self.f.fileno()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, NEW)
    monkeypatch.undo()
    assert target.read_bytes() == OLD
    assert os.listdir(target.parent) == [target.name]


def test_new_file_gets_ordinary_permissions(tmp_path):
    reference = tmp_path / "plain"
    reference.write_bytes(b"x")  # what open() would create under the current umask
    atomic_write_bytes(tmp_path / "atomic", b"x")
    assert stat.S_IMODE((tmp_path / "atomic").stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_replaced_file_keeps_its_permissions(target):
    os.chmod(target, 0o640)
    atomic_write_bytes(target, NEW)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_locked_excludes_a_second_holder(tmp_path):
    path = tmp_path / "results.csv"
    events, first_in = [], threading.Event()

    def first():
        with locked(path):
            events.append("first in")
            first_in.set()
            time.sleep(0.3)
            events.append("first out")

    def second():
        first_in.wait()
        with locked(path):
            events.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert events == ["first in", "first out", "second in"]
    assert (tmp_path / "results.csv.lock").exists() and not path.exists()
