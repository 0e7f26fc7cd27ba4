"""Shared type aliases and containers, in one place.

Every stage of the pipeline (data -> models -> damage -> evaluate -> recovery
-> sweep -> results) exchanges the small containers defined here, so that no
module needs to import a later stage to know what it is handed.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np

Array = jax.Array
"""A JAX array."""

PRNGKey = jax.Array
"""A typed key from :func:`jax.random.key`. Keys are always explicit."""

Params = Any
"""A pytree of arrays: a model's parameters (plain nested dicts of arrays)."""

Mask = Any
"""A pytree of boolean arrays with the structure of a :data:`Params` tree."""

InitFn = Callable[[PRNGKey, Array], Params]
ApplyFn = Callable[[Params, Array], Array]


class Split(NamedTuple):
    """One split of a dataset, held in memory.

    Attributes:
        images: ``float32[N, H, W, C]``, normalised as ``(x / 255 - 0.5) / 0.5``.
        labels: ``int32[N]``.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class Dataset(NamedTuple):
    """A dataset with its train and test splits.

    Attributes:
        name: registry name (``"mnist5k"``, ``"mnist"``, ...).
        train: the training split.
        test: the evaluation split.
        num_classes: number of label classes.
    """

    name: str
    train: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, ``(H, W, C)``."""
        return tuple(self.train.images.shape[1:])


class Batches(NamedTuple):
    """Fixed-shape batches of a split; padding is marked by ``mask``.

    Attributes:
        images: ``float32[num_batches, batch_size, H, W, C]``.
        labels: ``int32[num_batches, batch_size]``.
        mask: ``bool[num_batches, batch_size]``: ``True`` for real examples,
            ``False`` for padding in the last batch.
    """

    images: Array
    labels: Array
    mask: Array


class Damage(NamedTuple):
    """The result of a damage operator.

    Attributes:
        params: the damaged parameters (same structure as the input).
        mask: boolean pytree of the same structure: ``True`` marks every damaged
            entry (for structural damage, every entry of a removed unit).
    """

    params: Params
    mask: Mask


class DataDamage(NamedTuple):
    """The result of a data damage operator, with fixed shapes.

    Attributes:
        images: ``float32[N, H, W, C]``: the (possibly perturbed) images.
        labels: ``int32[N]``: the (possibly corrupted) labels.
        weights: ``float32[N]``: per-sample training weight; ``0`` marks a
            dropped sample (samples are never removed, so shapes stay fixed
            and the operator vmaps over amounts and keys).
        mask: ``bool[N]``: ``True`` marks every damaged sample.
    """

    images: Array
    labels: Array
    weights: Array
    mask: Array
