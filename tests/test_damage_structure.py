"""Structural damage: removed units, blocks and heads are really absent."""

from __future__ import annotations

import functools

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _tolerance import (LENET5_TERMS, assert_sums_close,
                        lenet5_logit_magnitude)
from conftest import tree_equal
from flax import nnx
from recovjax.damage import (drop_blocks, infer_layers, make_drop_blocks,
                             make_remove_connections, make_remove_heads,
                             make_remove_neurons, remove_connections,
                             remove_heads, remove_neurons, silence_removed)
from recovjax.models import (InfoError, LeafInfo, from_apply, from_equinox,
                             from_linen, from_nnx, get_model)
from recovjax.models.networks import ResidualBlock, SelfAttention
from recovjax.models.layers import (conv2d, max_pool_2x2, reference_conv2d)

IMAGES = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(
    np.float32)


def _random_params(model, seed):
    # Random values of the model's shapes (no init compile), with non-zero
    # biases so that a forgotten bias would show in the logits.
    rng = np.random.default_rng(seed)
    shapes = model.abstract_params()
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


def test_lenet_chain_is_inferred_in_natural_order(lenet):
    assert infer_layers(lenet.infos) == (
        ("conv1", "conv2"), ("conv2", "fc1"), ("fc1", "fc2"), ("fc2", "fc3"))


def test_removed_neurons_are_absent_from_the_network(lenet, lenet_params):
    apply = jax.jit(lenet.forward)
    damage = remove_neurons(jax.random.key(3), lenet_params, 0.5,
                            info=lenet.info)
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


def test_neuron_removal_vmaps_with_one_trace(lenet, lenet_params):
    traces = 0
    # The metadata is not an array: bound, not mapped over.
    remove = functools.partial(remove_neurons, info=lenet.info)

    def damage_many(keys, ratios):
        nonlocal traces
        traces += 1
        return jax.vmap(remove, in_axes=(0, None, 0))(
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


def _mlp_apply(params, x):
    # fc1 -> fc2 -> fc10: the dataflow, whatever the names sort to.
    for name in ("fc1", "fc2"):
        x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
    return x @ params["fc10"]["kernel"] + params["fc10"]["bias"]


def _dense_info(names):
    # What a plain function's dense layers are, declared by hand.
    info = {}
    for name in names:
        info[f"{name}/kernel"] = LeafInfo("kernel", layer=name, in_axes=(0,),
                                          out_axes=(1,))
        info[f"{name}/bias"] = LeafInfo("bias", layer=name, out_axes=(0,))
    return info


@functools.cache
def _mlp_model():
    return from_apply(_mlp_apply, _mlp(), sample=np.zeros((2, 8), np.float32),
                      info=_dense_info(("fc1", "fc2", "fc10")), name="mlp")


def test_smallest_norm_removes_the_weakest_units():
    params = _mlp()
    params["fc1"]["kernel"][:, [1, 4]] *= 1e-3
    params["fc1"]["bias"][[1, 4]] *= 1e-3
    damage = make_remove_neurons(target="smallest_norm")(
        jax.random.key(0), params, 0.34, info=_mlp_model().info)
    np.testing.assert_array_equal(np.flatnonzero(damage.mask["fc1"]["bias"]),
                                  [1, 4])
    # fc10 comes after fc2 in the dataflow: it is the classifier.
    assert infer_layers(_mlp_model().infos) == (("fc1", "fc2"),
                                                ("fc2", "fc10"))
    assert not np.asarray(damage.mask["fc10"]["bias"]).any()


def test_explicit_pairs_and_a_consumer_of_none():
    params = _mlp()
    info = _mlp_model().info
    op = make_remove_neurons([("fc2", None)])
    damage = op(jax.random.key(0), params, 0.4, info=info)
    assert np.asarray(damage.mask["fc2"]["bias"]).sum() == 2
    assert not np.asarray(damage.mask["fc10"]["kernel"]).any()
    assert not np.asarray(damage.mask["fc1"]["kernel"]).any()
    chain = make_remove_neurons(["fc1", "fc2"])(jax.random.key(0), params,
                                                0.5, info=info)
    assert np.asarray(chain.mask["fc1"]["bias"]).sum() == 3
    assert np.asarray(chain.mask["fc2"]["kernel"]).any(axis=1).sum() == 3
    assert not np.asarray(chain.mask["fc2"]["bias"]).any()


def test_neuron_removal_errors():
    params = _mlp()
    info = _mlp_model().info
    with pytest.raises(ValueError, match="layer 'fc7' has no kernel leaves; "
                                         "layers with one kernel: fc1, fc10, "
                                         "fc2"):
        make_remove_neurons(["fc1", "fc7"])(jax.random.key(0), params, 0.1,
                                            info=info)
    with pytest.raises(ValueError, match="'fc10' reads 5 inputs, not a "
                                         "multiple of the 6 units of 'fc1'"):
        make_remove_neurons([("fc1", "fc10")])(jax.random.key(0), params,
                                               0.1, info=info)
    with pytest.raises(TypeError, match="not a string"):
        make_remove_neurons("fc1")
    with pytest.raises(TypeError, match="pairs"):
        make_remove_neurons([("fc1", "fc2", "fc3")])
    with pytest.raises(ValueError, match="target must be one of"):
        make_remove_neurons(target="largest")
    with pytest.raises(ValueError, match="ratio is a fraction"):
        remove_neurons(jax.random.key(0), params, 1.5, info=info)


def _false_like(params):
    return jax.tree.map(lambda leaf: np.zeros(np.shape(leaf), bool), params)


def _removed(mask_bias):
    return np.flatnonzero(np.asarray(mask_bias))


def _rescnn_forward(params, x, absolute=False):
    # ResCNN written out with lax convolutions, any block widths; with
    # ``absolute`` the same chain on absolute values (every term's
    # magnitude: ReLU is the identity there).
    p = jax.tree.map(abs, params) if absolute else params
    x = abs(x) if absolute else x

    def conv(h, layer, padding):
        return reference_conv2d(h, layer["kernel"], layer["bias"], padding)

    h = jax.nn.relu(conv(x, p["stem"], "VALID"))
    for stage in ((0, 1), (2, 3)):
        h = max_pool_2x2(h)
        for index in stage:
            block = p[f"block{index}"]
            inner = jax.nn.relu(conv(h, block["conv_a"], "SAME"))
            h = jax.nn.relu(h + conv(inner, block["conv_b"], "SAME"))
    h = h.mean(axis=(1, 2))
    return h @ p["head"]["kernel"] + p["head"]["bias"]


def test_rescnn_neurons_are_removed_inside_each_residual_branch():
    # The blocks' outputs join the residual stream, so only the link inside
    # each branch, conv_a -> conv_b, is a chain link; stem, head and the
    # conv_b outputs keep every unit.
    model = get_model("rescnn")
    assert infer_layers(model.infos) == tuple(
        (f"block{i}/conv_a", f"block{i}/conv_b") for i in range(4))
    params = _random_params(model, 3)
    damage = remove_neurons(jax.random.key(2), params, 0.5, info=model.info)
    expected = _false_like(params)
    kept = {}
    for i in range(4):
        block = f"block{i}"
        units = _removed(damage.mask[block]["conv_a"]["bias"])
        assert len(units) == 8
        expected[block]["conv_a"]["kernel"][..., units] = True
        expected[block]["conv_a"]["bias"][units] = True
        expected[block]["conv_b"]["kernel"][:, :, units, :] = True
        kept[block] = np.setdiff1d(np.arange(16), units)
    assert tree_equal(damage.mask, expected)
    assert tree_equal(damage.params, jax.tree.map(
        lambda leaf, m: np.where(m, np.float32(0), leaf), params, expected))
    # The damaged network is the one with those channels deleted.
    smaller = jax.tree.map(np.asarray, params)
    for block, units in kept.items():
        layers = smaller[block]
        layers["conv_a"] = {"kernel": layers["conv_a"]["kernel"][..., units],
                            "bias": layers["conv_a"]["bias"][units]}
        layers["conv_b"] = dict(layers["conv_b"], kernel=layers["conv_b"][
            "kernel"][:, :, units, :])
    assert smaller["block1"]["conv_a"]["kernel"].shape == (3, 3, 16, 8)
    # The stem (9 taps), per block two 144-tap convolutions and the
    # residual sum, the mean over 6 x 6 positions and the 16-input head,
    # each with its bias, relative to the chain on absolute values.
    terms = 10 + 4 * (2 * 145 + 1) + 37 + 17
    got = jax.jit(model.forward)(damage.params, IMAGES)
    assert_sums_close(got, _rescnn_forward(smaller, IMAGES), terms=terms,
                      magnitude=_rescnn_forward(smaller, IMAGES, True))
    assert not np.allclose(got, model.forward(params, IMAGES), atol=1e-3)


def test_remove_connections_prunes_kernels_only():
    params = _mlp()
    damage = make_remove_connections(target="smallest")(
        jax.random.key(0), params, 0.5, info=_mlp_model().info)
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
                                         r"no module path of the parameters "
                                         r"\(modules: fc1, fc10, fc2\)"):
        make_drop_blocks(r"stage\d")(jax.random.key(0), _mlp(), 0.5)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        make_drop_blocks("block(")


# --------------------------------------------------------------------------
# Attention heads.
# --------------------------------------------------------------------------


def test_removed_heads_are_zeroed_and_silent():
    vit = get_model("vit")
    params = _random_params(vit, 2)
    damage = remove_heads(jax.random.key(0), params, 0.5, info=vit.info)
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
        make_remove_heads()(jax.random.key(0), _mlp(), 0.5,
                            info=_mlp_model().info)


def test_silence_removed_keeps_removed_entries_at_zero():
    params = _mlp()
    damage = remove_neurons(jax.random.key(0), params, 0.5,
                            info=_mlp_model().info)
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


# --------------------------------------------------------------------------
# Models from any framework: the mask is exactly the removed units.
# --------------------------------------------------------------------------


class _LinenCNN(nn.Module):
    """Flax's default names: Conv_0, BatchNorm_0, ..., Dense_1."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.Conv(6, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        x = nn.relu(nn.Dense(5)(x))
        return nn.Dense(3)(x)


CNN_IMAGES = np.random.default_rng(5).normal(size=(4, 6, 6, 1)).astype(
    np.float32)
BN_EPSILON = 1e-5  # flax's default


def _cnn_forward(params, stats, x, absolute=False):
    # The CNN written out (evaluation mode), any channel counts. With
    # ``absolute``, the chain on absolute values, with |x - mean| bounded
    # by |x| + |mean|: every term's magnitude.
    if absolute:
        params, x = jax.tree.map(abs, params), abs(x)
        stats = jax.tree.map(abs, stats)

    def conv(h, layer):
        return reference_conv2d(h, layer["kernel"], layer["bias"], "SAME")

    def norm(h, layer, stat):
        centred = h + stat["mean"] if absolute else h - stat["mean"]
        return (centred * jax.lax.rsqrt(stat["var"] + BN_EPSILON)
                * layer["scale"] + layer["bias"])

    h = x
    for index in (0, 1):
        h = jax.nn.relu(norm(conv(h, params[f"Conv_{index}"]),
                             params[f"BatchNorm_{index}"],
                             stats[f"BatchNorm_{index}"]))
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ params["Dense_0"]["kernel"]
                    + params["Dense_0"]["bias"])
    return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


@functools.cache
def _cnn_model():
    module = _LinenCNN()
    # Shapes only (no init compile); the values are drawn below.
    variables = jax.eval_shape(module.init, jax.random.key(0), CNN_IMAGES[:2])
    rng = np.random.default_rng(6)
    # Random values everywhere (non-zero biases and offsets, batch
    # statistics far from 0 and 1), so a forgotten entry would show.
    params = jax.tree.map(lambda leaf: rng.normal(
        scale=0.5, size=leaf.shape).astype(np.float32), variables["params"])
    stats = jax.tree.map(lambda leaf: rng.uniform(
        0.5, 2.0, leaf.shape).astype(np.float32), variables["batch_stats"])
    model = from_linen(module, {"params": params, "batch_stats": stats},
                       sample=CNN_IMAGES[:2])
    return module, model


def test_linen_cnn_with_batch_norm_loses_exactly_the_chosen_channels():
    module, model = _cnn_model()
    assert infer_layers(model.infos) == (("Conv_0", "Conv_1"),
                                         ("Conv_1", "Dense_0"),
                                         ("Dense_0", "Dense_1"))
    params = model.params
    damage = remove_neurons(jax.random.key(4), params, 0.5, info=model.info)
    mask = damage.mask
    removed = {layer: _removed(mask[layer]["bias"])
               for layer in ("Conv_0", "Conv_1", "Dense_0")}
    assert [len(units) for units in removed.values()] == [2, 3, 2]
    expected = _false_like(params)
    for index, (conv, consumer) in enumerate((("Conv_0", "Conv_1"),
                                              ("Conv_1", None))):
        units = removed[conv]
        expected[conv]["kernel"][..., units] = True
        expected[conv]["bias"][units] = True
        expected[f"BatchNorm_{index}"]["scale"][units] = True
        expected[f"BatchNorm_{index}"]["bias"][units] = True
        if consumer:
            expected[consumer]["kernel"][:, :, units, :] = True
    # conv -> flatten -> dense: NHWC keeps channels last, so Dense_0's
    # input row i reads channel i % 6.
    rows = np.isin(np.arange(6 * 6 * 6) % 6, removed["Conv_1"])
    assert rows.sum() == 36 * 3
    expected["Dense_0"]["kernel"][rows, :] = True
    expected["Dense_0"]["kernel"][:, removed["Dense_0"]] = True
    expected["Dense_0"]["bias"][removed["Dense_0"]] = True
    expected["Dense_1"]["kernel"][removed["Dense_0"], :] = True
    assert tree_equal(mask, expected)
    assert tree_equal(damage.params, jax.tree.map(
        lambda leaf, m: np.where(m, np.float32(0), leaf), params, expected))
    # The removed channels are silent after their batch norm: (0 - mean) *
    # rsqrt(var) * scale + offset is exactly 0 only with scale and offset
    # zeroed too.
    _, captured = module.apply(
        {"params": damage.params, **model.state}, CNN_IMAGES,
        capture_intermediates=True, mutable=["intermediates"])
    for index in (0, 1):
        normed = np.asarray(captured["intermediates"][f"BatchNorm_{index}"][
            "__call__"][0])
        units = removed[f"Conv_{index}"]
        assert not normed[..., units].any()
        assert normed[..., np.setdiff1d(np.arange(normed.shape[-1]),
                                        units)].any()
    # The damaged network is the one with the units deleted.
    keep = {layer: np.setdiff1d(np.arange(np.shape(
        params[layer]["bias"])[0]), units) for layer, units in removed.items()}
    p = jax.tree.map(np.asarray, params)
    stats = jax.tree.map(np.asarray, model.state["batch_stats"])
    k0, k1, k2 = keep["Conv_0"], keep["Conv_1"], keep["Dense_0"]
    dense = p["Dense_0"]["kernel"].reshape(6, 6, 6, 5)[:, :, k1, :]
    smaller = {
        "Conv_0": {"kernel": p["Conv_0"]["kernel"][..., k0],
                   "bias": p["Conv_0"]["bias"][k0]},
        "BatchNorm_0": {name: value[k0] for name, value in
                        p["BatchNorm_0"].items()},
        "Conv_1": {"kernel": p["Conv_1"]["kernel"][:, :, k0, :][..., k1],
                   "bias": p["Conv_1"]["bias"][k1]},
        "BatchNorm_1": {name: value[k1] for name, value in
                        p["BatchNorm_1"].items()},
        "Dense_0": {"kernel": dense.reshape(-1, 5)[:, k2],
                    "bias": p["Dense_0"]["bias"][k2]},
        "Dense_1": {"kernel": p["Dense_1"]["kernel"][k2],
                    "bias": p["Dense_1"]["bias"]},
    }
    smaller_stats = {"BatchNorm_0": {n: v[k0] for n, v in
                                     stats["BatchNorm_0"].items()},
                     "BatchNorm_1": {n: v[k1] for n, v in
                                     stats["BatchNorm_1"].items()}}
    assert smaller["Dense_0"]["kernel"].shape == (6 * 6 * 3, 3)
    got = model.forward(damage.params, CNN_IMAGES)
    # Two 3x3 convolutions (1 and 4 input channels), each with its bias and
    # a batch norm (subtract, add, rsqrt, two products: 5 roundings), the
    # 216-input and the 5-input dense layers with their biases, relative to
    # the chain on absolute values.
    terms = (9 + 1 + 5) + (36 + 1 + 5) + (216 + 1) + (5 + 1)
    assert_sums_close(got, _cnn_forward(smaller, smaller_stats, CNN_IMAGES),
                      terms=terms, magnitude=_cnn_forward(
                          smaller, smaller_stats, CNN_IMAGES, True))
    assert not np.allclose(got, model.forward(params, CNN_IMAGES), atol=1e-3)
    # Another key removes other units.
    other = remove_neurons(jax.random.key(5), params, 0.5, info=model.info)
    assert not tree_equal(other.mask, mask)


def _chain_mask(params, chain, removed, *, kernel, bias, out_axis):
    """The mask of a chain of dense layers losing ``removed[i]`` units of
    layer ``i``: its kernel's output slices and bias, and the next layer's
    kernel's input slices (kernels ``[in, out]`` for ``out_axis=1``,
    ``[out, in]`` for ``out_axis=0``)."""
    expected = _false_like(params)

    def layer(tree, path):
        for part in path.split("/"):
            tree = tree[part]
        return tree

    for path, following, units in zip(chain, chain[1:], removed):
        # moveaxis views write through to the arrays of ``expected``.
        np.moveaxis(layer(expected, path)[kernel], out_axis, 0)[units] = True
        layer(expected, path)[bias][units] = True
        np.moveaxis(layer(expected, following)[kernel], 1 - out_axis,
                    0)[units] = True
    return expected


def _chain_forward(layers, x, activation, absolute=False):
    # A chain of dense layers [(kernel [in, out], bias)]; with ``absolute``
    # the chain on absolute values (|activation(z)| <= |z| for ReLU, tanh).
    if absolute:
        layers, x, activation = jax.tree.map(abs, layers), abs(x), None
    for index, (kernel, bias) in enumerate(layers):
        x = x @ kernel + bias
        if activation is not None and index < len(layers) - 1:
            x = activation(x)
    return x


def _check_dense_chain(key, model, chain, *, kernel, bias, out_axis,
                       activation, x, ratio=0.5):
    # Random values of the model's shapes; the exact mask by hand; the
    # damaged model equals the chain with the units deleted.
    rng = np.random.default_rng(8)
    params = jax.tree.map(lambda leaf: rng.normal(
        scale=0.5, size=leaf.shape).astype(np.float32),
        model.abstract_params())
    assert infer_layers(model.infos) == tuple(zip(chain, chain[1:]))
    damage = remove_neurons(key, params, ratio, info=model.info)

    def layer(tree, path):
        for part in path.split("/"):
            tree = tree[part]
        return tree

    removed = [_removed(layer(damage.mask, path)[bias]) for path in chain]
    widths = [np.shape(layer(params, path)[bias])[0] for path in chain]
    assert [len(units) for units in removed] == [
        int(width * ratio) for width in widths[:-1]] + [0]
    expected = _chain_mask(params, chain, removed[:-1], kernel=kernel,
                           bias=bias, out_axis=out_axis)
    assert tree_equal(damage.mask, expected)
    assert tree_equal(damage.params, jax.tree.map(
        lambda leaf, m: np.where(m, np.float32(0), leaf), params, expected))
    keep = [np.setdiff1d(np.arange(width), units)
            for width, units in zip(widths, removed)]
    inputs = [np.arange(x.shape[-1])] + keep[:-1]
    smaller = []
    for path, rows, columns in zip(chain, inputs, keep):
        matrix = np.asarray(layer(params, path)[kernel])
        if out_axis == 0:
            matrix = matrix.T
        smaller.append((matrix[rows][:, columns],
                        np.asarray(layer(params, path)[bias])[columns]))
    got = model.forward(damage.params, x)
    terms = sum(np.shape(m)[0] + 2 for m, _ in smaller)
    assert_sums_close(got, _chain_forward(smaller, x, activation),
                      terms=terms, magnitude=_chain_forward(
                          smaller, x, activation, absolute=True))
    assert not np.allclose(got, model.forward(params, x), atol=1e-3)


DENSE_INPUTS = np.random.default_rng(9).normal(size=(3, 6)).astype(np.float32)


class _NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.first = nnx.Linear(6, 8, rngs=rngs)
        self.second = nnx.Linear(8, 5, rngs=rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.first(x))
        return self.out(nnx.relu(self.second(x)))


def test_nnx_mlp_loses_exactly_the_chosen_units():
    model = from_nnx(_NnxMLP(nnx.Rngs(0)), sample=DENSE_INPUTS)
    _check_dense_chain(jax.random.key(7), model, ["first", "second", "out"],
                       kernel="kernel", bias="bias", out_axis=1,
                       activation=jax.nn.relu, x=DENSE_INPUTS)


def test_equinox_mlp_loses_exactly_the_chosen_units():
    # equinox's weights are [out, in]; the 8 -> 8 middle layer would not
    # notice swapped axes by shape.
    mlp = eqx.nn.MLP(6, 3, 8, 2, key=jax.random.key(0))
    model = from_equinox(mlp, sample=DENSE_INPUTS)
    assert np.shape(model.params["layers"]["1"]["weight"]) == (8, 8)
    _check_dense_chain(jax.random.key(7), model,
                       ["layers/0", "layers/1", "layers/2"], kernel="weight",
                       bias="bias", out_axis=0, activation=jax.nn.relu,
                       x=DENSE_INPUTS)


def _tanh_apply(params, x):
    x = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    x = jnp.tanh(x @ params["middle"]["kernel"] + params["middle"]["bias"])
    return x @ params["out"]["kernel"] + params["out"]["bias"]


def _tanh_params():
    rng = np.random.default_rng(10)
    shapes = {"hidden": (6, 7), "middle": (7, 4), "out": (4, 3)}
    return {name: {"kernel": rng.normal(size=shape).astype(np.float32),
                   "bias": rng.normal(size=shape[1:]).astype(np.float32)}
            for name, shape in shapes.items()}


def test_from_apply_model_with_declared_info_loses_exactly_the_chosen_units():
    model = from_apply(_tanh_apply, _tanh_params(), sample=DENSE_INPUTS,
                       info=_dense_info(("hidden", "middle", "out")))
    _check_dense_chain(jax.random.key(7), model, ["hidden", "middle", "out"],
                       kernel="kernel", bias="bias", out_axis=1,
                       activation=jnp.tanh, x=DENSE_INPUTS)


class _Deep(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(10):
            x = jnp.tanh(nn.Dense(4)(x))
        return nn.Dense(3)(x)


def test_layer_chain_follows_the_dataflow_not_the_names():
    x = DENSE_INPUTS
    module = _Deep()
    rng = np.random.default_rng(11)
    variables = jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(
        np.float32), jax.eval_shape(module.init, jax.random.key(0), x))
    model = from_linen(module, variables, sample=x)
    # By name Dense_10 sorts between Dense_1 and Dense_2.
    assert list(model.params)[:3] == ["Dense_0", "Dense_1", "Dense_10"]
    assert infer_layers(model.infos) == tuple(
        (f"Dense_{i}", f"Dense_{i + 1}") for i in range(10))
    damage = remove_neurons(jax.random.key(0), model.params, 0.5,
                            info=model.info)
    mask = jax.tree.map(np.asarray, damage.mask)
    # Dense_10 is the classifier: it keeps its outputs, and its input rows
    # are those of Dense_9's removed units; Dense_2 reads Dense_1's.
    assert not mask["Dense_10"]["bias"].any()
    np.testing.assert_array_equal(mask["Dense_10"]["kernel"].all(axis=1),
                                  mask["Dense_9"]["bias"])
    np.testing.assert_array_equal(mask["Dense_2"]["kernel"].all(axis=1),
                                  mask["Dense_1"]["bias"])
    assert mask["Dense_1"]["bias"].sum() == 2


# --------------------------------------------------------------------------
# Missing leaf metadata.
# --------------------------------------------------------------------------


def test_structural_damage_without_info_says_how_to_get_it(lenet_params):
    assert issubclass(InfoError, ValueError)
    vit = _random_params(get_model("vit"), 0)
    for op, params in ((remove_neurons, lenet_params),
                       (remove_heads, vit),
                       (remove_connections, lenet_params)):
        with pytest.raises(InfoError, match=r"info=model\.info"):
            op(jax.random.key(0), params, 0.5)


def test_info_of_another_model_is_refused(lenet_params):
    with pytest.raises(InfoError, match="structure of the parameters"):
        remove_neurons(jax.random.key(0), lenet_params, 0.5,
                       info=_mlp_model().info)


def _undeclared_bias_model():
    info = _dense_info(("hidden", "middle", "out"))
    del info["hidden/bias"]
    return from_apply(_tanh_apply, _tanh_params(), sample=DENSE_INPUTS,
                      info=info)


def test_undeclared_leaf_is_named_with_how_to_declare_it():
    model = _undeclared_bias_model()
    assert model.infos["hidden/bias"].role is None
    with pytest.raises(InfoError, match=r"hidden/bias.*with_info"):
        remove_connections(jax.random.key(0), model.params, 0.5,
                           info=model.info)


def test_neuron_removal_names_an_undeclared_leaf_of_a_producer():
    model = _undeclared_bias_model()
    with pytest.raises(InfoError, match=r"hidden/bias.*with_info"):
        remove_neurons(jax.random.key(0), model.params, 0.5, info=model.info)


def test_from_apply_declared_without_layer_names_finds_the_chain():
    info = {path: LeafInfo(value.role, in_axes=value.in_axes,
                           out_axes=value.out_axes)
            for path, value in _dense_info(("hidden", "middle",
                                            "out")).items()}
    model = from_apply(_tanh_apply, _tanh_params(), sample=DENSE_INPUTS,
                       info=info)
    assert infer_layers(model.infos) == (("hidden", "middle"),
                                         ("middle", "out"))


def test_inferred_chain_follows_the_dataflow_with_twelve_layers():
    class Deep(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(11):
                x = nn.relu(nn.Dense(4)(x))
            return nn.Dense(3)(x)

    x = jnp.ones((2, 4))
    model = from_linen(Deep(), Deep().init(jax.random.key(0), x), sample=x)
    assert infer_layers(model.infos) == tuple(
        (f"Dense_{i}", f"Dense_{i + 1}") for i in range(11))


def test_declared_axes_that_do_not_fit_name_the_leaf():
    x = jnp.ones((2, 4))
    params = {"hidden": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)},
              "out": {"kernel": jnp.ones((6, 3)), "bias": jnp.zeros(3)}}
    info = {"hidden/kernel": LeafInfo("kernel", in_axes=(1,), out_axes=(0,)),
            "hidden/bias": LeafInfo("bias", out_axes=(0,)),
            "out/kernel": LeafInfo("kernel", in_axes=(0,), out_axes=(1,)),
            "out/bias": LeafInfo("bias", out_axes=(0,))}
    model = from_apply(lambda p, v: jnp.tanh(v @ p["hidden"]["kernel"]
                                            + p["hidden"]["bias"])
                       @ p["out"]["kernel"] + p["out"]["bias"], params,
                       sample=x, info=info)
    with pytest.raises(InfoError, match="hidden/bias"):
        remove_neurons(jax.random.key(0), model.params, 0.5, info=model.info)
