"""The sweep: damage and evaluate every (damage kind, ratio, seed) point.

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

Inside a chunk, the model axis is sharded across ``devices`` with
``shard_map`` over a one-axis :class:`jax.sharding.Mesh` (axis ``"models"``);
parameters and evaluation batches are replicated. On each device,
``lax.map`` walks over *groups* of ``vmap_size`` points, and a group is
damaged and evaluated under ``vmap`` (:func:`recovjax.evaluate.evaluate`,
each group scanning the evaluation batches once). Only one group's damaged
parameters and activations are alive at a time, so memory is bounded by
``vmap_size`` (sized from ``memory_budget_bytes``) and does not grow with
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
which therefore contains no threefry. :func:`damage_point` re-runs one point alone and gives the sweep's numbers
bit for bit.

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

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import time
import zlib
from typing import (Any, Callable, Iterator, Mapping, NamedTuple, Sequence)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from recovjax import _checks
from recovjax._types import Batches, Dataset, Damage, Params, PRNGKey, Split
from recovjax.data import batch_split
from recovjax.evaluate import MetricFn, Metrics, evaluate
from recovjax.models.adapter import check_params, require_model
from recovjax import tasks as tasks_lib
from recovjax.results import ResultsTable, metrics_rows, task_rows

DamageOp = Callable[[PRNGKey, Params, Any], Damage]
"""``op(key, params, amount) -> Damage``: the damage contract."""

AXIS = "models"
"""Name of the mesh axis the model axis is sharded over."""

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

CLEAN = "none"
"""Damage name of the undamaged model's rows (stage ``clean``)."""


# --------------------------------------------------------------------------
# Keys and points.
# --------------------------------------------------------------------------


def damage_id(name: str) -> int:
    """Stable integer identity of a damage kind: CRC-32 of its name (31 bits).

    Args:
        name: the kind's name.

    Returns:
        An ``int`` in ``[0, 2**31)``; the same name always gives the same
        number, whatever other kinds are swept.
    """
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def point_key(root_key: PRNGKey, damage: str, ratio_index: int, seed: int
              ) -> PRNGKey:
    """The key of one sweep point.

    Args:
        root_key: the sweep's root key (typed).
        damage: the damage kind's name.
        ratio_index: position of the ratio in the sweep's ``ratios``.
        seed: the seed value (an entry of the sweep's seeds).

    Returns:
        ``fold_in(fold_in(fold_in(root_key, damage_id(damage)), ratio_index),
        seed)``.
    """
    key = jax.random.fold_in(root_key, damage_id(damage))
    key = jax.random.fold_in(key, ratio_index)
    return jax.random.fold_in(key, seed)


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry_fold_in(key_data: np.ndarray, data: np.ndarray) -> np.ndarray:
    # jax.random.fold_in for threefry2x32 keys, in NumPy, for many keys at
    # once: the Threefry-2x32 hash (20 rounds) of the counter pair
    # (0, data) under the key, as JAX computes it (threefry_2x32 of
    # threefry_seed(data)). Bit-equality with JAX is tested.
    k0, k1 = key_data[:, 0], key_data[:, 1]
    schedule = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x = [np.zeros_like(data) + k0, data + k1]
    with np.errstate(over="ignore"):
        for block in range(5):
            for rotation in _THREEFRY_ROTATIONS[block % 2]:
                x[0] = x[0] + x[1]
                x[1] = (x[1] << np.uint32(rotation)) | (
                    x[1] >> np.uint32(32 - rotation))
                x[1] = x[0] ^ x[1]
            x[0] = x[0] + schedule[(block + 1) % 3]
            x[1] = x[1] + schedule[(block + 2) % 3] + np.uint32(block + 1)
    return np.stack(x, axis=1)


def _fold_on_host(root_key: PRNGKey, kind_id: int, ratio_indices: np.ndarray,
                  seeds: np.ndarray) -> PRNGKey | None:
    # point_key for many points without a device round trip per key, when
    # the key is JAX's default threefry2x32 and every datum is a uint32.
    if (str(jax.random.key_impl(root_key)) != "threefry2x32"
            or min(ratio_indices.min(initial=0), seeds.min(initial=0)) < 0
            or max(ratio_indices.max(initial=0), seeds.max(initial=0))
            > 0xFFFFFFFF):
        return None
    root = np.asarray(jax.random.key_data(root_key), np.uint32).reshape(1, 2)
    kind = _threefry_fold_in(root, np.asarray([kind_id], np.uint32))
    count = ratio_indices.shape[0]
    ratio = _threefry_fold_in(np.broadcast_to(kind, (count, 2)),
                              ratio_indices.astype(np.uint32))
    point = _threefry_fold_in(ratio, seeds.astype(np.uint32))
    return jax.random.wrap_key_data(point, impl="threefry2x32")


def point_keys(root_key: PRNGKey, damage: str, ratio_indices: Sequence[int],
               seeds: Sequence[int]) -> PRNGKey:
    """:func:`point_key` for many points of one damage kind, in one call.

    The keys are derived on the host, before the sweep's programs run, so
    that the damage-and-evaluate programs take keys as inputs and contain
    no threefry (XLA:CPU compiles threefry under ``vmap`` into dozens of
    small kernels, about half a second per derivation). For JAX's default
    ``threefry2x32`` keys the three ``fold_in`` steps are computed in NumPy
    for all points at once (bit-equal to ``jax.random.fold_in``, tested);
    other key implementations take one scalar ``jax.random.fold_in`` per
    step.

    Args:
        root_key: the sweep's root key (typed).
        damage: the damage kind's name.
        ratio_indices: each point's ratio position.
        seeds: each point's seed value (as many as ``ratio_indices``).

    Returns:
        A key array of shape ``[len(ratio_indices)]``; entry ``i`` equals
        ``point_key(root_key, damage, ratio_indices[i], seeds[i])``.
    """
    ratio_indices = np.asarray(ratio_indices, np.int64)
    seeds = np.asarray(seeds, np.int64)
    if ratio_indices.shape != seeds.shape or ratio_indices.ndim != 1:
        raise ValueError(f"ratio_indices and seeds must be flat and of one "
                         f"length, got shapes {ratio_indices.shape} and "
                         f"{seeds.shape}")
    on_host = _fold_on_host(root_key, damage_id(damage), ratio_indices, seeds)
    if on_host is not None:
        return on_host
    kind_key = jax.random.fold_in(root_key, damage_id(damage))
    ratio_keys: dict[int, PRNGKey] = {}
    data = []
    for ratio_index, seed in zip(ratio_indices.tolist(), seeds.tolist()):
        if ratio_index not in ratio_keys:
            ratio_keys[ratio_index] = jax.random.fold_in(kind_key,
                                                         ratio_index)
        data.append(np.asarray(jax.random.key_data(
            jax.random.fold_in(ratio_keys[ratio_index], seed))))
    return jax.random.wrap_key_data(np.stack(data),
                                    impl=jax.random.key_impl(root_key))


class SweepPoint(NamedTuple):
    """One point of a sweep.

    Attributes:
        damage: the damage kind's name.
        ratio_index: position of ``ratio`` in the sweep's ratios.
        ratio: the damage amount.
        seed: the seed value.
    """

    damage: str
    ratio_index: int
    ratio: float
    seed: int


class ChunkResult(NamedTuple):
    """What one finished chunk streams out.

    Attributes:
        damage: the damage kind of every point in the chunk.
        points: the chunk's points (padding removed), in sweep order.
        metrics: host (NumPy) :class:`~recovjax.evaluate.Metrics` with a
            leading axis over ``points``.
        rows: the results rows of these points (stage ``damaged``).
        clean_rows: the undamaged model's rows (stage ``clean``) when this
            chunk carried it (see ``include_clean`` of :func:`iter_sweep`),
            else empty.
    """

    damage: str
    points: list[SweepPoint]
    metrics: Metrics
    rows: list[dict[str, Any]]
    clean_rows: tuple[dict[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """How a sweep is laid out (derived by :func:`plan_sweep`).

    Attributes:
        chunk_size: points per compiled call (a multiple of
            ``vmap_size * num_devices``).
        vmap_size: points evaluated together under ``vmap`` on one device.
        num_devices: devices the model axis is sharded over.
        batch_size: evaluation batch size.
        model_bytes: estimated working-set bytes of one model under
            evaluation (3 x parameters + activations of one batch).
    """

    chunk_size: int
    vmap_size: int
    num_devices: int
    batch_size: int
    model_bytes: int


@dataclasses.dataclass
class SweepResult:
    """What :func:`sweep` returns.

    Attributes:
        table: the tidy :class:`~recovjax.results.ResultsTable`.
        plan: the :class:`SweepPlan` used.
        seconds: wall time of the sweep (compile included).
    """

    table: ResultsTable
    plan: SweepPlan
    seconds: float


# --------------------------------------------------------------------------
# Argument handling at the boundary.
# --------------------------------------------------------------------------


def _seed_key(seed: int) -> PRNGKey:
    # jax.random.key(seed) without compiling a program for it: a
    # threefry2x32 key of a seed in [0, 2**31) holds the words (0, seed).
    if (jax.config.jax_default_prng_impl == "threefry2x32"
            and 0 <= seed < 2**31):
        return jax.random.wrap_key_data(np.asarray([0, seed], np.uint32),
                                        impl="threefry2x32")
    return jax.random.key(seed)


def _root(root_key: PRNGKey | int) -> tuple[PRNGKey, int | None]:
    if isinstance(root_key, bool):
        raise TypeError("root_key must be a typed key or an int seed, got "
                        f"{root_key!r}")
    if isinstance(root_key, (int, np.integer)):
        return _seed_key(int(root_key)), int(root_key)
    _checks.check_key(root_key, "root_key")
    return root_key, None


def _seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be a positive count or a list of "
                             f"seeds, got {seeds}")
        return list(range(int(seeds)))
    values = list(seeds)
    if not values:
        raise ValueError("seeds is empty")
    for seed in values:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)
                                                    ) or not (
                0 <= seed < 2**31):
            raise ValueError(f"seeds must be ints in [0, 2**31), got "
                             f"{seed!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"seeds must be distinct, got {values}")
    return [int(seed) for seed in values]


def _ratios(ratios: Sequence[float]) -> list[float]:
    values = [float(r) for r in np.asarray(ratios, dtype=np.float64).ravel()]
    if not values:
        raise ValueError("ratios is empty")
    for ratio in values:
        if not math.isfinite(ratio) or ratio < 0:
            raise ValueError(f"ratios must be finite and non-negative, got "
                             f"{ratio}")
    return values


@functools.lru_cache(maxsize=None)
def _registered(name: str) -> DamageOp:
    # Damage operators are pure and settled at construction, so one op per
    # name can be reused; reusing it keeps the compiled programs cached.
    from recovjax.damage import get_damage
    return get_damage(name)


def _damages(damages: Mapping[str, DamageOp] | Sequence[str] | str
             ) -> dict[str, DamageOp]:
    if isinstance(damages, str):
        damages = [damages]
    if isinstance(damages, Mapping):
        out = dict(damages)
        for name, op in out.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"damage names must be non-empty str, got "
                                f"{name!r}")
            if not callable(op):
                raise TypeError(f"damage {name!r} must be callable "
                                "op(key, params, amount) -> Damage")
    else:
        names = list(damages)
        if len(set(names)) != len(names):
            raise ValueError(f"damage kinds must be distinct, got {names}")
        out = {}
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"damage kinds must be names (str) or a "
                                f"mapping name -> op, got {name!r}")
            out[name] = _registered(name)
    if not out:
        raise ValueError("no damage kinds given")
    if CLEAN in out:
        raise ValueError(f"{CLEAN!r} is reserved for the clean model's rows")
    for name, op in list(out.items()):
        # Every ratio is checked on the host (_ratios, _check_fractions), so
        # an op in checked mode runs unchecked: its checkify.check could not
        # be staged in the sweep's programs.
        op = out[name] = getattr(op, "unchecked", op)
        if getattr(op, "damage_kind", None) == "data":
            raise ValueError(
                f"damages: {name!r} is a data damage (op(key, images, labels, "
                "amount, *, num_classes)), but a sweep damages parameters; "
                "apply it to the recovery data instead (recovjax.recovery."
                "make_task), or sweep a params/structure damage "
                "(recovjax.damage.damage_names('params'))")
    return out


def _check_fractions(kinds: Mapping[str, DamageOp], ratios: Sequence[float]
                     ) -> None:
    # The CLI's rule, for the Python API: a fraction-valued kind (ratio,
    # rate) takes amounts in [0, 1]; inside the programs they are traced,
    # and an unchecked traced fraction is clipped, not reported.
    for name, op in kinds.items():
        if not getattr(op, "amount_is_fraction", False):
            continue
        high = max(ratios)
        if high > 1:
            amount = getattr(op, "amount_name", "ratio")
            raise ValueError(f"ratios: damage {name!r} takes a {amount} in "
                             f"[0, 1] (a fraction), got {high}")


def _task_of(model) -> tasks_lib.Task | None:
    # None: the classification path of recovjax.evaluate (Batches).
    task = getattr(model, "task", "classification")
    if isinstance(task, str):
        if task == "classification":
            return None
        raise ValueError(f"model.task: {task!r} is not a task; build the "
                         f"model with task=recovjax.tasks.get_task(...)")
    if not isinstance(task, tasks_lib.Task):
        raise TypeError(f"model.task must be 'classification' or a "
                        f"recovjax.tasks.Task, got {type(task).__name__}")
    return None if task.name == "classification" else task


def _check_data(model, batches) -> None:
    # Once per sweep, on the host: the programs get the batches traced.
    require_model(model)
    task = _task_of(model)
    if task is not None:
        tasks_lib.check_batch(task, batches, "data", stacked=True)
        return
    _checks.check_labels(batches.labels, model.num_classes, "data.labels",
                         where=batches.mask)


def _batch_inputs(model, batches) -> jax.ShapeDtypeStruct:
    # The inputs of one batch, as the model reads them.
    task = _task_of(model)
    if task is None:
        return jax.ShapeDtypeStruct(batches.images.shape[1:],
                                    batches.images.dtype)
    one = {key: jax.ShapeDtypeStruct(np.shape(value)[1:],
                                     jnp.result_type(value))
           for key, value in batches.items()}
    return jax.eval_shape(task.inputs, one)


def _batch_size(batches) -> int:
    leaf = batches.labels if isinstance(batches, Batches) else next(
        iter(batches.values()))
    return int(np.shape(leaf)[1])


def _num_examples(model, batches) -> int:
    if isinstance(batches, Batches):
        return int(np.asarray(batches.mask).astype(bool).sum())
    mask = batches.get("mask")
    return int(np.asarray(mask).astype(bool).sum()) if mask is not None \
        else int(np.prod(np.shape(next(iter(batches.values())))[:2]))


def _rows(metrics, **where) -> list[dict[str, Any]]:
    if isinstance(metrics, Mapping):
        return task_rows(metrics, **where)
    return metrics_rows(metrics, **where)


def _batches(data, batch_size: int):
    if isinstance(data, Mapping):
        return {key: jnp.asarray(value) for key, value in data.items()}
    if isinstance(data, Dataset):
        data = data.test
    if isinstance(data, Batches):
        return data
    if isinstance(data, Split):
        return batch_split(data, batch_size)
    raise TypeError("data must be a Split, Batches or Dataset (or, for a "
                    "model with another task, a dict of stacked batches), "
                    f"got {type(data).__name__}")


def _devices(devices) -> list:
    if devices is None:
        return list(jax.devices())
    devices = list(devices)
    if not devices:
        raise ValueError("devices is empty")
    return devices


# --------------------------------------------------------------------------
# Memory and chunk sizes.
# --------------------------------------------------------------------------


def estimate_model_bytes(apply, params: Params, images) -> int:
    """Working-set bytes of evaluating one model on one batch (an estimate).

    Three copies of the parameters (the original, the damaged copy and the
    damage mask/temporaries) plus every intermediate array of one forward
    pass, as listed by the jaxpr of ``apply`` (an upper bound: XLA reuses
    and fuses buffers).

    Args:
        apply: ``apply(params, x) -> logits``.
        params: one model's parameters (arrays or shape structs).
        images: one batch of inputs (array or shape struct).

    Returns:
        Bytes.
    """
    param_bytes = sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
                      for leaf in jax.tree.leaves(params))
    jaxpr = jax.make_jaxpr(apply)(params, images)
    return 3 * param_bytes + _intermediate_bytes(jaxpr.jaxpr)


def _intermediate_bytes(jaxpr) -> int:
    """Bytes of every equation's outputs, nested calls (custom_vjp, jit,
    scan bodies) included."""
    total = 0
    for equation in jaxpr.eqns:
        for var in equation.outvars:
            aval = var.aval
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                total += int(np.prod(aval.shape)) * (
                    np.dtype(aval.dtype).itemsize)
        for value in equation.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (
                    value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    total += _intermediate_bytes(inner)
    return total


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
        model_bytes: from :func:`estimate_model_bytes`.
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


# --------------------------------------------------------------------------
# The compiled programs.
# --------------------------------------------------------------------------


def _accepts_info(op: Callable) -> bool:
    # recovjax's operators take the model's leaf metadata; a user's plain
    # ``op(key, params, amount)`` need not.
    try:
        parameters = inspect.signature(op).parameters
    except (TypeError, ValueError):
        return False
    return "info" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _group_fn(model, op: DamageOp, metric_fn: MetricFn | None):
    """Damage and evaluate ``k`` points under ``vmap``: the unit of work.

    A point whose ``clean`` flag is set evaluates the undamaged parameters
    instead (the flag is traced), so the clean model rides along in a chunk
    and needs no program of its own.
    """
    extra = {"info": model.info} if _accepts_info(op) else {}
    forward, task = model.forward, _task_of(model)
    num_classes = model.num_classes if task is None else None

    def group(keys, ratios, clean, params, batches):
        def one(key, ratio, keep):
            damaged = op(key, params, ratio, **extra).params
            chosen = jax.tree.map(lambda p, d: jnp.where(keep, p, d),
                                  params, damaged)
            if task is not None:
                return tasks_lib.evaluate_task(task, forward, chosen,
                                               batches)
            return evaluate(forward, chosen, batches, num_classes,
                            metric_fn=metric_fn)

        return jax.vmap(one)(keys, ratios, clean)

    return group


@functools.lru_cache(maxsize=64)
def _chunk_program(model, op: DamageOp, metric_fn: MetricFn | None,
                   vmap_size: int, devices: tuple) -> Callable:
    group = _group_fn(model, op, metric_fn)

    def local(keys, ratios, clean, params, batches):
        count = ratios.shape[0] // vmap_size
        split = lambda x: x.reshape((count, vmap_size) + x.shape[1:])
        metrics = jax.lax.map(
            lambda xs: group(*xs, params, batches),
            (split(keys), split(ratios), split(clean)))
        return jax.tree.map(
            lambda x: x.reshape((count * vmap_size,) + x.shape[2:]), metrics)

    mesh = Mesh(np.asarray(devices), (AXIS,))
    sharded = PartitionSpec(AXIS)
    program = jax.shard_map(
        local, mesh=mesh,
        in_specs=(sharded, sharded, sharded, PartitionSpec(),
                  PartitionSpec()),
        out_specs=sharded,
        # Damage operators and evaluate carry loop state made from constants
        # (zeros, iotas); they are not written for shard_map's replication
        # types, and nothing here communicates across devices.
        check_vma=False)
    return jax.jit(program)


@functools.lru_cache(maxsize=64)
def _point_program(model, op: DamageOp, metric_fn: MetricFn | None
                   ) -> Callable:
    return jax.jit(_group_fn(model, op, metric_fn))


def _place(tree, sharding: NamedSharding):
    # make_array_from_callback builds global arrays, so the same code serves
    # one process and several (multi-host) processes.
    def put(leaf):
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None),
                                 jax.dtypes.prng_key):
            return jax.device_put(leaf, sharding)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding,
                                            lambda index: host[index])

    return jax.tree.map(put, tree)


def _fetch(tree):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return jax.tree.map(np.asarray,
                            multihost_utils.process_allgather(tree,
                                                              tiled=True))
    return jax.device_get(tree)


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def damage_point(model, params: Params, *, damage: DamageOp | str,
                 ratio: float, ratio_index: int, seed: int,
                 root_key: PRNGKey | int, damage_name: str | None = None,
                 data: Split | Batches | Dataset,
                 batch_size: int = DEFAULT_BATCH_SIZE,
                 vmap_size: int = DEFAULT_VMAP_SIZE,
                 metric_fn: MetricFn | None = None) -> Metrics:
    """Re-run one sweep point alone.

    The point is damaged with its sweep key (:func:`point_key`) and
    evaluated by the sweep's own unit of work (a group of ``vmap_size``
    points, here copies of this one), so its numbers equal the sweep's bit
    for bit when ``batch_size``, ``vmap_size`` and ``metric_fn`` match the
    sweep's (see ``SweepResult.plan``).

    Args:
        model: a :class:`~recovjax.models.Model`.
        params: the undamaged parameters.
        damage: the damage op, or its registry name.
        ratio: the damage amount.
        ratio_index: position of ``ratio`` in the sweep's ratios.
        seed: the seed value.
        root_key: the sweep's root key, or its int seed.
        damage_name: the kind's name in the sweep (needed for the key when
            ``damage`` is an op; defaults to ``damage`` when it is a name).
        data: evaluation data, as for :func:`sweep`.
        batch_size: evaluation batch size used by the sweep.
        vmap_size: the sweep's ``plan.vmap_size``.
        metric_fn: the sweep's user metric.

    Returns:
        Host :class:`~recovjax.evaluate.Metrics` of scalars.

    Raises:
        ValueError: if ``damage`` is an op and ``damage_name`` is missing,
            for a bad ``ratio`` (a fraction above 1: ``"ratios: ..."``) or
            labels of ``data`` outside ``[0, num_classes)``.
    """
    if isinstance(damage, str):
        damage_name = damage_name or damage
        damage = _registered(damage)
    if damage_name is None:
        raise ValueError("damage_name is needed to derive the point's key "
                         "when damage is given as an op")
    damage = getattr(damage, "unchecked", damage)  # as in sweep
    root, _ = _root(root_key)
    (ratio,) = _ratios([ratio])
    _check_fractions({damage_name: damage}, [ratio])
    batches = _batches(data, batch_size)
    _check_data(model, batches)
    check_params(model, params)
    program = _point_program(model, damage, metric_fn)
    keys = point_keys(root, damage_name, [ratio_index] * vmap_size,
                      [seed] * vmap_size)
    metrics = program(keys, jnp.full((vmap_size,), ratio, jnp.float32),
                      jnp.zeros((vmap_size,), jnp.bool_), params, batches)
    return jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(metrics))


def _layout(names: Sequence[str], ratios: Sequence[float],
            seeds: Sequence[int]) -> dict[str, list[SweepPoint]]:
    return {name: [SweepPoint(name, index, ratio, seed)
                   for index, ratio in enumerate(ratios) for seed in seeds]
            for name in names}


def iter_sweep(model, params: Params, *,
               damages: Mapping[str, DamageOp] | Sequence[str] | str,
               ratios: Sequence[float], seeds: int | Sequence[int],
               data: Split | Batches | Dataset, root_key: PRNGKey | int,
               batch_size: int = DEFAULT_BATCH_SIZE,
               chunk_size: int | None = None, vmap_size: int | None = None,
               memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
               devices: Sequence | None = None,
               metric_fn: MetricFn | None = None,
               plan: list | None = None,
               include_clean: bool = False) -> Iterator[ChunkResult]:
    """:func:`sweep` as a generator of finished chunks (streaming).

    Arguments as for :func:`sweep`. Chunk ``i + 1`` is dispatched before
    chunk ``i`` is read back, so the device never waits for the host.

    Args:
        plan: if a list is given, the :class:`SweepPlan` is appended to it
            before the first chunk runs.
        include_clean: evaluate the undamaged model too, as one more slot
            after the first kind's points (the chunk programs evaluate it,
            so it compiles nothing extra); its rows come in that chunk's
            ``clean_rows``.

    Yields:
        :class:`ChunkResult` per chunk, in sweep order.
    """
    root, _ = _root(root_key)
    kinds = _damages(damages)
    ratio_values = _ratios(ratios)
    _check_fractions(kinds, ratio_values)
    seed_values = _seeds(seeds)
    batches = _batches(data, batch_size)
    _check_data(model, batches)
    check_params(model, params)
    device_list = _devices(devices)
    layout = _layout(list(kinds), ratio_values, seed_values)
    num_points = len(ratio_values) * len(seed_values)
    clean_slots = 1 if include_clean else 0
    model_bytes = estimate_model_bytes(model.forward, params,
                                       _batch_inputs(model, batches))
    the_plan = plan_sweep(model_bytes, num_points + clean_slots,
                          num_devices=len(device_list),
                          batch_size=_batch_size(batches),
                          chunk_size=chunk_size, vmap_size=vmap_size,
                          memory_budget_bytes=memory_budget_bytes)
    if plan is not None:
        plan.append(the_plan)
    mesh = Mesh(np.asarray(device_list), (AXIS,))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(AXIS))
    params_on_mesh = _place(params, replicated)
    batches_on_mesh = _place(batches, replicated)
    size = the_plan.chunk_size

    def padded_slots(name: str, points: list[SweepPoint], clean: bool
                     ) -> list[SweepPoint]:
        # The clean slot (if any) follows the points; padding repeats the
        # last point, and both are cut off in finish().
        slots = points + [SweepPoint(name, 0, 0.0, 0)] * clean
        return slots + [slots[-1]] * (size - len(slots))

    def launch(name: str, points: list[SweepPoint], clean: bool, keys):
        padded = padded_slots(name, points, clean)
        flags = np.zeros((size,), np.bool_)
        flags[len(points):len(points) + clean] = True
        program = _chunk_program(model, kinds[name], metric_fn,
                                 the_plan.vmap_size, tuple(device_list))
        inputs = _place(
            (keys, np.asarray([p.ratio for p in padded], np.float32), flags),
            sharded)
        return program(*inputs, params_on_mesh, batches_on_mesh)

    def finish(name: str, points: list[SweepPoint], clean: bool,
               pending) -> ChunkResult:
        host = jax.tree.map(np.asarray, _fetch(pending))
        rows = []
        for index, point in enumerate(points):
            one = jax.tree.map(lambda x: x[index], host)
            rows.extend(_rows(one, damage=name, ratio=point.ratio,
                                     seed=point.seed, stage="damaged"))
        clean_rows = ()
        if clean:
            one = jax.tree.map(lambda x: x[len(points)], host)
            clean_rows = tuple(_rows(one, damage=CLEAN, ratio=0.0,
                                            seed=0, stage="clean"))
        return ChunkResult(name, points,
                           jax.tree.map(lambda x: x[:len(points)], host),
                           rows, clean_rows)

    work = []
    for position, (name, points) in enumerate(layout.items()):
        # The first kind carries the clean slot, at index len(points).
        total = len(points) + (clean_slots if position == 0 else 0)
        for start in range(0, total, size):
            work.append((name, points[start:start + size],
                         position == 0 and start <= len(points) < start + size
                         and clean_slots == 1))
    # Every chunk's keys first: a key derivation queued behind a running
    # chunk would wait for it and hold back the next chunk's dispatch.
    keys = [point_keys(root, name, [p.ratio_index for p in slots],
                       [p.seed for p in slots])
            for name, points, clean in work
            for slots in [padded_slots(name, points, clean)]]
    previous = None
    for (name, points, clean), chunk_keys in zip(work, keys):
        pending = (name, points, clean, launch(name, points, clean,
                                               chunk_keys))
        if previous is not None:
            yield finish(*previous)
        previous = pending
    if previous is not None:
        yield finish(*previous)


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries the numbers depend on."""
    from recovjax.pretrain import library_versions as versions
    return versions()


def device_description(devices: Sequence | None = None) -> str:
    """``"<device kind> x<count>"`` of the devices a sweep runs on."""
    device_list = _devices(devices)
    kinds = sorted({device.device_kind for device in device_list})
    return f"{'/'.join(kinds)} x{len(device_list)}"


def sweep(model, params: Params, *,
          damages: Mapping[str, DamageOp] | Sequence[str] | str,
          ratios: Sequence[float], seeds: int | Sequence[int],
          data: Split | Batches | Dataset, root_key: PRNGKey | int,
          batch_size: int = DEFAULT_BATCH_SIZE,
          chunk_size: int | None = None, vmap_size: int | None = None,
          memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
          devices: Sequence | None = None,
          metric_fn: MetricFn | None = None,
          on_chunk: Callable[[ChunkResult], None] | None = None,
          include_clean: bool = True,
          config: Mapping[str, Any] | None = None) -> SweepResult:
    """Damage and evaluate every (damage kind, ratio, seed) point.

    Args:
        model: a :class:`~recovjax.models.Model` (``apply``,
            ``num_classes``).
        params: the pretrained (undamaged) parameters.
        damages: damage kinds: registry names (``["zero", "noise"]``) or a
            mapping ``{name: op}`` of operators ``op(key, params, amount) ->
            Damage``; the name identifies the kind in keys and results.
            An op in checked mode (:func:`recovjax.damage.checked`) runs
            unchecked, as every ratio is checked here, on the host.
        ratios: damage amounts (traced: any values, one compilation per
            count). Finite and non-negative; at most 1 for kinds whose
            amount is a fraction (ratios and rates: ``zero``, ``bit_flip``,
            ... and every op built by :mod:`recovjax.damage` with
            ``amount_is_fraction``). A custom op gets the values as given.
        seeds: number of seeds (``5`` means seeds ``0..4``) or the seed
            values.
        data: evaluation data: a :class:`~recovjax.Split`, ready
            :class:`~recovjax.Batches`, or a :class:`~recovjax.Dataset`
            (its test split).
        root_key: the root key (typed), or an int seed converted here.
        batch_size: evaluation batch size when ``data`` is not batched.
        chunk_size: points per compiled call (default: see
            :func:`plan_sweep`).
        vmap_size: points vectorised together per device (default
            :data:`DEFAULT_VMAP_SIZE`, lowered to fit the budget).
        memory_budget_bytes: working-set budget of one group of models.
        devices: devices to shard the model axis over (default: all).
        metric_fn: user metric ``metric_fn(logits, labels, mask) -> sum``
            (see :func:`recovjax.evaluate.evaluate`), reported as
            ``custom``.
        on_chunk: called with each :class:`ChunkResult` as it finishes
            (e.g. to persist partial results).
        include_clean: add ``stage="clean"`` rows of the undamaged model
            (``damage="none"``, ratio 0, seed 0).
        config: recorded in the table's metadata (merged over the sweep's
            own description).

    Returns:
        :class:`SweepResult` with the :class:`~recovjax.results.ResultsTable`.

    Raises:
        TypeError: for a bad key (an int is fine; a legacy ``uint32`` key
            is not), data or damage op.
        ValueError: for empty or invalid ratios (a fraction above 1:
            ``"ratios: ..."``), seeds, kinds or sizes; an unknown damage
            name (from the registry) or a data damage (``"damages:
            ..."``); labels of ``data`` outside ``[0, num_classes)``
            (``"data.labels: ..."``) or a model whose logits are not
            ``model.num_classes`` wide.

    Example::

        model = get_model("lenet5")
        params = load_pretrained("lenet5").params
        result = sweep(model, params, damages=["zero"],
                       ratios=np.linspace(0, 0.95, 20), seeds=5,
                       data=load_dataset("mnist5k").test, root_key=0)
        result.table.to_csv("results.csv")
    """
    from recovjax._compile_cache import enable_compilation_cache
    enable_compilation_cache()
    start = time.perf_counter()
    root, root_seed = _root(root_key)
    kinds = _damages(damages)
    batches = _batches(data, batch_size)
    plans: list[SweepPlan] = []
    rows: list[dict[str, Any]] = []
    clean_rows: list[dict[str, Any]] = []
    for chunk in iter_sweep(model, params, damages=kinds, ratios=ratios,
                            seeds=seeds, data=batches, root_key=root,
                            chunk_size=chunk_size, vmap_size=vmap_size,
                            memory_budget_bytes=memory_budget_bytes,
                            devices=devices, metric_fn=metric_fn,
                            plan=plans, include_clean=include_clean):
        rows.extend(chunk.rows)
        clean_rows.extend(chunk.clean_rows)
        if on_chunk is not None:
            on_chunk(chunk)
    rows.extend(clean_rows)
    the_plan = plans[0]
    description = {
        "model": getattr(model, "name", "?"),
        "damages": list(kinds),
        "ratios": _ratios(ratios),
        "seeds": _seeds(seeds),
        "num_examples": _num_examples(model, batches),
        **dataclasses.asdict(the_plan),
    }
    if config:
        description.update(config)
    table = ResultsTable(rows=rows, config=description, root_seed=root_seed,
                         versions=library_versions(),
                         device_kind=device_description(devices))
    return SweepResult(table=table, plan=the_plan,
                       seconds=time.perf_counter() - start)
