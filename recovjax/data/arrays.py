"""A user's own data: datasets from arrays on disk, and registered loaders.

``load_arrays("data/mine.npz")`` reads an ``.npz`` archive of images and
labels into a :class:`~recovjax.Dataset`, or one of token windows into a
:class:`~recovjax.data.text.TextDataset` (for the ``language_model``
task). :func:`register_dataset` gives
any loader a name that :func:`~recovjax.data.load_dataset`, configs and
the CLI accept.

An archive holds either one set, split here deterministically, or both
splits:

* ``images`` (``[N, H, W, C]`` or ``[N, ...]``) and ``labels`` (``int[N]``),
  with the last ``test_fraction`` of the examples (in archive order) the
  test split; or
* ``train_images``, ``train_labels``, ``test_images``, ``test_labels``;
* ``tokens`` (``int[N, T + 1]`` windows; optionally ``mask``, ``True`` on
  real tokens), split the same way; or ``train_tokens`` and ``test_tokens``
  (optionally ``train_mask``, ``test_mask``). The vocabulary is the largest
  id plus one unless ``num_classes`` says otherwise.

``uint8`` images are normalised like the built-in datasets (``(x / 255 -
0.5) / 0.5``); floating-point images are used as they are.
"""

from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Callable

import numpy as np

from recovjax._types import Dataset, Split

DatasetLoader = Callable[..., Dataset]
"""``loader(data_dir=None) -> Dataset``."""

_LOADERS: dict[str, DatasetLoader] = {}


class ArraysError(ValueError):
    """An archive of arrays that is not a usable dataset."""


def _normalise_images(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype == np.uint8:
        return ((images.astype(np.float32) / 255.0 - 0.5) / 0.5).astype(
            np.float32)
    if not np.issubdtype(images.dtype, np.floating):
        raise ArraysError(f"{where}: images must be uint8 pixels or floats, "
                          f"got {images.dtype}")
    if not np.all(np.isfinite(images)):
        raise ArraysError(f"{where}: images hold NaN or infinite values")
    return images.astype(np.float32)


def _split(images: np.ndarray, labels: np.ndarray, num_classes: int,
           where: str) -> Split:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ArraysError(f"{where}: labels must be a 1-D integer array, got "
                          f"{labels.dtype}{list(labels.shape)}")
    if images.ndim < 2 or images.shape[0] != labels.shape[0]:
        raise ArraysError(f"{where}: images {list(images.shape)} and labels "
                          f"{list(labels.shape)} disagree on the number of "
                          "examples")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ArraysError(f"{where}: labels must lie in [0, {num_classes}), "
                          f"found {labels.min()}..{labels.max()}")
    return Split(_normalise_images(images, where), labels.astype(np.int32))


def load_arrays(path: os.PathLike[str] | str, *, name: str | None = None,
                test_fraction: float = 0.2, num_classes: int | None = None
                ) -> Dataset:
    """A dataset from an ``.npz`` archive of images and labels.

    Args:
        path: the archive (see the module docstring for its keys).
        name: the dataset's name (default: the file's stem).
        test_fraction: share of a single set used as the test split (its
            last examples), in ``(0, 1)``.
        num_classes: the number of classes (default: the largest label
            plus one).

    Returns:
        The :class:`~recovjax.Dataset`, or a
        :class:`~recovjax.data.text.TextDataset` for an archive of tokens
        (``num_classes`` is then the vocabulary size).

    Raises:
        FileNotFoundError: for a missing file (naming it).
        ArraysError: for an unreadable archive, missing or extra keys, or
            arrays that do not fit together (the message names the path
            and the arrays).
        ValueError: for a bad ``test_fraction``.
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got "
                         f"{test_fraction!r}")
    try:
        with open(path, "rb") as handle, np.load(handle,
                                                  allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ArraysError(f"{path}: not a readable .npz archive ({error})"
                          ) from error
    single = {"images", "labels"}
    both = {"train_images", "train_labels", "test_images", "test_labels"}
    keys = set(arrays)
    if keys & {"tokens", "mask", "train_tokens", "test_tokens"}:
        return _token_dataset(path, arrays, name or path.stem,
                              float(test_fraction), num_classes)
    if keys == single:
        images, labels = arrays["images"], arrays["labels"]
        test = max(1, int(round(len(labels) * float(test_fraction))))
        if test >= len(labels):
            raise ArraysError(f"{path}: {len(labels)} examples are too few "
                              "to split into train and test")
        parts = {"train": (images[:-test], labels[:-test]),
                 "test": (images[-test:], labels[-test:])}
    elif keys == both:
        parts = {split: (arrays[f"{split}_images"], arrays[f"{split}_labels"])
                 for split in ("train", "test")}
    else:
        raise ArraysError(
            f"{path}: holds arrays {sorted(keys)}; a dataset archive holds "
            f"exactly {sorted(single)} or {sorted(both)}")
    found = max(int(part[1].max(initial=-1)) for part in parts.values()) + 1
    classes = found if num_classes is None else int(num_classes)
    if classes < 1:
        raise ArraysError(f"{path}: no labels")
    splits = {split: _split(images, labels, classes, f"{path} ({split})")
              for split, (images, labels) in parts.items()}
    if splits["train"].images.shape[1:] != splits["test"].images.shape[1:]:
        raise ArraysError(f"{path}: train and test examples have different "
                          f"shapes")
    return Dataset(name=name or path.stem, train=splits["train"],
                   test=splits["test"], num_classes=classes)


def _token_split(tokens: np.ndarray, mask: np.ndarray | None, where: str):
    from recovjax.data.text import TextSplit
    if tokens.ndim != 2 or tokens.shape[1] < 2 or not np.issubdtype(
            tokens.dtype, np.integer):
        raise ArraysError(f"{where}: tokens must be an integer array [N, T + "
                          f"1] with T >= 1, got {tokens.dtype}"
                          f"{list(tokens.shape)}")
    if mask is None:
        mask = np.ones(tokens.shape, bool)
    elif mask.shape != tokens.shape:
        raise ArraysError(f"{where}: mask {list(mask.shape)} must have the "
                          f"shape of tokens {list(tokens.shape)}")
    if tokens.size and tokens.min() < 0:
        raise ArraysError(f"{where}: token ids must not be negative, found "
                          f"{tokens.min()}")
    count = tokens.shape[0]
    return TextSplit(tokens=tokens.astype(np.int32), mask=mask > 0,
                     file=np.zeros(count, np.int32),
                     offset=np.arange(count, dtype=np.int32))


def _token_dataset(path: pathlib.Path, arrays: dict, name: str,
                   test_fraction: float, vocab_size: int | None):
    from recovjax.data.text import TextDataset
    keys = set(arrays)
    single, both = {"tokens"}, {"train_tokens", "test_tokens"}
    if keys in (single, single | {"mask"}):
        tokens, mask = arrays["tokens"], arrays.get("mask")
        test = max(1, int(round(len(tokens) * test_fraction)))
        if test >= len(tokens):
            raise ArraysError(f"{path}: {len(tokens)} windows are too few to "
                              "split into train and test")
        parts = {"train": (tokens[:-test], None if mask is None
                           else mask[:-test]),
                 "test": (tokens[-test:], None if mask is None
                          else mask[-test:])}
    elif both <= keys <= both | {"train_mask", "test_mask"}:
        parts = {split: (arrays[f"{split}_tokens"],
                         arrays.get(f"{split}_mask"))
                 for split in ("train", "test")}
    else:
        raise ArraysError(
            f"{path}: holds arrays {sorted(keys)}; a token archive holds "
            "'tokens' (and optionally 'mask'), or 'train_tokens' and "
            "'test_tokens' (optionally 'train_mask' and 'test_mask')")
    splits = {split: _token_split(tokens, mask, f"{path} ({split})")
              for split, (tokens, mask) in parts.items()}
    if splits["train"].tokens.shape[1] != splits["test"].tokens.shape[1]:
        raise ArraysError(f"{path}: train and test windows have different "
                          "lengths")
    found = max(int(split.tokens.max(initial=-1))
                for split in splits.values()) + 1
    vocab = found if vocab_size is None else int(vocab_size)
    if found > vocab:
        raise ArraysError(f"{path}: token ids must lie in [0, {vocab}), "
                          f"found {found - 1}")
    return TextDataset(name=name, train=splits["train"], test=splits["test"],
                       vocab_size=vocab, pad_id=None,
                       sequence_length=splits["train"].tokens.shape[1] - 1,
                       files=(), source_dir=str(path))


def register_dataset(name: str, loader: DatasetLoader, *,
                     overwrite: bool = False) -> None:
    """Give a dataset loader a name for ``load_dataset``, configs and the CLI.

    Args:
        name: the name (letters, digits, ``_``, ``-``, ``.``).
        loader: ``loader(data_dir=None) -> Dataset``.
        overwrite: replace an earlier registration.

    Raises:
        ValueError: a malformed name, a built-in's or a taken one.
        TypeError: a loader that is not callable.
    """
    from recovjax.data.loading import CATALOGUE, EMBEDDED
    if not isinstance(name, str) or not name or not all(
            ch.isalnum() or ch in "_-." for ch in name):
        raise ValueError(f"a dataset name must be a non-empty string of "
                         f"letters, digits, '_', '-' and '.', got {name!r}")
    if not callable(loader):
        raise TypeError(f"loader must be callable, got "
                        f"{type(loader).__name__}")
    if name in EMBEDDED + CATALOGUE or (name in _LOADERS and not overwrite):
        raise ValueError(f"dataset {name!r} is already registered" + (
            "" if name not in _LOADERS else "; pass overwrite=True to "
            "replace it"))
    _LOADERS[name] = loader


def registered_loader(name: str) -> DatasetLoader | None:
    """The loader registered under ``name``, or ``None``."""
    return _LOADERS.get(name)


def registered_names() -> tuple[str, ...]:
    """Names given with :func:`register_dataset`."""
    return tuple(_LOADERS)
