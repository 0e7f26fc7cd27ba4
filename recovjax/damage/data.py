"""Data damage: applied to the data a model is trained or recovered on.

Every operator keeps shapes fixed, so it vmaps over amounts and keys like
parameter damage does. Samples are never removed: a dropped sample keeps
its place with weight 0, and a removed class is a weight-0 class::

    op(key, images, labels, amount, *, num_classes)
        -> DataDamage(images, labels, weights, mask)

``num_classes`` is static (a Python int). To vmap, bind it first, because
``jax.vmap`` maps keyword arguments too::

    op = functools.partial(drop_samples, num_classes=10)
    damage = jax.vmap(op, in_axes=(0, None, None, 0))(keys, x, y, ratios)

Concrete amounts are validated before tracing; traced fractions are clipped
to ``[0, 1]`` (NaN reads as 0) and traced noise scales are used as given,
unless the operator is in checked mode (:func:`recovjax.damage.checked`).
"""

from __future__ import annotations

import functools
from typing import Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovjax import _checks
from recovjax._types import Array, DataDamage, PRNGKey
from recovjax.damage import select
from recovjax.damage.params import MODES, _describe, check_choice

DataDamageFn = Callable[..., DataDamage]
"""``op(key, images, labels, amount, *, num_classes) -> DataDamage``."""


def _check_data(images, labels, num_classes, *, min_classes: int) -> None:
    if (isinstance(num_classes, bool)
            or not isinstance(num_classes, (int, np.integer))):
        raise TypeError(f"num_classes must be a Python int (it is static), "
                        f"got {num_classes!r}")
    if num_classes < min_classes:
        raise ValueError(f"num_classes must be at least {min_classes}, got "
                         f"{num_classes}")
    images_shape = np.shape(images)
    labels_shape = np.shape(labels)
    if len(labels_shape) != 1:
        raise ValueError(f"labels must be one-dimensional [N], got shape "
                         f"{labels_shape}")
    if not images_shape or images_shape[0] != labels_shape[0]:
        raise ValueError(f"images {images_shape} and labels {labels_shape} "
                         f"must have the same number of samples")
    # np.asarray only of non-arrays: labels may be tracers under jit.
    labels_dtype = (labels.dtype if hasattr(labels, "dtype")
                    else np.asarray(labels).dtype)
    if not jnp.issubdtype(labels_dtype, jnp.integer):
        raise TypeError(f"labels must be integers, got dtype {labels_dtype}")
    images_dtype = (images.dtype if hasattr(images, "dtype")
                    else np.asarray(images).dtype)
    if not jnp.issubdtype(images_dtype, jnp.floating):
        raise TypeError(f"images must be floating point, got dtype "
                        f"{images_dtype}")
    _checks.check_labels(labels, num_classes)


def make_data_operator(core: Callable, *, name: str, amount_name: str,
                       fraction: bool, min_classes: int, doc: str,
                       check: bool = False) -> DataDamageFn:
    """Wrap a traceable data-damage core as a validated, compiled operator.

    Args:
        core: ``core(key, images, labels, amount, num_classes)``.
        name: the operator's ``__name__``.
        amount_name: the amount's name in error messages.
        fraction: whether the amount must lie in ``[0, 1]``.
        min_classes: the smallest ``num_classes`` that makes sense.
        doc: the operator's docstring.
        check: the checked mode for traced amounts (see
            :func:`recovjax.damage.checked`).

    Returns:
        ``op(key, images, labels, amount, *, num_classes) -> DataDamage``,
        with the attributes of :func:`~recovjax.damage.params.make_operator`
        (``damage_kind`` is ``"data"``).
    """
    compiled = jax.jit(core, static_argnames=("num_classes",))

    def operator(key: PRNGKey, images: Array, labels: Array,
                 amount: float | Array, *, num_classes: int) -> DataDamage:
        select.check_key(key)
        traced = _checks.is_traced(amount)
        amount = select.check_amount(amount, name=amount_name,
                                     fraction=fraction)
        if check and traced:
            _checks.check_traced_amount(amount, name=amount_name,
                                        fraction=fraction)
        _check_data(images, labels, num_classes, min_classes=min_classes)
        return compiled(key, images, labels, amount,
                        num_classes=int(num_classes))

    operator.__name__ = operator.__qualname__ = name
    operator.__doc__ = doc
    _describe(operator, amount_name, fraction, "data", check,
              lambda: make_data_operator(
                  core, name=name, amount_name=amount_name,
                  fraction=fraction, min_classes=min_classes, doc=doc,
                  check=True))
    return operator


def _result(images, labels, *, weights=None, mask=None, new_images=None,
            new_labels=None) -> DataDamage:
    count = labels.shape[0]
    return DataDamage(
        images=jnp.asarray(images if new_images is None else new_images,
                           jnp.float32),
        labels=jnp.asarray(labels if new_labels is None else new_labels,
                           jnp.int32),
        weights=(jnp.ones((count,), jnp.float32) if weights is None
                 else weights.astype(jnp.float32)),
        mask=jnp.zeros((count,), jnp.bool_) if mask is None else mask)


def _pick(key: PRNGKey, count: int, fraction: Array, mode: str,
          where: Array | None = None) -> Array:
    masks = None if where is None else [where]
    if mode == "bernoulli":
        return select.select_bernoulli(select.draw_bits(key, [count]),
                                       fraction, where=masks)[0]
    eligible = count if where is None else jnp.sum(where, dtype=jnp.int32)
    return select.select_random(key, [count],
                                select.count_of(eligible, fraction),
                                where=masks)[0]


def make_drop_samples(*, mode: Literal["exact", "bernoulli"] = "exact"
                      ) -> DataDamageFn:
    """Build an operator that drops a fraction of the training samples.

    Args:
        mode: ``"exact"``: exactly ``floor(N * ratio)`` samples, chosen
            uniformly by key; ``"bernoulli"``: each independently.

    Returns:
        ``op(key, images, labels, ratio, *, num_classes) -> DataDamage``:
        dropped samples have weight 0 and ``mask`` True; images and labels
        are unchanged.

    Raises:
        ValueError: for an unknown mode now; when called, for a bad ratio
            or inconsistent data.
    """
    check_choice("mode", mode, MODES)

    def drop(key, images, labels, ratio, num_classes):
        dropped = _pick(key, labels.shape[0], ratio, mode)
        return _result(images, labels, weights=1.0 - dropped, mask=dropped)

    return make_data_operator(
        drop, name="drop_samples", amount_name="ratio", fraction=True,
        min_classes=1, doc=make_drop_samples.__doc__)


def _normalise_mapping(mapping) -> tuple[tuple[int, int], ...] | None:
    if mapping is None:
        return None
    pairs = mapping.items() if isinstance(mapping, Mapping) else mapping
    try:
        pairs = [(source, target) for source, target in pairs]
    except (TypeError, ValueError) as error:
        raise TypeError(f"mapping must be a dict {{source: target}} or "
                        f"(source, target) pairs, got {mapping!r}") from error
    for source, target in pairs:
        for value in (source, target):
            if (isinstance(value, bool)
                    or not isinstance(value, (int, np.integer)) or value < 0):
                raise ValueError(f"mapping classes must be non-negative "
                                 f"ints, got {source!r} -> {target!r}")
    sources = [source for source, _ in pairs]
    if len(set(sources)) != len(sources):
        raise ValueError(f"mapping lists a source class twice: {mapping!r}")
    if not pairs:
        raise ValueError("mapping must hold at least one class pair")
    return tuple(sorted((int(s), int(t)) for s, t in pairs))


def make_label_noise(mapping: Mapping[int, int] | Sequence[tuple[int, int]]
                     | None = None, *,
                     mode: Literal["exact", "bernoulli"] = "exact"
                     ) -> DataDamageFn:
    """Build an operator that corrupts a fraction of the labels.

    Symmetric noise (``mapping=None``): exactly ``floor(N * rate)`` samples
    chosen by key get a label drawn uniformly from the *other* classes.
    Pair noise (``mapping={3: 8, 8: 3}``): among the samples whose label is
    a source class, exactly ``floor(eligible * rate)`` are chosen and get
    the mapped label.

    Args:
        mapping: ``None`` or a static class mapping ``{source: target}``
            (or ``(source, target)`` pairs).
        mode: ``"exact"`` or ``"bernoulli"``.

    Returns:
        ``op(key, images, labels, rate, *, num_classes) -> DataDamage``;
        ``mask`` marks the samples whose label changed.

    Raises:
        ValueError: for a malformed mapping or unknown mode now; when
            called, for a bad rate, labels outside ``[0, num_classes)``, a
            mapping class ``>= num_classes`` or fewer than 2 classes.
        TypeError: for a mapping that is not a dict or pairs.
    """
    check_choice("mode", mode, MODES)
    pairs = _normalise_mapping(mapping)

    def corrupt(key, images, labels, rate, num_classes):
        labels = jnp.asarray(labels, jnp.int32)
        if pairs is None:
            chosen = _pick(key, labels.shape[0], rate, mode)
            uniform = select.draw_uniform(key, [labels.shape[0]])[0]
            offset = 1 + jnp.minimum(
                jnp.floor(uniform * (num_classes - 1)).astype(jnp.int32),
                num_classes - 2)
            noisy = (labels + offset) % num_classes
        else:
            largest = max(max(pair) for pair in pairs)
            if largest >= num_classes:
                raise ValueError(f"mapping class {largest} is not below "
                                 f"num_classes={num_classes}")
            table = np.arange(num_classes)
            sources = np.zeros(num_classes, bool)
            for source, target in pairs:
                table[source] = target
                sources[source] = True
            eligible = jnp.asarray(sources)[labels]
            chosen = _pick(key, labels.shape[0], rate, mode,
                           where=eligible)
            noisy = jnp.asarray(table, jnp.int32)[labels]
        new_labels = jnp.where(chosen, noisy, labels)
        return _result(images, labels, new_labels=new_labels,
                       mask=new_labels != labels)

    return make_data_operator(
        corrupt, name="flip_labels", amount_name="rate", fraction=True,
        min_classes=2, doc=make_label_noise.__doc__)


def make_input_noise() -> DataDamageFn:
    """Build an operator that adds Gaussian noise to every input image.

    ``x + scale * z`` with ``z ~ N(0, 1)`` per pixel, in the normalised
    input units (images are in ``[-1, 1]``).

    Returns:
        ``op(key, images, labels, scale, *, num_classes) -> DataDamage``;
        ``mask`` marks every sample (all are perturbed).

    Raises:
        ValueError: when called, for a negative or non-finite scale or
            inconsistent data.
    """

    def perturb(key, images, labels, scale, num_classes):
        images = jnp.asarray(images, jnp.float32)
        noise = select.draw_normal(key, [images.size])[0]
        noisy = images + scale * noise.reshape(images.shape)
        return _result(images, labels, new_images=noisy,
                       mask=jnp.ones((labels.shape[0],), jnp.bool_))

    return make_data_operator(
        perturb, name="add_input_noise", amount_name="scale", fraction=False,
        min_classes=1, doc=make_input_noise.__doc__)


def make_remove_classes() -> DataDamageFn:
    """Build an operator that removes whole classes from the data.

    Exactly ``floor(num_classes * ratio)`` classes, chosen by key, are
    removed: their samples get weight 0 (and ``mask`` True).

    Returns:
        ``op(key, images, labels, ratio, *, num_classes) -> DataDamage``.

    Raises:
        ValueError: when called, for a bad ratio or inconsistent data.
    """

    def remove(key, images, labels, ratio, num_classes):
        labels = jnp.asarray(labels, jnp.int32)
        removed = removed_classes(key, ratio, num_classes)
        dropped = removed[labels]
        return _result(images, labels, weights=1.0 - dropped, mask=dropped)

    return make_data_operator(
        remove, name="remove_classes", amount_name="ratio", fraction=True,
        min_classes=1, doc=make_remove_classes.__doc__)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def removed_classes(key: PRNGKey, ratio: Array, num_classes: int) -> Array:
    """The classes :func:`make_remove_classes` removes for this key.

    Args:
        key: the key handed to the operator.
        ratio: fraction of classes (traced).
        num_classes: number of classes (static).

    Returns:
        ``bool[num_classes]``, exactly ``floor(num_classes * ratio)`` True.
    """
    return select.select_random(key, [num_classes],
                                select.count_of(num_classes, ratio))[0]


drop_samples = make_drop_samples()
"""Give weight 0 to exactly ``floor(N * ratio)`` random samples."""

flip_labels = make_label_noise()
"""Relabel ``floor(N * rate)`` random samples with another random class."""

add_input_noise = make_input_noise()
"""Add ``N(0, scale^2)`` noise to every pixel."""

remove_classes = make_remove_classes()
"""Give weight 0 to every sample of ``floor(C * ratio)`` random classes."""
