"""Parameter damage: counts, masks, scopes, bit faults, keys, recompiles."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import tree_equal
from recovjax.damage import (damage_names, damage_spec, get_damage,
                             make_bit_flip, make_gaussian_noise,
                             make_multiplicative_noise, make_random_values,
                             make_sign_flip, make_stuck_at, make_zero)
from recovjax.damage.params import bit_layout
from recovjax.models.info import LeafInfo, info_tree

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
RATIOS = st.floats(0.0, 1.0)
SEEDS = st.integers(0, 2**31 - 1)


def _tree(dtype=np.float32):
    rng = np.random.default_rng(0)
    return {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(dtype),
                     "bias": rng.normal(size=(4,)).astype(dtype)},
            "dense": {"kernel": rng.normal(size=(40, 7)).astype(dtype),
                      "bias": rng.normal(size=(7,)).astype(dtype)}}


TREE = _tree()
PATHS = ("conv/bias", "conv/kernel", "dense/bias", "dense/kernel")
# The leaf metadata a model would carry; role scopes need it.
INFO = info_tree(TREE, {path: LeafInfo(path.rsplit("/", 1)[-1])
                        for path in PATHS})


def _flat(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def _count(size, ratio):
    return int(np.floor(np.float32(size) * np.float32(ratio)))


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint32 if x.dtype.itemsize == 4 else np.uint16)


_TRACES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *args, **kwargs: _TRACES.append(name))


@contextlib.contextmanager
def _count_traces():
    start = len(_TRACES)
    counter = {"traces": 0}
    yield counter
    counter["traces"] = sum(name == "/jax/core/compile/jaxpr_trace_duration"
                            for name in _TRACES[start:])


# Operators shared by tests, so compiled programs are reused.
ZERO = make_zero()
ZERO_GLOBAL = make_zero(ratio_over="global")
ZERO_WEIGHTS = get_damage("zero", scope="weights")
ZERO_LARGEST = make_zero(target="largest")
FLIP_SIGN = make_sign_flip()


# --------------------------------------------------------------------------
# zero
# --------------------------------------------------------------------------


@SETTINGS
@given(ratio=RATIOS, seed=SEEDS)
def test_zero_counts_exactly_per_leaf_and_mask_is_changed_set(ratio, seed):
    damage = ZERO(jax.random.key(seed), TREE, ratio)
    for before, after, mask in zip(_flat(TREE), _flat(damage.params),
                                   _flat(damage.mask)):
        assert mask.dtype == np.bool_ and mask.shape == before.shape
        assert mask.sum() == _count(before.size, ratio)
        np.testing.assert_array_equal(after[mask], 0)
        np.testing.assert_array_equal(after[~mask], before[~mask])
        # No original entry is zero, so the mask is exactly what changed.
        np.testing.assert_array_equal(mask, after != before)


@SETTINGS
@given(ratio=RATIOS, seed=SEEDS)
def test_zero_global_ratio_counts_over_all_leaves(ratio, seed):
    damage = ZERO_GLOBAL(jax.random.key(seed), TREE, ratio)
    masks = _flat(damage.mask)
    total = sum(mask.size for mask in masks)
    assert sum(mask.sum() for mask in masks) == _count(total, ratio)


def test_zero_global_ratio_spreads_over_leaves():
    damage = ZERO_GLOBAL(jax.random.key(0), TREE, 0.5)
    fractions = [mask.mean() for mask in _flat(damage.mask)]
    assert all(0.1 < fraction < 0.9 for fraction in fractions)


def test_zero_marks_entries_that_were_already_zero():
    tree = jax.tree.map(np.zeros_like, TREE)
    damage = ZERO(jax.random.key(0), tree, 0.5)
    assert np.asarray(damage.mask["dense"]["kernel"]).sum() == 140
    assert tree_equal(damage.params, tree)


def test_zero_bernoulli_mode_is_independent_per_entry():
    tree = {"w": np.ones((300, 100), np.float32)}
    op = make_zero(mode="bernoulli")
    fractions = [float(np.asarray(op(jax.random.key(s), tree, 0.3).mask["w"]
                                  ).mean()) for s in range(3)]
    assert all(abs(f - 0.3) < 0.01 for f in fractions)
    assert len(set(fractions)) > 1  # not an exact count


def test_zero_targets_largest_magnitudes():
    damage = ZERO_LARGEST(jax.random.key(0), TREE, 0.25)
    for before, mask in zip(_flat(TREE), _flat(damage.mask)):
        k = _count(before.size, 0.25)
        order = np.argsort(-np.abs(before.ravel()), kind="stable")
        expected = np.zeros(before.size, bool)
        expected[order[:k]] = True
        np.testing.assert_array_equal(mask.ravel(), expected)
    # Targeted damage does not depend on the key.
    assert tree_equal(damage, ZERO_LARGEST(jax.random.key(9), TREE, 0.25))


def test_zero_smallest_magnitudes_is_magnitude_pruning():
    tree = {"w": np.array([[3.0, -0.1, 2.0, 0.5]], np.float32)}
    damage = make_zero(target="smallest")(jax.random.key(0), tree, 0.5)
    np.testing.assert_array_equal(np.asarray(damage.mask["w"]),
                                  [[False, True, False, True]])


def test_scope_weights_leaves_biases_untouched():
    damage = ZERO_WEIGHTS(jax.random.key(0), TREE, 0.5, info=INFO)
    for path, before, after, mask in zip(PATHS, _flat(TREE),
                                         _flat(damage.params),
                                         _flat(damage.mask)):
        if path.endswith("bias"):
            np.testing.assert_array_equal(after, before)
            assert not mask.any()
        else:
            assert mask.sum() == _count(before.size, 0.5)


def test_scope_regex_selects_by_path():
    damage = make_zero(scope=r"^dense/")(jax.random.key(0), TREE, 1.0)
    masks = dict(zip(PATHS, _flat(damage.mask)))
    assert masks["dense/kernel"].all() and masks["dense/bias"].all()
    assert not masks["conv/kernel"].any() and not masks["conv/bias"].any()


def test_scope_matching_nothing_names_the_pattern():
    op = make_zero(scope="attention")
    with pytest.raises(ValueError, match="'attention' matches no leaf"):
        op(jax.random.key(0), TREE, 0.1)


def test_invalid_regex_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"scope pattern '\(' is not a valid"):
        make_zero(scope="(")
    with pytest.raises(TypeError, match="scope must be"):
        make_zero(scope=3)


def test_inputs_are_not_mutated_and_keys_reproduce():
    tree = _tree()
    copy = jax.tree.map(np.copy, tree)
    first = ZERO(jax.random.key(1), tree, 0.5)
    again = ZERO(jax.random.key(1), tree, 0.5)
    other = ZERO(jax.random.key(2), tree, 0.5)
    assert tree_equal(tree, copy)
    assert tree_equal(first, again)
    different = [not np.array_equal(a, b) for a, b in
                 zip(_flat(first.mask), _flat(other.mask))]
    assert different[1] and different[3]  # the two kernels


def test_entry_operators_choose_the_same_entries_for_a_key():
    key = jax.random.key(4)
    zeroed = ZERO(key, TREE, 0.3).mask
    assert tree_equal(FLIP_SIGN(key, TREE, 0.3).mask, zeroed)


def test_one_trace_for_many_ratios_and_keys():
    traces = 0

    def damage_many(keys, ratios):
        nonlocal traces
        traces += 1
        return jax.vmap(ZERO, in_axes=(0, None, 0))(keys, TREE, ratios)

    run = jax.jit(damage_many)
    ratios = jnp.linspace(0.0, 1.0, 12)
    first = run(jax.random.split(jax.random.key(0), 12), ratios)
    # Traced ratios are clipped to [0, 1], NaN reads as 0.
    odd = jnp.asarray([1.7, -0.5, jnp.nan] + [0.5] * 9)
    second = run(jax.random.split(jax.random.key(1), 12), odd)
    assert traces == 1
    counts = np.asarray(first.mask["dense"]["kernel"]).sum(axis=(1, 2))
    np.testing.assert_array_equal(
        counts, [_count(280, r) for r in np.asarray(ratios)])
    counts = np.asarray(second.mask["dense"]["kernel"]).sum(axis=(1, 2))
    np.testing.assert_array_equal(counts[:4], [280, 0, 0, 140])


def test_direct_calls_do_not_retrace_for_new_amounts_or_keys():
    ZERO(jax.random.key(0), TREE, 0.5)
    with _count_traces() as counter:
        for seed, ratio in enumerate([0.0, 0.1, 1, np.float64(0.7),
                                      jnp.float32(0.2), True]):
            ZERO(jax.random.key(seed), TREE, ratio)
    assert counter["traces"] == 0


# --------------------------------------------------------------------------
# random values, noise, sign flip
# --------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["uniform", "normal"])
def test_random_values_follow_the_leaf_statistics(distribution):
    rng = np.random.default_rng(1)
    tree = {"w": (3.0 + 2.0 * rng.normal(size=(200, 50))).astype(np.float32)}
    damage = make_random_values(distribution)(jax.random.key(0), tree, 0.5)
    mask = np.asarray(damage.mask["w"])
    new = np.asarray(damage.params["w"])[mask]
    assert mask.sum() == 5000
    np.testing.assert_array_equal(np.asarray(damage.params["w"])[~mask],
                                  tree["w"][~mask])
    assert (new != tree["w"][mask]).all()
    if distribution == "uniform":
        assert new.min() >= tree["w"].min() and new.max() <= tree["w"].max()
        assert abs(new.mean() - (tree["w"].min() + tree["w"].max()) / 2) < 0.2
    else:
        assert abs(new.mean() - 3.0) < 0.1 and abs(new.std() - 2.0) < 0.1


def test_gaussian_noise_is_relative_to_each_leaf_std():
    rng = np.random.default_rng(2)
    tree = {"big": (10.0 * rng.normal(size=(100, 100))).astype(np.float32),
            "small": (0.1 * rng.normal(size=(100, 100))).astype(np.float32)}
    damage = make_gaussian_noise()(jax.random.key(0), tree, 0.5)
    for name in tree:
        delta = np.asarray(damage.params[name]) - tree[name]
        assert abs(delta.std() / tree[name].std() - 0.5) < 0.02
        assert np.asarray(damage.mask[name]).all()
    absolute = make_gaussian_noise(relative=False)(jax.random.key(0), tree, 0.5)
    delta = np.asarray(absolute.params["big"]) - tree["big"]
    assert abs(delta.std() - 0.5) < 0.02
    unchanged = make_gaussian_noise()(jax.random.key(0), tree, 0.0)
    assert tree_equal(unchanged.params, tree)


def test_multiplicative_noise_keeps_zeros_and_scales_entries():
    tree = {"w": np.concatenate([np.zeros(100), np.full(9900, 2.0)]).astype(
        np.float32)}
    damage = make_multiplicative_noise()(jax.random.key(0), tree, 0.1)
    after = np.asarray(damage.params["w"])
    np.testing.assert_array_equal(after[:100], 0)
    ratio = after[100:] / 2.0 - 1.0
    assert abs(ratio.std() - 0.1) < 0.01
    assert np.asarray(damage.mask["w"]).all()


@SETTINGS
@given(ratio=RATIOS, seed=SEEDS)
def test_sign_flip_negates_exactly_the_masked_entries(ratio, seed):
    damage = FLIP_SIGN(jax.random.key(seed), TREE, ratio)
    for before, after, mask in zip(_flat(TREE), _flat(damage.params),
                                   _flat(damage.mask)):
        assert mask.sum() == _count(before.size, ratio)
        np.testing.assert_array_equal(after[mask], -before[mask])
        np.testing.assert_array_equal(after[~mask], before[~mask])


# --------------------------------------------------------------------------
# bit faults
# --------------------------------------------------------------------------

BIT_CASES = [(np.float32, "exponent"), (jnp.bfloat16, "any"),
             (np.float16, "sign")]
BIT_OPS = {case: make_bit_flip(case[1], mode="exact") for case in BIT_CASES}
BIT_TREES = {dtype: _tree(dtype) for dtype in (np.float32, jnp.bfloat16,
                                               np.float16)}


def _allowed(dtype, bits):
    layout = bit_layout(dtype)
    positions = (range(layout.width) if bits == "any" else
                 getattr(layout, bits) if isinstance(bits, str) else (bits,))
    return sum(1 << p for p in positions), len(positions)


@pytest.mark.parametrize("case", BIT_CASES, ids=str)
@settings(max_examples=10, deadline=None, derandomize=True)
@given(rate=RATIOS, seed=SEEDS)
def test_exact_bit_flips_change_exactly_the_requested_bits(case, rate, seed):
    dtype, bits = case
    tree = BIT_TREES[dtype]
    damage = BIT_OPS[case](jax.random.key(seed), tree, rate)
    allowed, per_entry = _allowed(dtype, bits)
    for before, after, mask in zip(_flat(tree), _flat(damage.params),
                                   _flat(damage.mask)):
        assert after.dtype == before.dtype
        flipped = _bits(before) ^ _bits(after)
        assert not (flipped & ~np.asarray(allowed, flipped.dtype)).any()
        ones = np.unpackbits(flipped.view(np.uint8)).sum()
        assert ones == _count(before.size * per_entry, rate)
        np.testing.assert_array_equal(mask, flipped != 0)


def test_bernoulli_bit_flips_hit_the_rate_in_float32():
    tree = {"w": np.ones((200, 100), np.float32)}
    damage = make_bit_flip("mantissa")(jax.random.key(0), tree, 0.01)
    flipped = _bits(tree["w"]) ^ _bits(damage.params["w"])
    fraction = np.unpackbits(flipped.view(np.uint8)).sum() / (20000 * 23)
    assert abs(fraction - 0.01) < 0.001
    assert not (flipped & ~np.uint32((1 << 23) - 1)).any()


def test_bit_flips_may_produce_nan_and_inf():
    tree = {"w": np.ones((1000,), np.float32)}
    damage = make_bit_flip("exponent")(jax.random.key(0), tree, 1.0)
    after = np.asarray(damage.params["w"])
    # 1.0 has exponent 0b01111111; flipping all 8 gives 0b10000000 = 2.0.
    np.testing.assert_array_equal(after, 2.0)
    stuck = make_stuck_at(1, "exponent")(jax.random.key(0), tree, 1.0)
    assert np.isnan(np.asarray(stuck.params["w"])).sum() == 0
    assert np.isinf(np.asarray(stuck.params["w"])).all()


def test_stuck_at_forces_bits_and_marks_faulty_cells():
    # bfloat16 1.5 = 0x3FC0: bit 6 (top mantissa bit) is already 1.
    tree = {"w": np.full((500,), 1.5, jnp.bfloat16)}
    stuck_one = make_stuck_at(1, 6, mode="exact")(jax.random.key(0), tree,
                                                  0.4)
    assert tree_equal(stuck_one.params, tree)  # nothing changes ...
    assert np.asarray(stuck_one.mask["w"]).sum() == 200  # ... cells faulty
    stuck_zero = make_stuck_at(0, 6, mode="exact")(jax.random.key(0), tree,
                                                   0.4)
    after = np.asarray(stuck_zero.params["w"]).astype(np.float32)
    mask = np.asarray(stuck_zero.mask["w"])
    np.testing.assert_array_equal(mask, stuck_one.mask["w"])  # same cells
    np.testing.assert_array_equal(after[mask], 1.0)
    np.testing.assert_array_equal(after[~mask], 1.5)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64])
def test_bit_flips_refuse_other_dtypes_naming_the_leaf(dtype):
    tree = {"layer": {"kernel": np.ones((3, 3), np.float32),
                      "steps": np.ones((2,), dtype)}}
    with pytest.raises(TypeError, match="'layer/steps'.*not"):
        make_bit_flip()(jax.random.key(0), tree, 0.1)


def test_bit_position_beyond_the_width_names_the_leaf():
    with pytest.raises(ValueError, match="'w'.*bits=20 is not a bit position"
                                         " of bfloat16"):
        make_bit_flip(20)(jax.random.key(0),
                          {"w": np.ones(3, jnp.bfloat16)}, 0.1)


def test_noise_refuses_integer_leaves():
    with pytest.raises(TypeError, match="'count' has dtype int32"):
        make_gaussian_noise()(jax.random.key(0),
                              {"count": np.ones(3, np.int32)}, 0.1)


# --------------------------------------------------------------------------
# Errors at the boundary and at construction.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("op, amount, message", [
    (ZERO, -0.1, "ratio must be non-negative"),
    (ZERO, 1.01, "ratio is a fraction"),
    (ZERO, float("nan"), "ratio must be a number"),
    (ZERO, float("inf"), "ratio must be finite"),
    (make_bit_flip(), 2.0, "rate is a fraction"),
    (make_gaussian_noise(), -1.0, "scale must be non-negative"),
    (make_gaussian_noise(), float("inf"), "scale must be finite"),
])
def test_bad_concrete_amounts_are_refused_before_tracing(op, amount,
                                                         message):
    with _count_traces() as counter:
        with pytest.raises(ValueError, match=message):
            op(jax.random.key(0), TREE, amount)
    assert counter["traces"] == 0


def test_noise_scales_above_one_are_fine():
    damage = make_gaussian_noise()(jax.random.key(0), TREE, 3.0)
    assert not tree_equal(damage.params, TREE)


def test_untyped_keys_are_refused():
    with pytest.raises(TypeError, match=r"jax\.random\.key"):
        ZERO(0, TREE, 0.1)


@pytest.mark.parametrize("build, message", [
    (lambda: make_zero(mode="exactly"), "mode must be one of"),
    (lambda: make_zero(ratio_over="layer"), "ratio_over must be one of"),
    (lambda: make_zero(target="biggest"), "target must be one of"),
    (lambda: make_zero(target="largest", mode="bernoulli"),
     "needs mode='exact'"),
    (lambda: make_random_values("cauchy"), "distribution must be one of"),
    (lambda: make_bit_flip("fraction"), "bits must be one of"),
    (lambda: make_bit_flip(-1), "non-negative bit position"),
    (lambda: make_stuck_at(2), "value must be 0 or 1"),
])
def test_bad_static_choices_are_refused_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bits_of_the_wrong_type_are_refused():
    with pytest.raises(TypeError, match="bits must be one of"):
        make_bit_flip(2.5)


# --------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------


def test_registry_names_and_metadata():
    names = damage_names()
    for required in ("zero", "random_uniform", "random_normal",
                     "gaussian_noise", "multiplicative_noise", "sign_flip",
                     "bit_flip", "stuck_at_0", "stuck_at_1",
                     "remove_neurons", "remove_connections", "drop_blocks",
                     "remove_heads", "drop_samples", "label_noise",
                     "input_noise", "remove_classes"):
        assert required in names
    assert set(damage_names("data")) == {"drop_samples", "label_noise",
                                         "input_noise", "remove_classes"}
    assert damage_spec("zero").kind == "params"
    assert damage_spec("zero").amount_is_fraction
    assert not damage_spec("gaussian_noise").amount_is_fraction
    assert damage_spec("drop_blocks").kind == "structure"
    assert "value" not in damage_spec("stuck_at_1").options


def test_registry_builds_configured_operators():
    # ZERO_WEIGHTS, used by the scope tests, comes from the registry.
    assert "make_zero(scope='weights'" in ZERO_WEIGHTS.__doc__
    stuck = get_damage("stuck_at_1", bits="sign", mode="exact")
    after = stuck(jax.random.key(0), TREE, 1.0).params
    assert all((leaf <= 0).all() for leaf in _flat(after))
    assert "value=1" in stuck.__doc__


def test_registry_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown damage 'zeros'; valid "
                                         "names: zero, random_uniform"):
        get_damage("zeros")
    with pytest.raises(ValueError, match="unknown damage kind"):
        damage_names("weights")


def test_registry_unknown_option_names_it():
    with pytest.raises(TypeError, match="'zero' has no option 'ratio'; "
                                        "valid options: scope, mode"):
        get_damage("zero", ratio=0.1)
    with pytest.raises(TypeError, match="no option 'value'"):
        get_damage("stuck_at_0", value=1)
    with pytest.raises(ValueError, match="mode must be one of"):
        get_damage("bit_flip", mode="sometimes")
