"""The sweep's plan: points per compiled call and per ``vmap`` group.

Group sizes come from XLA's memory analysis of one point's compiled
program (:func:`recovjax.runner.point_memory`), measured only when a group
of more than one point is asked for.
"""

from __future__ import annotations

import dataclasses

import numpy as np


DEFAULT_BATCH_SIZE = 100
"""Evaluation batch size (examples per forward pass of one model).

Chosen with :data:`DEFAULT_VMAP_SIZE` by ``benchmarks/bench_sweep.py`` on a
2-core CPU: with banded-GEMM convolutions, batches of 100 images keep a
model's activations in cache; W1's steady state took 1.75-1.83 s with
batches of 100 against 1.92 s (200), 2.0-2.2 s (250) and 1.9-2.1 s (50).
"""


DEFAULT_VMAP_SIZE = 1
"""Points damaged and evaluated together under ``vmap`` on one device.

Chosen by ``benchmarks/bench_sweep.py`` on a 2-core CPU (LeNet-5): one
model at a time inside ``lax.map`` beat ``vmap`` groups of 2, 4, 5, 10 and
100 by 10-40 % (under ``vmap`` every convolution becomes a batched matmul
over per-model slabs, and a group's activations no longer fit in cache).
On accelerators wider groups win; raise ``vmap_size`` there (it is capped
by ``memory_budget_bytes``).
"""


DEFAULT_CHUNK_POINTS = 100
"""Most points per device in a default chunk (see :func:`plan_sweep`)."""


DEFAULT_MEMORY_BUDGET = 1 << 30
"""Bytes a chunk's working set may take (1 GiB)."""


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """How a sweep is laid out (derived by :func:`plan_sweep`).

    Attributes:
        chunk_size: points per compiled call (a multiple of
            ``vmap_size * num_devices``).
        vmap_size: points evaluated together under ``vmap`` on one device.
        num_devices: devices the model axis is sharded over.
        batch_size: evaluation batch size.
        model_bytes: bytes one point's compiled program needs (XLA's
            memory analysis, :func:`recovjax.runner.point_memory`); 0 when
            not measured (groups of one point always run).
    """

    chunk_size: int
    vmap_size: int
    num_devices: int
    batch_size: int
    model_bytes: int


def plan_sweep(model_bytes: int, num_points: int, *, num_devices: int = 1,
               batch_size: int = DEFAULT_BATCH_SIZE,
               chunk_size: int | None = None, vmap_size: int | None = None,
               memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> SweepPlan:
    """Chunk and group sizes for a sweep.

    ``vmap_size`` (default :data:`DEFAULT_VMAP_SIZE`) is lowered until one
    group's working set, ``vmap_size * model_bytes``, fits the budget (at
    least 1). ``chunk_size`` defaults to the points per kind split into as
    few chunks of at most :data:`DEFAULT_CHUNK_POINTS` per device as
    possible, balanced, and rounded up to a multiple of ``vmap_size *
    num_devices``; an explicit one is rounded up to that multiple.

    Args:
        model_bytes: one point's bytes (:func:`recovjax.runner.point_memory`;
            0 when not measured).
        num_points: points per damage kind.
        num_devices: devices of the mesh.
        batch_size: evaluation batch size (recorded).
        chunk_size: points per compiled call, or ``None``.
        vmap_size: points per vectorised group, or ``None`` for the default.
        memory_budget_bytes: bytes one group may use.

    Returns:
        The :class:`SweepPlan`.

    Raises:
        ValueError: for non-positive sizes or budget.
    """
    for name, value in (("num_points", num_points),
                        ("num_devices", num_devices),
                        ("memory_budget_bytes", memory_budget_bytes),
                        ("chunk_size", chunk_size), ("vmap_size", vmap_size)):
        if value is not None and (isinstance(value, bool) or
                                  not isinstance(value, (int, np.integer)) or
                                  value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    fit = max(1, int(memory_budget_bytes) // max(1, int(model_bytes)))
    wanted = DEFAULT_VMAP_SIZE if vmap_size is None else int(vmap_size)
    group = max(1, min(wanted, fit))
    unit = group * num_devices
    if chunk_size is None:
        # As few chunks as the cap allows, of balanced size, so that the
        # padding is below one unit per chunk (101 points run as 2 x 51,
        # not as 100 + 1 padded to 100).
        per_device = -(-num_points // num_devices)
        chunks = -(-per_device // DEFAULT_CHUNK_POINTS)
        chunk_size = -(-per_device // chunks) * num_devices
    chunk = -(-int(chunk_size) // unit) * unit
    return SweepPlan(chunk_size=chunk, vmap_size=group,
                     num_devices=num_devices, batch_size=batch_size,
                     model_bytes=int(model_bytes))
