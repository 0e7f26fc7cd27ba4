"""The seed's experiment end to end, on a data subset, and its config."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from recovjax.damage import get_damage
from recovjax import stats
from recovjax.recovery.seed import (SeedExperimentResult, load_config,
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
    text = result.describe()
    assert "clean" in text and "±" not in text and "bootstrap" in text
    summary = result.summary()
    assert summary["clean"].estimate == pytest.approx(result.clean_accuracy)
    assert summary["clean"].method == stats.WILSON
    assert summary["clean"].n == 200


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


def _result(damaged, recovered, clean=0.97, test_examples=1000):
    count = len(damaged)
    return SeedExperimentResult(
        seeds=tuple(range(count)), clean_accuracy=clean,
        damaged_accuracy=np.asarray(damaged),
        recovered_accuracy=np.asarray(recovered),
        recovered_loss=np.zeros(count), diverged=np.zeros(count, bool),
        rows=[], seconds=0.0,
        config={"model": "lenet5", "dataset": "mnist5k", "ratio": 0.1,
                "test_examples": test_examples})


def test_summary_uses_the_statistics_module():
    result = _result([0.1, 0.97, 0.97], [0.5, 0.97, 0.96])
    summary = result.summary()
    assert summary["damaged"] == stats.bootstrap_mean([0.1, 0.97, 0.97])
    for interval in summary.values():
        assert 0.0 <= interval.low <= interval.estimate <= interval.high <= 1
    assert summary["clean"] == stats.wilson_interval(0.97, 1000)
    text = result.describe()
    assert "damaged   accuracy 0.6800 [0.1000, 0.9700]" in text
    assert "bootstrap percentile" in text and "Wilson" in text
    # Seeds 1 and 2 are within test noise of clean: 1 of 3 ratios defined.
    assert "recovery ratio 0.460 (mean over the 1/3 seeds" in text


def test_describe_says_when_every_ratio_is_within_noise():
    text = _result([0.968, 0.969], [0.97, 0.97]).describe()
    assert "recovery ratio undefined" in text and "test noise" in text
