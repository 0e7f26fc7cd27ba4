"""Experiment configs: YAML (safe loading), validated strictly.

A config is a tree of frozen dataclasses. Loading checks every key against
the schema (an unknown key is an error that suggests the closest valid
one), every value's type and range, and names the key and the file in each
message. ``--set a.b=value`` overrides are applied before validation, so they
are checked the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
import types
import typing
from typing import Any, Literal, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the file and the key."""


def _field(default=dataclasses.MISSING, *, low=None, high=None,
           low_open=False, help: str = "", factory=dataclasses.MISSING):
    metadata = {"low": low, "high": high, "low_open": low_open, "help": help}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class DamageConfig:
    """One damage kind of a sweep."""

    kind: str = _field("zero", help="damage operator name (recovjax list)")
    ratios: tuple[float, ...] = _field((0.1,), low=0.0,
                                       help="amounts to sweep")
    options: dict[str, Any] = _field(factory=dict,
                                     help="operator options, e.g. scope")
    label: str | None = _field(None, help="name in results (default: kind)")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Seeds and chunking of the damage sweep."""

    seeds: int = _field(5, low=1, help="seeds per (kind, ratio)")
    chunk_size: int | None = _field(None, low=1,
                                    help="models per compiled call")
    memory_budget_mb: float = _field(512.0, low=1.0)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation data."""

    batch_size: int = _field(100, low=1)
    test_examples: int | None = _field(None, low=1,
                                       help="use the first N test images")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """An optax optimiser."""

    name: Literal["sgd", "adam", "adamw"] = _field("sgd")
    learning_rate: float = _field(1e-3, low=0.0, low_open=True)
    momentum: float | None = _field(0.9, low=0.0, high=1.0)


@dataclasses.dataclass(frozen=True)
class RecoveryDataConfig:
    """What recovery trains on."""

    fraction: float = _field(1.0, low=0.0, high=1.0, low_open=True,
                             help="data budget: fraction of the train split")
    damage: str | None = _field(
        None, help="data-damage operator applied to the recovery data")
    amount: float = _field(0.0, low=0.0, help="its amount")
    options: dict[str, Any] = _field(factory=dict,
                                     help="data-damage operator options")
    train_examples: int | None = _field(None, low=1)


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """One recovery strategy; a plain string in YAML means ``{name: ...}``."""

    name: str = _field("finetune", help="registry name; 'a+b' composes")
    label: str | None = _field(None, help="name in results (default: name)")
    options: dict[str, Any] = _field(factory=dict,
                                     help="strategy options")
    data: RecoveryDataConfig | None = _field(
        None, help="recovery data of this strategy (default: recovery.data)")


@dataclasses.dataclass(frozen=True)
class RecoveryConfig:
    """Recovery strategies and their training budget."""

    strategies: tuple[str | StrategyConfig, ...] = _field(("finetune",))
    models_per_call: int = _field(32, low=1,
                                  help="damaged models recovered per call")
    optimizer: OptimizerConfig = _field(factory=OptimizerConfig)
    batch_size: int = _field(100, low=1)
    epochs: int | None = _field(2, low=1)
    steps: int | None = _field(None, low=1,
                               help="fixed step budget (overrides epochs)")
    eval_every: int = _field(20, low=1, help="recovery-curve interval")
    data: RecoveryDataConfig = _field(factory=RecoveryDataConfig)


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Report settings."""

    threshold: float = _field(0.5, low=0.0, high=1.0,
                              help="accuracy threshold for ratio@threshold")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: what to damage, how to recover, what to report."""

    name: str = _field("experiment")
    model: str = _field("lenet5")
    dataset: str = _field("mnist5k")
    data_dir: str | None = _field(None)
    pretrain_seed: int = _field(0, low=0)
    seed: int = _field(0, low=0, help="root seed of damage and recovery")
    damage: tuple[DamageConfig, ...] = _field(
        factory=lambda: (DamageConfig(),))
    sweep: SweepConfig = _field(factory=SweepConfig)
    evaluate: EvaluateConfig = _field(factory=EvaluateConfig)
    recovery: RecoveryConfig | None = _field(factory=RecoveryConfig)
    report: ReportConfig = _field(factory=ReportConfig)


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    return {type(None): "null", bool: "a boolean", int: "an integer",
            float: "a number", str: "a string"}.get(
                annotation, getattr(annotation, "__name__", str(annotation)))


class _Loader:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}")

    def build(self, cls, raw: Any, prefix: str):
        if not isinstance(raw, Mapping):
            raise self.fail(prefix or "<top level>",
                            f"expected a mapping, got {raw!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in raw.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = (f"; did you mean {close[0]!r}?" if close else
                        f"; valid keys: {', '.join(fields)}")
                raise self.fail(path, f"unknown key{hint}")
            values[key] = self.convert(hints[key], value, path,
                                       fields[key].metadata)
        return cls(**values)

    def convert(self, annotation, value, path: str, metadata):
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            errors = []
            options = [a for a in args if a is not type(None)]
            if isinstance(value, Mapping):
                # A mapping can only mean a section: report its own errors.
                options = [a for a in options if dataclasses.is_dataclass(a)
                           or typing.get_origin(a) is dict] or options
            for option in options:
                try:
                    return self.convert(option, value, path, metadata)
                except ConfigError as error:
                    errors.append(error)
            if len(errors) == 1:
                raise errors[0]
            raise self.fail(path, f"expected {_type_name(annotation)}, "
                                  f"got {value!r}")
        if origin is Literal:
            if value not in args:
                close = difflib.get_close_matches(str(value),
                                                  [str(a) for a in args], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise self.fail(path, f"expected {_type_name(annotation)}, "
                                      f"got {value!r}{hint}")
            return value
        if dataclasses.is_dataclass(annotation):
            return self.build(annotation, value, path)
        if origin is tuple:
            items = value if isinstance(value, (list, tuple)) else [value]
            if not items:
                raise self.fail(path, "must not be empty")
            return tuple(self.convert(args[0], item, f"{path}[{index}]",
                                      metadata)
                         for index, item in enumerate(items))
        if origin is dict:
            if not isinstance(value, Mapping):
                raise self.fail(path, f"expected a mapping, got {value!r}")
            return dict(value)
        if annotation is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(path, f"expected a number, got {value!r}")
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise self.fail(path, f"must be finite, got {value!r}")
        elif annotation is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(path, f"expected an integer, got {value!r}")
        elif annotation is str:
            if not isinstance(value, str):
                raise self.fail(path, f"expected a string, got {value!r}")
        elif annotation is bool:
            if not isinstance(value, bool):
                raise self.fail(path, f"expected true or false, got {value!r}")
        low, high = metadata.get("low"), metadata.get("high")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if low is not None and (value < low or (
                    metadata.get("low_open") and value == low)):
                side = ">" if metadata.get("low_open") else ">="
                raise self.fail(path, f"must be {side} {low}, got {value!r}")
            if high is not None and value > high:
                raise self.fail(path, f"must be <= {high}, got {value!r}")
        return value


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to ``raw``.

    List elements are addressed by index: ``damage.0.ratios=[0.1, 0.2]``.

    Raises:
        ConfigError: for a malformed override.
    """
    raw = yaml.safe_load(yaml.safe_dump(raw)) if raw else {}
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {override!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {override!r}: bad value ({error})")
        node = raw
        parts = key.strip().split(".")
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {override!r}: {part!r} is not "
                                      f"an index of a list of {len(node)}")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {override!r}: "
                                  f"{'.'.join(parts[:index])} is not a mapping")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and part not in node:
                    node[part] = {}
                node = node[part]
    return raw


def _merge(base: Any, update: Any) -> Any:
    """``update`` over ``base``: mappings merge key by key, the rest replace."""
    if isinstance(base, dict) and isinstance(update, dict):
        merged = dict(base)
        for key, value in update.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return update


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load, override and validate an experiment config.

    Args:
        path: a YAML file, or ``None`` for the defaults.
        overrides: ``key.sub=value`` strings (``--set`` on the CLI).

    Returns:
        The validated :class:`ExperimentConfig`.

    Raises:
        ConfigError: missing or unreadable file, bad YAML, unknown key (with
            the closest valid key), wrong type or out-of-range value; the
            message names the file and the key.
    """
    source = "<defaults>"
    raw: Any = {}
    if path is not None:
        file = pathlib.Path(path)
        source = str(file)
        if not file.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{source}: not valid YAML ({error})") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    if overrides:
        # Overrides address the resolved config, so `damage.0.ratios=...`
        # works even when the file relies on the default damage list.
        raw = apply_overrides(_merge(to_dict(ExperimentConfig()), raw),
                              overrides)
        source = f"{source} (with --set overrides)"
    return _Loader(source).build(ExperimentConfig, raw, "")


def to_dict(config) -> Any:
    """A config as plain YAML/JSON-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name))
                for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(item) for item in config]
    if isinstance(config, dict):
        return {key: to_dict(value) for key, value in config.items()}
    return config


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML text (stable key order)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
