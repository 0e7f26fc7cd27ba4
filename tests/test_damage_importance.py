"""Importance scores (Wanda, Taylor) and pruning ranked by them."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax.damage import get_damage
from recovjax.damage.importance import importance_scores, input_norms
from recovjax.evaluate import cross_entropy
from recovjax.models import from_equinox, from_linen

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (16, 6, 6, 2))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3), padding="VALID")(x))
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def _net():
    module = Net()
    return from_linen(module, module.init(KEY, X), sample=X)


def test_input_norms_are_the_squared_inputs_each_weight_multiplies():
    model = _net()
    norms = input_norms(model, model.params, X)
    assert set(norms) == {"Conv_0/kernel", "Dense_0/kernel"}
    # The convolution's weight (i, j, c, o) multiplies the inputs at
    # offset (i, j) of every 4 x 4 output position, channel c.
    conv = np.asarray(norms["Conv_0/kernel"])
    x = np.asarray(X, np.float64)
    for i, j, c in [(0, 0, 0), (2, 1, 1), (1, 2, 0)]:
        expected = np.sum(x[:, i:i + 4, j:j + 4, c] ** 2)
        np.testing.assert_allclose(conv[i, j, c], expected, rtol=1e-5)
        np.testing.assert_allclose(conv[i, j, c, 1:], conv[i, j, c, 0])
    params = model.params
    hidden = jax.nn.relu(jax.lax.conv_general_dilated(
        X, params["Conv_0"]["kernel"], (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
        + params["Conv_0"]["bias"]).reshape(16, -1)
    dense = np.asarray(norms["Dense_0/kernel"])
    np.testing.assert_allclose(dense[:, 0], np.sum(np.asarray(hidden) ** 2,
                                                   axis=0), rtol=1e-4)


def test_wanda_and_taylor_scores():
    model = _net()
    labels = jnp.arange(16) % 4
    wanda = importance_scores("wanda", model, model.params, X)
    norms = input_norms(model, model.params, X)
    np.testing.assert_allclose(
        wanda["Dense_0"]["kernel"],
        np.abs(model.params["Dense_0"]["kernel"]) * np.sqrt(
            norms["Dense_0/kernel"]), rtol=1e-6)
    # Leaves that are not kernels of a product keep their magnitude.
    np.testing.assert_array_equal(wanda["Dense_0"]["bias"],
                                  np.abs(model.params["Dense_0"]["bias"]))
    taylor = importance_scores("taylor", model, model.params, X, labels)
    gradient = jax.grad(lambda p: jnp.mean(cross_entropy(
        model.forward(p, X), labels)))(model.params)
    np.testing.assert_allclose(
        taylor["Conv_0"]["kernel"],
        (model.params["Conv_0"]["kernel"] * gradient["Conv_0"]["kernel"])
        ** 2, rtol=1e-6)


def test_an_equinox_models_out_in_kernels_are_scored():
    model = from_equinox(eqx.nn.Linear(5, 3, key=KEY),
                         sample=jnp.zeros((2, 5)))
    x = jax.random.normal(KEY, (10, 5))
    norms = input_norms(model, model.params, x)
    np.testing.assert_allclose(norms["weight"][0],
                               np.sum(np.asarray(x) ** 2, axis=0), rtol=1e-5)


def test_pruning_by_wanda_zeroes_the_smallest_scores_of_each_leaf():
    model = _net()
    op = get_damage("zero", scope="weights", target="wanda", calibration=8)
    with pytest.raises(TypeError, match="op.bind"):
        op(KEY, model.params, 0.5, info=model.info)
    bound = op.bind(model, X)
    damage = bound(KEY, model.params, 0.5, info=model.info)
    scores = importance_scores("wanda", model, model.params, X[:8])
    kernel = np.asarray(scores["Dense_0"]["kernel"]).ravel()
    mask = np.asarray(damage.mask["Dense_0"]["kernel"]).ravel()
    assert mask.sum() == kernel.size // 2
    assert kernel[mask].max() <= kernel[~mask].min()
    # Magnitude pruning chooses differently: the data changed the order.
    magnitude = get_damage("zero", scope="weights", target="smallest")(
        KEY, model.params, 0.5, info=model.info)
    assert not np.array_equal(mask, np.asarray(
        magnitude.mask["Dense_0"]["kernel"]).ravel())
    # The ratio stays traced: one program for every amount.
    masks = jax.jit(jax.vmap(lambda r: bound(KEY, model.params, r,
                                              info=model.info).mask))(
        jnp.asarray([0.25, 0.75]))
    assert int(masks["Dense_0"]["kernel"][1].sum()) == int(
        0.75 * kernel.size)


def test_importance_errors_name_the_problem():
    model = _net()
    with pytest.raises(ValueError, match="needs the calibration labels"):
        get_damage("zero", target="taylor", calibration=8).bind(model, X)
    with pytest.raises(ValueError, match="calibration: 256 examples asked "
                       "for, 16 given"):
        get_damage("zero", target="wanda").bind(model, X)
    with pytest.raises(ValueError, match="calibration must be a positive"):
        get_damage("zero", target="wanda", calibration=0)
    with pytest.raises(ValueError, match="target must be one of"):
        get_damage("sign_flip", target="wanda")
    with pytest.raises(ValueError, match="importance must be one of"):
        importance_scores("fisher", model, model.params, X)
