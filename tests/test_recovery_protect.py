"""Protection as recovery: weight saturation and checksum-guarded restore."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax._types import Damage, Split
from recovjax.checkpoints import save_checkpoint
from recovjax.damage import make_bit_position_flip, make_rowhammer
from recovjax.data import batch_split
from recovjax.recovery import get_strategy, make_task
from recovjax.recovery.protect import block_checksums


@pytest.fixture(scope="module")
def setting(lenet, trained_lenet, small_mnist, tmp_path_factory):
    directory = tmp_path_factory.mktemp("protect") / "ckpt"
    save_checkpoint(directory, trained_lenet, {"model": "lenet5"})
    task = make_task(lenet, Split(small_mnist.train.images[:100],
                                  small_mnist.train.labels[:100]),
                     checkpoint=directory,
                     eval_batches=batch_split(small_mnist.test, 100))
    return lenet, trained_lenet, task


def _stack(damages):
    return Damage(*jax.tree.map(lambda *x: np.stack(x),
                                *[tuple(d) for d in damages]))


def test_checksums_flag_every_changed_block_and_only_those():
    leaf = jnp.linspace(-1.0, 1.0, 1000)
    clean = block_checksums(leaf, 64)
    assert clean.shape == (16, 2) and clean.dtype == jnp.uint32
    for index in (0, 63, 64, 999):
        for bit in (0, 17, 31):
            bits = np.asarray(leaf).view(np.uint32).copy()
            bits[index] ^= np.uint32(1 << bit)
            damaged = block_checksums(jnp.asarray(bits.view(np.float32)), 64)
            flagged = np.flatnonzero(np.any(np.asarray(damaged)
                                            != np.asarray(clean), axis=1))
            assert flagged.tolist() == [index // 64]
    # Two changes that cancel in the plain sum still change the block.
    bits = np.asarray(leaf).view(np.uint32).copy()
    bits[3] += np.uint32(8)
    bits[5] -= np.uint32(8)
    damaged = block_checksums(jnp.asarray(bits.view(np.float32)), 64)
    assert np.asarray(damaged)[0, 0] == np.asarray(clean)[0, 0]
    assert np.asarray(damaged)[0, 1] != np.asarray(clean)[0, 1]


def test_checksum_restore_repairs_clustered_flips(setting):
    model, params, task = setting
    op = make_rowhammer(8, scope="weights", page_bytes=1024)
    keys = jax.random.split(jax.random.key(0), 2)
    damage = _stack([op(k, params, 0.2, info=model.info) for k in keys])
    result = get_strategy("checksum_restore", block_size=128)(keys, damage,
                                                              task)
    for index in range(2):
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(
                jax.tree.map(lambda x: x[index], result.params))):
            np.testing.assert_array_equal(np.asarray(a).view(np.uint32),
                                          np.asarray(b).view(np.uint32))
    assert result.bytes_read > 0
    with pytest.raises(ValueError, match="block_size must be a positive"):
        get_strategy("checksum_restore", block_size=0)


def test_saturation_takes_an_exploded_weight_back(setting):
    model, params, task = setting
    op = make_bit_position_flip(scope="weights")
    keys = jax.random.split(jax.random.key(0), 1)
    damage = _stack([op(keys[0], params, 30, info=model.info)])
    before = get_strategy("restore_full")(keys, damage, task)
    clean = float(np.asarray(before.curve.accuracy)[0, -1])
    damaged = get_strategy("saturate")(keys, damage, task)
    recovered = float(np.asarray(damaged.curve.accuracy)[0, -1])
    assert abs(recovered - clean) <= 0.02
    # Every saturated weight lies in its clean leaf's range.
    for path in ("conv1", "fc1", "fc3"):
        kernel = np.asarray(damaged.params[path]["kernel"][0])
        clean_kernel = np.asarray(params[path]["kernel"])
        assert kernel.min() >= clean_kernel.min()
        assert kernel.max() <= clean_kernel.max()
