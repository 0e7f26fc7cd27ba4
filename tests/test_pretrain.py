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
    _, losses = train(jax.random.key(0), lenet, tiny, TINY, progress=False)
    assert len(losses) == 2 and losses[1] < losses[0]
    assert np.isfinite(losses).all()


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
