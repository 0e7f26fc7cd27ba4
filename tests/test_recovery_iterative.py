"""Damage-recover cycles, and FLOPs counted with loop bodies per iteration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax._types import Split
from recovjax.damage import get_damage
from recovjax.data import batch_split
from recovjax.models.info import paths_of
from recovjax.recovery import get_strategy, make_task, recover_damage
from recovjax.recovery.measure import program_flops
from recovjax.recovery.iterative import cubic_fractions


@pytest.fixture(scope="module")
def setting(lenet, trained_lenet, small_mnist):
    task = make_task(lenet, Split(small_mnist.train.images[:200],
                                  small_mnist.train.labels[:200]),
                     eval_batches=batch_split(small_mnist.test, 100))
    op = get_damage("zero", scope="weights", target="smallest")
    return lenet, trained_lenet, task, op


def _run(setting, strategy, amount=0.9, count=2, count_flops=False):
    model, params, task, op = setting
    return recover_damage(strategy, task, op, params,
                          damage_keys=jax.random.split(jax.random.key(1),
                                                       count),
                          amounts=jnp.full((count,), amount),
                          keys=jax.random.split(jax.random.key(2), count),
                          return_params=True, count_flops=count_flops)


def test_cycles_end_at_the_amount_with_what_was_pruned_kept_pruned(setting):
    model, params, task, op = setting
    strategy = get_strategy("iterative", fractions=[0.5, 0.8], steps=4,
                            eval_every=2, learning_rate=0.01)
    outcome = _run(setting, strategy, count_flops=True)
    kernels = [p for p in paths_of(params) if p.endswith("kernel")]
    flat = dict(zip(paths_of(outcome.params),
                    jax.tree.leaves(outcome.params)))
    for path in kernels:
        leaf = np.asarray(flat[path])
        for model_leaf in leaf:
            # Exactly 90 % of each kernel is zero after the last cycle.
            zeros = int(np.sum(model_leaf == 0))
            assert zeros == int(np.ceil(0.9 * model_leaf.size)) or (
                zeros == int(np.floor(0.9 * model_leaf.size)))
    # Three cycles (0.5, 0.8, then 1.0 of the amount), each 4 steps with
    # points at 0, 2, 4: one curve over 12 steps.
    steps = np.asarray(outcome.curve.steps)[0]
    assert steps.tolist() == [0, 2, 4, 4, 6, 8, 8, 10, 12]
    assert outcome.losses.shape == (2, 12)
    assert outcome.flops > 0


def test_the_first_cycle_is_the_one_shot_recovery_at_its_fraction(setting):
    model, params, task, op = setting
    staged = _run(setting, get_strategy("iterative", fractions=[1.0],
                                        steps=2, learning_rate=0.01),
                  count=1)
    plain = _run(setting, get_strategy("finetune_undamaged", steps=2,
                                       learning_rate=0.01), count=1)
    # One cycle at the whole amount is the one-shot damage recovered by
    # the same strategy (its key folded with the cycle's index 0).
    np.testing.assert_allclose(staged.curve.accuracy[:, 0],
                               plain.curve.accuracy[:, 0])


def test_cubic_schedule_and_errors(setting):
    assert cubic_fractions(4) == pytest.approx((1 - 0.75 ** 3, 1 - 0.5 ** 3,
                                                1 - 0.25 ** 3, 1.0))
    with pytest.raises(ValueError, match="fractions must be non-decreasing"):
        get_strategy("iterative", fractions=[0.8, 0.5])
    with pytest.raises(ValueError, match="fractions must be"):
        get_strategy("iterative", fractions=[0.0, 0.5])
    with pytest.raises(ValueError, match="stages must be a positive int"):
        get_strategy("iterative", stages=0)
    with pytest.raises(ValueError, match="then: one strategy"):
        get_strategy("iterative", then="restore_full+finetune")
    with pytest.raises(ValueError, match="unknown recovery strategy"):
        get_strategy("iterative", then="nothing")
    model, params, task, op = setting
    keys = jax.random.split(jax.random.key(0), 1)
    damage = jax.vmap(lambda k: op(k, params, 0.5, info=model.info))(keys)
    with pytest.raises(ValueError, match="needs the damage operator"):
        get_strategy("iterative", steps=2)(keys, damage, task)
    with pytest.raises(ValueError, match="cannot be composed"):
        get_strategy("iterative+finetune", steps=2)(keys, damage, task)


def test_program_flops_counts_every_loop_iteration():
    x = jnp.ones((32, 32))

    def nested(x):
        def outer(carry, _):
            def inner(c, _):
                return c @ x, None
            return jax.lax.scan(inner, carry, None, length=3)[0], None
        return jax.lax.scan(outer, x, None, length=5)[0]

    matmul = 2 * 32 ** 3
    flops = program_flops(nested, x)
    assert 15 * matmul <= flops <= 15 * matmul * 1.01
    once = program_flops(lambda x: x @ x, x)
    assert matmul <= once <= matmul * 1.01
