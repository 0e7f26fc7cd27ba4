"""Argument checks shared by every public entry point.

One place for the checks that keep the Python API from returning a wrong
number silently: keys, damage amounts, labels, logit widths, stacked trees,
image dtypes and seeds. Every error names the argument it is about
(``"labels: ..."``) and says how to fix it.

Two rules keep the checks off the hot paths:

* Checks of *values* (the label range, a concrete amount) run on the host,
  and only when the value is concrete. A tracer (inside ``jit``/``vmap``/
  ``scan``) is passed through, so traced code keeps working and the sweep's
  and the stacked recovery's compiled programs gain no host round trip.
  Public entry points check their concrete inputs once, before tracing.
* Checks of *shapes and dtypes* (logit width, key dtype, stack axes) cost
  nothing at run time: they read static facts, also of tracers, while a
  function is traced.

Traced damage amounts cannot be checked on the host; the *checked mode*
(:func:`check_traced_amount`, used by :func:`recovjax.damage.checked`)
stages a :func:`jax.experimental.checkify.check` instead.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from recovjax._types import Array

MAX_SEED = 2**31
"""Seeds are ints in ``[0, MAX_SEED)``, as in :func:`recovjax.sweep.sweep`."""

NORMALIZE_HINT = ("normalise them as recovjax.data does, with "
                  "recovjax.data.normalize(images) (float32 "
                  "(x / 255 - 0.5) / 0.5, in [-1, 1])")


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a tracer (its values are unknown on the host)."""
    return isinstance(value, jax.core.Tracer)


def any_traced(*values: Any) -> bool:
    """Whether any leaf of ``values`` is a tracer."""
    return any(is_traced(leaf) for value in values
               for leaf in jax.tree.leaves(value))


# --------------------------------------------------------------------------
# Keys and seeds.
# --------------------------------------------------------------------------


def check_key(key: Any, name: str = "key", *, batched: bool = False) -> int:
    """Check that ``key`` is a typed key (or a 1-D array of them).

    Works on tracers too (it reads the dtype and shape only).

    Args:
        key: the key handed to a library function.
        name: the argument's name, for the message.
        batched: expect a 1-D array of keys, one per model, instead of one
            key.

    Returns:
        The number of keys (1 for a single key).

    Raises:
        TypeError: for an int, a legacy ``uint32`` key from
            ``jax.random.PRNGKey`` or anything else that is not a typed key
            from :func:`jax.random.key`, and for a key array of the wrong
            rank.
    """
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype,
                                                        jax.dtypes.prng_key)
    if not typed:
        how = ("jax.random.split(jax.random.key(seed), M)" if batched else
               "jax.random.key(seed)")
        if dtype is not None and np.dtype(dtype) == np.uint32 and (
                np.shape(key)[-1:] == (2,)):
            got = (f"legacy uint32 key data of shape {np.shape(key)} (from "
                   "jax.random.PRNGKey); convert it with "
                   f"jax.random.wrap_key_data({name})")
        elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            got = (f"the int {key!r}; make a key with "
                   f"jax.random.key({key!r})")
        else:
            got = (f"{type(key).__name__}"
                   + (f" of dtype {dtype}" if dtype is not None else ""))
        raise TypeError(f"{name}: expected a typed key from {how} (convert an "
                        f"int seed at the boundary), got {got}")
    shape = tuple(getattr(key, "shape", ()))
    if batched:
        if len(shape) != 1:
            raise TypeError(f"{name}: expected a 1-D array of keys, one per "
                            f"model (jax.random.split(key, M)), got shape "
                            f"{shape}")
        return int(shape[0])
    if shape != ():
        raise TypeError(f"{name}: expected a single key, got a key array of "
                        f"shape {shape}; vmap over the keys instead")
    return 1


def check_seed(seed: Any, name: str = "seed") -> int:
    """Check an integer seed (the CLI/config boundary) and return it.

    Raises:
        TypeError: if ``seed`` is not an int (bools are not seeds).
        ValueError: if it lies outside ``[0, 2**31)``.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name}: must be an int, got {seed!r}")
    if not 0 <= int(seed) < MAX_SEED:
        raise ValueError(f"{name}: must be an int in [0, 2**31), got {seed}")
    return int(seed)


# --------------------------------------------------------------------------
# Damage amounts.
# --------------------------------------------------------------------------


def check_amount(amount: Any, *, name: str, fraction: bool) -> Array:
    """Validate a concrete damage amount; pass a traced one through.

    Concrete amounts (Python or NumPy numbers, concrete arrays) are checked
    before any tracing: they must be finite real scalars, at least 0, and at
    most 1 when they are fractions. Traced amounts (inside ``jit``/``vmap``)
    cannot be checked on the host. Unchecked, the kernels then clip a traced
    fraction to ``[0, 1]`` and read a NaN fraction as 0 (see
    :func:`sanitize_fraction`): 1.5 damages every entry, NaN none. The
    checked mode (:func:`check_traced_amount`) reports them instead.

    Args:
        amount: the ratio, rate or scale handed to an operator.
        name: the argument's name, used in error messages.
        fraction: whether ``amount`` is a fraction in ``[0, 1]``.

    Returns:
        ``amount`` as a ``float32`` scalar array (concrete or traced), so
        that ``0``, ``0.5`` and ``np.float64(1)`` all reuse one compiled
        program.

    Raises:
        ValueError: if a concrete amount is not a scalar, is NaN or
            infinite, is negative, or exceeds 1 where a fraction is meant.
        TypeError: if the amount is not a real number (e.g. a string or a
            complex number).
    """
    if is_traced(amount):
        if amount.shape != ():
            raise ValueError(f"{name} must be a scalar, got shape "
                             f"{amount.shape}; vmap over {name} instead")
        return amount.astype(jnp.float32)
    if isinstance(amount, (str, bytes)) or isinstance(amount, complex):
        raise TypeError(f"{name} must be a real number, got {amount!r}")
    value = np.asarray(amount)
    if value.shape != ():
        raise ValueError(f"{name} must be a scalar, got shape {value.shape}; "
                         f"vmap over {name} instead")
    if not (np.issubdtype(value.dtype, np.floating)
            or np.issubdtype(value.dtype, np.integer)
            or value.dtype == np.bool_):
        raise TypeError(f"{name} must be a real number, got {amount!r}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{name} must be a number, got NaN")
    if math.isinf(number):
        raise ValueError(f"{name} must be finite, got {number}")
    if number < 0:
        raise ValueError(f"{name} must be non-negative, got {number}")
    if fraction and number > 1:
        raise ValueError(f"{name} is a fraction and must be in [0, 1], "
                         f"got {number}")
    return jnp.asarray(number, jnp.float32)


def check_traced_amount(amount: Array, *, name: str, fraction: bool) -> None:
    """Stage a :func:`~jax.experimental.checkify.check` of a traced amount.

    The checked mode of the damage operators. The check is part of the
    traced program, so the caller must functionalise it with
    :func:`jax.experimental.checkify.checkify` and throw the error::

        error, damage = checkify.checkify(jax.jit(op))(key, params, ratio)
        error.throw()  # ValueError: ratio: ... got 1.5

    Without ``checkify`` JAX refuses to stage the check ("Cannot abstractly
    evaluate a checkify.check which was not functionalized").

    Args:
        amount: the traced ``float32`` scalar.
        name: the argument's name, for the message.
        fraction: whether the amount must lie in ``[0, 1]``.
    """
    from jax.experimental import checkify  # only the checked mode needs it
    if fraction:
        valid = (amount >= 0) & (amount <= 1)  # False for NaN
        what = "a fraction in [0, 1]"
    else:
        valid = jnp.isfinite(amount) & (amount >= 0)
        what = "finite and non-negative"
    checkify.check(valid, f"{name}: must be {what}, got {{}} (checked mode)",
                   amount)


def sanitize_fraction(fraction: Array) -> Array:
    """Clip a (traced) fraction to ``[0, 1]``; NaN becomes 0."""
    fraction = jnp.asarray(fraction, jnp.float32)
    return jnp.where(jnp.isnan(fraction), 0.0, jnp.clip(fraction, 0.0, 1.0))


# --------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------


def check_labels(labels: Any, num_classes: int, name: str = "labels", *,
                 where: Any = None) -> None:
    """Check integer class labels lie in ``[0, num_classes)``.

    The range is checked on the host only when ``labels`` (and ``where``)
    are concrete; tracers are passed through (their dtype is still
    checked).

    Args:
        labels: integer labels of any shape.
        num_classes: number of classes.
        name: the argument's name, for the message.
        where: optional mask (or weights) of the same shape: only entries
            where it is true (above zero) are checked, e.g. not padding.

    Raises:
        TypeError: if the labels are not integers.
        ValueError: if a checked label lies outside ``[0, num_classes)``.
    """
    dtype = getattr(labels, "dtype", None)
    if dtype is None:
        dtype = np.asarray(labels).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name}: must be integer class indices, got dtype "
                        f"{dtype}")
    if any_traced(labels, where):
        return
    values = np.asarray(labels)
    if where is not None:
        values = values[np.asarray(where) > 0]
    if values.size == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= num_classes:
        bad = int(np.count_nonzero((values < 0) | (values >= num_classes)))
        raise ValueError(f"{name}: must lie in [0, {num_classes}) "
                         f"(num_classes={num_classes}), found values "
                         f"{low}..{high} ({bad} out of range)")


def check_lengths(name: str, **arrays: Any) -> int:
    """Check that arrays agree on their first axis; return its length.

    Args:
        name: what the arrays are (for the message), e.g. ``"recovery data"``.
        **arrays: the arrays by argument name; ``None`` entries are skipped.

    Raises:
        ValueError: if a first axis is missing or differs.
    """
    sizes = {key: (np.shape(value)[0] if np.ndim(value) else None)
             for key, value in arrays.items() if value is not None}
    if None in sizes.values() or len(set(sizes.values())) > 1:
        shown = ", ".join(f"{key} {tuple(np.shape(arrays[key]))}"
                          for key in sizes)
        raise ValueError(f"{', '.join(sizes)}: the {name} must have one "
                         f"example per entry along the first axis, got "
                         f"{shown}")
    return next(iter(sizes.values()))


def check_batch_size(batch_size: int, num_examples: int,
                     name: str = "batch_size") -> None:
    """Check ``0 < batch_size <= num_examples`` (a static check).

    Raises:
        ValueError: otherwise, naming ``batch_size``.
    """
    if isinstance(batch_size, bool) or not isinstance(
            batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"{name}: must be a positive int, got "
                         f"{batch_size!r}")
    if batch_size > num_examples:
        raise ValueError(f"{name}: {batch_size} is larger than the "
                         f"{num_examples} training examples; use a "
                         f"batch_size of at most {num_examples}")


def warn_unnormalized(images: Any, name: str = "images") -> None:
    """Warn when images are integer pixels rather than normalised floats.

    Every model here is trained on ``float32`` images in ``[-1, 1]``;
    ``uint8`` pixels in ``0..255`` run without error but give meaningless
    numbers. Reads the dtype only, so it is free on tracers.
    """
    dtype = getattr(images, "dtype", None)
    if dtype is None:
        dtype = np.asarray(images).dtype
    if jnp.issubdtype(dtype, jnp.integer) or dtype == np.bool_:
        warnings.warn(f"{name}: got {np.dtype(dtype).name} pixel values, but "
                      "the models are trained on float32 images in [-1, 1]; "
                      f"{NORMALIZE_HINT}", UserWarning, stacklevel=3)


# --------------------------------------------------------------------------
# Models and stacks.
# --------------------------------------------------------------------------


def check_logit_width(apply: Callable, params: Any, sample: Any,
                      num_classes: int, name: str = "num_classes") -> None:
    """Check that ``apply(params, sample)`` gives ``num_classes`` logits.

    Only shapes are computed (:func:`jax.eval_shape`), so this is free at
    run time and works on tracers.

    Args:
        apply: ``apply(params, x) -> logits``.
        params: one model's parameters (arrays, tracers or shape structs).
        sample: one batch of inputs or its shape struct.
        num_classes: the number of classes claimed by the caller.
        name: the argument's name, for the message.

    Raises:
        ValueError: if the logits' last axis differs from ``num_classes``.
    """
    sample = jax.ShapeDtypeStruct(np.shape(sample), sample.dtype)
    logits = jax.eval_shape(apply, params, sample)
    check_logits_shape(getattr(logits, "shape", None), num_classes, name)


def check_logits_shape(shape: Any, num_classes: int,
                       name: str = "num_classes") -> None:
    """:func:`check_logit_width` for logits already computed (or traced).

    Inside a traced function, checking the static shape of the logits where
    they are computed costs no extra trace of ``apply``.

    Raises:
        ValueError: if the last axis of ``shape`` is not ``num_classes``.
    """
    shape = None if shape is None else tuple(shape)
    if not shape or shape[-1] != num_classes:
        raise ValueError(f"{name}: the model gives logits of shape {shape} "
                         f"per batch, not {num_classes} classes; pass "
                         f"{name}={shape[-1] if shape else '?'} or the "
                         f"model that matches the data")


def check_stacked(tree: Any, reference: Any, count: int, name: str, *,
                  stack_hint: str | None = None) -> None:
    """Check each leaf of ``tree`` is ``reference``'s plus an ``[M]`` axis.

    Args:
        tree: a stacked pytree (e.g. the damaged parameters of ``M`` models).
        reference: one model's pytree (arrays or shape structs).
        count: ``M``, the number of models (keys).
        name: the argument's name, for the message.
        stack_hint: what to stack in the suggested fix (default ``name``).

    Raises:
        ValueError: for another tree structure, a leaf without the model
            axis (an unstacked tree) or a model axis of another length.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    ref_leaves, ref_treedef = jax.tree_util.tree_flatten_with_path(reference)
    if treedef != ref_treedef:
        raise ValueError(f"{name}: its tree structure differs from the "
                         f"model's parameters ({len(leaves)} leaves against "
                         f"{len(ref_leaves)})")
    for (path, leaf), (_, ref) in zip(leaves, ref_leaves):
        shape, one = tuple(np.shape(leaf)), tuple(np.shape(ref))
        if shape == (count,) + one:
            continue
        where = jax.tree_util.keystr(path)
        if shape == one:
            raise ValueError(
                f"{name}: expected a stack of {count} model(s) with a leading "
                f"model axis, got leaf {where} of shape {shape}, the shape "
                f"of one model; stack a single model with "
                f"jax.tree.map(lambda x: x[None], {stack_hint or name})")
        raise ValueError(f"{name}: leaf {where} has shape {shape}, expected "
                         f"{(count,) + one} ({count} keys, one model of "
                         f"shape {one})")
