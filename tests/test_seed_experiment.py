"""The seed's experiment end to end, on a data subset, and its config."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax._types import Damage
from recovjax.recovery.seed import (config_arguments, load_config, mean_ci95,
                                    run_seed_experiment)

CONFIG = pathlib.Path(__file__).parent.parent / "experiments" / (
    "seed_mnist.yaml")


def zero_op():
    """The registry's exact-count ``zero`` damage, or a local stand-in."""
    try:
        from recovjax.damage import get_damage
        return get_damage("zero")
    except ImportError:
        return _local_zero


def _local_zero(key, params, amount):
    """Zero exactly floor(n * amount) random entries of every leaf."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    damaged, masks = [], []
    for leaf_key, leaf in zip(keys, leaves):
        count = jnp.floor(leaf.size * amount + 1e-6)
        rank = jnp.argsort(jax.random.permutation(leaf_key, leaf.size))
        mask = (rank < count).reshape(leaf.shape)
        damaged.append(jnp.where(mask, jnp.zeros_like(leaf), leaf))
        masks.append(mask)
    return Damage(jax.tree.unflatten(treedef, damaged),
                  jax.tree.unflatten(treedef, masks))


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
    assert arguments == {"model": "lenet5", "dataset": "mnist5k",
                         "pretrained_seed": 0, "seeds": 10, "ratio": 0.1,
                         "learning_rate": 0.001, "momentum": 0.9,
                         "batch_size": 100, "epochs": 2}


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="zeroes weights"):
        config_arguments({"damage": {"name": "noise"}})
    with pytest.raises(ValueError, match="unknown config keys.*'colour'"):
        config_arguments({"colour": "blue"})
    with pytest.raises(ValueError, match="recovers by fine-tuning"):
        config_arguments({"recovery": {"strategy": "distill"}})
    with pytest.raises(FileNotFoundError):
        load_config(CONFIG.with_name("missing.yaml"))
    with pytest.raises(ValueError, match="seeds must be a positive int"):
        run_seed_experiment(0)


def test_mean_ci95_uses_the_t_quantile():
    values = np.arange(10.0)
    mean, half = mean_ci95(values)
    assert mean == 4.5
    assert half == pytest.approx(2.262 * values.std(ddof=1) / np.sqrt(10))
    assert np.isnan(mean_ci95([1.0])[1])
