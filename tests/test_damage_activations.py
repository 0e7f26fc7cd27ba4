"""Activation faults: sites, transient and permanent faults, the clean path."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import recovjax
from recovjax.damage import activations
from recovjax.damage.activations import find_sites, make_activation_faults
from recovjax import Batches
from recovjax.evaluate import evaluate, start_totals
from recovjax.models import from_equinox, from_linen, from_nnx

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))


class LinenCNN(nn.Module):
    """A user's linen model, with a jit-compiled block inside."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)
        x = jax.jit(jnp.tanh)(nn.Dense(16)(x))
        return nn.Dense(10)(x)


class Single(nn.Module):
    """One dense layer: its site is the model's output."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
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


def linen(module=None):
    module = module or LinenCNN()
    return from_linen(module, module.init(KEY, X), sample=X)


def test_sites_of_a_users_linen_model_are_its_layers_in_order():
    sites = find_sites(linen(), X)
    assert list(sites) == ["Conv_0", "Dense_0", "Dense_1"]
    assert sites["Conv_0"].shape == (6, 8, 8, 4)
    assert [s.kind for s in sites.values()] == ["conv", "dense", "dense"]
    assert [s.index for s in sites.values()] == [0, 1, 2]


def test_sites_of_nnx_equinox_and_the_builtin_lenet(lenet):
    nnx_model = from_nnx(NnxMLP(nnx.Rngs(1)), sample=X)
    assert list(find_sites(nnx_model, X)) == ["hidden", "out"]
    eqx_model = from_equinox(EqxMLP(KEY), sample=X)
    assert list(find_sites(eqx_model, X)) == ["layers/0", "layers/1"]
    images = jnp.zeros((3, 28, 28, 1))
    sites = find_sites(lenet, images)
    assert list(sites) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert sites["conv1"].shape == (3, 24, 24, 6)


@pytest.mark.parametrize("corruption", ["flip", "zero", "noise"])
def test_amount_zero_is_the_clean_model_bit_for_bit(corruption):
    model = linen()
    faults = make_activation_faults(corruption)
    clean = jax.jit(model.forward)(model.params, X)
    faulty = jax.jit(lambda r: faults.apply(model, KEY, r)(model.params, X))
    # A rate of 0 selects nothing and jnp.where passes every site value
    # through; the program is fused differently, so the outputs may differ
    # in their last bits (float32 rounding of the same operations).
    atol = 16 * np.finfo(np.float32).eps * float(jnp.max(jnp.abs(clean)))
    np.testing.assert_allclose(faulty(0.0), clean, rtol=0, atol=atol)
    assert not np.array_equal(faulty(0.5), clean)


def test_a_sweep_over_rates_compiles_once():
    model = linen()
    faults = make_activation_faults("flip", bits="exponent")
    traces = []

    def run(rates):
        traces.append(1)
        return jax.vmap(lambda r: faults.apply(model, KEY, r)(
            model.params, X))(rates)

    compiled = jax.jit(run)
    compiled(jnp.array([0.0, 1e-3]))
    compiled(jnp.array([1e-2, 1e-1]))
    assert len(traces) == 1


def test_exact_faults_hit_exactly_their_count_at_each_site():
    model = linen(Single())
    faults = make_activation_faults("zero", mode="exact")
    out = faults.apply(model, KEY, 0.25)(model.params, X)
    assert int(jnp.sum(out == 0)) == int(0.25 * out.size)


def test_transient_faults_change_per_batch_permanent_ones_do_not():
    model = linen(Single())
    rows = jnp.broadcast_to(X[:1], X.shape)  # six copies of one example
    transient = make_activation_faults("zero", mode="exact")
    permanent = make_activation_faults("zero", mode="exact",
                                       persistence="permanent")
    apply = transient.apply(model, KEY, 0.3)
    first, second = apply(model.params, rows, 0), apply(model.params, rows, 1)
    assert not np.array_equal(first == 0, second == 0)
    np.testing.assert_array_equal(apply(model.params, rows, 1), second)
    hit = permanent.apply(model, KEY, 0.3)(model.params, rows, 4) == 0
    # The same units of every example, 3 of the 10 outputs each.
    np.testing.assert_array_equal(hit, jnp.broadcast_to(hit[:1], hit.shape))
    assert int(hit[0].sum()) == 3
    np.testing.assert_array_equal(
        permanent.apply(model, KEY, 0.3)(model.params, rows, 0) == 0, hit)


def test_evaluate_draws_transient_faults_afresh_per_batch():
    model = linen(Single())
    images = jnp.broadcast_to(X[:1], (2, 6) + X.shape[1:])
    batches = Batches(images, jnp.zeros((2, 6), jnp.int32),
                      jnp.ones((2, 6), jnp.float32))
    seen = []
    faults = make_activation_faults("zero", mode="exact")
    apply = faults.apply(model, KEY, 0.3)

    def recording(params, x, batch=0):
        seen.append(batch)
        return apply(params, x, batch)
    recording.takes_batch = True
    metrics = evaluate(recording, model.params, batches, 10)
    assert int(metrics.count) == 12 and len(seen) >= 1
    # The first batch is batch 0 and the second batch 1, as apply() sees.
    expected = [apply(model.params, images[i], i) for i in range(2)]
    hits = sum(int(jnp.sum(jnp.argmax(e, -1) == 0)) for e in expected)
    assert int(metrics.correct) == hits


def test_the_clean_path_compiles_to_the_same_program():
    model = linen()
    batches = Batches(X[None], jnp.zeros((1, 6), jnp.int32),
                      jnp.ones((1, 6), jnp.float32))

    def clean_text():
        return jax.jit(lambda p: evaluate(model.forward, p, batches, 10)
                       ).lower(model.params).as_text()

    before = clean_text()
    assert start_totals(model.forward, model.params, batches,
                        10).batches is None
    faults = make_activation_faults("flip")
    faulty = jax.jit(lambda p: evaluate(faults.apply(model, KEY, 0.1), p,
                                        batches, 10)).lower(model.params)
    assert faulty.as_text() != before
    assert clean_text() == before


def test_a_sweep_of_activation_faults_has_the_clean_row_at_rate_zero():
    model = linen()
    split = recovjax.Split(np.asarray(X), np.arange(6, dtype=np.int32) % 10)
    result = recovjax.sweep(model, model.params,
                            damages={"act": make_activation_faults("flip")},
                            ratios=[0.0, 0.05], seeds=[0], data=split,
                            root_key=0, batch_size=3)
    rows = {(r["damage"], r["ratio"]): r["value"] for r in result.table.rows
            if r["metric"] == "loss"}
    assert rows[("act", 0.0)] == rows[("none", 0.0)]
    assert rows[("act", 0.05)] != rows[("none", 0.0)]


def test_errors_say_what_is_wrong():
    model = linen()
    with pytest.raises(ValueError, match="corruption must be one of"):
        make_activation_faults("melt")
    with pytest.raises(ValueError, match="persistence must be one of"):
        make_activation_faults(persistence="sometimes")
    with pytest.raises(ValueError, match="no site 'Dense_7'; its sites are "
                       "Conv_0, Dense_0, Dense_1"):
        make_activation_faults(sites=["Dense_7"]).apply(model, KEY, 0.1)(
            model.params, X)
    with pytest.raises(ValueError, match="matches no site"):
        make_activation_faults(sites="embedding").apply(model, KEY, 0.1)(
            model.params, X)
    with pytest.raises(ValueError, match="rate"):
        make_activation_faults().apply(model, KEY, 1.5)
    with pytest.raises(TypeError, match="do not damage parameters"):
        make_activation_faults()(KEY, model.params, 0.1)
    with pytest.raises(TypeError, match="sites must be"):
        make_activation_faults(sites=3)


def test_sites_by_predicate_and_regex():
    sites = find_sites(linen(), X)
    assert [s.layer for s in activations.choose_sites(
        sites, lambda s: s.kind == "dense")] == ["Dense_0", "Dense_1"]
    assert [s.layer for s in activations.choose_sites(
        sites, "Dense_.*")] == ["Dense_0", "Dense_1"]
    assert [s.layer for s in activations.choose_sites(
        sites, "conv")] == ["Conv_0"]


def test_range_restriction_recovers_exponent_flips(lenet, trained_lenet,
                                                   small_mnist):
    from recovjax.data import batch_split
    profile = batch_split(small_mnist.train, 100)
    evaluation = batch_split(small_mnist.test, 100)
    bounds = activations.profile_ranges(lenet, trained_lenet, profile)
    assert list(bounds.low) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert all(bounds.low[k] < 0 < bounds.high[k] for k in bounds.low)

    def accuracy(apply):
        return float(jax.jit(lambda p: evaluate(apply, p, evaluation, 10)
                             .accuracy)(trained_lenet))

    clean = accuracy(lenet.forward)
    # Restriction alone changes no clean prediction of the profiled data's
    # distribution on these examples.
    assert abs(accuracy(bounds.apply(lenet)) - clean) <= 1 / 200 + 1e-6
    faults = make_activation_faults("flip", bits=30)
    hit = accuracy(faults.apply(lenet, KEY, 1e-3))
    restored = accuracy(faults.protected(bounds).apply(lenet, KEY, 1e-3))
    assert hit < clean - 0.3
    assert restored - hit > 0.8 * (clean - hit)


def test_range_restriction_modes_and_errors():
    model = linen()
    split = Batches(X[None], jnp.zeros((1, 6), jnp.int32),
                    jnp.ones((1, 6), jnp.float32))
    bounds = activations.profile_ranges(model, model.params, split,
                                        sites=["Dense_0"], mode="zero")
    value = jnp.array([bounds.low["Dense_0"] - 1.0, 0.0, jnp.nan,
                       bounds.high["Dense_0"] + 1.0])
    np.testing.assert_array_equal(bounds.restrict(value, "Dense_0"),
                                  [0.0, 0.0, 0.0, 0.0])
    clip = activations.RangeRestriction(bounds.low, bounds.high, "clip")
    np.testing.assert_array_equal(
        clip.restrict(value, "Dense_0"),
        np.asarray([bounds.low["Dense_0"], 0.0, 0.0, bounds.high["Dense_0"]],
                   np.float32))
    with pytest.raises(ValueError, match="mode must be one of"):
        activations.profile_ranges(model, model.params, split, mode="wrap")
    with pytest.raises(TypeError, match="restriction must be a "
                       "RangeRestriction"):
        make_activation_faults().protected({"Dense_0": (0, 1)})
    other = activations.RangeRestriction({"fc9": 0.0}, {"fc9": 1.0})
    with pytest.raises(ValueError, match="no site 'fc9'"):
        other.apply(model)(model.params, X)


def _bit_changes(before, after):
    a = np.asarray(before, np.float32).view(np.uint32)
    b = np.asarray(after, np.float32).view(np.uint32)
    return np.unpackbits((a ^ b).view(np.uint8)).reshape(a.shape + (32,)
                                                          ).sum(-1)


@pytest.mark.parametrize("max_rate", [None, 0.05])
def test_value_mode_flips_one_eligible_bit_of_each_hit_value(max_rate):
    model = linen(Single())
    clean = model.forward(model.params, X)
    faults = make_activation_faults("flip", bits="exponent",
                                    max_rate=max_rate)
    out = faults.apply(model, KEY, 0.05)(model.params, X, 3)
    changes = _bit_changes(clean, out)
    assert set(np.unique(changes)) <= {0, 1}
    flipped = (np.asarray(clean).view(np.uint32)
               ^ np.asarray(out).view(np.uint32))[changes == 1]
    exponent = np.uint32(0xFF << 23)
    assert np.all(flipped & ~exponent == 0)


def test_sparse_faults_hit_values_at_the_rate():
    # 20 draws of 6 x 10 outputs at rate 0.2: about 240 hits of 1,200.
    model = linen(Single())
    clean = model.forward(model.params, X)
    faults = make_activation_faults("zero", max_rate=0.5)
    apply = jax.jit(lambda batch: faults.apply(model, KEY, 0.2)(
        model.params, X, batch))
    hits = sum(int(jnp.sum((apply(b) == 0) & (clean != 0)))
               for b in range(20))
    # Binomial(1200, 0.2): sd 13.9.
    assert abs(hits - 240) < 5 * 13.9
    np.testing.assert_array_equal(
        faults.apply(model, KEY, 0.0)(model.params, X), clean)
    every = make_activation_faults("zero", max_rate=1.0)
    assert not np.any(np.asarray(every.apply(model, KEY, 1.0)(
        model.params, X)))
    with pytest.raises(ValueError, match="above max_rate=0.5"):
        faults.apply(model, KEY, 0.6)
    with pytest.raises(ValueError, match="max_rate .* needs mode='value'"):
        make_activation_faults("noise", max_rate=0.1)
    with pytest.raises(ValueError, match="max_rate must be a rate"):
        make_activation_faults(max_rate=0.0)


def test_mixed_faults_weights_and_a_model_per_layer(lenet, trained_lenet,
                                                    small_mnist):
    from recovjax.damage import make_bit_position_flip, mix
    model = linen()
    zero_fc = make_activation_faults("zero", sites=["Dense_0"], mode="exact")
    negate_conv = make_activation_faults("sign_flip", sites="conv",
                                         mode="exact")
    both = mix(zero_fc, negate_conv)
    # Each part hits its own layer: the composed hooks run both.
    out = both.apply(model, KEY, 0.5)(model.params, X)
    alone = zero_fc.apply(model, jax.random.fold_in(KEY, 1), 0.5)(
        model.params, X)
    assert not np.array_equal(out, alone)
    np.testing.assert_allclose(
        both.apply(model, KEY, 0.0)(model.params, X),
        jax.jit(model.forward)(model.params, X), rtol=0, atol=1e-5)
    # Weights damaged in the same point: the largest weight's exponent bit,
    # with activation faults at rate 0 (scale 0), equals the weight damage.
    weights = make_bit_position_flip(scope="weights")
    mixed = mix(make_activation_faults("flip"), weights=weights,
                scales=(1.0, 0.0))
    result = recovjax.sweep(lenet, trained_lenet,
                            damages={"mixed": mixed, "alone": weights},
                            ratios=[30], seeds=[0], data=small_mnist.test,
                            root_key=0, batch_size=100)
    accuracy = {r["damage"]: r["value"] for r in result.table.rows
                if r["metric"] == "accuracy"}
    assert accuracy["mixed"] == accuracy["alone"] < accuracy["none"] - 0.2
    with pytest.raises(ValueError, match="at least one part"):
        mix()
    with pytest.raises(TypeError, match="is not activation faults"):
        mix(weights)
    with pytest.raises(ValueError, match="scales: one per part"):
        mix(zero_fc, scales=(1.0, 2.0))
