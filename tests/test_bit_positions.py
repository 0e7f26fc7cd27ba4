"""One bit at a given position: the bit-position curve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recovjax
from recovjax.damage import get_damage, make_bit_position_flip
from recovjax.damage.formats import decode, encode, get_format

KEY = jax.random.key(0)
PARAMS = {"a": jnp.array([[0.5, -3.0], [0.25, 1.0]], jnp.float32),
          "b": jnp.array([2.0, -0.125], jnp.float32)}


def _bits(x):
    return np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint32))


def test_the_largest_entry_gets_the_bit_and_nothing_else_changes():
    op = make_bit_position_flip()
    damage = op(KEY, PARAMS, 30)
    expected = _bits(PARAMS["a"]).copy()
    expected[0, 1] ^= 1 << 30
    np.testing.assert_array_equal(_bits(damage.params["a"]), expected)
    np.testing.assert_array_equal(damage.params["b"], PARAMS["b"])
    assert damage.mask["a"].tolist() == [[False, True], [False, False]]
    assert not damage.mask["b"].any()


def test_positions_are_traced_one_program_for_the_curve():
    op = make_bit_position_flip(count=2)
    traces = []

    def curve(positions):
        traces.append(1)
        return jax.vmap(lambda p: op(KEY, PARAMS, p).params)(positions)

    compiled = jax.jit(curve)
    out = compiled(jnp.arange(32.0))
    compiled(jnp.arange(32.0) + 1)
    assert len(traces) == 1
    # Position p of the two largest entries (-3.0 and 2.0), one per point.
    for position in (0, 22, 23, 31):
        flipped = _bits(out["a"][position])
        assert flipped[0, 1] == _bits(PARAMS["a"])[0, 1] ^ (1 << position)
        assert _bits(out["b"][position])[0] == (
            _bits(PARAMS["b"])[0] ^ (1 << position))


def test_a_position_beyond_the_width_flips_nothing():
    damage = jax.jit(lambda p: make_bit_position_flip()(KEY, PARAMS, p))(40)
    np.testing.assert_array_equal(damage.params["a"], PARAMS["a"])
    np.testing.assert_array_equal(damage.params["b"], PARAMS["b"])
    # The chosen entry is still marked: the mask is the selection.
    assert int(damage.mask["a"].sum()) == 1


def test_int8_codes_in_their_own_layout():
    op = make_bit_position_flip(format="int8")
    damage = op(KEY, PARAMS, 7)   # the sign bit of the two's complement code
    fmt = get_format("int8")
    # Encoded as the operator encodes (compiled: -3.0 / scale lands on a
    # half, whose rounding depends on how the division is compiled).
    encoded = jax.jit(lambda x: encode(x, fmt))(PARAMS["a"])
    flipped = np.asarray(encoded.codes).copy()
    flipped[0, 1] ^= 0x80
    expected = jax.jit(lambda c: decode(encoded._replace(codes=c), fmt,
                                        jnp.float32))(flipped)
    np.testing.assert_array_equal(damage.params["a"][0, 1], expected[0, 1])
    assert damage.mask["a"].tolist() == [[False, True], [False, False]]


def test_random_target_follows_the_key():
    op = make_bit_position_flip(count=1, target="random")
    masks = {tuple(np.concatenate([np.ravel(m) for m in jax.tree.leaves(
        op(jax.random.key(seed), PARAMS, 3).mask)])) for seed in range(12)}
    assert len(masks) > 1
    assert all(sum(m) == 1 for m in masks)


def test_bad_positions_and_choices_are_refused():
    op = make_bit_position_flip()
    with pytest.raises(ValueError, match="position must be a whole number"):
        op(KEY, PARAMS, 2.5)
    with pytest.raises(ValueError, match="position"):
        op(KEY, PARAMS, -1)
    with pytest.raises(ValueError, match="count must be a positive int"):
        make_bit_position_flip(count=0)
    with pytest.raises(ValueError, match="target must be one of"):
        make_bit_position_flip(target="median")
    with pytest.raises(TypeError, match="leaf 'n'"):
        op(KEY, {"n": jnp.arange(3)}, 1)
    assert get_damage("bit_position_flip").amount_name == "position"


def test_the_exponent_top_bit_of_the_largest_weight_destroys_lenet(
        lenet, trained_lenet, small_mnist):
    # The curve the issue asks for: mantissa bits leave accuracy where it
    # was, the top exponent bit (0 -> 1 for any weight below 2) multiplies
    # the largest weight by 2**128.
    result = recovjax.sweep(
        lenet, trained_lenet,
        damages={"bit": make_bit_position_flip(scope="weights")},
        ratios=[0, 8, 16, 30], seeds=[0], data=small_mnist.test,
        root_key=0, batch_size=100)
    accuracy = {r["ratio"]: r["value"] for r in result.table.rows
                if r["metric"] == "accuracy" and r["damage"] == "bit"}
    clean = [r["value"] for r in result.table.rows
             if r["metric"] == "accuracy" and r["damage"] == "none"][0]
    for position in (0, 8, 16):
        assert abs(accuracy[position] - clean) <= 1 / 200 + 1e-6
    assert accuracy[30] < clean / 2
    with pytest.raises(ValueError, match="ratios: damage 'bit' takes a bit "
                       "position"):
        recovjax.sweep(lenet, trained_lenet,
                       damages={"bit": make_bit_position_flip()},
                       ratios=[1.5], seeds=[0], data=small_mnist.test,
                       root_key=0)
