"""Compiled evaluation: exact metrics over fixed-shape, masked batches.

Every metric is a total accumulated on the device in a ``lax.scan`` over
the batches and divided once at the end, so the whole evaluation set counts
(padding is masked out, nothing is dropped) and nothing is read back per
batch. Counts are ``int32`` and therefore exact; sums of losses are
``float32``.

:func:`evaluate` handles one model, :func:`evaluate_stack` a stack of models
(every leaf with a leading model axis) in one call.

Non-finite parameters (for example after bit flips) never raise: the
accuracy is that of the argmax as computed (``jnp.argmax`` picks the first
NaN logit, as NumPy does), and the loss is reported as the ``inf`` or
``NaN`` it is.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from recovjax import _checks
from recovjax._types import ApplyFn, Array, Batches, Params

MetricFn = Callable[[Array, Array, Array], Any]
"""``metric_fn(logits, labels, mask) -> sum`` over one batch (see :func:`evaluate`)."""


class Metrics(NamedTuple):
    """Evaluation metrics of one model (or a stack, with a leading axis).

    Attributes:
        accuracy: fraction of examples whose argmax logit is the label.
        loss: mean cross-entropy (the seed's L(theta)); may be inf or NaN for
            models with non-finite parameters, and is reported as such.
        per_class_accuracy: ``[num_classes]`` accuracy within each class
            (NaN for a class with no examples).
        count: number of examples evaluated (padding excluded), ``int32``.
        custom: the user metric (the seed's R(theta)): its per-batch sums
            added up and divided by ``count``; ``None`` without a
            ``metric_fn``. Same pytree structure as ``metric_fn``'s output.
        correct: ``int32`` number of correctly classified examples.
        class_correct: ``int32[num_classes]`` correct examples per class.
        class_count: ``int32[num_classes]`` examples per class.
        loss_sum: ``float32`` sum of the per-example losses.
        outcomes: ``int32[3]``: examples whose outcome against the clean
            model's predictions (``reference=`` of :func:`evaluate`) was
            *masked* (finite logits, the clean top-1), *SDC* (silent data
            corruption: finite logits, another top-1) and *DUE* (a NaN or
            infinite logit: a detectable error); ``None`` without a
            reference.

    The totals (``correct``, ``class_correct``, ``class_count``,
    ``loss_sum``) are what the fractions are made from. Vectorised XLA:CPU
    code may divide through a reciprocal, one ulp away from the correctly
    rounded quotient, so the fractions of the same model can differ in the
    last bit between a vmapped and a sequential program; the results table
    recomputes them on the host from the totals (see
    :func:`recovjax.results.metrics_rows`), which makes them exact.
    """

    accuracy: Array
    loss: Array
    per_class_accuracy: Array
    count: Array
    custom: Any = None
    correct: Any = None
    class_correct: Any = None
    class_count: Any = None
    loss_sum: Any = None
    outcomes: Any = None


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-example softmax cross-entropy with integer labels.

    Args:
        logits: ``[..., num_classes]``.
        labels: ``int[...]``.

    Returns:
        ``float[...]``: ``-log softmax(logits)[label]``.
    """
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def _check(batches: Batches, num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or (
            num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got "
                         f"{num_classes!r}")
    if not isinstance(batches, Batches):
        raise TypeError("batches must be a recovjax Batches (see "
                        f"recovjax.data.batch_split), got "
                        f"{type(batches).__name__}")
    if batches.labels.ndim != 2 or batches.mask.shape != batches.labels.shape:
        raise ValueError(
            "batches must be [num_batches, batch_size] labels and mask, got "
            f"labels {batches.labels.shape} and mask {batches.mask.shape}")
    if batches.images.shape[:2] != batches.labels.shape:
        raise ValueError(f"images {batches.images.shape} do not match labels "
                         f"{batches.labels.shape} in their first two axes")
    _checks.warn_unnormalized(batches.images, "batches.images")


def _check_concrete(apply: ApplyFn, params: Params, batches: Batches,
                    num_classes: int) -> None:
    # Host checks, so only of concrete batches (never inside a program).
    # The logit width comes first, as the likelier cause of bad labels; in
    # a program it is checked, at no extra trace, where the logits are made.
    if _checks.any_traced(batches.labels, batches.mask):
        return
    _checks.check_logit_width(apply, params, _batch_struct(batches),
                              num_classes)
    _checks.check_labels(batches.labels, num_classes, "batches.labels",
                         where=batches.mask)


def _batch_struct(batches: Batches) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(batches.images.shape[1:],
                                batches.images.dtype)


def evaluate(apply: ApplyFn, params: Params, batches: Batches,
             num_classes: int, *, metric_fn: MetricFn | None = None,
             reference: Array | None = None) -> Metrics:
    """Evaluate one model over every (unmasked) example in ``batches``.

    Totals are accumulated on the device in a ``lax.scan`` over batches; the
    function is traceable and meant to be called inside ``jit``/``vmap``.

    The user metric follows a summation contract: ``metric_fn(logits,
    labels, mask)`` gets one batch (``logits [B, num_classes]``, ``labels
    int32[B]``, ``mask bool[B]``, ``False`` on padding) and returns the *sum*
    of its per-example values over the unmasked examples (a scalar, or a
    pytree of them). The sums are added over batches and divided by the
    number of examples, so ``Metrics.custom`` is the per-example mean. Mask
    with ``jnp.where(mask, value, 0)`` rather than a product, so that padding
    cannot turn a total into NaN.

    Args:
        apply: ``apply(params, x) -> logits``, such as ``model.forward``
            (not the four-argument ``model.apply``).
        params: the model's parameters.
        batches: fixed-shape batches with a padding mask (a float mask of
            weights counts entries above zero).
        num_classes: number of classes (static).
        metric_fn: optional user metric, see above.
        reference: the clean model's top-1 per example (``int32[num_batches,
            batch]``, :func:`predictions`): each example's outcome is then
            classified as masked, SDC or DUE (``Metrics.outcomes``).

    Returns:
        :class:`Metrics` of scalars (``per_class_accuracy`` is
        ``[num_classes]``).

    Labels must lie in ``[0, num_classes)`` and the model must give
    ``num_classes`` logits. The logit width is checked from static shapes
    while tracing, always. The label range is checked on the
    host when ``batches`` is concrete (an eager call, or batches closed over
    by a jitted function); batches passed *into* a compiled program are
    tracers and are not checked there, so check them once before (the
    sweep and the recovery strategies do). There, an example whose label
    lies outside the range belongs to no class: it is left out of
    ``count`` and ``accuracy``, and it makes the loss NaN. Integer images
    (``uint8`` pixels) raise a :class:`UserWarning`: normalise them with
    :func:`recovjax.data.normalize`.

    Raises:
        ValueError: for a non-positive ``num_classes``, batches whose
            shapes disagree, concrete labels outside ``[0, num_classes)``
            (``"batches.labels: ..."``) or a model whose logits are not
            ``num_classes`` wide (``"num_classes: ..."``).
        TypeError: if ``batches`` is not a :class:`~recovjax.Batches`, or
            its labels are not integers.

    Example::

        batches = batch_split(dataset.test, 500)
        metrics = jax.jit(lambda p: evaluate(model.forward, p, batches, 10))(
            params)
    """
    _check(batches, num_classes)
    _check_concrete(apply, params, batches, num_classes)
    if reference is not None and tuple(jnp.shape(reference)) != tuple(
            batches.labels.shape):
        raise ValueError(f"reference: one prediction per example, shape "
                         f"{tuple(batches.labels.shape)}, got "
                         f"{tuple(jnp.shape(reference))}")
    return _evaluate(apply, params, batches, num_classes, metric_fn,
                     reference)


class Totals(NamedTuple):
    """The running totals of an evaluation, carried from batch to batch.

    Attributes:
        correct: ``int32`` correctly classified examples.
        loss_sum: ``float32`` sum of the per-example losses.
        class_correct: ``int32[num_classes]`` correct examples per class.
        class_count: ``int32[num_classes]`` examples per class.
        custom: the user metric's running sums, or ``None``.
        batches: ``int32`` batches evaluated so far, the index of the next
            batch, which a forward pass that takes one (``apply.takes_batch``,
            as a model with transient activation faults) gets; ``None`` for
            any other forward pass.
        outcomes: ``int32[3]`` masked, SDC and DUE examples (see
            :class:`Metrics`), or ``None`` without a reference.
    """

    correct: Array
    loss_sum: Array
    class_correct: Array
    class_count: Array
    custom: Any = None
    batches: Any = None
    outcomes: Any = None


def start_totals(apply: ApplyFn, params: Params, batches: Batches,
                 num_classes: int, metric_fn: MetricFn | None = None,
                 outcomes: bool = False) -> Totals:
    """Zero totals for ``batches``-shaped data (traceable).

    The user metric's sums take the shape and (at least float32) dtype of
    what ``metric_fn`` returns for one batch; ``outcomes`` adds the counts
    of outcomes against a reference (see :class:`Metrics`).
    """
    custom = None
    if metric_fn is not None:
        shapes = jax.eval_shape(
            lambda images, labels, mask: metric_fn(
                apply(params, images), labels, mask > 0),
            _batch_struct(batches),
            jax.ShapeDtypeStruct(batches.labels.shape[1:],
                                 batches.labels.dtype),
            jax.ShapeDtypeStruct(batches.mask.shape[1:], batches.mask.dtype))
        custom = jax.tree.map(
            lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype,
                                                           jnp.float32)),
            shapes)
    zeros = jnp.zeros((num_classes,), jnp.int32)
    # Only a forward pass that takes the batch index carries it, so the
    # program of any other is what it was without activation faults.
    batches_seen = (jnp.int32(0) if getattr(apply, "takes_batch", False)
                    else None)
    return Totals(jnp.int32(0), jnp.float32(0), zeros, zeros, custom,
                  batches_seen,
                  jnp.zeros((3,), jnp.int32) if outcomes else None)


def accumulate(apply: ApplyFn, params: Params, batches: Batches,
               num_classes: int, totals: Totals,
               metric_fn: MetricFn | None = None,
               reference: Array | None = None) -> Totals:
    """``totals`` plus those of every batch of ``batches``, in order.

    One ``lax.scan`` over the batches; traceable. Accumulating blocks of
    batches one after another from :func:`start_totals` performs the same
    additions, in the same order, as accumulating all of them at once.
    ``reference`` (``int32[num_batches, batch]``, the clean model's top-1
    per example, from :func:`predictions`) counts outcomes; it needs totals
    started with ``outcomes=True``.
    """
    totals = Totals(*totals)
    if (reference is None) != (totals.outcomes is None):
        raise ValueError("reference: outcomes are counted with a reference "
                         "and totals started with outcomes=True, both or "
                         "neither")

    takes_batch = getattr(apply, "takes_batch", False)

    def step(totals, batch):
        images, labels, mask = batch[:3]
        valid = mask > 0
        logits = (apply(params, images, totals.batches) if takes_batch
                  else apply(params, images))
        # The logit width is static: checked while tracing, at no cost.
        _checks.check_logits_shape(logits.shape, num_classes)
        # where, not multiply: padding must not turn a finite total into NaN.
        hit = valid & (jnp.argmax(logits, axis=-1) == labels)
        loss = jnp.where(valid, cross_entropy(logits, labels), 0.0)
        classes = jnp.arange(num_classes)
        in_class = valid[:, None] & (labels[:, None] == classes)
        outcomes = totals.outcomes
        if reference is not None:
            outcomes = outcomes + classify(logits, batch[3], valid)
        custom = totals.custom
        if metric_fn is not None:
            custom = jax.tree.map(
                lambda t, s: t + jnp.asarray(s, t.dtype), custom,
                metric_fn(logits, labels, valid))
        return Totals(totals.correct + hit.sum(dtype=jnp.int32),
                      totals.loss_sum + loss.sum(dtype=jnp.float32),
                      totals.class_correct + (in_class & hit[:, None]).sum(
                          0, dtype=jnp.int32),
                      totals.class_count + in_class.sum(0, dtype=jnp.int32),
                      custom, None if totals.batches is None
                      else totals.batches + 1, outcomes), None

    steps = (batches.images, batches.labels, batches.mask)
    if reference is not None:
        steps = steps + (jnp.asarray(reference, jnp.int32),)
    totals, _ = jax.lax.scan(step, totals, steps)
    return totals


def classify(logits: Array, reference: Array, valid: Array) -> Array:
    """``int32[3]``: masked, SDC and DUE examples of one batch.

    Args:
        logits: ``[B, classes]``.
        reference: ``int32[B]`` the clean model's top-1.
        valid: ``bool[B]``, ``False`` on padding.
    """
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    same = jnp.argmax(logits, axis=-1) == reference
    return jnp.stack([(valid & finite & same).sum(dtype=jnp.int32),
                      (valid & finite & ~same).sum(dtype=jnp.int32),
                      (valid & ~finite).sum(dtype=jnp.int32)])


def predictions(apply: ApplyFn, params: Params, batches: Batches) -> Array:
    """``int32[num_batches, batch]``: the top-1 class of every example
    (padding included), the reference outcomes are counted against.

    Traceable (one ``lax.map`` over the batches).
    """
    return jax.lax.map(lambda images: jnp.argmax(
        apply(params, images), axis=-1).astype(jnp.int32), batches.images)


def finish(totals: Totals) -> Metrics:
    """The :class:`Metrics` of finished totals (traceable)."""
    count = totals.class_count.sum(-1)
    denominator = count.astype(jnp.float32)
    custom = totals.custom
    if custom is not None:
        custom = jax.tree.map(lambda t: t / denominator, custom)
    return Metrics(accuracy=totals.correct / denominator,
                   loss=totals.loss_sum / denominator,
                   per_class_accuracy=totals.class_correct
                   / totals.class_count.astype(jnp.float32),
                   count=count, custom=custom, correct=totals.correct,
                   class_correct=totals.class_correct,
                   class_count=totals.class_count, loss_sum=totals.loss_sum,
                   outcomes=totals.outcomes)


def _evaluate(apply: ApplyFn, params: Params, batches: Batches,
              num_classes: int, metric_fn: MetricFn | None,
              reference: Array | None = None) -> Metrics:
    """:func:`evaluate` after its checks."""
    start = start_totals(apply, params, batches, num_classes, metric_fn,
                         outcomes=reference is not None)
    return finish(accumulate(apply, params, batches, num_classes, start,
                             metric_fn, reference))


def evaluate_stack(apply: ApplyFn, stacked_params: Params, batches: Batches,
                   num_classes: int, *, metric_fn: MetricFn | None = None,
                   vmap_size: int | None = None) -> Metrics:
    """Evaluate a stack of models (leading model axis) in one call.

    The models are processed ``vmap_size`` at a time: ``lax.map`` runs over
    groups and ``vmap`` over the models of a group, each group scanning the
    batches once. ``vmap_size=None`` vmaps the whole stack at once and
    ``vmap_size=1`` evaluates the models one after another, in which case
    every model's numbers equal :func:`evaluate`'s bit for bit. Wider vmaps
    batch the matrix products of several models, which may change the last
    bits of the loss (different summation order), never the counts. Which
    width is fastest depends on the model and machine: see
    ``benchmarks/bench_sweep.py``. Traceable; call it inside ``jit``.

    Args:
        apply: ``apply(params, x) -> logits`` of one model, such as
            ``model.forward``.
        stacked_params: parameters whose every leaf has a leading model axis
            of the same length ``M``.
        batches: fixed-shape batches with a padding mask (shared by all
            models).
        num_classes: number of classes (static).
        metric_fn: optional user metric (see :func:`evaluate`).
        vmap_size: models per vectorised group, or ``None`` for all.

    Returns:
        :class:`Metrics` whose every field has a leading axis of length
        ``M``.

    Raises:
        ValueError: if the leaves disagree on the model axis,
            ``vmap_size`` is not positive, or for the checks of
            :func:`evaluate` (label range, logit width).
    """
    sizes = {leaf.shape[0] if leaf.ndim else None
             for leaf in jax.tree.leaves(stacked_params)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError("every leaf of stacked_params needs the same leading "
                         f"model axis; got leading sizes {sorted(map(str, sizes))}")
    if vmap_size is not None and (isinstance(vmap_size, bool) or
                                  not isinstance(vmap_size, int) or
                                  vmap_size < 1):
        raise ValueError(f"vmap_size must be a positive int or None, got "
                         f"{vmap_size!r}")
    _check(batches, num_classes)
    _check_concrete(apply, jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype),
        stacked_params), batches, num_classes)

    def one(params: Params) -> Metrics:
        return _evaluate(apply, params, batches, num_classes, metric_fn)

    if vmap_size is None:
        return jax.vmap(one)(stacked_params)
    return jax.lax.map(one, stacked_params, batch_size=vmap_size)


def evaluate_stream(apply: ApplyFn, params: Params, stream,
                    num_classes: int, *, metric_fn: MetricFn | None = None
                    ) -> Metrics:
    """Evaluate one model over a :class:`~recovjax.data.BatchStream`.

    The stream is read block by block; one compiled program adds each
    block to the running totals (:func:`accumulate`), so only the blocks
    being read and evaluated are in memory, and the metrics equal those of
    :func:`evaluate` over the same batches held at once.

    Args:
        apply: ``apply(params, x) -> logits``, such as ``model.forward``.
        params: the model's parameters.
        stream: the evaluation data.
        num_classes: number of classes.
        metric_fn: optional user metric (see :func:`evaluate`).

    Returns:
        :class:`Metrics` of scalars (device arrays).

    Raises:
        ValueError: for a stream of another number of classes, a model
            whose logits are not ``num_classes`` wide, or a label outside
            ``[0, num_classes)`` (raised when its block is read).
    """
    if getattr(stream, "num_classes", num_classes) != num_classes:
        raise ValueError(f"stream: has {stream.num_classes} classes, "
                         f"num_classes is {num_classes}")
    program = _stream_program(apply, num_classes, metric_fn)
    totals = None
    for block in stream:
        _check(block, num_classes)
        if totals is None:
            _checks.check_logit_width(apply, params, _batch_struct(block),
                                      num_classes)
            totals = jax.jit(start_totals, static_argnums=(0, 3, 4))(
                apply, params, block, num_classes, metric_fn)
        totals = program(params, block, totals)
    if totals is None:
        raise ValueError(f"stream: {getattr(stream, 'name', 'it')} yielded "
                         "no blocks")
    return jax.jit(finish)(totals)


@functools.lru_cache(maxsize=32)
def _stream_program(apply: ApplyFn, num_classes: int,
                    metric_fn: MetricFn | None):
    return jax.jit(lambda params, block, totals: accumulate(
        apply, params, block, num_classes, totals, metric_fn))
