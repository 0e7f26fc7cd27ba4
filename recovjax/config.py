"""Experiment configs: YAML (safe loading), validated strictly.

A config is a tree of frozen dataclasses. Loading checks every key against
the schema (an unknown key is an error that suggests the closest valid
one), every value's type and range, and names the key and the file in each
message. ``--set a.b=value`` overrides are applied before validation, so they
are checked the same way.

YAML anchors and aliases (``&name`` / ``*name``) are refused: an alias
expands to a copy of its anchor wherever the config is walked or written,
so a few nested aliases (an "alias bomb") grow to gigabytes. Duplicate keys
in one mapping are refused too (YAML would silently keep the last one).
Names that become file names (``name``, labels) must be plain file names.
Checks against the registries (operator names, options, the model's
parameter leaves) live in :func:`recovjax.validation.check_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import pathlib
import re
import types
import typing
from collections import abc
from typing import Any, Literal, Mapping, Sequence

import yaml

from recovjax._checks import MAX_SEED

from recovjax.recovery.registry import OPTIMIZER_NAMES


class ConfigError(ValueError):
    """A config problem; the message names the file and the key."""


SEED_MAX = MAX_SEED - 1
"""Largest accepted seed: the library's seed range (``recovjax._checks``)."""

COUNT_MAX = 2**20
"""Largest batch size or seed count: a sanity bound, far above any real
run, so a typo (a few extra zeros) is an error rather than an attempt to
allocate petabytes."""


def _field(default=dataclasses.MISSING, *, low=None, high=None,
           low_open=False, help: str = "", factory=dataclasses.MISSING,
           file_name: bool = False):
    metadata = {"low": low, "high": high, "low_open": low_open, "help": help,
                "file_name": file_name}
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
    label: str | None = _field(None, help="name in results (default: kind)",
                               file_name=True)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Seeds and chunking of the damage sweep."""

    seeds: int = _field(5, low=1, high=COUNT_MAX,
                        help="seeds per (kind, ratio)")
    chunk_size: int | None = _field(None, low=1,
                                    help="models per compiled call")
    memory_budget_mb: float = _field(512.0, low=1.0, high=1e9)
    model_devices: int = _field(
        1, low=1, high=COUNT_MAX,
        help="devices each damaged model is split over (a points x model "
             "mesh); divides the device count")
    outcomes: bool = _field(
        False, help="classify every example of every point as masked, SDC "
                    "or DUE against the clean model's top-1 (outcome/* "
                    "rows; in-memory classification data)")
    fault_lists: bool = _field(
        False, help="write each point's concrete faults to faults/<label>/"
                    "r<ratio index>_s<seed>.safetensors (parameter damage; "
                    "read back with recovjax.damage.replay)")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation data."""

    batch_size: int = _field(100, low=1, high=COUNT_MAX)
    test_examples: int | None = _field(None, low=1,
                                       help="use the first N test images")
    stream: bool = _field(
        False, help="sweeps read the test split block by block from its "
                    "TFDS source instead of loading it (TFDS-built "
                    "classification datasets)")
    block_batches: int = _field(4, low=1, high=COUNT_MAX,
                                help="batches per streamed block")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """An optax optimiser."""

    name: Literal[OPTIMIZER_NAMES] = _field(
        "sgd", help="optax optimiser (recovery.registry.OPTIMIZER_NAMES)")
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
    label: str | None = _field(None, help="name in results (default: name)",
                               file_name=True)
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
    batch_size: int = _field(100, low=1, high=COUNT_MAX)
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

    name: str = _field("experiment", file_name=True,
                       help="default run directory: runs/<name>")
    model: str = _field("lenet5", help="a registered name or a factory "
                        "'module.path:callable'")
    weights: str | None = _field(None, help="the model's weights: an Orbax "
                                 "checkpoint, .safetensors or .npz")
    weights_layout: Literal["native", "torch"] = _field(
        "native", help="'torch': PyTorch names and layouts")
    dataset: str = _field("mnist5k", help="a registered name or an .npz of "
                          "images and labels")
    dataset_options: dict[str, Any] = _field(
        factory=dict, help="options of a text dataset, e.g. "
        "sequence_length and max_file_bytes for pysource")
    task: str | None = _field(None, help="a registered task name "
                              "(default: the model's own task)")
    task_options: dict[str, Any] = _field(
        factory=dict, help="the task's options, e.g. vocab_size")
    data_dir: str | None = _field(None)
    pretrain_seed: int = _field(0, low=0, high=SEED_MAX)
    seed: int = _field(0, low=0, high=SEED_MAX,
                       help="root seed of damage and recovery")
    damage: tuple[DamageConfig, ...] = _field(
        factory=lambda: (DamageConfig(),))
    sweep: SweepConfig = _field(factory=SweepConfig)
    evaluate: EvaluateConfig = _field(factory=EvaluateConfig)
    recovery: RecoveryConfig | None = _field(factory=RecoveryConfig)
    report: ReportConfig = _field(factory=ReportConfig)


def _is_sequence(origin) -> bool:
    return origin in (tuple, list) or (
        isinstance(origin, type) and issubclass(origin, abc.Sequence)
        and not issubclass(origin, (str, bytes)))


def _is_mapping(origin) -> bool:
    return isinstance(origin, type) and issubclass(origin, abc.Mapping)


def _in_yaml(annotation) -> bool:
    """Whether a YAML value can have this type (not a Python-only class)."""
    origin = typing.get_origin(annotation) or annotation
    return (annotation in (None, type(None), bool, int, float, str)
            or origin is Literal or _is_sequence(origin)
            or _is_mapping(origin) or dataclasses.is_dataclass(annotation)
            or origin in (typing.Union, types.UnionType))


def describe_type(annotation) -> str:
    """A type annotation in words, for error messages (``"an integer"``).

    Union members no YAML value can be (Python classes, forward
    references) are left out, so an option typed ``str | re.Pattern``
    reads "a string".
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        shown = [a for a in args if _in_yaml(a)] or list(args)
        return " or ".join(describe_type(a) for a in shown)
    if _is_sequence(origin):
        if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis):
            inner = describe_type(args[0])
            return (f"a list of ({inner})" if " or " in inner
                    else f"a list of {inner}")
        if args:
            return "a list [" + ", ".join(describe_type(a) for a in args) \
                + "]"
        return "a list"
    if _is_mapping(origin) or _is_mapping(annotation):
        if len(args) == 2:
            return (f"a mapping of {describe_type(args[0])} to "
                    f"{describe_type(args[1])}")
        return "a mapping"
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    if isinstance(annotation, typing.ForwardRef):
        return annotation.__forward_arg__
    return {type(None): "null", None: "null", bool: "a boolean",
            int: "an integer", float: "a number", str: "a string"}.get(
                annotation, getattr(annotation, "__name__", str(annotation)))


def check_file_name(value: str) -> str | None:
    """Why ``value`` cannot be used as a file name, or ``None`` if it can."""
    if not value or value in (".", ".."):
        return "must be a non-empty file name (not '.' or '..')"
    bad = sorted({c for c in value if c in "/\\" or ord(c) < 32
                  or ord(c) == 127})
    if bad:
        return (f"is used as a file name and must not contain "
                f"{', '.join(repr(c) for c in bad)}")
    return None


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _key_path(prefix: str, key: Any) -> str:
    """``prefix.key``, or ``prefix['odd key']`` for keys that are not plain
    names (empty, spaces, numbers), so messages always show the key."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{prefix}.{key}" if prefix else key
    return f"{prefix}[{key!r}]"


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
            path = _key_path(prefix, key)
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
            raise self.fail(path, f"expected {describe_type(annotation)}, "
                                  f"got {value!r}")
        if origin is Literal:
            if value not in args:
                close = difflib.get_close_matches(str(value),
                                                  [str(a) for a in args], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise self.fail(path, f"expected {describe_type(annotation)}, "
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
            for key in value:
                if not isinstance(key, str) or not key.isidentifier():
                    raise self.fail(_key_path(path, key), "option names "
                                    f"must be identifiers, got {key!r}")
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
            problem = (check_file_name(value) if metadata.get("file_name")
                       else None)
            if problem:
                raise self.fail(path, f"{problem}, got {value!r}")
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


class _Refused(Exception):
    """YAML this loader refuses, at a line of the text."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line
        self.message = message


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors, aliases or duplicate keys."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(event.start_mark.line + 1,
                           f"YAML alias '*{event.anchor}' refused: aliases "
                           "can expand exponentially (an alias bomb); write "
                           "the value out instead")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _Refused(event.start_mark.line + 1,
                           f"YAML anchor '&{anchor}' refused: configs may "
                           "not use anchors or aliases (they can expand "
                           "exponentially); write the values out instead")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise _Refused(key_node.start_mark.line + 1,
                                   f"key {key_node.value!r} appears twice in "
                                   "one mapping")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """Parse config YAML safely: no tags beyond YAML's own, no aliases.

    Args:
        text: the YAML text.
        source: what to call it in messages (a file name).

    Returns:
        The parsed value (plain dicts, lists and scalars).

    Raises:
        ConfigError: for invalid YAML, python tags, anchors, aliases or
            duplicate keys; the message names ``source`` and the line.
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except _Refused as error:
        raise ConfigError(f"{source}: line {error.line}: "
                          f"{error.message}") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        what = "; ".join(part for part in (error.context, error.problem)
                         if part) or str(error)
        raise ConfigError(f"{source}: {where}not valid YAML ({what})"
                          ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({error})") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML (nested too deeply)"
                          ) from None


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to ``raw``.

    List elements are addressed by index: ``damage.0.ratios=[0.1, 0.2]``.

    Raises:
        ConfigError: for a malformed override.
    """
    raw = copy.deepcopy(raw) if raw else {}
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {override!r}: expected KEY=VALUE")
        value = parse_yaml(text, f"--set {override!r}")
        node = raw
        parts = key.strip().split(".")
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            if isinstance(node, list):
                if not part.isdecimal() or int(part) >= len(node):
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
        ConfigError: missing or unreadable file, bad YAML (anchors and
            aliases included), unknown key (with the closest valid key),
            wrong type or out-of-range value; the message names the file and
            the key (or the line).
    """
    source = "<defaults>"
    raw: Any = {}
    if path is not None:
        file = pathlib.Path(path)
        source = str(file)
        if file.is_dir():
            raise ConfigError(f"{source}: is a directory, not a config file")
        if not file.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"{source}: not UTF-8 text (byte "
                              f"{error.start})") from None
        except OSError as error:
            raise ConfigError(f"{source}: cannot be read "
                              f"({error.strerror or error})") from None
        raw = parse_yaml(text, source)
        if raw is None:
            raw = {}
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


class _PlainDumper(yaml.SafeDumper):
    """Writes repeated values out in full: saved configs load strictly."""

    def ignore_aliases(self, data) -> bool:
        return True


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML text (stable key order, no aliases)."""
    return yaml.dump(to_dict(config), Dumper=_PlainDumper, sort_keys=False)
