"""Scopes: role keywords from leaf metadata, regexes, predicates, labels."""

from __future__ import annotations

import contextlib
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tree_equal
from recovjax.damage import (Scope, checked, damage_names, get_damage,
                             make_zero, parse_scope, select_leaves)
from recovjax.damage.params import make_operator
from recovjax.models.info import InfoError, LeafInfo, info_tree


def _tree():
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    # An equinox-style "weight", a "kernel" that is not a connection, and
    # one leaf of every other role.
    return {"embed": {"table": normal(10, 4)},
            "gate": {"kernel": normal(4, 4)},
            "linear": {"bias": normal(6), "weight": normal(6, 4)},
            "norm": {"offset": normal(6), "scale": normal(6)}}


TREE = _tree()
ROLES = {"embed/table": LeafInfo("embedding", out_axes=(1,)),
         "gate/kernel": LeafInfo("other"),
         "linear/bias": LeafInfo("bias", out_axes=(0,)),
         "linear/weight": LeafInfo("kernel", in_axes=(1,), out_axes=(0,)),
         "norm/offset": LeafInfo("norm_offset", out_axes=(0,)),
         "norm/scale": LeafInfo("norm_scale", out_axes=(0,))}
PATHS = tuple(ROLES)  # flattening order: sorted keys
INFO = info_tree(TREE, ROLES)
KEY = jax.random.key(0)
ZERO_WEIGHTS = make_zero("weights")


def _selected(flags):
    return {path for path, flag in zip(PATHS, flags) if flag}


def _damaged(damage):
    masks = jax.tree.leaves(damage.mask)
    return {path for path, mask in zip(PATHS, masks) if np.asarray(mask).any()}


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


# --------------------------------------------------------------------------
# Role scopes.
# --------------------------------------------------------------------------


def test_weights_selects_by_role_not_by_name():
    damage = ZERO_WEIGHTS(KEY, TREE, 1.0, info=INFO)
    assert _damaged(damage) == {"linear/weight"}
    np.testing.assert_array_equal(damage.params["linear"]["weight"], 0)
    # The leaf called "kernel" has role "other" and is left alone.
    assert tree_equal(damage.params["gate"], TREE["gate"])
    assert not np.asarray(damage.mask["gate"]["kernel"]).any()


@pytest.mark.parametrize("scope, expected", [
    ("weights", {"linear/weight"}),
    ("biases", {"linear/bias"}),
    ("norms", {"norm/offset", "norm/scale"}),
    ("embeddings", {"embed/table"}),
    ("role:other", {"gate/kernel"}),
    ("role:kernel, bias", {"linear/weight", "linear/bias"}),
    ("all", set(PATHS)),
])
def test_role_scopes_select_their_roles(scope, expected):
    assert _selected(select_leaves(TREE, scope, INFO)) == expected


def test_keywords_take_precedence_over_regexes_unless_compiled():
    tree = {"weights": np.ones(3, np.float32), "b": np.ones(3, np.float32)}
    info = info_tree(tree, {"weights": LeafInfo("other"),
                            "b": LeafInfo("kernel")})
    assert select_leaves(tree, "weights", info) == (True, False)  # b, weights
    assert select_leaves(tree, re.compile("weights")) == (False, True)


def test_weights_without_info_says_how_to_get_it():
    with pytest.raises(InfoError, match=r"scope 'weights' selects leaves by "
                                        r"their role.*info=model\.info.*"
                                        r"from_equinox.*regex scope"):
        ZERO_WEIGHTS(KEY, TREE, 0.5)
    assert issubclass(InfoError, ValueError)
    with pytest.raises(InfoError, match="scope 'biases'"):
        select_leaves(TREE, "biases")


def test_unknown_role_names_the_leaf_and_how_to_declare_it():
    info = info_tree(TREE, {**ROLES, "norm/scale": LeafInfo()})
    with pytest.raises(InfoError, match=r"scope 'weights' needs the role.*"
                                        r"norm/scale.*with_info"):
        ZERO_WEIGHTS(KEY, TREE, 0.5, info=info)


def test_info_of_another_structure_is_refused():
    with pytest.raises(InfoError, match="structure of the parameters"):
        ZERO_WEIGHTS(KEY, TREE, 0.5, info={"linear": INFO["linear"]})


def test_unknown_role_in_a_role_scope_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"scope 'role:kernal': unknown role "
                                         r"'kernal'; roles are kernel"):
        make_zero("role:kernal")


def test_scope_matching_nothing_names_the_scope():
    tree = {"linear": TREE["linear"]}
    info = {"linear": INFO["linear"]}
    with pytest.raises(ValueError, match=r"scope 'embeddings' matches no leaf"
                                         r".*linear/bias, linear/weight"):
        make_zero("embeddings")(KEY, tree, 0.5, info=info)


# --------------------------------------------------------------------------
# Predicates.
# --------------------------------------------------------------------------


def test_predicate_sees_path_shape_struct_and_info():
    seen = {}

    def matrices(path, leaf, info):
        seen[path] = (type(leaf), info)
        return leaf.ndim == 2 and path != "embed/table"

    damage = make_zero(matrices)(KEY, TREE, 1.0, info=INFO)
    assert _damaged(damage) == {"gate/kernel", "linear/weight"}
    assert all(kind is jax.ShapeDtypeStruct for kind, _ in seen.values())
    assert {path: info for path, (_, info) in seen.items()} == ROLES
    # Without info the predicate gets None.
    select_leaves(TREE, matrices)
    assert all(info is None for _, info in seen.values())


def test_predicate_on_roles_equals_the_role_keyword():
    kernels = lambda path, leaf, info: info.role == "kernel"
    by_predicate = make_zero(kernels)(KEY, TREE, 0.5, info=INFO)
    assert tree_equal(by_predicate, ZERO_WEIGHTS(KEY, TREE, 0.5, info=INFO))


@pytest.mark.parametrize("answer", [
    lambda leaf: leaf.ndim,                     # an int
    lambda leaf: jnp.asarray(True),             # an array
    lambda leaf: None,
])
def test_predicate_returning_a_non_bool_is_refused(answer):
    def predicate(path, leaf, info):
        return answer(leaf)

    with pytest.raises(TypeError, match=r"scope predicate .*predicate must "
                                        r"return a Python bool, got \w+ for "
                                        r"leaf 'embed/table'"):
        make_zero(predicate)(KEY, TREE, 0.5)


def test_predicate_matching_nothing_is_refused():
    with pytest.raises(ValueError, match="scope predicate .* matches no leaf"):
        make_zero(lambda path, leaf, info: False)(KEY, TREE, 0.5)


# --------------------------------------------------------------------------
# Label trees.
# --------------------------------------------------------------------------


def test_full_label_tree_selects_the_true_leaves():
    labels = jax.tree.map(lambda _: False, TREE)
    labels["norm"]["scale"] = True
    labels["embed"]["table"] = np.bool_(True)
    damage = make_zero(labels)(KEY, TREE, 1.0)
    assert _damaged(damage) == {"norm/scale", "embed/table"}


def test_prefix_label_tree_labels_whole_subtrees():
    labels = {"embed": False, "gate": False, "linear": True, "norm": False}
    assert _selected(select_leaves(TREE, labels)) == {"linear/bias",
                                                      "linear/weight"}
    assert select_leaves(TREE, True) == (True,) * len(PATHS)


@pytest.mark.parametrize("labels, message", [
    ({"linear": True}, r"no label for embed/table, gate/kernel, norm/offset"),
    ({"embed": True, "gate": True, "linear": True, "norm": True,
      "head": True}, r"labels for head, which the parameters do not have"),
    ({"embed": True, "gate": True, "linear": {"weight": True},
      "norm": True}, r"no label for linear/bias"),
    ({"embed": True, "gate": True, "linear": [True, False], "norm": True},
     r"labels for linear/0, linear/1.*no label for linear/bias"),
])
def test_label_tree_of_the_wrong_structure_names_the_mismatch(labels,
                                                              message):
    with pytest.raises(ValueError, match="scope label tree does not match "
                                         "the parameters.*" + message):
        make_zero(labels)(KEY, TREE, 0.5)


def test_label_tree_of_non_bools_is_refused_at_construction():
    labels = jax.tree.map(lambda _: True, TREE)
    labels["linear"]["bias"] = 1
    with pytest.raises(TypeError, match="label at linear/bias is int 1; "
                                        "labels must be True"):
        make_zero(labels)
    with pytest.raises(TypeError, match="scope must be 'all'"):
        make_zero(3)


def test_all_false_labels_match_nothing():
    labels = jax.tree.map(lambda _: False, TREE)
    with pytest.raises(ValueError, match="scope label tree matches no leaf"):
        make_zero(labels)(KEY, TREE, 0.5)


# --------------------------------------------------------------------------
# Scopes as static values; compiling once with info.
# --------------------------------------------------------------------------


def test_scopes_are_hashable_static_values():
    class Unhashable:
        __hash__ = None

        def __call__(self, path, leaf, info):
            return True

    predicate = Unhashable()
    assert parse_scope(predicate) == parse_scope(predicate)
    assert parse_scope(predicate) != parse_scope(Unhashable())
    labels = {"embed": False, "gate": False, "linear": True, "norm": False}
    assert parse_scope(labels) == parse_scope(dict(labels))
    assert hash(parse_scope(labels)) == hash(parse_scope(dict(labels)))
    assert parse_scope(labels) != parse_scope({**labels, "gate": True})
    scope = parse_scope(labels)
    assert parse_scope(scope) is scope and isinstance(scope, Scope)

    @functools.partial(jax.jit, static_argnums=1)
    def count(params, scope):
        return sum(flag for flag in scope.select(params))

    assert count(TREE, parse_scope(predicate)) == len(PATHS)
    assert count(TREE, scope) == 2


def test_vmap_over_ratios_and_keys_compiles_once_with_info():
    op = functools.partial(ZERO_WEIGHTS, info=INFO)

    @chex.assert_max_traces(n=1)
    def damage_many(keys, ratios):
        return jax.vmap(op, in_axes=(0, None, 0))(keys, TREE, ratios)

    run = jax.jit(damage_many)
    ratios = jnp.linspace(0.0, 1.0, 6)
    first = run(jax.random.split(jax.random.key(0), 6), ratios)
    run(jax.random.split(jax.random.key(1), 6), ratios[::-1])
    counts = np.asarray(first.mask["linear"]["weight"]).sum(axis=(1, 2))
    expected = [int(np.floor(np.float32(24) * r)) for r in np.asarray(ratios)]
    np.testing.assert_array_equal(counts, expected)
    assert not np.asarray(first.mask["gate"]["kernel"]).any()


def test_direct_calls_with_info_do_not_retrace_and_keys_reproduce():
    ZERO_WEIGHTS(KEY, TREE, 0.5, info=INFO)
    fresh_info = info_tree(TREE, dict(ROLES))  # equal, not the same object
    with _count_traces() as counter:
        first = ZERO_WEIGHTS(jax.random.key(3), TREE, 0.5, info=fresh_info)
        again = ZERO_WEIGHTS(jax.random.key(3), TREE, 0.5, info=INFO)
        other = ZERO_WEIGHTS(jax.random.key(4), TREE, 0.25, info=INFO)
    assert counter["traces"] == 0
    assert tree_equal(first, again)
    assert not np.array_equal(first.mask["linear"]["weight"],
                              other.mask["linear"]["weight"])


# The bit search needs a model and attack data (tests/test_attack.py), a
# replay a saved fault list (tests/test_replay.py).
PARAM_DAMAGE = [name for name in damage_names("params")
                if name not in ("bit_search", "replay")]
# Options that make every operator damage this tiny tree at amount 1.
OPTIONS = {"rowhammer": {"page_bytes": 32, "flips_per_page": 8}}


@pytest.mark.parametrize("name", PARAM_DAMAGE)
def test_every_parameter_operator_takes_info(name):
    op = get_damage(name, scope="weights", **OPTIONS.get(name, {}))
    damage = op(KEY, TREE, 1.0, info=INFO)
    assert _damaged(damage) == {"linear/weight"}
    for path in set(PATHS) - {"linear/weight"}:
        layer, leaf = path.split("/")
        np.testing.assert_array_equal(damage.params[layer][leaf],
                                      TREE[layer][leaf])


def test_checked_operator_keeps_info():
    from jax.experimental import checkify
    op = checked(ZERO_WEIGHTS)
    error, _ = checkify.checkify(jax.jit(functools.partial(op, info=INFO)))(
        KEY, TREE, 1.5)
    with pytest.raises(Exception, match="ratio"):
        error.throw()
    assert tree_equal(op(KEY, TREE, 0.5, info=INFO),
                      ZERO_WEIGHTS(KEY, TREE, 0.5, info=INFO))


def test_make_operator_passes_infos_to_the_core_statically():
    calls = []

    def core(key, params, amount, infos):
        calls.append(infos)
        return ZERO_WEIGHTS(key, params, amount, info=INFO)

    op = make_operator(core, name="probe", amount_name="ratio",
                       fraction=True, doc="probe")
    op(KEY, TREE, 0.5, info=INFO)
    op(KEY, TREE, 0.5)
    assert calls == [dict(zip(PATHS, (ROLES[p] for p in PATHS))), None]
    assert isinstance(calls[0], dict)
