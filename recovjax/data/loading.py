"""Load datasets through TFDS into memory, normalised the way the seed does."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from recovjax import _paths
from recovjax._types import Dataset, Split
from recovjax.data.mnist5k import Mnist5k

EMBEDDED = ("mnist5k",)
CATALOGUE = ("mnist", "fashion_mnist", "cifar10")
TFDS_DATA_DIR_ENV = "TFDS_DATA_DIR"


def dataset_names() -> tuple[str, ...]:
    """Names accepted by :func:`load_dataset`."""
    return EMBEDDED + CATALOGUE


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
    prepared files. Catalogue datasets (``mnist``, ``fashion_mnist``,
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
        FileNotFoundError: for a catalogue dataset that is not prepared (the
            message says how to prepare it).
    """
    if name == "mnist5k":
        root = _paths.data_dir(data_dir)
        builder = Mnist5k(data_dir=str(root), file_format="array_record")
        if not builder.is_prepared():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    verify_ssl=False))
        return _from_builder(name, builder)
    if name in CATALOGUE:
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
        return _from_builder(name, builder)
    raise ValueError(f"unknown dataset {name!r}; valid names: "
                     f"{', '.join(dataset_names())}")


def _from_builder(name: str, builder) -> Dataset:
    num_classes = builder.info.features["label"].num_classes
    sources = builder.as_data_source()
    missing = {"train", "test"} - set(sources)
    if missing:
        raise ValueError(f"dataset {name!r} at {builder.data_dir} lacks "
                         f"split(s) {sorted(missing)}")
    return Dataset(name=name,
                   train=_read_split(sources["train"], num_classes),
                   test=_read_split(sources["test"], num_classes),
                   num_classes=num_classes)
