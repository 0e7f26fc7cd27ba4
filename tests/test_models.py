"""Tests of recovjax.models: shapes, registry, determinism, the conv layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax.models import get_model, model_names
from recovjax.models.layers import (conv2d, conv_relu_pool,
                                    conv_relu_pool_stack, extract_patches,
                                    flatten_batch_minor, max_pool_2x2,
                                    reference_conv2d, to_batch_minor)

from conftest import tree_equal


@pytest.mark.parametrize("name", ["lenet5", "mlp", "rescnn", "vit"])
def test_output_shape_and_dtype(name):
    model = get_model(name)
    x = jnp.zeros((3, 28, 28, 1))
    params = model.init(jax.random.key(0), x)
    logits = model.apply(params, x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    four = get_model(name, num_classes=4)
    assert jax.eval_shape(four.apply, four.abstract_params(x), x).shape == (
        3, 4)


@pytest.mark.parametrize("name", ["lenet5", "mlp", "rescnn", "vit"])
def test_init_is_deterministic_per_key(name):
    model = get_model(name)
    x = jnp.zeros((1, 28, 28, 1))
    assert tree_equal(model.init(jax.random.key(5), x),
                      model.init(jax.random.key(5), x))
    a = jax.tree.leaves(model.init(jax.random.key(5), x))
    b = jax.tree.leaves(model.init(jax.random.key(6), x))
    assert any(not np.array_equal(u, v) for u, v in zip(a, b))


def test_lenet5_is_the_seed_network():
    params = get_model("lenet5").init(jax.random.key(0),
                                      jnp.zeros((1, 28, 28, 1)))
    shapes = {f"{layer}/{name}": leaf.shape for layer, leaves in params.items()
              for name, leaf in leaves.items()}
    assert shapes == {
        "conv1/kernel": (5, 5, 1, 6), "conv1/bias": (6,),
        "conv2/kernel": (5, 5, 6, 16), "conv2/bias": (16,),
        "fc1/kernel": (256, 120), "fc1/bias": (120,),
        "fc2/kernel": (120, 84), "fc2/bias": (84,),
        "fc3/kernel": (84, 10), "fc3/bias": (10,)}
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == 44426


def test_mlp_is_lenet_300_100():
    params = get_model("mlp").init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert [params[f"fc{i}"]["kernel"].shape for i in (1, 2, 3)] == [
        (784, 300), (300, 100), (100, 10)]


def test_rescnn_has_four_residual_blocks_and_vit_four_heads_four_layers():
    x = jnp.zeros((1, 28, 28, 1))
    res = get_model("rescnn").init(jax.random.key(0), x)
    assert sorted(k for k in res if k.startswith("block")) == [
        "block0", "block1", "block2", "block3"]
    vit = get_model("vit").init(jax.random.key(0), x)
    assert sorted(k for k in vit if k.startswith("layer")) == [
        "layer0", "layer1", "layer2", "layer3"]
    assert vit["layer0"]["attention"]["out"]["kernel"].shape[0] == 4
    assert vit["embed"]["kernel"].shape[0] == 7 * 7  # 7x7 patches


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as error:
        get_model("resnet50")
    for name in model_names():
        assert name in str(error.value)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        get_model("lenet5", num_classes=0)


@pytest.mark.parametrize("padding, kernel_size, tile", [
    ("VALID", (5, 5), 4), ("VALID", (5, 5), 100), ("VALID", (2, 3), 3),
    ("SAME", (3, 3), 4), ("SAME", (3, 3), 1), ("SAME", (2, 3), 100),
    ("SAME", (5, 5), 3)])
def test_banded_conv_matches_lax_conv(padding, kernel_size, tile):
    kx, kk, kb = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 12, 11, 3))
    kernel = jax.random.normal(kk, (*kernel_size, 3, 4))
    bias = jax.random.normal(kb, (4,))
    np.testing.assert_allclose(conv2d(x, kernel, bias, padding, tile),
                               reference_conv2d(x, kernel, bias, padding),
                               rtol=1e-5, atol=1e-5)


def test_banded_conv_gradients_match_lax_conv():
    kx, kk = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (3, 10, 10, 2))
    kernel = jax.random.normal(kk, (3, 3, 2, 5))

    def loss(conv, x, kernel):
        return jnp.sum(jnp.sin(conv(x, kernel, None, "SAME")))

    ours = jax.grad(lambda x, k: loss(conv2d, x, k), (0, 1))(x, kernel)
    ref = jax.grad(lambda x, k: loss(reference_conv2d, x, k), (0, 1))(
        x, kernel)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_patches_are_im2col():
    x = jnp.arange(2 * 4 * 5 * 3, dtype=jnp.float32).reshape(2, 4, 5, 3)
    kernel = jax.random.normal(jax.random.key(3), (2, 3, 3, 4))
    patches = extract_patches(x, (2, 3))
    assert patches.shape == (2, 3, 3, 18)
    np.testing.assert_allclose(patches @ kernel.reshape(18, 4),
                               reference_conv2d(x, kernel, None), rtol=1e-5)


def test_conv_rejects_bad_tile():
    with pytest.raises(ValueError, match="tile"):
        conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), None,
               "VALID", 0)


def test_conv_rejects_unknown_padding():
    with pytest.raises(ValueError, match="padding"):
        conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), None, "FULL")


def test_max_pool():
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(max_pool_2x2(x)[0, :, :, 0],
                                  [[5.0, 7.0], [13.0, 15.0]])
    odd = jnp.arange(35.0).reshape(1, 5, 7, 1)  # floor: last row/column out
    np.testing.assert_array_equal(max_pool_2x2(odd)[0, :, :, 0],
                                  [[8.0, 10.0, 12.0], [22.0, 24.0, 26.0]])


def _nhwc_block(x, kernel, bias):
    return max_pool_2x2(jax.nn.relu(reference_conv2d(x, kernel, bias)))


def _from_batch_minor(y):
    parts, channels, height, quarter, batch = y.shape
    return y.transpose(4, 2, 3, 0, 1).reshape(batch, height, quarter * parts,
                                              channels)


@pytest.mark.parametrize("shape, kernel_shape, tile", [
    ((3, 12, 12, 6), (5, 5, 6, 16), 4),   # LeNet-5's conv2
    ((2, 28, 28, 1), (5, 5, 1, 6), 4),    # LeNet-5's conv1
    ((2, 11, 10, 3), (3, 3, 3, 4), 4),    # odd output rows, padded tiles
    ((2, 9, 13, 2), (3, 2, 2, 5), 2),
    ((2, 9, 13, 2), (3, 2, 2, 5), 6),
    ((1, 6, 7, 2), (5, 5, 2, 3), 4),      # a single pooled output
])
def test_conv_relu_pool_matches_the_nhwc_composition(shape, kernel_shape,
                                                      tile):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, :shape[1] // 2] = 0.0            # flat background: pooling ties
    x = jnp.asarray(x)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(kernel_shape[-1]), jnp.float32)

    def ours(x, kernel, bias):
        return _from_batch_minor(conv_relu_pool(to_batch_minor(x), kernel,
                                                bias, tile))

    expected = _nhwc_block(x, kernel, bias)
    np.testing.assert_allclose(ours(x, kernel, bias), expected, atol=1e-4)
    weights = jnp.asarray(rng.standard_normal(expected.shape), jnp.float32)
    grads = jax.grad(lambda *a: jnp.sum(ours(*a) * weights), (0, 1, 2))(
        x, kernel, bias)
    reference = jax.grad(lambda *a: jnp.sum(_nhwc_block(*a) * weights),
                         (0, 1, 2))(x, kernel, bias)
    for got, want in zip(grads, reference):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("tile, kernel_size", [(4, 5), (4, 4), (6, 3)])
def test_conv_relu_pool_chains_in_the_interleaved_layout(tile, kernel_size):
    # The second block reads the first's column-interleaved output as it is,
    # including when its slab span is not a multiple of the interleave.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 30, 30, 1)), jnp.float32)
    k1 = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 1, 3)),
                     jnp.float32)
    k2 = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 3, 4)),
                     jnp.float32)
    b1, b2 = jnp.full((3,), 0.1), jnp.full((4,), -0.1)
    first = conv_relu_pool(to_batch_minor(x), k1, b1, tile)
    got = _from_batch_minor(conv_relu_pool(first, k2, b2, tile))
    want = _nhwc_block(_nhwc_block(x, k1, b1), k2, b2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    flat = flatten_batch_minor(conv_relu_pool(first, k2, b2, tile))
    np.testing.assert_allclose(flat.T, want.reshape(2, -1), rtol=1e-4,
                               atol=1e-3)


def test_conv_relu_pool_rejects_bad_input():
    x = jnp.zeros((1, 2, 8, 8, 1))
    with pytest.raises(ValueError, match="tile must be a positive even"):
        conv_relu_pool(x, jnp.zeros((3, 3, 2, 4)), jnp.zeros(4), tile=3)
    with pytest.raises(ValueError, match="expects 3 input channels"):
        conv_relu_pool(x, jnp.zeros((3, 3, 3, 4)), jnp.zeros(4))
    with pytest.raises(ValueError, match="too small"):
        conv_relu_pool(x, jnp.zeros((8, 8, 2, 4)), jnp.zeros(4))


def test_lenet5_equals_the_nhwc_network():
    # Same parameters, same logits as the plain [N, H, W, C] LeNet-5.
    model = get_model("lenet5")
    x = jnp.asarray(np.random.default_rng(2).random((5, 28, 28, 1)),
                    jnp.float32)
    params = model.init(jax.random.key(3), x)
    h = _nhwc_block(x, params["conv1"]["kernel"], params["conv1"]["bias"])
    h = _nhwc_block(h, params["conv2"]["kernel"], params["conv2"]["bias"])
    h = h.reshape(5, -1)
    for name in ("fc1", "fc2"):
        h = jax.nn.relu(h @ params[name]["kernel"] + params[name]["bias"])
    want = h @ params["fc3"]["kernel"] + params["fc3"]["bias"]
    np.testing.assert_allclose(model.apply(params, x), want, rtol=1e-5,
                               atol=1e-5)


def test_conv_relu_pool_stack_evaluates_nhwc_and_differentiates_batch_minor():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.random((3, 28, 28, 1)), jnp.float32)
    layers = ((jnp.asarray(rng.standard_normal((5, 5, 1, 6)), jnp.float32),
               jnp.full((6,), 0.05)),
              (jnp.asarray(rng.standard_normal((5, 5, 6, 16)), jnp.float32),
               jnp.full((16,), -0.05)))

    def nhwc(x, layers):
        for kernel, bias in layers:
            x = _nhwc_block(x, kernel, bias)
        return x.reshape(x.shape[0], -1)

    # Evaluation is the NHWC program itself (bit for bit).
    np.testing.assert_array_equal(
        conv_relu_pool_stack(x, layers),
        jax.jit(lambda x, layers: nhwc_banded(x, layers))(x, layers))
    weights = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    loss = lambda f: lambda x, layers: jnp.sum(f(x, layers) * weights)
    value, grads = jax.value_and_grad(loss(conv_relu_pool_stack), (0, 1))(
        x, layers)
    want_value, want = jax.value_and_grad(loss(nhwc), (0, 1))(x, layers)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def nhwc_banded(x, layers):
    for kernel, bias in layers:
        x = max_pool_2x2(jax.nn.relu(conv2d(x, kernel, bias)))
    return x.reshape(x.shape[0], -1)
