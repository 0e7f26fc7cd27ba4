"""Data damage: fixed shapes, exact counts, labels, classes, vmap."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import tree_equal
from recovjax.damage import (add_input_noise, drop_samples, flip_labels,
                             make_drop_samples, make_label_noise,
                             remove_classes, removed_classes)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
RATIOS = st.floats(0.0, 1.0)
SEEDS = st.integers(0, 2**31 - 1)

N = 120
IMAGES = np.random.default_rng(0).normal(size=(N, 4, 4, 1)).astype(
    np.float32)
LABELS = (np.arange(N) % 10).astype(np.int32)
PAIRS = make_label_noise({3: 8, 8: 3, 5: 5})


def _count(size, ratio):
    return int(np.floor(np.float32(size) * np.float32(ratio)))


@SETTINGS
@given(ratio=RATIOS, seed=SEEDS)
def test_drop_samples_weights_out_an_exact_count(ratio, seed):
    damage = drop_samples(jax.random.key(seed), IMAGES, LABELS, ratio,
                          num_classes=10)
    mask = np.asarray(damage.mask)
    assert mask.sum() == _count(N, ratio)
    np.testing.assert_array_equal(np.asarray(damage.weights), ~mask)
    np.testing.assert_array_equal(np.asarray(damage.images), IMAGES)
    np.testing.assert_array_equal(np.asarray(damage.labels), LABELS)
    assert damage.weights.dtype == jnp.float32


def test_drop_samples_bernoulli_mode():
    op = make_drop_samples(mode="bernoulli")
    labels = np.zeros(20_000, np.int32)
    images = np.zeros((20_000, 1, 1, 1), np.float32)
    damage = op(jax.random.key(0), images, labels, 0.2, num_classes=2)
    assert abs(float(np.asarray(damage.mask).mean()) - 0.2) < 0.01


@SETTINGS
@given(rate=RATIOS, seed=SEEDS)
def test_symmetric_label_noise_moves_to_another_class(rate, seed):
    damage = flip_labels(jax.random.key(seed), IMAGES, LABELS, rate,
                         num_classes=10)
    labels, mask = np.asarray(damage.labels), np.asarray(damage.mask)
    assert mask.sum() == _count(N, rate)
    assert (labels[mask] != LABELS[mask]).all()
    np.testing.assert_array_equal(labels[~mask], LABELS[~mask])
    assert labels.min() >= 0 and labels.max() < 10
    assert np.asarray(damage.weights).all()


def test_symmetric_label_noise_is_uniform_over_other_classes():
    labels = np.zeros(9000, np.int32)
    images = np.zeros((9000, 1, 1, 1), np.float32)
    damage = flip_labels(jax.random.key(0), images, labels, 1.0,
                         num_classes=10)
    counts = np.bincount(np.asarray(damage.labels), minlength=10)
    assert counts[0] == 0
    assert np.all(np.abs(counts[1:] - 1000) < 120)


@SETTINGS
@given(rate=RATIOS, seed=SEEDS)
def test_label_mapping_is_respected(rate, seed):
    damage = PAIRS(jax.random.key(seed), IMAGES, LABELS, rate,
                   num_classes=10)
    labels, mask = np.asarray(damage.labels), np.asarray(damage.mask)
    changed = labels != LABELS
    np.testing.assert_array_equal(mask, changed)
    assert np.isin(LABELS[changed], [3, 8]).all()
    np.testing.assert_array_equal(labels[changed],
                                  np.where(LABELS[changed] == 3, 8, 3))
    # floor(eligible * rate) of the 36 samples of classes 3, 8 and 5 are
    # chosen; the 5 -> 5 pair chooses samples without changing them.
    assert changed.sum() <= _count(36, rate)


def test_label_mapping_chooses_among_source_classes_only():
    labels = np.repeat(np.arange(4, dtype=np.int32), 100)
    images = np.zeros((400, 1, 1, 1), np.float32)
    damage = make_label_noise({1: 2})(jax.random.key(0), images, labels,
                                      0.5, num_classes=4)
    mask = np.asarray(damage.mask)
    assert mask.sum() == 50 and (labels[mask] == 1).all()
    assert (np.asarray(damage.labels)[mask] == 2).all()


def test_input_noise_has_the_requested_scale():
    damage = add_input_noise(jax.random.key(0), IMAGES, LABELS, 0.3,
                             num_classes=10)
    delta = np.asarray(damage.images) - IMAGES
    assert abs(delta.std() - 0.3) < 0.02
    assert np.asarray(damage.mask).all()
    np.testing.assert_array_equal(np.asarray(damage.labels), LABELS)
    clean = add_input_noise(jax.random.key(0), IMAGES, LABELS, 0.0,
                            num_classes=10)
    np.testing.assert_array_equal(np.asarray(clean.images), IMAGES)


@SETTINGS
@given(ratio=RATIOS, seed=SEEDS)
def test_removed_classes_get_weight_zero(ratio, seed):
    key = jax.random.key(seed)
    damage = remove_classes(key, IMAGES, LABELS, ratio, num_classes=10)
    removed = np.asarray(removed_classes(key, ratio, 10))
    assert removed.sum() == _count(10, ratio)
    dropped = removed[LABELS]
    np.testing.assert_array_equal(np.asarray(damage.mask), dropped)
    np.testing.assert_array_equal(np.asarray(damage.weights), ~dropped)


def test_data_damage_vmaps_over_amounts_and_keys_with_one_trace():
    traces = 0
    op = functools.partial(flip_labels, num_classes=10)

    def damage_many(keys, rates):
        nonlocal traces
        traces += 1
        return jax.vmap(op, in_axes=(0, None, None, 0))(keys, IMAGES,
                                                        LABELS, rates)

    run = jax.jit(damage_many)
    rates = jnp.asarray([0.0, 0.1, 0.5, 1.0])
    first = run(jax.random.split(jax.random.key(0), 4), rates)
    second = run(jax.random.split(jax.random.key(1), 4), rates[::-1])
    assert traces == 1
    np.testing.assert_array_equal(np.asarray(first.mask).sum(axis=1),
                                  [0, 12, 60, 120])
    assert first.labels.shape == (4, N)
    assert not np.array_equal(first.mask[1], second.mask[2])


def test_inputs_are_not_mutated_and_keys_reproduce():
    images, labels = IMAGES.copy(), LABELS.copy()
    first = flip_labels(jax.random.key(3), images, labels, 0.5,
                        num_classes=10)
    again = flip_labels(jax.random.key(3), images, labels, 0.5,
                        num_classes=10)
    other = flip_labels(jax.random.key(4), images, labels, 0.5,
                        num_classes=10)
    np.testing.assert_array_equal(images, IMAGES)
    np.testing.assert_array_equal(labels, LABELS)
    assert tree_equal(first, again)
    assert not np.array_equal(first.mask, other.mask)


@pytest.mark.parametrize("call, error, message", [
    (lambda: drop_samples(jax.random.key(0), IMAGES, LABELS, 1.2,
                          num_classes=10), ValueError, "ratio is a fraction"),
    (lambda: flip_labels(jax.random.key(0), IMAGES, LABELS, -0.1,
                         num_classes=10), ValueError, "rate must be non-neg"),
    (lambda: add_input_noise(jax.random.key(0), IMAGES, LABELS, np.inf,
                             num_classes=10), ValueError, "scale must be fin"),
    (lambda: remove_classes(jax.random.key(0), IMAGES, LABELS, np.nan,
                            num_classes=10), ValueError, "ratio must be a num"),
    (lambda: drop_samples(jax.random.key(0), IMAGES, LABELS, 0.1,
                          num_classes=5), ValueError,
     r"labels: must lie in \[0, 5\)"),
    (lambda: drop_samples(jax.random.key(0), IMAGES, LABELS[:10], 0.1,
                          num_classes=10), ValueError,
     "same number of samples"),
    (lambda: drop_samples(jax.random.key(0), IMAGES, LABELS[:, None], 0.1,
                          num_classes=10), ValueError, "one-dimensional"),
    (lambda: drop_samples(jax.random.key(0), IMAGES, LABELS.astype(float),
                          0.1, num_classes=10), TypeError,
     "labels must be integers"),
    (lambda: drop_samples(jax.random.key(0), IMAGES, LABELS, 0.1,
                          num_classes=10.0), TypeError,
     "num_classes must be a Python int"),
    (lambda: flip_labels(jax.random.key(0), IMAGES, LABELS * 0, 0.1,
                         num_classes=1), ValueError,
     "num_classes must be at least 2"),
    (lambda: PAIRS(jax.random.key(0), IMAGES, LABELS % 5, 0.1,
                   num_classes=5), ValueError,
     "mapping class 8 is not below num_classes=5"),
    (lambda: drop_samples(0, IMAGES, LABELS, 0.1, num_classes=10),
     TypeError, r"jax\.random\.key"),
])
def test_data_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("mapping, error, message", [
    ({3: -1}, ValueError, "non-negative ints"),
    ({3: 1.5}, ValueError, "non-negative ints"),
    ([(1, 2), (1, 3)], ValueError, "source class twice"),
    ({}, ValueError, "at least one class pair"),
    (7, TypeError, "mapping must be a dict"),
])
def test_bad_mappings_are_refused_at_construction(mapping, error, message):
    with pytest.raises(error, match=message):
        make_label_noise(mapping)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        make_drop_samples(mode="some")
