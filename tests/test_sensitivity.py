"""Sensitivity maps: one layer damaged at a time, all points in one program."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import recovjax
from recovjax.damage import get_damage
from recovjax.sensitivity import model_layers, sensitivity


@pytest.fixture(scope="module")
def noise_map(lenet, trained_lenet, small_mnist):
    return sensitivity(lenet, trained_lenet, "gaussian_noise", [0.5, 1.0],
                       seeds=3, data=small_mnist.test, root_key=0)


def test_first_conv_is_more_fragile_than_the_last_dense(noise_map, lenet):
    layers = model_layers(lenet)
    assert noise_map.layers == layers
    first, last = layers[0], layers[-1]
    assert (first, last) == ("conv1", "fc3")
    grid = noise_map.grid("accuracy")
    assert grid.shape == (len(layers), 2)
    # The same relative noise costs the first convolution more accuracy.
    assert (grid[0] < grid[-1]).all(), grid
    clean = noise_map.table.select(stage="clean", metric="accuracy")
    assert len(clean) == 1 and (grid <= clean[0]["value"] + 1e-6).all()


def test_a_point_damages_its_layer_as_the_whole_model_point_does(
        noise_map, lenet, trained_lenet, small_mnist):
    from recovjax.data import batch_split
    from recovjax.evaluate import evaluate
    from recovjax.sweep import point_key
    layer = noise_map.layers[1]
    op = get_damage("gaussian_noise")
    key = point_key(jax.random.key(0), "gaussian_noise", 1, 2)
    hot = {name: {leaf: (1.0 if name == layer else 0.0) for leaf in leaves}
           for name, leaves in trained_lenet.items()}
    damaged = op(key, trained_lenet, hot, info=lenet.info)
    whole = op(key, trained_lenet, 1.0, info=lenet.info)
    # the layer gets the whole-model point's draws; the rest is intact
    for name in trained_lenet:
        for leaf in trained_lenet[name]:
            expected = (whole.params if name == layer else
                        trained_lenet)[name][leaf]
            np.testing.assert_array_equal(damaged.params[name][leaf],
                                          expected)
    accuracy = evaluate(lenet.forward, damaged.params,
                        batch_split(small_mnist.test, 100), 10).accuracy
    (mapped,) = noise_map.table.select(stage="damaged", metric="accuracy",
                                       layer=layer, ratio=1.0, seed=2)
    assert mapped["value"] == pytest.approx(float(accuracy), abs=1e-6)


def test_one_compiled_program_for_every_point(lenet, trained_lenet,
                                              small_mnist):
    traced = []
    op = get_damage("zero")

    def counting(key, params, amount, **kwargs):
        traced.append(1)
        return op(key, params, amount, **kwargs)

    counting.per_leaf_amounts = True
    result = sensitivity(lenet, trained_lenet, counting, [0.1, 0.3, 0.5],
                         damage_name="zero", seeds=2,
                         data=small_mnist.test)
    assert len(traced) == 1
    layer_rows = {row["layer"] for row in result.table.rows}
    assert layer_rows == set(result.layers) | {""}


def test_bad_arguments_are_named(lenet, trained_lenet, small_mnist):
    with pytest.raises(ValueError, match="layers: 'nope' is not a layer"):
        sensitivity(lenet, trained_lenet, "zero", [0.1], layers=["nope"],
                    data=small_mnist.test)
    with pytest.raises(ValueError, match="takes one scalar amount"):
        sensitivity(lenet, trained_lenet, "remove_neurons", [0.1],
                    data=small_mnist.test)
    with pytest.raises(ValueError, match="ratios"):
        sensitivity(lenet, trained_lenet, "zero", [1.5],
                    data=small_mnist.test)


def test_the_public_names_are_pinned():
    assert recovjax.sensitivity is sensitivity
    assert recovjax.use_all_cores is not None
    assert recovjax.recover_damage.__module__ == "recovjax.recovery.points"
