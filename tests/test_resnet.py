"""Tests of the ResNet-18 with batch norm: its size, its batch statistics
through pretraining, the zoo and experiments, damage and recovery.

Everything but the size checks runs a width-4 ResNet-18 (registered as
``resnet18_w4``) on a few hundred images, with ``lax.conv_general_dilated``
as its convolution, which compiles several times faster than the default
``patch_conv``; one test checks that the two networks agree.
"""

from __future__ import annotations

import importlib
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recovjax
from recovjax import checkpoints, zoo
from recovjax._types import Dataset, Split
from recovjax.data import batch_split
from recovjax.evaluate import evaluate
from recovjax.models import BUILT_IN, from_linen, get_model, register_model
from recovjax.models.networks import ResNet18
from recovjax.pretrain import (DEFAULT_RECIPES, Recipe, initial_state,
                               load_pretrained, pretrain, train, zoo_path)

from conftest import tree_equal

pretraining = importlib.import_module("recovjax.pretrain")

TINY_NAME = "resnet18_w4"
TINY = Recipe(epochs=1, batch_size=50, learning_rate=3e-3)
SAMPLE = jnp.zeros((1, 28, 28, 1), jnp.float32)


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _random_variables(network):
    """Variables of ``network`` drawn with NumPy (nothing to compile);
    variances are positive."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: network.init(jax.random.key(0), SAMPLE))
    return jax.tree.map(lambda leaf: jnp.asarray(
        rng.uniform(0.5, 1.5, leaf.shape) if leaf.ndim == 1 else
        rng.normal(0, 0.3, leaf.shape), leaf.dtype), shapes)


def _tiny_factory(num_classes, sample):
    """ResNet18(width=4) through from_linen, as linen_factory builds it,
    with an init that draws every kernel from one normal vector: flax's
    own init compiles one random program per leaf shape, which takes
    longer than all the training these tests do."""
    network = ResNet18(num_classes=num_classes, width=4,
                       conv=jax.lax.conv_general_dilated)
    variables = jax.eval_shape(lambda: network.init(
        jax.random.key(0), jnp.zeros(sample.shape, sample.dtype)))
    leaves = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    sizes = [math.prod(leaf.shape) for _, leaf in leaves]

    def init(key):
        draws = jax.random.normal(key, (sum(sizes),), jnp.float32)
        values, start = [], 0
        for (path, leaf), size in zip(leaves, sizes):
            name = checkpoints.leaf_path(path)
            if name.endswith("/scale"):
                values.append(jnp.ones(leaf.shape, leaf.dtype))
            elif name.endswith("/bias"):
                values.append(jnp.zeros(leaf.shape, leaf.dtype))
            else:  # He scaling over the fan-in
                fan_in = math.prod(leaf.shape[:-1])
                values.append(draws[start:start + size].reshape(
                    leaf.shape) * math.sqrt(2.0 / fan_in))
            start += size
        return jax.tree.unflatten(jax.tree.structure(variables["params"]),
                                  values)

    return from_linen(network, variables, sample=sample, name=TINY_NAME,
                      init=init)


@pytest.fixture(scope="module")
def tiny_resnet():
    register_model(TINY_NAME, _tiny_factory, overwrite=True)
    return get_model(TINY_NAME)


@pytest.fixture(scope="module")
def tiny_data(mnist):
    return Dataset("mnist5k", Split(mnist.train.images[:200],
                                    mnist.train.labels[:200]),
                   Split(mnist.test.images[:100], mnist.test.labels[:100]), 10)


@pytest.fixture(scope="module")
def trained(tiny_resnet, tiny_data):
    return pretrain(tiny_resnet, tiny_data, seed=0, recipe=TINY,
                    progress=False)


@pytest.fixture
def tiny_zoo(monkeypatch, tiny_data):
    """Pretraining in the zoo uses the tiny data and recipe; counts calls."""
    made = []
    real = pretraining.pretrain

    def counted(model, dataset, **kwargs):
        made.append((model.name, kwargs["seed"]))
        return real(model, tiny_data, **dict(kwargs, recipe=TINY))

    monkeypatch.setattr(pretraining, "pretrain", counted)
    return made


# --------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------


def test_resnet18_has_11_172_810_parameters_and_9_600_statistics():
    network = ResNet18()
    variables = jax.eval_shape(lambda: network.init(jax.random.key(0),
                                                    SAMPLE))
    params, stats = variables["params"], variables["batch_stats"]
    assert set(variables) == {"params", "batch_stats"}
    assert _count(params) == 11_172_810
    # The stages are torchvision's resnet18 without its 3-channel 7x7 stem
    # (9,408 + 128 for its norm) and 1000-class head (513,000).
    stages = {name: tree for name, tree in params.items()
              if name.startswith(("block", "shortcut"))}
    assert _count(stages) == 11_689_512 - 9_408 - 128 - 513_000
    assert _count(stats) == 9_600
    assert sorted(params) == sorted(
        ["stem", "stem_norm", "head"] + [f"block{i}" for i in range(8)]
        + ["shortcut2", "shortcut4", "shortcut6"])
    assert params["block7"]["conv_b"]["kernel"].shape == (3, 3, 512, 512)
    assert "bias" not in params["block7"]["conv_b"]
    assert params["head"]["kernel"].shape == (512, 10)


def test_resnet18_is_a_built_in_model_with_roles_for_every_leaf():
    assert "resnet18" in BUILT_IN
    model = get_model("resnet18")
    assert model.num_classes == 10 and model.name == "resnet18"
    assert _count(model.params) == 11_172_810
    infos = model.infos
    conv = infos["block3/conv_a/kernel"]
    assert (conv.role, conv.in_axes, conv.out_axes) == ("kernel", (2,), (3,))
    shortcut = infos["shortcut4/conv/kernel"]
    assert (shortcut.role, shortcut.in_axes, shortcut.out_axes) == (
        "kernel", (2,), (3,))
    assert infos["block3/norm_b/scale"].role == "norm_scale"
    assert infos["stem_norm/bias"].role == "norm_offset"
    assert not infos["stem_norm/scale"].mixes_units
    assert infos["head/kernel"].role == "kernel"
    assert all(info.role is not None for info in infos.values())
    # Batch statistics are the model's state; the definition holds their
    # shapes only, and init_state draws the initial ones.
    assert set(model.state) == {"batch_stats"}
    assert _count(model.state) == 9_600
    fresh = model.init_state(jax.random.key(0))
    assert jax.tree.map(np.shape, fresh) == jax.tree.map(
        lambda leaf: leaf.shape, model.state)
    np.testing.assert_array_equal(fresh["batch_stats"]["stem_norm"]["var"],
                                  np.ones(64, np.float32))


@pytest.mark.parametrize("strides, last_map, dead", [
    ((1, 2, 2, 1), (2, 2), False), ((1, 2, 2, 2), (1, 1), True)])
def test_every_last_stage_tap_is_used_with_the_default_strides(
        strides, last_map, dead):
    network = ResNet18(width=4, stage_strides=strides,
                       conv=jax.lax.conv_general_dilated)
    variables = _random_variables(network)
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))

    def output(kernel):
        params = {**variables["params"]}
        params["block7"] = {**params["block7"],
                            "conv_b": {"kernel": kernel}}
        return jnp.sum(network.apply({**variables, "params": params},
                                     x) ** 2)

    # The gradient of the last convolution's kernel: nonzero exactly at
    # the taps that read the feature map.
    kernel = jax.jit(jax.grad(output))(
        variables["params"]["block7"]["conv_b"]["kernel"])
    used = np.asarray(jnp.abs(kernel).sum(axis=(2, 3)) > 0)
    # With a 1x1 last stage only the centre tap sees the feature map.
    assert used.all() != dead
    assert used[1, 1] and used.sum() == (1 if dead else 9)
    shapes = jax.eval_shape(lambda v: network.apply(
        v, x, capture_intermediates=True, mutable=["intermediates"])[1],
        variables)
    branch = shapes["intermediates"]["block7"]["__call__"][0]
    assert branch.shape[1:3] == last_map


def test_patch_convolutions_give_the_network_of_lax_convolutions():
    # The tiny models below use lax's convolution; the default network
    # (patch_conv, whose gradients test_models checks per convolution)
    # computes the same function, in both modes.
    ours = ResNet18(width=4)
    reference = ResNet18(width=4, conv=jax.lax.conv_general_dilated)
    variables = _random_variables(reference)
    x = jax.random.normal(jax.random.key(1), (6, 28, 28, 1))

    def run(network):
        return jax.jit(lambda v, x: network.apply(
            v, x, train=True, mutable=["batch_stats"]))(variables, x)

    for a, b in zip(jax.tree.leaves(run(ours)),
                    jax.tree.leaves(run(reference))):
        # Sums in another order through up to 18 normalised layers: well
        # above float32 rounding, far below any real difference.
        np.testing.assert_allclose(a, b, rtol=1e-3,
                                   atol=1e-4 * float(jnp.abs(b).max()))


def test_forward_pass_and_state_in_both_modes(tiny_resnet):
    model = tiny_resnet
    params = model.init(jax.random.key(0))
    state = model.init_state(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
    (outputs, same), (logits, updated) = jax.jit(lambda p, s, x: (
        model.apply(p, s, x),
        model.apply(p, s, x, train=True, key=jax.random.key(2))))(
            params, state, x)
    assert outputs.shape == (8, 10)
    assert tree_equal(same, state)
    assert logits.shape == (8, 10)
    before = state["batch_stats"]["block0"]["norm_a"]["mean"]
    after = updated["batch_stats"]["block0"]["norm_a"]["mean"]
    assert not np.array_equal(before, after)
    # Training mode normalises with the batch's statistics, evaluation
    # mode with the running ones.
    assert not np.allclose(logits, outputs)


def test_bad_stage_strides_are_named():
    with pytest.raises(ValueError, match="stage_strides"):
        ResNet18(width=4, stage_strides=(1, 2, 2)).init(jax.random.key(0),
                                                        SAMPLE)


def test_resnet18_recipe_trains_with_adam():
    recipe = DEFAULT_RECIPES["resnet18"]
    assert recipe.describe()["optimizer"] == "adam"
    assert 60_000 % recipe.batch_size == 0  # no padded batch in the norms


# --------------------------------------------------------------------------
# Pretraining with batch statistics.
# --------------------------------------------------------------------------


def test_training_updates_the_batch_statistics(tiny_resnet, tiny_data):
    params, state, losses = train(jax.random.key(0), tiny_resnet, tiny_data,
                                  Recipe(epochs=2, batch_size=50,
                                         learning_rate=3e-3), progress=False)
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert losses[1] < losses[0]
    fresh = initial_state(jax.random.split(jax.random.key(0))[0],
                          tiny_resnet)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(fresh)[0],
                            jax.tree.leaves(state)):
        assert not np.array_equal(a, b), checkpoints.leaf_path(path)
    # Same key, same bits (state included).
    again = train(jax.random.key(0), tiny_resnet, tiny_data,
                  Recipe(epochs=2, batch_size=50, learning_rate=3e-3),
                  progress=False)
    assert tree_equal(again.params, params) and tree_equal(again.state, state)


def test_test_accuracy_is_measured_with_the_trained_statistics(
        trained, tiny_resnet, tiny_data):
    state = trained.state
    assert trained.metadata["test_accuracy"] == pretraining.test_accuracy(
        tiny_resnet, trained.params, tiny_data, state=state)
    model = trained.attach(tiny_resnet)
    batches = batch_split(tiny_data.test, 50)
    metrics = jax.jit(lambda p: evaluate(model.forward, p, batches, 10))(
        trained.params)
    assert float(metrics.accuracy) == trained.metadata["test_accuracy"]
    # The running statistics matter: the initial ones score differently.
    fresh = tiny_resnet.init_state(jax.random.key(0))
    images = jnp.asarray(tiny_data.test.images)
    with_fresh, with_trained = jax.jit(lambda p, s, x: (
        tiny_resnet.apply(p, s, x)[0], model.forward(p, x)))(
            trained.params, fresh, images)
    assert not np.allclose(with_fresh, with_trained)


def test_checkpoint_round_trip_restores_params_and_state(
        trained, tiny_resnet, tiny_data, tmp_path):
    saved = pretrain(tiny_resnet, tiny_data, seed=0, recipe=TINY,
                     progress=False, directory=tmp_path / "ck")
    assert tree_equal(saved.params, trained.params)
    assert tree_equal(saved.state, trained.state)
    metadata = checkpoints.read_metadata(saved.path)
    assert set(metadata["state_digests"]) == set(
        checkpoints.leaf_digests(trained.state))
    loaded = pretraining.read_pretrained(saved.path, tiny_resnet)
    assert tree_equal(loaded.params, trained.params)
    assert tree_equal(loaded.state, trained.state)
    # and load_weights (a user's route to the same file) agrees
    model = recovjax.load_weights(tiny_resnet, saved.path)
    assert tree_equal(model.state, trained.state)


def test_zoo_round_trip_restores_params_and_state(trained, tiny_zoo,
                                                  tmp_path):
    first = load_pretrained(TINY_NAME, seed=0, zoo_dir=tmp_path,
                            progress=False)
    second = load_pretrained(TINY_NAME, seed=0, zoo_dir=tmp_path,
                             progress=False)
    assert tiny_zoo == [(TINY_NAME, 0)]
    assert first.path == zoo_path(TINY_NAME, "mnist5k", 0, tmp_path)
    for pretrained in (first, second):
        assert tree_equal(pretrained.params, trained.params)
        assert tree_equal(pretrained.state, trained.state)
    assert set(second.state) == {"batch_stats"}


def test_zoo_entry_without_state_is_rebuilt(trained, tiny_zoo, tmp_path,
                                            caplog):
    path = zoo_path(TINY_NAME, "mnist5k", 0, tmp_path)
    # Parameters alone, as a model without batch norm would be saved.
    checkpoints.save_checkpoint(path, trained.params, {
        "model": TINY_NAME, "dataset": "mnist5k", "seed": 0,
        "recipe_version": pretraining.RECIPE_VERSION})
    problem = zoo.check_entry(path)
    assert problem is not None and "no model state" in problem
    assert [p.path for p in zoo.verify_zoo(tmp_path)] == [path]
    with caplog.at_level("WARNING", logger="recovjax.pretrain"):
        pretrained = load_pretrained(TINY_NAME, seed=0, zoo_dir=tmp_path,
                                     progress=False)
    assert tiny_zoo == [(TINY_NAME, 0)]
    assert "no model state" in caplog.text
    assert tree_equal(pretrained.state, trained.state)
    assert zoo.check_entry(path) is None


def test_zoo_repair_rebuilds_an_entry_with_damaged_state(trained, tiny_zoo,
                                                         tmp_path):
    load_pretrained(TINY_NAME, seed=0, zoo_dir=tmp_path, progress=False)
    path = zoo_path(TINY_NAME, "mnist5k", 0, tmp_path)
    state_files = [p for p in (path).rglob("*") if p.is_file()
                   and checkpoints.STATE_ITEM in p.relative_to(path).parts
                   and p.parent.name == "d"]
    assert state_files
    target = max(state_files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert zoo.check_entry(path) is not None
    repairs = zoo.repair_zoo(tmp_path)
    assert [(r.path, r.rebuilt) for r in repairs] == [(path, True)]
    assert tiny_zoo == [(TINY_NAME, 0), (TINY_NAME, 0)]
    assert zoo.verify_zoo(tmp_path) == []
    restored = load_pretrained(TINY_NAME, seed=0, zoo_dir=tmp_path,
                               progress=False)
    assert tree_equal(restored.state, trained.state)


def test_attach_refuses_weights_without_the_state_a_model_needs(
        trained, tiny_resnet, lenet):
    import dataclasses
    stateless = dataclasses.replace(trained, state={})
    with pytest.raises(ValueError, match="state: model 'resnet18_w4' has "
                                         "state"):
        stateless.attach(tiny_resnet)
    with pytest.raises(ValueError, match="params do not fit model 'lenet5'"):
        trained.attach(lenet)
    with pytest.raises(TypeError, match="model must be"):
        trained.attach("resnet18_w4")


def test_initial_state_needs_a_way_to_draw_it(tiny_resnet):
    import dataclasses
    without = dataclasses.replace(tiny_resnet, init_state=None)
    with pytest.raises(ValueError, match="model: .*only shapes"):
        initial_state(jax.random.key(0), without)
    concrete = without.with_state(tiny_resnet.init_state(jax.random.key(0)))
    assert tree_equal(initial_state(jax.random.key(0), concrete),
                      concrete.state)


# --------------------------------------------------------------------------
# Damage and recovery.
# --------------------------------------------------------------------------


def test_sweep_evaluates_with_the_trained_statistics(trained, tiny_resnet,
                                                     tiny_data):
    model = trained.attach(tiny_resnet)
    result = recovjax.sweep(model, trained.params, damages=["drop_blocks"],
                            ratios=[0.0, 0.5], seeds=2, data=tiny_data.test,
                            root_key=0, batch_size=50)
    rows = [row for row in result.table.rows if row["metric"] == "accuracy"]
    clean = {row["value"] for row in rows if row["stage"] == "clean"}
    assert clean == {trained.metadata["test_accuracy"]}
    at_zero = {row["value"] for row in rows
               if row["stage"] == "damaged" and row["ratio"] == 0.0}
    assert at_zero == clean
    # Dropping half the residual branches leaves a working network (the
    # shortcuts and projections are kept), not a constant one.
    dropped = recovjax.get_damage("drop_blocks")(
        jax.random.key(0), trained.params, 0.5, info=model.info)
    removed = sorted({checkpoints.leaf_path(path).split("/")[0]
                      for path, mask in jax.tree_util.tree_flatten_with_path(
                          dropped.mask)[0] if np.asarray(mask).any()})
    assert len(removed) == 4 and all(b.startswith("block") for b in removed)
    logits = jax.jit(model.forward)(dropped.params, jnp.asarray(
        tiny_data.test.images[:20]))
    assert float(jnp.std(logits, axis=0).mean()) > 0


def test_recalibration_moves_the_batch_statistics(trained, tiny_resnet,
                                                  tiny_data):
    model = trained.attach(tiny_resnet)
    task = recovjax.make_task(model, tiny_data.train,
                              eval_batches=batch_split(tiny_data.test, 50))
    recalibrated = recovjax.recover_damage(
        recovjax.get_strategy("recalibrate", steps=2, batch_size=50), task,
        recovjax.get_damage("zero"), trained.params,
        damage_keys=jax.random.split(jax.random.key(1), 2),
        amounts=jnp.asarray([0.3, 0.6], jnp.float32),
        keys=jax.random.split(jax.random.key(2), 2))
    means = recalibrated.state["batch_stats"]["block1"]["norm_a"]["mean"]
    original = model.state["batch_stats"]["block1"]["norm_a"]["mean"]
    assert means.shape == (2,) + original.shape
    # Each damaged model's statistics moved from the pretrained ones, and
    # differently for different damage.
    assert not np.allclose(means[0], original)
    assert not np.allclose(means[0], means[1])


def test_seed_experiment_gives_the_model_its_state(trained, tiny_resnet,
                                                   tiny_data):
    from recovjax.recovery.seed import run_seed_experiment
    result = run_seed_experiment(
        1, model=TINY_NAME, dataset=tiny_data, steps=2, epochs=None,
        batch_size=50, pretrained_params=trained.params,
        pretrained_state=trained.state)
    assert result.clean_accuracy == trained.metadata["test_accuracy"]
    assert np.isfinite(result.recovered_loss).all()
    with pytest.raises(ValueError, match="pretrained_state"):
        run_seed_experiment(1, model=TINY_NAME, dataset=tiny_data, steps=2,
                            epochs=None, pretrained_params=trained.params)
    with pytest.raises(ValueError, match="pretrained_state"):
        run_seed_experiment(1, model=TINY_NAME, dataset=tiny_data, steps=2,
                            epochs=None, pretrained_state=trained.state)


def test_experiment_from_a_config_uses_the_zoo_state(trained, tiny_zoo,
                                                     tmp_path):
    from recovjax.config import load_config
    from recovjax.experiment import run_experiment
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""
        name: tiny-resnet
        model: {TINY_NAME}
        dataset: mnist5k
        damage:
          - kind: zero
            ratios: [0.2]
        sweep: {{seeds: 1}}
        evaluate: {{batch_size: 50, test_examples: 100}}
        recovery:
          strategies: [restore_entries]
        """))
    table = run_experiment(load_config(config), tmp_path / "run",
                           progress=False, zoo_dir=tmp_path / "zoo")
    assert tiny_zoo == [(TINY_NAME, 0)]
    rows = [row for row in table.rows if row["metric"] == "accuracy"]
    clean = [row["value"] for row in rows if row["stage"] == "clean"]
    restored = [row["value"] for row in rows
                if row["stage"] == "recovered/restore_entries"]
    # The zoo's tiny data has the same first 100 test images.
    assert clean == [trained.metadata["test_accuracy"]]
    assert restored and set(restored) == set(clean)
