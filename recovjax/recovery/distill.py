"""Distillation: fine-tune toward the pretrained model's outputs, no labels.

The teacher (the checkpoint's parameters) labels the recovery images with its
logits once; the damaged student is then fine-tuned on
``T^2 * KL(softmax(teacher / T) || softmax(student / T))``. No true label is
read, which makes this the recovery for label noise and lost labels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from recovjax import _checks
from recovjax._types import Array, ApplyFn, Batches, Mask, Params, PRNGKey
from recovjax.recovery.finetune import (DEFAULT_BATCH_SIZE, FinetuneResult,
                                        Mode, check_eval_batches,
                                        check_recovery_data, distill_loss,
                                        make_finetune, stack_recover)

__all__ = ["distill", "distill_loss", "make_distill", "teacher_logits"]


@functools.partial(jax.jit, static_argnums=0)
def _forward_batches(apply: ApplyFn, params: Params, batches: Array) -> Array:
    def forward(_, batch):
        return None, apply(params, batch)
    return jax.lax.scan(forward, None, batches)[1]


def teacher_logits(apply: ApplyFn, teacher_params: Params, images: Array, *,
                   batch_size: int = 500) -> Array:
    """The teacher's logits for every input, computed in one compiled scan.

    Args:
        apply: ``apply(params, x) -> logits``.
        teacher_params: the pretrained parameters.
        images: ``[N, ...]`` inputs: images, or a task's model inputs
            (``task.inputs(data)``, e.g. ``int32[N, T]`` tokens).
        batch_size: examples per forward pass.

    Returns:
        ``float32[N, ...]``: the logits of every input (``[N, num_classes]``
        for images, ``[N, T, vocab_size]`` for tokens).
    """
    images = jnp.asarray(images)
    n = images.shape[0]
    count = -(-n // batch_size)
    padded = jnp.concatenate([images, jnp.zeros(
        (count * batch_size - n,) + images.shape[1:], images.dtype)])

    logits = _forward_batches(
        apply, teacher_params,
        padded.reshape((count, batch_size) + images.shape[1:]))
    return logits.reshape((count * batch_size,) + logits.shape[2:])[:n]


def make_distill(apply: ApplyFn,
                 optimizer: optax.GradientTransformation | None = None, *,
                 temperature: float = 1.0, batch_size: int = DEFAULT_BATCH_SIZE,
                 steps: int | None = None, epochs: int | None = None,
                 mode: Mode = "all", eval_every: int | None = None,
                 num_classes: int = 10, task=None):
    """:func:`~recovjax.recovery.make_finetune` with the distillation loss.

    The returned ``recover(key, params, mask, images, targets, weights,
    eval_batches=None, frozen=None)`` takes teacher logits (from
    :func:`teacher_logits`) where fine-tuning takes labels. With a
    :class:`~recovjax.tasks.Task` other than classification, ``images`` is
    the task's batch dict and the loss is the task's ``distill``.
    """
    return make_finetune(apply, optimizer, batch_size=batch_size, steps=steps,
                         epochs=epochs, mode=mode, eval_every=eval_every,
                         num_classes=num_classes, loss="distill",
                         temperature=temperature, task=task)


def distill(key: PRNGKey, apply: ApplyFn, params: Params,
            teacher_params: Params, images: Array, *,
            optimizer: optax.GradientTransformation | None = None,
            temperature: float = 1.0, batch_size: int = DEFAULT_BATCH_SIZE,
            epochs: int | None = None, steps: int | None = None,
            mode: Mode = "all", mask: Mask | None = None,
            eval_every: int | None = None,
            eval_batches: Batches | None = None,
            sample_weights: Array | None = None, num_classes: int = 10,
            stacked: bool = False) -> FinetuneResult:
    """Distil the teacher into a damaged model (or a stack of them).

    Args:
        key: data-order key (``[M]`` keys when ``stacked``).
        apply: ``apply(params, x) -> logits``.
        params: the damaged student(s).
        teacher_params: the pretrained parameters (one model).
        images: ``float32[N, H, W, C]`` unlabelled recovery images.
        optimizer: optax transformation (default SGD 0.001, momentum 0.9).
        temperature: softmax temperature ``T``.
        batch_size: examples per step.
        epochs: passes over the images (default 2 when ``steps`` is None).
        steps: number of step slots instead.
        mode: ``"all"``, ``"damaged"`` or ``"undamaged"``.
        mask: damage mask, needed by the masked modes.
        eval_every: curve interval in steps.
        eval_batches: labelled test batches, for the curve only.
        sample_weights: ``float32[N]`` per-example weights.
        num_classes: number of classes.
        stacked: recover a stack with one vmapped program.

    Returns:
        :class:`~recovjax.recovery.FinetuneResult`.

    Raises:
        TypeError: for a key that is not a typed key (``"key: ..."``).
        ValueError: images and weights of different lengths, and the
            checks of :func:`~recovjax.recovery.finetune`.
    """
    _checks.check_key(key, "key", batched=stacked)
    check_recovery_data(images, None, sample_weights, num_classes,
                        class_labels=False)
    check_eval_batches(eval_batches, num_classes)
    targets = teacher_logits(apply, teacher_params, images)
    recover = make_distill(apply, optimizer, temperature=temperature,
                           batch_size=batch_size, steps=steps, epochs=epochs,
                           mode=mode, eval_every=eval_every,
                           num_classes=num_classes)
    images = jnp.asarray(images)
    weights = (jnp.ones(images.shape[:1], jnp.float32)
               if sample_weights is None
               else jnp.asarray(sample_weights, jnp.float32))
    run = stack_recover(recover) if stacked else jax.jit(recover)
    return run(key, params, mask, images, targets, weights, eval_batches)
