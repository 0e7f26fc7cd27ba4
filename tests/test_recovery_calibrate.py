"""Bias correction and layer-wise reconstruction from calibration inputs."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax._types import Split
from recovjax.checkpoints import save_checkpoint
from recovjax.damage import get_damage
from recovjax.damage.activations import site_values
from recovjax.data import batch_split
from recovjax.models import from_equinox, from_linen
from recovjax.models.info import paths_of
from recovjax.recovery import get_strategy, make_task
from recovjax.recovery import calibrate

KEY = jax.random.key(0)


def _flat(tree):
    return dict(zip(paths_of(tree), jax.tree.leaves(tree)))


def _stack(tree, count=2):
    return jax.tree.map(lambda a: jnp.stack([a] * count), tree)


class Single(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


class EqxMLP(eqx.Module):
    layers: list

    def __init__(self, key):
        first, second = jax.random.split(key)
        self.layers = [eqx.nn.Linear(12, 16, key=first),
                       eqx.nn.Linear(16, 5, key=second)]

    def __call__(self, x):
        return self.layers[1](jax.nn.relu(self.layers[0](x.reshape(-1))))


@pytest.fixture(scope="module")
def lenet_setting(lenet, trained_lenet, small_mnist, tmp_path_factory):
    directory = tmp_path_factory.mktemp("calibrate") / "ckpt"
    save_checkpoint(directory, trained_lenet, {"model": "lenet5"})
    task = make_task(lenet, Split(small_mnist.train.images[:300],
                                  small_mnist.train.labels[:300]),
                     checkpoint=directory,
                     eval_batches=batch_split(small_mnist.test, 100))
    return lenet, trained_lenet, task


def _user_task(model, count=64, labels=None):
    images = jax.random.normal(jax.random.key(7), (count, 12))
    labels = jnp.zeros((count,), jnp.int32) if labels is None else labels
    return make_task(model, Split(images, labels), eval_batches=batch_split(
        Split(images, labels), 32), teacher=model.params)


def test_reconstruction_solves_the_masked_ridge_problem_exactly():
    """One dense layer: compare with the closed-form solution per column."""
    x = jax.random.normal(jax.random.key(1), (64, 12))
    module = Single()
    model = from_linen(module, module.init(KEY, x), sample=x)
    clean = model.params
    op = get_damage("zero")
    damage = op(jax.random.key(2), clean, 0.4)
    damping = 0.05
    task = _user_task(model)
    outcome = get_strategy("reconstruct", calibration=64, damping=damping,
                           iterations=200)(
        jax.random.split(KEY, 1), jax.tree.map(lambda a: a[None], damage),
        task)
    got = _flat(jax.tree.map(lambda a: a[0], outcome.params))
    kernel = np.asarray(_flat(damage.params)["Dense_0/kernel"],
                        np.float64)
    bias = np.asarray(_flat(damage.params)["Dense_0/bias"],
                      np.float64)
    kernel_mask = np.asarray(_flat(damage.mask)["Dense_0/kernel"])
    bias_mask = np.asarray(_flat(damage.mask)["Dense_0/bias"])
    inputs = np.concatenate([np.asarray(task.images, np.float64),
                             np.ones((64, 1))], axis=1)
    weights = np.concatenate([kernel, bias[None]], axis=0)
    masks = np.concatenate([kernel_mask, bias_mask[None]], axis=0)
    target = np.asarray(model.forward(clean, task.images), np.float64)
    gram = inputs.T @ inputs
    # The ridge weight: damping x the mean diagonal of J^T J (exact here;
    # the strategy estimates it with probes, so compare loosely in it).
    ridge = damping * np.trace(gram) * 5 / weights.size
    for column in range(5):
        free = ~masks[:, column]
        residual = target[:, column] - inputs @ weights[:, column]
        a = gram[np.ix_(free, free)] + ridge * np.eye(free.sum())
        change = np.linalg.solve(a, inputs[:, free].T @ residual)
        expected = weights[:, column].copy()
        expected[free] += change
        solved = np.concatenate([np.asarray(got["Dense_0/kernel"]),
                                 np.asarray(got["Dense_0/bias"])[None]
                                 ])[:, column]
        np.testing.assert_allclose(solved, expected, rtol=0.05, atol=2e-3)
        # Damaged entries stay exactly as the damage left them.
        np.testing.assert_array_equal(solved[~free], weights[~free, column])


def test_reconstruction_recovers_pruned_lenet_without_training(lenet_setting):
    model, params, task = lenet_setting
    op = get_damage("zero", target="smallest")
    damage = jax.vmap(lambda k: op(k, params, 0.6))(jax.random.split(KEY, 1))
    keys = jax.random.split(KEY, 1)
    damaged = get_strategy("finetune", steps=1, learning_rate=0.0)(
        keys, damage, task).curve.accuracy[0, 0]
    outcome = get_strategy("reconstruct", calibration=64,
                           iterations=25)(keys, damage, task)
    assert outcome.losses.shape[-1] == 0  # no gradient steps
    assert outcome.trainable == 0 and outcome.bytes_read > 0
    clean = get_strategy("restore_full")(keys, damage, task).curve.accuracy
    recovered = float(outcome.curve.accuracy[0, 0])
    gap = float(clean[0, 0]) - float(damaged)
    assert gap > 0.1
    assert recovered > float(damaged) + 0.5 * gap
    # Pruned weights stay pruned.
    for path, mask in _flat(damage.mask).items():
        values = np.asarray(_flat(outcome.params)[path])[np.asarray(mask)]
        np.testing.assert_array_equal(values, 0)


def test_bias_correction_matches_the_clean_mean_of_the_first_layer(
        lenet_setting):
    model, params, task = lenet_setting
    op = get_damage("gaussian_noise")
    damage = jax.vmap(lambda k: op(k, params, 1.0))(jax.random.split(KEY, 2))
    outcome = get_strategy("bias_correction", calibration=100)(
        jax.random.split(KEY, 2), damage, task)
    inputs = task.images[:100]
    clean = site_values(model, params, inputs, ["conv1"])["conv1"]
    for index in range(2):
        damaged = jax.tree.map(lambda a: a[index], damage.params)
        fixed = jax.tree.map(lambda a: a[index], outcome.params)
        before = site_values(model, damaged, inputs, ["conv1"])["conv1"]
        after = site_values(model, fixed, inputs, ["conv1"])["conv1"]
        mean = lambda v: np.asarray(v, np.float64).mean(axis=(0, 1, 2))
        scale = float(np.abs(np.asarray(clean)).max())
        # float32 sums in blocks of sqrt(n) of the n = 100 * 24 * 24 values
        # per unit: about 2 sqrt(n) roundings of the values' size.
        n = 100 * 24 * 24
        atol = 4 * np.sqrt(n) * np.finfo(np.float32).eps * scale
        assert np.abs(mean(before) - mean(clean)).max() > 100 * atol
        np.testing.assert_allclose(mean(after), mean(clean), rtol=0,
                                   atol=atol)
        # Only biases change.
        for path, value in _flat(fixed).items():
            if not path.endswith("bias"):
                np.testing.assert_array_equal(value, _flat(damaged)[path])


def test_calibration_reads_no_labels_and_works_on_an_equinox_model():
    model = from_equinox(EqxMLP(KEY), sample=jnp.zeros((2, 12)))
    op = get_damage("gaussian_noise")
    damage = jax.vmap(lambda k: op(k, model.params, 0.5))(
        jax.random.split(KEY, 2))
    results = []
    for labels in (jnp.zeros((64,), jnp.int32),
                   jnp.arange(64, dtype=jnp.int32) % 5):
        task = _user_task(model, labels=labels)
        for name in ("bias_correction", "reconstruct"):
            outcome = get_strategy(name, calibration=32)(
                jax.random.split(KEY, 2), damage, task)
            results.append(outcome.params)
    for first, second in zip(results[:2], results[2:]):
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
            np.testing.assert_array_equal(a, b)
    # Bias correction moved the biases of the [out, in] layers.
    assert not np.array_equal(_flat(results[0])["layers/0/bias"],
                              _flat(damage.params)["layers/0/bias"])


def test_calibration_errors_name_the_option(lenet_setting):
    model, params, task = lenet_setting
    damage = jax.tree.map(lambda a: a[None], get_damage("zero")(
        KEY, params, 0.1))
    keys = jax.random.split(KEY, 1)
    with pytest.raises(ValueError, match="calibration: 1000 examples asked "
                       "for, but the recovery data keep only 300"):
        get_strategy("reconstruct", calibration=1000)(keys, damage, task)
    with pytest.raises(ValueError, match="calibration must be a positive"):
        get_strategy("bias_correction", calibration=0)
    with pytest.raises(ValueError, match="calibration must be a positive"):
        get_strategy("reconstruct", calibration="256")
    with pytest.raises(ValueError, match="damping must be a positive"):
        get_strategy("reconstruct", damping=0.0)
    with pytest.raises(ValueError, match="iterations must be a positive"):
        get_strategy("reconstruct", iterations=0)
    no_checkpoint = make_task(model, Split(task.images, task.labels))
    with pytest.raises(ValueError, match="needs the pretrained checkpoint"):
        get_strategy("reconstruct", calibration=8)(keys, damage,
                                                   no_checkpoint)


def test_the_layers_are_the_sites_with_kernels(lenet):
    layers = calibrate.calibration_layers(lenet, lenet.abstract_params(),
                                          jnp.zeros((2, 28, 28, 1)))
    assert [layer.name for layer in layers] == ["conv1", "conv2", "fc1",
                                                "fc2", "fc3"]
    assert layers[0] == calibrate.Layer("conv1", "conv1/kernel",
                                        "conv1/bias", -1)
