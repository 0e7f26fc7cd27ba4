"""Fashion-MNIST from its IDX files: the TFDS builder, its checks, the real files."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest

from recovjax.data import fashion_mnist
from recovjax.data.fashion_mnist import (DEBIAN_DIR, FILES, FashionMnistIdx,
                                         SourceFilesError, read_files)
from recovjax.data.loading import (dataset_features, dataset_prepared,
                                   load_dataset)


def idx_bytes(array: np.ndarray) -> bytes:
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_files(directory, *, counts=(30, 10), compress=True, seed=0):
    """Four small IDX files shaped like Fashion-MNIST's; their arrays."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count in zip(("train", "test"), counts):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 28, 28),
                                                 dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 10).astype(np.uint8)
    for key, stem in FILES.items():
        data = idx_bytes(arrays[key])
        if compress:
            (directory / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (directory / stem).write_bytes(data)
    return arrays


def digests_of(directory):
    return {key: frozenset({hashlib.sha256(
        (directory / (stem + ".gz")).read_bytes()).hexdigest()})
        for key, stem in FILES.items()}


@pytest.mark.parametrize("compress", [True, False])
def test_read_files_parses_gzipped_and_plain_idx(tmp_path, compress):
    written = write_files(tmp_path, compress=compress)
    found = read_files(tmp_path, digests=None)
    for key, array in written.items():
        np.testing.assert_array_equal(found[key], array)


def test_the_builder_prepares_once_and_reads_without_tensorflow(tmp_path):
    source = tmp_path / "idx"
    written = write_files(source)
    builder = FashionMnistIdx(source=source, digests=digests_of(source),
                              data_dir=str(tmp_path / "data"),
                              file_format="array_record")
    builder.download_and_prepare()
    assert builder.is_prepared()
    test = builder.as_data_source(split="test")
    assert len(test) == 10
    for record in test:
        index = int(record["index"])
        np.testing.assert_array_equal(np.asarray(record["image"])[..., 0],
                                      written["test_images"][index])
        assert record["label"] == written["test_labels"][index]
    assert sorted(int(r["index"]) for r in test) == list(range(10))
    assert len(builder.as_data_source(split="train")) == 30


def test_files_of_other_contents_are_refused_with_how_to_get_them(
        tmp_path, monkeypatch):
    write_files(tmp_path)
    with pytest.raises(SourceFilesError, match="train-images-idx3-ubyte.gz"
                       ".*SHA-256.*apt-get install dataset-fashion-mnist"):
        read_files(tmp_path)
    # The environment variable names the directory; the pinned digests stay.
    monkeypatch.setenv(fashion_mnist.SOURCE_ENV, str(tmp_path))
    assert fashion_mnist.source_dir() == tmp_path
    with pytest.raises(SourceFilesError, match="SHA-256"):
        read_files()


def test_missing_and_malformed_files_name_the_path(tmp_path):
    with pytest.raises(SourceFilesError, match=str(tmp_path / FILES[
            "train_images"]) + r"\.gz.*not found.*apt-get"):
        read_files(tmp_path, digests=None)
    write_files(tmp_path)
    labels = tmp_path / (FILES["test_labels"] + ".gz")
    labels.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(8)))
    with pytest.raises(SourceFilesError, match="t10k-labels.*magic"):
        read_files(tmp_path, digests=None)
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(12, np.uint8))[:-3]))
    with pytest.raises(SourceFilesError, match="t10k-labels.*header"):
        read_files(tmp_path, digests=None)
    labels.write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(SourceFilesError, match="gzip"):
        read_files(tmp_path, digests=None)
    labels.write_bytes(gzip.compress(idx_bytes(np.full(10, 12, np.uint8))))
    with pytest.raises(SourceFilesError, match="label 12 outside"):
        read_files(tmp_path, digests=None)
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(9, np.uint8))))
    with pytest.raises(SourceFilesError, match="do not pair up"):
        read_files(tmp_path, digests=None)


def test_the_dataset_is_known_before_it_is_built(tmp_path, monkeypatch):
    assert dataset_features("fashion_mnist") == ((28, 28, 1), 10)
    monkeypatch.setenv(fashion_mnist.SOURCE_ENV, str(tmp_path / "none"))
    assert not dataset_prepared("fashion_mnist", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_dataset("fashion_mnist", data_dir=tmp_path)
    assert not any((tmp_path / "fashion_mnist_idx").rglob("*.array_record*"))


@pytest.mark.skipif(
    not all((DEBIAN_DIR / (stem + ".gz")).is_file() for stem in FILES.values()),
    reason=f"the real Fashion-MNIST files are not in {DEBIAN_DIR}; install "
    "them with: apt-get install dataset-fashion-mnist")
def test_the_real_debian_files_build_full_size_fashion_mnist(tmp_path,
                                                             monkeypatch):
    monkeypatch.delenv(fashion_mnist.SOURCE_ENV, raising=False)
    assert dataset_prepared("fashion_mnist", data_dir=tmp_path)
    data = load_dataset("fashion_mnist", data_dir=tmp_path)
    assert data.train.images.shape == (60_000, 28, 28, 1)
    assert data.test.images.shape == (10_000, 28, 28, 1)
    assert data.num_classes == 10
    assert np.bincount(data.test.labels).tolist() == [1000] * 10
    assert np.bincount(data.train.labels).tolist() == [6000] * 10
    assert data.train.images.min() == -1.0 and data.train.images.max() == 1.0
    # Prepared once: the second load reads the same files back.
    again = load_dataset("fashion_mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(again.test.images, data.test.images)
