"""Deployed number formats: codes, scales, and bit faults in the codes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from recovjax.damage import formats, get_damage
from recovjax.damage.params import make_bit_flip, make_stuck_at

X = np.asarray(jax.random.normal(jax.random.key(0), (6, 5)), np.float32)
PARAMS = {"w": jnp.asarray(X), "b": jnp.linspace(-0.5, 0.5, 5)}

# Rounding of a value stored with a scale s: at most s / 2 for integers;
# for float8, half a step of the value's binade (2^-m relative) after
# scaling, up to a float32 rounding of the scale.
INT_BOUND = {"int8": 127.5, "int4": 7.5}


def _scale(x, bound, axis=None):
    return np.max(np.abs(x), axis=axis, keepdims=axis is not None) / bound


def test_every_format_names_its_layout_and_storage():
    widths = {"float32": 32, "bfloat16": 16, "float16": 16,
              "float8_e4m3": 8, "float8_e5m2": 8, "int8": 8, "int4": 4}
    assert set(formats.FORMATS) == set(widths)
    for name, width in widths.items():
        fmt = formats.get_format(name)
        layout = fmt.layout
        assert layout.width == width and layout.sign == (width - 1,)
        fields = layout.sign + layout.exponent + layout.mantissa
        assert fmt.integer or sorted(fields) == list(range(width)), name
    e4m3 = formats.get_format("float8_e4m3").layout
    assert (e4m3.exponent, e4m3.mantissa) == ((3, 4, 5, 6), (0, 1, 2))
    e5m2 = formats.get_format("float8_e5m2").layout
    assert (e5m2.exponent, e5m2.mantissa) == ((2, 3, 4, 5, 6), (0, 1))


def test_unscaled_codes_are_the_cast_bits():
    for name, dtype in (("float32", np.float32),
                        ("bfloat16", ml_dtypes.bfloat16),
                        ("float16", np.float16)):
        fmt = formats.get_format(name)
        encoded = formats.encode(X, fmt)
        assert encoded.scale is None
        want = X.astype(dtype).view(np.dtype(f"uint{fmt.layout.width}"))
        np.testing.assert_array_equal(np.asarray(encoded.codes), want)
        np.testing.assert_array_equal(
            np.asarray(formats.decode(encoded, fmt, jnp.float32)),
            X.astype(dtype).astype(np.float32))


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_integer_codes_round_to_the_symmetric_scale(name, granularity):
    fmt = formats.get_format(name, granularity)
    encoded = formats.encode(X, fmt)
    axis = 0 if granularity == "channel" else None
    scale = _scale(X, INT_BOUND[name], axis)
    np.testing.assert_allclose(np.broadcast_to(encoded.scale, X.shape),
                               np.broadcast_to(scale, X.shape), rtol=1e-6)
    codes = np.asarray(encoded.codes).astype(np.int64)
    width = fmt.layout.width
    assert codes.min() >= 0 and codes.max() < 2 ** width
    signed = np.where(codes >= 2 ** (width - 1), codes - 2 ** width, codes)
    # round(x / s), clipped to the code range; decode gives code * s.
    want = np.clip(np.round(X / scale), -2 ** (width - 1),
                   2 ** (width - 1) - 1)
    near_half = np.abs(np.abs(X / scale) % 1 - 0.5) < 1e-4
    assert np.all((signed == want) | near_half)
    decoded = np.asarray(formats.decode(encoded, fmt, jnp.float32))
    np.testing.assert_allclose(decoded, signed * np.broadcast_to(
        scale, X.shape), rtol=1e-6, atol=0)
    assert np.all(np.abs(decoded - X) <= 0.5 * np.broadcast_to(
        scale, X.shape) * (1 + 1e-5) + 1e-7)


def test_float8_codes_are_scaled_float8():
    for name, dtype, mantissa in (("float8_e4m3", ml_dtypes.float8_e4m3fn, 3),
                                  ("float8_e5m2", ml_dtypes.float8_e5m2, 2)):
        fmt = formats.get_format(name)
        encoded = formats.encode(X, fmt)
        top = float(ml_dtypes.finfo(dtype).max)
        scale = float(np.asarray(encoded.scale).ravel()[0])
        np.testing.assert_allclose(scale, np.max(np.abs(X)) / top,
                                   rtol=1e-6)
        stored = np.asarray(encoded.codes).view(dtype).astype(np.float32)
        np.testing.assert_allclose(stored * scale, X,
                                   rtol=2.0 ** -mantissa, atol=0)
        decoded = np.asarray(formats.decode(encoded, fmt, jnp.float32))
        np.testing.assert_allclose(decoded, stored * scale, rtol=1e-6)


def test_deploy_keeps_non_floating_leaves():
    tree = {"w": PARAMS["w"], "steps": jnp.arange(3)}
    deployed = formats.deploy(tree, "int8")
    np.testing.assert_array_equal(np.asarray(deployed["steps"]),
                                  np.arange(3))
    assert deployed["w"].dtype == jnp.float32
    assert not np.array_equal(np.asarray(deployed["w"]), X)


def _hits(damage, name):
    return np.asarray(damage.mask[name])


def _close_to_deployed(got, deployed):
    # The same codes decoded by two programs: equal up to the float32
    # rounding of the scale (a few ulps of the value).
    got, deployed = np.asarray(got), np.asarray(deployed)
    return np.abs(got - deployed) <= np.abs(deployed) * 2.0 ** -21


@pytest.mark.parametrize("name,granularity", [("int8", "tensor"),
                                              ("int4", "channel"),
                                              ("float8_e4m3", "tensor")])
def test_sign_flips_in_the_codes(name, granularity):
    op = make_bit_flip(bits="sign", format=name, granularity=granularity,
                       mode="exact")
    damage = op(jax.random.key(1), PARAMS, 0.2)
    fmt = formats.get_format(name, granularity)
    deployed = formats.deploy(PARAMS, name, granularity)
    for leaf in ("w", "b"):
        hit = _hits(damage, leaf)
        assert hit.sum() == int(np.asarray(PARAMS[leaf]).size * 0.2)
        got = np.asarray(damage.params[leaf])
        assert np.all(_close_to_deployed(got[~hit],
                                         np.asarray(deployed[leaf])[~hit]))
        # A flipped sign bit: code ^ sign; decode it the same way.
        encoded = formats.encode(PARAMS[leaf], fmt)
        flipped = encoded.codes ^ jnp.asarray(1 << fmt.layout.sign[0],
                                              fmt.layout.uint)
        want = np.asarray(formats.decode(encoded._replace(codes=flipped),
                                         fmt, jnp.float32))
        assert np.all(_close_to_deployed(got[hit], want[hit]))


def test_a_rate_of_zero_is_the_deployed_model_and_keys_replay():
    op = get_damage("bit_flip", format="int8")
    clean = op(jax.random.key(3), PARAMS, 0.0)
    deployed = formats.deploy(PARAMS, "int8")
    for leaf in PARAMS:
        assert not _hits(clean, leaf).any()
        assert np.all(_close_to_deployed(clean.params[leaf],
                                         deployed[leaf]))
    first = op(jax.random.key(4), PARAMS, 0.05)
    again = op(jax.random.key(4), PARAMS, 0.05)
    for leaf in PARAMS:
        np.testing.assert_array_equal(np.asarray(first.params[leaf]),
                                      np.asarray(again.params[leaf]))


def test_stuck_at_one_in_int8_codes_reads_one():
    op = make_stuck_at(1, bits=6, format="int8", mode="exact")
    damage = op(jax.random.key(5), PARAMS, 0.5)
    fmt = formats.get_format("int8")
    encoded = formats.encode(damage.params["w"], fmt)
    hit = _hits(damage, "w")
    assert hit.sum() == 15
    assert np.all(np.asarray(encoded.codes)[hit] & (1 << 6))


def test_a_vmapped_stack_of_rates_damages_the_codes():
    op = make_bit_flip(format="int4", mode="exact")
    keys = jax.random.split(jax.random.key(6), 3)
    rates = jnp.asarray([0.0, 0.1, 0.3])
    damage = jax.jit(jax.vmap(lambda k, r: op(k, PARAMS, r)))(keys, rates)
    hits = np.asarray(damage.mask["w"]).reshape(3, -1).sum(axis=1)
    assert hits[0] == 0 and 0 < hits[1] <= hits[2]


def test_bad_formats_are_named():
    with pytest.raises(ValueError, match="format must be one of.*'int3'"):
        make_bit_flip(format="int3")
    with pytest.raises(ValueError, match="granularity must be one of"):
        make_bit_flip(format="int8", granularity="row")
    with pytest.raises(ValueError, match="needs a scaled format"):
        make_bit_flip(format="bfloat16", granularity="channel")
    with pytest.raises(ValueError, match="needs a scaled format"):
        make_bit_flip(granularity="channel")
    with pytest.raises(ValueError, match="bits='exponent': int8 codes"):
        make_bit_flip(bits="exponent", format="int8")
    with pytest.raises(ValueError, match="bits=5 is not a bit position of "
                       "int4"):
        make_bit_flip(bits=5, format="int4")
    op = make_bit_flip(format="int8")
    with pytest.raises(TypeError, match="deploying in int8 needs "
                       "floating-point leaves; leaf 'n'"):
        op(jax.random.key(0), {"n": jnp.arange(4)}, 0.1)
    with pytest.raises(TypeError, match="not int32; deploy it in a format"):
        make_bit_flip()(jax.random.key(0), {"n": jnp.arange(4)}, 0.1)


def test_configs_take_the_format_and_name_a_bad_one(tmp_path):
    from recovjax.config import ConfigError, load_config
    from recovjax.validation import check_config
    text = """\
name: deployed
model: lenet5
dataset: mnist5k
damage:
  - kind: bit_flip
    label: int8_sign
    ratios: [0.001]
    options: {bits: sign, format: int8, granularity: channel}
"""
    path = tmp_path / "deployed.yaml"
    path.write_text(text)
    check_config(load_config(path), source=path)
    path.write_text(text.replace("format: int8", "format: int9"))
    with pytest.raises(ConfigError, match=r"damage\[0\].*format must be one "
                       "of.*'int9'"):
        check_config(load_config(path), source=path)
