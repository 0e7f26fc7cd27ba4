"""Tests for recovjax.sweep (and the compilation cache it turns on)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recovjax import _compile_cache
from recovjax._types import Split
from recovjax.damage import get_damage
from recovjax.results import ResultsTable, metrics_rows, read_csv
from recovjax.sweep import (ChunkResult, damage_id, damage_point,
                            iter_sweep, plan_sweep, point_fn, point_key,
                            point_keys, sweep)

from _tolerance import lenet5_loss_bound, lenet5_near_ties

RATIOS = (0.0, 0.3, 0.6)
OTHER_RATIOS = (0.1, 0.45, 0.9)
SEEDS = 2


ZERO = get_damage("zero")


@pytest.fixture(scope="module")
def test_split(small_mnist) -> Split:
    return Split(small_mnist.test.images[:100], small_mnist.test.labels[:100])


@pytest.fixture(scope="module")
def baseline(lenet, trained_lenet, test_split):
    """One reference sweep: 3 ratios x 2 seeds in chunks of 4 (4 + 2)."""
    return sweep(lenet, trained_lenet, damages={"zero": ZERO}, ratios=RATIOS,
                 seeds=SEEDS, data=test_split, root_key=0, batch_size=50,
                 chunk_size=4)


def _body(table) -> list[str]:
    """The CSV lines of the rows (exact, NaN-safe), without the metadata."""
    return table.to_csv_text().splitlines()[1:]


def _values(table, damage="zero", metric="accuracy"):
    return {(row["ratio"], row["seed"]): row["value"]
            for row in table.select(damage=damage, metric=metric,
                                    stage="damaged")}


def test_table_has_every_point_and_the_clean_model(baseline, trained_lenet,
                                                   test_split):
    table = baseline.table
    points = _values(table)
    assert sorted(points) == [(r, s) for r in RATIOS for s in range(SEEDS)]
    # 12 metrics per point: accuracy, loss and 10 per-class accuracies.
    assert len(table.select(stage="damaged")) == 12 * len(points)
    (clean,) = table.select(stage="clean", metric="accuracy")
    assert clean["damage"] == "none"
    # Ratio 0 damages nothing: both seeds score the clean accuracy (the
    # clean slot and the points are other lanes of the vmapped program; a
    # prediction may differ only where two logits tie within rounding).
    slack = lenet5_near_ties(trained_lenet, test_split.images) / 100 + 1e-6
    assert abs(points[(0.0, 0)] - points[(0.0, 1)]) <= slack
    assert abs(points[(0.0, 0)] - clean["value"]) <= slack
    assert points[(0.6, 0)] < points[(0.0, 0)]
    assert table.root_seed == 0
    assert table.config["ratios"] == list(RATIOS)
    assert table.config["chunk_size"] == 4
    assert table.device_kind.startswith("cpu")
    assert "jax" in table.versions


def test_clean_model_rides_in_a_chunk_without_a_program_of_its_own(
        lenet, trained_lenet, test_split):
    from recovjax.evaluate import evaluate
    from recovjax.data import batch_split
    from recovjax.models import from_apply
    traces = []

    def apply(params, x):
        traces.append(1)  # Runs only while JAX traces.
        return lenet.forward(params, x)

    counted = from_apply(apply, trained_lenet, sample=lenet.sample,
                         name="counted", init=lenet.init)
    # Building the model traces it (its dataflow) and so does reading its
    # output width; neither belongs to the sweep.
    assert counted.num_classes == lenet.num_classes
    traces.clear()
    result = sweep(counted, trained_lenet, damages={"zero": ZERO},
                   ratios=RATIOS, seeds=SEEDS, data=test_split, root_key=0,
                   batch_size=50, chunk_size=3)
    # Traced once, for the one chunk program (groups of one need no memory
    # estimate); not for the clean model (a program of its own would trace
    # it again).
    assert len(traces) == 1
    alone = jax.device_get(evaluate(lenet.forward, trained_lenet,
                                    batch_split(test_split, 50), 10))
    (accuracy,) = result.table.select(stage="clean", metric="accuracy")
    (loss,) = result.table.select(stage="clean", metric="loss")
    ties = lenet5_near_ties(trained_lenet, test_split.images)
    assert abs(accuracy["value"] - float(alone.accuracy)) <= (
        ties / len(test_split.labels) + 1e-6)
    assert abs(loss["value"] - float(alone.loss)) <= lenet5_loss_bound(
        trained_lenet, test_split.images, alone.loss)
    # 6 points + the clean slot in chunks of 3: the slot makes a third chunk.
    assert len(result.table.select(stage="clean")) == 12
    assert len(result.table.select(stage="damaged")) == 12 * 6


def test_second_sweep_with_other_ratios_does_not_retrace(
        lenet, trained_lenet, test_split):
    traces = []

    def counting(key, params, ratio):
        traces.append(1)  # Runs only while JAX traces.
        return ZERO(key, params, ratio)

    options = dict(damages={"counted": counting}, seeds=SEEDS,
                   data=test_split, root_key=0, batch_size=50, chunk_size=4,
                   include_clean=False)
    first = sweep(lenet, trained_lenet, ratios=RATIOS, **options)
    assert len(traces) == 1
    second = sweep(lenet, trained_lenet, ratios=OTHER_RATIOS, **options)
    assert len(traces) == 1, "new ratio values must not retrace"
    assert _values(first.table, "counted") != _values(second.table,
                                                      "counted")


def test_chunked_equals_unchunked(lenet, trained_lenet, test_split,
                                  baseline):
    whole = sweep(lenet, trained_lenet, damages={"zero": ZERO},
                  ratios=RATIOS, seeds=SEEDS, data=test_split, root_key=0,
                  batch_size=50, chunk_size=None)
    # One chunk: every point plus the clean model's slot.
    assert whole.plan.chunk_size == len(RATIOS) * SEEDS + 1
    assert _body(whole.table) == _body(baseline.table)


def test_single_point_rerun_equals_the_sweep(lenet, trained_lenet,
                                             test_split, baseline):
    for ratio_index, seed in ((1, 1), (2, 0)):
        metrics = damage_point(
            lenet, trained_lenet, damage=ZERO, damage_name="zero",
            ratio=RATIOS[ratio_index], ratio_index=ratio_index, seed=seed,
            root_key=0, data=test_split, batch_size=50,
            vmap_size=baseline.plan.vmap_size)
        rows = baseline.table.select(ratio=RATIOS[ratio_index], seed=seed,
                                     stage="damaged")
        alone = metrics_rows(metrics, damage="zero",
                             ratio=RATIOS[ratio_index], seed=seed,
                             stage="damaged")
        assert ResultsTable(rows=alone) == ResultsTable(rows=rows)
        assert int(metrics.count) == len(test_split)
        np.testing.assert_array_max_ulp(
            metrics.accuracy, np.float32(metrics.correct) / 100, maxulp=1)


def test_keys_are_addressable_and_independent_of_other_kinds(
        lenet, trained_lenet, test_split, baseline):
    both = sweep(lenet, trained_lenet,
                 damages={"another": ZERO, "zero": ZERO}, ratios=RATIOS,
                 seeds=SEEDS, data=test_split, root_key=0, batch_size=50,
                 chunk_size=4, include_clean=False)
    assert _values(both.table, "zero") == _values(baseline.table, "zero")
    assert _values(both.table, "another") != _values(both.table, "zero")
    other_root = sweep(lenet, trained_lenet, damages={"zero": ZERO},
                       ratios=RATIOS, seeds=SEEDS, data=test_split,
                       root_key=jax.random.key(1), batch_size=50,
                       chunk_size=4, include_clean=False)
    assert _values(other_root.table) != _values(baseline.table)
    assert other_root.table.root_seed is None
    # The documented derivation.
    root = jax.random.key(0)
    expected = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
        root, damage_id("zero")), 2), 1)
    assert np.array_equal(jax.random.key_data(point_key(root, "zero", 2, 1)),
                          jax.random.key_data(expected))
    # The sweep's batched derivation gives the same keys.
    many = point_keys(root, "zero", [2, 0, 2], [1, 3, 0])
    for key, (index, seed) in zip(many, [(2, 1), (0, 3), (2, 0)]):
        assert np.array_equal(
            jax.random.key_data(key),
            jax.random.key_data(point_key(root, "zero", index, seed)))
    with pytest.raises(ValueError, match="ratio_indices and seeds"):
        point_keys(root, "zero", [0, 1], [0])


def test_int_root_seed_is_jax_random_key():
    from recovjax.sweep.keys import _seed_key
    for seed in (0, 1, 12345, 2**31 - 1, -3):  # -3 takes jax.random.key
        want = jax.random.key(seed)
        got = _seed_key(seed)
        assert str(jax.random.key_impl(got)) == str(jax.random.key_impl(want))
        assert np.array_equal(jax.random.key_data(got),
                              jax.random.key_data(want))


def test_host_fold_in_is_bit_equal_to_jax():
    from recovjax.sweep.keys import _threefry_fold_in
    rng = np.random.default_rng(0)
    key_data = rng.integers(0, 2**32, (64, 2), dtype=np.uint32)
    data = rng.integers(0, 2**32, 64, dtype=np.uint32)
    data[:3] = (0, 1, 2**32 - 1)
    ours = _threefry_fold_in(key_data, data)
    for row, datum, got in zip(key_data, data, ours):
        want = jax.random.fold_in(jax.random.wrap_key_data(row), int(datum))
        assert np.array_equal(got, jax.random.key_data(want))


def test_point_keys_of_other_key_implementations_fold_in_jax():
    root = jax.random.key(5, impl="rbg")
    many = point_keys(root, "noise", [1, 0], [4, 2])
    assert str(jax.random.key_impl(many)) == "rbg"
    for key, (index, seed) in zip(many, [(1, 4), (0, 2)]):
        assert np.array_equal(
            jax.random.key_data(key),
            jax.random.key_data(point_key(root, "noise", index, seed)))
    assert damage_id("zero") == damage_id("zero") != damage_id("noise")


def test_streaming_yields_each_chunk(lenet, trained_lenet, test_split,
                                     baseline):
    seen = []
    result = sweep(lenet, trained_lenet, damages={"zero": ZERO},
                   ratios=RATIOS, seeds=SEEDS, data=test_split, root_key=0,
                   batch_size=50, chunk_size=4, on_chunk=seen.append)
    # Uneven chunks: the last one is padded and its padding discarded.
    assert [len(chunk.points) for chunk in seen] == [4, 2]
    assert all(isinstance(chunk, ChunkResult) for chunk in seen)
    assert [p.ratio_index for chunk in seen for p in chunk.points] == [
        0, 0, 1, 1, 2, 2]
    assert seen[0].metrics.accuracy.shape == (4,)
    streamed = [row for chunk in seen for row in chunk.rows]
    assert ResultsTable(rows=streamed) == ResultsTable(
        rows=result.table.select(stage="damaged"))
    chunks = iter_sweep(lenet, trained_lenet, damages={"zero": ZERO},
                        ratios=RATIOS, seeds=SEEDS, data=test_split,
                        root_key=0, batch_size=50, chunk_size=4)
    first = next(chunks)  # A generator: chunks come one at a time.
    assert [p.seed for p in first.points] == [0, 1, 0, 1]
    rest = list(chunks)
    assert ResultsTable(rows=first.rows + rest[0].rows) == ResultsTable(
        rows=baseline.table.select(stage="damaged"))


def test_structural_damage_gets_the_models_leaf_metadata(
        lenet, trained_lenet, test_split):
    # remove_neurons needs info=model.info; the sweep binds the model's.
    from recovjax.damage import remove_neurons
    from recovjax.data import batch_split
    from recovjax.evaluate import evaluate
    result = sweep(lenet, trained_lenet, damages={"neurons": remove_neurons},
                   ratios=(0.5,), seeds=1, data=test_split, root_key=0,
                   batch_size=50, include_clean=False)
    (row,) = result.table.select(stage="damaged", metric="accuracy")
    damaged = remove_neurons(point_key(jax.random.key(0), "neurons", 0, 0),
                             trained_lenet, 0.5, info=lenet.info).params
    # Half of every hidden layer's units are gone.
    assert int(np.sum(np.asarray(damaged["fc1"]["bias"]) == 0)) >= 60
    batches = batch_split(test_split, 50)
    alone = evaluate(lenet.forward, damaged, batches, 10)
    ties = lenet5_near_ties(damaged, test_split.images)
    assert abs(row["value"] - float(alone.accuracy)) <= (
        ties / len(test_split.labels) + 1e-6)
    # ... and it is not the clean model's.
    clean = evaluate(lenet.forward, trained_lenet, batches, 10)
    assert abs(float(clean.accuracy) - float(alone.accuracy)) > (
        (ties + lenet5_near_ties(trained_lenet, test_split.images))
        / len(test_split.labels))


def test_user_metric_rows(lenet, trained_lenet, test_split):
    def confidence(logits, labels, mask):
        top = jax.nn.softmax(logits).max(-1)
        return jnp.where(mask, top, 0.0).sum()

    result = sweep(lenet, trained_lenet, damages={"zero": ZERO},
                   ratios=(0.2,), seeds=1, data=test_split, root_key=0,
                   batch_size=50, metric_fn=confidence)
    (row,) = result.table.select(stage="damaged", metric="custom")
    assert 0.1 <= row["value"] <= 1.0
    assert result.table.select(stage="clean", metric="custom")


def test_memory_plan():
    plan = plan_sweep(10_000, 100, num_devices=1, vmap_size=8,
                      memory_budget_bytes=40_000)
    assert plan.vmap_size == 4  # 4 x 10 kB fit the budget, 8 do not.
    assert plan.chunk_size == 100
    plan = plan_sweep(10_000, 7, num_devices=4, vmap_size=2,
                      memory_budget_bytes=1 << 20)
    assert plan.chunk_size % 8 == 0 and plan.chunk_size >= 7
    # Balanced chunks: 101 points (100 and a clean slot) run as 2 x 51.
    assert plan_sweep(10_000, 101).chunk_size == 51
    assert plan_sweep(10_000, 1000).chunk_size == 100
    assert plan_sweep(10_000, 1001, num_devices=2).chunk_size == 2 * 84
    plan = plan_sweep(1 << 40, 10, memory_budget_bytes=1)
    assert plan.vmap_size == 1  # Never below one model.
    plan = plan_sweep(100, 1000, chunk_size=30, vmap_size=4)
    assert plan.chunk_size == 32
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        plan_sweep(100, 10, chunk_size=0)


def test_group_sizes_come_from_xla_memory_analysis(lenet, trained_lenet,
                                                   test_split):
    from recovjax import runner
    from recovjax.data import batch_split
    batches = batch_split(test_split, 100)
    point = (jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
             jax.ShapeDtypeStruct((), jnp.float32),
             jax.ShapeDtypeStruct((), jnp.bool_))
    estimate = runner.point_memory(point_fn(lenet, ZERO, None), point,
                                   (trained_lenet, batches))
    params = sum(leaf.nbytes for leaf in jax.tree.leaves(trained_lenet))
    # XLA:CPU reports its temporaries: a damaged copy of the parameters
    # and at least the first convolution's output of one batch.
    assert estimate.source == "memory_analysis"
    assert estimate.point_bytes > params + 100 * 24 * 24 * 6 * 4
    plans = []
    list(iter_sweep(lenet, trained_lenet, damages={"zero": ZERO},
                    ratios=(0.1,), seeds=4, data=batches, root_key=0,
                    vmap_size=4, memory_budget_bytes=2 * estimate.point_bytes,
                    plan=plans))
    assert plans[0].vmap_size == 2
    assert plans[0].model_bytes == estimate.point_bytes


@pytest.mark.parametrize("options, error, message", [
    (dict(ratios=()), ValueError, "ratios is empty"),
    (dict(ratios=(0.1, float("nan"))), ValueError, "finite"),
    (dict(ratios=(-0.1,)), ValueError, "non-negative"),
    (dict(seeds=0), ValueError, "positive count"),
    (dict(seeds=[1, 1]), ValueError, "distinct"),
    (dict(seeds=[-1]), ValueError, r"\[0, 2\*\*31\)"),
    (dict(damages={}), ValueError, "no damage kinds"),
    (dict(damages={"none": ZERO}), ValueError, "reserved"),
    (dict(damages={"zero": 3}), TypeError, "callable"),
    (dict(damages=["zero", "zero"]), ValueError, "distinct"),
    (dict(root_key=jax.random.PRNGKey(0)), TypeError, "typed key"),
    (dict(root_key=True), TypeError, "typed key"),
    (dict(data=np.zeros((3, 28, 28, 1))), TypeError, "Split, Batches"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(devices=[]), ValueError, "devices is empty"),
])
def test_bad_arguments(lenet, trained_lenet, test_split, options, error,
                       message):
    arguments = dict(damages={"zero": ZERO}, ratios=RATIOS, seeds=SEEDS,
                     data=test_split, root_key=0, batch_size=50)
    arguments.update(options)
    with pytest.raises(error, match=message):
        sweep(lenet, trained_lenet, **arguments)


def test_unknown_damage_name_lists_valid_names(lenet, trained_lenet,
                                               test_split):
    pytest.importorskip("recovjax.damage")
    with pytest.raises(ValueError, match="zero"):
        sweep(lenet, trained_lenet, damages=["no-such-damage"],
              ratios=RATIOS, seeds=1, data=test_split, root_key=0)


def test_damage_point_needs_a_name_for_an_op(lenet, trained_lenet,
                                             test_split):
    with pytest.raises(ValueError, match="damage_name"):
        damage_point(lenet, trained_lenet, damage=ZERO, ratio=0.1,
                     ratio_index=0, seed=0, root_key=0, data=test_split)


# A subprocess: XLA_FLAGS must be set before JAX starts.
FOUR_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from recovjax._types import Split
    from recovjax.models import get_model
    from recovjax.sweep import sweep
    sys.path.insert(0, sys.argv[3])
    from test_sweep import ZERO, RATIOS, SEEDS
    assert jax.device_count() == 4, jax.devices()
    data = np.load(sys.argv[1])
    params = {k: {"kernel": data[k + "/kernel"], "bias": data[k + "/bias"]}
              for k in ("conv1", "conv2", "fc1", "fc2", "fc3")}
    result = sweep(get_model("lenet5"), params, damages={"zero": ZERO},
                   ratios=RATIOS, seeds=SEEDS,
                   data=Split(data["images"], data["labels"]), root_key=0,
                   batch_size=50, chunk_size=4, include_clean=False)
    assert result.plan.num_devices == 4
    result.table.to_csv(sys.argv[2])
""")


def test_four_forced_devices_equal_one(trained_lenet, test_split, baseline,
                                       tmp_path):
    arrays = {f"{layer}/{name}": np.asarray(value)
              for layer, leaves in trained_lenet.items()
              for name, value in leaves.items()}
    np.savez(tmp_path / "inputs.npz", images=test_split.images,
             labels=test_split.labels, **arrays)
    environment = dict(os.environ)
    environment["XLA_FLAGS"] = (environment.get("XLA_FLAGS", "") +
                                " --xla_force_host_platform_device_count=4")
    environment["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES, str(tmp_path / "inputs.npz"),
         str(tmp_path / "four.csv"), str(pathlib.Path(__file__).parent)],
        env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    four = read_csv(tmp_path / "four.csv")
    assert four.device_kind.endswith("x4")
    assert baseline.plan.num_devices == 1
    one = baseline.table.select(stage="damaged")
    assert four.rows and len(four.rows) == len(one)
    # Counts (accuracy) are exact unless an example's top two logits tie
    # within rounding (counted, almost always none); a loss may differ in
    # its last bits, because XLA compiles the GEMMs' blocking and the loss
    # reduction separately for each device count. The bounds are those of
    # each point's damaged model, rebuilt from its key.
    root = jax.random.key(0)
    damaged = {(RATIOS[index], seed): ZERO(
        point_key(root, "zero", index, seed), trained_lenet,
        jnp.float32(RATIOS[index])).params
        for index in range(len(RATIOS)) for seed in range(SEEDS)}
    images = test_split.images
    ties = {point: lenet5_near_ties(params, images)
            for point, params in damaged.items()}
    for got, want in zip(four.rows, one):
        assert {k: v for k, v in got.items() if k != "value"} == {
            k: v for k, v in want.items() if k != "value"}
        params = damaged[want["ratio"], want["seed"]]
        if want["metric"] == "loss":
            assert abs(got["value"] - want["value"]) <= lenet5_loss_bound(
                params, images, want["value"]), got
        elif ties[want["ratio"], want["seed"]] == 0:
            np.testing.assert_array_equal(got["value"], want["value"],
                                          str(got))
        else:  # Accuracies may move by the near-ties (per class: all).
            slack = ties[want["ratio"], want["seed"]] / len(images)
            assert abs(got["value"] - want["value"]) <= (
                1.0 if want["metric"] != "accuracy" else slack), got


def test_compilation_cache_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(_compile_cache.CACHE_ENV, "0")
    assert _compile_cache.enable_compilation_cache(tmp_path) is None
    monkeypatch.setenv(_compile_cache.CACHE_ENV, str(tmp_path / "env"))
    try:
        assert _compile_cache.enable_compilation_cache() == tmp_path / "env"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
        jax.jit(lambda x: x * 7 + 3)(jnp.arange(3.0)).block_until_ready()
        assert any((tmp_path / "env").iterdir()), "nothing was cached"
        monkeypatch.delenv(_compile_cache.CACHE_ENV)
        assert _compile_cache.enable_compilation_cache(tmp_path / "x") == (
            tmp_path / "x")
    finally:
        _compile_cache.disable_compilation_cache()
    assert not jax.config.jax_enable_compilation_cache
