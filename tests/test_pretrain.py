"""Tests of recovjax.pretrain: training improves loss, determinism, the zoo."""

from __future__ import annotations

import importlib

import jax
import numpy as np
import pytest

from recovjax._types import Dataset, Split
from recovjax.checkpoints import read_metadata
from recovjax.pretrain import Recipe, load_pretrained, pretrain, train

from conftest import tree_equal

# The module, not the function re-exported as recovjax.pretrain.
pretraining = importlib.import_module("recovjax.pretrain")

TINY = Recipe(epochs=2, batch_size=50, learning_rate=2e-3)


@pytest.fixture(scope="module")
def tiny(mnist):
    return Dataset("mnist5k", Split(mnist.train.images[:300],
                                    mnist.train.labels[:300]),
                   Split(mnist.test.images[:100], mnist.test.labels[:100]), 10)


def test_training_reduces_loss(lenet, tiny):
    _, state, losses = train(jax.random.key(0), lenet, tiny, TINY,
                             progress=False)
    assert state == {}  # LeNet-5 has no batch statistics
    assert len(losses) == 2 and losses[1] < losses[0]
    assert np.isfinite(losses).all()


def test_a_model_without_state_trains_its_evaluation_forward(lenet, tiny):
    # Training mode with an empty state is the plain loop over
    # model.forward: the zoo's existing weights stay the same bits.
    import optax

    from recovjax.data import shuffled_batches
    from recovjax.evaluate import cross_entropy
    key = jax.random.key(7)
    params, state, losses = train(key, lenet, tiny, TINY, progress=False)
    init_key, order_key = jax.random.split(key)
    images, labels = jax.numpy.asarray(tiny.train.images), jax.numpy.asarray(
        tiny.train.labels)
    reference = lenet.init(init_key, images[:1])
    optimizer = optax.adam(TINY.learning_rate)
    opt_state = optimizer.init(reference)

    def loss_fn(p, x, y, w):
        return jax.numpy.sum(cross_entropy(lenet.forward(p, x), y) * w) / (
            jax.numpy.maximum(w.sum(), 1.0))

    @jax.jit
    def epoch(p, o, k):
        batches = shuffled_batches(k, images, labels,
                                   jax.numpy.ones(labels.shape), 50)

        def step(carry, batch):
            p, o = carry
            loss, grads = jax.value_and_grad(loss_fn)(p, *batch)
            updates, o = optimizer.update(grads, o, p)
            return (optax.apply_updates(p, updates), o), loss

        (p, o), step_losses = jax.lax.scan(step, (p, o), (
            batches.images, batches.labels, batches.mask))
        return p, o, step_losses.mean()

    expected = []
    for index in range(TINY.epochs):
        reference, opt_state, loss = epoch(
            reference, opt_state, jax.random.fold_in(order_key, index))
        expected.append(float(loss))
    assert tree_equal(params, reference)
    assert losses == expected and state == {}


def test_recipe_schedules(lenet, tiny):
    with pytest.raises(ValueError, match="schedule must be one of constant, "
                                         "cosine, got 'linear'"):
        Recipe(schedule="linear")
    cosine = Recipe(epochs=2, batch_size=50, learning_rate=2e-3,
                    schedule="cosine")
    assert cosine.describe()["schedule"] == "cosine"
    assert cosine.decay_steps(6) == 12 and TINY.decay_steps(6) == 0
    decayed = train(jax.random.key(0), lenet, tiny, cosine, progress=False)
    constant = train(jax.random.key(0), lenet, tiny, TINY, progress=False)
    assert np.isfinite(decayed.losses).all()
    assert not tree_equal(decayed.params, constant.params)


def test_same_seed_gives_bit_identical_params(lenet, tiny):
    a = pretrain(lenet, tiny, seed=3, recipe=TINY, progress=False)
    b = pretrain(lenet, tiny, seed=3, recipe=TINY, progress=False)
    c = pretrain(lenet, tiny, seed=4, recipe=TINY, progress=False)
    assert tree_equal(a.params, b.params)
    assert not tree_equal(a.params, c.params)
    assert a.metadata["train_loss"] == b.metadata["train_loss"]


def test_pretrain_saves_checkpoint_with_metadata(lenet, tiny, tmp_path):
    result = pretrain(lenet, tiny, seed=0, recipe=TINY, progress=False,
                      directory=tmp_path / "ck")
    metadata = read_metadata(result.path)
    for key in ("model", "dataset", "seed", "epochs", "optimizer",
                "learning_rate", "batch_size", "test_accuracy", "versions"):
        assert key in metadata, key
    assert metadata["model"] == "lenet5" and metadata["seed"] == 0
    assert metadata["epochs"] == 2 and metadata["optimizer"] == "adam"
    assert 0.0 <= metadata["test_accuracy"] <= 1.0
    assert "jax" in metadata["versions"] and "flax" in metadata["versions"]
    with pytest.raises(FileExistsError):
        pretrain(lenet, tiny, seed=1, recipe=TINY, progress=False,
                 directory=tmp_path / "ck")


def test_pretrain_argument_errors(lenet, tiny):
    with pytest.raises(TypeError, match="seed"):
        pretrain(lenet, tiny, seed=1.5, recipe=TINY, progress=False)
    with pytest.raises(ValueError, match="classes"):
        pretrain("lenet5", tiny._replace(num_classes=3), seed=0, recipe=TINY,
                 progress=False)
    with pytest.raises(ValueError, match="unknown model"):
        pretrain("lenet7", tiny, seed=0, progress=False)


def test_zoo_pretrains_once_then_restores(tmp_path, monkeypatch, tiny):
    calls = []
    real = pretraining.pretrain

    def counted(model, dataset, **kwargs):
        calls.append(model.name)
        return real(model, tiny, **dict(kwargs, recipe=TINY))

    monkeypatch.setattr(pretraining, "pretrain", counted)
    first = load_pretrained("lenet5", seed=2, zoo_dir=tmp_path, progress=False)
    second = load_pretrained("lenet5", seed=2, zoo_dir=tmp_path,
                             progress=False)
    assert calls == ["lenet5"]
    assert tree_equal(first.params, second.params)
    assert first.path == second.path == pretraining.zoo_path(
        "lenet5", "mnist5k", 2, tmp_path)
    assert second.metadata["seed"] == 2
