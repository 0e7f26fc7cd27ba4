"""TFDS builder for full-size Fashion-MNIST from its original IDX files.

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017): 60,000 training and 10,000
test greyscale 28x28 images of 10 kinds of clothing. Debian's package
``dataset-fashion-mnist`` installs the four original files under
:data:`DEBIAN_DIR`::

    apt-get install dataset-fashion-mnist

Any directory holding the same four files works as well (the upstream
downloads, gzipped or not). Each file is checked before anything is built:
its SHA-256 must be the upstream file's, Debian's copy's, or, for either,
that of the IDX bytes inside. The builder writes ``array_record`` files with
plain ``Tensor`` features, so building and reading need no TensorFlow, and
it is prepared once per data directory.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
from typing import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
DEBIAN_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
"""Where ``apt-get install dataset-fashion-mnist`` puts the files."""

SOURCE_ENV = "RECOVJAX_FASHION_MNIST_DIR"
"""Environment variable naming another directory of the four files."""

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""The four standard files (each may carry a ``.gz`` suffix)."""

COUNTS = {"train": 60_000, "test": 10_000}

DIGESTS: Mapping[str, frozenset[str]] = {
    # The upstream .gz files (as TFDS's own checksum list records them),
    # Debian's re-compressed copies, and the IDX bytes inside both.
    "train_images": frozenset({
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"}),
    "train_labels": frozenset({
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"}),
    "test_images": frozenset({
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"}),
    "test_labels": frozenset({
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"}),
}
"""Accepted SHA-256 digests of each file (compressed file or IDX bytes)."""

HOW_TO_GET = (
    "install Debian's package (apt-get install dataset-fashion-mnist, "
    f"which puts them in {DEBIAN_DIR}) or download the four upstream files "
    "from https://github.com/zalandoresearch/fashion-mnist and name their "
    f"directory with ${SOURCE_ENV}")


class SourceFilesError(FileNotFoundError):
    """The IDX files are missing, unknown or malformed (names the path)."""


def source_dir(override: os.PathLike[str] | str | None = None
               ) -> pathlib.Path:
    """The directory of the IDX files: ``override``, ``$`` :data:`SOURCE_ENV`,
    else :data:`DEBIAN_DIR`."""
    chosen = override or os.environ.get(SOURCE_ENV) or DEBIAN_DIR
    return pathlib.Path(chosen).expanduser()


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise SourceFilesError(
        f"{directory / (stem + '.gz')}: Fashion-MNIST file not found; "
        + HOW_TO_GET)


def _contents(path: pathlib.Path) -> tuple[bytes, bytes]:
    """``(file bytes, IDX bytes)`` of a file, gzipped or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return raw, gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise SourceFilesError(f"{path}: not a readable gzip file "
                                   f"({error})") from error
    return raw, raw


def _parse_idx(path: pathlib.Path, data: bytes, ndim: int) -> np.ndarray:
    """The array of an IDX file of unsigned bytes with ``ndim`` dims."""
    magic = 0x800 + ndim
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise SourceFilesError(
            f"{path}: not an IDX file of {ndim}-D unsigned bytes (expected "
            f"magic number {magic:#010x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big")
                  for i in range(ndim))
    size = int(np.prod(shape))
    if len(data) != header + size:
        raise SourceFilesError(
            f"{path}: holds {len(data) - header} bytes of data, its header "
            f"announces {shape} = {size}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_files(directory: os.PathLike[str] | str | None = None, *,
               digests: Mapping[str, frozenset[str]] | None = DIGESTS
               ) -> dict[str, np.ndarray]:
    """Read and check the four IDX files.

    Args:
        directory: where they are (default :func:`source_dir`).
        digests: accepted SHA-256 digests per file (see :data:`DIGESTS`);
            ``None`` accepts any content (for files of one's own).

    Returns:
        ``{"train_images": uint8[60000, 28, 28], "train_labels":
        uint8[60000], "test_images": ..., "test_labels": ...}``.

    Raises:
        SourceFilesError: a missing or malformed file, a digest not in
            ``digests`` (the message names the file and how to get it), or
            images and labels of different counts.
    """
    root = source_dir(directory)
    arrays = {}
    for key, stem in FILES.items():
        path = _find(root, stem)
        raw, idx = _contents(path)
        if digests is not None:
            found = {hashlib.sha256(raw).hexdigest(),
                     hashlib.sha256(idx).hexdigest()}
            if not found & digests[key]:
                raise SourceFilesError(
                    f"{path}: SHA-256 {hashlib.sha256(raw).hexdigest()} is "
                    "not that of the Fashion-MNIST file; " + HOW_TO_GET)
        arrays[key] = _parse_idx(path, idx, 3 if key.endswith("images")
                                 else 1)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise SourceFilesError(
                f"{root}: the {split} images {images.shape} and labels "
                f"{labels.shape} do not pair up as 28x28 images")
        if labels.size and labels.max() >= NUM_CLASSES:
            raise SourceFilesError(
                f"{_find(root, FILES[split + '_labels'])}: label "
                f"{int(labels.max())} outside [0, {NUM_CLASSES})")
    return arrays


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (60,000 train / 10,000 test) from its IDX files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The original IDX files, checked by SHA-256."}

    def __init__(self, *, source: os.PathLike[str] | str | None = None,
                 digests: Mapping[str, frozenset[str]] | None = DIGESTS,
                 **kwargs):
        self._source = source
        self._digests = digests
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(28, 28, 1),
                                              dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "index": tfds.features.Scalar(dtype=np.int32),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded: the files are local.
        arrays = read_files(self._source, digests=self._digests)
        return {split: self._generate_examples(arrays[f"{split}_images"],
                                               arrays[f"{split}_labels"])
                for split in ("train", "test")}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray
                           ) -> Iterator[tuple[int, dict]]:
        for index in range(images.shape[0]):
            # TFDS stores examples in an order hashed from their keys;
            # "index" keeps each one's position in the original file.
            yield index, {"image": images[index][..., None],
                          "label": int(labels[index]), "index": index}
