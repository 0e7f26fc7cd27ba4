"""Learning-rate rewinding: retraining on the pretraining schedule."""

import jax
import numpy as np
import optax
import pytest

from recovjax._types import Split
from recovjax.checkpoints import save_checkpoint
from recovjax.damage import get_damage
from recovjax.data import batch_split
from recovjax.recovery import get_strategy, make_task
from recovjax.recovery.rewind import training_schedule

RECIPE = {"model": "lenet5", "optimizer": "adam", "learning_rate": 2e-3,
          "schedule": "constant", "batch_size": 50, "epochs": 3}


@pytest.fixture(scope="module")
def setting(lenet, trained_lenet, small_mnist, tmp_path_factory):
    root = tmp_path_factory.mktemp("rewind")
    save_checkpoint(root / "recorded", trained_lenet, RECIPE)
    save_checkpoint(root / "bare", trained_lenet, {"model": "lenet5"})
    data = Split(small_mnist.train.images[:200],
                 small_mnist.train.labels[:200])
    tasks = {name: make_task(lenet, data, checkpoint=root / name,
                             eval_batches=batch_split(small_mnist.test, 100))
             for name in ("recorded", "bare")}
    keys = jax.random.split(jax.random.key(4), 2)
    op = get_damage("zero")
    damage = jax.vmap(lambda k: op(k, trained_lenet, 0.5))(keys)
    return tasks, keys, damage


def test_a_constant_schedule_rewound_is_its_optimiser_at_that_rate(setting):
    tasks, keys, damage = setting
    rewound = get_strategy("lr_rewind", steps=6, eval_every=3)(
        keys, damage, tasks["recorded"])
    plain = get_strategy("finetune", optimizer="adam", learning_rate=2e-3,
                         batch_size=50, steps=6, eval_every=3)(
        keys, damage, tasks["recorded"])
    for a, b in zip(jax.tree.leaves(rewound.params),
                    jax.tree.leaves(plain.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(rewound.curve.accuracy,
                                  plain.curve.accuracy)


def test_the_schedule_is_rewound_to_the_end_minus_the_retraining():
    name, schedule, total, momentum, size = training_schedule(
        {"optimizer": "sgd", "learning_rate": 0.1, "schedule": "cosine",
         "total_steps": 100, "momentum": 0.9, "batch_size": 10})
    assert (name, total, momentum, size) == ("sgd", 100, 0.9, 10)
    expected = optax.cosine_decay_schedule(0.1, 100)
    for step in (0, 50, 99):
        assert float(schedule(step)) == pytest.approx(float(expected(step)))
    _, from_epochs, total, _, _ = training_schedule(
        {"optimizer": "adam", "learning_rate": 1e-3, "schedule": "linear",
         "epochs": 4}, steps_per_epoch=25)
    assert total == 100 and float(from_epochs(50)) == pytest.approx(5e-4)


def test_a_rewound_cosine_schedule_retrains_at_its_late_rates(setting):
    tasks, keys, damage = setting
    late = {"optimizer": "sgd", "learning_rate": 0.05, "momentum": 0.9,
            "schedule": "cosine", "total_steps": 1000}
    # Rewound to the end, the rates are tiny: the model barely moves;
    # rewound to the start, it retrains at the peak rate.
    at_end = get_strategy("lr_rewind", schedule=late, steps=4)(
        keys, damage, tasks["bare"])
    at_start = get_strategy("lr_rewind", schedule=late, steps=4,
                            rewind_to=0)(keys, damage, tasks["bare"])
    moved = lambda outcome: max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
            jax.tree.leaves(outcome.params), jax.tree.leaves(damage.params)))
    assert moved(at_end) < 0.01 * moved(at_start)


def test_rewind_errors_say_what_to_declare(setting):
    tasks, keys, damage = setting
    with pytest.raises(ValueError, match="records no training schedule; "
                       "give the strategy schedule="):
        get_strategy("lr_rewind", steps=2)(keys, damage, tasks["bare"])
    with pytest.raises(ValueError, match="schedule.learning_rate must be"):
        get_strategy("lr_rewind", schedule={"optimizer": "sgd",
                                            "total_steps": 10})
    with pytest.raises(ValueError, match="schedule.schedule must be one of"):
        get_strategy("lr_rewind", schedule={
            "learning_rate": 0.1, "schedule": "step", "total_steps": 10})
    with pytest.raises(ValueError, match="schedule.total_steps must be"):
        get_strategy("lr_rewind", schedule={"learning_rate": 0.1})
    with pytest.raises(ValueError, match="rewind_to must be a non-negative"):
        get_strategy("lr_rewind", rewind_to=-1)
