"""The backend choice of formulations: resolution, errors, retracing, and
the plain JAX formulations forced on CPU against the XLA:CPU ones."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import recovjax
from recovjax import formulations
from recovjax.damage import get_damage, select
from recovjax.models import get_model
from recovjax.models.layers import (conv2d, conv_relu_pool_stack,
                                    max_pool_2x2, reference_conv2d)
from recovjax.rundir import environment

from _tolerance import (LENET5_TERMS, assert_sums_close,
                        lenet5_logit_magnitude)

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
PLAIN = {"conv": "lax", "random": "jax", "select": "sort"}
"""The plain JAX formulations (the accelerator defaults)."""


@pytest.fixture(autouse=True)
def _restore_choice():
    yield
    formulations.reset_formulations()


def _environment_choice() -> dict[str, str]:
    return formulations.parse_formulations(
        os.environ.get(formulations.ENV_VAR, ""))


# --------------------------------------------------------------------------
# The choice.
# --------------------------------------------------------------------------


def test_defaults_follow_the_backend():
    assert formulations.defaults_for("cpu") == formulations.CPU_DEFAULTS
    for backend in ("gpu", "cuda", "rocm", "tpu"):
        assert formulations.defaults_for(backend) == (
            formulations.ACCELERATOR_DEFAULTS)
    assert formulations.CPU_DEFAULTS == ("banded", "hash", "radix")
    assert formulations.ACCELERATOR_DEFAULTS == ("lax", "jax", "sort")
    want = formulations.CPU_DEFAULTS._replace(**_environment_choice())
    assert jax.default_backend() == "cpu"
    assert formulations.current_formulations() == want
    described = formulations.describe_formulations()
    assert described["backend"] == "cpu"
    for mechanism in formulations.MECHANISMS:
        assert described[mechanism] == getattr(want, mechanism)
        assert described["sources"][mechanism] == (
            formulations.ENV_VAR if mechanism in _environment_choice()
            else "default for cpu")


def test_parse_formulations_and_its_errors():
    assert formulations.parse_formulations(" conv = lax, random=jax ,") == {
        "conv": "lax", "random": "jax"}
    assert formulations.parse_formulations("") == {}
    name = formulations.ENV_VAR
    with pytest.raises(ValueError, match=f"{name}: expected mechanism="
                       "formulation pairs .* got 'conv'"):
        formulations.parse_formulations("conv")
    with pytest.raises(ValueError, match=f"{name}: unknown mechanism 'cnv'; "
                       "valid: conv, random, select"):
        formulations.parse_formulations("cnv=lax")
    with pytest.raises(ValueError, match=f"{name}: conv: unknown formulation "
                       "'fast'; valid: banded, lax"):
        formulations.parse_formulations("conv=fast")
    with pytest.raises(ValueError, match=f"{name}: select: unknown "
                       "formulation ''"):
        formulations.parse_formulations("select=")
    with pytest.raises(ValueError, match="conv is given twice"):
        formulations.parse_formulations("conv=lax,conv=banded")


def test_set_use_and_reset_formulations():
    base = formulations.current_formulations()
    chosen = recovjax.set_formulations(conv="lax")
    assert chosen == base._replace(conv="lax")
    assert formulations.describe_formulations()["sources"]["conv"] == (
        "set_formulations")
    with recovjax.use_formulations(random="jax", select="sort") as inside:
        assert inside == formulations.current_formulations() == (
            base._replace(conv="lax", random="jax", select="sort"))
        with pytest.raises(RuntimeError), recovjax.use_formulations(
                conv="banded"):
            assert formulations.current_formulations().conv == "banded"
            raise RuntimeError("the block fails")
        assert formulations.current_formulations().conv == "lax"
    assert formulations.current_formulations() == base._replace(conv="lax")
    recovjax.set_formulations(select="sort")
    assert formulations.reset_formulations("conv") == base._replace(
        select="sort")
    assert recovjax.reset_formulations() == base


def test_bad_choices_name_the_argument():
    with pytest.raises(ValueError, match="conv: unknown formulation 'fast'; "
                       "valid: banded, lax"):
        recovjax.set_formulations(conv="fast")
    with pytest.raises(ValueError, match="random: unknown formulation"), \
            recovjax.use_formulations(random="threefry"):
        pass
    with pytest.raises(TypeError, match="cnv"):
        recovjax.set_formulations(cnv="lax")
    with pytest.raises(ValueError, match="unknown mechanism 'cnv'"):
        recovjax.reset_formulations("cnv")
    # A refused choice changes nothing.
    assert formulations.describe_formulations()["sources"]["conv"] != (
        "set_formulations")


def test_switching_retraces_every_jitted_program():
    traces = []

    @jax.jit
    def convolve(x, kernel):
        traces.append(formulations.current_formulations().conv)
        return conv2d(x, kernel, None)

    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    recovjax.set_formulations(conv="banded")
    banded = convolve(x, kernel)
    convolve(x, kernel)
    assert traces == ["banded"]
    recovjax.set_formulations(conv="lax")
    plain = convolve(x, kernel)
    assert traces == ["banded", "lax"]
    np.testing.assert_array_equal(plain, jax.jit(reference_conv2d)(
        x, kernel, None))
    recovjax.set_formulations(conv="lax")  # no change: nothing retraces
    convolve(x, kernel)
    assert traces == ["banded", "lax"]
    recovjax.set_formulations(conv="banded")
    np.testing.assert_array_equal(convolve(x, kernel), banded)
    assert traces == ["banded", "lax", "banded"]


def test_a_sweep_after_a_switch_compiles_the_new_formulation(trained_lenet,
                                                             small_mnist):
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *args, **kwargs: compiled.append(name))
    model = get_model("lenet5")

    def run():
        start = len(compiled)
        table = recovjax.sweep(model, trained_lenet, damages=["zero"],
                               ratios=[0.0, 0.5], seeds=1,
                               data=small_mnist.test, root_key=0,
                               include_clean=False).table
        traces = sum(name == "/jax/core/compile/jaxpr_trace_duration"
                     for name in compiled[start:])
        return {(row["ratio"], row["metric"]): row["value"]
                for row in table.rows}, traces

    recovjax.set_formulations(**PLAIN)
    first, _ = run()
    again, traces = run()
    assert traces == 0 and again == first
    recovjax.set_formulations(conv="banded", random="hash", select="radix")
    banded, traces = run()
    assert traces > 0
    # Ratio 0 damages nothing: the same accuracy, the loss up to rounding.
    assert banded[(0.0, "accuracy")] == first[(0.0, "accuracy")]
    assert banded[(0.0, "loss")] == pytest.approx(first[(0.0, "loss")],
                                                  rel=1e-5)


def test_resolving_the_choice_leaves_jax_unstarted_on_a_cpu_install():
    # Building a model traces it (the choice is resolved) before anything
    # runs: use_all_cores() must still be able to set the device count.
    code = ("import recovjax; from jax._src import xla_bridge; "
            "from recovjax import formulations; "
            "recovjax.get_model('lenet5'); "
            "print(formulations._accelerator_possible(), "
            "recovjax.current_formulations().conv, "
            "xla_bridge.backends_are_initialized(), "
            "recovjax.use_all_cores(2))")
    env = dict(os.environ)
    for name in ("JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES", "XLA_FLAGS",
                 formulations.ENV_VAR):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", code], env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    possible, *rest = done.stdout.split()
    if possible == "True":
        pytest.skip("an accelerator plugin or libtpu is installed: JAX "
                    "must start to tell its default backend")
    assert rest == ["banded", "False", "2"]


def test_environment_variable_and_env_json(tmp_path):
    code = ("import json, recovjax.rundir as r; "
            "print(json.dumps(r.environment()['formulations']))")
    env = dict(os.environ, RECOVJAX_FORMULATIONS="conv=lax, random=jax",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    recorded = json.loads(done.stdout.strip().splitlines()[-1])
    assert recorded == {
        "conv": "lax", "random": "jax", "select": "radix", "backend": "cpu",
        "sources": {"conv": "RECOVJAX_FORMULATIONS",
                    "random": "RECOVJAX_FORMULATIONS",
                    "select": "default for cpu"}}
    env["RECOVJAX_FORMULATIONS"] = "conv=fft"
    done = subprocess.run([sys.executable, "-c", code], env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert ("RECOVJAX_FORMULATIONS: conv: unknown formulation 'fft'; "
            "valid: banded, lax") in done.stderr


def test_environment_records_the_choice_and_its_source():
    recorded = environment()["formulations"]
    assert recorded == formulations.describe_formulations()
    with recovjax.use_formulations(select="sort"):
        recorded = environment()["formulations"]
    assert recorded["select"] == "sort"
    assert recorded["sources"]["select"] == "set_formulations"
    json.dumps(recorded)


# --------------------------------------------------------------------------
# conv="lax" against the banded convolutions.
# --------------------------------------------------------------------------


def _lenet_layers(rng):
    return ((jnp.asarray(rng.standard_normal((5, 5, 1, 6)), jnp.float32),
             jnp.full((6,), 0.05)),
            (jnp.asarray(rng.standard_normal((5, 5, 6, 16)), jnp.float32),
             jnp.full((16,), -0.05)))


def _magnitude_stack(x, layers):
    # Absolute values, and a 2x2 sum instead of the maximum: bounds every
    # term of the stack and of its gradients (see tests/test_models.py).
    for kernel, bias in layers:
        y = reference_conv2d(abs(x), abs(kernel), abs(bias))
        x = jax.lax.reduce_window(y, 0.0, jax.lax.add, (1, 2, 2, 1),
                                  (1, 2, 2, 1), "VALID")
    return x.reshape(x.shape[0], -1)


def test_lax_conv_is_the_reference_and_keeps_the_checks():
    x = jax.random.normal(jax.random.key(0), (2, 10, 9, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    bias = jnp.arange(4.0)
    with recovjax.use_formulations(conv="lax"):
        for padding in ("VALID", "SAME"):
            np.testing.assert_array_equal(
                conv2d(x, kernel, bias, padding),
                reference_conv2d(x, kernel, bias, padding))
        with pytest.raises(ValueError, match="padding"):
            conv2d(x, kernel, None, "FULL")
        with pytest.raises(ValueError, match="tile"):
            conv2d(x, kernel, None, "VALID", 0)


def test_lax_conv_stack_matches_banded_forward_and_gradients():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.random((3, 28, 28, 1)), jnp.float32)
    layers = _lenet_layers(rng)
    weights = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)

    def loss(x, layers):
        return jnp.sum(conv_relu_pool_stack(x, layers) * weights)

    def both():
        return (jax.jit(conv_relu_pool_stack)(x, layers),
                jax.jit(jax.value_and_grad(loss, (0, 1)))(x, layers))

    with recovjax.use_formulations(conv="banded"):
        banded, (banded_value, banded_grads) = both()
    with recovjax.use_formulations(conv="lax"):
        plain, (plain_value, plain_grads) = both()
        # jvp works through the plain formulation.
        _, tangent = jax.jvp(lambda x: conv_relu_pool_stack(x, layers),
                             (x,), (jnp.ones_like(x),))
        assert tangent.shape == plain.shape
        want = x
        for kernel, bias in layers:
            want = max_pool_2x2(jax.nn.relu(reference_conv2d(want, kernel,
                                                             bias)))
        np.testing.assert_array_equal(plain, want.reshape(3, -1))
    magnitude = _magnitude_stack(x, layers)
    # conv1 then conv2 (25 and 150 taps, plus biases).
    assert_sums_close(plain, banded, terms=26 + 151, magnitude=magnitude)
    assert_sums_close(plain_value, banded_value, terms=26 + 151 + 3 * 256,
                      magnitude=jnp.sum(abs(weights) * magnitude))
    # Backward: conv2's input gradient (400 taps) and conv1's kernel
    # gradient (3 * 24 * 24 positions) after the forward sums; the bound's
    # gradient of the absolute-value network bounds every term.
    bounds = jax.grad(lambda x, layers: jnp.sum(
        _magnitude_stack(x, layers) * abs(weights)), (0, 1))(
        abs(x), jax.tree.map(abs, layers))
    for a, b, bound in zip(jax.tree.leaves(plain_grads),
                           jax.tree.leaves(banded_grads),
                           jax.tree.leaves(bounds)):
        assert_sums_close(a, b, terms=26 + 151 + 3 * 256 + 400 + 1728,
                          magnitude=bound * (1 + float(magnitude.max())))


def test_lenet5_under_lax_conv_matches_banded(trained_lenet, small_mnist):
    model = get_model("lenet5")
    x = jnp.asarray(small_mnist.test.images[:50])
    outputs = {}
    for conv in ("banded", "lax"):
        with recovjax.use_formulations(conv=conv):
            outputs[conv] = np.asarray(jax.jit(model.forward)(trained_lenet,
                                                              x))
    assert_sums_close(outputs["lax"], outputs["banded"],
                      terms=LENET5_TERMS,
                      magnitude=lenet5_logit_magnitude(trained_lenet, x))


@pytest.mark.parametrize("name", ["lenet5", "rescnn"])
def test_models_trace_the_chosen_convolution(name):
    model = get_model(name)
    x = jnp.zeros((2, 28, 28, 1))
    params = model.init(jax.random.key(0), x)
    for conv, convolutions in (("banded", False), ("lax", True)):
        with recovjax.use_formulations(conv=conv):
            text = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(
                model.forward(p, x))))(params))
        assert ("conv_general_dilated" in text) is convolutions, conv


# --------------------------------------------------------------------------
# select="sort" against the bitwise search.
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("groups",))
def _smallest(values, ratio, where, groups):
    sizes = np.bincount(groups, weights=[v.size for v in values]).astype(int)
    counts = jnp.stack([select.count_of(int(n), ratio) for n in sizes])
    return select.select_smallest(values, counts, where=where,
                                  groups=groups)


def _masks(values, ratio, where, groups, choice):
    with recovjax.use_formulations(select=choice):
        return [np.asarray(m) for m in _smallest(values, ratio, where,
                                                 groups)]


@SETTINGS
@given(sizes=st.lists(st.integers(1, 1500), min_size=1, max_size=4),
       levels=st.sampled_from([3, 50, 2**32]),
       ratio=st.floats(0.0, 1.0, width=32), masked=st.booleans(),
       grouped=st.booleans(), seed=st.integers(0, 2**16))
def test_sort_selection_equals_the_bitwise_search(sizes, levels, ratio,
                                                  masked, grouped, seed):
    rng = np.random.default_rng(seed)
    # Few levels make ties; with 3 the values are the top three, so the
    # largest ties with the parked non-candidates (0xFFFFFFFF).
    values = []
    for size in sizes:
        drawn = rng.integers(0, levels, size, dtype=np.uint64)
        if levels == 3:
            drawn = np.uint64(0xFFFFFFFF) - drawn
        values.append(jnp.asarray(drawn.astype(np.uint32)))
    where = ([jnp.asarray(rng.random(size) < 0.7) for size in sizes]
             if masked else None)
    groups = (tuple([0] * len(sizes)) if grouped
              else tuple(range(len(sizes))))
    radix = _masks(values, ratio, where, groups, "radix")
    sort = _masks(values, ratio, where, groups, "sort")
    for a, b in zip(radix, sort):
        np.testing.assert_array_equal(a, b)
    # Exactly floor(n * ratio) of each group's candidates.
    for group in set(groups):
        members = [i for i, g in enumerate(groups) if g == group]
        eligible = sum(int(np.sum(where[i])) if masked else sizes[i]
                       for i in members)
        size = sum(sizes[i] for i in members)
        want = min(int(np.floor(np.float32(size) * np.float32(ratio))),
                   eligible)
        assert sum(int(sort[i].sum()) for i in members) == want
        if masked:
            assert not any(np.any(sort[i] & ~np.asarray(where[i]))
                           for i in members)


def test_sort_selection_takes_the_smallest_and_ties_by_position():
    values = [jnp.asarray([5, 1, 3, 3, 0xFFFFFFFF, 3], jnp.uint32),
              jnp.asarray([3, 0, 0xFFFFFFFF], jnp.uint32)]
    where = [jnp.asarray([True, True, True, False, True, True]), None]
    with recovjax.use_formulations(select="sort"):
        # One group of 9 entries (8 candidates), 4 chosen: 0, 1, then the
        # first two candidate 3s by position (the masked-out one skipped).
        masks = select.select_smallest(values, jnp.int32(4), where=where,
                                       groups=[0, 0])
        np.testing.assert_array_equal(masks[0], [0, 1, 1, 0, 0, 1])
        np.testing.assert_array_equal(masks[1], [0, 1, 0])
        # Every candidate, also those at 0xFFFFFFFF beside parked entries.
        every = select.select_smallest(values, jnp.int32(100), where=where,
                                       groups=[0, 0])
        np.testing.assert_array_equal(every[0], where[0])
        assert every[1].all()
        none = select.select_smallest(values, jnp.int32(0), where=where)
        assert not any(np.any(m) for m in none)
        empty = select.select_smallest([jnp.zeros((0,), jnp.uint32)],
                                       jnp.int32(3))
        assert empty[0].shape == (0,)


# --------------------------------------------------------------------------
# random="jax".
# --------------------------------------------------------------------------


def test_jax_draws_are_threefry_reproducible_and_prefix_stable():
    key = jax.random.key(3)
    with recovjax.use_formulations(random="jax"):
        first = np.concatenate([np.asarray(d) for d in select.draw_bits(
            key, (1000, 3000))])
        again = np.concatenate([np.asarray(d) for d in select.draw_bits(
            key, (1000, 3000))])
        prefix = np.asarray(select.draw_bits(key, (1000,))[0])
        values = np.asarray(select.draw_bits(key, (4000,),
                                             select.VALUE_STREAM)[0])
        other = np.concatenate([np.asarray(d) for d in select.draw_bits(
            jax.random.key(4), (1000, 3000))])
        normals = np.asarray(select.draw_normal(key, (65536,))[0])
        uniforms = np.asarray(select.draw_uniform(key, (65536,))[0])
    np.testing.assert_array_equal(first, np.asarray(jax.random.bits(
        jax.random.fold_in(key, select.SELECT_STREAM), (4000,), jnp.uint32)))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[:1000], prefix)
    assert (first != values).mean() > 0.99 and (first != other).mean() > 0.99
    with recovjax.use_formulations(random="hash"):
        hashed = np.asarray(select.draw_bits(key, (4000,))[0])
    assert (first != hashed).mean() > 0.99
    assert abs(normals.mean()) < 0.02 and abs(normals.std() - 1) < 0.02
    assert 0 < uniforms.min() and uniforms.max() < 1
    assert abs(uniforms.mean() - 0.5) < 0.01


@pytest.mark.parametrize("choice", ["radix", "sort"])
def test_jax_random_selection_counts_are_exact_and_traced(choice):
    sizes = (1, 300, 7, 2049)
    where = [None, jnp.arange(300) % 3 == 0, None, jnp.arange(2049) < 2000]
    traces = []

    @jax.jit
    def choose(key, ratio):
        traces.append(ratio)
        counts = jnp.stack([select.count_of(n, ratio) for n in sizes])
        return select.select_random(key, sizes, counts, where=where)

    chosen = {}
    with recovjax.use_formulations(random="jax", select=choice):
        for ratio in (0.0, 0.25, 0.5, 1.0):
            masks = [np.asarray(m) for m in choose(jax.random.key(7),
                                                   jnp.float32(ratio))]
            chosen[ratio] = np.concatenate(masks)
            for size, w, mask in zip(sizes, where, masks):
                eligible = size if w is None else int(np.sum(w))
                want = min(int(np.floor(np.float32(size) * np.float32(
                    ratio))), eligible)
                assert mask.sum() == want
                if w is not None:
                    assert not np.any(mask & ~np.asarray(w))
        again = np.concatenate(choose(jax.random.key(7), jnp.float32(0.5)))
        other = np.concatenate(choose(jax.random.key(8), jnp.float32(0.5)))
    assert len(traces) == 1  # one program serves every ratio and key
    np.testing.assert_array_equal(again, chosen[0.5])
    assert not np.array_equal(again, other)
    # The smallest draws: a larger ratio keeps what a smaller one chose.
    assert np.all(chosen[0.5][chosen[0.25]])


def test_jax_random_selection_is_uniform_and_bernoulli_keeps_its_rate():
    size, count, trials = 40, 10, 400
    with recovjax.use_formulations(random="jax"):
        choose = jax.jit(jax.vmap(lambda key: select.select_random(
            key, [size], jnp.int32(count))[0]))
        hits = np.asarray(choose(jax.random.split(jax.random.key(0),
                                                  trials)))
        bits = select.draw_bits(jax.random.key(1), [200_000])
        rates = [float(np.mean(np.asarray(select.select_bernoulli(
            bits, rate)[0]))) for rate in (0.0, 0.3, 1.0)]
    assert (hits.sum(axis=1) == count).all()
    # Each entry is chosen with probability 1/4: 100 expected per entry,
    # standard deviation sqrt(400 * 1/4 * 3/4) ~ 8.7; 5 sigma either way.
    per_entry = hits.sum(axis=0)
    assert per_entry.min() > 100 - 44 and per_entry.max() < 100 + 44
    assert rates[0] == 0.0 and rates[2] == 1.0
    assert abs(rates[1] - 0.3) < 5 * np.sqrt(0.3 * 0.7 / 200_000)


# --------------------------------------------------------------------------
# Damage operators under the plain formulations.
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _plain():
    with recovjax.use_formulations(**PLAIN):
        yield


def test_damage_under_plain_formulations_keeps_its_contract():
    model = get_model("lenet5")
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    zero, uniform = get_damage("zero"), get_damage("random_uniform")
    ratio = jnp.float32(0.3)
    with _plain():
        run = jax.jit(lambda key, ratio: (zero(key, params, ratio),
                                          uniform(key, params, ratio)))
        (zeroed, replaced) = run(jax.random.key(1), ratio)
        (zeroed_again, _) = run(jax.random.key(1), ratio)
        (other, _) = run(jax.random.key(2), ratio)
        (full, _) = run(jax.random.key(1), jnp.float32(1.0))
    for leaf, mask, damaged in zip(jax.tree.leaves(params),
                                   jax.tree.leaves(zeroed.mask),
                                   jax.tree.leaves(zeroed.params)):
        assert int(np.sum(mask)) == int(np.floor(np.float32(leaf.size)
                                                 * np.float32(0.3)))
        np.testing.assert_array_equal(np.asarray(damaged)[np.asarray(mask)],
                                      0.0)
        np.testing.assert_array_equal(np.asarray(damaged)[~np.asarray(mask)],
                                      np.asarray(leaf)[~np.asarray(mask)])
    # The same entries for every operator and one key; byte-identical
    # again; other keys choose others.
    for a, b in zip(jax.tree.leaves(zeroed.mask),
                    jax.tree.leaves(replaced.mask)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(zeroed), jax.tree.leaves(zeroed_again)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(zeroed.mask), jax.tree.leaves(other.mask)))
    assert all(np.all(m) for m in jax.tree.leaves(full.mask))


def test_data_damage_under_plain_formulations_counts_exactly(small_mnist):
    drop = get_damage("drop_samples")
    batch = small_mnist.test
    with _plain():
        damaged = drop(jax.random.key(0), batch.images, batch.labels, 0.25,
                       num_classes=10)
    mask = np.asarray(damaged.mask)
    assert int(mask.sum()) == int(np.floor(np.float32(len(batch.labels))
                                           * np.float32(0.25)))
    np.testing.assert_array_equal(np.asarray(damaged.weights) == 0, mask)
