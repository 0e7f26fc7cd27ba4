"""Fuzzing of config loading: mutated shipped configs never crash the loader.

The seeds are the shipped configs (``experiments/*.yaml`` and the packaged
demo). Hypothesis mutates their parsed trees (keys, values, types, nesting)
and their YAML text (characters, lines, indentation). Whatever comes out,
:func:`recovjax.config.load_config` either returns a config or raises a
:class:`~recovjax.config.ConfigError` that names the file and a key (or a
line of the file), and a loaded config goes through
:func:`recovjax.validation.check_config` raising nothing but ``ConfigError``
and through ``dump_config`` back to a loadable file.
"""

from __future__ import annotations

import copy
import pathlib
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recovjax.config import ConfigError, dump_config, load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEEDS = sorted((ROOT / "experiments").glob("*.yaml")) + [
    ROOT / "recovjax" / "configs" / "demo.yaml"]
TEXTS = {path.name: path.read_text() for path in SEEDS}
TREES = {name: yaml.safe_load(text) for name, text in TEXTS.items()}

# Words the schema and registries know, so mutations often hit real keys
# and names (and so get past the first check) rather than only noise.
WORDS = sorted({
    "name", "model", "dataset", "data_dir", "pretrain_seed", "seed",
    "damage", "kind", "ratios", "options", "label", "sweep", "seeds",
    "chunk_size", "memory_budget_mb", "evaluate", "batch_size",
    "test_examples", "recovery", "strategies", "models_per_call",
    "optimizer", "learning_rate", "momentum", "epochs", "steps",
    "eval_every", "data", "fraction", "amount", "train_examples", "report",
    "threshold", "scope", "mode", "ratio_over", "target", "bits", "layers",
    "pattern", "relative", "mapping", "leaves", "block_size", "temperature",
    "structural", "weights", "all", "exact", "bernoulli", "largest",
    "smallest", "exponent", "conv1", "fc1/kernel", "block\\d+", "lenet5",
    "mlp", "rescnn", "vit", "mnist5k", "cifar10", "zero", "bit_flip",
    "remove_neurons", "remove_heads", "drop_blocks", "label_noise",
    "drop_samples", "finetune", "finetune_damaged", "restore_entries",
    "restore_leaves+finetune", "distill", "sgd", "adam", "adamw"})

SCALARS = (st.none() | st.booleans()
           | st.integers(min_value=-3, max_value=12)
           | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0.0, 0.5, 1.0, 1.5, 1e-6, -0.1])
           | st.sampled_from(WORDS) | st.text(max_size=6))
VALUES = st.recursive(
    SCALARS, lambda inner: (st.lists(inner, max_size=3)
                            | st.dictionaries(st.sampled_from(WORDS)
                                              | st.text(max_size=4),
                                              inner, max_size=3)),
    max_leaves=6)
KEYS = st.sampled_from(WORDS) | st.text(max_size=5) | st.integers(0, 3)

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


def _paths(node, prefix=()):
    """Every (path, node) in a tree of dicts and lists, the root first."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


def _mutate(data, tree):
    """One random edit of ``tree``: replace, delete, insert, rename, wrap."""
    paths = list(_paths(tree))
    path, node = data.draw(st.sampled_from(paths), label="node")
    operation = data.draw(st.sampled_from(
        ["replace", "delete", "insert", "rename", "wrap", "unwrap",
         "stringify"]), label="operation")
    if operation == "insert" and isinstance(node, (dict, list)):
        value = data.draw(VALUES, label="value")
        if isinstance(node, dict):
            node[data.draw(KEYS, label="key")] = value
        else:
            node.insert(data.draw(st.integers(0, len(node))), value)
        return tree
    if operation == "rename" and isinstance(node, dict) and node:
        old = data.draw(st.sampled_from(list(node)), label="old key")
        node[data.draw(KEYS, label="new key")] = node.pop(old)
        return tree
    if not path:
        return data.draw(VALUES, label="root") if operation == "replace" \
            else tree
    parent = tree
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if operation == "delete":
        del parent[last]
    elif operation == "wrap":
        parent[last] = [node]
    elif operation == "unwrap" and isinstance(node, list) and node:
        parent[last] = node[0]
    elif operation == "stringify":
        parent[last] = str(node)
    else:
        parent[last] = data.draw(VALUES, label="value")
    return tree


SNIPPETS = st.sampled_from(
    [":", ": ", "-", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "!!str ",
     "!!python/name:os.system", "? ", "|", ">", "#", "'", '"', "\n", "  ",
     "\t", "%YAML 1.1\n", "---\n", "...\n", "<<: ", "~", "null", "1e999",
     ".nan", "0x1F", "2020-01-01", "\\", "\x00", "\u2028"]) | st.text(
         max_size=4)


def _mutate_text(data, text: str) -> str:
    lines = text.split("\n")
    operation = data.draw(st.sampled_from(
        ["insert", "delete", "duplicate_line", "drop_line", "indent",
         "dedent", "swap_lines"]), label="text operation")
    if operation == "insert":
        at = data.draw(st.integers(0, len(text)), label="at")
        return text[:at] + data.draw(SNIPPETS, label="snippet") + text[at:]
    if operation == "delete":
        at = data.draw(st.integers(0, max(len(text) - 1, 0)), label="at")
        size = data.draw(st.integers(1, 8), label="size")
        return text[:at] + text[at + size:]
    index = data.draw(st.integers(0, len(lines) - 1), label="line")
    if operation == "duplicate_line":
        lines.insert(index, lines[index])
    elif operation == "drop_line":
        del lines[index]
    elif operation == "indent":
        lines[index] = "  " + lines[index]
    elif operation == "dedent":
        lines[index] = lines[index][2:] if lines[index].startswith("  ") \
            else lines[index]
    else:
        other = data.draw(st.integers(0, len(lines) - 1), label="other")
        lines[index], lines[other] = lines[other], lines[index]
    return "\n".join(lines)


WHOLE_FILE = re.compile(r"(line \d+: |not valid YAML|not UTF-8 text|"
                        r"the top level must be a mapping)")


def _assert_names_file_and_key(error: ConfigError, path: pathlib.Path):
    message = str(error)
    assert message.startswith(f"{path}: "), message
    rest = message[len(f"{path}: "):]
    if WHOLE_FILE.match(rest):
        return
    key, separator, problem = rest.partition(": ")
    assert separator and key.strip() and problem.strip(), message


def _load_or_refuse(path: pathlib.Path):
    """The fuzz property of ``load_config``; a loaded config, or ``None``."""
    try:
        config = load_config(path)
    except ConfigError as error:
        _assert_names_file_and_key(error, path)
        return None
    saved = path.with_suffix(".saved.yaml")
    saved.write_text(dump_config(config))
    load_config(saved)  # what `recovjax report` reads back
    return config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=st.data())
def test_mutated_trees_load_or_fail_with_config_error(folder, data):
    name = data.draw(st.sampled_from(sorted(TREES)), label="seed config")
    tree = copy.deepcopy(TREES[name])
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        tree = _mutate(data, tree)
    path = folder / "tree.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    _load_or_refuse(path)


@FUZZ
@given(data=st.data())
def test_mutated_text_loads_or_fails_with_config_error(folder, data):
    name = data.draw(st.sampled_from(sorted(TEXTS)), label="seed config")
    text = TEXTS[name]
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        text = _mutate_text(data, text)
    path = folder / "text.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _load_or_refuse(path)


OPTION_VALUES = (SCALARS | st.lists(SCALARS, max_size=3)
                 | st.lists(st.lists(st.integers(-1, 12) | st.sampled_from(
                     WORDS), max_size=2), max_size=2)
                 | st.dictionaries(st.integers(-1, 12), st.integers(-1, 12),
                                   max_size=2))
NAMES = st.sampled_from(WORDS)


def _mutate_names(data, tree):
    """An edit the schema accepts but the registries may not: names,
    option names and option values of damage, strategies and data."""
    if not isinstance(tree, dict):
        return tree
    target = data.draw(st.sampled_from(
        ["model", "dataset", "kind", "damage option", "strategy",
         "strategy option", "data"]), label="target")
    damage = tree.setdefault("damage", [{"kind": "zero"}])
    recovery = tree.get("recovery") or {}
    if target in ("model", "dataset"):
        tree[target] = data.draw(NAMES, label=target)
    elif target == "kind" and damage:
        damage[0]["kind"] = data.draw(NAMES, label="kind")
    elif target == "damage option" and damage:
        options = damage[-1].setdefault("options", {})
        options[data.draw(NAMES, label="option")] = data.draw(
            OPTION_VALUES, label="option value")
    elif target == "strategy":
        tree["recovery"] = dict(recovery, strategies=[data.draw(
            NAMES, label="strategy")])
    elif target == "strategy option":
        tree["recovery"] = dict(recovery, strategies=[{
            "name": data.draw(NAMES, label="strategy"),
            "options": {data.draw(NAMES, label="option"): data.draw(
                OPTION_VALUES, label="option value")}}])
    else:
        tree["recovery"] = dict(recovery, data={
            "damage": data.draw(NAMES, label="data damage"),
            "amount": data.draw(st.sampled_from([0.0, 0.3, 1.0, 2.0])),
            "options": {data.draw(NAMES, label="option"): data.draw(
                OPTION_VALUES, label="option value")}})
    return tree


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_loaded_configs_pass_check_config_or_fail_with_config_error(
        folder, data):
    from recovjax.validation import check_config
    name = data.draw(st.sampled_from(sorted(TREES)), label="seed config")
    tree = copy.deepcopy(TREES[name])
    for _ in range(data.draw(st.integers(1, 2), label="edits")):
        tree = _mutate_names(data, tree)
    if data.draw(st.booleans(), label="also mutate the tree"):
        tree = _mutate(data, tree)
    path = folder / "checked.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    config = _load_or_refuse(path)
    if config is None:
        return
    try:
        check_config(config, source=path)
    except ConfigError as error:
        _assert_names_file_and_key(error, path)
