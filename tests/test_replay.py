"""Fault lists: written out, read back, replayed bit for bit."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from recovjax.damage import get_damage
from recovjax.damage.replay import (FORMAT, VERSION, fault_list, load_faults,
                                    replay, save_faults)

from conftest import tree_equal

PARAMS = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 4)),
                    "bias": jnp.linspace(-1.0, 1.0, 4)},
          "half": jax.random.normal(jax.random.key(1), (3, 5)).astype(
              jnp.bfloat16)}


@pytest.mark.parametrize("kind,amount", [("zero", 0.3),
                                         ("bit_flip", 0.05),
                                         ("stuck_at_1", 0.05),
                                         ("gaussian_noise", 0.2)])
def test_a_saved_list_replays_the_damage_bit_for_bit(kind, amount, tmp_path):
    op = get_damage(kind)
    damage = op(jax.random.key(2), PARAMS, amount)
    faults = fault_list(PARAMS, damage)
    assert faults.count == sum(int(np.asarray(m).sum())
                               for m in jax.tree.leaves(damage.mask))
    path = save_faults(tmp_path / "faults.safetensors", faults,
                       metadata={"op": kind, "amount": str(amount)})
    loaded = load_faults(path)
    assert loaded.metadata == {"op": kind, "amount": str(amount)}
    assert list(loaded.leaves) == list(faults.leaves)
    again = replay(loaded)(None, PARAMS)
    assert tree_equal(again.params, damage.params)
    assert tree_equal(again.mask, damage.mask)


def test_bit_faults_replay_into_another_version_of_the_model(tmp_path):
    damage = get_damage("bit_flip", mode="exact")(jax.random.key(3), PARAMS,
                                                  0.02)
    faults = fault_list(PARAMS, damage)
    recovered = jax.tree.map(lambda x: (x * 1.5).astype(x.dtype), PARAMS)
    replayed = replay(faults)(None, recovered)
    for path, leaf in faults.leaves.items():
        keys = path.split("/")
        new = recovered
        got = replayed.params
        for k in keys:
            new, got = new[k], got[k]
        new, got = np.asarray(new), np.asarray(got)
        uint = np.dtype(f"uint{8 * new.dtype.itemsize}")
        want = new.ravel().view(uint).copy()
        want[leaf.index] ^= leaf.changed_bits
        np.testing.assert_array_equal(got.ravel().view(uint), want)
    # Written values instead of flipped bits: the faulty values come back.
    values = replay(faults._replace(kind="values"))(None, recovered)
    assert tree_equal(jax.tree.map(
        lambda d, m, v: jnp.where(m, d, v), damage.params, damage.mask,
        values.params), values.params)


def test_the_file_is_a_documented_safetensors_file(tmp_path):
    damage = get_damage("zero")(jax.random.key(4), PARAMS, 0.5)
    path = save_faults(tmp_path / "f.safetensors",
                       fault_list(PARAMS, damage, kind="values"))
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as file:
        header = file.metadata()
        names = set(file.keys())
        index = file.get_tensor("dense/kernel::index")
        before = file.get_tensor("dense/kernel::before")
    assert header["format"] == FORMAT and header["version"] == str(VERSION)
    assert header["kind"] == "values"
    assert json.loads(header["leaves"]) == {
        "dense/bias": {"shape": [4], "dtype": "float32"},
        "dense/kernel": {"shape": [8, 4], "dtype": "float32"},
        "half": {"shape": [3, 5], "dtype": "bfloat16"}}
    assert {"half::index", "half::before", "half::after"} <= names
    assert index.dtype == np.int64 and np.all(np.diff(index) > 0)
    assert before.dtype == np.uint32 and index.size == 16
    kernel = np.asarray(PARAMS["dense"]["kernel"]).ravel()
    np.testing.assert_array_equal(before, kernel[index].view(np.uint32))


def test_replay_names_what_does_not_match(tmp_path):
    damage = get_damage("zero")(jax.random.key(5), PARAMS, 0.5)
    op = replay(fault_list(PARAMS, damage))
    with pytest.raises(ValueError, match="no leaf 'half'"):
        op(None, {"dense": PARAMS["dense"]})
    with pytest.raises(ValueError, match="'dense/bias' has shape \\(5,\\)"):
        op(None, {**PARAMS, "dense": {**PARAMS["dense"],
                                      "bias": jnp.zeros(5)}})
    with pytest.raises(TypeError, match="'half' is float32; the faults "
                       "were listed in bfloat16"):
        op(None, {**PARAMS, "half": PARAMS["half"].astype(jnp.float32)})
    with pytest.raises(ValueError, match="params: the model"):
        op(None, None)
    stack = jax.vmap(lambda k: get_damage("zero")(k, PARAMS, 0.5))(
        jax.random.split(jax.random.key(6), 2))
    with pytest.raises(ValueError, match="one damaged model at a time"):
        fault_list(PARAMS, stack)
    with pytest.raises(ValueError, match="kind must be one of"):
        fault_list(PARAMS, damage, kind="flips")
    with pytest.raises(ValueError, match="reserved"):
        save_faults(tmp_path / "x", fault_list(PARAMS, damage),
                    metadata={"kind": "values"})


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_faults(tmp_path / "nothing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a fault "
                       "list"):
        load_faults(junk)
    weights = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(weights))
    with pytest.raises(ValueError, match="weights.safetensors: not a fault "
                       "list \\(format None"):
        load_faults(weights)
    future = tmp_path / "future.safetensors"
    save_file({"w::index": np.zeros(0, np.int64)}, str(future),
              metadata={"format": FORMAT, "version": "2", "kind": "bits",
                        "leaves": "{}"})
    with pytest.raises(ValueError, match="version '2'; this recovjax reads "
                       "version 1"):
        load_faults(future)
    broken = tmp_path / "broken.safetensors"
    save_file({"w::index": np.zeros(1, np.int64)}, str(broken),
              metadata={"format": FORMAT, "version": "1", "kind": "bits",
                        "leaves": json.dumps({"w": {"shape": [3],
                                                    "dtype": "float32"}})})
    with pytest.raises(ValueError, match="broken.safetensors: inconsistent"):
        load_faults(broken)


def test_faults_in_a_deployed_format_read_in_its_layout(tmp_path):
    from recovjax.damage import make_bit_flip
    from recovjax.damage.replay import fault_list, load_faults, replay, \
        save_faults
    params = {"w": jnp.linspace(-1.0, 1.0, 400).reshape(20, 20),
              "b": jnp.linspace(0.1, 0.9, 20)}
    op = make_bit_flip(bits=6, mode="exact", ratio_over="global",
                       format="int8", granularity="channel")
    damage = op(jax.random.key(2), params, 5 / (420))
    faults = fault_list(params, damage, kind="values", format="int8",
                        granularity="channel")
    path = save_faults(tmp_path / "int8.safetensors", faults)
    loaded = load_faults(path)
    assert loaded.metadata["stored_format"] == "int8"
    flipped = 0
    for leaf in loaded.leaves.values():
        if leaf.index.size == 0:
            continue
        changed = leaf.code_before ^ leaf.code_after
        # Every hit entry's code differs exactly in bit 6 of the int8 code
        # (the other entries only carry the format's rounding).
        hit = changed != 0
        assert np.all(changed[hit] == 1 << 6)
        flipped += int(hit.sum())
    assert flipped == 5
    # Replayed (the damaged values written back) into the deployed model,
    # the listed entries are the damaged ones bit for bit; the others carry
    # the deployment's own rounding.
    from recovjax.damage.formats import deploy
    again = replay(loaded)(None, deploy(params, "int8", "channel"))
    for name in params:
        index = loaded.leaves[name].index
        np.testing.assert_array_equal(
            np.asarray(again.params[name]).ravel()[index].view(np.uint32),
            np.asarray(damage.params[name]).ravel()[index].view(np.uint32))


def test_a_saved_list_is_a_damage_kind_for_configs(tmp_path):
    from recovjax.damage.replay import save_faults
    params = {"w": jnp.linspace(-1.0, 1.0, 50)}
    damage = get_damage("zero")(jax.random.key(1), params, 0.2)
    path = save_faults(tmp_path / "f.safetensors", fault_list(params, damage))
    op = get_damage("replay", path=str(path))
    again = op(jax.random.key(7), params, 1.0)
    np.testing.assert_array_equal(again.params["w"], damage.params["w"])
    np.testing.assert_array_equal(again.mask["w"], damage.mask["w"])
