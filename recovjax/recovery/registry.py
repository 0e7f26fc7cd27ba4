"""Recovery strategies by name, for configs, and their composition.

Every strategy has one signature and works on a stack of damaged models
(leading model axis; one model is a stack of one)::

    strategy = get_strategy("restore_leaves+finetune", steps=200)
    outcome = strategy(keys, damage, task)

``keys`` is a 1-D array of typed keys, one per model
(``jax.random.split(jax.random.key(seed), M)``). Every strategy checks
its arguments before it runs: keys that are not typed keys (``TypeError``
"keys: ..."), a damage that is not stacked along the keys (``ValueError``
"damage.params: ..."); the task's data are checked once, when the
:class:`RecoveryTask` is built.

``damage`` is a stacked :class:`~recovjax.Damage`; ``task`` a
:class:`RecoveryTask` holding the model, the recovery data, the test batches
and the pretrained checkpoint. Every built-in strategy is a
:class:`PointStrategy`: a per-model function run by the one runner
(:mod:`recovjax.recovery.points`), compiled once per strategy object and
reused on later calls with the same shapes, so a sweep should get a
strategy once and call it many times.
:func:`~recovjax.recovery.recover_damage` runs the same function on damage
re-derived on device, without a stack.

Names: ``finetune``, ``finetune_damaged``, ``finetune_undamaged``,
``restore_full``, ``restore_leaves``, ``restore_entries``, ``detect_restore``,
``rebuild_reinit``, ``rebuild_checkpoint``, ``distill``, ``recalibrate``,
``checksum_restore``, ``saturate``, ``lora`` (:mod:`~recovjax.recovery.lora`),
``reconstruct`` and ``bias_correction``
(:mod:`~recovjax.recovery.calibrate`), ``lr_rewind``; ``a+b`` runs ``a``
then ``b`` on its output (:func:`compose`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import time
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recovjax import _checks, runner
from recovjax._types import (Array, ApplyFn, Batches, Damage, InitFn, Params,
                             PRNGKey, Split)
from recovjax.recovery import calibrate as calibrate_lib
from recovjax.recovery import iterative as iterative_lib
from recovjax.recovery import lora as lora_lib
from recovjax.recovery import points, protect
from recovjax.recovery import rewind as rewind_lib
from recovjax.recovery import restore as restore_lib
from recovjax.recovery.distill import make_distill, teacher_logits
from recovjax.recovery.finetune import (DEFAULT_BATCH_SIZE, Curve,
                                        budget_weights, check_eval_batches,
                                        check_recovery_data, make_finetune)
from recovjax.recovery.rebuild import make_rebuild


@dataclasses.dataclass(frozen=True)
class RecoveryTask:
    """Everything a recovery strategy may need, besides keys and damage.

    Attributes:
        apply: ``apply(params, x) -> logits``.
        init: ``init(key, sample) -> params`` (for re-initialisation).
        num_classes: number of classes (classification).
        images: the recovery data: ``float32[N, ...]`` images for
            classification, or, for another ``task``, the task's batch dict
            of ``[N, ...]`` arrays (``{"tokens", "mask"}`` for a language
            model).
        labels: ``int32[N]`` recovery labels; ``None`` for another task,
            whose targets are in its batch.
        weights: ``float32[N]`` per-example weights (0 = dropped).
        eval_batches: test batches for curves (a :class:`~recovjax.Batches`,
            or the task's stacked batch dict), or ``None``.
        checkpoint: pretrained Orbax checkpoint directory, or ``None``.
        teacher: pretrained parameters for distillation; read from
            ``checkpoint`` when ``None``.
        param_shapes: one model's parameter shapes (shape structs);
            derived from ``init`` when ``None``.
        model: the :class:`~recovjax.models.Model`, for strategies that
            train in its training mode (``train_mode=True``) or
            recalibrate its state; ``None`` if none is given.
        task: the :class:`~recovjax.tasks.Task` trained and measured;
            ``"classification"`` (or a classification task) is
            classification with ``num_classes`` classes.
    """

    apply: ApplyFn
    init: InitFn
    num_classes: int
    images: Array | dict
    labels: Array | None
    weights: Array
    eval_batches: Batches | dict | None = None
    checkpoint: os.PathLike[str] | str | None = None
    teacher: Params | None = None
    param_shapes: Params | None = None
    model: Any = None
    task: Any = "classification"

    def __post_init__(self) -> None:
        # Checked once here, on the host, so that no strategy call (and no
        # compiled program) needs to: a label out of range would otherwise
        # surface only as NaN losses and diverged=True.
        if self.general_task is None:
            sample = jax.ShapeDtypeStruct(
                (1,) + tuple(self.images.shape[1:]), self.images.dtype)
        else:
            sample = self._check_task_data()
        shapes = self.param_shapes
        if shapes is None:
            shapes = jax.eval_shape(
                lambda x: self.init(jax.random.key(0), x), sample)
        if self.general_task is None:
            _checks.check_logit_width(self.apply, shapes, sample,
                                      self.num_classes)
            check_recovery_data(self.images, self.labels, self.weights,
                                self.num_classes)
            check_eval_batches(self.eval_batches, self.num_classes)
        else:
            # The task's static checks (output shapes) run while tracing.
            task = self.general_task
            batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
                (1,) + tuple(a.shape[1:]), a.dtype), self.images)
            jax.eval_shape(lambda p, b: task.loss(
                self.apply(p, task.inputs(b)), b), shapes, batch)
        # One model's parameter shapes, for the strategies' stack checks.
        object.__setattr__(self, "_model_shapes", shapes)

    @property
    def general_task(self):
        """The task when it is not classification (batch dicts), or None."""
        from recovjax.tasks import general_task
        return general_task(self)

    def inputs(self) -> Any:
        """The model inputs of the recovery data (images, or the task's)."""
        task = self.general_task
        return self.images if task is None else task.inputs(self.images)

    def _check_task_data(self):
        from recovjax.tasks import check_batch
        task = self.general_task
        data = check_batch(task, self.images, "recovery data")
        _checks.check_lengths("recovery data", weights=self.weights,
                              **data)
        if self.eval_batches is not None:
            check_batch(task, self.eval_batches, "eval_batches",
                        stacked=True)
        inputs = task.inputs(jax.tree.map(lambda a: a[:1], data))
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), inputs)


def _check_call(keys: PRNGKey, damage: Damage, task: RecoveryTask) -> int:
    """Check a strategy's arguments (statically); the number of models."""
    count = _checks.check_key(keys, "keys", batched=True)
    if not isinstance(damage, Damage):
        raise TypeError(f"damage: must be a recovjax Damage (stacked "
                        f"params and mask), got {type(damage).__name__}")
    if not isinstance(task, RecoveryTask):
        raise TypeError(f"task: must be a RecoveryTask (see make_task), got "
                        f"{type(task).__name__}")
    _checks.check_stacked(damage.params, task._model_shapes, count,
                          "damage.params", stack_hint="damage")
    _checks.check_stacked(damage.mask, task._model_shapes, count,
                          "damage.mask", stack_hint="damage")
    return count


def make_task(model: Any, train: Split | Any, *,
              checkpoint: os.PathLike[str] | str | None = None,
              eval_batches: Batches | None = None,
              budget: tuple[PRNGKey, float] | None = None,
              teacher: Params | None = None) -> RecoveryTask:
    """Build a :class:`RecoveryTask` from a model and recovery data.

    Args:
        model: a :class:`~recovjax.models.Model` (``init``, ``apply``,
            ``num_classes``).
        train: the recovery data: a clean :class:`~recovjax.Split` (the
            pretraining data, which is also the seed's "replace lost data with
            the pretraining data"), or a data-damage result with ``images``,
            ``labels`` and ``weights`` (dropped samples weigh 0).
        checkpoint: pretrained checkpoint directory.
        eval_batches: test batches for curves.
        budget: ``(key, fraction)``: keep only this fraction of the data
            (a data budget), the kept examples chosen by ``key``; ``None``
            keeps everything.
        teacher: pretrained parameters for distillation.

    Returns:
        :class:`RecoveryTask`.

    Raises:
        ValueError: a budget that is not ``(key, fraction)`` or whose
            fraction lies outside ``[0, 1]``; labels outside ``[0,
            model.num_classes)``, data of different lengths, or a model
            whose logits are not ``num_classes`` wide (the checks of
            :class:`RecoveryTask`, which runs them on construction).
        TypeError: a budget key that is not a typed key.
    """
    from recovjax.tasks import general_task
    task = general_task(model)
    general = task is not None
    if general:
        # Another task's recovery data: its batch dict of [N, ...] arrays.
        if hasattr(train, "_asdict"):
            train = train._asdict()
        if not isinstance(train, dict):
            raise TypeError(f"train: task {task.name!r} recovers on its "
                            "batch dict of [N, ...] arrays (keys "
                            f"{', '.join(task.keys)}), got "
                            f"{type(train).__name__}")
        data = {key: jnp.asarray(value) for key, value in train.items()
                if key != "weights"}
        weights = train.get("weights")
        count = int(np.shape(next(iter(data.values())))[0]) if data else 0
        images, labels = data, None
    else:
        weights = getattr(train, "weights", None)
        # The data are checked by RecoveryTask; the lengths are needed first.
        _checks.check_lengths("recovery data", images=train.images,
                              labels=train.labels, weights=weights)
        images = jnp.asarray(train.images)
        labels = jnp.asarray(train.labels)
        count = labels.shape[0]
    weights = (jnp.ones((count,), jnp.float32) if weights is None
               else jnp.asarray(weights, jnp.float32))
    if budget is not None:
        if not isinstance(budget, tuple) or len(budget) != 2:
            raise ValueError("budget must be a (key, fraction) pair, got "
                             f"{budget!r}")
        key, fraction = budget
        _checks.check_key(key, "budget key")
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"budget fraction must be in [0, 1], got "
                             f"{fraction}")
        weights = weights * budget_weights(key, count, fraction)
    if hasattr(eval_batches, "_asdict") and general:
        eval_batches = eval_batches._asdict()
    return RecoveryTask(apply=model.forward, init=model.init,
                        num_classes=model.num_classes, images=images,
                        labels=labels, weights=weights,
                        eval_batches=eval_batches, checkpoint=checkpoint,
                        teacher=teacher,
                        param_shapes=model.abstract_params(), model=model,
                        task=task if general else "classification")


class RecoveryOutcome(NamedTuple):
    """Result of a strategy on a stack of ``M`` models.

    Attributes:
        params: recovered parameters, leading axis ``M``.
        curve: :class:`~recovjax.recovery.Curve` with leading axis ``M``. For
            strategies that do not train it has one point (step 0): the
            metrics after the strategy. Empty without eval batches.
        losses: ``float32[M, S]`` training losses (``S = 0`` if no training).
        diverged: ``bool[M]``.
        diverged_step: ``int32[M]`` (-1 = never).
        restored_leaves: leaves read from the checkpoint.
        bytes_read: bytes read from the checkpoint files.
        seconds: wall time, compilation included.
        state: the models' state after a strategy that trains in training
            mode (leading axis ``M``), or ``None``: the model's own.
        trainable: values trained per model (0: the strategy does not
            train; a LoRA recovery trains its adapters only).
        labelled: examples read with their labels per model (training
            examples, repeats counted; ``None``: not counted, a training
            run without evaluation batches has no curve to count them on).
        unlabelled: examples read without labels per model (distillation's
            training examples, a calibration set; ``None`` likewise).
        flops: FLOPs of one model's recovery, when counted
            (:func:`~recovjax.recovery.points.recovery_flops`), else
            ``None``.
    """

    params: Params
    curve: Curve
    losses: Array
    diverged: Array
    diverged_step: Array
    restored_leaves: tuple[str, ...]
    bytes_read: int
    seconds: float
    state: Any = None
    trainable: int = 0
    labelled: int | None = 0
    unlabelled: int | None = 0
    flops: float | None = None


class Strategy(Protocol):
    def __call__(self, keys: PRNGKey, damage: Damage, task: RecoveryTask
                 ) -> RecoveryOutcome: ...


class PointStrategy:
    """A strategy with a point form, runnable on any stream of points.

    ``strategy(keys, damage, task)`` recovers a stack of damaged models;
    ``strategy.prepare(task, candidates)`` gives the per-model function and
    its shared inputs (:class:`~recovjax.recovery.points.Prepared`), which
    :func:`~recovjax.recovery.points.recover_damage` runs on damage
    re-derived on device.
    """

    def __init__(self, name: str,
                 prepare: Callable[[RecoveryTask, points.Candidates],
                                   points.Prepared]):
        self.__name__ = name
        self._prepare = prepare

    def __repr__(self) -> str:
        return f"<recovery strategy {self.__name__}>"

    def prepare(self, task: RecoveryTask,
                candidates: points.Candidates) -> points.Prepared:
        """The per-model function and the shared inputs for ``task``.

        Args:
            task: the recovery task.
            candidates: ``candidates(kind) -> leaf paths`` a restore may need
                to read (see :data:`~recovjax.recovery.points.Candidates`).
        """
        return self._prepare(task, candidates)

    def __call__(self, keys: PRNGKey, damage: Damage, task: RecoveryTask
                 ) -> RecoveryOutcome:
        _check_call(keys, damage, task)
        start = time.perf_counter()

        def candidates(kind: str) -> list[str]:
            if kind == "bits":
                return points.differing_leaves(task, damage.params)
            return restore_lib.damaged_leaf_paths(damage.mask)

        prepared = self.prepare(task, candidates)
        result = jax.block_until_ready(points.run_stacked(
            prepared, keys, damage.params, damage.mask))
        return outcome_of(result, prepared, time.perf_counter() - start)


def outcome_of(result: points.PointOutcome, prepared: points.Prepared,
               seconds: float) -> RecoveryOutcome:
    """A stacked point outcome as a :class:`RecoveryOutcome`.

    Everything but the parameters comes back to the host, gathered from
    every process; the parameters stay on device in one process and are
    gathered too when several run.
    """
    params = result.params
    result = runner.fetch(result._replace(params=None))
    if jax.process_count() > 1 and params is not None:
        params = runner.fetch(params)
    flags = result.restored
    restored = tuple(sorted(name for name, flag in flags.items()
                            if np.any(flag)))
    samples = np.asarray(result.curve.samples)
    # Counted on the curve: without evaluation batches there is none, and
    # a strategy that trained reports its sample counts as unknown.
    trained = int(samples[..., -1].max()) if samples.size else (
        None if prepared.trains else 0)
    return RecoveryOutcome(
        params=params, curve=result.curve, losses=result.losses,
        diverged=result.diverged, diverged_step=result.diverged_step,
        restored_leaves=restored, bytes_read=int(prepared.bytes_read),
        seconds=seconds, state=result.state,
        trainable=int(prepared.trainable),
        labelled=trained if prepared.labelled else 0,
        unlabelled=None if trained is None and not prepared.labelled else (
            (0 if prepared.labelled else trained)
            + int(prepared.unlabelled)))


def _evaluator(task: RecoveryTask) -> points.Evaluator:
    return points.Evaluator(task.apply, task.num_classes, task.general_task)


def _need_checkpoint(task: RecoveryTask, name: str):
    if task.checkpoint is None:
        raise ValueError(f"strategy {name!r} needs the pretrained checkpoint "
                         "(RecoveryTask.checkpoint is None)")
    return task.checkpoint


OPTIMIZER_NAMES = rewind_lib.OPTIMIZERS
"""Optimiser names :func:`make_optimizer` builds; configs accept exactly these."""


def make_optimizer(optimizer: str | optax.GradientTransformation,
                   learning_rate: float, momentum: float | None
                   ) -> optax.GradientTransformation:
    """The optax optimiser a training strategy is configured with.

    Args:
        optimizer: one of :data:`OPTIMIZER_NAMES` (``"sgd"``, ``"adam"``,
            ``"adamw"`` with optax's default weight decay), or an optax
            transformation (returned as is).
        learning_rate: step size.
        momentum: SGD momentum (``None`` or 0 for plain SGD); the Adam
            variants ignore it.

    Raises:
        ValueError: for an unknown optimiser name.
    """
    if not isinstance(optimizer, str):
        return optimizer
    if optimizer == "sgd":
        return optax.sgd(learning_rate, momentum=momentum or None)
    if optimizer == "adam":
        return optax.adam(learning_rate)
    if optimizer == "adamw":
        return optax.adamw(learning_rate)
    raise ValueError(f"unknown optimizer {optimizer!r}; valid: "
                     f"{', '.join(OPTIMIZER_NAMES)}, or an optax "
                     "GradientTransformation")


def _parameter_count(task: RecoveryTask) -> int:
    return int(sum(np.prod(leaf.shape, dtype=np.int64)
                   for leaf in jax.tree.leaves(task._model_shapes)))


def _training_strategy(name: str, build: Callable[[RecoveryTask], Callable],
                       uses_frozen: bool, labels_of: Callable | None = None,
                       trainable_of: Callable[[RecoveryTask], int]
                       = _parameter_count,
                       built_for: Callable[[RecoveryTask], Any] | None = None,
                       labelled: bool = True) -> PointStrategy:
    """A strategy running one fine-tuning function per model.

    The function is built once per model and task kind, so tasks that
    differ only in their data share one compiled program.
    ``trainable_of(task)`` is the number of values it trains per model;
    ``built_for(task)`` anything else the built function depends on.
    """
    built: dict[Any, points.PointStrategyFn] = {}

    def prepare(task: RecoveryTask, candidates) -> points.Prepared:
        del candidates  # trains; reads no checkpoint leaves
        cache_key = (task.apply, task.init, task.num_classes, task.model,
                     task.general_task,
                     None if built_for is None else built_for(task))
        if cache_key not in built:
            recover = build(task)

            def fn(key, params, mask, shared):
                images, labels, weights, eval_batches = shared
                frozen = (mask,) if uses_frozen else ()
                return points.trained(recover(key, params, mask, images,
                                              labels, weights, eval_batches,
                                              *frozen))

            built[cache_key] = fn
        labels = task.labels if labels_of is None else labels_of(task)
        return points.Prepared(
            fn=built[cache_key],
            shared=(task.images, labels, task.weights, task.eval_batches),
            trains=True, bytes_read=0, trainable=trainable_of(task),
            labelled=labelled)

    return PointStrategy(name, prepare)


def _finetune_factory(mode: str):
    def factory(*, optimizer: str | optax.GradientTransformation = "sgd",
                learning_rate: float = 1e-3, momentum: float = 0.9,
                batch_size: int = DEFAULT_BATCH_SIZE,
                epochs: int | None = None, steps: int | None = None,
                eval_every: int | None = None,
                structural: bool = False, train_mode: bool = False
                ) -> Strategy:
        """Fine-tune (mode {mode}); ``structural`` keeps masked units at
        zero; ``train_mode`` trains in the model's training mode (dropout
        on, batch statistics updated)."""
        if structural and mode == "damaged":
            raise ValueError("structural damage keeps the damaged entries at "
                             "zero, so fine-tuning only them changes nothing; "
                             "use rebuild_reinit instead")
        transform = make_optimizer(optimizer, learning_rate, momentum)

        def build(task):
            if train_mode and task.model is None:
                raise ValueError("train_mode: the recovery task has no "
                                 "model to train in its training mode; "
                                 "build it with make_task(model, ...)")
            return make_finetune(task.apply, transform,
                                 batch_size=batch_size, steps=steps,
                                 epochs=epochs, mode=mode,
                                 eval_every=eval_every,
                                 num_classes=task.num_classes,
                                 train_mode=task.model if train_mode
                                 else None, task=task.general_task)

        name = "finetune" if mode == "all" else f"finetune_{mode}"
        return _training_strategy(name, build, uses_frozen=structural)

    return factory


def _distill_factory(*, temperature: float = 1.0,
                     optimizer: str | optax.GradientTransformation = "sgd",
                     learning_rate: float = 1e-3, momentum: float = 0.9,
                     batch_size: int = DEFAULT_BATCH_SIZE,
                     epochs: int | None = None, steps: int | None = None,
                     eval_every: int | None = None) -> Strategy:
    """Distil the checkpoint model into the damaged ones (no labels used)."""
    transform = make_optimizer(optimizer, learning_rate, momentum)
    cached: list[tuple[RecoveryTask, Array]] = []

    def build(task):
        general = task.general_task
        if general is not None and general.distill is None:
            raise ValueError(f"distill: task {general.name!r} has no "
                             "distillation loss; give its Task a distill "
                             "function, or recover with finetune")
        return make_distill(task.apply, transform, temperature=temperature,
                            batch_size=batch_size, steps=steps, epochs=epochs,
                            eval_every=eval_every,
                            num_classes=task.num_classes, task=general)

    def labels_of(task: RecoveryTask) -> Array:
        # Teacher logits are computed once per task object (kept alive here
        # so that identity cannot be reused by another task).
        if not cached or cached[0][0] is not task:
            teacher = task.teacher
            if teacher is None:
                teacher = restore_lib.restore_full(
                    _need_checkpoint(task, "distill"),
                    task._model_shapes).params
            cached[:] = [(task, teacher_logits(task.apply, teacher,
                                               task.inputs()))]
        return cached[0][1]

    return _training_strategy("distill", build, uses_frozen=False,
                              labels_of=labels_of, labelled=False)


def _lora_factory(*, rank: int = lora_lib.DEFAULT_RANK,
                  alpha: float | None = None, layers: Any = "auto",
                  optimizer: str | optax.GradientTransformation = "sgd",
                  learning_rate: float = 1e-3, momentum: float = 0.9,
                  batch_size: int = DEFAULT_BATCH_SIZE,
                  epochs: int | None = None, steps: int | None = None,
                  eval_every: int | None = None, structural: bool = False
                  ) -> Strategy:
    """Train low-rank adapters on the frozen damaged kernels, then merge.

    ``rank`` and ``alpha`` (default ``2 * rank``) size the adapters;
    ``layers`` chooses the kernels (``"auto"``: each kernel its adapter
    makes smaller, a regex or a list of paths); ``structural`` keeps
    removed units at zero after merging.
    """
    transform = make_optimizer(optimizer, learning_rate, momentum)
    adapters: dict[Any, lora_lib.Adapter] = {}
    # Checked now, so that a bad option fails before anything runs.
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")

    def adapter_of(task: RecoveryTask) -> lora_lib.Adapter:
        key = task.model
        if key not in adapters:
            if task.model is None:
                raise ValueError("lora: the recovery task has no model, so "
                                 "its kernels are unknown; build it with "
                                 "make_task(model, ...)")
            adapters[key] = lora_lib.make_lora(
                task._model_shapes, task.model.info, rank=rank, alpha=alpha,
                layers=layers)
        return adapters[key]

    def build(task):
        return make_finetune(task.apply, transform, batch_size=batch_size,
                             steps=steps, epochs=epochs,
                             eval_every=eval_every,
                             num_classes=task.num_classes,
                             task=task.general_task,
                             adapter=adapter_of(task))

    return _training_strategy("lora", build, uses_frozen=structural,
                              trainable_of=lambda task: adapter_of(
                                  task).trainable)


def _lr_rewind_factory(*, schedule: dict | None = None,
                       steps: int | None = None, epochs: int | None = None,
                       rewind_to: int | None = None,
                       batch_size: int | None = None,
                       eval_every: int | None = None,
                       structural: bool = False) -> Strategy:
    """Retrain with the pretraining schedule rewound (Renda et al. 2020).

    Instead of fine-tuning at a small constant rate, retrain with the
    optimiser and learning-rate schedule the model was pretrained with,
    from step ``rewind_to`` of that schedule (default: ``total_steps``
    minus the retraining steps, so retraining ends where pretraining
    ended). ``schedule`` describes it (see
    :func:`~recovjax.recovery.rewind.training_schedule`);
    ``None`` reads it from the pretrained checkpoint's metadata, which the
    zoo records. ``structural`` keeps removed units at zero.
    """
    if schedule is not None:
        rewind_lib.training_schedule(schedule, 1)  # checked before anything runs
    if rewind_to is not None and (isinstance(rewind_to, bool) or not
                                  isinstance(rewind_to, int) or rewind_to < 0):
        raise ValueError(f"rewind_to must be a non-negative int, got "
                         f"{rewind_to!r}")

    def recipe_of(task: RecoveryTask) -> dict:
        if schedule is not None:
            return dict(schedule)
        directory = _need_checkpoint(task, "lr_rewind")
        from recovjax.checkpoints import read_metadata
        recorded = read_metadata(directory)
        if "learning_rate" not in recorded:
            raise ValueError(
                f"lr_rewind: the checkpoint {directory} records no training "
                "schedule; give the strategy schedule={optimizer, "
                "learning_rate, schedule, total_steps}")
        return {key: recorded[key] for key in (
            "optimizer", "learning_rate", "schedule", "total_steps",
            "epochs", "batch_size", "momentum") if key in recorded}

    def settings(task: RecoveryTask):
        recipe = recipe_of(task)
        size = batch_size or recipe.get("batch_size") or DEFAULT_BATCH_SIZE
        count = int(np.sum(np.asarray(task.weights) > 0))
        name, function, total, momentum, _ = rewind_lib.training_schedule(
            recipe, -(-count // int(recipe.get("batch_size") or size)))
        slots = steps
        if slots is None:
            slots = (epochs if epochs is not None else 2) * -(-count // size)
        start = rewind_to if rewind_to is not None else max(total - slots, 0)
        return name, function, start, momentum, int(size), slots

    def build(task):
        name, function, start, momentum, size, slots = settings(task)
        return make_finetune(task.apply, rewind_lib.rewound_optimizer(
            name, function, start, momentum), batch_size=size, steps=slots,
            eval_every=eval_every, num_classes=task.num_classes,
            task=task.general_task)

    def built_for(task):
        name, _, start, momentum, size, slots = settings(task)
        return (name, repr(recipe_of(task)), start, momentum, size, slots)

    return _training_strategy("lr_rewind", build, uses_frozen=structural,
                              built_for=built_for)


def _iterative_factory(*, then: str = "finetune_undamaged",
                       stages: int = 4,
                       fractions: list[float] | tuple[float, ...] | None
                       = None,
                       optimizer: str | optax.GradientTransformation = "sgd",
                       learning_rate: float = 1e-3, momentum: float = 0.9,
                       batch_size: int = DEFAULT_BATCH_SIZE,
                       epochs: int | None = None, steps: int | None = None,
                       eval_every: int | None = None,
                       structural: bool = False) -> Strategy:
    """Damage and recover in cycles, up to the point's amount.

    Stage ``k`` applies the point's damage operator (with the point's
    damage key) to the model the previous stage recovered, at
    ``fractions[k]`` of the amount, then recovers it with ``then`` (its
    budget per stage: ``steps`` or ``epochs``); the last fraction is 1.
    Magnitude pruning so becomes Han et al.'s prune-retrain cycles (50 % ->
    retrain -> 70 % -> ...) with ``fractions``, or gradual pruning's cubic
    schedule over ``stages`` stages
    (:func:`~recovjax.recovery.iterative.cubic_fractions`, the
    default). The default ``then`` retrains only the surviving weights, so
    what a stage pruned stays pruned. The curve runs over all the stages'
    steps.
    """
    if fractions is None:
        if isinstance(stages, bool) or not isinstance(stages, int) or (
                stages < 1):
            raise ValueError(f"stages must be a positive int, got "
                             f"{stages!r}")
        fractions = iterative_lib.cubic_fractions(stages)
    else:
        fractions = tuple(float(f) for f in fractions)
        if not fractions or any(not 0 < f <= 1 for f in fractions) or any(
                b < a for a, b in zip(fractions, fractions[1:])):
            raise ValueError(f"fractions must be non-decreasing fractions of "
                             f"the amount in (0, 1], got {list(fractions)}")
        if fractions[-1] != 1.0:
            fractions = fractions + (1.0,)
    if "+" in then or then == "iterative":
        raise ValueError(f"then: one strategy recovers each stage, got "
                         f"{then!r}")
    inner_options = dict(optimizer=optimizer, learning_rate=learning_rate,
                         momentum=momentum, batch_size=batch_size,
                         epochs=epochs, steps=steps, eval_every=eval_every,
                         structural=structural)
    accepted = _options_of(then) if then in _FACTORIES else set()
    if then not in _FACTORIES:
        strategy_factory(then)  # the error lists the valid names
    inner = _FACTORIES[then](**{k: v for k, v in inner_options.items()
                                if k in accepted and (v is not None or k in (
                                    "epochs", "steps", "eval_every"))})
    if not isinstance(inner, PointStrategy):
        raise ValueError(f"then: {then!r} has no point form, so it cannot "
                         "recover the stages of one program")
    built: dict[Any, points.PointStrategyFn] = {}

    def prepare(task: RecoveryTask, candidates) -> points.Prepared:
        stage = inner.prepare(task, lambda kind: sorted(
            restore_lib._flat(task._model_shapes)))
        if stage.fn not in built:
            built[stage.fn] = iterative_lib.stages_fn(stage.fn, fractions)
        return points.Prepared(fn=built[stage.fn], shared=stage.shared,
                               trains=stage.trains,
                               bytes_read=stage.bytes_read,
                               trainable=stage.trainable, redamages=True,
                               labelled=stage.labelled,
                               unlabelled=stage.unlabelled * len(fractions))

    return PointStrategy("iterative", prepare)


def _rebuild_reinit_factory(*, optimizer: str | optax.GradientTransformation
                            = "sgd", learning_rate: float = 1e-3,
                            momentum: float = 0.9,
                            batch_size: int = DEFAULT_BATCH_SIZE,
                            epochs: int | None = None,
                            steps: int | None = None,
                            eval_every: int | None = None) -> Strategy:
    """Re-initialise the masked units with fresh keys, then fine-tune."""
    transform = make_optimizer(optimizer, learning_rate, momentum)

    def build(task):
        if task.init is None:
            raise ValueError(
                "rebuild_reinit draws fresh parameters and the model has no "
                "init; build it with init=... (from_apply, from_nnx, "
                "from_equinox) or use rebuild_checkpoint")
        sample = jax.tree.map(lambda a: a[:1], task.inputs())
        return make_rebuild(task.init, sample, task.apply, transform,
                            batch_size=batch_size, steps=steps, epochs=epochs,
                            eval_every=eval_every,
                            num_classes=task.num_classes,
                            task=task.general_task)

    return _training_strategy("rebuild_reinit", build, uses_frozen=False)


def _restore_strategy(name: str, kind: str, *,
                      leaves: tuple[str, ...] | None = None,
                      block_size: int = 1) -> PointStrategy:
    """A restore from the checkpoint, reading only the leaves it needs."""

    def prepare(task: RecoveryTask, candidates) -> points.Prepared:
        _need_checkpoint(task, name)
        if kind == "full":
            names = sorted(restore_lib._flat(task._model_shapes))
        elif leaves is not None:
            names = sorted(set(leaves))
        else:
            names = list(candidates("bits" if kind == "detect" else "mask"))
        values, bytes_read = points.read_checkpoint(task, names, name)
        fn = points.restore_fn(kind, _evaluator(task), leaves, block_size)
        return points.Prepared(fn=fn, shared=(values, task.eval_batches),
                               trains=False, bytes_read=bytes_read)

    return PointStrategy(name, prepare)


def _restore_full_factory() -> Strategy:
    """Replace every model by the checkpoint's parameters."""
    return _restore_strategy("restore_full", "full")


def _restore_leaves_factory(*, leaves: list[str] | tuple[str, ...] | None
                            = None) -> Strategy:
    """Restore the named leaves (default: every leaf the mask touches)."""
    return _restore_strategy("restore_leaves", "leaves", leaves=None if (
        leaves is None) else tuple(sorted(set(leaves))))


def _restore_entries_factory(name: str = "restore_entries") -> Callable:
    def factory() -> Strategy:
        """Restore exactly the masked entries from the checkpoint."""
        return _restore_strategy(name, "entries")

    return factory


def _detect_restore_factory(*, block_size: int = 1) -> Strategy:
    """Find damaged blocks by comparison with the checkpoint; no mask used."""
    if isinstance(block_size, bool) or not isinstance(
            block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got "
                         f"{block_size!r}")
    return _restore_strategy("detect_restore", "detect",
                             block_size=block_size)


def _checksum_restore_factory(*, block_size: int = 256) -> Strategy:
    """Flag blocks whose checksums changed; restore only those blocks."""
    if isinstance(block_size, bool) or not isinstance(
            block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got "
                         f"{block_size!r}")

    def prepare(task: RecoveryTask, candidates) -> points.Prepared:
        _need_checkpoint(task, "checksum_restore")
        values, bytes_read = points.read_checkpoint(
            task, list(candidates("bits")), "checksum_restore")
        checksums = protect.clean_checksums(values, block_size)
        fn = protect.checksum_fn(_evaluator(task), block_size)
        return points.Prepared(fn=fn, shared=(values, checksums,
                                              task.eval_batches),
                               trains=False, bytes_read=bytes_read)

    return PointStrategy("checksum_restore", prepare)


def _saturate_factory() -> Strategy:
    """Clip every weight to its clean leaf's range (NaN becomes 0)."""

    def prepare(task: RecoveryTask, candidates) -> points.Prepared:
        _need_checkpoint(task, "saturate")
        # The ranges of the leaves that differ from the checkpoint; the
        # others are within their own range already.
        values, bytes_read = points.read_checkpoint(
            task, list(candidates("bits")), "saturate")
        fn = protect.saturate_fn(_evaluator(task))
        return points.Prepared(fn=fn, shared=(protect.clean_ranges(values),
                                              task.eval_batches),
                               trains=False, bytes_read=bytes_read)

    return PointStrategy("saturate", prepare)


def _recalibrate_factory(*, batch_size: int = DEFAULT_BATCH_SIZE,
                         epochs: int | None = None, steps: int | None = None,
                         eval_every: int | None = None) -> Strategy:
    """Recalibrate the model state (batch statistics) on the recovery data.

    The parameters stay exactly as damaged; the model runs in training mode
    over the recovery data, so every normalisation layer's running
    statistics move towards those of the damaged network (at the layer's
    own momentum). Dropout runs as in training.
    """

    def build(task):
        if task.model is None or not task.model.state:
            raise ValueError(
                "recalibrate: the model has no state (batch statistics) to "
                "recalibrate; it applies to models with batch norm built "
                "with from_linen or from_nnx")
        return make_finetune(task.apply, optax.set_to_zero(),
                             batch_size=batch_size, steps=steps,
                             epochs=epochs, eval_every=eval_every,
                             num_classes=task.num_classes,
                             train_mode=task.model, task=task.general_task)

    return _training_strategy("recalibrate", build, uses_frozen=False)


def _clean_params(task: RecoveryTask, name: str) -> tuple[Params, int]:
    """The pretrained parameters (the task's teacher, or the checkpoint's)
    and the bytes read for them."""
    if task.teacher is not None:
        return task.teacher, 0
    names = sorted(restore_lib._flat(task._model_shapes))
    values, bytes_read = points.read_checkpoint(task, names, name)
    structure = jax.tree.structure(task._model_shapes)
    from recovjax.models.info import paths_of
    return jax.tree.unflatten(structure, [
        values[path] for path in paths_of(task._model_shapes)]), bytes_read


def _calibration_strategy(name: str, calibration: int,
                          correct: Callable[..., Params]) -> PointStrategy:
    """A strategy changing each model from clean layer outputs.

    ``correct(key, model, params, mask, inputs, targets, layers)`` gives
    one model's new parameters; the clean outputs are computed once per
    task, on its first ``calibration`` kept inputs.
    """
    calibrate_lib.check_calibration(calibration)
    built: dict[Any, tuple[points.PointStrategyFn, Any]] = {}

    def prepare(task: RecoveryTask, candidates) -> points.Prepared:
        del candidates  # reads the whole clean model
        if task.model is None:
            raise ValueError(f"{name}: the recovery task has no model, so "
                             "its layers are unknown; build it with "
                             "make_task(model, ...)")
        inputs = calibrate_lib.calibration_inputs(task.inputs(), task.weights,
                                                  calibration)
        clean, bytes_read = _clean_params(task, name)
        cache_key = (task.model, jax.tree.structure(inputs), tuple(
            (a.shape, a.dtype) for a in jax.tree.leaves(inputs)))
        if cache_key not in built:
            model = task.model
            layers = calibrate_lib.calibration_layers(
                model, task._model_shapes, inputs)
            evaluator = _evaluator(task)

            def fn(key, params, mask, shared):
                inputs, targets, eval_batches = shared
                new = correct(key, model, params, mask, inputs, targets,
                              layers)
                return points.untrained(evaluator, new, eval_batches, {})

            built[cache_key] = (fn, layers)
        fn, layers = built[cache_key]
        targets = calibrate_lib.clean_outputs(task.model, clean, inputs,
                                              layers)
        return points.Prepared(fn=fn, shared=(inputs, targets,
                                              task.eval_batches),
                               trains=False, bytes_read=bytes_read,
                               unlabelled=calibration)

    return PointStrategy(name, prepare)


def _bias_correction_factory(*, calibration: int =
                             calibrate_lib.DEFAULT_CALIBRATION) -> Strategy:
    """Shift every layer's bias by its mean output shift (no labels)."""

    def correct(key, model, params, mask, inputs, targets, layers):
        del key, mask  # deterministic; corrects every bias
        return calibrate_lib.correct_biases(model, params, inputs, targets,
                                            layers)

    return _calibration_strategy("bias_correction", calibration, correct)


def _reconstruct_factory(*, calibration: int =
                         calibrate_lib.DEFAULT_CALIBRATION,
                         damping: float = calibrate_lib.DEFAULT_DAMPING,
                         iterations: int = calibrate_lib.DEFAULT_ITERATIONS
                         ) -> Strategy:
    """Solve each layer's surviving weights to reproduce its clean outputs
    on ``calibration`` unlabelled examples (ridge ``damping``, conjugate
    gradients for at most ``iterations`` steps per layer)."""
    if isinstance(damping, bool) or not isinstance(
            damping, (int, float)) or not damping > 0:
        raise ValueError(f"damping must be a positive number, got "
                         f"{damping!r}")
    if isinstance(iterations, bool) or not isinstance(
            iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got "
                         f"{iterations!r}")

    def correct(key, model, params, mask, inputs, targets, layers):
        return calibrate_lib.reconstruct_layers(
            key, model, params, mask, inputs, targets, layers,
            damping=float(damping), iterations=iterations)

    return _calibration_strategy("reconstruct", calibration, correct)


_FACTORIES: dict[str, Callable[..., Strategy]] = {
    "finetune": _finetune_factory("all"),
    "finetune_damaged": _finetune_factory("damaged"),
    "finetune_undamaged": _finetune_factory("undamaged"),
    "restore_full": _restore_full_factory,
    "restore_leaves": _restore_leaves_factory,
    "restore_entries": _restore_entries_factory(),
    "detect_restore": _detect_restore_factory,
    "checksum_restore": _checksum_restore_factory,
    "saturate": _saturate_factory,
    "rebuild_reinit": _rebuild_reinit_factory,
    "rebuild_checkpoint": _restore_entries_factory("rebuild_checkpoint"),
    "distill": _distill_factory,
    "recalibrate": _recalibrate_factory,
    "lora": _lora_factory,
    "bias_correction": _bias_correction_factory,
    "reconstruct": _reconstruct_factory,
    "lr_rewind": _lr_rewind_factory,
    "iterative": _iterative_factory,
}
BUILT_IN = tuple(_FACTORIES)
"""The strategies recovjax ships."""


def register_strategy(name: str, factory: Callable[..., Strategy], *,
                      overwrite: bool = False) -> None:
    """Register a recovery strategy that configs and the CLI can name.

    Args:
        name: the name (letters, digits, ``_``; no ``+``, which composes).
        factory: ``factory(**options) -> strategy`` where ``strategy(keys,
            damage, task) -> RecoveryOutcome``; its keyword arguments are
            the options configs may set (validated before anything runs).
        overwrite: replace an earlier registration (never a built-in).

    Raises:
        ValueError: a malformed or taken name.
        TypeError: a factory that is not callable.
    """
    if not isinstance(name, str) or not name or not all(
            ch.isalnum() or ch == "_" for ch in name):
        raise ValueError(f"a strategy name must be a non-empty string of "
                         f"letters, digits and '_', got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got "
                        f"{type(factory).__name__}")
    if name in BUILT_IN or (name in _FACTORIES and not overwrite):
        raise ValueError(f"strategy {name!r} is already registered" + (
            "" if name in BUILT_IN else "; pass overwrite=True to replace "
            "it"))
    _FACTORIES[name] = factory


def strategy_names() -> tuple[str, ...]:
    """Names accepted by :func:`get_strategy` (and joinable with ``+``)."""
    return tuple(_FACTORIES)


def strategy_factory(name: str) -> Callable[..., Strategy]:
    """The factory behind the strategy ``name`` (one stage, no ``+``).

    Raises:
        ValueError: an unknown name (the message lists valid names).
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown recovery strategy {name!r}; valid names: "
                         f"{', '.join(strategy_names())}")
    return _FACTORIES[name]


def strategy_options(name: str) -> frozenset[str]:
    """Options accepted by the strategy ``name`` (any stage of ``a+b``).

    Raises:
        ValueError: an unknown name (the message lists valid names).
    """
    parts = [part.strip() for part in name.split("+")]
    unknown = [part for part in parts if part not in _FACTORIES]
    if unknown:
        raise ValueError(f"unknown recovery strategy {unknown[0]!r} in "
                         f"{name!r}; valid names: "
                         f"{', '.join(strategy_names())} (join with '+')")
    return frozenset().union(*(_options_of(part) for part in parts))


def _options_of(name: str) -> set[str]:
    return set(inspect.signature(_FACTORIES[name]).parameters)


def compose(*strategies: Strategy) -> Strategy:
    """Run strategies in order, each on the previous one's parameters.

    The damage mask is passed unchanged to every stage. The outcome has the
    last stage's curve when it trained (otherwise the last curve from a
    training stage, else the final evaluation), the summed bytes read and
    time, the union of restored leaves, and ``diverged`` from any stage.
    Stages with a point form (every built-in strategy) run as one program
    per model; others run one after the other on the stack.

    Raises:
        ValueError: if no strategy is given.
    """
    if not strategies:
        raise ValueError("compose needs at least one strategy")
    if all(isinstance(stage, PointStrategy) for stage in strategies):
        def prepare(task: RecoveryTask, candidates) -> points.Prepared:
            stages, trained_before = [], False
            for stage in strategies:
                # After a training stage every leaf may differ.
                seen = (lambda kind: sorted(restore_lib._flat(
                    task._model_shapes)) if kind == "bits"
                    else candidates(kind)) if trained_before else candidates
                stages.append(stage.prepare(task, seen))
                if stages[-1].redamages:
                    raise ValueError(f"{stage.__name__}: a strategy that "
                                     "damages in stages cannot be composed "
                                     "with others")
                trained_before = trained_before or stages[-1].trains
            trains = tuple(stage.trains for stage in stages)
            return points.Prepared(
                fn=points.compose_fn(tuple(stage.fn for stage in stages),
                                     trains),
                shared=tuple(stage.shared for stage in stages),
                trains=any(trains),
                bytes_read=sum(stage.bytes_read for stage in stages),
                trainable=max(stage.trainable for stage in stages),
                labelled=all(stage.labelled for stage in stages),
                unlabelled=sum(stage.unlabelled for stage in stages))

        return PointStrategy("+".join(stage.__name__ for stage in strategies),
                             prepare)

    def composed(keys: PRNGKey, damage: Damage, task: RecoveryTask
                 ) -> RecoveryOutcome:
        _check_call(keys, damage, task)
        outcomes = []
        params = damage.params
        for index, strategy in enumerate(strategies):
            stage_keys = jax.vmap(lambda key: jax.random.fold_in(
                key, index))(keys) if index else keys
            outcome = strategy(stage_keys, Damage(params, damage.mask), task)
            outcomes.append(outcome)
            params = outcome.params
        trained = [o for o in outcomes if o.losses.shape[-1] > 0]
        last = trained[-1] if trained else outcomes[-1]
        diverged = functools.reduce(np.logical_or, [
            np.asarray(o.diverged) for o in outcomes])
        return RecoveryOutcome(
            params=params, curve=last.curve, losses=last.losses,
            diverged=diverged, diverged_step=last.diverged_step,
            restored_leaves=tuple(sorted({leaf for o in outcomes
                                          for leaf in o.restored_leaves})),
            bytes_read=sum(o.bytes_read for o in outcomes),
            seconds=sum(o.seconds for o in outcomes),
            trainable=max(o.trainable for o in outcomes))

    return composed


def get_strategy(name: str, **options: Any) -> Strategy:
    """Look up a strategy by name; ``"a+b"`` composes ``a`` then ``b``.

    Options go to every named stage that accepts them (e.g. ``steps`` to the
    fine-tuning stage of ``"restore_leaves+finetune"``).

    Args:
        name: one of :func:`strategy_names`, or several joined by ``+``.
        **options: strategy options (``steps``, ``epochs``, ``batch_size``,
            ``learning_rate``, ``momentum``, ``optimizer``, ``eval_every``,
            ``structural``, ``leaves``, ``block_size``, ``temperature``).

    Returns:
        ``strategy(keys, damage, task) -> RecoveryOutcome``.

    Raises:
        ValueError: an unknown name (the message lists valid names) or an
            option no stage accepts.
    """
    parts = [part.strip() for part in name.split("+")]
    unknown = [part for part in parts if part not in _FACTORIES]
    if unknown or not parts:
        raise ValueError(f"unknown recovery strategy {unknown[0]!r} in "
                         f"{name!r}; valid names: "
                         f"{', '.join(strategy_names())} (join with '+')")
    accepted = set().union(*(_options_of(part) for part in parts))
    stray = sorted(set(options) - accepted)
    if stray:
        raise ValueError(f"option(s) {stray} not accepted by strategy "
                         f"{name!r}; it accepts {sorted(accepted)}")
    strategies = [
        _FACTORIES[part](**{key: value for key, value in options.items()
                            if key in _options_of(part)})
        for part in parts]
    return strategies[0] if len(strategies) == 1 else compose(*strategies)
