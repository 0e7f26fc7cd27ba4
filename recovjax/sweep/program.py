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
from recovjax.evaluate import MetricFn, evaluate


DamageOp = Callable[[PRNGKey, Params, Any], Damage]
"""``op(key, params, amount) -> Damage``: the damage contract."""


@functools.lru_cache(maxsize=64)
def point_fn(model, op: DamageOp, metric_fn: MetricFn | None):
    """Damage and evaluate one point: the runner's unit of work.

    A point is ``(key, ratio, clean)``; the shared inputs are ``(params,
    batches)``. A point whose ``clean`` flag is set evaluates the undamaged
    parameters instead (the flag is traced), so the clean model rides along
    in a chunk and needs no program of its own. Cached, so that the
    runner's compiled program is reused for the same model and operator.
    """
    extra = {"info": model.info} if accepts_info(op) else {}
    forward, task = model.forward, tasks_lib.general_task(model)
    num_classes = model.num_classes if task is None else None

    def one(point, shared):
        key, ratio, keep = point
        params, batches = shared
        damaged = op(key, params, ratio, **extra).params
        chosen = jax.tree.map(lambda p, d: jnp.where(keep, p, d),
                              params, damaged)
        if task is not None:
            return tasks_lib.evaluate_task(task, forward, chosen, batches)
        return evaluate(forward, chosen, batches, num_classes,
                        metric_fn=metric_fn)

    return one


def chunk_program(model, op: DamageOp, metric_fn: MetricFn | None,
                   vmap_size: int, devices: tuple, model_devices: int = 1,
                   partition=None) -> runner.PointProgram:
    return runner.map_points(point_fn(model, op, metric_fn),
                             group_size=vmap_size, devices=devices,
                             model_devices=model_devices,
                             partition=partition)
