"""The sweep: damage and evaluate every (damage kind, ratio, seed) point.

Modules: :mod:`~recovjax.sweep.keys` (a key per point),
:mod:`~recovjax.sweep.plan` (chunk and group sizes),
:mod:`~recovjax.sweep.program` (the unit of work the runner maps) and
:mod:`~recovjax.sweep.api` (:func:`sweep`, :func:`iter_sweep`,
:func:`damage_point`).

How a sweep runs
================

For each damage kind the points ``(ratio, seed)`` are laid out in a fixed
order (ratio-major) and cut into *chunks* of ``chunk_size`` points; the last
chunk is padded by repeating its last point and the padding is discarded.
One chunk is one call of one compiled program, so each kind compiles once
per (model, damage kind, shapes): ratios, seeds and keys are traced
arguments, never constants, and a second sweep with other ratio values of
the same count reuses the program (as does a second process, through the
persistent compilation cache, see :mod:`recovjax._compile_cache`).

A chunk runs on the one runner of :mod:`recovjax.runner`: the points are
sharded across ``devices`` with ``shard_map`` over a one-axis
:class:`jax.sharding.Mesh` (axis ``"points"``); parameters and evaluation
batches are replicated. On each device, ``lax.map`` walks over *groups* of
``vmap_size`` points, and a group is damaged (from each point's key, inside
the program) and evaluated under ``vmap`` (:func:`recovjax.evaluate.
evaluate`, each group scanning the evaluation batches once). Only one group's damaged
parameters and activations are alive at a time, so memory is bounded by
``vmap_size`` (capped by ``memory_budget_bytes`` over XLA's memory
analysis of one point's program) and does not grow with
the number of points; each finished chunk is read back and streamed to
``on_chunk`` (or yielded by :func:`iter_sweep`) while the next one runs.
The undamaged model is evaluated as one more slot of the first kind's last
chunk, flagged by a traced boolean, so it costs no compilation of its own.

Keys
====

Point ``(kind, ratio index, seed)`` gets::

    key = fold_in(fold_in(fold_in(root_key, damage_id(kind)), ratio_index),
                  seed)

where :func:`damage_id` is a CRC-32 of the kind's *name*, so adding,
removing or reordering kinds never changes another kind's keys, and a
point's key does not depend on the other ratios or seeds in the sweep.
The keys of a chunk are derived on the host (:func:`point_keys`, in NumPy
for the default ``threefry2x32`` keys) and passed to the chunk's program,
which therefore contains no threefry. :func:`damage_point` re-runs one
point alone and gives the sweep's numbers bit for bit.

Several devices and several hosts
=================================

With ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before JAX
is imported) a CPU shows four devices, and ``sweep(..., devices=None)``
shards over all of them; the numbers equal a one-device run. On several
hosts, start every process with :func:`jax.distributed.initialize` (e.g.
``jax.distributed.initialize(coordinator_address="host0:1234",
num_processes=N, process_id=i)``), then run the *same* ``sweep`` call with
the same arguments on every process: ``devices=None`` means
``jax.devices()``, the global device list, inputs are built as global
arrays with :func:`jax.make_array_from_callback`, and results are gathered
to every process with
:func:`jax.experimental.multihost_utils.process_allgather`, so each
process ends with the whole table (write it from process 0 only).
"""

from recovjax.sweep.api import (CLEAN, ChunkResult, SweepPoint, SweepResult,
                                damage_point, device_description, iter_sweep,
                                library_versions, sweep)
from recovjax.sweep.keys import damage_id, point_key, point_keys
from recovjax.sweep.plan import (DEFAULT_BATCH_SIZE, DEFAULT_CHUNK_POINTS,
                                 DEFAULT_MEMORY_BUDGET, DEFAULT_VMAP_SIZE,
                                 SweepPlan, plan_sweep)
from recovjax.sweep.program import DamageOp, chunk_program, point_fn

__all__ = ["CLEAN", "ChunkResult", "DEFAULT_BATCH_SIZE",
           "DEFAULT_CHUNK_POINTS", "DEFAULT_MEMORY_BUDGET",
           "DEFAULT_VMAP_SIZE", "DamageOp", "SweepPlan", "SweepPoint",
           "SweepResult", "chunk_program", "damage_id", "damage_point",
           "device_description", "iter_sweep", "library_versions",
           "plan_sweep", "point_fn", "point_key", "point_keys", "sweep"]
