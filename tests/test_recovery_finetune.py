"""Fine-tuning recovery: masks, structure, vmap equivalence, divergence, curves."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _tolerance import assert_sums_close
from recovjax._types import Split
from recovjax.damage import get_damage
from recovjax.data import batch_split, shuffled_batches
from recovjax.models import LeafInfo, Model, from_apply
from recovjax.recovery import (Curve, budget_weights, data_stream, finetune,
                               make_finetune, stack_recover, trainable_mask)


# The float32 sums behind the `programs` fine-tunes' results: per step the
# tiny model's forward pass (784 + bias, tanh, 16 + bias), log-softmax (10,
# exp and log), the mean over a batch of 50, the backward pass (10, tanh',
# 50) and the momentum update (2), over 9 steps; then an evaluation over
# the 100 test examples. Learning rate times steps is far below 1, so an
# early difference is not amplified.
TRAINING_TERMS = 9 * (785 + 1 + 17 + 12 + 50 + 10 + 1 + 50 + 2) + (
    785 + 1 + 17 + 12 + 100)


def assert_trainings_close(a, b):
    """Two programs' fine-tunes agree within float32 rounding of their sums,
    relative to each result's largest entry (norm-wise)."""
    b = np.asarray(b)
    assert_sums_close(np.asarray(a), b, terms=TRAINING_TERMS,
                      magnitude=np.abs(b).max(initial=0.0))


def zero_op():
    """The registry's exact-count ``zero`` damage (the seed's damage)."""
    return get_damage("zero")


def tiny_model() -> Model:
    """A two-layer perceptron: compiles in a fraction of LeNet's time."""

    def init(key, sample):
        first, second = jax.random.split(key)
        width = int(np.prod(sample.shape[1:]))
        return {"hidden": {"kernel": jax.random.normal(first, (width, 16))
                           / np.sqrt(width),
                           "bias": jnp.zeros((16,))},
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


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def data(small_mnist):
    images = jnp.asarray(small_mnist.train.images[:300])
    labels = jnp.asarray(small_mnist.train.labels[:300])
    weights = jnp.ones((300,), jnp.float32)
    test = batch_split(Split(small_mnist.test.images[:100],
                             small_mnist.test.labels[:100]), 50)
    return images, labels, weights, test


@pytest.fixture(scope="module")
def programs(tiny):
    """Compiled fine-tunes shared by the tests (compilation dominates).

    ``get.traces`` counts how often the model was traced, to catch retraces.
    """
    cache = {}

    def apply(params, x):
        get.traces += 1
        return tiny.forward(params, x)

    def get(mode="all", stacked=True, frozen=False):
        if (mode, stacked, frozen) not in cache:
            recover = make_finetune(apply, steps=9, batch_size=50,
                                    eval_every=4, mode=mode)
            cache[mode, stacked, frozen] = (
                stack_recover(recover, frozen=frozen) if stacked
                else jax.jit(recover))
        return cache[mode, stacked, frozen]

    get.traces = 0
    return get


@pytest.fixture(scope="module")
def tiny_trained(tiny, data):
    """The tiny model after a short Adam run (a 'pretrained' stand-in)."""
    images, labels, weights, _ = data
    params = tiny.init(jax.random.key(0), images[:1])
    recover = jax.jit(make_finetune(tiny.forward, optax.adam(1e-3), steps=40,
                                    batch_size=50))
    return recover(jax.random.key(1), params, None, images, labels,
                   weights).params


@pytest.fixture(scope="module")
def damaged_stack(tiny_trained):
    # One call per model, stacked: the operator compiles once per structure
    # (a vmapped call would compile a second program).
    op = zero_op()
    damages = [op(jax.random.key(8 + index), tiny_trained, 0.3)
               for index in range(3)]
    return jax.tree.map(lambda *xs: np.stack(xs), *damages)


def test_finetune_improves_a_damaged_model(tiny, tiny_trained, damaged_stack,
                                           data, programs):
    images, labels, weights, test = data
    result = jax.device_get(programs("all")(
        jax.random.split(jax.random.key(4), 3), damaged_stack.params,
        damaged_stack.mask, images, labels, weights, test))
    assert result.curve.steps.tolist() == [[0, 4, 8, 9]] * 3
    assert np.all(result.curve.loss[:, -1] < result.curve.loss[:, 0])
    assert not result.diverged.any()
    assert result.diverged_step.tolist() == [-1] * 3


@pytest.mark.parametrize("mode", ["damaged", "undamaged"])
def test_masked_modes_leave_frozen_entries_bit_identical(
        mode, damaged_stack, data, programs):
    images, labels, weights, test = data
    result = programs(mode)(jax.random.split(jax.random.key(6), 3),
                            damaged_stack.params, damaged_stack.mask, images,
                            labels, weights, test)
    trainable = trainable_mask(mode, damaged_stack.params, damaged_stack.mask)
    moved = False
    for before, after, train in zip(jax.tree.leaves(damaged_stack.params),
                                    jax.tree.leaves(result.params),
                                    jax.tree.leaves(trainable)):
        before, after, train = map(np.asarray, (before, after, train))
        assert np.array_equal(after[~train].view(np.uint32),
                              before[~train].view(np.uint32))
        moved |= bool(np.any(after[train] != before[train]))
    assert moved, "the trainable entries should move"


def test_structural_mask_stays_removed(tiny_trained, data, programs):
    images, labels, weights, test = data
    removed = jax.tree.map(lambda x: np.zeros(x.shape, bool), tiny_trained)
    removed["hidden"]["kernel"][:, :4] = True
    removed["hidden"]["bias"][:4] = True
    removed["out"]["kernel"][:4] = True
    stack = lambda tree: jax.tree.map(lambda x: np.stack([x, x]), tree)
    params, removed = stack(tiny_trained), stack(removed)
    # The removed entries start non-zero: the fine-tune must zero them.
    result = programs("all", frozen=True)(
        jax.random.split(jax.random.key(7), 2), params, removed, images,
        labels, weights, test, removed)
    for leaf, mask in zip(jax.tree.leaves(result.params),
                          jax.tree.leaves(removed)):
        assert np.all(np.asarray(leaf)[np.asarray(mask)] == 0.0)
    kept = np.asarray(result.params["hidden"]["kernel"])[:, :, 4:]
    assert not np.array_equal(kept,
                              np.asarray(params["hidden"]["kernel"])[:, :, 4:])


def test_vmapped_recovery_equals_one_model_at_a_time(damaged_stack, data,
                                                     programs):
    images, labels, weights, test = data
    order_keys = jax.random.split(jax.random.key(9), 3)
    stacked = programs("undamaged")(order_keys, damaged_stack.params,
                                    damaged_stack.mask, images, labels,
                                    weights, test)
    single = programs("undamaged", stacked=False)
    close = assert_trainings_close
    for index in range(3):
        pick = lambda tree: jax.tree.map(lambda x: x[index], tree)
        alone = single(order_keys[index], pick(damaged_stack.params),
                       pick(damaged_stack.mask), images, labels, weights,
                       test)
        together = pick(jax.device_get(stacked))
        jax.tree.map(close, together.params, alone.params)
        close(together.losses, alone.losses)
        np.testing.assert_array_equal(together.curve.steps, alone.curve.steps)
        close(together.curve.accuracy, alone.curve.accuracy)
        close(together.curve.loss, alone.curve.loss)


def test_groups_and_padding_give_the_default_numbers(tiny, damaged_stack,
                                                     data, programs):
    images, labels, weights, test = data
    order_keys = jax.random.split(jax.random.key(9), 3)
    args = (order_keys, damaged_stack.params, damaged_stack.mask, images,
            labels, weights, test)
    default = jax.device_get(programs("undamaged")(*args))
    # Groups of 2 pad the 3 models to 4; the padding must not leak out.
    recover = make_finetune(tiny.forward, steps=9, batch_size=50, eval_every=4,
                            mode="undamaged")
    grouped = jax.device_get(stack_recover(recover, group_size=2)(*args))
    assert grouped.losses.shape == default.losses.shape == (3, 9)
    jax.tree.map(assert_trainings_close, grouped, default)


# A subprocess: the device count is fixed when JAX starts.
FOUR_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[3])
    from recovjax.data import batch_split
    from recovjax._types import Split
    from recovjax.recovery import make_finetune, stack_recover
    from test_recovery_finetune import tiny_model
    assert jax.device_count() == 4, jax.devices()
    data = dict(np.load(sys.argv[1]))
    stack = lambda prefix: {
        layer: {name: data[f"{prefix}/{layer}/{name}"]
                for name in ("kernel", "bias")} for layer in ("hidden", "out")}
    recover = make_finetune(tiny_model().forward, steps=9, batch_size=50,
                            eval_every=4, mode="undamaged")
    test = batch_split(Split(data["test_images"], data["test_labels"]), 50)
    result = stack_recover(recover)(
        jax.random.split(jax.random.key(9), 3), stack("params"),
        jax.tree.map(lambda m: m.astype(bool), stack("mask")),
        data["images"], data["labels"], data["weights"], test)
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(result))[0]
    np.savez(sys.argv[2], **{jax.tree_util.keystr(path): leaf
                             for path, leaf in leaves})
""")


def test_four_forced_devices_equal_one(damaged_stack, data, programs,
                                       small_mnist, tmp_path):
    images, labels, weights, test = data
    order_keys = jax.random.split(jax.random.key(9), 3)
    one = jax.device_get(programs("undamaged")(
        order_keys, damaged_stack.params, damaged_stack.mask, images, labels,
        weights, test))
    arrays = {"images": images, "labels": labels, "weights": weights,
              "test_images": small_mnist.test.images[:100],
              "test_labels": small_mnist.test.labels[:100]}
    for prefix, tree in (("params", damaged_stack.params),
                         ("mask", damaged_stack.mask)):
        for layer, leaves in tree.items():
            for name, value in leaves.items():
                arrays[f"{prefix}/{layer}/{name}"] = np.asarray(value)
    np.savez(tmp_path / "inputs.npz", **arrays)
    environment = dict(os.environ, JAX_NUM_CPU_DEVICES="4",
                       JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES, str(tmp_path / "inputs.npz"),
         str(tmp_path / "four.npz"), str(pathlib.Path(__file__).parent)],
        env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    four = np.load(tmp_path / "four.npz")
    leaves = jax.tree_util.tree_flatten_with_path(one)[0]
    assert len(four.files) == len(leaves)
    # Bit for bit, on any CPU: on 1 and on 4 devices each model is fine-tuned
    # by the same per-model program (lax.map over groups of one), compiled
    # for the same machine, so every sum is taken in the same order.
    for path, leaf in leaves:
        np.testing.assert_array_equal(four[jax.tree_util.keystr(path)], leaf)


def test_divergence_is_recorded_per_model_without_stopping_others(
        tiny_trained, data, programs):
    images, labels, weights, test = data
    params = jax.tree.map(lambda x: np.stack([x, x, x]), tiny_trained)
    params["out"]["bias"][1, 0] = np.nan
    masks = jax.tree.map(lambda x: np.zeros(x.shape, bool), params)
    result = jax.device_get(programs("all")(
        jax.random.split(jax.random.key(10), 3), params, masks, images,
        labels, weights, test))
    assert result.diverged.tolist() == [False, True, False]
    assert result.diverged_step.tolist() == [-1, 0, -1]
    assert np.isnan(result.curve.loss[1, -1])
    assert np.all(np.isfinite(result.losses[[0, 2]]))
    assert np.all(np.isfinite(result.curve.accuracy[[0, 2]]))


def test_curve_is_on_the_grid_and_does_not_retrace(damaged_stack, data,
                                                   programs):
    images, labels, weights, test = data
    run = programs("all")
    first = run(jax.random.split(jax.random.key(12), 3), damaged_stack.params,
                damaged_stack.mask, images, labels, weights, test)
    count = programs.traces
    second = run(jax.random.split(jax.random.key(13), 3),
                 jax.tree.map(lambda x: x * 0.5, damaged_stack.params),
                 damaged_stack.mask, images, labels, weights * 0.5, test)
    assert programs.traces == count, "a new stack of the same shape retraced"
    assert isinstance(first.curve, Curve)
    assert first.curve.steps[0].tolist() == [0, 4, 8, 9]
    assert first.curve.samples[0].tolist() == [0.0, 200.0, 400.0, 450.0]
    assert first.losses.shape == (3, 9)
    assert not np.array_equal(first.losses, second.losses)


def test_epochs_and_data_budget(tiny, tiny_trained, data):
    images, labels, weights, test = data
    # Default: two epochs; 300 examples at batch 50 = 12 step slots.
    run = jax.jit(make_finetune(tiny.forward, batch_size=50))
    full = run(jax.random.key(14), tiny_trained, None, images, labels,
               weights, test)
    assert full.losses.shape == (12,)
    assert full.curve.steps.tolist() == [0, 12]
    assert full.curve.samples.tolist() == [0.0, 600.0]
    # A 25 % budget keeps 75 examples: 2 real batches per epoch, the other
    # 4 slots of each epoch are skipped (NaN loss, no update).
    budget = budget_weights(jax.random.key(17), 300, 0.25)
    result = run(jax.random.key(18), tiny_trained, None, images, labels,
                 budget, test)
    assert result.curve.steps.tolist() == [0, 4]
    assert result.curve.samples.tolist() == [0.0, 150.0]
    assert int(np.isnan(np.asarray(result.losses)).sum()) == 8
    assert not bool(result.diverged)


def test_data_stream_matches_shuffled_batches_and_budget(data):
    _, labels, weights, _ = data
    key = jax.random.key(15)
    stream = jax.jit(lambda w: data_stream(key, w, 64, 2))
    indices, batch_weights = stream(weights)
    reference = shuffled_batches(jax.random.fold_in(key, 1),
                                 jnp.arange(300), labels, weights, 64)
    np.testing.assert_array_equal(indices[5:], reference.images)
    np.testing.assert_array_equal(batch_weights[5:], reference.mask)
    budget = budget_weights(jax.random.key(16), 300, 0.3)
    assert float(budget.sum()) == 90.0
    assert float(budget_weights(jax.random.key(16), 4000, 0.7).sum()) == 2800
    indices, batch_weights = stream(budget)
    # Kept examples first: two real batches (64 + 26), then empty slots.
    assert batch_weights[:5].sum(axis=1).tolist() == [64.0, 26.0, 0.0, 0.0,
                                                      0.0]
    kept = np.asarray(indices[:5])[np.asarray(batch_weights[:5]) > 0]
    assert sorted(kept.tolist()) == np.flatnonzero(np.asarray(budget)
                                                   ).tolist()


def test_bad_arguments_raise_clear_errors(tiny, tiny_trained, data):
    images, labels, _, _ = data
    with pytest.raises(ValueError, match="unknown fine-tuning mode 'some'"):
        make_finetune(tiny.forward, mode="some")
    with pytest.raises(ValueError, match="steps or epochs, not both"):
        make_finetune(tiny.forward, steps=3, epochs=1)
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        make_finetune(tiny.forward, batch_size=0)
    with pytest.raises(ValueError, match="unknown loss"):
        make_finetune(tiny.forward, loss="hinge")
    with pytest.raises(ValueError, match="needs the damage mask"):
        finetune(jax.random.key(0), tiny.forward, tiny_trained, images, labels,
                 steps=1, mode="damaged")
    recover = make_finetune(tiny.forward, steps=1)
    with pytest.raises(ValueError, match="group_size must be a positive"):
        stack_recover(recover, group_size=0)
    with pytest.raises(ValueError, match="devices is empty"):
        stack_recover(recover, devices=[])
