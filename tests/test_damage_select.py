"""Selection kernels: distinct draws, exact counts, ties, boundary checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from recovjax.damage import select

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
SIZES = (1, 300, 7, 2049)


@functools.partial(jax.jit, static_argnames=("sizes", "global_count"))
def _exact(key, ratio, sizes, global_count=False):
    if global_count:
        counts = select.count_of(sum(sizes), ratio)
        groups = [0] * len(sizes)
    else:
        counts = jnp.stack([select.count_of(n, ratio) for n in sizes])
        groups = None
    return (select.draw_bits(key, sizes),
            select.select_random(key, sizes, counts, groups=groups))


@functools.partial(jax.jit, static_argnames=("global_count",))
def _smallest(values, ratio, global_count=False):
    if global_count:
        counts = select.count_of(sum(v.size for v in values), ratio)
        groups = [0] * len(values)
    else:
        counts = jnp.stack([select.count_of(v.size, ratio) for v in values])
        groups = None
    return select.select_smallest(values, counts, groups=groups)


def _expected_count(size, ratio):
    return int(np.floor(np.float32(size) * np.float32(ratio)))


def test_draws_are_distinct_reproducible_and_prefix_stable():
    key = jax.random.key(3)
    first = np.concatenate([np.asarray(d)
                            for d in select.draw_bits(key, (1000, 3000))])
    again = np.concatenate([np.asarray(d)
                            for d in select.draw_bits(key, (1000, 3000))])
    prefix = np.asarray(select.draw_bits(key, (1000,))[0])
    other = np.concatenate([np.asarray(d) for d in select.draw_bits(
        jax.random.key(4), (1000, 3000))])
    assert np.unique(first).size == first.size
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[:1000], prefix)
    assert (first != other).mean() > 0.99


def test_draws_look_uniform():
    bits = np.asarray(select.draw_bits(jax.random.key(0), (65536,))[0])
    histogram = np.bincount(bits >> 28, minlength=16)
    expected = bits.size / 16
    chi2 = ((histogram - expected) ** 2 / expected).sum()
    assert chi2 < 40  # 15 degrees of freedom: p < 1e-3 above ~37.7
    # Every bit is set about half the time (no stuck bits in the mixer).
    ones = np.array([((bits >> b) & 1).mean() for b in range(32)])
    assert np.all(np.abs(ones - 0.5) < 0.01)
    normals = np.asarray(select.draw_normal(jax.random.key(1), (65536,))[0])
    assert abs(normals.mean()) < 0.02 and abs(normals.std() - 1) < 0.02
    uniforms = np.asarray(select.draw_uniform(jax.random.key(2), (1000,))[0])
    assert uniforms.min() > 0 and uniforms.max() < 1


def test_draws_refuse_more_than_2_to_the_32():
    with pytest.raises(ValueError, match="distinct"):
        select.draw_bits(jax.random.key(0), (2**31, 2**31 + 1))


@SETTINGS
@given(ratio=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
       global_count=st.booleans())
def test_exact_selection_counts_and_picks_smallest_draws(
        ratio, seed, global_count):
    # Arrays of one row, of several rows and of a ragged last row.
    sizes = SIZES
    draws, masks = _exact(jax.random.key(seed), ratio, sizes, global_count)
    draws = [np.asarray(d) for d in draws]
    masks = [np.asarray(m) for m in masks]
    if global_count:
        assert sum(m.sum() for m in masks) == _expected_count(sum(sizes),
                                                              ratio)
        groups = [(np.concatenate(draws), np.concatenate(masks))]
    else:
        for mask, size in zip(masks, sizes):
            assert mask.sum() == _expected_count(size, ratio)
        groups = list(zip(draws, masks))
    for values, mask in groups:
        if mask.any() and (~mask).any():
            assert values[mask].max() < values[~mask].min()


def _reference_random(draws, where, counts, groups):
    # The counts[g] smallest draws among each group's candidates.
    masks = [np.zeros(d.size, bool) for d in draws]
    for g in range(max(groups) + 1):
        members = [i for i, group in enumerate(groups) if group == g]
        values = np.concatenate([draws[i] for i in members])
        allowed = np.concatenate([where[i] for i in members])
        order = np.argsort(np.where(allowed, values.astype(np.int64), 2**33),
                           kind="stable")
        chosen = np.zeros(values.size, bool)
        chosen[order[:min(counts[g], allowed.sum())]] = True
        start = 0
        for i in members:
            masks[i] = chosen[start:start + draws[i].size]
            start += draws[i].size
    return masks


@pytest.mark.parametrize("groups", [(0, 1, 2, 3), (0, 1, 0, 1), (0, 0, 0, 0)])
def test_random_selection_with_masks_and_groups_equals_a_sort(groups):
    # Arrays that fill rows exactly, leave a ragged row, or fit in one;
    # candidate masks on two of them; groups spanning several arrays.
    sizes = (700, 9000, 128, 129)
    rng = np.random.default_rng(1)
    where = [np.ones(700, bool), rng.uniform(size=9000) < 0.3,
             np.ones(128, bool), rng.uniform(size=129) < 0.9]
    num_groups = max(groups) + 1
    eligible = [sum(where[i].sum() for i in range(4) if groups[i] == g)
                for g in range(num_groups)]
    pick = jax.jit(lambda key, counts, w1, w3: select.select_random(
        key, sizes, counts, where=[None, w1, None, w3], groups=groups))
    for seed, ratio in [(0, 0.3), (1, 0.77), (2, 1.0), (3, 0.01), (4, 0.0)]:
        counts = [int(np.floor(n * ratio)) for n in eligible]
        key = jax.random.key(seed)
        masks = pick(key, jnp.asarray(counts, jnp.int32),
                     jnp.asarray(where[1]), jnp.asarray(where[3]))
        draws = [np.asarray(d) for d in select.draw_bits(key, sizes)]
        expected = _reference_random(draws, where, counts, list(groups))
        for mask, want in zip(masks, expected):
            np.testing.assert_array_equal(np.asarray(mask), want)


@pytest.mark.parametrize("kind", ["random", "smallest"])
def test_sort_and_search_paths_choose_the_same_entries(kind, monkeypatch):
    sizes = (300, 7, 2049)
    rng = np.random.default_rng(0)
    values = [jnp.asarray(rng.integers(0, 50, n).astype(np.uint32))
              for n in sizes]
    where = [None, jnp.asarray(rng.uniform(size=7) < 0.5), None]

    def choose(ratio, key):
        counts = jnp.stack([select.count_of(n, ratio) for n in sizes])
        if kind == "random":
            return select.select_random(key, sizes, counts, where=where)
        return select.select_smallest(values, counts, where=where)

    run = jax.jit(choose)
    searched = [run(r, jax.random.key(i)) for i, r in enumerate(
        (0.0, 0.3, 0.71, 1.0))]
    monkeypatch.setattr(select, "SORT_LIMIT", 10**6)
    run = jax.jit(choose)
    sorted_ = [run(r, jax.random.key(i)) for i, r in enumerate(
        (0.0, 0.3, 0.71, 1.0))]
    for a, b in zip(searched, sorted_):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_exact_selection_is_uniform_over_positions():
    keys = jax.random.split(jax.random.key(0), 2000)
    select_many = jax.jit(jax.vmap(lambda k: _exact(k, 0.25, (40,))[1][0]))
    frequency = np.asarray(select_many(keys)).mean(axis=0)
    # Each position is chosen with probability exactly 10/40.
    assert np.all(np.abs(frequency - 0.25) < 0.05)
    pairs = np.asarray(select_many(keys))
    both = (pairs[:, :-1] & pairs[:, 1:]).mean()
    # P(two given positions) = (10 * 9) / (40 * 39).
    assert abs(both - 90 / 1560) < 0.01


@SETTINGS
@given(ties=st.integers(1, 6), ratio=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1), global_count=st.booleans())
def test_smallest_breaks_ties_by_position(ties, ratio, seed, global_count):
    rng = np.random.default_rng(seed)
    values = [rng.integers(0, ties, size).astype(np.uint32)
              for size in (33, 1500)]
    masks = _smallest([jnp.asarray(v) for v in values], ratio, global_count)
    masks = [np.asarray(m) for m in masks]
    if global_count:
        values, masks = [np.concatenate(values)], [np.concatenate(masks)]
    for value, mask in zip(values, masks):
        expected = np.zeros(value.size, bool)
        expected[np.argsort(value, kind="stable")[
            :_expected_count(value.size, ratio)]] = True
        np.testing.assert_array_equal(mask, expected)


def test_smallest_handles_extreme_values_and_where():
    values = jnp.asarray([0xFFFFFFFF, 0, 0xFFFFFFFF, 5, 0], jnp.uint32)
    where = jnp.asarray([True, False, True, True, True])
    pick = jax.jit(lambda count: select.select_smallest(
        [values], count, where=[where])[0])
    for count, expected in [(0, [0, 0, 0, 0, 0]), (2, [0, 0, 0, 1, 1]),
                            (3, [1, 0, 0, 1, 1]), (4, [1, 0, 1, 1, 1]),
                            (5, [1, 0, 1, 1, 1])]:
        np.testing.assert_array_equal(np.asarray(pick(count)),
                                      np.bool_(expected))


def test_largest_magnitude_orders_by_absolute_value_nan_first():
    x = jnp.asarray([0.5, -3.0, np.nan, 2.0, -0.0, np.inf], jnp.float32)
    largest, smallest = jax.jit(lambda x: (
        select.select_largest_magnitude([x], 3)[0],
        select.select_smallest_magnitude([x], 2)[0]))(x)
    np.testing.assert_array_equal(np.asarray(largest),
                                  [False, True, True, False, False, True])
    np.testing.assert_array_equal(np.asarray(smallest),
                                  [True, False, False, False, True, False])


def test_bernoulli_rate_and_extremes():
    draws = select.draw_bits(jax.random.key(5), (100_000,))
    for rate in (0.0, 0.1, 0.5, 1.0):
        mask = np.asarray(select.select_bernoulli(draws, rate)[0])
        assert abs(mask.mean() - rate) < 0.005
    assert np.asarray(select.select_bernoulli(draws, 1.0)[0]).all()
    assert not np.asarray(select.select_bernoulli(draws, 0.0)[0]).any()


def test_count_of_is_float32_floor_and_clips_traced_fractions():
    assert int(select.count_of(10, 0.7)) == 7
    assert int(select.count_of(30720, 0.1)) == 3072
    assert int(select.count_of(5, 1.0)) == 5
    assert int(select.count_of(5, 1.7)) == 5
    assert int(select.count_of(5, -0.3)) == 0
    assert int(select.count_of(5, jnp.float32(np.nan))) == 0


@pytest.mark.parametrize("amount, message", [
    (-0.1, "ratio must be non-negative"),
    (1.5, r"ratio is a fraction and must be in \[0, 1\]"),
    (float("nan"), "ratio must be a number, got NaN"),
    (float("inf"), "ratio must be finite"),
    (np.array([0.1, 0.2]), "ratio must be a scalar"),
])
def test_check_amount_rejects_bad_concrete_fractions(amount, message):
    with pytest.raises(ValueError, match=message):
        select.check_amount(amount, name="ratio", fraction=True)


def test_check_amount_scales_and_types():
    assert float(select.check_amount(3.5, name="scale", fraction=False)) == 3.5
    assert select.check_amount(1, name="ratio", fraction=True).dtype == (
        jnp.float32)
    with pytest.raises(ValueError, match="scale must be non-negative"):
        select.check_amount(-1.0, name="scale", fraction=False)
    with pytest.raises(TypeError, match="rate must be a real number"):
        select.check_amount("0.1", name="rate", fraction=True)
    with pytest.raises(TypeError, match="rate must be a real number"):
        select.check_amount(1j, name="rate", fraction=True)


def test_check_amount_passes_tracers_through():
    seen = jax.jit(lambda r: select.check_amount(r, name="ratio",
                                                 fraction=True))(7.0)
    assert float(seen) == 7.0


@pytest.mark.parametrize("key", [0, np.uint32(3),
                                 np.zeros(2, np.uint32)])
def test_check_key_rejects_untyped_keys(key):
    with pytest.raises(TypeError, match=r"jax\.random\.key"):
        select.check_key(key)


def test_check_key_rejects_key_arrays():
    with pytest.raises(TypeError, match="vmap over the keys"):
        select.check_key(jax.random.split(jax.random.key(0), 3))


def test_group_sums_switch_to_integers_when_float32_would_round():
    assert select._row_layout([1000], [0], 1).one_hot.dtype == np.float32
    assert select._row_layout([2**24], [0], 1).one_hot.dtype == np.int32
    # Both products give the same threshold.
    sizes, groups = (300, 2049, 7), [0, 1, 0]
    layout = select._row_layout(sizes, groups, 2)
    integer = layout._replace(one_hot=layout.one_hot.astype(np.int32))
    rng = np.random.default_rng(3)
    values = select._to_rows([jnp.asarray(rng.integers(0, 2**32, n,
                                                       dtype=np.uint32))
                              for n in sizes], 0xFFFFFFFF)
    counts = jnp.asarray([100, 1500], jnp.int32)
    np.testing.assert_array_equal(
        np.asarray(select._rows_threshold(values, layout, counts)),
        np.asarray(select._rows_threshold(values, integer, counts)))
