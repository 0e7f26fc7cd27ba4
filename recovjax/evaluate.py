"""Compiled evaluation: exact metrics over fixed-shape, masked batches."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from recovjax._types import Array, Batches, Params


class Metrics(NamedTuple):
    """Evaluation metrics of one model (or a stack, with a leading axis).

    Attributes:
        accuracy: fraction of examples whose argmax logit is the label.
        loss: mean cross-entropy (the seed's L(theta)); may be inf or NaN for
            models with non-finite parameters, and is reported as such.
        per_class_accuracy: ``[num_classes]`` accuracy within each class
            (NaN for a class with no examples).
        count: number of examples evaluated (padding excluded).
    """

    accuracy: Array
    loss: Array
    per_class_accuracy: Array
    count: Array


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-example softmax cross-entropy with integer labels."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def evaluate(apply, params: Params, batches: Batches, num_classes: int
             ) -> Metrics:
    """Evaluate one model over every (unmasked) example in ``batches``.

    Totals are accumulated on the device in a ``lax.scan`` over batches; this
    function is traceable and meant to be called inside ``jit``/``vmap``.

    Args:
        apply: ``apply(params, x) -> logits``.
        params: the model's parameters.
        batches: fixed-shape batches with a padding mask.
        num_classes: number of classes (static).

    Returns:
        :class:`Metrics`.
    """

    def accumulate(totals, batch):
        images, labels, mask = batch
        logits = apply(params, images)
        weight = mask.astype(jnp.float32)
        # where, not multiply: padding must not turn a finite total into NaN.
        correct = jnp.where(mask, jnp.argmax(logits, axis=-1) == labels, 0.0)
        loss = jnp.where(mask, cross_entropy(logits, labels), 0.0)
        onehot = jax.nn.one_hot(labels, num_classes) * weight[:, None]
        correct_total, loss_total, class_correct, class_count = totals
        return (correct_total + correct.sum(), loss_total + loss.sum(),
                class_correct + (onehot * correct[:, None]).sum(0),
                class_count + onehot.sum(0)), None

    zeros = jnp.zeros((num_classes,), jnp.float32)
    (correct, loss, class_correct, class_count), _ = jax.lax.scan(
        accumulate, (jnp.float32(0), jnp.float32(0), zeros, zeros),
        (batches.images, batches.labels, batches.mask))
    count = class_count.sum()
    return Metrics(accuracy=correct / count, loss=loss / count,
                   per_class_accuracy=class_correct / class_count,
                   count=count)
