"""The progressive bit search against random flips of the same budget."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax.damage import make_bit_flip
from recovjax.damage.attack import as_damage, make_bit_search, run_bit_search
from recovjax.damage.formats import deploy
from recovjax.damage.replay import fault_list, replay
from recovjax.data import batch_split

FLIPS = 8


@pytest.fixture(scope="module")
def setting(lenet, trained_lenet, small_mnist):
    attack = (jnp.asarray(small_mnist.train.images[:64]),
              jnp.asarray(small_mnist.train.labels[:64]))
    return lenet, trained_lenet, attack, batch_split(small_mnist.test, 100)


@pytest.fixture(scope="module")
def searched(setting):
    """The attack and its random baseline, FLIPS flips each."""
    model, params, attack, evaluation = setting
    return tuple(jax.jit(make_bit_search(model, flips=FLIPS,
                                         strategy=strategy))(
        jax.random.key(0), params, attack, evaluation)
        for strategy in ("gradient", "random"))


def test_the_attack_beats_random_flips_of_the_same_budget(setting,
                                                          searched):
    model, params, attack, evaluation = setting
    gradient, random = searched
    accuracy = np.asarray(gradient.accuracy)
    assert accuracy.shape == (FLIPS + 1,)
    # The same deployed model before the first flip.
    assert accuracy[0] == float(random.accuracy[0])
    assert accuracy[-1] < accuracy[0] - 0.3
    assert abs(float(random.accuracy[-1]) - accuracy[0]) <= 0.02
    # No entry is flipped twice (a second flip would undo or repeat).
    pairs = set(zip(np.asarray(gradient.leaf).tolist(),
                    np.asarray(gradient.index).tolist()))
    assert len(pairs) == FLIPS
    # The attack batch's loss rises with every chosen flip.
    loss = np.asarray(gradient.loss)
    assert np.all(np.diff(loss) > 0)
    # Exactly the recorded bits differ from the deployed codes.
    changed = sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in
                  zip(jax.tree.leaves(gradient.params),
                      jax.tree.leaves(gradient.deployed)))
    assert 1 <= changed <= FLIPS
    names = make_bit_search(model, flips=1).paths(params)
    assert names == ("conv1/kernel", "conv2/kernel", "fc1/kernel",
                     "fc2/kernel", "fc3/kernel")
    assert set(np.asarray(gradient.leaf).tolist()) <= set(range(len(names)))
    assert np.all((np.asarray(gradient.bit) >= 0)
                  & (np.asarray(gradient.bit) < 8))


def test_the_deployed_model_is_the_int8_model(setting, searched):
    model, params, attack, evaluation = setting
    result = searched[0]
    reference = deploy(params, "int8")
    for path in ("conv1", "fc3"):
        np.testing.assert_allclose(result.deployed[path]["kernel"],
                                   reference[path]["kernel"], rtol=0,
                                   atol=1e-6 * float(jnp.max(jnp.abs(
                                       reference[path]["kernel"]))))
        np.testing.assert_array_equal(result.deployed[path]["bias"],
                                      params[path]["bias"])


def test_the_attack_replays_bit_for_bit(searched):
    result = searched[0]
    faults = fault_list(result.deployed, as_damage(result))
    again = replay(faults)(jax.random.key(9), result.deployed)
    for a, b in zip(jax.tree.leaves(again.params),
                    jax.tree.leaves(result.params)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32),
                                      np.asarray(b).view(np.uint32))


def test_runs_over_seeds_and_attack_batches_in_one_program(setting,
                                                           small_mnist):
    model, params, _, evaluation = setting
    images = jnp.asarray(small_mnist.train.images[:48]).reshape(
        (3, 16) + small_mnist.train.images.shape[1:])
    labels = jnp.asarray(small_mnist.train.labels[:48]).reshape(3, 16)
    keys = jax.random.split(jax.random.key(1), 3)
    result = run_bit_search(make_bit_search(model, flips=2), keys, params,
                            (images, labels), evaluation)
    assert result.accuracy.shape == (3, 3)
    assert result.bit.shape == (3, 2)
    assert np.all(np.asarray(result.accuracy[:, -1])
                  < np.asarray(result.accuracy[:, 0]))


def test_bad_settings_are_refused(setting):
    model, params, attack, evaluation = setting
    with pytest.raises(ValueError, match="flips must be a positive int"):
        make_bit_search(model, flips=0)
    with pytest.raises(ValueError, match="candidates must be a positive"):
        make_bit_search(model, flips=1, candidates=0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        make_bit_search(model, flips=1, strategy="clever")
    with pytest.raises(ValueError, match="unknown format|format"):
        make_bit_search(model, flips=1, format="int3")
    with pytest.raises(ValueError, match="matches no leaf"):
        make_bit_search(model, flips=1, scope="nothing_.*")(
            jax.random.key(0), params, attack, evaluation)


def test_the_bit_search_as_a_damage_kind(setting, small_mnist):
    from recovjax.damage import get_damage
    from recovjax.sweep.keys import key_indices
    model, params, _, _ = setting
    kind = get_damage("bit_search", flips=4, attack_examples=32)
    with pytest.raises(TypeError, match="op.bind"):
        kind(jax.random.key(0), params, 2)
    op = kind.bind(model, small_mnist.train.images[:100],
                   small_mnist.train.labels[:100])
    key = jax.random.key(5)
    budget = jax.jit(lambda k, flips: op(k, params, flips))
    two, four = budget(key, 2.0), budget(key, 4.0)
    # A larger budget continues the same flips: the entries hit by two
    # flips are among those hit by four.
    for small, large in zip(jax.tree.leaves(two.mask),
                            jax.tree.leaves(four.mask)):
        assert not np.any(np.asarray(small) & ~np.asarray(large))
    assert 1 <= sum(int(m.sum()) for m in jax.tree.leaves(two.mask)) <= 2
    # ... because every budget of a seed gets the same key in a sweep.
    assert key_indices(op, [0, 1, 2]) == [0, 0, 0]
    assert key_indices(make_bit_flip(), [0, 1, 2]) == [0, 1, 2]
    with pytest.raises(ValueError, match="flips must be a whole number of "
                       "at most 4"):
        op(key, params, 5)
    with pytest.raises(ValueError, match="fewer than the attack batch"):
        kind.bind(model, small_mnist.train.images[:10],
                  small_mnist.train.labels[:10])
