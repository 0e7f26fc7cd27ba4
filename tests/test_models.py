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
                                    patch_conv, reference_conv2d,
                                    to_batch_minor)

from _tolerance import assert_sums_close
from conftest import tree_equal


@pytest.mark.parametrize("name", ["lenet5", "mlp", "rescnn", "vit"])
def test_output_shape_and_dtype(name):
    model = get_model(name)
    # The definition: one object per arguments, with abstract parameters
    # that real ones from init match in paths, shapes and dtypes.
    assert get_model(name) is model
    assert all(isinstance(leaf, jax.ShapeDtypeStruct)
               for leaf in jax.tree.leaves(model.params))
    x = jnp.zeros((3, 28, 28, 1))
    params = model.init(jax.random.key(0), x)
    assert jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), params) == (
        jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype),
                     model.abstract_params()))
    logits = model.forward(params, x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    # The full form returns the (unchanged, evaluation-mode) state too.
    outputs, state = model.apply(params, model.state, x)
    np.testing.assert_array_equal(outputs, logits)
    assert tree_equal(state, model.state)
    assert model.num_classes == 10
    four = get_model(name, num_classes=4)
    assert four.num_classes == 4
    assert jax.eval_shape(four.forward, four.abstract_params(), x).shape == (
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
    # One sum of kh * kw * 3 products and the bias per output.
    assert_sums_close(conv2d(x, kernel, bias, padding, tile),
                      reference_conv2d(x, kernel, bias, padding),
                      terms=kernel_size[0] * kernel_size[1] * 3 + 1,
                      magnitude=reference_conv2d(abs(x), abs(kernel),
                                                 abs(bias), padding))


def test_banded_conv_gradients_match_lax_conv():
    kx, kk = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (3, 10, 10, 2))
    kernel = jax.random.normal(kk, (3, 3, 2, 5))

    def loss(conv, x, kernel):
        return jnp.sum(jnp.sin(conv(x, kernel, None, "SAME")))

    ours = jax.grad(lambda x, k: loss(conv2d, x, k), (0, 1))(x, kernel)
    ref = jax.grad(lambda x, k: loss(reference_conv2d, x, k), (0, 1))(
        x, kernel)
    # The forward sum (18 terms) feeds cos (one more rounding), then the
    # gradient sums over 3 * 10 * 10 positions (kernel) or 3 * 3 * 5 taps
    # (input). |cos| <= 1, so the gradient of the plain sum of the
    # convolution of |x| and |kernel| bounds its terms; the forward error
    # reaches it scaled by at most 1 + the largest forward magnitude.
    forward = reference_conv2d(abs(x), abs(kernel), None, "SAME")
    magnitudes = jax.grad(lambda x, k: jnp.sum(
        reference_conv2d(x, k, None, "SAME")), (0, 1))(abs(x), abs(kernel))
    for a, b, magnitude in zip(ours, ref, magnitudes):
        assert_sums_close(a, b, terms=18 + 1 + 300,
                          magnitude=magnitude * (1 + float(forward.max())))


def test_patches_are_im2col():
    x = jnp.arange(2 * 4 * 5 * 3, dtype=jnp.float32).reshape(2, 4, 5, 3)
    kernel = jax.random.normal(jax.random.key(3), (2, 3, 3, 4))
    patches = extract_patches(x, (2, 3))
    assert patches.shape == (2, 3, 3, 18)
    assert_sums_close(patches @ kernel.reshape(18, 4),
                      reference_conv2d(x, kernel, None), terms=18,
                      magnitude=patches @ abs(kernel).reshape(18, 4))


FLAX_2D = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1),
                                       (0, 3, 1, 2))


@pytest.mark.parametrize("shape, kernel_shape, strides, padding", [
    ((2, 7, 7, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1))),
    ((2, 2, 2, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1))),
    ((2, 1, 1, 5), (3, 3, 5, 2), (1, 1), ((1, 1), (1, 1))),
    ((2, 4, 4, 3), (1, 1, 3, 4), (2, 2), ((0, 0), (0, 0))),
    ((2, 6, 5, 2), (3, 3, 2, 3), (1, 2), "SAME"),
    ((2, 6, 5, 2), (3, 2, 2, 3), (2, 1), "VALID")])
def test_patch_conv_matches_lax_conv_with_gradients(shape, kernel_shape,
                                                    strides, padding):
    kx, kk, kw = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(kx, shape)
    kernel = jax.random.normal(kk, kernel_shape)

    def conv(function, x, kernel):
        return function(x, kernel, strides, padding,
                        dimension_numbers=FLAX_2D)

    ours = conv(patch_conv, x, kernel)
    ref = conv(jax.lax.conv_general_dilated, x, kernel)
    taps = kernel_shape[0] * kernel_shape[1] * kernel_shape[2]
    assert ours.shape == ref.shape
    assert_sums_close(ours, ref, terms=taps,
                      magnitude=conv(jax.lax.conv_general_dilated, abs(x),
                                     abs(kernel)))
    weights = jax.random.normal(kw, ref.shape)

    def loss(function):
        return lambda x, k: jnp.sum(conv(function, x, k) * weights)

    grads = jax.grad(loss(patch_conv), (0, 1))(x, kernel)
    reference = jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(
        x, kernel)
    magnitudes = jax.grad(lambda x, k: jnp.sum(
        conv(jax.lax.conv_general_dilated, x, k) * abs(weights)), (0, 1))(
            abs(x), abs(kernel))
    # An input gradient sums over the taps and output channels that read
    # it, a kernel gradient over the output positions.
    terms = (kernel_shape[0] * kernel_shape[1] * kernel_shape[3],
             ref.shape[0] * ref.shape[1] * ref.shape[2])
    for a, b, magnitude, count in zip(grads, reference, magnitudes, terms):
        assert_sums_close(a, b, terms=count, magnitude=magnitude)


def test_patch_conv_defers_what_it_does_not_cover_to_lax():
    x = jax.random.normal(jax.random.key(5), (2, 6, 6, 4))
    kernel = jax.random.normal(jax.random.key(6), (3, 3, 2, 4))
    full = jax.random.normal(jax.random.key(7), (3, 3, 4, 4))
    for options in ({"rhs_dilation": (2, 2)}, {"lhs_dilation": (2, 1)}):
        np.testing.assert_array_equal(
            patch_conv(x, full, (1, 1), ((1, 1), (1, 1)),
                       dimension_numbers=FLAX_2D, **options),
            jax.lax.conv_general_dilated(x, full, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=FLAX_2D,
                                         **options))
    np.testing.assert_array_equal(
        patch_conv(x, kernel, (1, 1), "SAME", dimension_numbers=FLAX_2D,
                   feature_group_count=2),
        jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=FLAX_2D,
                                     feature_group_count=2))


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


def _magnitude_block(x, kernel, bias):
    """An upper bound, fed absolute values, of every term's magnitude.

    The block on absolute values bounds the sums of absolute values of the
    block's terms (the ReLU is the identity there), and summing each 2x2
    window instead of taking its maximum routes the gradient to every
    entry of the window, so gradients of this bound the gradients' terms
    too, whichever entry the real max pooling picks.
    """
    return jax.lax.reduce_window(reference_conv2d(x, kernel, bias), 0.0,
                                 jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1),
                                 "VALID")


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
    taps = kernel_shape[0] * kernel_shape[1] * kernel_shape[2] + 1
    assert_sums_close(ours(x, kernel, bias), expected, terms=taps,
                      magnitude=_nhwc_block(abs(x), abs(kernel), abs(bias)))
    weights = jnp.asarray(rng.standard_normal(expected.shape), jnp.float32)
    grads = jax.grad(lambda *a: jnp.sum(ours(*a) * weights), (0, 1, 2))(
        x, kernel, bias)
    reference = jax.grad(lambda *a: jnp.sum(_nhwc_block(*a) * weights),
                         (0, 1, 2))(x, kernel, bias)
    # The longest backward sum runs over every output position (kernel and
    # bias gradients); the input gradient sums kh * kw * out taps.
    positions = shape[0] * (shape[1] - kernel_shape[0] + 1) * (
        shape[2] - kernel_shape[1] + 1)
    magnitudes = jax.grad(lambda *a: jnp.sum(
        _magnitude_block(*a) * abs(weights)), (0, 1, 2))(
            abs(x), abs(kernel), abs(bias))
    for got, want, magnitude in zip(grads, reference, magnitudes):
        assert_sums_close(got, want, magnitude=magnitude,
                          terms=taps + max(positions, kernel_shape[0] *
                                           kernel_shape[1] *
                                           kernel_shape[3]))


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
    # Two chained sums (kernel_size**2 * 1 and * 3 taps, plus the biases);
    # the first's error reaches the output through |k2|, as in the chain
    # on absolute values.
    terms = kernel_size ** 2 * (1 + 3) + 2
    magnitude = _nhwc_block(_nhwc_block(abs(x), abs(k1), abs(b1)), abs(k2),
                            abs(b2))
    assert_sums_close(got, want, terms=terms, magnitude=magnitude)
    flat = flatten_batch_minor(conv_relu_pool(first, k2, b2, tile))
    assert_sums_close(flat.T, want.reshape(2, -1), terms=terms,
                      magnitude=magnitude.reshape(2, -1))


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
    # Five chained sums, each with its bias: 25, 150, 256, 120 and 84 terms,
    # relative to the last one's absolute terms.
    assert_sums_close(model.forward(params, x), want,
                      terms=26 + 151 + 257 + 121 + 85,
                      magnitude=abs(h) @ abs(params["fc3"]["kernel"]) +
                      abs(params["fc3"]["bias"]))


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
    # The loss chains the two convolutions (25 and 150 taps, plus bias)
    # and the weighted sum of 3 * 256 outputs, relative to that last sum's
    # absolute terms. (The loss, a signed sum, is far smaller than they
    # are: rtol=1e-5 of it failed on an AVX-512 Xeon at 1.29e-5.)
    forward = 26 + 151 + 3 * 256
    assert_sums_close(value, want_value, terms=forward,
                      magnitude=jnp.sum(abs(weights * nhwc(x, layers))))
    # Backward: the longest chain is conv2's input gradient (5 * 5 * 16
    # taps) then conv1's kernel gradient (3 * 24 * 24 positions), after
    # the forward sums that the ReLU masks and pooling choices depend on.

    def magnitude_network(x, layers):
        for kernel, bias in layers:
            x = _magnitude_block(x, kernel, bias)
        return jnp.sum(abs(weights) * x.reshape(x.shape[0], -1))

    magnitudes = jax.grad(magnitude_network, (0, 1))(
        abs(x), jax.tree.map(abs, layers))
    for got, expected, bound in zip(jax.tree.leaves(grads),
                                    jax.tree.leaves(want),
                                    jax.tree.leaves(magnitudes)):
        assert_sums_close(got, expected, magnitude=bound,
                          terms=forward + 5 * 5 * 16 + 3 * 24 * 24)


def nhwc_banded(x, layers):
    for kernel, bias in layers:
        x = max_pool_2x2(jax.nn.relu(conv2d(x, kernel, bias)))
    return x.reshape(x.shape[0], -1)
