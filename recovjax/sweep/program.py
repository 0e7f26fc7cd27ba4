"""The sweep's unit of work, and the runner's program over its points.

One point is ``(key, ratio, clean)``: the damage is re-derived from the key
inside the compiled program, so no damaged copy exists outside the group
being evaluated. :func:`chunk_program` hands the per-point function to the
one runner of :mod:`recovjax.runner`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from recovjax import runner
from recovjax import tasks as tasks_lib
from recovjax._types import Damage, Params, PRNGKey
from recovjax.damage.registry import accepts_info
from recovjax.evaluate import (MetricFn, accumulate, evaluate, finish,
                               start_totals)


DamageOp = Callable[[PRNGKey, Params, Any], Damage]
"""``op(key, params, amount) -> Damage``: the damage contract."""


@functools.lru_cache(maxsize=64)
def point_fn(model, op: DamageOp, metric_fn: MetricFn | None,
             outcomes: bool = False):
    """Damage and evaluate one point: the runner's unit of work.

    A point is ``(key, ratio, clean)``; the shared inputs are ``(params,
    batches)``, or ``(params, (batches, reference))`` with ``outcomes``
    (``reference`` the clean top-1 of every example, against which each
    point's outcomes are counted). A point whose ``clean`` flag is set
    evaluates the undamaged parameters instead (the flag is traced), so the
    clean model rides along in a chunk and needs no program of its own.
    Cached, so that the runner's compiled program is reused for the same
    model and operator.
    """
    extra = {"info": model.info} if accepts_info(op) else {}
    task = tasks_lib.general_task(model)
    num_classes = model.num_classes if task is None else None

    def one(point, shared):
        key, ratio, keep = point
        params, data = shared
        batches, reference = data if outcomes else (data, None)
        apply, chosen = _damaged(model, op, extra, key, ratio, keep, params)
        if task is not None:
            return tasks_lib.evaluate_task(task, apply, chosen, batches)
        return evaluate(apply, chosen, batches, num_classes,
                        metric_fn=metric_fn, reference=reference)

    return one


def _damaged(model, op, extra: dict, key, ratio, keep, params):
    """``(apply, params)`` of one point: the forward pass and parameters it
    is evaluated with.

    Parameter damage changes the parameters; activation faults change the
    forward pass (and, mixed with weight faults, the parameters too). The
    traced clean flag keeps the clean parameters and, for activation
    faults, sets the amount to 0, which hits nothing.
    """
    def unless_clean(damaged):
        return jax.tree.map(lambda p, d: jnp.where(keep, p, d), params,
                            damaged)

    if not is_activation_fault(op):
        return model.forward, unless_clean(
            op(key, params, ratio, **extra).params)
    amount = jnp.where(keep, 0.0, ratio)
    chosen = params
    if hasattr(op, "damage_params"):
        chosen = unless_clean(op.damage_params(key, params, amount,
                                               info=model.info))
    return op.apply(model, key, amount), chosen


def is_activation_fault(op) -> bool:
    """Whether ``op`` corrupts activations (it changes the forward pass)."""
    return getattr(op, "damage_kind", None) == "activations"


def chunk_program(model, op: DamageOp, metric_fn: MetricFn | None,
                   vmap_size: int, devices: tuple, model_devices: int = 1,
                   partition=None, outcomes: bool = False
                   ) -> runner.PointProgram:
    return _sweep_program(point_fn(model, op, metric_fn, outcomes),
                          vmap_size, devices, model_devices, partition)


def _sweep_program(fn, vmap_size: int, devices: tuple, model_devices: int,
                   partition) -> runner.PointProgram:
    # The sweep sizes its calls itself (plan.py), a chunk per call.
    return runner.map_points(fn, group_size=vmap_size, devices=devices,
                             chunk_points=runner.DEFAULT_CHUNK_POINTS,
                             model_devices=model_devices,
                             partition=partition)


@functools.lru_cache(maxsize=64)
def stream_point_fn(model, op: DamageOp, metric_fn: MetricFn | None):
    """:func:`point_fn` for one block of a streamed evaluation set.

    A point is ``(key, ratio, clean, totals)`` and the shared inputs are
    ``(params, block)``: the point is damaged again from its key, the
    block's batches are added to its running totals, and the point returns
    ``(totals, metrics so far)``. The additions are those of
    :func:`point_fn` over the whole set, in the same order.
    """
    extra = {"info": model.info} if accepts_info(op) else {}
    num_classes = model.num_classes

    def one(point, shared):
        key, ratio, keep, totals = point
        params, block = shared
        apply, chosen = _damaged(model, op, extra, key, ratio, keep, params)
        totals = accumulate(apply, chosen, block, num_classes, totals,
                            metric_fn)
        return totals, finish(totals)

    return one


def stream_chunk_program(model, op: DamageOp, metric_fn: MetricFn | None,
                         vmap_size: int, devices: tuple,
                         model_devices: int = 1,
                         partition=None, outcomes: bool = False
                         ) -> runner.PointProgram:
    if outcomes:  # pragma: no cover - the sweep refuses it first
        raise ValueError("outcomes need the data in memory")
    return _sweep_program(stream_point_fn(model, op, metric_fn), vmap_size,
                          devices, model_devices, partition)


def _indexed(forward):
    # forward as a pass that takes (and ignores) the batch index.
    def indexed(params, inputs, batch=0):
        return forward(params, inputs)
    indexed.takes_batch = True
    return indexed


def run_streamed(model, params: Params, stream, chunks: list,
                 metric_fn: MetricFn | None) -> list:
    """Evaluate chunks of points over a :class:`~recovjax.data.BatchStream`.

    The stream is read once, block by block. Each block is placed on the
    devices and every chunk's program adds it to that chunk's totals, so a
    point's damage is derived again per block while the images are read
    only once. The next block is placed only after the previous one is
    evaluated: at most two blocks are in memory besides grain's prefetch.

    Args:
        model: the model.
        params: the undamaged parameters.
        stream: the evaluation data.
        chunks: ``(program, points)`` per chunk, each ``points`` a placed
            ``(keys, ratios, clean flags)`` stack of the program's size,
            the program from :func:`stream_chunk_program`.
        metric_fn: the user metric.

    Returns:
        Per chunk, the device :class:`~recovjax.evaluate.Metrics` of its
        points over the whole stream.
    """
    totals: list = [None] * len(chunks)
    metrics: list = [None] * len(chunks)
    for block in stream:
        if totals[0] is None:
            # The totals count batches, which chunks of activation faults
            # key their transient faults by (the others carry the count).
            struct = jax.eval_shape(lambda p, b: start_totals(
                _indexed(model.forward), p, b, model.num_classes,
                metric_fn), params, block)
            for index, (program, points) in enumerate(chunks):
                size = int(np.shape(points[1])[0])
                totals[index] = runner.place(jax.tree.map(
                    lambda s: np.zeros((size,) + s.shape, s.dtype), struct),
                    program.sharded)
        elif metrics[-1] is not None:
            # Back-pressure: the previous block is done before the next one
            # is placed, so blocks cannot pile up ahead of the devices.
            jax.block_until_ready(metrics[-1])
        block = jax.tree.map(jnp.asarray, block)
        for index, (program, points) in enumerate(chunks):
            totals[index], metrics[index] = program(
                (*points, totals[index]), (params, block))
    return metrics
