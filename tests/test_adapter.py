"""Bring your own model: linen, NNX, equinox and plain functions end to end.

Each framework's model goes through the whole pipeline with no edits to
recovjax: a sweep, a compiled evaluation, fine-tuning and a restore
strategy reading its own verified checkpoint (written by
``save_pretrained``). The known gaps of the old ``Model(name, init, apply,
num_classes)`` contract each have a test here.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import recovjax
from recovjax.damage import get_damage, leaf_paths, remove_neurons
from recovjax.evaluate import evaluate
from recovjax.models import (InfoError, LeafInfo, Model, check_params,
                             from_apply, from_equinox, from_linen, from_nnx)
from recovjax.models.saving import load_weights, save_pretrained
from recovjax.recovery import get_strategy, make_finetune, make_task

SHAPE = (8, 8, 1)
N = 96


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(N,) + SHAPE).astype(np.float32)
    labels = (np.arange(N) % 10).astype(np.int32)
    return recovjax.Split(images, labels)


class LinenCNN(nn.Module):
    """A user's CNN with flax's default names, BatchNorm and Dropout."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(
            nn.Conv(4, (3, 3))(x)))
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(
            nn.Conv(6, (3, 3))(x)))
        x = nn.Dropout(0.3, deterministic=not train)(
            x.reshape(x.shape[0], -1))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10)(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 24, rngs=rngs)
        self.out = nnx.Linear(24, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))


class EqxMLP(eqx.Module):
    layers: list

    def __init__(self, key):
        first, second = jax.random.split(key)
        self.layers = [eqx.nn.Linear(64, 24, key=first),
                       eqx.nn.Linear(24, 10, key=second)]

    def __call__(self, x):
        return self.layers[1](jax.nn.relu(self.layers[0](x.reshape(-1))))


class EqxBNMLP(eqx.Module):
    """A stateful equinox model: its batch norm keeps an ``eqx.nn.State``."""

    hidden: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    out: eqx.nn.Linear

    def __init__(self, key):
        first, second = jax.random.split(key)
        self.hidden = eqx.nn.Linear(64, 24, key=first)
        self.norm = eqx.nn.BatchNorm(24, axis_name="batch", mode="ema")
        self.out = eqx.nn.Linear(24, 10, key=second)

    def __call__(self, x, state, key=None):
        del key
        hidden, state = self.norm(self.hidden(x.reshape(-1)), state)
        return self.out(jax.nn.relu(hidden)), state


def _apply_mlp(params, x):
    x = x.reshape(x.shape[0], -1)
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


APPLY_INFO = {"w1": LeafInfo("kernel", layer="first", in_axes=(0,),
                             out_axes=(1,)),
              "b1": LeafInfo("bias", layer="first", out_axes=(0,)),
              "w2": LeafInfo("kernel", layer="second", in_axes=(0,),
                             out_axes=(1,)),
              "b2": LeafInfo("bias", layer="second", out_axes=(0,))}


def build(kind: str, data) -> Model:
    sample = jnp.asarray(data.images[:2])
    key = jax.random.key(1)
    if kind == "linen":
        module = LinenCNN()
        variables = module.init(key, sample)
        # Non-trivial batch statistics, so that frozen state matters.
        variables = {"params": variables["params"],
                     "batch_stats": jax.tree.map(
                         lambda s: s + 0.25, variables["batch_stats"])}
        return from_linen(module, variables, sample=sample)
    if kind == "nnx":
        return from_nnx(NnxMLP(nnx.Rngs(1)), sample=sample)
    if kind == "equinox":
        return from_equinox(EqxMLP(key), sample=sample)
    if kind == "equinox_bn":
        module, state = eqx.nn.make_with_state(EqxBNMLP)(key)
        # Non-trivial running statistics, as for linen.
        model = from_equinox(module, state=state, sample=sample)
        return model.with_state(jax.tree.map(
            lambda s: s + 0.25 if jnp.issubdtype(s.dtype, jnp.floating)
            else s, model.state))
    rng = np.random.default_rng(1)
    params = {"w1": rng.normal(size=(64, 24)).astype(np.float32) / 8,
              "b1": np.zeros(24, np.float32),
              "w2": rng.normal(size=(24, 10)).astype(np.float32) / 5,
              "b2": np.zeros(10, np.float32)}
    return from_apply(_apply_mlp, params, sample=sample, info=APPLY_INFO)


KINDS = ("linen", "nnx", "equinox", "equinox_bn", "apply")


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_end_to_end(kind, data, tmp_path):
    model = build(kind, data)
    batches = recovjax.batch_split(data, 32)
    # evaluate (compiled), with the model's own state
    metrics = jax.jit(lambda p: evaluate(model.forward, p, batches, 10))(
        model.params)
    assert int(metrics.count) == N
    # sweep: parameter damage by role scope, and structural damage
    result = recovjax.sweep(model, model.params,
                            damages=["zero", "remove_neurons"],
                            ratios=[0.0, 0.5], seeds=2, data=data,
                            root_key=0, batch_size=32)
    rows = [row for row in result.table.rows if row["metric"] == "accuracy"]
    clean = [row["value"] for row in rows if row["stage"] == "clean"]
    at_zero = [row["value"] for row in rows
               if row["stage"] == "damaged" and row["ratio"] == 0.0]
    assert clean and at_zero and set(at_zero) == {clean[0]}
    assert clean[0] == pytest.approx(float(metrics.accuracy), abs=0)
    # finetune: loss falls on the training data
    recover = jax.jit(make_finetune(model.forward, optax.adam(1e-2),
                                    steps=12, batch_size=32))
    tuned = recover(jax.random.key(0), model.params, None,
                    jnp.asarray(data.images), jnp.asarray(data.labels),
                    jnp.ones(N))
    assert float(tuned.losses[-3:].mean()) < float(tuned.losses[:3].mean())
    # restore from the model's own verified checkpoint
    checkpoint = save_pretrained(model, tmp_path / "ckpt", {"dataset": "toy"})
    zero = get_damage("zero", scope="weights")
    keys = jax.random.split(jax.random.key(3), 2)
    damaged = jax.vmap(lambda k: zero(k, model.params, 0.4, info=model.info)
                       )(keys)
    task = make_task(model, data, checkpoint=checkpoint, eval_batches=batches)
    outcome = get_strategy("restore_entries")(keys, damaged, task)
    for index in range(2):
        restored = jax.tree.map(lambda x: x[index], outcome.params)
        assert jax.tree.all(jax.tree.map(np.array_equal, restored,
                                         jax.device_get(model.params)))
    # the checkpoint holds the state too
    back = load_weights(model.with_params(jax.tree.map(jnp.zeros_like,
                                                       model.params)),
                        checkpoint)
    np.testing.assert_array_equal(back.forward(back.params, batches.images[0]),
                                  model.forward(model.params,
                                                batches.images[0]))


def test_weights_scope_selects_equinox_weight_leaves(data):
    # Equinox names its kernels "weight"; the scope reads roles.
    model = build("equinox", data)
    damage = get_damage("zero", scope="weights")(
        jax.random.key(0), model.params, 0.5, info=model.info)
    changed = {path: bool(mask.any()) for path, mask in zip(
        leaf_paths(damage.mask), jax.tree.leaves(damage.mask))}
    assert changed == {"layers/0/bias": False, "layers/0/weight": True,
                       "layers/1/bias": False, "layers/1/weight": True}


def test_nnx_paths_are_plain_and_structural_damage_works(data):
    model = build("nnx", data)
    assert set(model.infos) == {"hidden/bias", "hidden/kernel", "out/bias",
                                "out/kernel"}
    damage = remove_neurons(jax.random.key(0), model.params, 0.5,
                            info=model.info)
    removed = np.asarray(damage.mask["hidden"]["bias"])
    assert removed.sum() == 12
    np.testing.assert_array_equal(
        np.asarray(damage.mask["out"]["kernel"]).any(axis=1), removed)


def test_linen_batchnorm_is_frozen_in_evaluation_and_updated_in_training(
        data):
    model = build("linen", data)
    x = jnp.asarray(data.images[:16])
    outputs, state = model.apply(model.params, model.state, x)
    assert state is model.state
    np.testing.assert_array_equal(outputs, model.forward(model.params, x))
    _, trained = model.apply(model.params, model.state, x, train=True,
                             key=jax.random.key(0))
    before = model.state["batch_stats"]["BatchNorm_0"]["mean"]
    after = trained["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.array_equal(before, after)
    # dropout: keys matter in training, and a missing key is named
    first, _ = model.apply(model.params, model.state, x, train=True,
                           key=jax.random.key(1))
    second, _ = model.apply(model.params, model.state, x, train=True,
                            key=jax.random.key(2))
    assert not np.array_equal(first, second)
    with pytest.raises(ValueError, match="key"):
        model.apply(model.params, model.state, x, train=True)


def test_finetune_in_training_mode_updates_batch_statistics(data):
    model = build("linen", data)
    recover = jax.jit(make_finetune(model.forward, optax.adam(1e-2),
                                    steps=6, batch_size=32,
                                    train_mode=model))
    result = recover(jax.random.key(0), model.params, None,
                     jnp.asarray(data.images), jnp.asarray(data.labels),
                     jnp.ones(N), recovjax.batch_split(data, 32))
    means = result.state["batch_stats"]["BatchNorm_1"]["mean"]
    assert not np.array_equal(
        means, model.state["batch_stats"]["BatchNorm_1"]["mean"])
    assert np.isfinite(np.asarray(result.losses)).all()
    # frozen by default: no state comes back
    frozen = jax.jit(make_finetune(model.forward, optax.adam(1e-2), steps=2,
                                   batch_size=32))(
        jax.random.key(0), model.params, None, jnp.asarray(data.images),
        jnp.asarray(data.labels), jnp.ones(N))
    assert frozen.state is None


def test_remove_neurons_on_batchnorm_model_zeroes_the_following_norm(data):
    model = build("linen", data)
    damage = remove_neurons(jax.random.key(0), model.params, 0.5,
                            info=model.info)
    removed = np.asarray(damage.mask["Conv_0"]["bias"])
    assert removed.sum() == 2
    for leaf in ("scale", "bias"):
        np.testing.assert_array_equal(
            np.asarray(damage.mask["BatchNorm_0"][leaf]), removed)
    # the removed channels are silent after BatchNorm and ReLU
    x = jnp.asarray(data.images[:4])
    hidden = nn.relu(nn.BatchNorm(use_running_average=True).apply(
        {"params": damage.params["BatchNorm_0"],
         "batch_stats": model.state["batch_stats"]["BatchNorm_0"]},
        nn.Conv(4, (3, 3)).apply({"params": damage.params["Conv_0"]}, x)))
    assert not np.asarray(hidden)[..., removed].any()


def test_with_info_declares_and_errors_name_the_leaf(data):
    sample = jnp.asarray(data.images[:2])
    params = {"w1": np.ones((64, 24), np.float32),
              "b1": np.zeros(24, np.float32),
              "w2": np.ones((24, 10), np.float32),
              "b2": np.zeros(10, np.float32)}
    model = from_apply(_apply_mlp, params, sample=sample)
    with pytest.raises(InfoError, match=r"w1.*with_info"):
        get_damage("zero", scope="weights")(jax.random.key(0), model.params,
                                            0.5, info=model.info)
    declared = model.with_info(APPLY_INFO)
    assert declared.infos["w1"].feeds == "second"
    with pytest.raises(InfoError, match="no such leaf"):
        model.with_info({"w3": "kernel"})
    with pytest.raises(InfoError, match="unknown fields"):
        model.with_info({"w1": {"rolle": "kernel"}})


def test_params_that_do_not_fit_are_named(data):
    model = build("apply", data)
    bad = dict(model.params, w1=np.zeros((64, 23), np.float32))
    with pytest.raises(ValueError, match=r"w1.*\(64, 24\).*\(64, 23\)"):
        check_params(model, bad)
    with pytest.raises(ValueError, match="w1"):
        recovjax.sweep(model, bad, damages=["zero"], ratios=[0.1], seeds=1,
                       data=data, root_key=0)
    with pytest.raises(TypeError, match="recovjax.models.Model"):
        recovjax.sweep(object(), model.params, damages=["zero"],
                       ratios=[0.1], seeds=1, data=data, root_key=0)


def test_to_native_gives_back_the_frameworks_object(data):
    model = build("equinox", data)
    native = model.to_native()
    assert isinstance(native, EqxMLP)
    x = jnp.asarray(data.images[:3])
    np.testing.assert_array_equal(jax.vmap(native)(x),
                                  model.forward(model.params, x))
    nnx_model = build("nnx", data)
    assert isinstance(nnx_model.to_native(), NnxMLP)


def test_model_is_a_frozen_dataclass_with_a_stable_forward(data):
    model = build("apply", data)
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.params = {}
    same = model.with_params(jax.tree.map(jnp.zeros_like, model.params))
    assert same.forward is model.forward


def test_equinox_batchnorm_state_is_frozen_evaluating_and_trained(data):
    model = build("equinox_bn", data)
    x = jnp.asarray(data.images[:16])
    outputs, state = model.apply(model.params, model.state, x)
    np.testing.assert_array_equal(outputs, model.forward(model.params, x))
    assert jax.tree.all(jax.tree.map(np.array_equal, state, model.state))
    # in training mode the batch's statistics move the running ones
    recover = jax.jit(make_finetune(model.forward, optax.adam(1e-2),
                                    steps=6, batch_size=32,
                                    train_mode=model))
    result = recover(jax.random.key(0), model.params, None,
                     jnp.asarray(data.images), jnp.asarray(data.labels),
                     jnp.ones(N), recovjax.batch_split(data, 32))
    changed = jax.tree.leaves(jax.tree.map(
        lambda a, b: not np.array_equal(a, b), result.state, model.state))
    assert any(changed)
    # neuron removal goes through the norm that follows the layer
    damage = remove_neurons(jax.random.key(0), model.params, 0.5,
                            info=model.info)
    removed = np.asarray(damage.mask["hidden"]["bias"])
    assert removed.sum() == 12
    for leaf in ("weight", "bias"):
        np.testing.assert_array_equal(
            np.asarray(damage.mask["norm"][leaf]), removed)
    np.testing.assert_array_equal(
        np.asarray(damage.mask["out"]["weight"]).any(0), removed)
    # a BatchNorm module without its state is refused, saying what to pass
    module, _ = eqx.nn.make_with_state(EqxBNMLP)(jax.random.key(0))
    with pytest.raises(ValueError, match="state: .*make_with_state"):
        from_equinox(module, sample=x)
