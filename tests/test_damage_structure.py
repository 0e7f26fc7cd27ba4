"""Structural damage: removed units, blocks and heads are really absent."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _tolerance import (LENET5_TERMS, assert_sums_close,
                        lenet5_logit_magnitude)
from conftest import tree_equal
from recovjax.damage import (drop_blocks, infer_layers, make_drop_blocks,
                             make_remove_connections, make_remove_heads,
                             make_remove_neurons, remove_heads,
                             remove_neurons, silence_removed)
from recovjax.models import get_model
from recovjax.models.networks import ResidualBlock, SelfAttention
from recovjax.models.layers import conv2d, max_pool_2x2

IMAGES = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(
    np.float32)


def _random_params(model, seed):
    # Random values of the model's shapes (no init compile), with non-zero
    # biases so that a forgotten bias would show in the logits.
    rng = np.random.default_rng(seed)
    shapes = model.abstract_params(IMAGES)
    return jax.tree.map(lambda leaf: jnp.asarray(
        rng.normal(scale=0.3, size=leaf.shape).astype(np.float32)), shapes)


@pytest.fixture(scope="module")
def lenet_params(lenet):
    return _random_params(lenet, 0)


@jax.jit
def _lenet_forward(params, x):
    # LeNet-5 written out with whatever channel counts the params have.
    x = max_pool_2x2(jax.nn.relu(conv2d(x, params["conv1"]["kernel"],
                                        params["conv1"]["bias"])))
    x = max_pool_2x2(jax.nn.relu(conv2d(x, params["conv2"]["kernel"],
                                        params["conv2"]["bias"])))
    x = x.reshape(x.shape[0], -1)
    for name in ("fc1", "fc2"):
        x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
    return x @ params["fc3"]["kernel"] + params["fc3"]["bias"]


def _kept(mask_bias):
    return np.flatnonzero(~np.asarray(mask_bias))


def _shrink(params, mask):
    # The LeNet with removed units physically deleted.
    keep = {name: _kept(mask[name]["bias"])
            for name in ("conv1", "conv2", "fc1", "fc2")}
    p = jax.tree.map(np.asarray, params)
    fc1 = p["fc1"]["kernel"].reshape(4, 4, 16, -1)[:, :, keep["conv2"], :]
    return {
        "conv1": {"kernel": p["conv1"]["kernel"][..., keep["conv1"]],
                  "bias": p["conv1"]["bias"][keep["conv1"]]},
        "conv2": {"kernel": p["conv2"]["kernel"][:, :, keep["conv1"], :][
            ..., keep["conv2"]], "bias": p["conv2"]["bias"][keep["conv2"]]},
        "fc1": {"kernel": fc1.reshape(-1, 120)[:, keep["fc1"]],
                "bias": p["fc1"]["bias"][keep["fc1"]]},
        "fc2": {"kernel": p["fc2"]["kernel"][keep["fc1"]][:, keep["fc2"]],
                "bias": p["fc2"]["bias"][keep["fc2"]]},
        "fc3": {"kernel": p["fc3"]["kernel"][keep["fc2"]],
                "bias": p["fc3"]["bias"]},
    }


def test_lenet_chain_is_inferred_in_natural_order(lenet_params):
    assert infer_layers(lenet_params) == (
        ("conv1", "conv2"), ("conv2", "fc1"), ("fc1", "fc2"), ("fc2", "fc3"))


def test_removed_neurons_are_absent_from_the_network(lenet, lenet_params):
    apply = jax.jit(lenet.apply)
    damage = remove_neurons(jax.random.key(3), lenet_params, 0.5)
    mask = damage.mask
    for name, units in [("conv1", 6), ("conv2", 16), ("fc1", 120),
                        ("fc2", 84)]:
        assert np.asarray(mask[name]["bias"]).sum() == units // 2
    assert not np.asarray(mask["fc3"]["bias"]).any()
    # Everything masked is zero, and the mask is exactly the unit entries.
    for leaf, leaf_mask in zip(jax.tree.leaves(damage.params),
                               jax.tree.leaves(mask)):
        assert not np.asarray(leaf)[np.asarray(leaf_mask)].any()
    removed = np.flatnonzero(np.asarray(mask["conv2"]["bias"]))
    rows = np.asarray(mask["fc1"]["kernel"]).all(axis=1)
    np.testing.assert_array_equal(np.flatnonzero(rows),
                                  np.flatnonzero(np.isin(np.arange(256) % 16,
                                                         removed)))
    smaller = _shrink(lenet_params, mask)
    assert smaller["conv1"]["kernel"].shape == (5, 5, 1, 3)
    assert smaller["fc1"]["kernel"].shape == (128, 60)
    # The same non-zero terms, summed by other programs (fewer, shorter
    # sums), relative to the logits' last absolute terms.
    assert_sums_close(apply(damage.params, IMAGES),
                      _lenet_forward(smaller, IMAGES), terms=LENET5_TERMS,
                      magnitude=lenet5_logit_magnitude(damage.params, IMAGES))


def test_neuron_removal_vmaps_with_one_trace(lenet_params):
    traces = 0

    def damage_many(keys, ratios):
        nonlocal traces
        traces += 1
        return jax.vmap(remove_neurons, in_axes=(0, None, 0))(
            keys, lenet_params, ratios)

    run = jax.jit(damage_many)
    ratios = jnp.asarray([0.0, 0.25, 0.5, 1.0])
    first = run(jax.random.split(jax.random.key(0), 4), ratios)
    second = run(jax.random.split(jax.random.key(1), 4), ratios)
    assert traces == 1
    np.testing.assert_array_equal(
        np.asarray(first.mask["fc1"]["bias"]).sum(axis=1), [0, 30, 60, 120])
    assert not np.array_equal(first.mask["fc1"]["bias"][1],
                              second.mask["fc1"]["bias"][1])


def _mlp():
    rng = np.random.default_rng(1)
    shapes = {"fc1": (8, 6), "fc2": (6, 5), "fc10": (5, 3)}
    return {name: {"kernel": rng.normal(size=shape).astype(np.float32),
                   "bias": rng.normal(size=shape[1:]).astype(np.float32)}
            for name, shape in shapes.items()}


def test_smallest_norm_removes_the_weakest_units():
    params = _mlp()
    params["fc1"]["kernel"][:, [1, 4]] *= 1e-3
    params["fc1"]["bias"][[1, 4]] *= 1e-3
    damage = make_remove_neurons(target="smallest_norm")(
        jax.random.key(0), params, 0.34)
    np.testing.assert_array_equal(np.flatnonzero(damage.mask["fc1"]["bias"]),
                                  [1, 4])
    # fc10 comes after fc2 in natural order: it is the classifier.
    assert infer_layers(params)[-1] == ("fc2", "fc10")
    assert not np.asarray(damage.mask["fc10"]["bias"]).any()


def test_explicit_pairs_and_a_consumer_of_none():
    params = _mlp()
    op = make_remove_neurons([("fc2", None)])
    damage = op(jax.random.key(0), params, 0.4)
    assert np.asarray(damage.mask["fc2"]["bias"]).sum() == 2
    assert not np.asarray(damage.mask["fc10"]["kernel"]).any()
    assert not np.asarray(damage.mask["fc1"]["kernel"]).any()
    chain = make_remove_neurons(["fc1", "fc2"])(jax.random.key(0), params,
                                                0.5)
    assert np.asarray(chain.mask["fc1"]["bias"]).sum() == 3
    assert np.asarray(chain.mask["fc2"]["kernel"]).any(axis=1).sum() == 3
    assert not np.asarray(chain.mask["fc2"]["bias"]).any()


def test_neuron_removal_errors():
    params = _mlp()
    rescnn = get_model("rescnn").abstract_params(IMAGES)
    with pytest.raises(ValueError, match="cannot infer a layer chain"):
        remove_neurons(jax.random.key(0), rescnn, 0.1)
    with pytest.raises(ValueError, match="no layer 'fc7'"):
        make_remove_neurons(["fc1", "fc7"])(jax.random.key(0), params, 0.1)
    with pytest.raises(ValueError, match="'fc10' reads 5 inputs, not a "
                                         "multiple of the 6 units of 'fc1'"):
        make_remove_neurons([("fc1", "fc10")])(jax.random.key(0), params,
                                               0.1)
    with pytest.raises(TypeError, match="not a string"):
        make_remove_neurons("fc1")
    with pytest.raises(TypeError, match="pairs"):
        make_remove_neurons([("fc1", "fc2", "fc3")])
    with pytest.raises(ValueError, match="target must be one of"):
        make_remove_neurons(target="largest")
    with pytest.raises(ValueError, match="ratio is a fraction"):
        remove_neurons(jax.random.key(0), params, 1.5)


def test_remove_connections_prunes_kernels_only():
    params = _mlp()
    damage = make_remove_connections(target="smallest")(jax.random.key(0),
                                                        params, 0.5)
    for name, layer in params.items():
        kernel_mask = np.asarray(damage.mask[name]["kernel"])
        assert kernel_mask.sum() == layer["kernel"].size // 2
        assert not np.asarray(damage.mask[name]["bias"]).any()
        magnitudes = np.abs(layer["kernel"])
        assert magnitudes[kernel_mask].max() <= magnitudes[~kernel_mask].min()


# --------------------------------------------------------------------------
# Residual blocks.
# --------------------------------------------------------------------------


def test_dropped_blocks_are_the_identity():
    model = get_model("rescnn")
    params = _random_params(model, 1)
    damage = drop_blocks(jax.random.key(5), params, 0.5)
    names = ("block0", "block1", "block2", "block3")
    dropped = [name for name in names
               if np.asarray(damage.mask[name]["conv_b"]["kernel"]).all()]
    assert len(dropped) == 2
    for name in names:
        masks = [np.asarray(m) for m in jax.tree.leaves(damage.mask[name])]
        assert all(m.all() for m in masks) == (name in dropped)
        assert all(m.any() for m in masks) == (name in dropped)
    assert not any(np.asarray(m).any() for m in jax.tree.leaves(
        (damage.mask["stem"], damage.mask["head"])))
    # A dropped block passes its (non-negative, post-ReLU) input through
    # unchanged; a kept one does not.
    block = ResidualBlock(16)
    apply = jax.jit(lambda p, x: block.apply({"params": p}, x))
    x = jnp.asarray(np.abs(np.random.default_rng(3).normal(
        size=(2, 7, 7, 16))).astype(np.float32))
    kept = next(name for name in names if name not in dropped)
    np.testing.assert_array_equal(apply(damage.params[dropped[0]], x), x)
    assert not np.allclose(apply(damage.params[kept], x), x)


def test_block_pattern_matching_nothing_names_it():
    with pytest.raises(ValueError, match=r"block pattern 'stage\\d' matches "
                                         "no top-level entry"):
        make_drop_blocks(r"stage\d")(jax.random.key(0), _mlp(), 0.5)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        make_drop_blocks("block(")


# --------------------------------------------------------------------------
# Attention heads.
# --------------------------------------------------------------------------


def test_removed_heads_are_zeroed_and_silent():
    params = _random_params(get_model("vit"), 2)
    damage = remove_heads(jax.random.key(0), params, 0.5)
    for index in range(4):
        attention = damage.mask[f"layer{index}"]["attention"]
        heads = np.asarray(attention["out"]["kernel"]).all(axis=(1, 2))
        assert heads.sum() == 2
        np.testing.assert_array_equal(
            np.asarray(attention["out"]["kernel"]).any(axis=(1, 2)), heads)
        for name in ("query", "key", "value"):
            kernel = np.asarray(attention[name]["kernel"])
            np.testing.assert_array_equal(kernel.all(axis=(0, 2)), heads)
            np.testing.assert_array_equal(kernel.any(axis=(0, 2)), heads)
            np.testing.assert_array_equal(
                np.asarray(attention[name]["bias"]).all(axis=1), heads)
        assert not np.asarray(attention["out"]["bias"]).any()
        values = damage.params[f"layer{index}"]["attention"]
        assert not np.asarray(values["out"]["kernel"])[heads].any()
    assert not np.asarray(damage.mask["embed"]["kernel"]).any()
    # A removed head contributes nothing: the attention output equals the
    # sum over the kept heads only, whatever the removed heads' weights.
    mask = damage.mask["layer0"]["attention"]
    weights = damage.params["layer0"]["attention"]
    scrambled = jax.tree.map(lambda w, m: jnp.where(m, 3.0, w), weights,
                             mask)
    scrambled["out"]["kernel"] = weights["out"]["kernel"]
    attend = jax.jit(lambda p, x: SelfAttention(4).apply({"params": p}, x))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, 64)),
                    jnp.float32)
    # Bit for bit, on any CPU: one program, and the removed heads' terms
    # are exact zeros (finite values times the zeroed out kernel), which
    # leave every sum unchanged in whatever order it is taken.
    np.testing.assert_array_equal(attend(scrambled, x), attend(weights, x))
    assert not np.allclose(attend(weights, x), attend(
        params["layer0"]["attention"], x))


def test_head_removal_needs_attention():
    with pytest.raises(ValueError, match="no attention module"):
        make_remove_heads()(jax.random.key(0), _mlp(), 0.5)


def test_silence_removed_keeps_removed_entries_at_zero():
    params = _mlp()
    damage = remove_neurons(jax.random.key(0), params, 0.5)
    trained = jax.tree.map(lambda leaf: leaf + 1.0, damage.params)
    silenced = silence_removed(trained, damage.mask)
    for leaf, mask, before in zip(jax.tree.leaves(silenced),
                                  jax.tree.leaves(damage.mask),
                                  jax.tree.leaves(trained)):
        leaf, mask = np.asarray(leaf), np.asarray(mask)
        assert not leaf[mask].any()
        np.testing.assert_array_equal(leaf[~mask], np.asarray(before)[~mask])
    assert tree_equal(silence_removed(damage.params, damage.mask),
                      damage.params)
