"""Rebuild, distillation, the strategy registry and the recovery measures."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tree_equal
from recovjax._types import Damage, Split
from recovjax.checkpoints import CheckpointCorruptedError, save_checkpoint
from recovjax.damage import get_damage
from recovjax.data import batch_split
from recovjax.models import LeafInfo, Model, from_apply, from_equinox
from recovjax.models.info import paths_of
from recovjax.recovery import (Curve, FinetuneResult, distill, distill_loss,
                               get_strategy, make_task, peak_memory,
                               rebuild_from_checkpoint, rebuild_reinit,
                               recovery_ratio, recovery_records, reinitialize,
                               samples_to_fraction, steps_to_fraction,
                               strategy_names, teacher_logits,
                               train_step_cost)
from recovjax.recovery.restore import restore_entries


def tiny_model() -> Model:
    """A two-layer perceptron: compiles in a fraction of LeNet's time."""

    def init(key, sample):
        first, second = jax.random.split(key)
        width = int(np.prod(sample.shape[1:]))
        return {"hidden": {"kernel": jax.random.normal(first, (width, 16))
                           / np.sqrt(width),
                           "bias": jax.random.normal(second, (16,)) * 0.1},
                "out": {"kernel": jax.random.normal(second, (16, 10)) / 4.0,
                        "bias": jnp.zeros((10,))}}

    def apply(params, x):
        hidden = jnp.tanh(x.reshape(x.shape[0], -1)
                          @ params["hidden"]["kernel"]
                          + params["hidden"]["bias"])
        return hidden @ params["out"]["kernel"] + params["out"]["bias"]

    sample = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    dense = {"kernel": LeafInfo("kernel", in_axes=(0,), out_axes=(1,)),
             "bias": LeafInfo("bias", out_axes=(0,))}
    return from_apply(apply, init(jax.random.key(0), sample), sample=sample,
                      init=lambda key: init(key, sample), name="tiny",
                      info={f"{layer}/{leaf}": info
                            for layer in ("hidden", "out")
                            for leaf, info in dense.items()})


def remove_units(params, units=(0, 1, 2, 3)):
    """Structural damage: hidden units removed (their weights zeroed)."""
    units = np.asarray(units)
    mask = jax.tree.map(lambda x: np.zeros(x.shape, bool), params)
    mask["hidden"]["kernel"][:, units] = True
    mask["hidden"]["bias"][units] = True
    mask["out"]["kernel"][units] = True
    damaged = jax.tree.map(lambda p, m: np.where(m, np.float32(0), p),
                           params, mask)
    return Damage(damaged, mask)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def data(small_mnist):
    train = Split(small_mnist.train.images[:300],
                  small_mnist.train.labels[:300])
    test = batch_split(Split(small_mnist.test.images[:100],
                             small_mnist.test.labels[:100]), 50)
    return train, test


@pytest.fixture(scope="module")
def pretrained(tiny, data):
    """Stand-in pretrained parameters: none of these tests needs a trained
    model, and training one would cost another compilation."""
    train, _ = data
    return tiny.init(jax.random.key(0), jnp.asarray(train.images[:1]))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, pretrained):
    directory = tmp_path_factory.mktemp("other") / "ckpt"
    save_checkpoint(directory, pretrained, {"model": "tiny"})
    return directory


def stack(tree, count):
    return jax.tree.map(lambda x: np.stack([x] * count), tree)


# Rebuild.

def test_reinitialize_takes_fresh_values_exactly_at_the_mask(tiny, pretrained):
    damage = remove_units(pretrained)
    sample = jnp.zeros((1, 28, 28, 1))
    rebuilt = reinitialize(jax.random.key(5), tiny.init, sample,
                           damage.params, damage.mask)
    fresh = tiny.init(jax.random.key(5), sample)
    for new, old, init, mask in zip(*(jax.tree.leaves(t) for t in (
            rebuilt, damage.params, fresh, damage.mask))):
        new, old, init, mask = map(np.asarray, (new, old, init, mask))
        assert np.array_equal(new[mask], init[mask])
        assert np.array_equal(new[~mask], old[~mask])


def test_rebuild_reinit_retrains_removed_units(tiny, pretrained, data):
    train, test = data
    damage = remove_units(pretrained)
    result = rebuild_reinit(jax.random.key(6), tiny.init, tiny.forward,
                            damage.params, damage.mask, train.images,
                            train.labels, steps=6, batch_size=50,
                            eval_batches=test)
    kernel = np.asarray(result.params["hidden"]["kernel"])
    assert np.all(np.abs(kernel[:, :4]).sum(0) > 0), "units stay removed"
    assert result.curve.steps.tolist() == [0, 6]


def test_rebuild_from_checkpoint_is_exact(checkpoint, pretrained):
    damage = remove_units(pretrained)
    result = rebuild_from_checkpoint(checkpoint, damage.params, damage.mask)
    assert tree_equal(result.params, pretrained)
    assert result.restored_leaves == ("hidden/bias", "hidden/kernel",
                                      "out/kernel")


# Restoring a framework model's checkpoint.

def test_restore_entries_on_an_equinox_checkpoint(tmp_path):
    # Equinox params are a nested dict keyed by list indices ("layers/0");
    # a healthy checkpoint of them once read back as lists and was reported
    # as corrupted.
    eqx = pytest.importorskip("equinox")
    x = jax.random.normal(jax.random.key(0), (4, 6))
    model = from_equinox(eqx.nn.MLP(6, 3, 5, 2, key=jax.random.key(1)),
                         sample=x)
    params = model.params
    assert set(params) == {"layers"}
    assert set(params["layers"]) == {"0", "1", "2"}
    directory = save_checkpoint(tmp_path / "eqx", params, {"model": "mlp"})
    damage = get_damage("zero")(jax.random.key(2), params, 0.5)
    touched = tuple(sorted(
        path for path, leaf in zip(paths_of(params),
                                   jax.tree.leaves(damage.mask))
        if np.any(np.asarray(leaf))))
    assert touched and not tree_equal(damage.params, params)
    try:
        result = restore_entries(directory, damage.params, damage.mask)
    except CheckpointCorruptedError as error:
        pytest.fail(f"a healthy checkpoint was reported corrupted: {error}")
    assert tree_equal(result.params, params)
    assert result.restored_leaves == touched
    assert result.bytes_read > 0
    # The restored tree is still the model's: it goes back into the module.
    np.testing.assert_array_equal(model.forward(result.params, x),
                                  model.forward(params, x))
    # A stack of two damaged models restores the same way.
    other = get_damage("zero")(jax.random.key(3), params, 0.2)
    stacked = jax.tree.map(lambda a, b: np.stack([a, b]),
                           tuple(damage), tuple(other))
    result = restore_entries(directory, *stacked, stacked=True)
    for index in range(2):
        assert tree_equal(jax.tree.map(lambda leaf: leaf[index],
                                       jax.device_get(result.params)), params)


# Distillation.

def test_distill_loss_is_zero_at_the_teacher_and_positive_elsewhere():
    logits = jax.random.normal(jax.random.key(0), (4, 10))
    # Exactly zero on any CPU: teacher and student are the same operations
    # on the same values, so every term's log-ratio is 0.
    np.testing.assert_array_equal(distill_loss(logits, logits), 0.0)
    assert np.all(distill_loss(logits * 0.0, logits) > 0)
    high = distill_loss(logits * 0.0, logits, temperature=4.0)
    assert high.shape == (4,)


def test_distill_moves_the_student_toward_the_teacher(tiny, pretrained,
                                                      data):
    train, test = data
    damage = remove_units(pretrained, units=(0, 1, 2, 3, 4, 5, 6, 7))
    images = jnp.asarray(train.images)
    targets = teacher_logits(tiny.forward, pretrained, images)
    assert targets.shape == (300, 10)
    before = float(distill_loss(tiny.forward(damage.params, images),
                                targets).mean())
    result = distill(jax.random.key(7), tiny.forward, damage.params,
                     pretrained, images, steps=12, batch_size=50,
                     optimizer=optax.sgd(0.05, momentum=0.9),
                     eval_batches=test)
    after = float(distill_loss(tiny.forward(result.params, images),
                               targets).mean())
    assert after < before * 0.9
    assert isinstance(result, FinetuneResult)


# Registry and composition.

def test_registry_names_and_errors():
    names = strategy_names()
    for name in ("finetune", "finetune_damaged", "finetune_undamaged",
                 "restore_full", "restore_leaves", "restore_entries",
                 "detect_restore", "rebuild_reinit", "rebuild_checkpoint",
                 "distill"):
        assert name in names
    with pytest.raises(ValueError, match="unknown recovery strategy "
                       "'polish'.*finetune, finetune_damaged"):
        get_strategy("restore_leaves+polish")
    with pytest.raises(ValueError, match=r"option\(s\) \['lr'\] not accepted"):
        get_strategy("finetune", lr=0.1)
    with pytest.raises(ValueError, match="use rebuild_reinit"):
        get_strategy("finetune_damaged", structural=True)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        get_strategy("finetune", optimizer="rmsprop")


def test_strategies_from_the_registry_run_on_a_stack(tiny, pretrained, data,
                                                     checkpoint):
    train, test = data
    task = make_task(tiny, train, checkpoint=checkpoint, eval_batches=test)
    damage = Damage(*jax.tree.map(lambda x: np.stack([x, x]),
                                  tuple(remove_units(pretrained))))
    keys = jax.random.split(jax.random.key(8), 2)
    restored = get_strategy("restore_entries")(keys, damage, task)
    assert tree_equal(jax.tree.map(lambda x: x[1],
                                   jax.device_get(restored.params)),
                      pretrained)
    assert restored.curve.steps.shape == (2, 1)
    assert restored.bytes_read > 0
    detected = get_strategy("detect_restore")(keys, damage, task)
    assert tree_equal(detected.params, restored.params)
    composed = get_strategy("restore_leaves+finetune", steps=4,
                            batch_size=50, leaves=["out/kernel"],
                            structural=True)(keys, damage, task)
    # Structural fine-tuning keeps masked entries at zero, so the restored
    # out/kernel rows of the removed units are zeroed again.
    out = np.asarray(composed.params["out"]["kernel"])
    assert np.all(out[:, :4] == 0.0) and composed.losses.shape == (2, 4)
    assert composed.restored_leaves == ("out/kernel",)
    assert composed.bytes_read > 0 and composed.seconds > 0
    assert not bool(np.any(composed.diverged))


def test_distill_strategy_reads_the_teacher_from_the_checkpoint(
        tiny, pretrained, data, checkpoint):
    train, test = data
    garbage = Split(train.images, np.zeros_like(train.labels))
    damage = Damage(*jax.tree.map(lambda x: np.stack([x]),
                                  tuple(remove_units(pretrained))))
    strategy = get_strategy("distill", steps=6, batch_size=50,
                            learning_rate=0.05)
    keys = jax.random.split(jax.random.key(9), 1)
    with_labels = strategy(keys, damage, make_task(
        tiny, train, checkpoint=checkpoint, eval_batches=test))
    without = strategy(keys, damage, make_task(
        tiny, garbage, checkpoint=checkpoint, eval_batches=test))
    assert tree_equal(with_labels.params, without.params), "labels were used"
    with pytest.raises(ValueError, match="needs the pretrained checkpoint"):
        strategy(keys, damage, make_task(tiny, train))


def test_make_task_data_budget(tiny, data):
    train, _ = data
    task = make_task(tiny, train, budget=(jax.random.key(3), 0.2))
    assert float(task.weights.sum()) == 60.0
    with pytest.raises(ValueError, match=r"\(key, fraction\) pair"):
        make_task(tiny, train, budget=0.2)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        make_task(tiny, train, budget=(jax.random.key(0), 1.5))


# Measures.

def test_recovery_ratio():
    assert recovery_ratio(0.9, 0.5, 0.8) == pytest.approx(0.75)
    assert recovery_ratio(0.9, 0.5, 0.4) == pytest.approx(-0.25)
    assert math.isnan(recovery_ratio(0.9, 0.9, 0.9))
    ratios = recovery_ratio(0.9, np.array([0.5, 0.9]), np.array([0.9, 0.8]))
    assert ratios[0] == pytest.approx(1.0) and math.isnan(ratios[1])


def test_recovery_ratio_with_a_test_set_size_is_undefined_within_noise():
    # 2 SE of 0.9 on 100 examples: 6 pp. A 3 pp gap is noise, 40 pp is not.
    assert recovery_ratio(0.9, 0.87, 0.8) == pytest.approx(-7 / 3)
    assert math.isnan(recovery_ratio(0.9, 0.87, 0.8, examples=100))
    assert recovery_ratio(0.9, 0.5, 0.8, examples=100) == pytest.approx(0.75)
    ratios = recovery_ratio(0.9, np.array([0.5, 0.87]), np.array([0.9, 0.8]),
                            examples=100)
    assert ratios[0] == pytest.approx(1.0) and math.isnan(ratios[1])
    with pytest.raises(ValueError, match="examples"):
        recovery_ratio(0.9, 0.5, 0.8, examples=0)


def test_steps_and_samples_to_threshold():
    curve = Curve(steps=np.array([0, 10, 20, 30]),
                  samples=np.array([0.0, 1000.0, 2000.0, 3000.0]),
                  accuracy=np.array([0.3, 0.86, 0.95, 0.97]),
                  loss=np.zeros(4))
    assert steps_to_fraction(curve.steps, curve.accuracy, 0.9, 0.95) == 10
    assert steps_to_fraction(curve.steps, curve.accuracy, 0.955, 0.99) == 20
    assert steps_to_fraction(curve.steps, curve.accuracy, 0.97, 0.99) == 30
    assert steps_to_fraction(curve.steps, curve.accuracy, 1.0, 0.99) is None
    assert samples_to_fraction(curve, 0.9, 0.95) == 1000


def test_cost_and_memory(tiny, pretrained):
    cost = train_step_cost(tiny.forward, pretrained, (50, 28, 28, 1))
    # Forward + backward of the 784x16 layer alone is ~3 * 2 * 50 * 784 * 16.
    assert cost.flops > 2 * 2 * 50 * 784 * 16
    assert cost.bytes_accessed > 0
    memory = peak_memory()
    assert memory.host_bytes > 10 * 2 ** 20


def test_recovery_records_are_tidy_and_keep_diverged_points():
    curve = Curve(steps=np.array([[0, 5, 10], [0, 5, 10]]),
                  samples=np.array([[0.0, 500, 1000], [0.0, 500, 1000]]),
                  accuracy=np.array([[0.5, 0.86, 0.9], [0.4, np.nan,
                                                        np.nan]]),
                  loss=np.array([[1.0, 0.5, 0.4], [1.5, np.nan, np.nan]]))
    result = FinetuneResult(params=None, curve=curve,
                            losses=np.zeros((2, 10)),
                            diverged=np.array([False, True]),
                            diverged_step=np.array([-1, 3]))
    rows = recovery_records(result, damage="zero", ratios=[0.1, 0.5],
                            seeds=[0, 0], clean_accuracy=0.9,
                            cost={"wall_seconds": 2.0}, strategy="finetune")
    assert {tuple(sorted(row)) for row in rows} == {tuple(sorted(
        ["damage", "ratio", "seed", "stage", "metric", "value", "step",
         "strategy"]))}
    first = [r for r in rows if r["ratio"] == 0.1]
    second = [r for r in rows if r["ratio"] == 0.5]
    value = lambda rs, stage, metric: [r for r in rs if r["stage"] == stage
                                       and r["metric"] == metric]
    assert value(first, "recovered", "recovery_ratio")[0]["value"] == \
        pytest.approx(1.0)
    assert value(first, "recovered", "steps_to_95")[0]["value"] == 5
    assert value(first, "recovered", "steps_to_99")[0]["value"] == 10
    assert [r["step"] for r in value(first, "recovered", "accuracy")] == [
        0, 5, 10]
    diverged = value(second, "recovered", "diverged")[0]
    assert diverged["value"] == 1.0 and diverged["step"] == 3
    assert math.isnan(value(second, "recovered", "steps_to_95")[0]["value"])
    assert value(second, "damaged", "accuracy")[0]["value"] == 0.4
    with pytest.raises(ValueError, match="2 models but 1 ratios"):
        recovery_records(result, damage="zero", ratios=[0.1], seeds=[0],
                         clean_accuracy=0.9)
