"""Strategies as point programs: damage re-derived on device, one runner."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _tolerance import assert_sums_close
from recovjax._types import Damage, Split
from recovjax.checkpoints import save_checkpoint
from recovjax.damage import get_damage
from recovjax.data import batch_split
from recovjax.recovery import (PointStrategy, get_strategy, make_task,
                               recover_damage, register_strategy)
from recovjax.recovery.points import touched_leaves
from test_recovery_other import tiny_model

COUNT = 3


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def setup(tiny, small_mnist, tmp_path_factory):
    train = Split(small_mnist.train.images[:200],
                  small_mnist.train.labels[:200])
    test = batch_split(Split(small_mnist.test.images[:100],
                             small_mnist.test.labels[:100]), 50)
    params = tiny.params
    directory = save_checkpoint(tmp_path_factory.mktemp("points") / "ckpt",
                                params, {"model": "tiny"})
    task = make_task(tiny, train, checkpoint=directory, eval_batches=test)
    damage_keys = jax.random.split(jax.random.key(11), COUNT)
    keys = jax.random.split(jax.random.key(12), COUNT)
    amounts = jnp.asarray([0.1, 0.3, 0.6], jnp.float32)
    return task, params, damage_keys, keys, amounts


def materialised(op, tiny, params, damage_keys, amounts):
    stacked = jax.vmap(lambda k, a: op(k, params, a, info=tiny.info))(
        damage_keys, amounts)
    return Damage(stacked.params, stacked.mask)


@pytest.mark.parametrize("name", ["restore_entries", "restore_leaves",
                                  "restore_full", "detect_restore"])
def test_rederived_restores_equal_the_stacked_call(name, tiny, setup):
    task, params, damage_keys, keys, amounts = setup
    op = get_damage("gaussian_noise", scope="weights")
    strategy = get_strategy(name)
    rederived = recover_damage(strategy, task, op, params,
                               damage_keys=damage_keys, amounts=amounts,
                               keys=keys, return_params=True)
    stacked = strategy(keys, materialised(op, tiny, params, damage_keys,
                                          amounts), task)
    for got, want in zip(jax.tree.leaves(rederived.params),
                         jax.tree.leaves(stacked.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert rederived.restored_leaves == stacked.restored_leaves
    np.testing.assert_array_equal(np.asarray(rederived.curve.accuracy),
                                  np.asarray(stacked.curve.accuracy))
    if name != "restore_leaves":  # every restore here gives back the clean
        for got, want in zip(jax.tree.leaves(rederived.params),
                             jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(got)[0],
                                          np.asarray(want))
    assert rederived.bytes_read > 0


def test_a_restore_reads_only_the_touched_leaves(tiny, setup):
    task, params, damage_keys, keys, amounts = setup
    op = get_damage("zero", scope="out/kernel")
    assert touched_leaves(op, params, damage_keys, amounts,
                          info=tiny.info) == ["out/kernel"]
    few = recover_damage(get_strategy("restore_entries"), task, op, params,
                         damage_keys=damage_keys, amounts=amounts, keys=keys)
    every = recover_damage(get_strategy("restore_full"), task, op, params,
                           damage_keys=damage_keys, amounts=amounts,
                           keys=keys)
    assert few.restored_leaves == ("out/kernel",)
    assert few.params is None  # nothing per point is held unless asked
    assert few.bytes_read < every.bytes_read
    assert len(every.restored_leaves) == 4


def test_rederived_finetune_and_composition_match_the_stacked_call(
        tiny, setup):
    task, params, damage_keys, keys, amounts = setup
    op = get_damage("zero")
    steps = 4
    for name in ("finetune", "restore_leaves+finetune"):
        strategy = get_strategy(name, steps=steps, batch_size=50,
                                eval_every=2)
        rederived = recover_damage(strategy, task, op, params,
                                   damage_keys=damage_keys, amounts=amounts,
                                   keys=keys, return_params=True)
        stacked = strategy(keys, materialised(op, tiny, params, damage_keys,
                                              amounts), task)
        assert rederived.losses.shape == (COUNT, steps)
        assert rederived.curve.steps.tolist() == [[0, 2, 4]] * COUNT
        # The same per-model program, damage folded in or not: equal up to
        # how XLA orders the sums of a few SGD steps (784 + 16 inputs and
        # 50 examples per step, forward and backward).
        terms = steps * 2 * (784 + 16 + 10 + 50)
        for got, want in zip(jax.tree.leaves(rederived.params),
                             jax.tree.leaves(stacked.params)):
            assert_sums_close(got, want, terms=terms,
                              magnitude=np.abs(np.asarray(want)).max() + 1,
                              err_msg=name)
        assert_sums_close(rederived.curve.loss, stacked.curve.loss,
                          terms=terms, magnitude=10.0, err_msg=name)
    assert isinstance(strategy, PointStrategy)
    assert rederived.restored_leaves == stacked.restored_leaves


def test_a_plain_registered_strategy_still_runs(tiny, setup):
    task, params, damage_keys, keys, amounts = setup
    seen = []

    def factory():
        def strategy(keys_, damage, task_):
            seen.append(jax.tree.leaves(damage.params)[0].shape[0])
            return get_strategy("restore_entries")(keys_, damage, task_)
        return strategy

    register_strategy("points_plain", factory, overwrite=True)
    outcome = recover_damage(get_strategy("points_plain"), task,
                             get_damage("zero"), params,
                             damage_keys=damage_keys, amounts=amounts,
                             keys=keys)
    assert seen == [COUNT]
    assert outcome.params is None
    assert len(outcome.restored_leaves) == 4


def test_recover_damage_checks_its_points(tiny, setup):
    task, params, damage_keys, keys, amounts = setup
    strategy = get_strategy("restore_full")
    with pytest.raises(ValueError, match="one entry per point"):
        recover_damage(strategy, task, get_damage("zero"), params,
                       damage_keys=damage_keys, amounts=amounts[:2],
                       keys=keys)
    with pytest.raises(TypeError, match="keys"):
        recover_damage(strategy, task, get_damage("zero"), params,
                       damage_keys=damage_keys, amounts=amounts,
                       keys=np.zeros((COUNT, 2), np.uint32))
