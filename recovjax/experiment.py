"""One experiment end to end: damage -> evaluate -> recover -> evaluate -> report.

:func:`run_experiment` drives the library from an
:class:`~recovjax.config.ExperimentConfig` into a run directory. Each unit of
work (the clean evaluation, each damage kind's sweep, each recovery group)
is persisted as it finishes, so a killed run resumes where it stopped, and
the final ``results.csv`` is byte-identical to an uninterrupted run's: every
number depends only on the config (keys come from ``fold_in`` of the root
seed), never on which run computed it.

Keys: the sweep's point key is :func:`recovjax.sweep.point_key`; recovery of
that point uses ``fold_in(point_key, RECOVERY_STREAM)`` (data order,
re-initialisation), the same for every strategy so that strategies are
compared on the same data order. Data damage of the recovery data uses
``fold_in(root, crc32("recovery-data/<label>"))``, shared by all points.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovjax import config as config_lib
from recovjax._compile_cache import enable_compilation_cache
from recovjax.data import batch_split
from recovjax.data.loading import dataset_features
from recovjax.data.stream import stream_dataset
from recovjax.damage import damage_spec, get_damage
from recovjax.damage.registry import accepts_info
from recovjax.damage.replay import fault_list, save_faults
from recovjax.evaluate import evaluate, evaluate_stream
from recovjax import checkpoints, sources
from recovjax.models import pretrained_loader
from recovjax.tasks import evaluate_task, general_task
from recovjax.pretrain import Pretrained, load_pretrained, read_pretrained
from recovjax.recovery import get_strategy, make_task, recover_damage
from recovjax.recovery.measure import (peak_memory, recovery_records,
                                       task_step_cost, train_step_cost)
from recovjax.recovery.registry import make_optimizer
from recovjax.results import ResultsTable, metrics_rows, task_rows
from recovjax.rundir import (RunConflictError, RunDirectory,
                             RunDirectoryError, check_run_directory,
                             environment)
from recovjax.sweep import iter_sweep, point_keys
from recovjax.sweep.keys import key_indices
from recovjax.validation import (check_config, strategy_arguments,
                                 strategy_label, strategy_spec)

RECOVERY_STREAM = 0x5EC0
"""``fold_in`` tag of a point's recovery key (data order, re-init)."""


@dataclasses.dataclass
class Progress:
    """Reports units of work to a callback (e.g. a tqdm bar)."""

    total: int
    update: Callable[[str], None] = lambda message: None


def _build_strategy(spec: config_lib.StrategyConfig,
                    recovery: config_lib.RecoveryConfig, structural: bool):
    """The configured strategy; training keeps removed units removed when
    the damage is structural (unless the strategy rebuilds them)."""
    return get_strategy(spec.name,
                        **strategy_arguments(spec, recovery, structural))


class Experiment:
    """The state shared by the stages of one run (data, model, keys)."""

    def __init__(self, config: config_lib.ExperimentConfig, *,
                 zoo_dir=None, progress: bool = True):
        self.config = config
        self._ops: dict[str, Any] = {}
        self._data = None
        self.stream = None
        evaluation = config.evaluate
        if evaluation.stream:
            # The sweep reads the test split block by block; the whole
            # dataset is loaded only if a recovery needs its train split.
            self.stream = stream_dataset(
                config.dataset, "test", batch_size=evaluation.batch_size,
                block_batches=evaluation.block_batches,
                examples=evaluation.test_examples, data_dir=config.data_dir)
            shape, classes = dataset_features(config.dataset,
                                              data_dir=config.data_dir)
            sample = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
        else:
            sample, classes = sources.dataset_sample_of(self.data)
        model = sources.resolve_model(config.model, classes, sample)
        model = sources.resolve_task(model, config.task, config.task_options)
        loader = (None if sources.is_import_path(config.model)
                  else pretrained_loader(config.model))
        if config.weights is not None or sources.is_import_path(
                config.model):
            # A user's model: its weights are the pretrained model, and a
            # verified checkpoint of them serves the restore strategies.
            model = sources.with_weights(model, config.weights,
                                         config.weights_layout)
            if not sources.has_weights(model):
                raise config_lib.ConfigError(
                    f"model: {config.model!r} returns a model without "
                    "weights; name them with weights: PATH")
            path = sources.user_checkpoint(model, zoo_dir)
            self.pretrained = Pretrained(
                params=model.params,
                metadata=checkpoints.read_metadata(path), path=path,
                state=model.state)
        elif loader is not None:
            # A registered model with its own pretraining (the zoo's LM).
            path = pathlib.Path(loader(
                model, seed=config.pretrain_seed, zoo_dir=zoo_dir,
                data_dir=config.data_dir, progress=progress))
            self.pretrained = read_pretrained(path, model)
            model = self.pretrained.attach(model)
        else:
            self.pretrained = load_pretrained(
                config.model, config.dataset, seed=config.pretrain_seed,
                zoo_dir=zoo_dir, data_dir=config.data_dir,
                progress=progress)
            # The zoo's parameters and the batch statistics trained with
            # them: model.forward evaluates with that state.
            model = self.pretrained.attach(model)
        self.model = model
        self.params = self.pretrained.params
        self.task = general_task(model)
        self._batches = None
        self.root = jax.random.key(config.seed)
        self._step_flops: float | None = None

    @property
    def data(self):
        """The dataset, loaded on first use."""
        if self._data is None:
            config = self.config
            self._data = sources.resolve_dataset(
                config.dataset, config.data_dir, config.dataset_options)
        return self._data

    @property
    def batches(self):
        """The test batches in memory (built on first use)."""
        if self._batches is None:
            evaluation = self.config.evaluate
            if self.task is None:
                self._batches = batch_split(
                    sources.subset(self.data.test, evaluation.test_examples),
                    evaluation.batch_size)
            else:
                self._batches = sources.task_batches(
                    self.data, self.data.test, evaluation.batch_size,
                    evaluation.test_examples)
        return self._batches

    @property
    def test_examples(self) -> int | None:
        """The number of test examples each model is evaluated on, or
        ``None`` for a task (its metrics need not be fractions of examples:
        token accuracies, perplexities)."""
        if self.task is not None:
            return None
        if self.stream is not None:
            return int(self.stream.num_examples)
        # Padding in the last batch is masked out of every metric.
        return int(np.asarray(self.batches.mask).astype(bool).sum())

    @property
    def headline(self) -> tuple[str, bool]:
        """The metric reports lead with, and whether higher is better."""
        if self.task is None:
            return "accuracy", True
        return self.task.headline, self.task.higher_is_better

    def step_flops(self) -> float | None:
        """FLOPs of one fine-tuning step of one model (XLA cost analysis),
        or ``None`` where the backend does not count them."""
        if self._step_flops is None:
            recovery = self.config.recovery
            optimizer = make_optimizer(recovery.optimizer.name,
                                       recovery.optimizer.learning_rate,
                                       recovery.optimizer.momentum)
            if self.task is None:
                shape = (recovery.batch_size,
                         *self.data.train.images.shape[1:])
                cost = train_step_cost(self.model.forward, self.params,
                                       shape, optimizer)
            else:
                batch = jax.tree.map(
                    lambda a: jax.ShapeDtypeStruct(
                        (recovery.batch_size,) + a.shape[1:], a.dtype),
                    sources.task_examples(self.data, self.data.train, None))
                cost = task_step_cost(self.task, self.model.forward,
                                      self.params, batch, optimizer)
            self._step_flops = float(cost.flops)
        return None if math.isnan(self._step_flops) else self._step_flops

    def clean_rows(self) -> list[dict]:
        where = dict(damage="none", ratio=0.0, seed=0, stage="clean")
        if self.task is not None:
            batches = self.batches  # built here, never inside the program
            metrics = jax.jit(lambda p: evaluate_task(
                self.task, self.model.forward, p, batches))(self.params)
            return task_rows(jax.device_get(metrics), **where)
        if self.stream is not None:
            metrics = evaluate_stream(self.model.forward, self.params,
                                      self.stream, self.model.num_classes)
        else:
            metrics = jax.jit(evaluate, static_argnums=(0, 3))(
                self.model.forward, self.params, self.batches,
                self.model.num_classes)
        return metrics_rows(jax.device_get(metrics), **where)

    def points(self, damage: config_lib.DamageConfig) -> list[tuple]:
        return [(index, ratio, seed)
                for index, ratio in enumerate(damage.ratios)
                for seed in range(self.config.sweep.seeds)]

    def damage_chunks(self, damage: config_lib.DamageConfig):
        label = damage.label or damage.kind
        op = self.damage_op(damage)
        sweep_config = self.config.sweep
        return iter_sweep(
            self.model, self.params, damages={label: op},
            ratios=list(damage.ratios), seeds=sweep_config.seeds,
            data=self.batches if self.stream is None else self.stream,
            root_key=self.root, chunk_size=sweep_config.chunk_size,
            model_devices=sweep_config.model_devices,
            memory_budget_bytes=int(sweep_config.memory_budget_mb * 2**20),
            outcomes=sweep_config.outcomes)

    def fault_lists(self, damage: config_lib.DamageConfig):
        """``(file name, FaultList)`` of every point of a parameter damage,
        each damaged again on the host from its point key."""
        label = damage.label or damage.kind
        op = self.damage_op(damage)
        extra = {"info": self.model.info} if accepts_info(op) else {}
        for index, ratio, seed in self.points(damage):
            (key,) = point_keys(self.root, label,
                                key_indices(op, [index]), [seed])
            damaged = jax.device_get(op(key, self.params, ratio, **extra))
            metadata = {"damage": damage.kind, "label": label,
                        "ratio": repr(float(ratio)), "seed": str(seed),
                        "options": json.dumps(damage.options,
                                              sort_keys=True)}
            yield (f"faults/{label}/r{index}_s{seed}.safetensors",
                   fault_list(self.params, damaged, metadata=metadata,
                              # A deployed format's faults come back as
                              # values: the other entries are rounded.
                              kind=("values" if damage.options.get("format")
                                    else "bits"),
                              format=damage.options.get("format"),
                              granularity=damage.options.get(
                                  "granularity", "tensor")))

    def recovery_data(self, label: str, data: config_lib.RecoveryDataConfig):
        key = jax.random.fold_in(
            self.root, zlib.crc32(f"recovery-budget/{label}".encode()))
        budget = None if data.fraction >= 1.0 else (key, data.fraction)
        if self.task is not None:
            # Data damage is refused for other tasks by check_config.
            train = sources.task_examples(self.data, self.data.train,
                                          data.train_examples)
            return make_task(self.model, train,
                             checkpoint=self.pretrained.path,
                             eval_batches=self.batches, budget=budget,
                             teacher=self.params)
        train = sources.subset(self.data.train, data.train_examples)
        if data.damage is not None:
            op = get_damage(data.damage, **data.options)
            damage_key = jax.random.fold_in(
                self.root, zlib.crc32(f"recovery-data/{label}".encode()))
            train = op(damage_key, jnp.asarray(train.images),
                       jnp.asarray(train.labels), data.amount,
                       num_classes=self.data.num_classes)
        return make_task(self.model, train, checkpoint=self.pretrained.path,
                         eval_batches=self.batches, budget=budget,
                         teacher=self.params)

    def damage_op(self, damage: config_lib.DamageConfig):
        """The damage operator of ``damage`` (one object per damage, so
        that its compiled programs are reused across recovery groups)."""
        label = damage.label or damage.kind
        if label not in self._ops:
            self._ops[label] = self._ready(get_damage(damage.kind,
                                                      **damage.options))
        return self._ops[label]

    def _ready(self, op):
        # Operators that need clean data first get the first training
        # examples: range restriction profiles its bounds on them, the bit
        # search draws its attack batches from them, an importance target
        # scores the clean weights on them.
        if getattr(op, "wants_restriction", None) is not None:
            train = sources.subset(self.data.train, PROFILE_EXAMPLES)
            profile = batch_split(train, self.config.evaluate.batch_size)
            return op.profiled(self.model, self.params, profile)
        if hasattr(op, "unscored"):  # importance scores of the clean model
            train = sources.subset(self.data.train, PROFILE_EXAMPLES)
            return op.bind(self.model, train.images, train.labels,
                           params=self.params)
        if hasattr(op, "bind"):
            train = sources.subset(self.data.train, PROFILE_EXAMPLES)
            return op.bind(self.model, train.images, train.labels)
        return op

    def recover(self, strategy, task, damage: config_lib.DamageConfig,
                points: Sequence[tuple]):
        """Recover the sweep's damaged models of ``points`` (same keys).

        Each damaged model is re-derived on device from its point key and
        ratio, inside the program that recovers it.
        """
        label = damage.label or damage.kind
        keys = point_keys(self.root, label, key_indices(
            self.damage_op(damage), [index for index, _, _ in points]),
            [seed for _, _, seed in points])
        ratios = jnp.asarray([ratio for _, ratio, _ in points], jnp.float32)
        recovery_keys = jax.vmap(
            lambda key: jax.random.fold_in(key, RECOVERY_STREAM))(keys)
        return recover_damage(strategy, task, self.damage_op(damage),
                              self.params, damage_keys=keys, amounts=ratios,
                              keys=recovery_keys,
                              model_devices=self.config.sweep.model_devices,
                              count_flops=True)


PROFILE_EXAMPLES = 1000
"""Training examples range restriction profiles its bounds on, and the bit
search draws its attack batches from."""


def _pad(points: list, size: int) -> list:
    return points + [points[-1]] * (size - len(points))


def _derived_rows(task, curve, points, stage, label) -> list[dict]:
    """Rows of the task's ``from_curve`` metrics at every curve point."""
    rows = []
    if task is None or task.from_curve is None:
        return rows
    for index, (_, ratio, seed) in enumerate(points):
        for point in range(np.shape(curve.steps)[1]):
            metrics = task.from_curve({
                "loss": np.float32(curve.loss[index, point]),
                "accuracy": np.float32(curve.accuracy[index, point])})
            rows.extend(task_rows(jax.device_get(metrics), damage=label,
                                  ratio=ratio, seed=seed, stage=stage,
                                  step=int(curve.steps[index, point])))
    return rows


def _recovery_rows(outcome, points, count, *, label, strategy, clean,
                   damaged, task=None, examples=None) -> list[dict]:
    host = jax.device_get(outcome)
    trimmed = host._replace(
        curve=jax.tree.map(lambda x: np.asarray(x)[:count], host.curve),
        diverged=np.asarray(host.diverged)[:count],
        diverged_step=np.asarray(host.diverged_step)[:count])
    ratios = [ratio for _, ratio, _ in points]
    seeds = [seed for _, _, seed in points]
    rows = recovery_records(
        trimmed, damage=label, ratios=ratios, seeds=seeds,
        clean_accuracy=clean,
        damaged_accuracy=[damaged.get((label, ratio, seed), math.nan)
                          for _, ratio, seed in points],
        examples=examples)
    stage = f"recovered/{strategy}"
    derived = _derived_rows(task, trimmed.curve, points, stage, label)
    return [dict(row, stage=stage) for row in rows
            if row["stage"] == "recovered"] + derived


def run_experiment(config: config_lib.ExperimentConfig,
                   run_dir: os.PathLike[str] | str, *, force: bool = False,
                   zoo_dir=None, progress: bool = True,
                   on_progress: Callable[[str, int, int], None] | None = None,
                   source: str | os.PathLike[str] | None = None
                   ) -> ResultsTable:
    """Run an experiment into ``run_dir``, resuming finished work.

    Order: the config is checked (:func:`check_config`) and the run
    directory too (:func:`~recovjax.rundir.check_run_directory`) before
    anything is written; then data, model and pretrained checkpoint are
    loaded (pretraining on first use); only then is the run directory
    claimed (``config.yaml`` written), so a run that cannot start leaves no
    directory behind.

    Args:
        config: the validated experiment config.
        run_dir: the run directory (created; resumed if it holds the same
            config).
        force: start over in a directory made with another config.
        zoo_dir: zoo of pretrained checkpoints (default cache).
        progress: show progress bars for pretraining.
        on_progress: ``on_progress(message, done, total)`` once with
            ``done=0`` when the checks have passed and setup (data,
            pretrained model) begins, then after each unit.
        source: the config file, named in config error messages.

    On several processes (after ``jax.distributed.initialize``, or the
    CLI's ``--coordinator``), every process calls this with the same
    arguments and computes its share of every sweep and recovery; only the
    first process reads and writes ``run_dir`` (and pretrains into the zoo,
    which the others then read: give them shared storage), and its
    ``results.csv`` is the single-process run's, byte for byte.

    Returns:
        The tidy :class:`~recovjax.results.ResultsTable` (also written to
        ``results.csv`` and ``results.json``, with ``env.json``,
        ``costs.json``, plots and ``report.md``).

    Raises:
        ConfigError: see :func:`check_config`.
        RunConflictError: ``run_dir`` holds another config and ``force`` is
            false.
        RunDirectoryError: ``run_dir`` is a file, lies under a file or is not
            writable.
    """
    check_config(config, source=source)
    config_text = config_lib.dump_config(config)
    leader = jax.process_index() == 0
    refused = None
    if leader:
        try:
            check_run_directory(run_dir, config_text, force=force)
        except (RunConflictError, RunDirectoryError) as error:
            refused = error
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        if multihost_utils.broadcast_one_to_all(np.int32(refused is not None)
                                                ) and not leader:
            raise RunDirectoryError(
                f"{run_dir}: the first process refused the run directory "
                "(see its message)")
    if refused is not None:
        raise refused
    units = _count_units(config)
    done = 0
    if on_progress is not None:
        on_progress("loading data and the pretrained model", done, units)
    enable_compilation_cache()
    if not leader:
        # The leader pretrains into the zoo (if needed) before anyone reads.
        _sync("recovjax-pretrained")
    experiment = Experiment(config, zoo_dir=zoo_dir, progress=progress)
    if leader:
        _sync("recovjax-pretrained")
    run = RunDirectory(run_dir, config_text, force=force) if leader else None
    if jax.process_count() > 1:
        run = _SharedRun(run)

    def tick(message: str) -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(message, done, units)

    if not run.has_part("clean"):
        run.write_part("clean", experiment.clean_rows())
    rows = list(run.read_part("clean"))
    clean_accuracy = next((r["value"] for r in rows
                           if r["metric"] == "accuracy"), math.nan)
    tick("clean model evaluated")

    damaged_accuracy: dict[tuple, float] = {}
    for damage in config.damage:
        label = damage.label or damage.kind
        name = f"damaged-{label}"
        if not run.has_part(name):
            kind_rows = []
            for index, chunk in enumerate(experiment.damage_chunks(damage)):
                kind_rows.extend(chunk.rows)
                run.write_part(f"{name}.chunk{index}", chunk.rows)
            run.write_part(name, kind_rows)
        kind_rows = run.read_part(name)
        rows.extend(kind_rows)
        if config.sweep.fault_lists and leader and damage_spec(
                damage.kind).kind != "activations":
            for file_name, faults in experiment.fault_lists(damage):
                target = run.path / file_name
                if not target.is_file():
                    save_faults(target, faults)
        for row in kind_rows:
            if row["metric"] == "accuracy":
                damaged_accuracy[(label, row["ratio"], row["seed"])] = (
                    row["value"])
        tick(f"swept {label}")

    costs = {"recovery": []}
    if config.recovery is not None:
        size = config.recovery.models_per_call
        for strategy in config.recovery.strategies:
            spec = strategy_spec(strategy)
            tag = strategy_label(strategy)
            built: dict[bool, Callable] = {}
            task = None
            for damage in config.damage:
                label = damage.label or damage.kind
                structural = damage_spec(damage.kind).kind == "structure"
                points = experiment.points(damage)
                groups = [points[i:i + size]
                          for i in range(0, len(points), size)]
                group_size = min(size, len(points))
                for index, group in enumerate(groups):
                    name = f"recovered-{tag}-{label}.{index}"
                    if not run.has_part(name):
                        if structural not in built:
                            built[structural] = _build_strategy(
                                spec, config.recovery, structural)
                        recover = built[structural]
                        if task is None:
                            task = experiment.recovery_data(
                                tag,
                                spec.data or config.recovery.data)
                        padded = _pad(group, group_size)
                        start = time.perf_counter()
                        outcome = experiment.recover(recover, task, damage,
                                                     padded)
                        seconds = time.perf_counter() - start
                        part_rows = _recovery_rows(
                            outcome, group, len(group), label=label,
                            strategy=tag, clean=clean_accuracy,
                            damaged=damaged_accuracy, task=experiment.task,
                            examples=experiment.test_examples)
                        run.write_part(name, part_rows)
                        trained = outcome.losses.shape[-1] > 0
                        memory = peak_memory()
                        flops = outcome.flops
                        costs["recovery"].append({
                            "damage": label, "strategy": tag,
                            "group": index, "models": len(group),
                            "ratios": sorted({r for _, r, _ in group}),
                            "seconds": round(seconds, 4),
                            "seconds_per_model": round(
                                seconds / len(group), 4),
                            "steps": int(outcome.losses.shape[-1]),
                            "flops_per_model": (None if flops is None or
                                                not math.isfinite(flops)
                                                else round(flops)),
                            "flops_per_step": (experiment.step_flops()
                                               if trained else None),
                            "labelled_samples": outcome.labelled,
                            "unlabelled_samples": outcome.unlabelled,
                            "trainable_params": int(outcome.trainable),
                            "bytes_read": int(outcome.bytes_read),
                            "restored_leaves": list(outcome.restored_leaves),
                            "peak_rss_mb": round(
                                memory.host_bytes / 2**20, 1),
                            "peak_device_mb": (None if memory.device_bytes
                                               is None else round(
                                                   memory.device_bytes
                                                   / 2**20, 1))})
                        run.write(f"costs/{name}.json",
                                  json.dumps(costs["recovery"][-1],
                                             sort_keys=True))
                    rows.extend(run.read_part(name))
                    tick(f"recovered {label} with {tag}")

    if not leader:
        _sync("recovjax-finished")
        return ResultsTable(rows=rows, config=config_lib.to_dict(config),
                            root_seed=config.seed, versions=_versions(),
                            device_kind=_device_kind(),
                            test_examples=experiment.test_examples)
    table = _write_results(run, rows, config, experiment.test_examples)
    run.write("costs.json", json.dumps(_all_costs(run), indent=1,
                                       sort_keys=True))
    _sync("recovjax-finished")
    from recovjax.report import write_report
    metric, higher_is_better = experiment.headline
    write_report(run.path, table.rows, threshold=config.report.threshold,
                 title=config.name, metric=metric,
                 higher_is_better=higher_is_better,
                 test_examples=table.test_examples)
    return table


def _sync(name: str) -> None:
    """Wait for every process (nothing to wait for in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class _SharedRun:
    """The run directory of a run on several processes (``jax.distributed``).

    Every process computes its share of each stage; only the first reads
    and writes the directory (``run`` is ``None`` on the others). Whether a
    part is done is the first process's answer, given to all, so every
    process skips the same finished work when a run resumes; the others
    keep the rows they computed in memory and write nothing.
    """

    def __init__(self, run: RunDirectory | None):
        self.run = run
        self._parts: dict[str, Any] = {}

    @property
    def path(self) -> pathlib.Path:
        return self.run.path

    def has_part(self, name: str) -> bool:
        from jax.experimental import multihost_utils
        mine = self.run is not None and self.run.has_part(name)
        return bool(multihost_utils.broadcast_one_to_all(np.int32(mine)))

    def read_part(self, name: str) -> Any:
        if self.run is None:
            return self._parts.get(name, [])
        return self.run.read_part(name)

    def write_part(self, name: str, value: Any) -> None:
        if self.run is None:
            self._parts[name] = value
        else:
            self.run.write_part(name, value)

    def write(self, name: str, data) -> None:
        if self.run is not None:
            self.run.write(name, data)


def _write_results(run: RunDirectory, rows: list[dict],
                   config: config_lib.ExperimentConfig,
                   test_examples: int | None = None) -> ResultsTable:
    """The tidy table, as ``results.csv`` and ``results.json``, and
    ``env.json``; ``test_examples`` goes into their metadata."""
    table = ResultsTable(
        rows=rows, config=config_lib.to_dict(config), root_seed=config.seed,
        versions=_versions(), device_kind=_device_kind(),
        test_examples=test_examples)
    table.to_csv(run.path / "results.csv")
    table.to_json(run.path / "results.json")
    run.write("env.json", json.dumps(environment(), indent=1, sort_keys=True))
    return table


def _all_costs(run: RunDirectory) -> dict[str, Any]:
    folder = run.path / "costs"
    records = [json.loads(path.read_text())
               for path in sorted(folder.glob("*.json"))] if folder.is_dir() \
        else []
    return {"recovery": records}


def _versions() -> dict[str, str]:
    from recovjax.pretrain import library_versions
    return library_versions()


def _device_kind() -> str:
    from recovjax.sweep import device_description
    return device_description()


def _count_units(config: config_lib.ExperimentConfig) -> int:
    units = 1 + len(config.damage)
    if config.recovery is not None:
        size = config.recovery.models_per_call
        for damage in config.damage:
            points = len(damage.ratios) * config.sweep.seeds
            units += len(config.recovery.strategies) * math.ceil(points / size)
    return units


def run_sensitivity(config: config_lib.ExperimentConfig,
                    run_dir: os.PathLike[str] | str, *,
                    layers: Sequence[str] | None = None, force: bool = False,
                    zoo_dir=None, progress: bool = True,
                    source: str | os.PathLike[str] | None = None
                    ) -> ResultsTable:
    """A sensitivity map of every damage kind of ``config`` into ``run_dir``.

    Each damage kind's amounts are the map's columns and ``layers`` its
    rows (default: every layer holding a kernel); seeds and batch size come
    from the config's ``sweep`` and ``evaluate``. The config's recovery is
    not run. Checks, run-directory rules and outputs are those of
    :func:`run_experiment` (``results.csv`` with a ``layer`` column, and a
    report with the layer x amount heatmap).

    Raises:
        ConfigError: see :func:`check_config`; a damage kind without
            per-leaf amounts, or an unknown layer (``layers: ...``).
        RunConflictError, RunDirectoryError: as :func:`run_experiment`.
    """
    from recovjax.sensitivity import _layer_leaves, model_layers, sensitivity
    config = dataclasses.replace(config, recovery=None)
    check_config(config, source=source)
    for index, damage in enumerate(config.damage):
        if not getattr(get_damage(damage.kind, **damage.options),
                       "per_leaf_amounts", False):
            raise config_lib.ConfigError(
                f"damage[{index}].kind: {damage.kind!r} takes one scalar "
                "amount; a sensitivity map needs parameter damage with "
                "per-leaf amounts (zero, gaussian_noise, bit_flip, ...)")
    config_text = (config_lib.dump_config(config)
                   + f"# sensitivity over layers: {list(layers or [])}\n")
    check_run_directory(run_dir, config_text, force=force)
    enable_compilation_cache()
    experiment = Experiment(config, zoo_dir=zoo_dir, progress=progress)
    chosen = (model_layers(experiment.model) if layers is None
              else list(layers))
    try:
        _layer_leaves(experiment.model, experiment.params, chosen)
    except ValueError as error:
        raise config_lib.ConfigError(str(error)) from None
    run = RunDirectory(run_dir, config_text, force=force)
    rows: list[dict] = []
    for position, damage in enumerate(config.damage):
        label = damage.label or damage.kind
        result = sensitivity(
            experiment.model, experiment.params,
            get_damage(damage.kind, **damage.options), list(damage.ratios),
            layers=chosen, seeds=config.sweep.seeds,
            data=experiment.batches, root_key=experiment.root,
            damage_name=label, batch_size=config.evaluate.batch_size)
        rows.extend(row for row in result.table.rows
                    if row["stage"] != "clean" or position == 0)
    table = _write_results(run, rows, config, experiment.test_examples)
    from recovjax.report import write_report
    metric, higher_is_better = experiment.headline
    write_report(run.path, table.rows, threshold=config.report.threshold,
                 title=config.name, metric=metric,
                 higher_is_better=higher_is_better,
                 test_examples=table.test_examples)
    return table
