"""The sweep's public API: :func:`sweep`, :func:`iter_sweep` and
:func:`damage_point`, and the checks of their arguments."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovjax import _checks, runner
from recovjax import tasks as tasks_lib
from recovjax._types import Batches, Dataset, Params, PRNGKey, Split
from recovjax.data import batch_split
from recovjax.data.stream import BatchStream
from recovjax.damage.registry import WHOLE_NUMBERS
from recovjax.evaluate import MetricFn, Metrics, predictions
from recovjax.models.adapter import check_params, require_model
from recovjax.results import ResultsTable, metrics_rows, task_rows
from recovjax.sweep.keys import _root, key_indices, point_keys
from recovjax.sweep.plan import (DEFAULT_BATCH_SIZE, DEFAULT_MEMORY_BUDGET,
                                 DEFAULT_VMAP_SIZE, SweepPlan, plan_sweep)
from recovjax.sweep.program import (DamageOp, chunk_program, point_fn,
                                    run_streamed, stream_chunk_program)


CLEAN = "none"
"""Damage name of the undamaged model's rows (stage ``clean``)."""


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
        amount = getattr(op, "amount_name", None)
        if amount in WHOLE_NUMBERS:
            bad = [r for r in ratios if float(r) != int(r)]
            if bad:
                what = "a bit position" if amount == "position" else amount
                raise ValueError(f"ratios: damage {name!r} takes {what} (a "
                                 f"whole number), got {bad[0]}")
        limit = getattr(op, "max_rate", None)
        if limit is not None and np.float32(max(ratios)) > np.float32(limit):
            raise ValueError(f"ratios: damage {name!r} samples its faults "
                             f"for rates up to max_rate={limit}, got "
                             f"{max(ratios)}")
        if not getattr(op, "amount_is_fraction", False):
            continue
        high = max(ratios)
        if high > 1:
            amount = getattr(op, "amount_name", "ratio")
            raise ValueError(f"ratios: damage {name!r} takes a {amount} in "
                             f"[0, 1] (a fraction), got {high}")


def _check_data(model, batches) -> None:
    # Once per sweep, on the host: the programs get the batches traced.
    require_model(model)
    task = tasks_lib.general_task(model)
    if task is not None:
        tasks_lib.check_batch(task, batches, "data", stacked=True)
        return
    _checks.check_labels(batches.labels, model.num_classes, "data.labels",
                         where=batches.mask)


def _check_stream(model, stream: BatchStream) -> None:
    # The stream checks every block's labels as it reads them.
    require_model(model)
    task = tasks_lib.general_task(model)
    if task is not None:
        raise ValueError(
            f"data: a BatchStream streams classification data, but model "
            f"{getattr(model, 'name', '?')!r} has the task "
            f"{getattr(task, 'name', task)!r}; pass its batches in memory")
    if stream.num_classes != model.num_classes:
        raise ValueError(f"data: the stream {stream.name!r} has "
                         f"{stream.num_classes} classes, the model "
                         f"{model.num_classes}")


def _batch_size(batches) -> int:
    leaf = batches.labels if isinstance(batches, Batches) else next(
        iter(batches.values()))
    return int(np.shape(leaf)[1])


def _num_examples(model, batches) -> int:
    if isinstance(batches, BatchStream):
        return batches.num_examples
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
    if isinstance(data, BatchStream):
        return data
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


def damage_point(model, params: Params, *, damage: DamageOp | str,
                 ratio: float, ratio_index: int, seed: int,
                 root_key: PRNGKey | int, damage_name: str | None = None,
                 data: Split | Batches | Dataset | BatchStream,
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
    streamed = isinstance(batches, BatchStream)
    if streamed:
        _check_stream(model, batches)
    else:
        _check_data(model, batches)
    check_params(model, params)
    make = stream_chunk_program if streamed else chunk_program
    program = make(model, damage, metric_fn, vmap_size, (jax.devices()[0],))
    keys = point_keys(root, damage_name,
                      key_indices(damage, [ratio_index] * vmap_size),
                      [seed] * vmap_size)
    points = runner.place((keys, np.full((vmap_size,), ratio, np.float32),
                           np.zeros((vmap_size,), np.bool_)),
                          program.sharded)
    if streamed:
        (metrics,) = run_streamed(model, params, batches,
                                  [(program, points)], metric_fn)
    else:
        metrics = program(points, (params, batches))
    return jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(metrics))


def _layout(names: Sequence[str], ratios: Sequence[float],
            seeds: Sequence[int]) -> dict[str, list[SweepPoint]]:
    return {name: [SweepPoint(name, index, ratio, seed)
                   for index, ratio in enumerate(ratios) for seed in seeds]
            for name in names}


def iter_sweep(model, params: Params, *,
               damages: Mapping[str, DamageOp] | Sequence[str] | str,
               ratios: Sequence[float], seeds: int | Sequence[int],
               data: Split | Batches | Dataset | BatchStream,
          root_key: PRNGKey | int,
               batch_size: int = DEFAULT_BATCH_SIZE,
               chunk_size: int | None = None, vmap_size: int | None = None,
               memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
               devices: Sequence | None = None,
               model_devices: int = 1, partition=None,
               metric_fn: MetricFn | None = None,
               plan: list | None = None,
               include_clean: bool = False,
               outcomes: bool = False) -> Iterator[ChunkResult]:
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
        outcomes: classify every example of every point against the clean
            model's top-1 (computed once, before the points): masked, SDC
            or DUE (see :class:`~recovjax.evaluate.Metrics`), reported as
            ``outcome/masked``, ``outcome/sdc`` and ``outcome/due`` rows
            (fractions of the examples). In-memory classification data
            only.

    Yields:
        :class:`ChunkResult` per chunk, in sweep order.
    """
    root, _ = _root(root_key)
    kinds = _damages(damages)
    ratio_values = _ratios(ratios)
    _check_fractions(kinds, ratio_values)
    seed_values = _seeds(seeds)
    if not isinstance(outcomes, bool):
        raise TypeError(f"outcomes must be a bool, got {outcomes!r}")
    streamed = isinstance(data, BatchStream)
    if streamed:
        if outcomes:
            raise ValueError("outcomes: classifying outcomes needs the clean "
                             "model's predictions of the whole set; give "
                             "the data in memory, not as a BatchStream")
        _check_stream(model, data)
        batches = data.first_block()
    else:
        batches = _batches(data, batch_size)
        _check_data(model, batches)
    check_params(model, params)
    if outcomes:
        if tasks_lib.general_task(model) is not None:
            raise ValueError("outcomes: masked/SDC/DUE outcomes compare "
                             "top-1 classes; the model's task is not "
                             "classification")
        # The clean top-1 of every example, computed once: the points'
        # outcomes are counted against it.
        reference = jax.jit(predictions, static_argnums=0)(
            model.forward, params, batches)
        evaluation = (batches, np.asarray(reference))
    else:
        evaluation = batches
    device_list = list(runner.devices_of(devices))
    layout = _layout(list(kinds), ratio_values, seed_values)
    num_points = len(ratio_values) * len(seed_values)
    clean_slots = 1 if include_clean else 0
    model_bytes = 0  # measured only when groups of several are asked for
    if vmap_size is not None and vmap_size > 1:
        point = (jax.ShapeDtypeStruct((), root.dtype),
                 jax.ShapeDtypeStruct((), jnp.float32),
                 jax.ShapeDtypeStruct((), jnp.bool_))
        model_bytes = runner.point_memory(
            point_fn(model, next(iter(kinds.values())), metric_fn, outcomes),
            point, (params, evaluation)).point_bytes
    mesh = runner.make_mesh(tuple(device_list), model_devices)
    the_plan = plan_sweep(model_bytes, num_points + clean_slots,
                          num_devices=int(mesh.shape[runner.AXIS]),
                          batch_size=_batch_size(batches),
                          chunk_size=chunk_size, vmap_size=vmap_size,
                          memory_budget_bytes=memory_budget_bytes)
    if plan is not None:
        plan.append(the_plan)
    first = chunk_program(model, next(iter(kinds.values())), metric_fn,
                          the_plan.vmap_size, tuple(device_list),
                          model_devices, partition, outcomes)
    sharded = first.sharded
    shared = None if streamed else first.place_shared((params, evaluation))
    size = the_plan.chunk_size

    def padded_slots(name: str, points: list[SweepPoint], clean: bool
                     ) -> list[SweepPoint]:
        # The clean slot (if any) follows the points; padding repeats the
        # last point, and both are cut off in finish().
        slots = points + [SweepPoint(name, 0, 0.0, 0)] * clean
        return slots + [slots[-1]] * (size - len(slots))

    def prepare(name: str, points: list[SweepPoint], clean: bool, keys):
        # The chunk's program and its placed (keys, ratios, clean flags).
        padded = padded_slots(name, points, clean)
        flags = np.zeros((size,), np.bool_)
        flags[len(points):len(points) + clean] = True
        make = stream_chunk_program if streamed else chunk_program
        program = make(model, kinds[name], metric_fn, the_plan.vmap_size,
                       tuple(device_list), model_devices, partition,
                       outcomes)
        return program, runner.place(
            (keys, np.asarray([p.ratio for p in padded], np.float32), flags),
            sharded)

    def finish(name: str, points: list[SweepPoint], clean: bool,
               pending) -> ChunkResult:
        host = runner.fetch(pending)
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
    keys = [point_keys(root, name, key_indices(
                kinds[name], [p.ratio_index for p in slots]),
                [p.seed for p in slots])
            for name, points, clean in work
            for slots in [padded_slots(name, points, clean)]]
    if streamed:
        # Every chunk's totals ride along the one pass over the stream, so
        # the chunks finish together, after its last block.
        chunks = [prepare(*item, chunk_keys)
                  for item, chunk_keys in zip(work, keys)]
        metrics = run_streamed(model, params, data, chunks, metric_fn)
        for item, pending in zip(work, metrics):
            yield finish(*item, pending)
        return
    previous = None
    for (name, points, clean), chunk_keys in zip(work, keys):
        program, placed = prepare(name, points, clean, chunk_keys)
        pending = (name, points, clean, program(placed, shared))
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
    device_list = list(runner.devices_of(devices))
    kinds = sorted({device.device_kind for device in device_list})
    return f"{'/'.join(kinds)} x{len(device_list)}"


def sweep(model, params: Params, *,
          damages: Mapping[str, DamageOp] | Sequence[str] | str,
          ratios: Sequence[float], seeds: int | Sequence[int],
          data: Split | Batches | Dataset | BatchStream,
          root_key: PRNGKey | int,
          batch_size: int = DEFAULT_BATCH_SIZE,
          chunk_size: int | None = None, vmap_size: int | None = None,
          memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
          devices: Sequence | None = None,
          model_devices: int = 1, partition=None,
          metric_fn: MetricFn | None = None,
          on_chunk: Callable[[ChunkResult], None] | None = None,
          include_clean: bool = True,
          outcomes: bool = False,
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
            :class:`~recovjax.Batches`, a :class:`~recovjax.Dataset`
            (its test split), or a :class:`~recovjax.data.BatchStream`
            read block by block (for sets larger than memory, see
            :mod:`recovjax.data.stream`; its own batch size is used). A
            stream is read once; each point is damaged again per block,
            and its numbers equal those of the same data in memory.
        root_key: the root key (typed), or an int seed converted here.
        batch_size: evaluation batch size when ``data`` is not batched.
        chunk_size: points per compiled call (default: see
            :func:`plan_sweep`).
        vmap_size: points vectorised together per device (default
            :data:`DEFAULT_VMAP_SIZE`, lowered to fit the budget).
        memory_budget_bytes: working-set budget of one group of models.
        devices: devices to shard the points over (default: all).
        model_devices: devices each point is split over: the mesh is
            ``len(devices) / model_devices`` points x ``model_devices``
            model, and the parameters are sharded over the model axis
            (see :func:`recovjax.runner.map_points`).
        partition: ``rule(path, leaf) -> PartitionSpec | None`` overriding
            how a shared leaf is sharded over the model axis.
        metric_fn: user metric ``metric_fn(logits, labels, mask) -> sum``
            (see :func:`recovjax.evaluate.evaluate`), reported as
            ``custom``.
        on_chunk: called with each :class:`ChunkResult` as it finishes
            (e.g. to persist partial results).
        include_clean: add ``stage="clean"`` rows of the undamaged model
            (``damage="none"``, ratio 0, seed 0).
        outcomes: add each point's outcome fractions (masked, SDC, DUE
            against the clean model's top-1; see :func:`iter_sweep`).
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
                            devices=devices, model_devices=model_devices,
                            partition=partition, metric_fn=metric_fn,
                            plan=plans, include_clean=include_clean,
                            outcomes=outcomes):
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
    # Classifier accuracies are fractions of these examples; a task's
    # metrics (tokens, perplexity) are not, and record none.
    examples = (description["num_examples"]
                if isinstance(batches, (Batches, BatchStream)) else None)
    table = ResultsTable(rows=rows, config=description, root_seed=root_seed,
                         versions=library_versions(),
                         device_kind=device_description(devices),
                         test_examples=examples)
    return SweepResult(table=table, plan=the_plan,
                       seconds=time.perf_counter() - start)
