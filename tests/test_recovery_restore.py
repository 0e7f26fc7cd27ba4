"""Restoring from the pretrained checkpoint: exact, partial, detected, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tree_equal
from recovjax._types import Damage
from recovjax.checkpoints import (CheckpointMismatchError,
                                  CheckpointNotFoundError, leaf_path,
                                  save_checkpoint)
from recovjax.damage import get_damage
from recovjax.recovery import (damaged_leaf_paths, detect_and_restore,
                               replace_entries, replace_leaves,
                               restore_entries, restore_full, restore_leaves)


def zero_op():
    """The registry's exact-count ``zero`` damage (the seed's damage)."""
    return get_damage("zero")


def flat(tree):
    return {leaf_path(path): np.asarray(leaf) for path, leaf in
            jax.tree_util.tree_flatten_with_path(tree)[0]}


def _only(damage: Damage, names, clean) -> Damage:
    """Keep the damage on the named leaves only (others clean, mask false)."""
    params, mask = {}, {}
    for layer, leaves in damage.params.items():
        params[layer], mask[layer] = {}, {}
        for name, leaf in leaves.items():
            hit = f"{layer}/{name}" in names
            params[layer][name] = leaf if hit else clean[layer][name]
            mask[layer][name] = (damage.mask[layer][name] if hit else
                                 np.zeros_like(damage.mask[layer][name]))
    return Damage(params, mask)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, trained_lenet):
    directory = tmp_path_factory.mktemp("restore") / "ckpt"
    save_checkpoint(directory, trained_lenet, {"model": "lenet5"})
    return directory


@pytest.fixture(scope="module")
def damage(trained_lenet, checkpoint):
    return zero_op()(jax.random.key(0), trained_lenet, 0.3)


def assert_bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_restore_full_is_exact(checkpoint, trained_lenet, damage):
    result = restore_full(checkpoint, damage.params)
    assert tree_equal(result.params, trained_lenet)
    assert len(result.restored_leaves) == 10
    assert result.array_bytes == sum(np.asarray(x).nbytes for x in
                                     jax.tree.leaves(trained_lenet))
    assert result.bytes_read >= result.array_bytes * 0.5


def test_restore_leaves_reads_only_those(checkpoint, trained_lenet, damage):
    names = ["conv1/kernel", "fc3/bias"]
    result = restore_leaves(checkpoint, damage.params, names)
    restored, clean, damaged = map(flat, (result.params, trained_lenet,
                                          damage.params))
    for name in restored:
        assert_bits_equal(restored[name],
                          clean[name] if name in names else damaged[name])
    assert result.restored_leaves == tuple(sorted(names))
    assert result.array_bytes == clean["conv1/kernel"].nbytes + clean[
        "fc3/bias"].nbytes
    full = restore_full(checkpoint, damage.params)
    assert result.bytes_read < full.bytes_read / 2


def test_restore_entries_is_exact_and_reads_touched_leaves(
        checkpoint, trained_lenet, damage):
    partial = _only(damage, {"fc2/kernel", "conv2/bias"}, trained_lenet)
    result = restore_entries(checkpoint, partial.params, partial.mask)
    assert tree_equal(result.params, trained_lenet)
    assert result.restored_leaves == ("conv2/bias", "fc2/kernel")
    expected = jax.tree.map(lambda c, d, m: np.where(m, c, d), trained_lenet,
                            partial.params, partial.mask)
    assert tree_equal(result.params, expected)
    # Entries outside the mask are the input's, even when they differ from
    # the checkpoint (here: a perturbed unmasked entry stays perturbed).
    perturbed = jax.tree.map(np.array, partial.params)
    perturbed["fc1"]["bias"][0] += 1.0
    again = restore_entries(checkpoint, perturbed, partial.mask)
    assert_bits_equal(again.params["fc1"]["bias"], perturbed["fc1"]["bias"])


def test_restore_entries_on_a_stack(checkpoint, trained_lenet):
    op = zero_op()
    damages = [op(jax.random.key(1 + index), trained_lenet, 0.3)
               for index in range(3)]
    stack = jax.tree.map(lambda *xs: np.stack(xs), *damages)
    result = restore_entries(checkpoint, stack.params, stack.mask,
                             stacked=True)
    for index in range(3):
        assert tree_equal(jax.tree.map(lambda x: x[index],
                                       jax.device_get(result.params)),
                          trained_lenet)


@pytest.mark.parametrize("block_size", [1, 16])
def test_detect_and_restore_finds_exactly_the_damaged_blocks(
        checkpoint, trained_lenet, damage, block_size):
    partial = _only(damage, {"conv1/kernel", "fc1/kernel"}, trained_lenet)
    result = detect_and_restore(checkpoint, partial.params,
                                block_size=block_size)
    assert result.restored_leaves == ("conv1/kernel", "fc1/kernel")
    assert tree_equal(result.params, trained_lenet)
    clean, damaged, detected = map(flat, (trained_lenet, partial.params,
                                          result.mask))
    for name in clean:
        differs = (clean[name].view(np.uint32) != damaged[name].view(
            np.uint32)).reshape(-1)
        blocks = np.zeros(-(-differs.size // block_size) * block_size, bool)
        blocks[:differs.size] = differs
        expected = np.repeat(blocks.reshape(-1, block_size).any(1),
                             block_size)[:differs.size]
        assert np.array_equal(detected[name].reshape(-1), expected), name
    # With entry blocks, detection equals the damage mask wherever zeroing
    # changed a value (a trained weight is never exactly zero here).
    if block_size == 1:
        masks = flat(partial.mask)
        for name in clean:
            assert np.array_equal(detected[name],
                                  masks[name] & (clean[name] != 0))
    full = restore_full(checkpoint, partial.params)
    assert result.bytes_read < full.bytes_read


def test_detect_and_restore_finds_nan_damage_and_clean_models(
        checkpoint, trained_lenet):
    params = jax.tree.map(np.array, trained_lenet)
    params["fc2"]["bias"][3] = np.nan
    result = detect_and_restore(checkpoint, params)
    assert result.restored_leaves == ("fc2/bias",)
    assert np.flatnonzero(np.asarray(result.mask["fc2"]["bias"])).tolist() \
        == [3]
    assert tree_equal(result.params, trained_lenet)
    untouched = detect_and_restore(checkpoint, trained_lenet)
    assert untouched.restored_leaves == ()
    assert untouched.array_bytes == 0
    assert not any(bool(np.any(m)) for m in jax.tree.leaves(untouched.mask))


def test_pure_replacements(trained_lenet, damage):
    assert tree_equal(replace_entries(trained_lenet, damage.params,
                                      damage.mask), trained_lenet)
    mixed = replace_leaves(trained_lenet, damage.params, ["fc3/kernel"])
    assert_bits_equal(mixed["fc3"]["kernel"], trained_lenet["fc3"]["kernel"])
    assert_bits_equal(mixed["fc1"]["kernel"], damage.params["fc1"]["kernel"])
    assert damaged_leaf_paths(_only(damage, {"fc3/bias"}, trained_lenet).mask) == [
        "fc3/bias"]
    with pytest.raises(ValueError, match="unknown leaf paths.*fc9/kernel"):
        replace_leaves(trained_lenet, damage.params, ["fc9/kernel"])


def test_checkpoint_of_another_model_names_the_leaves(checkpoint):
    from recovjax.models import get_model
    mlp = get_model("mlp")
    params = mlp.abstract_params(jnp.zeros((1, 28, 28, 1)))
    with pytest.raises(CheckpointMismatchError) as error:
        restore_leaves(checkpoint, params, ["fc1/kernel"])
    message = str(error.value)
    assert "lenet5" in message and "conv1/kernel" in message
    assert "fc1/kernel" in message and str(checkpoint) in message
    with pytest.raises(CheckpointMismatchError, match="conv1/kernel"):
        detect_and_restore(checkpoint, jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), params))


def test_shape_mismatch_names_the_leaf(checkpoint, trained_lenet):
    params = jax.tree.map(lambda x: x, trained_lenet)
    params["fc3"]["kernel"] = jnp.zeros((84, 7), jnp.float32)
    params["fc3"]["bias"] = jnp.zeros((7,), jnp.float32)
    with pytest.raises(CheckpointMismatchError) as error:
        restore_entries(checkpoint, params, jax.tree.map(
            lambda x: jnp.ones(x.shape, bool), params))
    message = str(error.value)
    assert "fc3/kernel: expected shape (84, 7)" in message
    assert "found (84, 10)" in message
    assert "conv1/kernel" not in message


def test_missing_checkpoint_names_the_path(tmp_path, trained_lenet, damage):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointNotFoundError, match=str(missing)):
        restore_leaves(missing, damage.params, ["fc1/bias"])
    with pytest.raises(CheckpointNotFoundError, match=str(missing)):
        detect_and_restore(missing, damage.params)
    with pytest.raises(CheckpointNotFoundError, match=str(missing)):
        restore_full(missing, trained_lenet)


def test_bad_arguments(checkpoint, damage):
    with pytest.raises(ValueError, match="unknown leaf paths.*conv3/kernel"):
        restore_leaves(checkpoint, damage.params, ["conv3/kernel"])
    with pytest.raises(ValueError, match="block_size must be a positive"):
        detect_and_restore(checkpoint, damage.params, block_size=0)
