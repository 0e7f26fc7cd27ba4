"""The seed's experiment end to end, on a data subset, and its config."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from recovjax.damage import get_damage
from recovjax.recovery.seed import (load_config, mean_ci95,
                                    run_seed_experiment)

CONFIG = pathlib.Path(__file__).parent.parent / "experiments" / (
    "seed_mnist.yaml")


def zero_op():
    """The registry's exact-count ``zero`` damage (the seed's damage)."""
    return get_damage("zero")


def test_seed_experiment_runs_end_to_end_on_a_subset(small_mnist,
                                                     trained_lenet):
    arguments = load_config(CONFIG)
    arguments.update(seeds=2, steps=15, train_size=300, test_size=200,
                     ratio=0.3, dataset=small_mnist,
                     pretrained_params=trained_lenet, damage_op=zero_op())
    result = run_seed_experiment(**arguments)
    assert result.seeds == (0, 1)
    assert result.damaged_accuracy.shape == (2,)
    assert result.recovered_accuracy.shape == (2,)
    assert np.all(result.damaged_accuracy < result.clean_accuracy)
    assert not result.diverged.any()
    # Recovery: the fine-tune lowers the test loss of both damaged models.
    damaged_loss = [row["value"] for row in result.rows
                    if row["stage"] == "damaged" and row["metric"] == "loss"]
    assert np.all(result.recovered_loss < np.asarray(damaged_loss))
    assert result.config["learning_rate"] == 0.001
    assert result.config["momentum"] == 0.9
    assert result.config["batch_size"] == 100
    assert result.config["test_examples"] == 200
    stages = {row["stage"] for row in result.rows}
    assert stages == {"clean", "damaged", "recovered"}
    assert "clean" in result.describe() and "±" in result.describe()
    summary = result.summary()
    assert summary["clean"][0] == pytest.approx(result.clean_accuracy)


def test_config_is_the_seeds_recipe():
    arguments = load_config(CONFIG)
    assert arguments["seeds"] == 10 and arguments["first_seed"] == 0
    assert (arguments["model"], arguments["dataset"]) == ("lenet5", "mnist5k")
    assert arguments["ratio"] == 0.1
    assert arguments["damage_options"].get("scope", "all") == "all"
    assert arguments["learning_rate"] == 0.001
    assert arguments["momentum"] == 0.9
    assert arguments["batch_size"] == 100
    assert arguments["epochs"] == 2 and arguments["steps"] is None
    assert arguments["pretrained_seed"] == 0


def test_config_errors_are_clear():
    from recovjax.config import ConfigError
    with pytest.raises(ValueError, match="exactly one damage entry of kind "
                       "'zero'"):
        load_config(CONFIG, ("damage.0.kind=sign_flip",))
    with pytest.raises(ValueError, match="one damage ratio"):
        load_config(CONFIG, ("damage.0.ratios=[0.1, 0.2]",))
    with pytest.raises(ValueError, match="recovers by fine-tuning"):
        load_config(CONFIG, ("recovery.strategies=[distill]",))
    with pytest.raises(ValueError, match="with SGD"):
        load_config(CONFIG, ("recovery.optimizer.name=adam",))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(CONFIG.with_name("missing.yaml"))
    with pytest.raises(ValueError, match="seeds must be a positive int"):
        run_seed_experiment(0)


def test_mean_ci95_uses_the_t_quantile():
    values = np.arange(10.0)
    mean, half = mean_ci95(values)
    assert mean == 4.5
    assert half == pytest.approx(2.262 * values.std(ddof=1) / np.sqrt(10))
    assert np.isnan(mean_ci95([1.0])[1])
