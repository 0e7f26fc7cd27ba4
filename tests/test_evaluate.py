"""Tests for recovjax.evaluate: exact metrics, stacks of models, NaN params."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax._types import Batches, Split
from recovjax.data import batch_split
from recovjax.evaluate import (Metrics, cross_entropy, evaluate,
                               evaluate_stack)

from _tolerance import (assert_sums_close, lenet5_loss_bound,
                        lenet5_near_ties)
from conftest import tree_equal

# Five examples with three classes; the "model" returns its input logits
# scaled by params["scale"], so every metric can be worked out by hand.
LOGITS = np.asarray([[3.0, 1.0, 0.0],    # label 0, predicted 0: right
                     [0.0, 2.0, 1.0],    # label 1, predicted 1: right
                     [0.0, 0.0, 5.0],    # label 1, predicted 2: wrong
                     [1.0, 4.0, 0.0],    # label 0, predicted 1: wrong
                     [0.0, 1.0, 2.0]],   # label 2, predicted 2: right
                    np.float32)
LABELS = np.asarray([0, 1, 1, 0, 2], np.int32)


def scaled(params, x):
    return x * params["scale"]


def _batches(batch_size=2, logits=LOGITS, labels=LABELS) -> Batches:
    return batch_split(Split(logits, labels), batch_size)


def _reference_loss(logits, labels) -> float:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def _assert_loss_matches_reference(got, logits, labels, scale=1.0):
    # float32 against float64: per example a sum of 3 exponentials, exp and
    # log (one rounding each), the subtraction, then the mean over 5,
    # relative to the absolute terms: |shifted label logit| + log-sum-exp.
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    log_sum = np.log(np.exp(shifted).sum(1))
    terms = np.abs(shifted[np.arange(len(labels)), labels]) + log_sum
    assert_sums_close(got, scale * _reference_loss(logits, labels),
                      terms=logits.shape[1] + 3 + len(labels),
                      magnitude=scale * terms.mean())


def test_exact_metrics_on_a_hand_made_case():
    batches = _batches(batch_size=2)  # 3 batches, the last one padded.
    assert not bool(batches.mask[-1, -1])
    metrics = jax.jit(functools.partial(evaluate, scaled, num_classes=3))(
        {"scale": jnp.float32(1)}, batches)
    assert int(metrics.count) == 5
    assert float(metrics.accuracy) == np.float32(3 / 5)
    np.testing.assert_array_equal(metrics.per_class_accuracy,
                                  np.float32([1 / 2, 1 / 2, 1.0]))
    _assert_loss_matches_reference(float(metrics.loss), LOGITS, LABELS)
    assert metrics.custom is None


def test_batch_size_does_not_change_the_counts():
    for batch_size in (1, 2, 3, 5, 8):
        metrics = evaluate(scaled, {"scale": 1.0}, _batches(batch_size), 3)
        assert int(metrics.count) == 5
        assert float(metrics.accuracy) == np.float32(0.6)


def test_padding_is_never_counted_even_if_it_is_nan():
    batches = _batches(batch_size=4)
    poisoned = batches._replace(images=batches.images.at[-1, 1:].set(
        jnp.nan), labels=batches.labels.at[-1, 1:].set(2))
    metrics = evaluate(scaled, {"scale": 1.0}, poisoned, 3)
    assert int(metrics.count) == 5
    assert float(metrics.accuracy) == np.float32(0.6)
    assert math.isfinite(float(metrics.loss))


def test_class_without_examples_is_nan():
    # Four logits (a fourth, never-winning class) so that num_classes=4
    # matches the model's width.
    four = np.concatenate([LOGITS, np.full((5, 1), -9.0, np.float32)], 1)
    metrics = evaluate(scaled, {"scale": 1.0}, _batches(logits=four), 4)
    assert np.isnan(metrics.per_class_accuracy[3])
    assert not np.isnan(metrics.per_class_accuracy[:3]).any()


def test_nan_parameters_give_an_honest_result():
    metrics = jax.jit(functools.partial(evaluate, scaled, num_classes=3))(
        {"scale": jnp.float32(jnp.nan)}, _batches())
    # All logits NaN: argmax picks the first NaN, class 0 (2 of 5 labels).
    assert float(metrics.accuracy) == np.float32(2 / 5)
    assert np.isnan(float(metrics.loss))
    assert int(metrics.count) == 5


def test_infinite_parameters_report_inf_or_nan_loss():
    metrics = evaluate(scaled, {"scale": jnp.float32(jnp.inf)}, _batches(),
                       3)
    # +inf on the largest logit wins the argmax; 0 * inf makes NaN elsewhere.
    assert not math.isfinite(float(metrics.loss))
    assert 0.0 <= float(metrics.accuracy) <= 1.0


def test_user_metric_follows_the_summation_contract():
    def max_logit(logits, labels, mask):
        return jnp.where(mask, logits.max(-1), 0.0).sum()

    metrics = evaluate(scaled, {"scale": 1.0}, _batches(batch_size=3), 3,
                       metric_fn=max_logit)
    assert float(metrics.custom) == pytest.approx(LOGITS.max(1).mean())

    def several(logits, labels, mask):
        return {"ones": mask.sum(), "hits": jnp.sum(
            mask & (logits.argmax(-1) == labels))}

    metrics = evaluate(scaled, {"scale": 1.0}, _batches(batch_size=2), 3,
                       metric_fn=several)
    assert float(metrics.custom["ones"]) == 1.0
    assert float(metrics.custom["hits"]) == pytest.approx(0.6)


def test_cross_entropy_matches_reference():
    got = cross_entropy(jnp.asarray(LOGITS), jnp.asarray(LABELS))
    _assert_loss_matches_reference(float(got.mean()), LOGITS, LABELS)


def _stack(params, count=4):
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda leaf: jnp.stack([leaf * rng.uniform(0.3, 1.2, leaf.shape)
                                .astype(np.float32) for _ in range(count)]),
        params)


def test_stack_equals_one_by_one(lenet, trained_lenet, small_mnist):
    batches = batch_split(Split(small_mnist.test.images[:70],
                                small_mnist.test.labels[:70]), 30)
    stack = _stack(trained_lenet)
    one = jax.jit(functools.partial(evaluate, lenet.forward, num_classes=10))
    singles = [one(jax.tree.map(lambda leaf: leaf[i], stack), batches)
               for i in range(4)]
    expected = jax.tree.map(lambda *xs: np.stack(xs), *singles)
    sequential = jax.jit(functools.partial(
        evaluate_stack, lenet.forward, num_classes=10, vmap_size=1))(
            stack, batches)
    # lax.map over models of one: each step runs the single model's program
    # (same shapes, same kernels on whatever CPU), so this is bit for bit.
    assert tree_equal(jax.device_get(sequential), expected)
    images = small_mnist.test.images[:70]
    models = [jax.tree.map(lambda leaf: leaf[i], stack) for i in range(4)]
    for width in (None,):
        stacked = jax.jit(functools.partial(
            evaluate_stack, lenet.forward, num_classes=10, vmap_size=width))(
                stack, batches)
        # Counts are exact. Vectorised code may move the last bits: of the
        # loss (batched matmuls sum in another order) and of the fractions
        # (XLA:CPU may divide through a reciprocal), by at most an ulp; a
        # prediction only where an example's top two logits tie within
        # rounding (counted, almost always none).
        np.testing.assert_array_equal(stacked.count, expected.count)
        for i, params in enumerate(models):
            ties = lenet5_near_ties(params, images)
            assert abs(int(stacked.correct[i]) -
                       int(expected.correct[i])) <= ties
            if ties == 0:
                np.testing.assert_array_max_ulp(
                    stacked.accuracy[i], expected.accuracy[i], maxulp=1)
                np.testing.assert_array_max_ulp(
                    np.nan_to_num(stacked.per_class_accuracy[i]),
                    np.nan_to_num(expected.per_class_accuracy[i]), maxulp=1)
            assert abs(float(stacked.loss[i]) - float(expected.loss[i])) <= (
                lenet5_loss_bound(params, images, expected.loss[i]))
    assert len(set(np.asarray(expected.accuracy).tolist())) > 1


def test_stack_with_user_metric_and_nan_model(lenet, trained_lenet,
                                              small_mnist):
    batches = batch_split(Split(small_mnist.test.images[:40],
                                small_mnist.test.labels[:40]), 20)
    stack = _stack(trained_lenet, 2)
    stack = jax.tree.map(lambda leaf: leaf.at[1].set(jnp.nan), stack)
    metric = lambda logits, labels, mask: mask.sum()
    metrics = evaluate_stack(lenet.forward, stack, batches, 10,
                             metric_fn=metric, vmap_size=1)
    np.testing.assert_array_equal(metrics.custom, [1.0, 1.0])
    assert math.isfinite(float(metrics.loss[0]))
    assert np.isnan(float(metrics.loss[1]))


def test_errors():
    batches = _batches()
    with pytest.raises(ValueError, match="num_classes must be a positive"):
        evaluate(scaled, {"scale": 1.0}, batches, 0)
    with pytest.raises(TypeError, match="must be a recovjax Batches"):
        evaluate(scaled, {"scale": 1.0}, (batches.images, batches.labels),
                 3)
    with pytest.raises(ValueError, match="do not match labels"):
        evaluate(scaled, {"scale": 1.0}, batches._replace(
            images=batches.images[:, :1]), 3)
    with pytest.raises(ValueError, match="labels and mask"):
        evaluate(scaled, {"scale": 1.0}, batches._replace(
            mask=batches.mask[:, :1]), 3)
    with pytest.raises(ValueError, match="same leading model axis"):
        evaluate_stack(scaled, {"scale": jnp.ones(2), "other": jnp.ones(3)},
                       batches, 3)
    with pytest.raises(ValueError, match="vmap_size must be a positive"):
        evaluate_stack(scaled, {"scale": jnp.ones(2)}, batches, 3,
                       vmap_size=0)


def test_metrics_is_a_namedtuple_with_defaults():
    metrics = Metrics(accuracy=1.0, loss=0.0, per_class_accuracy=None,
                      count=1)
    assert metrics.custom is None
    assert Metrics._fields[:5] == ("accuracy", "loss", "per_class_accuracy",
                                   "count", "custom")


def test_totals_are_exact_integers():
    metrics = evaluate(scaled, {"scale": 1.0}, _batches(), 3)
    assert int(metrics.correct) == 3
    np.testing.assert_array_equal(metrics.class_correct, [1, 1, 1])
    np.testing.assert_array_equal(metrics.class_count, [2, 2, 1])
    assert metrics.correct.dtype == jnp.int32
    _assert_loss_matches_reference(float(metrics.loss_sum), LOGITS, LABELS,
                                   scale=5)
