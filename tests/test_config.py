"""Tests of recovjax.config: strict validation with useful messages."""

from __future__ import annotations

import dataclasses

import pytest

from recovjax.config import (ConfigError, dump_config, load_config)


def write(tmp_path, text: str):
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    return path


def test_defaults_and_round_trip(tmp_path):
    config = load_config()
    assert config.model == "lenet5" and config.dataset == "mnist5k"
    again = load_config(write(tmp_path, dump_config(config)))
    assert again == config


def test_file_values_and_overrides(tmp_path):
    path = write(tmp_path, "model: mlp\ndamage:\n  - kind: zero\n"
                 "    ratios: [0.1, 0.5]\nsweep:\n  seeds: 3\n")
    config = load_config(path, ["sweep.seeds=10",
                                "recovery.optimizer.learning_rate=0.01",
                                "damage.0.ratios=[0.2]"])
    assert config.model == "mlp" and config.sweep.seeds == 10
    assert config.recovery.optimizer.learning_rate == 0.01
    assert config.damage[0].ratios == (0.2,)


def test_unknown_key_suggests_closest_and_names_file(tmp_path):
    path = write(tmp_path, "sweep:\n  sedes: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message and "sweep.sedes" in message
    assert "did you mean 'seeds'?" in message


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"modle: unknown key; did you mean "
                       r"'model'\?"):
        load_config(write(tmp_path, "modle: lenet5\n"))


@pytest.mark.parametrize("text, pattern", [
    ("sweep:\n  seeds: three\n", r"sweep.seeds: expected an integer"),
    ("sweep:\n  seeds: 0\n", r"sweep.seeds: must be >= 1, got 0"),
    ("sweep:\n  seeds: true\n", r"sweep.seeds: expected an integer"),
    ("damage:\n  - ratios: [0.1, -0.5]\n", r"damage\[0\].ratios\[1\]: must "
     r"be >= 0.0"),
    ("recovery:\n  optimizer:\n    name: rmsprop\n",
     r"recovery.optimizer.name: expected one of 'sgd', 'adam', 'adamw'"),
    ("recovery:\n  data:\n    fraction: 1.5\n",
     r"recovery.data.fraction: must be <= 1.0"),
    ("recovery:\n  optimizer:\n    learning_rate: 0\n",
     r"learning_rate: must be > 0.0"),
    ("report:\n  threshold: .nan\n", r"report.threshold: must be finite"),
    ("sweep: 5\n", r"sweep: expected a mapping"),
])
def test_bad_types_and_ranges(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found") as error:
        load_config(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(error.value)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_unsafe_yaml_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: !!python/object/apply:os.system "
                                    "['echo hi']\n"))


@pytest.mark.parametrize("override, pattern", [
    ("sweep.seeds", "expected KEY=VALUE"),
    ("damage.7.kind=zero", "not an index"),
    ("sweep.seeds.x=1", "not a mapping"),
])
def test_bad_overrides(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_optimizer_names_come_from_one_list():
    import typing

    import optax

    from recovjax.config import OptimizerConfig
    from recovjax.recovery.registry import OPTIMIZER_NAMES, make_optimizer
    hint = typing.get_type_hints(OptimizerConfig)["name"]
    assert typing.get_args(hint) == OPTIMIZER_NAMES
    assert "adamw" in OPTIMIZER_NAMES
    for name in OPTIMIZER_NAMES:
        config = load_config(None, [f"recovery.optimizer.name={name}"])
        assert config.recovery.optimizer.name == name
        transform = make_optimizer(name, 1e-3, 0.9)
        assert isinstance(transform, optax.GradientTransformation)
    with pytest.raises(ValueError, match="valid: sgd, adam, adamw"):
        make_optimizer("rmsprop", 1e-3, None)


ALIAS_BOMB = """\
name: bomb
damage:
  - kind: zero
    options:
      a: &a [x, x, x, x, x, x, x, x, x, x]
      b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
      c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
      d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
      e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
      f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
      g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
      h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
      i: [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_alias_bomb_is_refused_quickly_naming_file_and_line(tmp_path):
    import time
    path = write(tmp_path, ALIAS_BOMB)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert message.startswith(f"{path}: line 5: ")
    assert "anchor '&a' refused" in message and "alias" in message


@pytest.mark.parametrize("text, pattern", [
    ("name: x\nmodel: &m lenet5\n", r"line 2: YAML anchor '&m' refused"),
    ("sweep: {seeds: 2}\nevaluate: *e\n", r"line 2: YAML alias '\*e' refused"),
    ("sweep:\n  seeds: 2\n  seeds: 3\n", r"line 3: key 'seeds' appears twice"),
    ("name: a\nname: b\n", r"line 2: key 'name' appears twice"),
])
def test_anchors_aliases_and_duplicate_keys_are_refused(tmp_path, text,
                                                        pattern):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: ")


def test_override_values_refuse_aliases_too():
    with pytest.raises(ConfigError, match=r"--set .*: line 1: YAML anchor"):
        load_config(None, ["damage.0.options={a: &a [1], b: *a}"])


def test_yaml_errors_name_the_line(tmp_path):
    path = write(tmp_path, "name: x\nsweep: {seeds: 2\nmodel: lenet5\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: line ") and "not valid YAML" in message
    assert "\n" not in message


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a config"):
        load_config(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"binary.yaml: not UTF-8 text"):
        load_config(binary)
    deep = write(tmp_path, "options: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply|not valid YAML"):
        load_config(deep)


@pytest.mark.parametrize("text, pattern", [
    ("name: a/b\n", r"name: is used as a file name and must not contain '/'"),
    ("name: ''\n", r"name: must be a non-empty file name"),
    ("name: ..\n", r"name: must be a non-empty file name"),
    ("damage:\n  - {kind: zero, label: ../x}\n",
     r"damage\[0\].label: is used as a file name"),
    ("recovery:\n  strategies: [{name: finetune, label: 'a\\\\b'}]\n",
     r"recovery.strategies\[0\].label: is used as a file name"),
    ("damage:\n  - {kind: zero, options: {1: 2}}\n",
     r"damage\[0\].options\[1\]: option names must be identifiers"),
    ("seed: 2147483648\n", r"seed: must be <= 2147483647"),
    ("sweep: {memory_budget_mb: 1.0e+300}\n",
     r"sweep.memory_budget_mb: must be <= "),
    ("0\n", r"the top level must be a mapping"),
    ("evaluate: {batch_size: 1000000000000}\n",
     r"evaluate.batch_size: must be <= 1048576"),
])
def test_more_bad_values(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_saved_config_has_no_aliases_and_loads_strictly(tmp_path):
    import datetime

    import yaml

    from recovjax.config import DamageConfig, ExperimentConfig, to_dict
    day = datetime.date(2020, 1, 2)  # a value safe_dump would alias
    config = ExperimentConfig(damage=(
        DamageConfig(options={"first": day, "second": day}),))
    assert "&id" in yaml.safe_dump(to_dict(config))
    text = dump_config(config)
    assert "&" not in text and "*" not in text
    assert load_config(write(tmp_path, text)) == config


# check_config: experiment-level validation against registries and model.

def checked(tmp_path, text: str):
    from recovjax.validation import check_config
    path = write(tmp_path, text)
    config = load_config(path)
    check_config(config, source=path)
    return path


def test_an_importance_target_validates_before_any_data_is_read(tmp_path):
    checked(tmp_path, "damage: [{kind: zero, ratios: [0.5], options: "
            "{scope: weights, target: wanda, calibration: 64}}]\n")
    with pytest.raises(ConfigError, match="calibration must be a positive"):
        checked(tmp_path, "damage: [{kind: zero, ratios: [0.5], options: "
                "{target: taylor, calibration: 0}}]\n")


@pytest.mark.parametrize("text, fragments", [
    ("model: lenet\n", ["model: unknown model 'lenet'", "lenet5"]),
    ("dataset: cifar10\n", ["dataset: dataset 'cifar10' is not prepared"]),
    ("dataset: imagenet\n", ["dataset: unknown dataset 'imagenet'"]),
    ("damage: [{kind: zero, options: {scope: conv9}}]\n",
     ["damage[0].options.scope", "'conv9' matches no leaf",
      "conv1/kernel", "lenet5"]),
    ("model: mlp\ndamage: [{kind: zero, options: {scope: conv1}}]\n",
     ["damage[0].options.scope", "model 'mlp'"]),
    ("damage: [{kind: zero, options: {scope: '('}}]\n",
     ["damage[0].options", "not a valid regular expression"]),
    ("damage: [{kind: zero, options: {scope: 3}}]\n",
     ["damage[0].options", "scope"]),
    ("damage: [{kind: zero, options: {mode: 3}}]\n",
     ["damage[0].options.mode: expected one of 'exact', 'bernoulli', got 3"]),
    ("damage: [{kind: zero, options: {sope: weights}}]\n",
     ["damage[0].options.sope: damage 'zero' has no option 'sope'",
      "did you mean 'scope'?"]),
    ("damage: [{kind: remove_heads}]\n",
     ["damage[0]: damage 'remove_heads' does not apply to model 'lenet5'"]),
    ("damage: [{kind: remove_neurons, options: {layers: [conv1, conv7]}}]\n",
     ["damage[0]", "conv7"]),
    ("damage: [{kind: drop_blocks}]\n", ["damage[0]", "block pattern"]),
    ("damage: [{kind: label_noise}]\n", ["damage[0].kind", "damages data"]),
    ("recovery: {strategies: [{name: finetune, options: {stpes: 3}}]}\n",
     ["recovery.strategies[0].options.stpes", "did you mean 'steps'?"]),
    ("recovery: {strategies: [{name: finetune, options: {steps: 0}}]}\n",
     ["recovery.strategies[0].options.steps: must be >= 1"]),
    ("recovery: {strategies: [{name: finetune, options: {steps: 2.5}}]}\n",
     ["recovery.strategies[0].options.steps: expected an integer or null"]),
    ("recovery: {strategies: [{name: distill, options: "
     "{temperature: -1}}]}\n",
     ["recovery.strategies[0].options.temperature: must be a finite"]),
    ("recovery: {strategies: [{name: finetune, options: "
     "{optimizer: rmsprop}}]}\n",
     ["recovery.strategies[0].options.optimizer: expected one of 'sgd'"]),
    ("recovery: {strategies: [{name: finetune, options: "
     "{steps: 3, epochs: 1}}]}\n",
     ["recovery.strategies[0].options: give steps or epochs, not both"]),
    ("recovery: {strategies: [{name: restore_leaves, options: "
     "{leaves: conv1}}]}\n",
     ["recovery.strategies[0].options.leaves: expected a list of"]),
    ("damage: [{kind: remove_neurons}]\n"
     "recovery: {strategies: [finetune_damaged]}\n",
     ["recovery.strategies[0]", "structural damage"]),
    ("recovery: {data: {damage: zero}}\n",
     ["recovery.data.damage: 'zero' is not a data damage"]),
    ("recovery: {data: {damage: label_noise, amount: 2}}\n",
     ["recovery.data.amount", "fractions in [0, 1]"]),
    ("recovery: {data: {damage: label_noise, amount: 0.1, "
     "options: {mapping: {0: 12}}}}\n",
     ["recovery.data.options", "12"]),
    ("recovery: {data: {options: {mode: exact}}}\n",
     ["recovery.data.options: set without recovery.data.damage"]),
    ("recovery: {strategies: [{name: finetune, data: {damage: input_noise, "
     "amount: 0.1, options: {scale: 2}}}]}\n",
     ["recovery.strategies[0].data.options.scale",
      "damage 'input_noise' has no option 'scale'"]),
    ("damage: [{kind: activation_bit_flip}]\n"
     "recovery: {strategies: [finetune]}\n",
     ["damage[0].kind: 'activation_bit_flip' corrupts activations",
      "no recovery section"]),
    ("damage: [{kind: bit_position_flip, ratios: [30, 2.5]}]\n",
     ["damage[0].ratios", "bit positions (whole numbers)"]),
    ("damage: [{kind: bit_search, ratios: [1.5]}]\n",
     ["damage[0].ratios", "numbers of flips (whole numbers)"]),
    ("damage: [{kind: activation_zero, options: {sites: [conv9]}}]\n",
     ["damage[0]", "no site 'conv9'", "conv1, conv2, fc1, fc2, fc3"]),
    ("damage: [{kind: activation_bit_flip, options: "
     "{range_restriction: wrap}}]\n",
     ["damage[0].options.range_restriction: expected one of 'clip', "
      "'zero' or null"]),
    ("damage: [{kind: rowhammer, options: {format: int4}}]\n",
     ["damage[0]", "int4 codes are 4 bits"]),
    ("damage: [{kind: activation_bit_flip, ratios: [0.01], "
     "options: {max_rate: 0.001}}]\n",
     ["damage[0].ratios", "rates up to options.max_rate=0.001"]),
    ("damage: [{kind: replay, ratios: [1], options: {path: /nope.st}}]\n",
     ["damage[0].options", "/nope.st: no fault list there"]),
    ("damage: [{kind: mixed_faults, options: {activations: "
     "[{kind: zero}]}}]\n",
     ["damage[0].options", "activations[0]: 'zero' is params damage, not "
      "activations"]),
    ("damage: [{kind: mixed_faults, options: {activations: "
     "[{kind: activation_zero, options: {sites: [fc9]}}]}}]\n",
     ["damage[0]", "no site 'fc9'"]),
    ("sweep: {outcomes: true}\nevaluate: {stream: true}\n",
     ["sweep.outcomes", "evaluate.stream is set"]),
])
def test_check_config_names_the_key_and_file(tmp_path, text, fragments):
    with pytest.raises(ConfigError) as error:
        checked(tmp_path, text)
    message = str(error.value)
    assert message.startswith(str(tmp_path / "experiment.yaml") + ": ")
    for fragment in fragments:
        assert fragment in message, message


def test_check_config_accepts_every_shipped_config():
    import glob

    from recovjax.validation import check_config
    paths = sorted(glob.glob("experiments/*.yaml")) + [
        "recovjax/configs/demo.yaml"]
    assert len(paths) > 5
    for path in paths:
        config = load_config(path)
        with open(path) as handle:
            if "recovjax sweep --config" in handle.read():
                # Run by `recovjax sweep`, which drops the recovery section.
                config = dataclasses.replace(config, recovery=None)
        check_config(config, source=path)


def test_strategy_steps_option_replaces_the_budget_length(tmp_path):
    from recovjax.validation import strategy_arguments
    path = checked(tmp_path, "recovery:\n  steps: 80\n  strategies:\n"
                   "    - {name: finetune, options: {epochs: 1}}\n")
    config = load_config(path)
    arguments = strategy_arguments(config.recovery.strategies[0],
                                    config.recovery, False)
    assert arguments["epochs"] == 1 and "steps" not in arguments


def test_dataset_features_match_the_loaded_dataset(mnist, tmp_path):
    from recovjax.data.loading import dataset_features, dataset_prepared
    assert dataset_features("mnist5k") == (mnist.train.images.shape[1:],
                                           mnist.num_classes)
    assert dataset_prepared("mnist5k")
    assert not dataset_prepared("cifar10", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="not prepared"):
        dataset_features("cifar10", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_prepared("imagenet")
