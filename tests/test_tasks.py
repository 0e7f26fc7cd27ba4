"""Tests of recovjax.tasks: the Task contract, built-in tasks, registry."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _tolerance import assert_sums_close
from recovjax import tasks
from recovjax._types import Split
from recovjax.data import batch_split
from recovjax.evaluate import evaluate
from recovjax.models import networks
from recovjax.tasks import (Task, classification, evaluate_task, get_task,
                            language_model, mean_loss, register_task,
                            task_names, task_totals)


# --------------------------------------------------------------------------
# Classification against recovjax.evaluate.evaluate.
# --------------------------------------------------------------------------


def _mlp(num_classes, hidden=8):
    module = networks.MLP(num_classes=num_classes, hidden=(hidden,))
    return module, lambda params, x: module.apply({"params": params}, x)


def _random_split(seed, n, shape, num_classes):
    rng = np.random.default_rng(seed)
    return Split(rng.uniform(-1, 1, (n,) + shape).astype(np.float32),
                 rng.integers(0, num_classes, n).astype(np.int32))


def _mlp_loss_magnitude(params, images):
    """Per example: twice the largest |logit| term sum (see _tolerance)."""
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    h = np.maximum(x @ np.asarray(params["fc1"]["kernel"], np.float64)
                   + np.asarray(params["fc1"]["bias"], np.float64), 0)
    logits = (np.abs(h) @ np.abs(np.asarray(params["fc2"]["kernel"],
                                            np.float64))
              + np.abs(np.asarray(params["fc2"]["bias"], np.float64)))
    return 2 * logits.max(axis=1)


@pytest.mark.parametrize("num_classes, shape, n, batch_size", [
    (5, (4, 4, 1), 50, 16),   # padded last batch
    (3, (7,), 24, 8),         # no padding, flat inputs
    (12, (2, 3, 2), 37, 10),  # more classes, some of them empty
])
def test_classification_matches_evaluate(num_classes, shape, n, batch_size):
    split = _random_split(num_classes, n, shape, num_classes)
    module, apply = _mlp(num_classes)
    params = module.init(jax.random.key(num_classes),
                         split.images[:1])["params"]
    batches = batch_split(split, batch_size)
    expected = evaluate(apply, params, batches, num_classes)
    task = classification(num_classes)
    for got in (evaluate_task(task, apply, params, batches),
                jax.jit(lambda p: evaluate_task(task, apply, p,
                                                batches._asdict()))(params)):
        for name in ("correct", "count", "class_correct", "class_count"):
            assert got[name].dtype == jnp.int32, name
            np.testing.assert_array_equal(got[name], getattr(expected, name),
                                          err_msg=name)
        terms = int(np.prod(shape)) + 1 + 8 + 1 + num_classes + 2 + n
        magnitude = _mlp_loss_magnitude(params, split.images).sum() + float(
            expected.loss_sum)
        assert_sums_close(got["loss_sum"], expected.loss_sum, terms=terms,
                          magnitude=magnitude)
        assert_sums_close(got["loss"], expected.loss, terms=terms,
                          magnitude=magnitude / n)
        np.testing.assert_array_equal(got["per_class_accuracy"],
                                      expected.per_class_accuracy)
        assert float(got["accuracy"]) == float(expected.accuracy)
    assert int(got["count"]) == n


def test_classification_vmaps_over_a_stack_of_models():
    split = _random_split(0, 30, (4,), 4)
    module, apply = _mlp(4)
    keys = jax.random.split(jax.random.key(0), 3)
    stack = jax.vmap(lambda k: module.init(k, split.images[:1])["params"])(
        keys)
    batches = batch_split(split, 8)._asdict()
    task = classification(4)
    stacked = jax.jit(jax.vmap(
        lambda p: evaluate_task(task, apply, p, batches)))(stack)
    for index in range(3):
        one = evaluate_task(task, apply, jax.tree.map(lambda x: x[index],
                                                      stack), batches)
        np.testing.assert_array_equal(stacked["class_correct"][index],
                                      one["class_correct"])
    # Different models, different numbers: the stack is not one model.
    assert len({float(v) for v in stacked["loss_sum"]}) == 3


def test_a_float_mask_counts_weights_above_zero():
    split = _random_split(1, 20, (3,), 3)
    module, apply = _mlp(3)
    params = module.init(jax.random.key(0), split.images[:1])["params"]
    batch = {"images": split.images[None], "labels": split.labels[None],
             "mask": np.where(np.arange(20) % 2, 0.5, 0.0)[None]}
    got = evaluate_task(classification(3), apply, params, batch)
    assert int(got["count"]) == 10


def test_totals_add_across_batches():
    split = _random_split(2, 40, (3,), 3)
    module, apply = _mlp(3)
    params = module.init(jax.random.key(0), split.images[:1])["params"]
    batches = batch_split(split, 10)._asdict()
    task = classification(3)
    whole = task_totals(task, apply, params, batches)
    first = task_totals(task, apply, params,
                        {k: v[:2] for k, v in batches.items()})
    second = task_totals(task, apply, params,
                         {k: v[2:] for k, v in batches.items()})
    for name in ("correct", "class_correct", "class_count"):
        np.testing.assert_array_equal(first[name] + second[name],
                                      whole[name])
    assert_sums_close(first["loss_sum"] + second["loss_sum"],
                      whole["loss_sum"], terms=40,
                      magnitude=float(whole["loss_sum"]))


def test_evaluation_compiles_once_for_new_parameters():
    split = _random_split(3, 16, (3,), 3)
    module, apply = _mlp(3)
    traces = []

    def forward(params, x):
        traces.append(1)
        return apply(params, x)

    task = classification(3)
    batches = batch_split(split, 8)._asdict()
    run = jax.jit(lambda p: evaluate_task(task, forward, p, batches))
    a = run(module.init(jax.random.key(0), split.images[:1])["params"])
    count = len(traces)
    b = run(module.init(jax.random.key(1), split.images[:1])["params"])
    assert len(traces) == count
    assert float(a["loss_sum"]) != float(b["loss_sum"])
    assert classification(3) is task  # the factory caches its task


# --------------------------------------------------------------------------
# Language modelling.
# --------------------------------------------------------------------------


def _constant_logits(value):
    def forward(params, tokens):
        del params
        return jnp.broadcast_to(value, tokens.shape + value.shape[-1:])
    return forward


def test_uniform_logits_give_perplexity_equal_to_the_vocabulary_size():
    vocab = 7
    tokens = np.arange(2 * 3 * 6).reshape(2, 3, 6) % vocab
    mask = np.ones(tokens.shape, bool)
    mask[1, 2, 4:] = False  # two padded targets
    got = evaluate_task(language_model(vocab), _constant_logits(
        jnp.zeros(vocab)), None, {"tokens": tokens, "mask": mask})
    assert int(got["count"]) == 2 * 3 * 5 - 2
    assert got["count"].dtype == jnp.int32
    # log(7) per token, summed: float32 rounding of a 28-term sum.
    assert_sums_close(got["loss_sum"], 28 * math.log(vocab), terms=28 + vocab,
                      magnitude=28 * math.log(vocab))
    assert_sums_close(got["perplexity"], vocab, terms=28 + vocab + 2,
                      magnitude=vocab)
    # argmax of equal logits is token 0: correct exactly where target == 0.
    targets, valid = tokens[..., 1:], mask[..., 1:]
    assert int(got["correct"]) == int(np.sum(valid & (targets == 0)))


def test_language_model_loss_on_hand_computed_logits():
    # Vocabulary 3; one sequence [0, 1, 2]: targets 1 then 2.
    logits = jnp.asarray([[[0.0, math.log(3.0), 0.0],     # p(1) = 3/5
                           [math.log(2.0), 0.0, 0.0]]])   # p(2) = 1/4
    tokens = np.asarray([[[0, 1, 2]]])
    got = evaluate_task(language_model(3), lambda p, x: logits, None,
                        {"tokens": tokens, "mask": np.ones((1, 1, 3), bool)})
    expected = -(math.log(3 / 5) + math.log(1 / 4)) / 2
    assert_sums_close(got["loss"], expected, terms=8, magnitude=expected)
    assert_sums_close(got["perplexity"], math.exp(expected), terms=10,
                      magnitude=math.exp(expected))
    assert int(got["correct"]) == 1 and int(got["count"]) == 2
    np.testing.assert_allclose(float(got["accuracy"]), 0.5)


def _bigram(table):
    """forward(params, tokens) = params[tokens]: logits from a table."""
    return lambda params, tokens: params[tokens]


def test_masks_exclude_padding_exactly():
    vocab, pad = 6, 5
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(vocab, vocab)), jnp.float32)
    # The pad row is NaN: any padded position that leaked into a total
    # would make it NaN.
    table = table.at[pad].set(jnp.nan)
    real = rng.integers(0, pad, (3, 9))
    lengths = np.asarray([9, 4, 2])
    tokens = np.where(np.arange(9) < lengths[:, None], real, pad)
    mask = np.arange(9) < lengths[:, None]
    task = language_model(vocab)
    got = evaluate_task(task, _bigram(table), table,
                        {"tokens": tokens[None], "mask": mask[None]})
    assert int(got["count"]) == int((lengths - 1).sum())
    assert np.isfinite(float(got["loss_sum"]))
    # The same as each sequence on its own, unpadded.
    total, correct = 0.0, 0
    for row, length in zip(real, lengths):
        alone = evaluate_task(task, _bigram(table), table, {
            "tokens": row[None, None, :length],
            "mask": np.ones((1, 1, length), bool)})
        total += float(alone["loss_sum"])
        correct += int(alone["correct"])
    assert int(got["correct"]) == correct
    assert_sums_close(got["loss_sum"], total, terms=9 + vocab,
                      magnitude=abs(total) + 3 * float(
                          jnp.abs(table[:pad]).max()) * 9)
    # pad_id alone (no mask key) excludes the same targets here.
    by_pad = evaluate_task(language_model(vocab, pad_id=pad), _bigram(table),
                           table, {"tokens": tokens[None]})
    assert int(by_pad["count"]) == int(got["count"])
    assert float(by_pad["loss_sum"]) == float(got["loss_sum"])


def test_mean_loss_trains_and_ignores_padding():
    vocab = 5
    tokens = jnp.asarray([[0, 1, 2, 3, 0], [1, 4, 4, 4, 4]])
    mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    task = language_model(vocab)
    table = jnp.zeros((vocab, vocab))
    loss = mean_loss(task, _bigram(table), table,
                     {"tokens": tokens, "mask": mask})
    np.testing.assert_allclose(float(loss), math.log(vocab), rtol=1e-6)
    grad = np.asarray(jax.grad(lambda t: mean_loss(task, _bigram(t), t, {
        "tokens": tokens, "mask": mask}))(table))
    # Token 4 is read as an input only where the target is padding: its
    # row gets no gradient; the rows of 0..3 do.
    assert np.all(np.abs(grad[:4]).sum(axis=1) > 0)
    assert not np.any(grad[4])
    all_padding = {"tokens": tokens, "mask": jnp.zeros_like(mask)}
    assert float(mean_loss(task, _bigram(table), table, all_padding)) == 0.0
    assert not np.any(np.asarray(jax.grad(lambda t: mean_loss(
        task, _bigram(t), t, all_padding))(table)))


# --------------------------------------------------------------------------
# A task of one's own.
# --------------------------------------------------------------------------


def _squared_error(predictions, batch):
    valid = batch["mask"] > 0
    error = jnp.sum((predictions - batch["targets"]) ** 2, axis=-1)
    return (jnp.where(valid, error, 0.0).sum(dtype=jnp.float32),
            valid.sum(dtype=jnp.int32))


def _regression_batches(seed=0, batches=3, size=5):
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(batches, size, 4)).astype(np.float32)
    targets = rng.normal(size=(batches, size, 2)).astype(np.float32)
    mask = np.ones((batches, size), bool)
    mask[-1, 3:] = False
    return {"inputs": inputs, "targets": targets, "mask": mask}


def test_user_defined_regression_task_with_default_metrics():
    task = Task(name="regression", keys=("inputs", "targets", "mask"),
                inputs=lambda batch: batch["inputs"], loss=_squared_error)
    model = nn.Dense(2)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
    forward = lambda p, x: model.apply({"params": p}, x)
    batches = _regression_batches()
    got = jax.jit(lambda p: evaluate_task(task, forward, p, batches))(params)
    valid = batches["mask"]
    kernel = np.asarray(params["kernel"], np.float64)
    predictions = batches["inputs"] @ kernel + np.asarray(params["bias"])
    errors = ((predictions - batches["targets"]) ** 2).sum(-1)[valid]
    assert int(got["count"]) == valid.sum() == 13
    assert_sums_close(got["loss"], errors.mean(), terms=4 + 1 + 2 + 13,
                      magnitude=errors.mean() * 4)
    assert set(got) == {"loss", "loss_sum", "count"}


def test_user_defined_task_with_its_own_totals_through_the_registry(
        monkeypatch):
    monkeypatch.setattr(tasks, "_TASKS", dict(tasks._TASKS))

    def regression(*, scale: float = 1.0) -> Task:
        def batch_totals(predictions, batch):
            valid = batch["mask"] > 0
            absolute = jnp.abs(predictions - batch["targets"]).sum(-1)
            return {"absolute_sum": jnp.where(valid, absolute, 0.0).sum(),
                    "count": valid.sum(dtype=jnp.int32)}
        return Task(
            name="regression", keys=("inputs", "targets", "mask"),
            inputs=lambda batch: batch["inputs"] * scale,
            loss=_squared_error, batch_totals=batch_totals,
            finalize=lambda t: {"mae": t["absolute_sum"] / t["count"], **t})

    register_task("regression", regression)
    assert task_names()[-1] == "regression"
    task = get_task("regression", scale=0.0)
    batches = _regression_batches(1)
    got = evaluate_task(task, lambda p, x: x[..., :2], None, batches)
    # scale 0: the predictions are zeros, the error is |targets|.
    expected = np.abs(batches["targets"]).sum(-1)[batches["mask"]]
    assert int(got["count"]) == 13
    assert_sums_close(got["mae"], expected.mean(), terms=2 + 13,
                      magnitude=expected.mean())
    with pytest.raises(ValueError, match="already registered"):
        register_task("regression", regression)
    register_task("regression", regression, replace=True)


# --------------------------------------------------------------------------
# Registry and bad inputs.
# --------------------------------------------------------------------------


def test_registry_builds_the_built_in_tasks():
    assert task_names()[:2] == ("classification", "language_model")
    assert get_task("classification", num_classes=4) is classification(4)
    task = get_task("language_model", vocab_size=257, pad_id=256)
    assert task.keys == ("tokens",)


def test_registry_errors(monkeypatch):
    monkeypatch.setattr(tasks, "_TASKS", dict(tasks._TASKS))
    with pytest.raises(ValueError, match="unknown task 'ranking'.*"
                       "classification, language_model"):
        get_task("ranking")
    with pytest.raises(TypeError, match="its options: num_classes"):
        get_task("classification", classes=10)
    with pytest.raises(TypeError, match="factory: must be callable"):
        register_task("x", 3)
    with pytest.raises(TypeError, match="name: must be a string"):
        register_task(3, classification)
    with pytest.raises(ValueError, match="name: must not be empty"):
        register_task("", classification)
    register_task("broken", lambda: "not a task")
    with pytest.raises(TypeError, match="returned str, not a recovjax"):
        get_task("broken")


@pytest.mark.parametrize("factory, match", [
    (lambda: classification(0), "num_classes: must be an int of at least 1"),
    (lambda: classification(2.5), "num_classes"),
    (lambda: classification(True), "num_classes"),
    (lambda: language_model(0), "vocab_size"),
    (lambda: language_model(10, pad_id=10), r"pad_id: must lie in \[0, "),
    (lambda: language_model(10, pad_id=-1), "pad_id"),
])
def test_bad_task_options(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def _classification_setup():
    split = _random_split(4, 12, (3,), 3)
    module, apply = _mlp(3)
    params = module.init(jax.random.key(0), split.images[:1])["params"]
    return apply, params, batch_split(split, 4)._asdict()


def test_missing_batch_keys_list_the_expected_ones():
    apply, params, batches = _classification_setup()
    del batches["mask"]
    batches["weights"] = 1
    with pytest.raises(ValueError, match="batches: task 'classification' "
                       "expects the keys 'images', 'labels', 'mask'; missing "
                       "'mask'"):
        evaluate_task(classification(3), apply, params, batches)
    with pytest.raises(ValueError, match="expects the keys 'tokens', 'mask'"):
        mean_loss(language_model(5), None, None, {"tokens": np.zeros((1, 3),
                                                                     int)})
    with pytest.raises(TypeError, match="batches: must be a dict"):
        evaluate_task(classification(3), apply, params, [1, 2])


def test_labels_out_of_range_are_rejected_when_concrete():
    apply, params, batches = _classification_setup()
    batches["labels"] = batches["labels"].at[0, 0].set(3)
    with pytest.raises(ValueError, match=r"batch\['labels'\]: must lie in "
                       r"\[0, 3\)"):
        evaluate_task(classification(3), apply, params, batches)
    batches["labels"] = batches["labels"].astype(jnp.float32)
    with pytest.raises(TypeError, match=r"batch\['labels'\]: must hold "
                       "integers"):
        evaluate_task(classification(3), apply, params, batches)


def test_out_of_range_labels_on_padding_are_ignored():
    apply, params, batches = _classification_setup()
    batches["mask"] = batches["mask"].at[0, 0].set(False)
    batches["labels"] = batches["labels"].at[0, 0].set(99)
    assert int(evaluate_task(classification(3), apply, params,
                             batches)["count"]) == 11


def test_logit_width_must_be_num_classes():
    apply, params, batches = _classification_setup()
    with pytest.raises(ValueError, match="num_classes: the model gives logits "
                       r"of shape \(4, 3\).*not 5 classes"):
        evaluate_task(classification(5), apply, params, batches)
    # Also inside a compiled program, where the labels are not checked.
    with pytest.raises(ValueError, match="num_classes"):
        jax.jit(lambda b: evaluate_task(classification(5), apply, params,
                                        b))(batches)


def test_stacked_batches_must_share_leading_axes():
    apply, params, batches = _classification_setup()
    batches["mask"] = batches["mask"][:, :3]
    with pytest.raises(ValueError, match=r"batches: every array needs the "
                       r"same leading \[num_batches, batch_size\]"):
        evaluate_task(classification(3), apply, params, batches)


def test_token_ids_must_lie_in_the_vocabulary():
    tokens = np.asarray([[[0, 1, 2, 7]]])
    mask = np.asarray([[[1, 1, 1, 0]]])
    forward = _constant_logits(jnp.zeros(7))
    # Even masked tokens: the model reads every one of them.
    with pytest.raises(ValueError, match=r"batch\['tokens'\]: must lie in "
                       r"\[0, 7\).*1 out of range"):
        evaluate_task(language_model(7), forward, None,
                      {"tokens": tokens, "mask": mask})
    with pytest.raises(TypeError, match=r"batch\['tokens'\]: must hold "
                       "integers"):
        evaluate_task(language_model(8), forward, None,
                      {"tokens": tokens.astype(np.float32), "mask": mask})
    with pytest.raises(ValueError, match=r"batch\['mask'\]: must have the "
                       "shape"):
        evaluate_task(language_model(8), forward, None,
                      {"tokens": tokens, "mask": mask[..., :3]})
    with pytest.raises(ValueError, match=r"T >= 1"):
        evaluate_task(language_model(8), forward, None,
                      {"tokens": tokens[..., :1], "mask": mask[..., :1]})


def test_logit_width_must_be_vocab_size():
    tokens = np.asarray([[[0, 1, 2, 3]]])
    with pytest.raises(ValueError, match=r"vocab_size: the model gives "
                       r"logits of shape \(1, 3, 6\).*expected \(1, 3, 8\)"):
        evaluate_task(language_model(8), _constant_logits(jnp.zeros(6)), None,
                      {"tokens": tokens, "mask": np.ones_like(tokens)})
