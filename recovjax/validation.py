"""Checks of a loaded experiment config, before any work is done.

:func:`check_config` finds what a run would otherwise find wrong only after
some work: names against the registries, option names and types, option
values (each operator and strategy is built as the run builds it), scopes
and structural damage against the model's abstract parameters, and data
damage against the dataset's classes. The CLI calls it before it claims a
run directory, so a config that fails leaves nothing behind.
"""

from __future__ import annotations


import difflib
import inspect
import math
import os
import types
import typing
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from recovjax import checkpoints, sources
from recovjax import config as config_lib
from recovjax.damage import damage_spec, get_damage
from recovjax.damage.registry import WHOLE_NUMBERS
from recovjax.damage.scope import select_leaves
from recovjax.models import model_names
from recovjax import tasks as tasks_lib
from recovjax.tasks import general_task
from recovjax.recovery import get_strategy
from recovjax.recovery.registry import (OPTIMIZER_NAMES, strategy_factory,
                                        strategy_options)


def strategy_label(strategy: str | config_lib.StrategyConfig) -> str:
    """The name a strategy's results are recorded under."""
    if isinstance(strategy, str):
        return strategy
    return strategy.label or strategy.name


def strategy_spec(strategy: str | config_lib.StrategyConfig
                  ) -> config_lib.StrategyConfig:
    """A strategy entry of a config as a :class:`StrategyConfig`."""
    if isinstance(strategy, str):
        return config_lib.StrategyConfig(name=strategy)
    return strategy


def check_config(config: config_lib.ExperimentConfig,
                 source: str | os.PathLike[str] | None = None) -> None:
    """Check a loaded config against the registries, the model and the data.

    What a run would otherwise find wrong only after some work is found
    here, without loading data or training: model and dataset names (and
    whether a catalogue dataset is prepared), damage and strategy names,
    their option names and types, option values (each operator and
    strategy is built as the run builds it), each model damage traced on
    the model's abstract parameters (so a scope, layer chain or block
    pattern that matches nothing in the model is reported now), and each
    data damage run once on a few dummy examples (so class mappings are
    checked against the dataset's classes).

    Args:
        config: a config from :func:`recovjax.config.load_config`.
        source: the config file, named in messages.

    Raises:
        ConfigError: naming the key (and ``source``) of the first problem.
    """
    try:
        _check(config)
    except config_lib.ConfigError as error:
        if source is None:
            raise
        raise config_lib.ConfigError(f"{source}: {error}") from None


def _check_stream(config: config_lib.ExperimentConfig, task) -> None:
    from recovjax.data.loading import CATALOGUE, EMBEDDED
    if task is not None:
        raise config_lib.ConfigError(
            f"evaluate.stream: streams classification data; the model "
            f"{config.model!r} has the task {task.name!r} (leave stream "
            "out)")
    if config.dataset not in EMBEDDED + CATALOGUE:
        raise config_lib.ConfigError(
            f"evaluate.stream: dataset {config.dataset!r} is not built by "
            f"TFDS; stream one of {', '.join(EMBEDDED + CATALOGUE)}, or "
            "leave stream out to load it")


_USER_ERRORS = (ValueError, TypeError, KeyError, IndexError)
"""What building or tracing an operator raises for options that do not fit."""


def _fail(where: str, error: BaseException | str) -> config_lib.ConfigError:
    text = str(error) if not isinstance(error, KeyError) else (
        f"missing key {error}")
    return config_lib.ConfigError(f"{where}: {text}")


def _check(config: config_lib.ExperimentConfig) -> None:
    if not sources.is_import_path(config.model) and (
            config.model not in model_names()):
        raise _fail("model", f"unknown model {config.model!r}; valid names: "
                    f"{', '.join(model_names())}, or a factory "
                    "'module.path:callable'")
    try:
        sample, num_classes = sources.dataset_sample(
            config.dataset, config.data_dir, config.dataset_options)
    except (ValueError, OSError) as error:
        if str(error).startswith("dataset_options:"):
            raise config_lib.ConfigError(str(error)) from None
        raise _fail("dataset", error) from None
    except Exception as error:  # e.g. a truncated dataset_info.json
        raise _fail("dataset", f"{config.dataset!r}: cannot read its "
                    f"prepared description ({type(error).__name__}: "
                    f"{error})") from None
    inputs = (f"token windows of shape {tuple(sample.shape[1:])}"
              if jnp.issubdtype(sample.dtype, jnp.integer) else
              f"images of shape {tuple(sample.shape[1:])}")
    try:
        model = sources.resolve_model(config.model, num_classes, sample)
    except _USER_ERRORS as error:
        raise _fail("model", error) from None
    try:
        model = sources.resolve_task(model, config.task, config.task_options)
        task = general_task(model)
    except _USER_ERRORS as error:
        where = "task_options" if config.task is None else "task"
        raise _fail(where, error) from None
    try:
        model = sources.with_weights(model, config.weights,
                                     config.weights_layout)
    except (OSError, ValueError, checkpoints.CheckpointError) as error:
        raise _fail("weights", error) from None
    try:
        abstract = model.abstract_params()
        if task is None and model.num_classes != num_classes:
            raise ValueError(f"it gives {model.num_classes} outputs, not "
                             f"the dataset's {num_classes} classes")
    except _USER_ERRORS as error:
        raise _fail("model", f"{config.model!r} does not take "
                    f"{config.dataset!r} {inputs}: {error}") from None
    if config.evaluate.stream:
        _check_stream(config, task)
    if config.sweep.outcomes and (config.evaluate.stream or task is not None):
        raise config_lib.ConfigError(
            "sweep.outcomes: masked/SDC/DUE outcomes compare the top-1 "
            "class of every example with the clean model's, which needs "
            "classification data in memory" + (
                " (evaluate.stream is set)" if config.evaluate.stream else
                f" (the task is {task.name!r})"))
    devices = jax.device_count()
    if devices % config.sweep.model_devices:
        raise config_lib.ConfigError(
            f"sweep.model_devices: {config.sweep.model_devices} does not "
            f"divide the {devices} devices here (see recovjax.use_all_cores "
            "and JAX_NUM_CPU_DEVICES)")
    if task is not None:
        _check_task(config, model, task, abstract, sample)
    elif jnp.issubdtype(sample.dtype, jnp.integer):
        raise config_lib.ConfigError(
            f"task: dataset {config.dataset!r} holds token windows and the "
            f"model {config.model!r} is a classifier; name a task that reads "
            "tokens (task: language_model) or a model built with one")
    labels: set[str] = set()
    for index, damage in enumerate(config.damage):
        if task is not None and damage_spec(damage.kind).kind == "params" \
                and damage_spec(damage.kind).amount_name == "flips":
            raise config_lib.ConfigError(
                f"damage[{index}].kind: {damage.kind!r} attacks a "
                "classifier's loss on labelled images; the task is "
                f"{task.name!r}")
        _check_damage(f"damage[{index}]", damage, abstract, model.info,
                      config.model, model, sample)
        label = damage.label or damage.kind
        if label in labels:
            raise config_lib.ConfigError(
                f"damage[{index}]: damage label {label!r} is used twice; "
                "set label")
        labels.add(label)
    if config.recovery is None:
        return
    for index, damage in enumerate(config.damage):
        if damage_spec(damage.kind).kind == "activations":
            raise config_lib.ConfigError(
                f"damage[{index}].kind: {damage.kind!r} corrupts activations "
                "while the model runs, which no parameter recovery undoes; "
                "sweep it (recovjax sweep, no recovery section), or protect "
                "the model with range restriction "
                "(recovjax.damage.activations.profile_ranges)")
    recovery = config.recovery
    structural = sorted({damage_spec(d.kind).kind == "structure"
                         for d in config.damage})
    images = sample
    checked: set[str] = set()
    if task is not None:
        for where, data in [("recovery.data", recovery.data)] + [
                (f"recovery.strategies[{index}].data",
                 strategy_spec(strategy).data)
                for index, strategy in enumerate(recovery.strategies)]:
            if data is not None and data.damage is not None:
                raise config_lib.ConfigError(
                    f"{where}.damage: data damage applies to image "
                    f"classification; task {task.name!r} recovers on its "
                    "own data (leave damage out)")
    _check_data(recovery.data, "recovery.data", images, num_classes, checked)
    seen = set()
    for index, strategy in enumerate(recovery.strategies):
        spec = strategy_spec(strategy)
        where = f"recovery.strategies[{index}]"
        _check_strategy(where, spec, recovery, structural)
        if strategy_label(strategy) in seen:
            raise config_lib.ConfigError(
                f"{where}: strategy label {strategy_label(strategy)!r} is used twice")
        seen.add(strategy_label(strategy))
        if spec.data is not None:
            _check_data(spec.data, f"{where}.data", images, num_classes,
                        checked)


def _check_task(config, model, task, abstract, sample) -> None:
    """The task reads the dataset's examples, and the model's outputs fit
    its loss (traced on shapes only)."""
    dataset = sources.resolve_dataset(config.dataset, config.data_dir,
                                      config.dataset_options)
    batch = sources.task_examples(dataset, dataset.test, 1)
    try:
        tasks_lib.check_batch(task, batch, "dataset")
        jax.eval_shape(lambda p, b: task.loss(
            model.forward(p, task.inputs(b)), b), abstract, batch)
    except _USER_ERRORS as error:
        raise _fail("task", f"task {task.name!r} on dataset "
                    f"{config.dataset!r} with model {config.model!r}: "
                    f"{error}") from None


def _check_damage(where: str, damage: config_lib.DamageConfig, abstract,
                  info, model: str, model_object=None, sample=None) -> None:
    try:
        spec = damage_spec(damage.kind)
    except ValueError as error:
        raise _fail(f"{where}.kind", error) from None
    if spec.kind == "data":
        raise config_lib.ConfigError(
            f"{where}.kind: {damage.kind!r} damages data, not the model; "
            "put it under recovery.data.damage (or a strategy's data)")
    _check_amounts_and_options(f"{where}.ratios", spec, list(damage.ratios),
                               f"{where}.options", damage.options)
    try:
        op = get_damage(damage.kind, **damage.options)
    except _USER_ERRORS as error:
        raise _fail(f"{where}.options", error) from None
    if "scope" in spec.options:
        scope = damage.options.get(
            "scope", inspect.signature(spec.factory).parameters[
                "scope"].default)
        try:
            select_leaves(abstract, scope, info)
        except _USER_ERRORS as error:
            raise _fail(f"{where}.options.scope", f"{error} (model "
                        f"{model!r})") from None
    amount = jax.ShapeDtypeStruct((), jnp.float32)
    try:
        limit = getattr(op, "max_rate", None)
        if limit is not None and max(damage.ratios) > limit:
            raise config_lib.ConfigError(
                f"{where}.ratios: {damage.kind!r} samples its faults for "
                f"rates up to options.max_rate={limit}, got "
                f"{max(damage.ratios)}")
        if spec.kind == "activations":
            # The faulty forward pass on one batch shaped like the data
            # (range restriction's bounds are profiled when it runs).
            op = op.unprofiled()
            jax.eval_shape(lambda params, ratio: op.apply(
                model_object, jax.random.key(0), ratio)(params, sample),
                abstract, amount)
        else:
            if hasattr(op, "unscored"):  # scored on data when it runs
                op = op.unscored()
            elif hasattr(op, "bind"):  # bound to attack data when it runs
                count = op.attack_examples
                op = op.bind(model_object, jnp.zeros(
                    (count,) + tuple(sample.shape[1:]), sample.dtype),
                    jnp.zeros((count,), jnp.int32))
            jax.eval_shape(lambda params, ratio: op(
                jax.random.key(0), params, ratio, info=info), abstract,
                amount)
    except _USER_ERRORS as error:
        options = f" with options {damage.options}" if damage.options else ""
        raise _fail(where, f"damage {damage.kind!r}{options} does not "
                    f"apply to model {model!r}: {error}") from None


def _check_amounts_and_options(amount_key: str, spec, amounts: Any,
                               options_key: str,
                               options: Mapping[str, Any]) -> None:
    """A damage entry's amounts (a list, or one) and its option names and
    types, against the operator's registry entry ``spec``."""
    values = amounts if isinstance(amounts, list) else [amounts]
    if spec.amount_name in WHOLE_NUMBERS and any(
            float(value) != int(value) for value in values):
        what = ("bit positions" if spec.amount_name == "position"
                else f"numbers of {spec.amount_name}")
        raise config_lib.ConfigError(
            f"{amount_key}: the amounts of {spec.name!r} are {what} (whole "
            f"numbers), got {amounts}")
    if spec.amount_is_fraction and any(value > 1 for value in values):
        raise config_lib.ConfigError(
            f"{amount_key}: {spec.amount_name}s of {spec.name!r} are "
            f"fractions in [0, 1], got {amounts}")
    _check_option_names(options_key, f"damage {spec.name!r}", spec.options,
                        options)
    _check_option_types(options_key, [spec.factory], options)


def _check_data(data: config_lib.RecoveryDataConfig, where: str,
                images: jax.ShapeDtypeStruct, num_classes: int,
                checked: set[str]) -> None:
    if data.damage is None:
        if data.options:
            raise config_lib.ConfigError(
                f"{where}.options: set without {where}.damage")
        return
    try:
        spec = damage_spec(data.damage)
    except ValueError as error:
        raise _fail(f"{where}.damage", error) from None
    if spec.kind != "data":
        raise config_lib.ConfigError(
            f"{where}.damage: {data.damage!r} is not a data damage (it "
            "damages the model; put it under damage)")
    _check_amounts_and_options(f"{where}.amount", spec, data.amount,
                               f"{where}.options", data.options)
    key = repr((data.damage, sorted(data.options.items(), key=str)))
    if key in checked:
        return
    checked.add(key)
    try:
        op = get_damage(data.damage, **data.options)
        # Data damage runs eagerly on host data; a few dummy examples (every
        # class present) check the options against the number of classes.
        count = 2 * num_classes
        op(jax.random.key(0), jnp.zeros((count, *images.shape[1:]),
                                        jnp.float32),
           jnp.arange(count, dtype=jnp.int32) % num_classes,
           min(data.amount, 1.0), num_classes=num_classes)
    except _USER_ERRORS as error:
        raise _fail(f"{where}.options", error) from None


_COUNTS = ("batch_size", "steps", "epochs", "eval_every", "block_size")
_POSITIVE = ("learning_rate", "temperature")


def _check_strategy(where: str, spec: config_lib.StrategyConfig,
                    recovery: config_lib.RecoveryConfig,
                    structural: Sequence[bool]) -> None:
    try:
        accepted = strategy_options(spec.name)
    except ValueError as error:
        raise _fail(where, error) from None
    _check_option_names(f"{where}.options", f"strategy {spec.name!r}",
                        sorted(accepted), spec.options)
    optimizer = spec.options.get("optimizer")
    if isinstance(optimizer, str) and optimizer not in OPTIMIZER_NAMES:
        raise config_lib.ConfigError(
            f"{where}.options.optimizer: expected one of "
            f"{', '.join(repr(n) for n in OPTIMIZER_NAMES)}, got "
            f"{optimizer!r}")
    parts = [part.strip() for part in spec.name.split("+")]
    _check_option_types(f"{where}.options",
                        [strategy_factory(part) for part in parts],
                        spec.options)
    for flag in structural:
        options = strategy_arguments(spec, recovery, flag)
        for name, value in options.items():
            key = f"{where}.options.{name}"
            if name in _COUNTS and value is not None and value < 1:
                raise config_lib.ConfigError(f"{key}: must be >= 1, got "
                                             f"{value!r}")
            if name in _POSITIVE and not (math.isfinite(value)
                                          and value > 0):
                raise config_lib.ConfigError(f"{key}: must be a finite "
                                             f"number > 0, got {value!r}")
            if name == "momentum" and not 0 <= value <= 1:
                raise config_lib.ConfigError(f"{key}: must lie in [0, 1], "
                                             f"got {value!r}")
        if options.get("steps") is not None and (
                options.get("epochs") is not None):
            raise config_lib.ConfigError(
                f"{where}.options: give steps or epochs, not both")
        try:
            get_strategy(spec.name, **options)
        except _USER_ERRORS as error:
            damage = " (with structural damage)" if flag else ""
            raise _fail(where, f"{error}{damage}") from None


def _check_option_names(where: str, owner: str, valid: Sequence[str],
                        options: Mapping[str, Any]) -> None:
    for name in options:
        if name not in valid:
            close = difflib.get_close_matches(str(name), list(valid), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise config_lib.ConfigError(
                f"{where}.{name}: {owner} has no option {name!r}; {hint}"
                f"valid options: {', '.join(valid) or 'none'}")


def _option_hints(factory: Callable) -> dict[str, Any]:
    """Resolved annotations of a factory's options; unresolvable ones are
    left out (their values are checked by the factory itself)."""
    try:
        return typing.get_type_hints(factory)
    except Exception:  # an annotation that names an unimported module
        hints = {}
        for name, parameter in inspect.signature(factory).parameters.items():
            annotation = parameter.annotation
            if isinstance(annotation, str):
                try:  # library source text, never config input
                    annotation = eval(annotation,  # noqa: S307
                                      factory.__globals__)
                except Exception:
                    continue
            if annotation is not inspect.Parameter.empty:
                hints[name] = annotation
        return hints


def _check_option_types(where: str, factories: Sequence[Callable],
                        options: Mapping[str, Any]) -> None:
    for factory in factories:
        hints = _option_hints(factory)
        for name, value in options.items():
            if name in hints and not _matches(value, hints[name]):
                raise config_lib.ConfigError(
                    f"{where}.{name}: expected "
                    f"{config_lib.describe_type(hints[name])}, got "
                    f"{value!r}")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a type hint (unknown hints match)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or isinstance(hint, (typing.ForwardRef, str)):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, (int, float))
                and not isinstance(value, bool))
    if hint is str:
        return isinstance(value, str)
    container = origin if isinstance(origin, type) else hint
    if isinstance(container, type) and issubclass(container, Mapping):
        if not isinstance(value, Mapping):
            return False
        if len(args) == 2:
            return all(_matches(k, args[0]) and _matches(v, args[1])
                       for k, v in value.items())
        return True
    if isinstance(container, type) and issubclass(container, Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if container is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(
                _matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if isinstance(container, type):
        return isinstance(value, container)
    return True


def strategy_arguments(spec: config_lib.StrategyConfig,
                        recovery: config_lib.RecoveryConfig,
                        structural: bool) -> dict[str, Any]:
    """The options a strategy is built with: the recovery budget (what the
    strategy accepts of it), then the strategy's own options over it; a
    strategy's own ``steps`` or ``epochs`` replaces the budget's length."""
    accepted = strategy_options(spec.name)
    optimizer = recovery.optimizer
    budget = {"optimizer": optimizer.name,
              "learning_rate": optimizer.learning_rate,
              "momentum": optimizer.momentum or 0.0,
              "batch_size": recovery.batch_size,
              "eval_every": recovery.eval_every}
    if not {"steps", "epochs"} & set(spec.options):
        if recovery.steps is not None:
            budget["steps"] = recovery.steps
        else:
            budget["epochs"] = recovery.epochs
    if structural:
        budget["structural"] = True
    options = {k: v for k, v in budget.items() if k in accepted}
    options.update(spec.options)
    return options
