"""Evaluation data streamed from a random-access source in fixed-shape blocks.

A :class:`BatchStream` reads a split through `grain
<https://github.com/google/grain>`_ from any random-access source (a TFDS
``as_data_source`` split, or a user's own object with ``__len__`` and
``__getitem__``) and yields it as :class:`~recovjax.Batches` *blocks* of
``block_batches`` batches of ``batch_size`` examples. Every block has the
same shape (the last is padded and masked), so one compiled program serves
them all, and only the blocks being read and evaluated are in host memory:
the one the device works on and ``prefetch`` more. Evaluation carries its
totals from block to block (:func:`recovjax.evaluate.evaluate_stream`,
:func:`recovjax.sweep` with ``data=stream``), and adds them in the same
order as an evaluation of the whole split at once, so the numbers are the
same.

Example::

    stream = stream_dataset("fashion_mnist", "test", batch_size=500,
                            block_batches=4)
    metrics = evaluate_stream(model.forward, params, stream, 10)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import numpy as np

from recovjax._checks import check_labels
from recovjax._types import Batches

DEFAULT_BATCH_SIZE = 500
"""Examples per batch of a stream (the sweep's default batch size)."""

DEFAULT_BLOCK_BATCHES = 4
"""Batches per block: what is read, placed and evaluated at once."""

DEFAULT_PREFETCH = 1
"""Blocks read ahead while the device evaluates one."""


class _Head:
    """The first ``count`` examples of a random-access source."""

    def __init__(self, source: Any, count: int):
        self.source, self.count = source, min(int(count), len(source))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Any:
        if not -self.count <= index < self.count:
            raise IndexError(index)
        return self.source[index % self.count]


class _ArraySource:
    """A random-access source over in-memory images and labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class BatchStream:
    """A split read block by block from a random-access source.

    Attributes:
        source: ``len(source)`` examples; ``source[i]`` is a mapping with
            the ``image_key`` and ``label_key`` entries (TFDS data sources
            and grain sources are such objects).
        num_classes: the number of label classes; every label is checked
            to lie in ``[0, num_classes)`` as its block is read.
        batch_size: examples per batch.
        block_batches: batches per block.
        prefetch: blocks read ahead by grain's threads (``0``: none).
        image_key: the image's entry in an example.
        label_key: the label's entry in an example.
        name: what the stream reads, for messages (``"fashion_mnist/test"``).

    ``uint8`` images are normalised as :func:`recovjax.data.normalize` does
    (``(x / 255 - 0.5) / 0.5``, float32); float images are passed as they
    are, as float32. Grey ``[H, W]`` images get a channel axis.
    """

    source: Any
    num_classes: int
    batch_size: int = DEFAULT_BATCH_SIZE
    block_batches: int = DEFAULT_BLOCK_BATCHES
    prefetch: int = DEFAULT_PREFETCH
    image_key: str = "image"
    label_key: str = "label"
    name: str = "stream"

    def __post_init__(self):
        if not (hasattr(self.source, "__len__")
                and hasattr(self.source, "__getitem__")):
            raise TypeError(f"source: needs __len__ and __getitem__ (a "
                            f"random-access source such as a TFDS "
                            f"as_data_source split), got "
                            f"{type(self.source).__name__}")
        _positive(self.num_classes, "num_classes")
        _positive(self.batch_size, "batch_size")
        _positive(self.block_batches, "block_batches")
        if isinstance(self.prefetch, bool) or not isinstance(
                self.prefetch, (int, np.integer)) or self.prefetch < 0:
            raise ValueError(f"prefetch must be a non-negative int, got "
                             f"{self.prefetch!r}")
        if len(self.source) < 1:
            raise ValueError(f"{self.name}: the source is empty")

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray,
                    num_classes: int, **options) -> "BatchStream":
        """A stream over arrays already in memory (for tests and checks).

        Args:
            images: ``[N, H, W, C]`` (or ``[N, H, W]``) images.
            labels: ``int[N]`` labels.
            num_classes: the number of classes.
            **options: further :class:`BatchStream` fields.
        """
        images, labels = np.asarray(images), np.asarray(labels)
        if images.shape[:1] != labels.shape[:1] or labels.ndim != 1:
            raise ValueError(f"images {images.shape} and labels "
                             f"{labels.shape} must hold the same number of "
                             "examples, with one label each")
        return cls(_ArraySource(images, labels), num_classes, **options)

    @property
    def num_examples(self) -> int:
        """Examples in the split (padding excluded)."""
        return len(self.source)

    @property
    def block_examples(self) -> int:
        """Examples per block, padding included."""
        return self.batch_size * self.block_batches

    @property
    def num_blocks(self) -> int:
        """Blocks in the split (the last padded)."""
        return -(-self.num_examples // self.block_examples)

    def _decode(self, example: Any) -> tuple[np.ndarray, np.ndarray]:
        try:
            image, label = example[self.image_key], example[self.label_key]
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(
                f"{self.name}: an example lacks {error}; pass image_key= and "
                f"label_key= naming its entries") from None
        image = np.asarray(image)
        if image.dtype == np.uint8:
            image = ((image.astype(np.float32) / 255.0 - 0.5) / 0.5)
        image = image.astype(np.float32)
        return (image[..., None] if image.ndim == 2 else image,
                np.asarray(label))

    def blocks(self) -> Iterator[Batches]:
        """The blocks, in order: NumPy :class:`~recovjax.Batches` of
        ``[block_batches, batch_size, ...]`` with a ``False`` mask on the
        padding.

        Raises:
            ValueError: for an example without the image or label entry,
                images of another shape than the first, or a label outside
                ``[0, num_classes)`` (naming the stream and the block).
        """
        import grain

        dataset = grain.MapDataset.source(self.source).map(self._decode
                                                           ).batch(
            self.block_examples, drop_remainder=False)
        if self.prefetch:
            # One thread keeps the order and reads one block ahead at a time.
            dataset = dataset.to_iter_dataset(grain.ReadOptions(
                num_threads=1, prefetch_buffer_size=self.prefetch))
        shape = None
        for index, (images, labels) in enumerate(dataset):
            count = labels.shape[0]
            if shape is None:
                shape = images.shape[1:]
            elif images.shape[1:] != shape:
                raise ValueError(f"{self.name}: block {index} holds images "
                                 f"of shape {images.shape[1:]}, the first "
                                 f"held {shape}")
            check_labels(labels, self.num_classes,
                         f"{self.name} (block {index}) labels")
            pad = self.block_examples - count
            if pad:
                images = np.concatenate(
                    [images, np.zeros((pad,) + shape, images.dtype)])
                labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
            mask = np.arange(self.block_examples) < count
            batched = (self.block_batches, self.batch_size)
            yield Batches(images=images.reshape(batched + shape),
                          labels=labels.astype(np.int32).reshape(batched),
                          mask=mask.reshape(batched))

    def __iter__(self) -> Iterator[Batches]:
        return self.blocks()

    def first_block(self) -> Batches:
        """The first block (its shapes fix the compiled programs)."""
        return next(iter(dataclasses.replace(self, prefetch=0).blocks()))


def stream_dataset(name: str, split: str = "test", *,
                   batch_size: int = DEFAULT_BATCH_SIZE,
                   block_batches: int = DEFAULT_BLOCK_BATCHES,
                   prefetch: int = DEFAULT_PREFETCH,
                   examples: int | None = None,
                   data_dir: str | os.PathLike[str] | None = None
                   ) -> BatchStream:
    """Stream a split of a TFDS-built dataset without loading it.

    Args:
        name: ``mnist5k``, ``fashion_mnist`` (prepared once from its files,
            as :func:`~recovjax.data.load_dataset` does) or a catalogue
            dataset prepared in ``array_record`` format.
        split: ``"test"`` or ``"train"``.
        batch_size: examples per batch.
        block_batches: batches per block.
        prefetch: blocks read ahead.
        examples: read only the split's first ``examples`` (default: all).
        data_dir: as for :func:`~recovjax.data.load_dataset`.

    Returns:
        A :class:`BatchStream` over the split's TFDS data source.

    Raises:
        ValueError: for a dataset that is not TFDS-built (a registered
            in-memory dataset: load it, or make a stream of its arrays with
            :meth:`BatchStream.from_arrays`), an unknown split or bad sizes.
        FileNotFoundError: as for :func:`~recovjax.data.load_dataset`.
    """
    from recovjax.data.loading import tfds_builder
    builder = tfds_builder(name, data_dir=data_dir)
    if split not in builder.info.splits:
        raise ValueError(f"split: dataset {name!r} has splits "
                         f"{sorted(builder.info.splits)}, not {split!r}")
    source = builder.as_data_source(split=split)
    if examples is not None:
        source = _Head(source, _positive(examples, "examples"))
    return BatchStream(source,
                       int(builder.info.features["label"].num_classes),
                       batch_size=batch_size, block_batches=block_batches,
                       prefetch=prefetch, name=f"{name}/{split}")
