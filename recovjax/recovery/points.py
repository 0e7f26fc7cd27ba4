"""Recovery strategies as point programs, run on the one runner.

A strategy prepared for a :class:`~recovjax.recovery.RecoveryTask` is a
pure function of one damaged model,

    fn(key, params, mask, shared) -> PointOutcome

plus the inputs every model shares (the recovery data, the test batches,
the checkpoint values a restore reads, the teacher's outputs). The runner
(:func:`recovjax.runner.map_points`) maps it over points, so a program
holds one group's damaged copies and optimiser states and nothing more.

Two ways to feed it:

- :func:`run_stacked`: the points are a stack of damaged models a caller
  already holds (``strategy(keys, damage, task)``).
- :func:`recover_damage`: the points are ``(damage key, amount, recovery
  key)``; each damaged model and its mask are re-derived on device, inside
  the program that recovers it, from the pretrained parameters (shared).
  Memory does not grow with the number of points::

      outcome = recover_damage(get_strategy("finetune", steps=20), task,
                               get_damage("zero"), params,
                               damage_keys=keys, amounts=ratios,
                               keys=recovery_keys)
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovjax import _checks, runner
from recovjax._types import Array, Damage, Mask, Params, PRNGKey
from recovjax.checkpoints import leaf_digests
from recovjax.damage.registry import accepts_info
from recovjax.recovery import restore as restore_lib
from recovjax.recovery.finetune import Curve, curve_metrics


class PointOutcome(NamedTuple):
    """What a strategy gives for one point (leading points axis when run).

    Attributes:
        params: the recovered parameters (``None`` when not returned).
        curve: :class:`~recovjax.recovery.Curve`; strategies that do not
            train have one point (step 0), the metrics after the strategy.
        losses: ``float32[S]`` training losses (``S = 0``: no training).
        diverged: ``bool``.
        diverged_step: ``int32`` (-1 = never).
        restored: leaf path -> ``bool``: whether this point's model took
            that leaf's values (some of its entries) from the checkpoint.
        state: the model state after training in training mode, or
            ``None``.
    """

    params: Params | None
    curve: Curve
    losses: Array
    diverged: Array
    diverged_step: Array
    restored: dict[str, Array]
    state: Any = None


PointStrategyFn = Callable[[PRNGKey, Params, Mask, Any], PointOutcome]
"""``fn(key, params, mask, shared) -> PointOutcome`` for one model."""


class Prepared(NamedTuple):
    """A strategy ready to run on a task.

    Attributes:
        fn: the per-model function (the same object for the same strategy
            and task, so the runner's compiled program is reused).
        shared: what every model reads (replicated, never copied per point).
        trains: whether it trains (its losses have steps).
        bytes_read: bytes read from the checkpoint files while preparing.
        trainable: values trained per model (0 for a strategy that does
            not train).
        redamages: whether ``fn`` damages the model again itself, in
            stages (an iterative schedule): it is then called as ``fn(key,
            params, mask, shared, stages=Stages(...))`` and runs only where
            the damage operator is known (:func:`recover_damage`).
        labelled: whether the examples it trains on are read with their
            labels (distillation reads only inputs).
        unlabelled: inputs it reads without labels besides training (a
            calibration set).
    """

    fn: PointStrategyFn
    shared: Any
    trains: bool
    bytes_read: int
    trainable: int = 0
    redamages: bool = False
    labelled: bool = True
    unlabelled: int = 0


class Stages(NamedTuple):
    """What a strategy that damages in stages gets for one point.

    Attributes:
        clean: the pretrained parameters.
        damage_at: ``damage_at(params, fraction) -> Damage``: the point's
            damage operator, with the point's damage key, applied to
            ``params`` at ``fraction`` of the point's amount.
    """

    clean: Params
    damage_at: Callable[[Params, Any], Damage]


Candidates = Callable[[str], Sequence[str]]
"""``candidates(kind)``: the leaves a restore may need to read. ``kind`` is
``"mask"`` (leaves some point's damage mask touches) or ``"bits"`` (leaves
some point's values differ from the checkpoint in, found without the
mask)."""


class Evaluator(NamedTuple):
    """How a point's model is measured (hashable: a cache key).

    Attributes:
        apply: ``apply(params, x) -> outputs``.
        num_classes: number of classes (classification).
        task: a :class:`~recovjax.tasks.Task` other than classification, or
            ``None``.
    """

    apply: Callable
    num_classes: int
    task: Any = None


def static_curve(evaluator: Evaluator, params: Params,
                 eval_batches: Any) -> Curve:
    """One curve point (step 0) of a model that was not trained, traced."""
    if eval_batches is None:
        empty = jnp.zeros((0,), jnp.float32)
        return Curve(jnp.zeros((0,), jnp.int32), empty, empty, empty)
    accuracy, loss = curve_metrics(evaluator.apply, params, eval_batches,
                                   evaluator.num_classes, evaluator.task)
    return Curve(steps=jnp.zeros((1,), jnp.int32),
                 samples=jnp.zeros((1,), jnp.float32),
                 accuracy=jnp.asarray(accuracy, jnp.float32)[None],
                 loss=jnp.asarray(loss, jnp.float32)[None])


def untrained(evaluator: Evaluator, params: Params, eval_batches: Any,
              restored: dict[str, Array]) -> PointOutcome:
    """The outcome of a strategy that changes parameters without training."""
    return PointOutcome(params=params,
                        curve=static_curve(evaluator, params, eval_batches),
                        losses=jnp.zeros((0,), jnp.float32),
                        diverged=jnp.bool_(False),
                        diverged_step=jnp.int32(-1), restored=restored)


def trained(result: Any) -> PointOutcome:
    """A :class:`~recovjax.recovery.FinetuneResult` as a point outcome."""
    return PointOutcome(params=result.params, curve=result.curve,
                        losses=result.losses, diverged=result.diverged,
                        diverged_step=result.diverged_step, restored={},
                        state=result.state)


def read_checkpoint(task: Any, names: Sequence[str], strategy: str
                    ) -> tuple[dict[str, np.ndarray], int]:
    """``(values, bytes read)`` of the named checkpoint leaves.

    Raises:
        ValueError: the task has no checkpoint, or a name is not a leaf.
        CheckpointNotFoundError, CheckpointMismatchError,
        CheckpointCorruptedError: from the checkpoint.
    """
    if task.checkpoint is None:
        raise ValueError(f"strategy {strategy!r} needs the pretrained "
                         "checkpoint (RecoveryTask.checkpoint is None)")
    shapes = restore_lib._flat(task._model_shapes)
    unknown = sorted(set(names) - set(shapes))
    if unknown:
        raise ValueError(f"unknown leaf paths {unknown}; valid paths: "
                         f"{', '.join(sorted(shapes))}")
    with restore_lib._ReadMeter() as meter:
        metadata = restore_lib.check_structure(task.checkpoint,
                                               task._model_shapes)
        values = restore_lib.read_leaves(
            task.checkpoint, {name: shapes[name] for name in sorted(names)},
            metadata=metadata) if names else {}
    array_bytes = sum(value.nbytes for value in values.values())
    return values, int(meter.bytes if meter.bytes is not None
                       else array_bytes)


def _differing_blocks(current: Array, stored: Array, block_size: int
                      ) -> Array:
    """Boolean mask (the leaf's shape) of blocks whose bits differ."""
    flat_current, flat_stored = current.reshape(-1), stored.reshape(-1)
    width = jnp.dtype(current.dtype).itemsize * 8
    unsigned = jnp.dtype(f"uint{width}")
    # Bit comparison, so that NaN damage and -0.0 are detected too.
    differs = (jax.lax.bitcast_convert_type(flat_current, unsigned)
               != jax.lax.bitcast_convert_type(flat_stored, unsigned))
    count = -(-differs.size // block_size)
    padded = jnp.zeros((count * block_size,), bool).at[:differs.size].set(
        differs)
    blocks = padded.reshape(count, block_size).any(axis=1)
    return jnp.repeat(blocks, block_size)[:differs.size].reshape(
        current.shape)


RESTORES = ("full", "leaves", "entries", "detect")


@functools.lru_cache(maxsize=64)
def restore_fn(kind: str, evaluator: Evaluator,
               named: tuple[str, ...] | None = None, block_size: int = 1
               ) -> PointStrategyFn:
    """The point form of a restore from checkpoint values (shared).

    ``shared`` is ``(values, eval_batches)``: the checkpoint values read
    (leaf path -> array) and the test batches (or ``None``).

    Args:
        kind: ``"full"`` (every leaf), ``"leaves"`` (the leaves in
            ``named``, or with ``named=None`` each leaf the mask touches),
            ``"entries"`` (the masked entries) or ``"detect"`` (blocks of
            ``block_size`` entries whose bits differ from the checkpoint;
            no mask used).
        evaluator: how the restored model is measured.
        named: explicit leaves of ``"leaves"``.
        block_size: entries per block of ``"detect"``.
    """
    if kind not in RESTORES:
        raise ValueError(f"unknown restore {kind!r}; valid: "
                         f"{', '.join(RESTORES)}")

    def fn(key, params, mask, shared):
        del key
        values, eval_batches = shared
        flat = restore_lib._flat(params)
        flat_mask = restore_lib._flat(mask) if mask is not None else {}
        new, restored = dict(flat), {}
        for name, stored in values.items():
            leaf = flat[name]
            stored = jnp.asarray(stored, leaf.dtype)
            if kind == "full" or (kind == "leaves" and named is not None):
                new[name], restored[name] = stored, jnp.bool_(True)
            elif kind == "leaves":
                hit = jnp.any(flat_mask[name])
                new[name], restored[name] = jnp.where(hit, stored, leaf), hit
            elif kind == "entries":
                new[name] = jnp.where(flat_mask[name], stored, leaf)
                restored[name] = jnp.any(flat_mask[name])
            else:
                blocks = _differing_blocks(leaf, stored, block_size)
                new[name] = jnp.where(blocks, stored, leaf)
                restored[name] = jnp.any(blocks)
        params = restore_lib._unflatten_like(params, new)
        return untrained(evaluator, params, eval_batches, restored)

    return fn


def differing_leaves(task: Any, params: Params) -> list[str]:
    """Leaves where some model of a stack differs from the checkpoint.

    Compares each model's leaf digests (SHA-256) with those the checkpoint
    metadata records, reading no arrays.

    Raises:
        CheckpointCorruptedError: the checkpoint records no digests.
    """
    metadata = restore_lib.check_structure(task.checkpoint,
                                           task._model_shapes)
    recorded = metadata.get("digests")
    if not recorded:
        raise restore_lib.CheckpointCorruptedError(
            task.checkpoint, "metadata holds no per-leaf digests; cannot "
            "detect damage without reading every leaf")
    host = jax.tree.map(np.asarray, jax.device_get(params))
    count = int(jax.tree.leaves(host)[0].shape[0])
    found: set[str] = set()
    for index in range(count):
        digests = leaf_digests(jax.tree.map(lambda leaf: leaf[index], host))
        found.update(name for name, digest in digests.items()
                     if recorded.get(name) != digest)
    return sorted(found)


@functools.lru_cache(maxsize=64)
def compose_fn(fns: tuple[PointStrategyFn, ...], trains: tuple[bool, ...]
               ) -> PointStrategyFn:
    """Stages in order, each on the previous one's parameters.

    Stage ``i > 0`` gets ``fold_in(key, i)``; the mask is passed unchanged.
    The outcome has the last training stage's curve and losses (else the
    last stage's), ``diverged`` from any stage and the union of the
    restored leaves.
    """
    last = max((index for index, flag in enumerate(trains) if flag),
               default=len(fns) - 1)

    def fn(key, params, mask, shared):
        outcomes = []
        for index, (stage, stage_shared) in enumerate(zip(fns, shared)):
            stage_key = jax.random.fold_in(key, index) if index else key
            outcome = stage(stage_key, params, mask, stage_shared)
            outcomes.append(outcome)
            params = outcome.params
        restored: dict[str, Array] = {}
        for outcome in outcomes:
            for name, flag in outcome.restored.items():
                restored[name] = restored.get(name, False) | flag
        chosen = outcomes[last]
        diverged = functools.reduce(jnp.logical_or,
                                    [o.diverged for o in outcomes])
        return PointOutcome(params=params, curve=chosen.curve,
                            losses=chosen.losses, diverged=diverged,
                            diverged_step=chosen.diverged_step,
                            restored=dict(sorted(restored.items())),
                            state=outcomes[-1].state)

    return fn


def _as_bool(tree: Mask | None) -> Mask | None:
    # Strong-typed bools, so that masks of equal shapes never retrace.
    return None if tree is None else jax.tree.map(
        lambda m: jnp.asarray(m, bool), tree)


@functools.lru_cache(maxsize=64)
def _stacked_point(fn: PointStrategyFn) -> runner.PointFn:
    def one(point, shared):
        key, params, mask = point
        return fn(key, params, mask, shared)

    return one


def run_stacked(prepared: Prepared, keys: PRNGKey, params: Params,
                mask: Mask, *, group_size: int = 1,
                devices: Sequence[Any] | None = None) -> PointOutcome:
    """Run a prepared strategy on a stack of damaged models (leading axis).

    Raises:
        ValueError: for a strategy that damages in stages (it needs the
            damage operator: :func:`recover_damage`).
    """
    if prepared.redamages:
        raise ValueError("this strategy damages the model again in stages, "
                         "so it needs the damage operator: run it with "
                         "recover_damage(strategy, task, op, params, ...) or "
                         "from a config")
    program = runner.map_points(_stacked_point(prepared.fn),
                                group_size=group_size, devices=devices)
    return program((keys, params, _as_bool(mask)), prepared.shared)


_PROGRAMS: dict[tuple, tuple[Any, runner.PointFn]] = {}


def _cached(cache_key: tuple, info: Any, build: Callable[[], runner.PointFn]
            ) -> runner.PointFn:
    # Keyed by the leaf metadata's id (it is not hashable); the entry keeps
    # the metadata alive, so that the id cannot be reused meanwhile.
    if cache_key not in _PROGRAMS:
        if len(_PROGRAMS) >= 64:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        _PROGRAMS[cache_key] = (info, build())
    return _PROGRAMS[cache_key][1]


def _damage_call(op: Callable, info: Any) -> Callable:
    extra = {"info": info} if info is not None and accepts_info(op) else {}
    return lambda key, params, amount: op(key, params, amount, **extra)


def _damaged_point(fn: PointStrategyFn, op: Callable, info: Any,
                   return_params: bool, redamages: bool = False
                   ) -> runner.PointFn:
    """The runner's unit: damage one model on device, then recover it."""
    def build():
        damage_of = _damage_call(op, info)

        def one(point, shared):
            damage_key, amount, key = point
            params, strategy_shared = shared
            damage = damage_of(damage_key, params, amount)
            extra = {}
            if redamages:
                def damage_at(current, fraction):
                    scaled = jax.tree.map(lambda a: a * fraction, amount)
                    found = damage_of(damage_key, current, scaled)
                    return Damage(found.params, _as_bool(found.mask))

                extra = {"stages": Stages(params, damage_at)}
            outcome = fn(key, damage.params, _as_bool(damage.mask),
                         strategy_shared, **extra)
            return outcome if return_params else outcome._replace(
                params=None)

        return one

    return _cached(("recover", fn, op, id(info), return_params, redamages),
                   info, build)


def _touched_point(op: Callable, info: Any) -> runner.PointFn:
    def build():
        damage_of = _damage_call(op, info)

        def one(point, params):
            damage_key, amount = point
            mask = damage_of(damage_key, params, amount).mask
            return {name: jnp.any(leaf) for name, leaf in
                    restore_lib._flat(mask).items()}

        return one

    return _cached(("touched", op, id(info)), info, build)


def touched_leaves(op: Callable, params: Params, damage_keys: PRNGKey,
                   amounts: Any, *, info: Any = None,
                   devices: Sequence[Any] | None = None) -> list[str]:
    """Leaves whose mask some point's damage touches (one small program).

    Only the per-leaf flags come back, never a damaged copy.
    """
    program = runner.map_points(_touched_point(op, info), devices=devices)
    flags = jax.device_get(program((damage_keys, amounts), params))
    return sorted(name for name, flag in flags.items() if np.any(flag))


_FLOPS: dict[tuple, tuple[Any, float]] = {}


def recovery_flops(prepared: Prepared, task: Any, op: Callable,
                   params: Params, point: tuple, info: Any = None) -> float:
    """FLOPs one point's recovery performs (XLA's count, loops unrolled).

    The strategy's point program (recovery and curve evaluations) is
    counted by :func:`~recovjax.recovery.measure.program_flops` on a
    damaged model's shapes, once per strategy and task; every curve
    evaluation is subtracted, so what remains is what the strategy itself
    computes (its training steps, solves, restores). A strategy that
    damages again in stages is counted with the damage operator (the
    re-damaging is part of its recovery; the one-shot damage is not).

    Args:
        prepared: the prepared strategy.
        task: its recovery task.
        op: the damage operator.
        params: the pretrained parameters.
        point: one point's ``(damage key, amount, key)``.
        info: the model's leaf metadata, for the operator.

    Returns:
        The FLOPs (NaN where the backend does not count them).
    """
    from recovjax.recovery.measure import program_flops
    # A strategy that does not damage again costs the same whatever the
    # damage: counted once per strategy function, on a damaged model's
    # shapes. One that does is counted with its damage operator.
    layout = (jax.tree.structure(prepared.shared), tuple(
        (jnp.shape(a), str(jnp.result_type(a)))
        for a in jax.tree.leaves(prepared.shared)))
    cache_key = ((prepared.fn, op, id(info), layout) if prepared.redamages
                 else (prepared.fn, id(task), layout))
    if cache_key in _FLOPS:
        return _FLOPS[cache_key][1]
    structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        jnp.shape(a), jnp.result_type(a)) if not jax.dtypes.issubdtype(
            jnp.result_type(a), jax.dtypes.prng_key) else a, point)
    if prepared.redamages:
        unit = _damaged_point(prepared.fn, op, info, False, True)
        shared = (params, prepared.shared)
        total = program_flops(unit, structs, shared)
        damage_of = _damage_call(op, info)
        total -= program_flops(lambda k, a: damage_of(k, params, a).params,
                               point[0], structs[1])
        curve = jax.eval_shape(unit, structs, shared).curve
    else:
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            jnp.shape(a), jnp.result_type(a)), params)
        masks = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            jnp.shape(a), jnp.bool_), params)
        total = program_flops(prepared.fn, point[2], shapes, masks,
                              prepared.shared)
        curve = jax.eval_shape(prepared.fn, point[2], shapes, masks,
                               prepared.shared).curve
    evaluations = int(curve.steps.shape[0])
    evaluation = 0.0
    if evaluations and task.eval_batches is not None:
        evaluation = _evaluation_flops(task, params)
    flops = total - evaluations * evaluation
    if len(_FLOPS) >= 64:
        _FLOPS.pop(next(iter(_FLOPS)))
    _FLOPS[cache_key] = ((info, task), float(flops))
    return float(flops)


def _evaluation_flops(task: Any, params: Params) -> float:
    from recovjax.recovery.measure import program_flops
    key = ("evaluation", id(task))
    if key not in _FLOPS:
        _FLOPS[key] = (task, program_flops(lambda p, b: curve_metrics(
            task.apply, p, b, task.num_classes, task.general_task),
            params, task.eval_batches))
    return _FLOPS[key][1]


def recover_damage(strategy: Any, task: Any, op: Callable, params: Params,
                   *, damage_keys: PRNGKey, amounts: Any, keys: PRNGKey,
                   return_params: bool = False, group_size: int = 1,
                   devices: Sequence[Any] | None = None,
                   model_devices: int = 1, partition=None,
                   count_flops: bool = False):
    """Damage and recover many models, each damage re-derived on device.

    Point ``i`` is the model ``op(damage_keys[i], params, amounts[i])``,
    recovered by ``strategy`` with the key ``keys[i]``; both the damaged
    parameters and the mask exist only inside the program, one group at a
    time, so memory stays flat in the number of points. A restore reads
    from the checkpoint only the leaves some point's damage touches (found
    by a first small program that returns per-leaf flags).

    Args:
        strategy: a strategy from :func:`~recovjax.recovery.get_strategy`.
            A registered strategy without a point form (a plain
            ``strategy(keys, damage, task)``) still runs: the damaged stack
            is then built for the whole call.
        task: the :class:`~recovjax.recovery.RecoveryTask`.
        op: the damage operator, ``op(key, params, amount[, info=])``.
        params: the pretrained parameters of one model.
        damage_keys: ``[M]`` typed keys of the damage.
        amounts: ``[M]`` amounts (or a stacked per-leaf amount tree).
        keys: ``[M]`` typed recovery keys (data order, fresh draws).
        return_params: also return the recovered parameters (``[M, ...]``:
            memory then grows with ``M``).
        group_size: models per ``vmap`` group.
        devices: devices to shard the points over (default all).
        model_devices: devices each model is split over (a points x model
            mesh; see :func:`recovjax.runner.map_points`).
        partition: ``rule(path, leaf) -> PartitionSpec | None`` for the
            shared leaves on the model axis.
        count_flops: also count the FLOPs of one point's recovery
            (:func:`recovery_flops`; it lowers the program and its loop
            bodies once more, outside the timed run, without compiling).

    Returns:
        :class:`~recovjax.recovery.RecoveryOutcome`; ``params`` is ``None``
        unless ``return_params``; ``flops`` is ``None`` unless
        ``count_flops``.

    Raises:
        TypeError: keys that are not typed keys.
        ValueError: keys, damage keys and amounts of different lengths;
            the errors of the strategy.
    """
    from recovjax.recovery.registry import outcome_of
    count = _checks.check_key(keys, "keys", batched=True)
    damage_count = _checks.check_key(damage_keys, "damage_keys",
                                     batched=True)
    amount_counts = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1
                     for leaf in jax.tree.leaves(amounts)}
    if {damage_count} != {count} or amount_counts != {count}:
        raise ValueError(f"keys ({count}), damage_keys ({damage_count}) and "
                         f"amounts (leading sizes {sorted(amount_counts)}) "
                         "need one entry per point each")
    info = getattr(task.model, "info", None)
    amounts = jax.tree.map(jnp.asarray, amounts)
    prepare = getattr(strategy, "prepare", None)
    start = time.perf_counter()
    if prepare is None:
        damage_of = _damage_call(op, info)
        damage = jax.jit(jax.vmap(lambda k, a: damage_of(k, params, a)))(
            damage_keys, amounts)
        outcome = strategy(keys, Damage(damage.params, damage.mask), task)
        return outcome if return_params else outcome._replace(params=None)
    touched: list[str] | None = None

    def candidates(kind: str) -> Sequence[str]:
        nonlocal touched
        if touched is None:
            touched = touched_leaves(op, params, damage_keys, amounts,
                                     info=info, devices=devices)
        return touched

    prepared = prepare(task, candidates)
    program = runner.map_points(
        _damaged_point(prepared.fn, op, info, return_params,
                       prepared.redamages),
        group_size=group_size, devices=devices, model_devices=model_devices,
        partition=partition)
    result = jax.block_until_ready(program(
        (damage_keys, amounts, keys), (params, prepared.shared)))
    outcome = outcome_of(result, prepared, time.perf_counter() - start)
    if count_flops:
        first = jax.tree.map(lambda a: a[0], (damage_keys, amounts, keys))
        outcome = outcome._replace(flops=recovery_flops(
            prepared, task, op, params, first, info))
    return outcome


__all__ = ["Candidates", "Evaluator", "PointOutcome", "PointStrategyFn", "Prepared",
           "Stages", "compose_fn", "differing_leaves", "read_checkpoint",
           "recover_damage", "restore_fn", "run_stacked", "static_curve",
           "touched_leaves", "trained", "untrained"]
