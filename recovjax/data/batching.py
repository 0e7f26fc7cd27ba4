"""Fixed-shape batching: pad the last batch and mask it, never drop examples."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from recovjax._checks import check_batch_size
from recovjax._types import Array, Batches, PRNGKey, Split


def num_batches(num_examples: int, batch_size: int) -> int:
    """``ceil(num_examples / batch_size)``, validating both arguments."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_examples <= 0:
        raise ValueError(f"the split is empty (num_examples={num_examples})")
    return -(-num_examples // batch_size)


def batch_split(split: Split, batch_size: int) -> Batches:
    """Cut a split into fixed-shape batches, padding the last one.

    Args:
        split: images and labels.
        batch_size: examples per batch.

    Returns:
        :class:`~recovjax.Batches` whose ``mask`` is ``False`` exactly on the
        padding, so that every example is counted once and none is dropped.

    Raises:
        ValueError: if ``batch_size`` is not positive or the split is empty.
    """
    n = len(split)
    count = num_batches(n, batch_size)
    pad = count * batch_size - n
    images = np.concatenate(
        [split.images, np.zeros((pad,) + split.images.shape[1:],
                                split.images.dtype)])
    labels = np.concatenate([split.labels, np.zeros((pad,), np.int32)])
    mask = np.arange(count * batch_size) < n
    shape = (count, batch_size)
    return Batches(images=jnp.asarray(images.reshape(shape + images.shape[1:])),
                   labels=jnp.asarray(labels.reshape(shape)),
                   mask=jnp.asarray(mask.reshape(shape)))


def shuffled_batches(key: PRNGKey, images: Array, labels: Array,
                     weights: Array, batch_size: int) -> Batches:
    """One epoch of shuffled fixed-shape batches, traceable inside ``jit``.

    The example order is a permutation drawn from ``key``; the tail is padded
    with zero-weight copies so that shapes stay fixed and no example is
    dropped. ``weights`` (per example, ``float32[N]``) carries data damage
    such as dropped samples into the batches' ``mask``.

    Args:
        key: order of this epoch.
        images: ``float32[N, ...]``.
        labels: ``int32[N]``.
        weights: ``float32[N]`` per-example weights (1 = use, 0 = ignore).
        batch_size: static batch size.

    Returns:
        :class:`~recovjax.Batches` with a float ``mask`` holding the weights.

    Raises:
        ValueError: if ``batch_size`` is not positive or exceeds ``N``.
    """
    n = labels.shape[0]
    # Static: the padding copies come from one permutation of n examples.
    check_batch_size(batch_size, n)
    count = -(-n // batch_size)
    pad = count * batch_size - n
    order = jax.random.permutation(key, n)
    order = jnp.concatenate([order, order[:pad]])
    valid = jnp.arange(count * batch_size) < n
    gathered = lambda a: a[order].reshape((count, batch_size) + a.shape[1:])
    return Batches(images=gathered(images), labels=gathered(labels),
                   mask=(weights[order] * valid).reshape(count, batch_size))
