"""Fine-tuning as recovery: one compiled program, vmappable over damaged models.

:func:`make_finetune` settles every structural choice (optimiser, batch size,
number of steps, which entries train, the loss) in Python and returns a pure
function ``recover(key, params, mask, images, labels, weights, eval_batches,
frozen)``. The whole run is one ``lax.scan`` over training steps (nested in a
scan over evaluation intervals), and every result comes back as arrays, so a
caller reads the device once per run. :func:`stack_recover` recovers a stack
of damaged models, each with its own optimiser state and data order, in one
compiled program: ``vmap`` over ``key``, ``params`` and ``mask`` within a
group, ``lax.map`` over groups, and the model axis sharded across devices::

    recover = make_finetune(model.apply, steps=200, eval_every=20)
    result = stack_recover(recover)(keys, damaged_params, masks, images,
                                    labels, weights, eval_batches)
"""

from __future__ import annotations

import time
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recovjax import _checks, runner
from recovjax._types import Array, ApplyFn, Batches, Mask, Params, PRNGKey
from recovjax.data import num_batches, shuffled_batches
from recovjax.evaluate import cross_entropy, evaluate
from recovjax.tasks import soft_cross_entropy

Mode = Literal["all", "damaged", "undamaged"]
MODES: tuple[str, ...] = ("all", "damaged", "undamaged")
LOSSES: tuple[str, ...] = ("cross_entropy", "distill")

DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_MOMENTUM = 0.9
DEFAULT_BATCH_SIZE = 100
DEFAULT_EPOCHS = 2


def default_optimizer() -> optax.GradientTransformation:
    """The seed's recovery optimiser: SGD, learning rate 0.001, momentum 0.9."""
    return optax.sgd(DEFAULT_LEARNING_RATE, momentum=DEFAULT_MOMENTUM)


class Curve(NamedTuple):
    """Recovery curve: test metrics at evaluation points during fine-tuning.

    Points are taken before the first step, every ``eval_every`` slots and
    after the last one. All fields have the same length (a leading model axis
    when vmapped); they are empty when no evaluation batches were given.

    Attributes:
        steps: ``int32[P]`` optimiser updates performed before each point.
        samples: ``float32[P]`` training examples used (weight > 0) so far.
        accuracy: ``float32[P]`` test accuracy.
        loss: ``float32[P]`` test cross-entropy.
    """

    steps: Array
    samples: Array
    accuracy: Array
    loss: Array


class FinetuneResult(NamedTuple):
    """Outcome of one fine-tuning run (leading model axis when vmapped).

    Attributes:
        params: the recovered parameters.
        curve: :class:`Curve` of test metrics during the run.
        losses: ``float32[S]`` training loss of every step slot; NaN for a
            slot whose batch held no data (all weights zero), which performs
            no update.
        diverged: ``bool``: some training loss was NaN or infinite.
        diverged_step: ``int32``: first slot with a non-finite loss, or -1.
        state: the model state after training in training mode (updated
            batch statistics), or ``None`` when the model's state was
            frozen (see ``train_mode`` of :func:`make_finetune`).
    """

    params: Params
    curve: Curve
    losses: Array
    diverged: Array
    diverged_step: Array
    state: Any = None


def distill_loss(logits: Array, teacher_logits: Array,
                 temperature: float = 1.0) -> Array:
    """Per-example ``T^2 * KL(softmax(teacher / T) || softmax(logits / T))``.

    The ``T^2`` factor (Hinton et al.) keeps gradient sizes comparable across
    temperatures; at the default ``T = 1`` it is 1.

    Args:
        logits: ``[N, C]`` student logits.
        teacher_logits: ``[N, C]`` teacher logits.
        temperature: softmax temperature.

    Returns:
        ``[N]`` divergences (zero where student and teacher agree).
    """
    return soft_cross_entropy(logits, teacher_logits, temperature)


def curve_metrics(apply: ApplyFn, params: Params, batches: Any,
                  num_classes: int, task: Any = None) -> tuple[Array, Array]:
    """``(accuracy, loss)`` of one model on test batches, for a curve point.

    Args:
        apply: ``apply(params, x) -> outputs``.
        params: the parameters.
        batches: :class:`~recovjax.Batches`, or a task's stacked batches.
        num_classes: number of classes (classification).
        task: a :class:`~recovjax.tasks.Task` other than classification, or
            ``None``; its ``accuracy`` (NaN if it has none) and ``loss``.
    """
    if task is None:
        metrics = evaluate(apply, params, batches, num_classes)
        return metrics.accuracy, metrics.loss
    from recovjax.tasks import evaluate_task
    metrics = evaluate_task(task, apply, params, batches)
    return metrics.get("accuracy", jnp.float32(jnp.nan)), metrics["loss"]


def trainable_mask(mode: str, params: Params, mask: Mask | None,
                   frozen: Mask | None = None) -> Mask:
    """Which entries a fine-tune may change.

    Args:
        mode: ``"all"``, ``"damaged"`` (only entries where ``mask`` is true) or
            ``"undamaged"`` (only entries where it is false).
        params: the parameters (for structure and shapes).
        mask: the damage mask; required unless ``mode == "all"``.
        frozen: entries held at zero (removed units); never trainable.

    Returns:
        Boolean pytree with the structure of ``params``.

    Raises:
        ValueError: for an unknown mode, or a masked mode without a mask.
    """
    if mode not in MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; valid modes: "
                         f"{', '.join(MODES)}")
    if mode == "all":
        trainable = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool),
                                 params)
    elif mask is None:
        raise ValueError(f"mode {mode!r} needs the damage mask, got None")
    elif mode == "damaged":
        trainable = jax.tree.map(lambda m: jnp.asarray(m, bool), mask)
    else:
        trainable = jax.tree.map(lambda m: ~jnp.asarray(m, bool), mask)
    if frozen is not None:
        trainable = jax.tree.map(lambda t, f: t & ~f, trainable, frozen)
    return trainable


def data_stream(key: PRNGKey, weights: Array, batch_size: int,
                num_epochs: int) -> tuple[Array, Array]:
    """Example indices and weights of every batch slot of ``num_epochs`` epochs.

    Each epoch is the permutation of :func:`recovjax.data.shuffled_batches`
    drawn from ``fold_in(key, epoch)``, reordered (stably) so that examples
    with weight > 0 come first. With all weights 1 this is exactly the
    ``shuffled_batches`` order; with dropped examples (weight 0, e.g. a data
    budget) an epoch holds ``ceil(kept / batch_size)`` real batches followed by
    empty slots, which the fine-tune skips. So "E epochs" means E passes over
    the kept data, as it would with a smaller dataset, while shapes stay fixed.

    Args:
        key: data-order key.
        weights: ``float32[N]`` per-example weights.
        batch_size: static batch size.
        num_epochs: static number of epochs.

    Returns:
        ``(indices, batch_weights)``: ``int32[num_epochs * B, batch_size]`` and
        ``float32[num_epochs * B, batch_size]`` with ``B = ceil(N /
        batch_size)``.
    """
    n = weights.shape[0]
    positions = jnp.arange(n, dtype=jnp.int32)

    def epoch(index):
        order = shuffled_batches(jax.random.fold_in(key, index), positions,
                                 positions, weights, batch_size)
        flat_index = order.images.reshape(-1)
        flat_weight = order.mask.reshape(-1)
        kept_first = jnp.argsort(flat_weight <= 0, stable=True)
        return (flat_index[kept_first].reshape(order.images.shape),
                flat_weight[kept_first].reshape(order.mask.shape))

    indices, batch_weights = jax.vmap(epoch)(jnp.arange(num_epochs))
    return (indices.reshape((-1, batch_size)),
            batch_weights.reshape((-1, batch_size)))


def budget_weights(key: PRNGKey, num_examples: int, fraction: Any) -> Array:
    """Per-example weights of a data budget: a keyed random ``fraction``.

    Keeps the first ``floor(num_examples * fraction)`` examples of a
    permutation drawn from ``key``. ``fraction`` may be traced, so budgets can
    be swept without recompiling.

    Args:
        key: which examples are kept.
        num_examples: ``N`` (static).
        fraction: kept fraction in ``[0, 1]``. A concrete one is checked
            by :func:`~recovjax.recovery.make_task`; a traced one is not:
            above 1 it keeps every example, NaN keeps none.

    Returns:
        ``float32[N]`` of ones (kept) and zeros (dropped).
    """
    # The small slack keeps float32 rounding (0.7 * 4000 = 2799.9998) from
    # dropping one example below the intended floor(N * fraction).
    keep = jnp.floor(num_examples * jnp.asarray(fraction, jnp.float32)
                     + 1e-3)
    rank = jnp.argsort(jax.random.permutation(key, num_examples))
    return (rank < keep).astype(jnp.float32)


def total_steps(num_examples: int, batch_size: int, *, steps: int | None,
                epochs: int | None) -> int:
    """Number of step slots: ``steps``, or ``epochs * ceil(N / batch_size)``."""
    if steps is not None:
        return steps
    return epochs * num_batches(num_examples, batch_size)


def _check_inputs(key: Any, images: Any, labels: Any, weights: Any, *,
                  batched: bool = False) -> int:
    """Static checks of a fine-tune's key and data; the number of keys."""
    count = _checks.check_key(key, "keys" if batched else "key",
                              batched=batched)
    _checks.check_lengths("recovery data", images=images, labels=labels,
                          weights=weights)
    _checks.warn_unnormalized(images)
    return count


def check_recovery_data(images: Any, labels: Any, weights: Any,
                        num_classes: int, *, class_labels: bool = True
                        ) -> None:
    """Check recovery data once, on the host, before anything compiles.

    Args:
        images: ``[N, ...]`` images.
        labels: ``int32[N]`` labels (or ``[N, C]`` teacher logits when
            ``class_labels`` is false).
        weights: ``float32[N]`` per-example weights, or ``None``.
        num_classes: number of classes.
        class_labels: whether ``labels`` are class indices (range-checked
            when concrete).

    Raises:
        ValueError: if the arrays disagree on ``N`` or a concrete label
            lies outside ``[0, num_classes)``.
        TypeError: for class labels that are not integers.
    """
    _checks.check_lengths("recovery data", images=images, labels=labels,
                          weights=weights)
    _checks.warn_unnormalized(images)
    if class_labels:
        _checks.check_labels(labels, num_classes)


def check_logits(apply: ApplyFn, params: Params, images: Any,
                 num_classes: int, *, stacked: bool = False) -> None:
    """Check that the model gives ``num_classes`` logits (shapes only).

    Args:
        apply: ``apply(params, x) -> logits``.
        params: one model's parameters, or a stack when ``stacked``.
        images: ``[N, ...]`` inputs (only their shape and dtype are used).
        num_classes: the number of classes claimed.
        stacked: ``params`` carry a leading model axis.

    Raises:
        ValueError: if the logits' width differs (``"num_classes: ..."``).
    """
    if stacked:
        params = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
            jnp.shape(leaf)[1:], jnp.result_type(leaf)), params)
    images_dtype = (images.dtype if hasattr(images, "dtype")
                    else np.asarray(images).dtype)
    sample = jax.ShapeDtypeStruct((1,) + tuple(np.shape(images)[1:]),
                                  images_dtype)
    _checks.check_logit_width(apply, params, sample, num_classes)


def check_eval_batches(eval_batches: Batches | None, num_classes: int
                       ) -> None:
    """Check the labels of concrete evaluation batches (``None`` passes).

    Raises:
        TypeError: if ``eval_batches`` is not a :class:`~recovjax.Batches`.
        ValueError: for a label of a real (unmasked) example outside
            ``[0, num_classes)``.
    """
    if eval_batches is None:
        return
    if not isinstance(eval_batches, Batches):
        raise TypeError("eval_batches: must be a recovjax Batches (see "
                        "recovjax.data.batch_split) or None, got "
                        f"{type(eval_batches).__name__}")
    _checks.check_labels(eval_batches.labels, num_classes,
                         "eval_batches.labels", where=eval_batches.mask)


def _check_positive(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if (not isinstance(value, int) or isinstance(value, bool)
            or value <= 0):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


_STEP_STREAM = 0x73746570
_ADAPTER_STREAM = 0x6c6f7261
"""Folded into the data-order key for the per-step training-mode keys
(dropout), so they never coincide with the data order's."""


def make_finetune(apply: ApplyFn,
                  optimizer: optax.GradientTransformation | None = None, *,
                  batch_size: int = DEFAULT_BATCH_SIZE,
                  steps: int | None = None, epochs: int | None = None,
                  mode: Mode = "all", eval_every: int | None = None,
                  num_classes: int = 10,
                  loss: Literal["cross_entropy", "distill"] = "cross_entropy",
                  temperature: float = 1.0, train_mode: Any = None,
                  task: Any = None, adapter: Any = None
                  ) -> Callable[..., FinetuneResult]:
    """Build the pure fine-tuning function for one damaged model.

    Args:
        apply: ``apply(params, x) -> logits``, the evaluation-mode pass
            (``model.forward``); the model's state stays frozen.
        optimizer: an optax transformation; default :func:`default_optimizer`
            (the seed's SGD, lr 0.001, momentum 0.9).
        batch_size: examples per step (static).
        steps: number of step slots. Give ``steps`` or ``epochs``, not both;
            with neither, :data:`DEFAULT_EPOCHS` (2) epochs are run.
        epochs: number of passes over the (kept) training data.
        mode: ``"all"`` trains every entry, ``"damaged"`` only the entries the
            damage mask marks, ``"undamaged"`` only the others. Frozen
            entries' gradients and updates are both zeroed, so optimiser
            state (momentum) cannot leak into them: they stay bit-identical.
        eval_every: evaluate the test batches every this many step slots
            (plus before the first and after the last); ``None`` evaluates
            only before and after.
        num_classes: number of classes (for evaluation).
        loss: ``"cross_entropy"`` against integer ``labels``, or
            ``"distill"``: KL divergence to teacher logits passed as
            ``labels`` (``float32[N, C]``); no true labels are used.
        temperature: distillation temperature.
        train_mode: a :class:`~recovjax.models.Model` to train in its
            training mode instead: every step runs ``model.apply(params,
            state, x, train=True, key=step_key)``, so dropout is on (its
            keys derived from the data-order key and the step slot) and
            batch statistics come from the batch and are carried, updated,
            from step to step, starting from ``model.state``; curves
            evaluate with the carried state, and the result holds the
            final one. ``None`` (the default) trains through ``apply``.
        task: a :class:`recovjax.tasks.Task` other than classification
            (a language model's): ``images`` is then the recovery data as
            the task's batch dict of ``[N, ...]`` arrays (``labels`` is
            ignored and may be ``None``; with ``loss="distill"`` it holds
            the teacher's outputs for every example and the loss is the
            task's ``distill``), the loss is the task's, the
            ``weights`` keep (``> 0``) or drop each example (they are
            folded into the batch's ``"mask"``), and ``eval_batches`` are
            the task's stacked batches; curves report the task's
            ``accuracy`` (NaN if it has none) and ``loss``.
        adapter: an :class:`~recovjax.recovery.lora.Adapter`: the damaged
            parameters stay frozen and only the adapter's parameters
            train (drawn from the model's key); the model runs on
            ``adapter.merge(params, adapter_params)`` throughout, and the
            result holds the merged parameters. Needs ``mode="all"``;
            removed units (``frozen``) stay at zero after merging.

    Returns:
        ``recover(key, params, mask, images, labels, weights, eval_batches=None,
        frozen=None) -> FinetuneResult``, a pure function to ``jit`` and
        ``vmap``:

        - ``key``: data-order key of this model.
        - ``params``: damaged parameters; ``mask``: damage mask (may be
          ``None`` in mode ``"all"``).
        - ``images``/``labels``/``weights``: the recovery data, ``float32[N,
          ...]``, ``int32[N]`` (or teacher logits), ``float32[N]`` per-example
          weights (0 = dropped: data damage or a data budget).
        - ``eval_batches``: :class:`~recovjax.Batches` for the curve, or
          ``None``.
        - ``frozen``: boolean pytree of entries held at zero throughout
          (removed units stay removed), or ``None``.

        ``recover`` checks what is static while it is traced: the key's
        dtype (``TypeError`` for an int or a legacy ``uint32`` key), the
        data's lengths, ``batch_size <= N`` and the logit width against
        ``num_classes`` (``ValueError``); it warns on integer images. The
        label *range* is a host check and is left to the entry points
        (:func:`finetune`, :func:`check_recovery_data`,
        :func:`~recovjax.recovery.make_task`): traced labels outside
        ``[0, num_classes)`` give NaN losses (``diverged``).

    Raises:
        ValueError: for an unknown mode or loss, both ``steps`` and
            ``epochs``, or non-positive sizes.
    """
    if mode not in MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; valid modes: "
                         f"{', '.join(MODES)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid losses: "
                         f"{', '.join(LOSSES)}")
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both "
                         f"(got steps={steps}, epochs={epochs})")
    if steps is None and epochs is None:
        epochs = DEFAULT_EPOCHS
    _check_positive("batch_size", batch_size, allow_none=False)
    _check_positive("steps", steps)
    _check_positive("epochs", epochs)
    _check_positive("eval_every", eval_every)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if adapter is not None and mode != "all":
        raise ValueError(f"adapter: an adapter trains its own parameters, so "
                         f"mode must be 'all', got {mode!r}")
    optimizer = optimizer if optimizer is not None else default_optimizer()

    def per_example(logits, targets):
        if loss == "distill":
            return distill_loss(logits, targets, temperature)
        return cross_entropy(logits, targets)

    def forward(params, state, inputs, step_key):
        if train_mode is None:
            return apply(params, inputs), state
        return train_mode.apply(params, state, inputs, train=True,
                                key=step_key)

    def task_objective(params, state, batch, targets, weights, step_key):
        keep = weights > 0
        if "mask" in batch:
            mask = (batch["mask"] > 0) & keep.reshape(
                keep.shape + (1,) * (batch["mask"].ndim - 1))
        else:  # e.g. a pad-id language model: the first key's shape
            first = batch[task.keys[0]]
            mask = jnp.broadcast_to(keep.reshape(
                keep.shape + (1,) * (first.ndim - 1)), first.shape)
        batch = dict(batch, mask=mask)
        outputs, state = forward(params, state, task.inputs(batch), step_key)
        if loss == "distill":
            loss_sum, count = task.distill(outputs, targets, batch,
                                           temperature)
        else:
            loss_sum, count = task.loss(outputs, batch)
        return loss_sum / jnp.maximum(count, 1).astype(jnp.float32), state

    def objective(params, state, images, targets, weights, step_key):
        if task is not None:
            return task_objective(params, state, images, targets, weights,
                                  step_key)
        logits, state = forward(params, state, images, step_key)
        # Static, so checked while tracing at no cost (no extra trace).
        _checks.check_logits_shape(logits.shape, num_classes)
        losses = per_example(logits, targets)
        # where, not multiply: a dropped example's NaN must not poison the sum.
        total = jnp.sum(jnp.where(weights > 0, losses * weights, 0.0))
        return total / jnp.maximum(weights.sum(), 1e-12), state

    def evaluate_with(params, state, batches):
        evaluated = apply if train_mode is None else (
            lambda p, x: train_mode.apply(p, state, x)[0])
        return curve_metrics(evaluated, params, batches, num_classes, task)

    def recover(key: PRNGKey, params: Params, mask: Mask | None,
                images: Array, labels: Array, weights: Array,
                eval_batches: Batches | None = None,
                frozen: Mask | None = None) -> FinetuneResult:
        # Static checks only (dtypes and shapes, free while tracing); value
        # checks of the labels belong to the entry points, on the host.
        if task is None:
            _check_inputs(key, images, labels, weights)
            n = labels.shape[0]
        else:
            from recovjax.tasks import check_batch
            _checks.check_key(key, "key")
            images = check_batch(task, images, "images")
            n = int(np.shape(next(iter(images.values())))[0])
            _checks.check_lengths("recovery data", weights=weights,
                                  **{key_: value for key_, value in
                                     images.items()})
        _checks.check_batch_size(batch_size, n)
        if loss == "cross_entropy" and task is None:
            _checks.check_labels(labels, num_classes)
        if loss == "distill" and task is not None and task.distill is None:
            raise ValueError(f"loss: task {task.name!r} has no distillation "
                             "loss; give its Task a distill function")
        per_epoch = num_batches(n, batch_size)
        slots = total_steps(n, batch_size, steps=steps, epochs=epochs)
        indices, batch_weights = data_stream(
            key, jnp.asarray(weights, jnp.float32), batch_size,
            -(-slots // per_epoch))
        indices, batch_weights = indices[:slots], batch_weights[:slots]
        # Mode "all" without structure masks trains everything: skip the
        # masking arithmetic instead of multiplying by ones.
        # An adapter's parameters all train; removed units are zeroed
        # after merging instead.
        trainable = (None if mode == "all" and (frozen is None
                                                or adapter is not None)
                     else trainable_mask(mode, params, mask, frozen))
        if frozen is not None:
            params = jax.tree.map(
                lambda p, f: jnp.where(f, jnp.zeros_like(p), p), params,
                frozen)

        step_root = jax.random.fold_in(key, _STEP_STREAM)
        if adapter is None:
            materialize = lambda trained: trained
        else:
            # The damaged parameters are a constant of this model's run;
            # what trains (and what the optimiser's state covers) is the
            # adapter's parameters.
            base = params
            params = adapter.init(jax.random.fold_in(key, _ADAPTER_STREAM),
                                  base)

            def materialize(trained):
                merged = adapter.merge(base, trained)
                if frozen is None:
                    return merged
                return jax.tree.map(
                    lambda p, f: jnp.where(f, jnp.zeros_like(p), p), merged,
                    frozen)

        def train_objective(trained, *rest):
            return objective(materialize(trained), *rest)

        def update(params, opt_state, state, slot, batch_index,
                   batch_weight):
            (value, state), grads = jax.value_and_grad(
                train_objective, has_aux=True)(
                    params, state, jax.tree.map(lambda a: a[batch_index],
                                                images),
                    None if labels is None else labels[batch_index],
                    batch_weight, jax.random.fold_in(step_root, slot))
            if trainable is None:
                updates, opt_state = optimizer.update(grads, opt_state,
                                                      params)
                params = optax.apply_updates(params, updates)
                return params, opt_state, state, value
            grads = jax.tree.map(
                lambda g, t: jnp.where(t, g, jnp.zeros_like(g)), grads,
                trainable)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            # where, not p + u * t: frozen entries keep their exact bits
            # (even -0.0 and NaN), whatever the optimiser proposes.
            params = jax.tree.map(
                lambda p, u, t: jnp.where(t, (p + u).astype(p.dtype), p),
                params, updates, trainable)
            if frozen is not None:
                params = jax.tree.map(
                    lambda p, f: jnp.where(f, jnp.zeros_like(p), p), params,
                    frozen)
            return params, opt_state, state, value

        def skip(params, opt_state, state, slot, batch_index, batch_weight):
            del slot, batch_index, batch_weight
            return params, opt_state, state, jnp.float32(jnp.nan)

        def train_step(carry, batch):
            params, opt_state, done, samples, first_bad, state = carry
            slot, batch_index, batch_weight = batch
            active = batch_weight.sum() > 0
            params, opt_state, state, value = jax.lax.cond(
                active, update, skip, params, opt_state, state, slot,
                batch_index, batch_weight)
            bad = active & ~jnp.isfinite(value)
            first_bad = jnp.where((first_bad < 0) & bad, slot, first_bad)
            done = done + active.astype(jnp.int32)
            samples = samples + (batch_weight > 0).sum().astype(jnp.float32)
            return (params, opt_state, done, samples, first_bad, state), value

        def measure(carry):
            params, _, done, samples, _, state = carry
            accuracy, loss_value = evaluate_with(materialize(params), state,
                                                 eval_batches)
            return (done, samples, jnp.asarray(accuracy, jnp.float32),
                    jnp.asarray(loss_value, jnp.float32))

        def run(carry, start, count):
            xs = (jnp.arange(start, start + count, dtype=jnp.int32),
                  indices[start:start + count],
                  batch_weights[start:start + count])
            return jax.lax.scan(train_step, carry, xs)

        carry = (params, optimizer.init(params), jnp.int32(0),
                 jnp.float32(0), jnp.int32(-1),
                 None if train_mode is None else train_mode.state)
        points = []
        if eval_batches is not None:
            points.append(jax.tree.map(lambda x: x[None], measure(carry)))
        interval = eval_every if eval_every is not None else slots
        full, remainder = divmod(slots, interval)
        losses = []
        if full:
            def run_interval(carry, start):
                xs = (start + jnp.arange(interval, dtype=jnp.int32),
                      jax.lax.dynamic_slice_in_dim(indices, start, interval),
                      jax.lax.dynamic_slice_in_dim(batch_weights, start,
                                                   interval))
                carry, values = jax.lax.scan(train_step, carry, xs)
                point = measure(carry) if eval_batches is not None else ()
                return carry, (values, point)

            starts = jnp.arange(full, dtype=jnp.int32) * interval
            carry, (values, interval_points) = jax.lax.scan(
                run_interval, carry, starts)
            losses.append(values.reshape(-1))
            if eval_batches is not None:
                points.append(interval_points)
        if remainder:
            carry, values = run(carry, full * interval, remainder)
            losses.append(values)
            if eval_batches is not None:
                points.append(jax.tree.map(lambda x: x[None], measure(carry)))
        if points:
            curve = Curve(*(jnp.concatenate(parts) for parts in zip(*points)))
        else:
            curve = Curve(jnp.zeros((0,), jnp.int32),
                          *(jnp.zeros((0,), jnp.float32),) * 3)
        first_bad = carry[4]
        return FinetuneResult(params=materialize(carry[0]), curve=curve,
                              losses=jnp.concatenate(losses),
                              diverged=first_bad >= 0,
                              diverged_step=first_bad, state=carry[5])

    return recover


DEFAULT_GROUP_SIZE = 1
"""Models per ``vmap`` group in :func:`stack_recover`.

``benchmarks/bench_recovery.py`` measures the choices: on XLA:CPU one model
at a time (``lax.map`` over groups of 1) beats a batched ``vmap`` over the
whole stack, whose batched matmuls and larger working set run slower per
model-step.
"""

def stack_recover(recover: Callable[..., FinetuneResult], *,
                  shared_data: bool = True, frozen: bool = False,
                  devices: Sequence[Any] | None = None,
                  group_size: int = DEFAULT_GROUP_SIZE
                  ) -> Callable[..., FinetuneResult]:
    """One compiled program recovering a stack of models on all devices.

    The model axis (keys, parameters, masks) is sharded across ``devices``
    with ``shard_map``; on each device ``lax.map`` walks over groups of
    ``group_size`` models, and a group is recovered under ``vmap`` (each
    model with its own optimiser state and data order). A stack whose size
    is not a multiple of ``group_size * len(devices)`` is padded by
    repeating its last model, and the padding is dropped from the result.
    Each model is computed on one device, as it would be alone, so one
    device and several give the same numbers up to how XLA compiles
    reductions for each device count: bit-identical for LeNet-5 and the
    test models, the last digits of a fine-tuned ViT's loss can differ.

    On a multi-core CPU, JAX shows one device unless asked for more
    (``JAX_NUM_CPU_DEVICES=N`` in the environment, or
    ``jax.config.update("jax_num_cpu_devices", N)`` before JAX starts); one
    device per core lets the cores recover different models at once, which
    XLA:CPU's mostly single-threaded kernels cannot do within one model.

    Args:
        recover: a function from :func:`make_finetune`.
        shared_data: all models recover on the same data (``images``,
            ``labels``, ``weights`` unbatched); if false, ``labels`` and
            ``weights`` carry a leading model axis too (per-model data damage).
        frozen: the call passes a stacked ``frozen`` pytree as 8th argument.
        devices: devices to shard the model axis over; default
            ``jax.devices()``.
        group_size: models per ``vmap`` group (static); see
            :data:`DEFAULT_GROUP_SIZE`.

    Returns:
        ``run(keys, params, mask, images, labels, weights, eval_batches=None,
        [frozen])`` returning a :class:`FinetuneResult` with a leading model
        axis; ``run.lower(...)`` lowers the underlying program.

    Raises:
        ValueError: for an empty ``devices`` or a non-positive
            ``group_size``.
    """
    _check_positive("group_size", group_size, allow_none=False)
    device_list = runner.devices_of(devices)
    data_axis = None if shared_data else 0
    in_axes = (0, 0, 0, None, data_axis, data_axis, None)
    if frozen:
        in_axes = in_axes + (0,)
    mapped = tuple(index for index, axis in enumerate(in_axes) if axis == 0)
    others = tuple(index for index, axis in enumerate(in_axes) if axis != 0)

    def one(point, shared):
        # The runner's unit: one model, from its slice of the stack.
        full = [None] * len(in_axes)
        for index, value in zip(mapped, point):
            full[index] = value
        for index, value in zip(others, shared):
            full[index] = value
        return recover(*full)

    program = runner.map_points(one, group_size=group_size,
                                devices=device_list)

    def split(args):
        args = _canonical(args)
        size = _checks.check_key(args[0], "keys", batched=True)
        for index in mapped[1:]:
            _check_model_axis(args[index], size, _STACKED_NAMES[index])
        return (tuple(args[index] for index in mapped),
                tuple(args[index] for index in others))

    def run(*args: Any) -> FinetuneResult:
        return program(*split(args))

    run.lower = lambda *args: program.lower(*split(args))
    return run


_STACKED_NAMES = {1: "params", 2: "mask", 4: "labels", 5: "weights",
                  7: "frozen"}


def _check_model_axis(tree: Any, size: int, name: str) -> None:
    # Static: every leaf of a stacked argument leads with the model axis.
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = tuple(jnp.shape(leaf))
        if not shape or shape[0] != size:
            raise ValueError(
                f"{name}: expected a stack with a leading model axis of "
                f"{size} (one entry per key), got leaf "
                f"{jax.tree_util.keystr(path) or name} of shape {shape}; "
                f"stack one model with jax.tree.map(lambda x: x[None], "
                f"{name})")


def _canonical(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Strong-typed masks and weights, so that equal shapes never retrace.

    Masks built from comparisons with Python scalars are weakly typed; a
    stack from another damage operator would otherwise compile again.
    """
    as_bool = lambda tree: None if tree is None else jax.tree.map(
        lambda m: jnp.asarray(m, bool), tree)
    args = list(args) + [None] * (7 - len(args))  # eval_batches optional
    args[2] = as_bool(args[2])
    if len(args) > 5:
        args[5] = jnp.asarray(args[5], jnp.float32)
    if len(args) > 7:
        args[7] = as_bool(args[7])
    return tuple(args)


def _as_arrays(images, labels, weights):
    images = jnp.asarray(images)
    labels = jnp.asarray(labels)
    if weights is None:
        weights = jnp.ones(labels.shape[:1], jnp.float32)
    return images, labels, jnp.asarray(weights, jnp.float32)


def finetune(key: PRNGKey, apply: ApplyFn, params: Params, images: Array,
             labels: Array, *,
             optimizer: optax.GradientTransformation | None = None,
             batch_size: int = DEFAULT_BATCH_SIZE, epochs: int | None = None,
             steps: int | None = None, mode: Mode = "all",
             mask: Mask | None = None, frozen_structure: Mask | None = None,
             eval_every: int | None = None,
             eval_batches: Batches | None = None,
             sample_weights: Array | None = None, num_classes: int = 10,
             stacked: bool = False) -> FinetuneResult:
    """Fine-tune one damaged model (or a stack of them) and return arrays.

    A convenience around :func:`make_finetune` that compiles and runs once.
    Sweeps that call it repeatedly should build and ``jit`` the function
    themselves, so that it is compiled once.

    Args:
        key: data-order key (a stack of keys, ``[M]``, when ``stacked``).
        apply: ``apply(params, x) -> logits``.
        params: damaged parameters (leading model axis when ``stacked``).
        images: ``float32[N, H, W, C]`` recovery data.
        labels: ``int32[N]`` labels.
        optimizer: optax transformation (default: SGD 0.001, momentum 0.9).
        batch_size: examples per step.
        epochs: passes over the data (default 2 when ``steps`` is None).
        steps: number of step slots instead of epochs.
        mode: ``"all"``, ``"damaged"`` or ``"undamaged"``.
        mask: damage mask (stacked when ``stacked``); needed by the masked
            modes.
        frozen_structure: boolean pytree of entries held at zero (removed
            units), stacked when ``stacked``.
        eval_every: curve interval in steps.
        eval_batches: test batches for the curve.
        sample_weights: ``float32[N]`` per-example weights (default ones).
        num_classes: number of classes.
        stacked: ``params``/``mask``/``key`` carry a leading model axis;
            the models are recovered by one vmapped program.

    Returns:
        :class:`FinetuneResult` (leading model axis when ``stacked``).

    Raises:
        TypeError: for a key that is not a typed key (``"key: ..."``; an
            int or a legacy ``uint32`` key from ``jax.random.PRNGKey``),
            or non-integer labels.
        ValueError: labels outside ``[0, num_classes)`` (``"labels:
            ..."``), images, labels and weights of different lengths, a
            ``batch_size`` larger than the data, a model whose logits are
            not ``num_classes`` wide, params not stacked along the keys
            when ``stacked``; see also :func:`make_finetune` and
            :func:`trainable_mask`.
    """
    _checks.check_key(key, "key", batched=stacked)
    check_logits(apply, params, images, num_classes, stacked=stacked)
    check_recovery_data(images, labels, sample_weights, num_classes)
    check_eval_batches(eval_batches, num_classes)
    if mode != "all" and mask is None:
        raise ValueError(f"mode {mode!r} needs the damage mask, got None")
    recover = make_finetune(apply, optimizer, batch_size=batch_size,
                            steps=steps, epochs=epochs, mode=mode,
                            eval_every=eval_every, num_classes=num_classes)
    images, labels, weights = _as_arrays(images, labels, sample_weights)
    args = (key, params, mask, images, labels, weights, eval_batches)
    if frozen_structure is not None:
        args = args + (frozen_structure,)
    if stacked:
        run = stack_recover(recover, frozen=frozen_structure is not None)
    else:
        run = jax.jit(recover)
    return run(*args)


def timed_call(function: Callable[..., Any], *args: Any
               ) -> tuple[Any, float]:
    """Call ``function``, wait for its arrays, return ``(result, seconds)``."""
    start = time.perf_counter()
    result = jax.block_until_ready(function(*args))
    return result, time.perf_counter() - start
