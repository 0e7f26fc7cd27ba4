"""Bad inputs to the Python API raise an error naming the argument.

Every call here once returned a number and raised nothing (NaN accuracies,
an accuracy of 1.938, a silently clipped ratio, a pretrained ``seed-1`` zoo
entry). Each now raises a clear ``ValueError`` or ``TypeError``, or, for
traced amounts inside ``jit``, behaves as documented: unchecked, a traced
fraction is clipped to ``[0, 1]`` (NaN reads as 0); the checked mode
reports it through ``jax.experimental.checkify``.

A tiny linear model on synthetic 4x4 images keeps the file fast.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from recovjax._types import Batches, Dataset, Split
from recovjax.damage import (checked, drop_samples, flip_labels, get_damage,
                             make_gaussian_noise, make_zero)
from recovjax.data import batch_split, normalize, shuffled_batches
from recovjax.evaluate import evaluate, evaluate_stack
from recovjax.models import LeafInfo, from_apply
from recovjax.pretrain import load_pretrained, pretrain
from recovjax.recovery import budget_weights, finetune
from recovjax.recovery.registry import RecoveryTask, get_strategy, make_task
from recovjax.sweep import damage_point, sweep

from conftest import tree_equal

N = 40
SHAPE = (4, 4, 1)


def _init(key, sample):
    size = int(np.prod(sample.shape[1:]))
    return {"dense": {"kernel": 0.1 * jax.random.normal(key, (size, 10)),
                      "bias": jnp.zeros((10,), jnp.float32)}}


def _apply(params, x):
    flat = x.reshape((x.shape[0], -1)).astype(jnp.float32)
    return flat @ params["dense"]["kernel"] + params["dense"]["bias"]


SAMPLE = jax.ShapeDtypeStruct((1,) + SHAPE, jnp.float32)
TINY = from_apply(_apply, _init(jax.random.key(0), SAMPLE), sample=SAMPLE,
                  init=lambda key: _init(key, SAMPLE), name="tiny-bad-inputs",
                  info={"dense/kernel": LeafInfo("kernel", in_axes=(0,),
                                                 out_axes=(1,)),
                        "dense/bias": LeafInfo("bias", out_axes=(0,))})


@pytest.fixture(scope="module")
def env():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (N,) + SHAPE).astype(np.float32)
    labels = (np.arange(N) % 10).astype(np.int32)
    params = _init(jax.random.key(0), images[:1])
    split = Split(images, labels)
    damage = make_zero()(jax.random.key(1), params, 0.5)
    stacked = jax.tree.map(lambda x: x[None], damage)
    return types.SimpleNamespace(
        images=images, labels=labels, params=params, split=split,
        batches=batch_split(split, 8), damage=damage, stacked=stacked,
        keys=jax.random.split(jax.random.key(2), 1),
        task=make_task(TINY, split))


def _with_label(labels, value):
    return np.where(labels == 3, value, labels).astype(np.int32)


def _finetune(env, **overrides):
    arguments = dict(key=jax.random.key(0), apply=TINY.forward,
                     params=env.params, images=env.images,
                     labels=env.labels, steps=2, batch_size=8)
    arguments.update(overrides)
    key = arguments.pop("key")
    return finetune(key, **arguments)


def _sweep(env, **overrides):
    arguments = dict(damages=["zero"], ratios=[0.5], seeds=1,
                     data=env.split, root_key=0, batch_size=8)
    arguments.update(overrides)
    return sweep(TINY, env.params, **arguments)


def _checked_call(op, amount, params):
    error, damage = checkify.checkify(jax.jit(op))(jax.random.key(0), params,
                                                   amount)
    error.throw()
    return damage


BAD_INPUTS = [
    # evaluate with labels 10 or -1 (was: accuracy NaN, loss NaN or inf).
    pytest.param(lambda e: evaluate(TINY.forward, e.params, batch_split(
        Split(e.images, _with_label(e.labels, 10)), 8), 10),
        ValueError,
        r"batches\.labels: must lie in \[0, 10\) .*0\.\.10 \(4 out of range\)",
        id="evaluate-label-10"),
    pytest.param(lambda e: evaluate(TINY.forward, e.params, batch_split(
        Split(e.images, _with_label(e.labels, -1)), 8), 10),
        ValueError, r"batches\.labels: must lie in \[0, 10\) .*-1\.\.9",
        id="evaluate-label-minus-1"),
    pytest.param(lambda e: evaluate_stack(
        TINY.forward, jax.tree.map(lambda x: x[None], e.params),
        batch_split(Split(e.images, _with_label(e.labels, 10)), 8), 10),
        ValueError, r"batches\.labels: must lie in \[0, 10\)",
        id="evaluate-stack-label-10"),
    # finetune with label 12 (was: NaN losses, only diverged=True).
    pytest.param(lambda e: _finetune(e, labels=_with_label(e.labels, 12)),
                 ValueError, r"labels: must lie in \[0, 10\) .*0\.\.12",
                 id="finetune-label-12"),
    pytest.param(lambda e: make_task(TINY, Split(e.images, _with_label(
        e.labels, 12))), ValueError, r"labels: must lie in \[0, 10\)",
        id="make-task-label-12"),
    pytest.param(lambda e: make_task(TINY, e.split, eval_batches=batch_split(
        Split(e.images, _with_label(e.labels, 10)), 8)),
        ValueError, r"eval_batches\.labels: must lie in \[0, 10\)",
        id="make-task-eval-label-10"),
    pytest.param(lambda e: _finetune(e, labels=e.labels.astype(np.float32)),
                 TypeError, r"labels: must be integer class indices",
                 id="finetune-float-labels"),
    # 4,000 images with 100 labels (was: trained anyway).
    pytest.param(lambda e: _finetune(e, labels=e.labels[:10]), ValueError,
                 r"images, labels: the recovery data must have one example",
                 id="finetune-40-images-10-labels"),
    pytest.param(lambda e: _finetune(e, sample_weights=np.ones(7)),
                 ValueError, r"images, labels, weights: the recovery data",
                 id="finetune-short-weights"),
    pytest.param(lambda e: make_task(TINY, Split(e.images, e.labels[:10])),
                 ValueError, r"images, labels: the recovery data",
                 id="make-task-40-images-10-labels"),
    # evaluate(num_classes=5) on 10 logits (was: accuracy 1.938).
    pytest.param(lambda e: evaluate(TINY.forward, e.params, e.batches, 5),
                 ValueError, r"num_classes: the model gives logits of shape "
                 r"\(8, 10\) per batch, not 5 classes; pass num_classes=10",
                 id="evaluate-num-classes-5"),
    pytest.param(lambda e: evaluate(TINY.forward, e.params, e.batches, 12),
                 ValueError, r"num_classes: .* not 12 classes",
                 id="evaluate-num-classes-12"),
    pytest.param(lambda e: _finetune(e, num_classes=5), ValueError,
                 r"num_classes: .* not 5 classes",
                 id="finetune-num-classes-5"),
    # A Model's num_classes is read off its logits; a task built by hand can
    # still claim another number.
    pytest.param(lambda e: dataclasses.replace(
        make_task(TINY, Split(e.images, e.labels % 5)), num_classes=5),
                 ValueError, r"num_classes: .* not 5 classes",
                 id="task-num-classes-5"),
    # sweep(ratios=[1.5]) with zero (was: ran, reported ratio 1.5).
    pytest.param(lambda e: _sweep(e, ratios=[0.5, 1.5]), ValueError,
                 r"ratios: damage 'zero' takes a ratio in \[0, 1\] .*1\.5",
                 id="sweep-ratio-1.5"),
    pytest.param(lambda e: _sweep(e, damages={"flips": get_damage(
        "bit_flip")}, ratios=[2.0]), ValueError,
        r"ratios: damage 'flips' takes a rate in \[0, 1\]",
        id="sweep-rate-2-as-op"),
    pytest.param(lambda e: damage_point(
        TINY, e.params, damage="zero", ratio=1.5, ratio_index=0, seed=0,
        root_key=0, data=e.split, batch_size=8), ValueError,
        r"ratios: damage 'zero' takes a ratio in \[0, 1\]",
        id="damage-point-ratio-1.5"),
    pytest.param(lambda e: _sweep(e, data=Split(e.images, _with_label(
        e.labels, 10))), ValueError, r"data\.labels: must lie in \[0, 10\)",
        id="sweep-label-10"),
    # A fraction of 1.5 or NaN under jit (was: silently everything or
    # nothing): the checked mode reports it.
    pytest.param(lambda e: _checked_call(get_damage("zero", check=True), 1.5,
                                         e.params),
                 ValueError,
                 r"ratio: must be a fraction in \[0, 1\], got 1\.5",
                 id="checked-jit-ratio-1.5"),
    pytest.param(lambda e: _checked_call(checked(make_zero()), jnp.nan,
                                         e.params),
                 ValueError, r"ratio: must be a fraction in \[0, 1\], got nan",
                 id="checked-jit-ratio-nan"),
    pytest.param(lambda e: _checked_call(checked(make_gaussian_noise()),
                                         -0.5, e.params),
                 ValueError, r"scale: must be finite and non-negative",
                 id="checked-jit-negative-scale"),
    pytest.param(lambda e: jax.jit(get_damage("zero", check=True))(
        jax.random.key(0), e.params, 0.5), ValueError,
        r"checkify\.check which was not functionalized",
        id="checked-jit-without-checkify"),
    pytest.param(lambda e: checked(lambda key, params, ratio: None),
                 TypeError, r"op: checked\(\) needs an operator built by "
                 r"recovjax\.damage", id="checked-foreign-op"),
    pytest.param(lambda e: get_damage("zero", check="yes"), TypeError,
                 r"check: must be a bool", id="get-damage-check-not-bool"),
    # batch_size larger than N (was: a reshape traceback).
    pytest.param(lambda e: _finetune(e, batch_size=100), ValueError,
                 r"batch_size: 100 is larger than the 40 training examples",
                 id="finetune-batch-size-100"),
    pytest.param(lambda e: get_strategy("finetune", steps=1, batch_size=100)(
        e.keys, e.stacked, e.task), ValueError,
        r"batch_size: 100 is larger than the 40",
        id="strategy-batch-size-100"),
    pytest.param(lambda e: shuffled_batches(
        jax.random.key(0), e.images, e.labels, np.ones(N, np.float32), 41),
        ValueError, r"batch_size: 41 is larger than the 40",
        id="shuffled-batches-41"),
    # A data-damage name in sweep (was: flip_labels() missing 1 argument).
    pytest.param(lambda e: _sweep(e, damages=["label_noise"]), ValueError,
                 r"damages: 'label_noise' is a data damage .*make_task",
                 id="sweep-data-damage-name"),
    pytest.param(lambda e: _sweep(e, damages={"flip": flip_labels}),
                 ValueError, r"damages: 'flip' is a data damage",
                 id="sweep-data-damage-op"),
    # A uint32 legacy key into finetune (was: accepted) or an int key (was:
    # JAX's raw "invalid PRNG key data").
    pytest.param(lambda e: _finetune(e, key=jax.random.PRNGKey(0)),
                 TypeError, r"key: expected a typed key from jax\.random\.key"
                 r"\(seed\) .*legacy uint32 .*jax\.random\.wrap_key_data",
                 id="finetune-legacy-key"),
    pytest.param(lambda e: _finetune(e, key=0), TypeError,
                 r"key: expected a typed key .*jax\.random\.key\(0\)",
                 id="finetune-int-key"),
    pytest.param(lambda e: jax.jit(functools.partial(
        _finetune, e))(key=jax.random.PRNGKey(0)), TypeError,
        r"key: .*legacy uint32", id="finetune-legacy-key-under-jit"),
    pytest.param(lambda e: _finetune(e, key=jax.random.key(0), stacked=True,
                                     params=jax.tree.map(lambda x: x[None],
                                                         e.params)),
                 TypeError, r"key: expected a 1-D array of keys",
                 id="finetune-stacked-single-key"),
    pytest.param(lambda e: get_strategy("finetune", steps=1, batch_size=8)(
        jax.random.PRNGKey(0)[None], e.stacked, e.task), TypeError,
        r"keys: expected a typed key .*legacy uint32 .*wrap_key_data",
        id="strategy-legacy-keys"),
    pytest.param(lambda e: get_strategy("restore_entries")(
        np.arange(1), e.stacked, e.task), TypeError,
        r"keys: expected a typed key", id="restore-int-keys"),
    pytest.param(lambda e: make_zero()(jax.random.PRNGKey(0), e.params, 0.1),
                 TypeError, r"key: .*legacy uint32 .*wrap_key_data",
                 id="damage-legacy-key"),
    pytest.param(lambda e: drop_samples(7, e.images, e.labels, 0.1,
                                        num_classes=10),
                 TypeError, r"key: .*jax\.random\.key\(7\)",
                 id="data-damage-int-key"),
    pytest.param(lambda e: make_task(TINY, e.split,
                                     budget=(jax.random.PRNGKey(0), 0.5)),
                 TypeError, r"budget key: .*legacy uint32",
                 id="make-task-legacy-budget-key"),
    pytest.param(lambda e: _sweep(e, root_key=jax.random.PRNGKey(0)),
                 TypeError, r"root_key: expected a typed key .*wrap_key_data",
                 id="sweep-legacy-root-key"),
    # A strategy given unstacked damage (was: IndexError).
    pytest.param(lambda e: get_strategy("finetune", steps=1, batch_size=8)(
        e.keys, e.damage, e.task), ValueError,
        r"damage\.params: expected a stack of 1 model\(s\) .*the shape of one "
        r"model; stack a single model with jax\.tree\.map\(lambda x: "
        r"x\[None\], damage\)", id="strategy-unstacked-damage"),
    pytest.param(lambda e: get_strategy("restore_full")(
        e.keys, e.damage, e.task), ValueError,
        r"damage\.params: expected a stack of 1 model",
        id="restore-unstacked-damage"),
    pytest.param(lambda e: get_strategy("restore_entries+finetune", steps=1,
                                        batch_size=8)(
        jax.random.split(jax.random.key(0), 2), e.stacked, e.task),
        ValueError, r"damage\.params: leaf .* has shape \(1, 10\), "
        r"expected \(2, 10\)", id="composed-wrong-stack-size"),
    pytest.param(lambda e: get_strategy("finetune", steps=1, batch_size=8)(
        e.keys, e.damage.params, e.task), TypeError,
        r"damage: must be a recovjax Damage", id="strategy-params-as-damage"),
    pytest.param(lambda e: _finetune(e, key=jax.random.split(
        jax.random.key(0), 2), stacked=True, params=jax.tree.map(
            lambda x: x[None], e.params)), ValueError,
        r"params: expected a stack with a leading model axis of 2",
        id="finetune-stack-size-mismatch"),
    # load_pretrained(seed=-1) (was: pretrained and cached "seed-1").
    pytest.param(lambda e: load_pretrained("mlp", seed=-1,
                                           zoo_dir=e.zoo_dir,
                                           progress=False),
                 ValueError, r"seed: must be an int in \[0, 2\*\*31\), got -1",
                 id="load-pretrained-seed-minus-1"),
    pytest.param(lambda e: load_pretrained("mlp", seed=True,
                                           zoo_dir=e.zoo_dir,
                                           progress=False),
                 TypeError, r"seed: must be an int, got True",
                 id="load-pretrained-seed-bool"),
    pytest.param(lambda e: pretrain(TINY, Dataset("synthetic", e.split,
                                                  e.split, 10), seed=-1,
                                    progress=False),
                 ValueError, r"seed: must be an int in \[0, 2\*\*31\)",
                 id="pretrain-seed-minus-1"),
]


@pytest.mark.parametrize("call, error, message", BAD_INPUTS)
def test_bad_input_raises_an_error_naming_the_argument(env, tmp_path, call,
                                                       error, message):
    env = types.SimpleNamespace(**vars(env), zoo_dir=tmp_path / "zoo")
    with pytest.raises(error, match=message):
        call(env)
    # Nothing was pretrained or cached on the way to the error.
    assert not (tmp_path / "zoo").exists()


# The documented unchecked behaviour of traced fractions.

def test_unchecked_traced_fraction_is_clipped_and_nan_reads_as_zero(env):
    op = make_zero()
    key = jax.random.key(3)
    above = jax.jit(op)(key, env.params, 1.5)
    everything = op(key, env.params, 1.0)
    assert tree_equal(above, everything)
    assert all(bool(np.all(m)) for m in jax.tree.leaves(above.mask))
    nothing = jax.jit(op)(key, env.params, jnp.nan)
    assert not any(bool(np.any(m)) for m in jax.tree.leaves(nothing.mask))
    assert tree_equal(nothing.params, env.params)
    # Data damage follows the same rule.
    dropped = jax.jit(functools.partial(drop_samples, num_classes=10))(
        key, env.images, env.labels, 1.5)
    assert float(dropped.weights.sum()) == 0.0
    # So does a traced data budget.
    budget = jax.jit(budget_weights, static_argnums=1)
    assert float(budget(key, N, 1.5).sum()) == N
    assert float(budget(key, N, jnp.nan).sum()) == 0.0


def test_unchecked_traced_scale_is_used_as_given(env):
    op = jax.jit(make_gaussian_noise())
    key = jax.random.key(6)
    up = jax.tree.map(jnp.subtract, op(key, env.params, 0.5).params,
                      env.params)
    down = jax.tree.map(jnp.subtract, op(key, env.params, -0.5).params,
                        env.params)
    for a, b in zip(jax.tree.leaves(up), jax.tree.leaves(down)):
        np.testing.assert_allclose(a, -b, atol=1e-6)


def test_unchecked_traced_labels_give_nan_loss_as_documented(env):
    # Inside a compiled program the labels are tracers: the range check is
    # a host check and does not run there (check once before, on the host).
    bad = batch_split(Split(env.images, _with_label(env.labels, 10)), 8)
    metrics = jax.jit(functools.partial(evaluate, TINY.forward,
                                        num_classes=10))(env.params, bad)
    # As documented: the four examples labelled 10 belong to no class, so
    # they leave count (and accuracy), and they make the loss NaN.
    assert np.isnan(float(metrics.loss))
    assert int(metrics.count) == N - 4


# The checked mode.

def test_checked_mode_passes_valid_traced_amounts_unchanged(env):
    key = jax.random.key(4)
    op = get_damage("zero", check=True)
    assert op.check_traced and not get_damage("zero").check_traced
    assert checked(op) is op
    error, damage = checkify.checkify(jax.jit(op))(key, env.params, 0.3)
    error.throw()
    assert tree_equal(damage, make_zero()(key, env.params, 0.3))
    # Eager calls with concrete amounts are still checked on the host.
    with pytest.raises(ValueError, match=r"ratio is a fraction"):
        op(key, env.params, 1.5)
    assert tree_equal(op(key, env.params, 0.3), damage)


def test_checked_mode_under_vmap_reports_the_bad_point(env):
    op = get_damage("zero", check=True)
    keys = jax.random.split(jax.random.key(5), 3)
    run = checkify.checkify(jax.jit(jax.vmap(op, in_axes=(0, None, 0))))
    error, _ = run(keys, env.params, jnp.asarray([0.1, 0.2, 0.3]))
    error.throw()
    error, _ = run(keys, env.params, jnp.asarray([0.1, 1.5, 0.3]))
    with pytest.raises(ValueError, match=r"ratio: must be a fraction"):
        error.throw()


def test_checked_mode_of_data_damage(env):
    op = functools.partial(checked(drop_samples), num_classes=10)
    run = checkify.checkify(jax.jit(op))
    error, _ = run(jax.random.key(0), env.images, env.labels, 0.5)
    error.throw()
    error, _ = run(jax.random.key(0), env.images, env.labels, 1.5)
    with pytest.raises(ValueError, match=r"ratio: must be a fraction"):
        error.throw()


# Images given as uint8 pixels.

def test_uint8_images_warn_with_the_normalisation(env):
    pixels = np.round((env.images + 1) * 127.5).astype(np.uint8)
    with pytest.warns(UserWarning, match=r"batches\.images: got uint8 pixel "
                      r"values.*recovjax\.data\.normalize"):
        evaluate(TINY.forward, env.params, batch_split(
            Split(pixels, env.labels), 8), 10)
    with pytest.warns(UserWarning, match=r"images: got uint8 .*\[-1, 1\]"):
        _finetune(env, images=pixels)
    with pytest.warns(UserWarning, match=r"images: got uint8"):
        make_task(TINY, Split(pixels, env.labels))
    # The hint is right: normalize brings the pixels back.
    np.testing.assert_allclose(normalize(pixels), env.images, atol=1 / 255)


# Valid inputs still pass every check.

def test_valid_inputs_still_run(env):
    # An op in checked mode runs in a sweep (the sweep checks the ratios).
    result = _sweep(env, damages={"zero": get_damage("zero", check=True)},
                    ratios=[1.0], root_key=3)
    assert {row["ratio"] for row in result.table.rows} == {0.0, 1.0}
    outcome = get_strategy("finetune", steps=2, batch_size=N)(
        env.keys, env.stacked, env.task)
    assert outcome.losses.shape == (1, 2)
    assert not bool(np.any(outcome.diverged))
    padded = Batches(*jax.tree.map(
        lambda x: np.asarray(x), tuple(batch_split(env.split, 16))))
    assert not padded.mask.all()
    # Padding may hold any label: only real examples are checked.
    padded = padded._replace(labels=np.where(padded.mask, padded.labels, -1))
    assert int(evaluate(TINY.forward, env.params, padded, 10).count) == N
    task = RecoveryTask(apply=TINY.forward, init=TINY.init, num_classes=10,
                        images=jnp.asarray(env.images),
                        labels=jnp.asarray(env.labels),
                        weights=jnp.ones((N,), jnp.float32))
    assert task._model_shapes["dense"]["kernel"].shape == (16, 10)
