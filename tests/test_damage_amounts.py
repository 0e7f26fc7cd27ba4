"""Per-leaf amounts: prefix trees of amounts (and None) per leaf."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax.damage import (checked, drop_blocks, flip_labels, get_damage,
                             leaf_paths, make_bit_flip, make_gaussian_noise,
                             make_random_values, make_sign_flip, make_zero,
                             remove_heads, remove_neurons, select_entries)
from recovjax.damage import select

KEY = jax.random.key(3)


def _tree():
    rng = np.random.default_rng(0)
    return {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(
                         np.float32),
                     "bias": rng.normal(size=(4,)).astype(np.float32)},
            "dense": {"kernel": rng.normal(size=(10, 10)).astype(np.float32),
                      "bias": rng.normal(size=(7,)).astype(np.float32)}}


TREE = _tree()
PATHS = leaf_paths(TREE)  # conv/bias, conv/kernel, dense/bias, dense/kernel

# Operators shared by tests, so compiled programs are reused.
PARAM_DAMAGE = ("zero", "random_uniform", "random_normal", "gaussian_noise",
                "multiplicative_noise", "sign_flip", "bit_flip", "stuck_at_0",
                "stuck_at_1", "remove_connections")
PARAM_OPS = {name: get_damage(name, **({"scope": "all"}
                                       if name == "remove_connections"
                                       else {}))
             for name in PARAM_DAMAGE}
ZERO = PARAM_OPS["zero"]
OPS = {
    "zero": ZERO,
    "random_values": PARAM_OPS["random_normal"],
    "sign_flip": PARAM_OPS["sign_flip"],
    "gaussian_noise": PARAM_OPS["gaussian_noise"],
    "bit_flip": PARAM_OPS["bit_flip"],
}


def _by_path(tree):
    return dict(zip(leaf_paths(tree), (np.asarray(leaf)
                                       for leaf in jax.tree.leaves(tree))))


def _bits(x):
    return np.asarray(x).view(np.uint32)


def _identical(first, second):
    # Bit-identical trees (NaN-safe: compares stored bits).
    a, b = jax.tree.leaves(first), jax.tree.leaves(second)
    return len(a) == len(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.array_equal(np.asarray(x).view(np.uint8),
                           np.asarray(y).view(np.uint8)) for x, y in zip(a, b))


# --------------------------------------------------------------------------
# Prefix trees and None.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPS))
def test_none_leaves_are_unchanged_with_false_masks(name):
    op = OPS[name]
    amount = {"conv": 0.6, "dense": {"kernel": 0.5, "bias": None}}
    damage = op(KEY, TREE, amount)
    before, after = _by_path(TREE), _by_path(damage.params)
    masks = _by_path(damage.mask)
    np.testing.assert_array_equal(_bits(after["dense/bias"]),
                                  _bits(before["dense/bias"]))
    assert not masks["dense/bias"].any()
    for path in ("conv/kernel", "conv/bias", "dense/kernel"):
        assert masks[path].any(), path
        # The mask covers every changed entry.
        assert not (after[path] != before[path])[~masks[path]].any(), path


@pytest.mark.parametrize("name", sorted(OPS))
def test_none_is_the_leaf_out_of_scope(name):
    # None drops a leaf out of the selection exactly as a scope does, so
    # the other leaves get what the scoped operator gives them.
    op = OPS[name]
    factory = {"zero": lambda: make_zero("^dense"),
               "random_values": lambda: make_random_values("normal",
                                                           "^dense"),
               "sign_flip": lambda: make_sign_flip("^dense"),
               "gaussian_noise": lambda: make_gaussian_noise("^dense"),
               "bit_flip": lambda: make_bit_flip(scope="^dense")}[name]
    tree_amount = op(KEY, TREE, {"conv": None, "dense": 0.4})
    scoped = factory()(KEY, TREE, 0.4)
    assert _identical(tree_amount, scoped)


@pytest.mark.parametrize("name", sorted(OPS))
def test_prefix_spreads_over_the_subtree(name):
    op = OPS[name]
    nested = op(KEY, TREE, {"conv": 0.3, "dense": {"kernel": 0.2,
                                                   "bias": 0.0}})
    full = op(KEY, TREE, {"conv": {"kernel": 0.3, "bias": 0.3},
                          "dense": {"kernel": 0.2, "bias": 0.0}})
    flat = op(KEY, TREE, {"conv": 0.3, "dense/kernel": 0.2,
                          "dense/bias": 0.0})
    assert _identical(nested, full) and _identical(flat, full)
    assert not _by_path(full.mask)["dense/bias"].any()


def test_all_none_leaves_everything_unchanged():
    damage = ZERO(KEY, TREE, {"conv": None, "dense": None})
    assert _identical(damage.params, TREE)
    assert not any(np.asarray(m).any() for m in jax.tree.leaves(damage.mask))


def test_list_parameters_take_a_list_prefix():
    params = [np.ones((10,), np.float32), np.ones((20,), np.float32)]
    damage = ZERO(KEY, params, [0.5, None])
    assert [int(np.asarray(m).sum()) for m in damage.mask] == [5, 0]
    assert int(np.asarray(ZERO(KEY, params, {"1": 0.5, "0": 0.0}).mask[1])
               .sum()) == 10


def test_scope_still_applies_whatever_the_amount():
    op = make_zero(scope="kernel$")
    damage = op(KEY, TREE, {"conv": 1.0, "dense": {"kernel": 0.5,
                                                   "bias": 1.0}})
    masks = _by_path(damage.mask)
    assert not masks["conv/bias"].any() and not masks["dense/bias"].any()
    assert masks["conv/kernel"].all() and masks["dense/kernel"].sum() == 50
    np.testing.assert_array_equal(_by_path(damage.params)["dense/bias"],
                                  TREE["dense"]["bias"])


# --------------------------------------------------------------------------
# Scalars, exact counts, zero amounts.
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", PARAM_DAMAGE)
def test_scalar_equals_the_full_tree_of_it(name):
    op = PARAM_OPS[name]
    assert op.per_leaf_amounts
    for amount in (0.0, 0.35, 1.0):
        scalar = op(KEY, TREE, amount)
        full = op(KEY, TREE, jax.tree.map(lambda _: amount, TREE))
        by_path = op(KEY, TREE, {path: amount for path in PATHS})
        assert _identical(scalar, full), amount
        assert _identical(scalar, by_path), amount


@pytest.mark.parametrize("op", [ZERO, PARAM_OPS["sign_flip"],
                                PARAM_OPS["random_uniform"],
                                make_zero(target="largest"),
                                make_zero(target="smallest")],
                         ids=["zero", "sign", "random", "largest", "smallest"])
def test_exact_counts_per_leaf(op):
    amount = {"conv": 0.0, "dense": {"kernel": 0.25, "bias": 0.0}}
    counts = {path: int(mask.sum())
              for path, mask in _by_path(op(KEY, TREE, amount).mask).items()}
    assert counts == {"conv/bias": 0, "conv/kernel": 0, "dense/bias": 0,
                      "dense/kernel": 25}


def test_exact_bit_faults_count_per_leaf():
    op = make_bit_flip("sign", mode="exact")
    damage = op(KEY, TREE, {"conv": 0.0, "dense": {"kernel": 0.25,
                                                   "bias": 0.0}})
    masks = _by_path(damage.mask)
    assert masks["dense/kernel"].sum() == 25
    assert sum(masks[p].sum() for p in PATHS if p != "dense/kernel") == 0
    after = _by_path(damage.params)["dense/kernel"]
    np.testing.assert_array_equal(after[masks["dense/kernel"]],
                                  -TREE["dense"]["kernel"][
                                      masks["dense/kernel"]])


@pytest.mark.parametrize("op", [make_zero(mode="bernoulli"),
                                PARAM_OPS["bit_flip"],
                                PARAM_OPS["stuck_at_1"]],
                         ids=["zero_bernoulli", "bit_flip", "stuck_at_1"])
def test_zero_rate_damages_nothing_on_that_leaf(op):
    masks = _by_path(op(KEY, TREE, {"conv": 0.0, "dense": 1.0}).mask)
    assert not masks["conv/kernel"].any() and not masks["conv/bias"].any()
    assert masks["dense/kernel"].all()


@pytest.mark.parametrize("op", [PARAM_OPS["gaussian_noise"],
                                make_gaussian_noise(relative=False),
                                PARAM_OPS["multiplicative_noise"]],
                         ids=["relative", "absolute", "multiplicative"])
def test_noise_of_scale_zero_leaves_the_leaf_unchanged_and_unmasked(op):
    tree = {"a": np.array([-0.0, 1.0, np.inf, -2.0], np.float32),
            "b": np.arange(1.0, 9.0, dtype=np.float32)}
    damage = op(KEY, tree, {"a": 0.0, "b": 0.5})
    masks = _by_path(damage.mask)
    np.testing.assert_array_equal(_bits(damage.params["a"]), _bits(tree["a"]))
    assert not masks["a"].any() and masks["b"].all()
    assert (np.asarray(damage.params["b"]) != tree["b"]).all()
    # A scalar 0 is the full tree of 0: nothing changed, nothing masked.
    zero = op(KEY, tree, 0.0)
    assert _identical(zero.params, tree)
    assert not any(np.asarray(m).any() for m in jax.tree.leaves(zero.mask))


def test_select_kernels_take_one_amount_per_leaf():
    leaves = [jnp.arange(200.0), jnp.arange(50.0)]
    sizes = [200, 50]
    choose = jax.jit(lambda ratio: select_entries(KEY, leaves, ratio))
    per_leaf = choose(jnp.array([0.3, 0.3]))
    scalar = choose(jnp.float32(0.3))
    assert all(np.array_equal(a, b) for a, b in zip(per_leaf, scalar))
    assert [int(np.asarray(m).sum()) for m in choose(jnp.array([0.5, 0.0]))
            ] == [100, 0]
    draws = select.draw_bits(KEY, sizes)
    mixed = jax.jit(select.select_bernoulli)(draws, jnp.array([0.0, 1.0]))
    assert not np.asarray(mixed[0]).any() and np.asarray(mixed[1]).all()
    with pytest.raises(ValueError, match="one per array"):
        select.select_bernoulli(draws, jnp.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="ratio_over='leaf'"):
        select_entries(KEY, leaves, jnp.array([0.3, 0.3]),
                       ratio_over="global")


# --------------------------------------------------------------------------
# Traced amount trees: vmap over one-hot trees, one compile.
# --------------------------------------------------------------------------


def _one_hot(value):
    # One amount tree per leaf: `value` on that leaf, 0.0 on the others,
    # stacked along a leading axis (the shape a sensitivity map vmaps).
    return {path: jnp.asarray([value if j == i else 0.0
                               for j in range(len(PATHS))], jnp.float32)
            for i, path in enumerate(PATHS)}


def _point(stack, index):
    return {path: float(values[index]) for path, values in stack.items()}


@pytest.mark.parametrize("name", ["zero", "bit_flip", "gaussian_noise"])
def test_one_hot_trees_vmap_in_one_compile_and_match_each_point(name):
    op = OPS[name]
    run = jax.jit(jax.vmap(op, in_axes=(0, None, 0)))
    keys = jax.random.split(KEY, len(PATHS))
    for value in (0.5, 0.25):
        stack = _one_hot(value)
        damage = run(keys, TREE, stack)
        for index, path in enumerate(PATHS):
            point = op(keys[index], TREE, _point(stack, index))
            got = jax.tree.map(lambda x: x[index], damage)
            assert _identical(got, point), (name, path)
            # Only the hot leaf is damaged, exactly as the scalar call
            # damages it.
            masks = _by_path(got.mask)
            scalar = _by_path(op(keys[index], TREE, value).mask)
            np.testing.assert_array_equal(masks[path], scalar[path])
            assert not any(masks[p].any() for p in PATHS if p != path)
    assert run._cache_size() == 1


def test_mixed_traced_and_concrete_entries():
    def damage_conv(key, ratio):
        return ZERO(key, TREE, {"conv": ratio, "dense": 0.5})

    damage = jax.jit(jax.vmap(damage_conv))(jax.random.split(KEY, 2),
                                            jnp.array([0.0, 1.0]))
    conv = np.asarray(damage.mask["conv"]["kernel"])
    assert not conv[0].any() and conv[1].all()
    assert (np.asarray(damage.mask["dense"]["kernel"]).sum(axis=(1, 2))
            == 50).all()


def test_checked_mode_checks_every_traced_entry():
    from jax.experimental import checkify
    op = checked(make_zero())

    def call(ratio):
        return op(KEY, TREE, {"conv": 0.1, "dense": {"kernel": ratio,
                                                     "bias": None}})

    error, _ = checkify.checkify(jax.jit(call))(jnp.float32(1.5))
    with pytest.raises(Exception, match="ratio at 'dense/kernel'"):
        error.throw()
    error, _ = checkify.checkify(jax.jit(call))(jnp.float32(0.5))
    error.throw()


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("amount, message", [
    ({"conv": 0.1, "dense": 0.1, "head": 0.1},
     r"entry at 'head', which the parameters do not have; valid keys at "
     r"the top level: conv, dense"),
    ({"conv": {"kernel": 0.1, "bais": 0.1}, "dense": 0.1},
     r"entry at 'conv/bais'.*valid keys under 'conv': bias, kernel"),
    ({"conv/kernal": 0.1, "conv/bias": 0.1, "dense": 0.1},
     r"entry at 'conv/kernal'.*valid keys under 'conv'"),
    ({"conv": 0.1}, r"no entry for 'dense'.*give None"),
    ({"conv": {"kernel": [0.1, 0.2], "bias": 0.1}, "dense": 0.1},
     r"below the leaf 'conv/kernel'"),
    ({"conv": 0.1, "conv/bias": 0.2, "dense": 0.1},
     r"leaf 'conv/bias' two amounts"),
])
def test_a_prefix_that_does_not_match_names_the_path(amount, message):
    with pytest.raises(ValueError, match=message):
        ZERO(KEY, TREE, amount)


@pytest.mark.parametrize("op, amount, message", [
    (ZERO, {"conv": 0.1, "dense": {"kernel": 1.5, "bias": 0.0}},
     r"ratio at 'dense/kernel' is a fraction and must be in \[0, 1\], got "
     r"1.5"),
    (ZERO, {"conv": float("nan"), "dense": 0.0}, r"ratio at 'conv' must be "
     r"a number"),
    (PARAM_OPS["gaussian_noise"], {"conv": -1.0, "dense": 0.0},
     r"scale at 'conv' must be non-negative"),
    (PARAM_OPS["bit_flip"], {"conv/kernel": 2.0, "conv/bias": 0.0,
                             "dense": 0.0},
     r"rate at 'conv/kernel' is a fraction"),
])
def test_bad_leaf_amounts_name_the_leaf(op, amount, message):
    with pytest.raises(ValueError, match=message):
        op(KEY, TREE, amount)


def test_a_string_leaf_amount_is_a_type_error():
    with pytest.raises(TypeError, match="ratio at 'conv' must be a real"):
        ZERO(KEY, TREE, {"conv": "0.1", "dense": 0.0})


@pytest.mark.parametrize("op", [make_zero(ratio_over="global"),
                                make_sign_flip(ratio_over="global"),
                                make_bit_flip(mode="exact",
                                              ratio_over="global")],
                         ids=["zero", "sign_flip", "bit_flip"])
def test_global_ratio_refuses_a_tree(op):
    with pytest.raises(ValueError, match="per-leaf amounts need "
                                         "ratio_over='leaf'.*global"):
        op(KEY, TREE, {"conv": 0.1, "dense": 0.1})
    assert not op.per_leaf_amounts


@pytest.mark.parametrize("op", [remove_neurons, drop_blocks, remove_heads],
                         ids=["remove_neurons", "drop_blocks",
                              "remove_heads"])
def test_structural_damage_refuses_a_tree(op):
    with pytest.raises(ValueError, match="ratio: per-leaf amounts apply to "
                                         "parameter damage"):
        op(KEY, TREE, {"conv": 0.1, "dense": 0.1})
    assert not op.per_leaf_amounts


def test_data_damage_refuses_a_tree():
    images = np.zeros((8, 4, 4, 1), np.float32)
    labels = np.arange(8, dtype=np.int32) % 4
    with pytest.raises(ValueError, match="per-leaf amounts apply to "
                                         "parameter damage"):
        flip_labels(KEY, images, labels, {"a": 0.1}, num_classes=4)


def test_none_as_the_whole_amount_is_still_refused():
    with pytest.raises(TypeError, match="ratio must be a real number"):
        ZERO(KEY, TREE, None)
