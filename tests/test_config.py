"""Tests of recovjax.config: strict validation with useful messages."""

from __future__ import annotations

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
