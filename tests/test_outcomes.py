"""Masked, SDC and DUE outcomes against the clean model's predictions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recovjax
from recovjax.damage import make_activation_faults, make_bit_flip
from recovjax.data import batch_split
from recovjax.evaluate import classify, evaluate, predictions
from recovjax.report import outcome_table


def test_each_example_is_masked_sdc_or_due():
    logits = jnp.array([[1.0, 0.0], [0.0, 1.0], [jnp.nan, 0.0],
                        [jnp.inf, 0.0], [1.0, 0.0]])
    reference = jnp.array([0, 0, 0, 0, 1])
    valid = jnp.array([True, True, True, True, False])
    np.testing.assert_array_equal(classify(logits, reference, valid),
                                  [1, 1, 2])


def test_the_clean_model_is_all_masked(lenet, trained_lenet, small_mnist):
    batches = batch_split(small_mnist.test, 64)   # padded last batch
    reference = jax.jit(predictions, static_argnums=0)(
        lenet.forward, trained_lenet, batches)
    metrics = evaluate(lenet.forward, trained_lenet, batches, 10,
                       reference=reference)
    np.testing.assert_array_equal(metrics.outcomes, [200, 0, 0])
    # Without a reference nothing is counted.
    assert evaluate(lenet.forward, trained_lenet, batches, 10
                    ).outcomes is None
    with pytest.raises(ValueError, match="reference: one prediction per "
                       "example"):
        evaluate(lenet.forward, trained_lenet, batches, 10,
                 reference=reference[:1])


def test_a_sweep_reports_outcome_fractions(lenet, trained_lenet,
                                           small_mnist):
    result = recovjax.sweep(
        lenet, trained_lenet,
        damages={"bits": make_bit_flip(),
                 "act": make_activation_faults("flip")},
        ratios=[0.0, 1e-3], seeds=[0], data=small_mnist.test, root_key=0,
        batch_size=100, outcomes=True)
    rows = result.table.rows
    value = {(r["damage"], r["ratio"], r["metric"]): r["value"]
             for r in rows}
    for kind, ratio in (("bits", 0.0), ("act", 0.0), ("none", 0.0)):
        assert value[(kind, ratio, "outcome/masked")] == 1.0
    for kind in ("bits", "act"):
        parts = [value[(kind, 1e-3, f"outcome/{n}")]
                 for n in ("masked", "sdc", "due")]
        assert abs(sum(parts) - 1.0) < 1e-6
        # Exponent flips at this rate give NaN/inf logits somewhere.
        assert value[(kind, 1e-3, "outcome/due")] > 0
        # Masked examples keep their class; accuracy cannot fall below the
        # masked examples the clean model had right.
        assert value[(kind, 1e-3, "outcome/masked")] < 1.0
    lines = outcome_table(rows)
    assert lines[0] == "| damage | amount | n | masked | SDC | DUE |"
    assert any(line.startswith("| bits | 0.001 | 1 |") for line in lines)


def test_outcomes_need_in_memory_classification_data(lenet, trained_lenet,
                                                     small_mnist):
    with pytest.raises(TypeError, match="outcomes must be a bool"):
        recovjax.sweep(lenet, trained_lenet, damages=["zero"], ratios=[0.1],
                       seeds=[0], data=small_mnist.test, root_key=0,
                       outcomes="yes")
