"""Tests of recovjax.data: the embedded MNIST, catalogue errors, batching."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from _tolerance import EPS32
from recovjax._types import Split
from recovjax.data import (batch_split, dataset_names, load_dataset,
                           mnist5k, shuffled_batches)
from recovjax.data.loading import DatasetCorruptedError


def test_split_sizes_and_class_balance_are_exact(mnist):
    assert mnist.train.images.shape == (4000, 28, 28, 1)
    assert mnist.test.images.shape == (1000, 28, 28, 1)
    assert np.bincount(mnist.train.labels, minlength=10).tolist() == [400] * 10
    assert np.bincount(mnist.test.labels, minlength=10).tolist() == [100] * 10
    assert mnist.num_classes == 10 and mnist.input_shape == (28, 28, 1)


def test_dtypes_and_normalisation(mnist):
    for split in (mnist.train, mnist.test):
        assert split.images.dtype == np.float32
        assert split.labels.dtype == np.int32
        assert split.images.min() == -1.0 and split.images.max() == 1.0
    # (x / 255 - 0.5) / 0.5 maps pixel values onto a 255-step grid. Five
    # correctly rounded float32 operations there and back (halving is
    # exact), none over 255 times its input's scale: within 5 * 255 * u.
    steps = (mnist.test.images + 1.0) / 2.0 * 255.0
    np.testing.assert_allclose(steps, np.round(steps), rtol=0,
                               atol=5 * 255 * EPS32 / 2)


def test_train_and_test_are_disjoint_real_digits(mnist):
    pixels, labels = mnist5k.read_raw()
    assert pixels.shape == (5000, 784)
    assert np.all(np.diff(labels) >= 0), "the embedded file is class-sorted"
    train_rows, test_rows = mnist5k.stratified_split(labels)
    assert not set(train_rows) & set(test_rows)
    # The loaded split holds exactly the rows the stratified split chose.
    expected = {bytes(p) for p in pixels[test_rows].astype(np.uint8)}
    got = {bytes(np.round((x.reshape(-1) + 1) / 2 * 255).astype(np.uint8))
           for x in mnist.test.images}
    assert got == expected


def test_split_is_deterministic_and_seeded():
    _, labels = mnist5k.read_raw()
    a = mnist5k.stratified_split(labels)
    b = mnist5k.stratified_split(labels)
    c = mnist5k.stratified_split(labels, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    # The training order mixes classes (the file itself is sorted).
    assert len(set(labels[a[0][:50]])) > 5


def test_second_load_does_not_rebuild(mnist, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("mnist5k was rebuilt on a second load")
    monkeypatch.setattr(mnist5k.Mnist5k, "download_and_prepare", fail)
    again = load_dataset("mnist5k")
    np.testing.assert_array_equal(again.test.labels, mnist.test.labels)
    np.testing.assert_array_equal(again.train.images, mnist.train.images)


def test_data_dir_argument_and_environment(tmp_path, monkeypatch):
    target = tmp_path / "explicit"
    load_dataset("mnist5k", data_dir=target)
    assert (target / "mnist5k" / "1.0.0" / "dataset_info.json").is_file()
    assert any(p.name.endswith("array_record-00000-of-00001")
               for p in (target / "mnist5k" / "1.0.0").iterdir())
    monkeypatch.setenv("RECOVJAX_DATA_DIR", str(tmp_path / "from-env"))
    load_dataset("mnist5k")
    assert (tmp_path / "from-env" / "mnist5k" / "1.0.0").is_dir()


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as error:
        load_dataset("imagenet")
    for name in dataset_names():
        assert name in str(error.value)
    assert "'imagenet'" in str(error.value)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_catalogue_dataset_says_how_to_prepare(name, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_dataset(name, data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert f"tfds build {name} --file_format=array_record" in message
    assert "tensorflow" in message.lower()


def _prepare_fake_catalogue_mnist(root):
    """A small prepared array_record dataset named like the catalogue's."""
    import tensorflow_datasets as tfds

    class Mnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("3.0.1")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.
                FeaturesDict({"image": tfds.features.Tensor(
                    shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12),
                    "test": self._generate_examples(5)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": np.full((28, 28, 1), 255 * (i % 2),
                                           np.uint8), "label": i % 10}

    Mnist(data_dir=str(root), file_format="array_record"
          ).download_and_prepare()
    return root / "mnist" / "3.0.1"


def test_catalogue_dataset_is_read_when_prepared(tmp_path):
    """A prepared array_record dataset named like a catalogue one loads."""
    _prepare_fake_catalogue_mnist(tmp_path)
    data = load_dataset("mnist", data_dir=tmp_path)
    assert data.train.images.shape == (12, 28, 28, 1)
    assert sorted(data.test.labels.tolist()) == [0, 1, 2, 3, 4]
    assert set(np.unique(data.train.images)) == {-1.0, 1.0}


def _train_file(directory):
    (path,) = directory.glob("*-train.array_record-*")
    return path


def test_truncated_catalogue_dataset_names_the_file(tmp_path):
    prepared = _prepare_fake_catalogue_mnist(tmp_path)
    train = _train_file(prepared)
    train.write_bytes(train.read_bytes()[:1000])
    with pytest.raises(DatasetCorruptedError) as error:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(error.value)
    assert message.startswith(f"{train}: cannot read the 'train' split of "
                              "'mnist'; the file is truncated or corrupted (")
    assert "\n" not in message and error.value.path == train
    assert isinstance(error.value, ValueError)  # the CLI's one-line errors
    info = prepared / "dataset_info.json"
    info.write_text(info.read_text()[:100])
    with pytest.raises(DatasetCorruptedError, match="dataset_info.json: "
                       "cannot read the prepared dataset's description"):
        load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "info"])
def test_damaged_mnist5k_is_moved_aside_and_prepared_again(
        mnist, tmp_path, damage, caplog):
    load_dataset("mnist5k", data_dir=tmp_path)
    prepared = tmp_path / "mnist5k"
    version = prepared / "1.0.0"
    if damage == "info":
        target = version / "dataset_info.json"
        target.write_bytes(target.read_bytes()[:200])
    else:
        target = _train_file(version)
        data = target.read_bytes()
        target.write_bytes(data[:len(data) // 2] if damage == "truncate"
                           else data[:1000] + bytes(len(data) - 1000))
    damaged = target.read_bytes()
    with caplog.at_level(logging.WARNING, logger="recovjax.data.loading"):
        again = load_dataset("mnist5k", data_dir=tmp_path)
    np.testing.assert_array_equal(again.train.images, mnist.train.images)
    np.testing.assert_array_equal(again.test.labels, mnist.test.labels)
    (moved,) = tmp_path.glob("mnist5k.corrupt-*")
    # Kept for inspection, damage included; the rebuilt file is whole.
    assert (moved / target.relative_to(prepared)).read_bytes() == damaged
    assert target.read_bytes() != damaged
    (record,) = [r for r in caplog.records
                 if r.name == "recovjax.data.loading"]
    message = record.getMessage()
    assert "\n" not in message
    assert f"prepared dataset {prepared} is unreadable" in message
    assert str(target) in message and str(moved) in message
    assert message.endswith("and preparing it again")


def test_batch_split_pads_and_masks_without_dropping():
    images = np.arange(7 * 4, dtype=np.float32).reshape(7, 2, 2, 1)
    labels = np.arange(7, dtype=np.int32)
    batches = batch_split(Split(images, labels), batch_size=3)
    assert batches.images.shape == (3, 3, 2, 2, 1)
    assert np.asarray(batches.mask).sum() == 7
    assert np.asarray(batches.mask).tolist() == [[1, 1, 1], [1, 1, 1],
                                                 [1, 0, 0]]
    real = np.asarray(batches.labels)[np.asarray(batches.mask)]
    np.testing.assert_array_equal(real, labels)


@pytest.mark.parametrize("size", [0, -3])
def test_batch_split_rejects_bad_batch_size(size):
    with pytest.raises(ValueError, match="batch_size"):
        batch_split(Split(np.zeros((4, 1, 1, 1), np.float32),
                          np.zeros(4, np.int32)), size)


def test_shuffled_batches_cover_every_example_once_with_weight():
    import jax
    import jax.numpy as jnp
    n = 11
    images = jnp.arange(n, dtype=jnp.float32).reshape(n, 1, 1, 1)
    labels = jnp.arange(n, dtype=jnp.int32)
    batches = shuffled_batches(jax.random.key(3), images, labels,
                               jnp.ones(n), batch_size=4)
    assert batches.images.shape == (3, 4, 1, 1, 1)
    weights = np.asarray(batches.mask).reshape(-1)
    seen = np.asarray(batches.labels).reshape(-1)[weights > 0]
    assert sorted(seen.tolist()) == list(range(n))
    other = shuffled_batches(jax.random.key(4), images, labels, jnp.ones(n), 4)
    assert not np.array_equal(np.asarray(other.labels),
                              np.asarray(batches.labels))
