"""select × corrupt: the selections and corruptions operators are made of."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax.damage import compose, corrupt, make_sign_flip, make_zero
from recovjax.damage.scope import parse_scope

KEY = jax.random.key(7)
PARAMS = {"a": jnp.linspace(-2.0, 2.0, 60).reshape(6, 10),
          "b": jnp.linspace(0.5, 1.5, 7)}


def test_a_composed_core_is_the_operator():
    core = compose.parameter_core(
        compose.fraction_of_entries("exact", "leaf", "random"),
        corrupt.zero(), parse_scope("all"))
    ours = core(KEY, PARAMS, jnp.float32(0.3), None)
    theirs = make_zero()(KEY, PARAMS, 0.3)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(x, y)


def test_shaped_arrays_keep_their_shapes_and_the_mask_is_the_hit():
    x = jnp.arange(1.0, 25.0).reshape(2, 3, 4)
    (new,), (hit,) = compose.corrupt_arrays(
        KEY, compose.fraction_of_entries("exact", "leaf", "random"),
        corrupt.negate(), [x], jnp.float32(0.25), ["x"])
    assert new.shape == x.shape and hit.shape == x.shape
    assert int(hit.sum()) == 6
    np.testing.assert_array_equal(new, jnp.where(hit, -x, x))


def test_bit_cells_are_selected_per_position_and_hit_per_entry():
    x = jnp.ones((4, 5), jnp.float32)
    (new,), (hit,) = compose.corrupt_arrays(
        KEY, compose.fraction_of_entries("exact", "global", "random"),
        corrupt.bit_fault("flip", "exponent"), [x], jnp.float32(3 / 160),
        ["x"])
    # 3 of the 20 * 8 exponent bits: at most 3 entries, each off by a power
    # of two.
    assert 1 <= int(hit.sum()) <= 3
    changed = np.asarray(new != x)
    np.testing.assert_array_equal(changed, hit)
    ratios = np.log2(np.asarray(new)[changed])
    np.testing.assert_array_equal(ratios, np.round(ratios))


def test_chain_applies_in_order_with_folded_keys():
    selection = compose.fraction_of_entries("exact", "leaf", "random")
    both = corrupt.chain(corrupt.negate(), corrupt.clip(-1.0, 0.5))
    (new,), (hit,) = compose.corrupt_arrays(
        KEY, selection, both, [PARAMS["a"]], jnp.float32(0.5), ["a"])
    expected = jnp.where(hit, jnp.clip(-PARAMS["a"], -1.0, 0.5),
                         PARAMS["a"])
    np.testing.assert_array_equal(new, expected)
    assert corrupt.chain(corrupt.negate()).name == "sign flip"
    # Values drawn by a chained corruption come from a folded key.
    noise = corrupt.gaussian_noise()
    (alone,), _ = compose.corrupt_arrays(
        KEY, selection, noise, [PARAMS["a"]], jnp.float32(1.0), ["a"])
    (chained,), _ = compose.corrupt_arrays(
        KEY, selection, corrupt.chain(noise, corrupt.clip(-9.0, 9.0)),
        [PARAMS["a"]], jnp.float32(1.0), ["a"])
    assert not np.array_equal(alone, chained)


def test_every_entry_follows_the_amount():
    _, hits = compose.corrupt_arrays(
        KEY, compose.every_entry(), corrupt.gaussian_noise(),
        [PARAMS["a"], PARAMS["b"]], jnp.array([0.0, 0.1]), ["a", "b"])
    assert not bool(hits[0].any()) and bool(hits[1].all())


def test_errors_name_the_array():
    with pytest.raises(TypeError, match="sign flip needs floating-point "
                       "values; site 'n' has dtype int32"):
        compose.corrupt_arrays(
            KEY, compose.fraction_of_entries("exact", "leaf", "random"),
            corrupt.negate(), [jnp.arange(4)], jnp.float32(0.5), ["n"],
            noun="site", plural="values")
    with pytest.raises(ValueError, match="leaf 'w'.*bits=20 is not a bit "
                       "position of bfloat16"):
        compose.corrupt_arrays(
            KEY, compose.fraction_of_entries("bernoulli", "leaf", "random"),
            corrupt.bit_fault("flip", 20), [jnp.ones(3, jnp.bfloat16)],
            jnp.float32(0.5), ["w"])
    with pytest.raises(ValueError, match="fault must be one of"):
        corrupt.bit_fault("melt", "any")
    with pytest.raises(ValueError, match="distribution must be"):
        corrupt.random_values("cauchy")
    with pytest.raises(ValueError, match="at least one"):
        corrupt.chain()
    with pytest.raises(ValueError, match="different cells"):
        compose.corrupt_arrays(
            KEY, compose.fraction_of_entries("bernoulli", "leaf", "random"),
            corrupt.chain(corrupt.negate(), corrupt.bit_fault("flip", "any")),
            [jnp.ones(3)], jnp.float32(0.5), ["w"])


def test_sign_flip_is_still_negation_of_the_zeroed_entries():
    zeroed = make_zero()(KEY, PARAMS, 0.4)
    flipped = make_sign_flip()(KEY, PARAMS, 0.4)
    for m0, m1 in zip(jax.tree.leaves(zeroed.mask),
                      jax.tree.leaves(flipped.mask)):
        np.testing.assert_array_equal(m0, m1)
