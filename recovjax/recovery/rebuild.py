"""Rebuild structural damage: re-initialise removed units, or take them back.

Structural damage (removed units, heads, blocks) marks every entry of a
removed unit in its mask. Two rebuilds are offered:

- :func:`make_rebuild` / :func:`rebuild_reinit`: draw those entries afresh
  from the model's initialiser with a new key, then fine-tune with no
  structural freeze, so the units can relearn.
- :func:`rebuild_from_checkpoint`: take the removed entries back from the
  pretrained checkpoint (:func:`~recovjax.recovery.restore_entries`).
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from recovjax import _checks
from recovjax._types import (Array, ApplyFn, Batches, InitFn, Mask, Params,
                             PRNGKey)
from recovjax.recovery.finetune import (DEFAULT_BATCH_SIZE, FinetuneResult,
                                        check_eval_batches,
                                        check_recovery_data,
                                        make_finetune, stack_recover)
from recovjax.recovery.restore import RestoreResult, restore_entries


def reinitialize(key: PRNGKey, init: InitFn, sample: Array, params: Params,
                 mask: Mask) -> Params:
    """Replace the masked entries by fresh initial values.

    Pure and vmappable: ``init(key, sample)`` draws a whole fresh parameter
    tree and ``where(mask, fresh, params)`` keeps only the masked entries.

    Args:
        key: key of the fresh initialisation.
        init: the model's ``init(key, sample) -> params``.
        sample: an input batch fixing shapes (e.g. ``images[:1]``).
        params: damaged parameters.
        mask: entries to re-initialise (removed units).

    Returns:
        Parameters equal to ``params`` outside ``mask``.
    """
    fresh = init(key, sample)
    return jax.tree.map(lambda f, p, m: jnp.where(m, f.astype(p.dtype), p),
                        fresh, params, mask)


def make_rebuild(init: InitFn, sample: Array, apply: ApplyFn,
                 optimizer: optax.GradientTransformation | None = None, *,
                 batch_size: int = DEFAULT_BATCH_SIZE,
                 steps: int | None = None, epochs: int | None = None,
                 eval_every: int | None = None, num_classes: int = 10,
                 task=None) -> Callable[..., FinetuneResult]:
    """Re-initialise removed entries, then fine-tune everything.

    ``sample`` is one batch of model inputs (for ``init``); ``task`` is a
    :class:`~recovjax.tasks.Task` other than classification, as for
    :func:`~recovjax.recovery.make_finetune`.

    Returns:
        ``recover(key, params, mask, images, labels, weights,
        eval_batches=None) -> FinetuneResult`` with the signature of
        :func:`~recovjax.recovery.make_finetune`'s function (vmappable the
        same way). ``key`` is split into the re-initialisation key and the
        data-order key.
    """
    finetune = make_finetune(apply, optimizer, batch_size=batch_size,
                             steps=steps, epochs=epochs, mode="all",
                             eval_every=eval_every, num_classes=num_classes,
                             task=task)

    def recover(key: PRNGKey, params: Params, mask: Mask, images: Array,
                labels: Array, weights: Array,
                eval_batches: Batches | None = None) -> FinetuneResult:
        _checks.check_key(key, "key")
        init_key, order_key = jax.random.split(key)
        rebuilt = reinitialize(init_key, init, sample, params, mask)
        return finetune(order_key, rebuilt, None, images, labels, weights,
                        eval_batches)

    return recover


def rebuild_reinit(key: PRNGKey, init: InitFn, apply: ApplyFn,
                   params: Params, mask: Mask, images: Array, labels: Array,
                   *, optimizer: optax.GradientTransformation | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE,
                   epochs: int | None = None, steps: int | None = None,
                   eval_every: int | None = None,
                   eval_batches: Batches | None = None,
                   sample_weights: Array | None = None,
                   num_classes: int = 10, stacked: bool = False
                   ) -> FinetuneResult:
    """Re-initialise the removed units with a fresh key and fine-tune.

    Args:
        key: re-initialisation and data-order key (``[M]`` when stacked).
        init: the model's ``init``.
        apply: the model's ``apply``.
        params: damaged parameters (stacked when ``stacked``).
        mask: structural damage mask (stacked when ``stacked``).
        images: ``float32[N, H, W, C]`` recovery data.
        labels: ``int32[N]``.
        optimizer: optax transformation (default SGD 0.001, momentum 0.9).
        batch_size: examples per step.
        epochs: passes over the data (default 2 when ``steps`` is None).
        steps: number of step slots instead.
        eval_every: curve interval in steps.
        eval_batches: test batches for the curve.
        sample_weights: per-example weights.
        num_classes: number of classes.
        stacked: recover a stack with one vmapped program.

    Returns:
        :class:`~recovjax.recovery.FinetuneResult`.

    Raises:
        TypeError: for a key that is not a typed key (``"key: ..."``).
        ValueError: labels outside ``[0, num_classes)``, data of
            different lengths, and the checks of
            :func:`~recovjax.recovery.finetune`.
    """
    _checks.check_key(key, "key", batched=stacked)
    check_recovery_data(images, labels, sample_weights, num_classes)
    check_eval_batches(eval_batches, num_classes)
    images = jnp.asarray(images)
    recover = make_rebuild(init, images[:1], apply, optimizer,
                           batch_size=batch_size, steps=steps, epochs=epochs,
                           eval_every=eval_every, num_classes=num_classes)
    weights = (jnp.ones(images.shape[:1], jnp.float32)
               if sample_weights is None
               else jnp.asarray(sample_weights, jnp.float32))
    run = stack_recover(recover) if stacked else jax.jit(recover)
    return run(key, params, mask, images, jnp.asarray(labels), weights,
               eval_batches)


def rebuild_from_checkpoint(directory: os.PathLike[str] | str,
                            params: Params, mask: Mask, *,
                            stacked: bool = False) -> RestoreResult:
    """Take the removed structure back from the pretrained checkpoint.

    Same as :func:`~recovjax.recovery.restore_entries`: only the leaves the
    mask touches are read.
    """
    return restore_entries(directory, params, mask, stacked=stacked)
