"""The one runner: padding, chunks and one compiled shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax import runner


def scaled(point, shared):
    key, amount = point
    return {"value": jnp.sum(shared * amount) + jax.random.uniform(key),
            "twice": 2 * amount}


def stack(count):
    keys = jax.random.split(jax.random.key(3), count)
    return keys, jnp.arange(count, dtype=jnp.float32)


def test_padding_is_dropped_and_points_are_independent():
    program = runner.map_points(scaled, group_size=2)
    shared = jnp.ones((5,))
    outputs = program(stack(7), shared)
    assert outputs["twice"].shape == (7,)
    np.testing.assert_array_equal(outputs["twice"], 2 * np.arange(7))
    keys, amounts = stack(7)
    alone = jax.jit(scaled)((keys[4], amounts[4]), shared)
    np.testing.assert_allclose(outputs["value"][4], alone["value"],
                               rtol=1e-6)


def test_long_stacks_run_in_equal_chunks_of_one_compiled_shape():
    shared = jnp.ones((5,))
    chunked = runner.map_points(scaled, chunk_points=3)
    whole = runner.map_points(scaled, chunk_points=1000)
    devices = len(jax.devices())
    count = 7 * devices + 1
    assert chunked.chunk_size(count) <= 3 * devices
    assert chunked.chunk_size(count) % chunked.unit == 0
    got, want = chunked(stack(count), shared), whole(stack(count), shared)
    np.testing.assert_array_equal(got["twice"], want["twice"])
    np.testing.assert_allclose(got["value"], want["value"], rtol=1e-6)
    # Every chunk has one shape, so one more long stack compiles nothing.
    assert chunked.chunk_size(count + 1) == chunked.chunk_size(count)
    before = chunked._compiled._cache_size()
    chunked(stack(count + 1), shared)
    assert chunked._compiled._cache_size() == before


@pytest.mark.parametrize("option", ["group_size", "chunk_points"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_sizes_must_be_positive_ints(option, value):
    with pytest.raises(ValueError, match=option):
        runner.map_points(scaled, **{option: value})


def test_points_need_one_leading_axis():
    program = runner.map_points(scaled)
    keys, amounts = stack(4)
    with pytest.raises(ValueError, match="leading"):
        program((keys, amounts[:3]), jnp.ones((5,)))
    with pytest.raises(ValueError, match="devices is empty"):
        runner.map_points(scaled, devices=[])


def test_calls_are_sized_by_the_shared_entries_by_default():
    growth = runner.CALL_GROWTH_BYTES
    assert runner.auto_chunk_points(jnp.ones((5,))) == (
        runner.DEFAULT_CHUNK_POINTS)
    # About a byte per shared entry per point: a model of 11 M entries
    # gets a few points per device and call, a huge one still gets one.
    big = jax.ShapeDtypeStruct((11_000_000,), jnp.float32)
    assert runner.auto_chunk_points({"w": big, "key": jax.random.key(0)}
                                    ) == growth // 11_000_000
    assert runner.auto_chunk_points(jax.ShapeDtypeStruct(
        (2 * growth,), jnp.float32)) == 1
    program = runner.map_points(scaled)
    assert program.points_per_call(big) == growth // 11_000_000
    assert runner.map_points(scaled, chunk_points=7).points_per_call(
        big) == 7
    # A default-sized call over a large shared array: several equal calls,
    # the results of one.
    shared = jnp.ones((growth // 3,), jnp.float32)
    devices = len(jax.devices())
    count = 5 * devices
    assert program.chunk_size(count, shared) <= 3 * devices
    got = program(stack(count), shared)
    want = runner.map_points(scaled, chunk_points=1000)(stack(count), shared)
    np.testing.assert_array_equal(got["twice"], want["twice"])
    np.testing.assert_allclose(got["value"], want["value"], rtol=1e-6)
