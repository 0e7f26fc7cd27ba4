"""Tests of recovjax.models.transformer: shapes, causality, head layout."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _tolerance import assert_sums_close
from recovjax.models.transformer import (CausalSelfAttention, TransformerLM,
                                         init_apply)

TINY = dict(vocab_size=257, max_length=16, depth=2, dim=32, num_heads=4,
            mlp_dim=64)


def _random_params(module, tokens, seed=0):
    """Parameters of ``module`` drawn with NumPy: no PRNG program to compile
    (threefry takes seconds to compile on a small CPU). Kernels have the
    scale of a fan-in initialiser; biases and norms are non-zero, so that
    the head slices of the biases and the shared ``out/bias`` matter."""
    init, _ = init_apply(module)
    shapes = jax.eval_shape(init, jax.random.key(0), tokens)
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        names = [getattr(entry, "key", "") for entry in path]
        normal = rng.normal(size=shape.shape).astype(np.float32)
        if names[-1] == "kernel":
            fan_in = (shape.shape[0] if names[-2] in ("query", "key", "value")
                      else math.prod(shape.shape[:-1]))
            return jnp.asarray(normal / math.sqrt(fan_in))
        if names[-1] == "scale":
            return jnp.asarray(1 + 0.1 * normal)
        return jnp.asarray(0.1 * normal)  # biases, embeddings, positions

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
    module = TransformerLM(**TINY)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 257, (3, 16)),
                         jnp.int32)
    return jax.jit(init_apply(module)[1]), _random_params(module,
                                                          tokens), tokens


def test_shapes_and_parameter_layout(tiny):
    apply, params, tokens = tiny
    init, _ = init_apply(TransformerLM(**TINY))
    assert jax.tree.map(jnp.shape, jax.eval_shape(
        init, jax.random.key(0), tokens)) == jax.tree.map(jnp.shape, params)
    assert apply(params, tokens).shape == (3, 16, 257)
    assert apply(params, tokens[:, :5]).shape == (3, 5, 257)
    assert set(params) == {"embed", "position", "block0", "block1", "norm",
                           "head"}
    attention = params["block1"]["attention"]
    for name in ("query", "key", "value"):
        assert attention[name]["kernel"].shape == (32, 4, 8)
        assert attention[name]["bias"].shape == (4, 8)
    assert attention["out"]["kernel"].shape == (4, 8, 32)
    assert attention["out"]["bias"].shape == (32,)
    assert params["embed"]["embedding"].shape == (257, 32)
    assert params["position"].shape == (16, 32)
    assert params["head"]["kernel"].shape == (32, 257)  # untied
    assert set(params["block0"]) == {"norm1", "attention", "norm2", "mlp1",
                                     "mlp2"}


def test_default_configuration():
    init, _ = init_apply(TransformerLM())
    shapes = jax.eval_shape(init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 128), jnp.int32))
    assert [f"block{i}" in shapes for i in range(5)] == [True] * 4 + [False]
    assert shapes["block3"]["attention"]["query"]["kernel"].shape == (
        128, 4, 32)
    assert shapes["block3"]["mlp1"]["kernel"].shape == (128, 512)
    assert shapes["head"]["kernel"].shape == (128, 257)


def test_bad_inputs_name_the_argument(tiny):
    apply, params, tokens = tiny
    with pytest.raises(ValueError, match="tokens: length 17 exceeds "
                       "max_length=16"):
        apply(params, jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(TypeError, match="tokens: must be integer ids"):
        apply(params, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"tokens: expected int\[batch, "
                       "length\]"):
        apply(params, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="num_heads: 3 heads do not divide "
                       "the width 32"):
        CausalSelfAttention(3).init(jax.random.key(0), jnp.zeros((1, 2, 32)))


def test_logits_at_earlier_positions_ignore_later_tokens(tiny):
    apply, params, tokens = tiny
    base = np.asarray(apply(params, tokens))
    for t in (0, 6, 15):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % 257)
        logits = np.asarray(apply(params, changed))
        # Exact: a later position's attention weight is exactly zero.
        np.testing.assert_array_equal(logits[:, :t], base[:, :t])
        assert np.all(np.abs(logits[:, t] - base[:, t]).max(axis=-1) > 0)


def _layer_norm(params, x):
    return nn.LayerNorm().apply({"params": params}, x)


def _reference(params, tokens, removed=frozenset()):
    """The transformer written out by hand, leaving out the heads in
    ``removed`` (pairs ``(block, head)``) from each attention's output sum.

    Returns the logits and the float64 sum of absolute terms of each logit
    (``|norm(x)| @ |W_head| + |b_head|``), for the tolerance.
    """
    length = tokens.shape[1]
    x = params["embed"]["embedding"][tokens] + params["position"][:length]
    block = 0
    while f"block{block}" in params:
        layer = params[f"block{block}"]
        attention = layer["attention"]
        h = _layer_norm(layer["norm1"], x)
        q, k, v = (jnp.einsum("btd,dhe->bthe", h, attention[n]["kernel"])
                   + attention[n]["bias"] for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(q.shape[-1])
        causal = np.tril(np.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), -1)
        heads = jnp.einsum("bhqk,bkhe->bqhe", weights, v)
        out = attention["out"]["bias"]
        for head in range(q.shape[2]):
            if (block, head) not in removed:
                out = out + heads[:, :, head] @ attention["out"]["kernel"][
                    head]
        x = x + out
        h = _layer_norm(layer["norm2"], x)
        h = nn.gelu(h @ layer["mlp1"]["kernel"] + layer["mlp1"]["bias"])
        x = x + h @ layer["mlp2"]["kernel"] + layer["mlp2"]["bias"]
        block += 1
    x = _layer_norm(params["norm"], x)
    kernel, bias = params["head"]["kernel"], params["head"]["bias"]
    magnitude = (np.abs(np.asarray(x, np.float64))
                 @ np.abs(np.asarray(kernel, np.float64))
                 + np.abs(np.asarray(bias, np.float64)))
    return x @ kernel + bias, magnitude


# Reduction lengths of the chain (see _tolerance): per block the q/k/v
# projections (32 + 1), the scores (8), the softmax and weighted values
# (16 + 16), the output (32 + 1), two layer norms (2 x 32 x 2), the MLP
# (32 + 1, 64 + 1); then the final norm (64) and the head (32 + 1), and a
# few elementwise functions (exp, gelu, rsqrt) on the way.
CHAIN_TERMS = 2 * (33 + 8 + 32 + 33 + 128 + 33 + 65) + 64 + 33 + 10


def test_reference_computes_the_model(tiny):
    apply, params, tokens = tiny
    expected, magnitude = _reference(params, tokens)
    assert_sums_close(apply(params, tokens), expected, terms=CHAIN_TERMS,
                      magnitude=magnitude)


@pytest.mark.parametrize("block, head", [(0, 0), (1, 2)])
def test_zeroing_a_head_removes_exactly_its_contribution(tiny, block, head):
    apply, params, tokens = tiny
    name = f"block{block}"
    attention = dict(params[name]["attention"])
    for projection in ("query", "key", "value"):
        attention[projection] = {
            "kernel": attention[projection]["kernel"].at[:, head].set(0),
            "bias": attention[projection]["bias"].at[head].set(0)}
    attention["out"] = {
        "kernel": attention["out"]["kernel"].at[head].set(0),
        "bias": attention["out"]["bias"]}  # shared by every head: kept
    damaged = {**params, name: {**params[name], "attention": attention}}
    got = apply(damaged, tokens)
    expected, magnitude = _reference(params, tokens, {(block, head)})
    assert_sums_close(got, expected, terms=CHAIN_TERMS, magnitude=magnitude)
    # The head mattered: the intact model is far from the damaged one.
    intact, _ = _reference(params, tokens)
    assert np.abs(np.asarray(intact - got)).max() > 1e3 * (
        np.abs(np.asarray(expected - got)).max() + 1e-30)


@pytest.mark.slow
def test_a_short_training_run_beats_a_unigram_model(tmp_path):
    """200 Adam steps of a 2-block, width-48 LM on 64-byte windows of the
    stdlib corpus; its test perplexity must be well below that of the
    training text's byte frequencies (about 9-11 against 23 here)."""
    import optax

    from recovjax.data.text import load_text, shuffled_token_batches
    from recovjax.data.text import batch_tokens
    from recovjax.tasks import evaluate_task, language_model, mean_loss

    corpus = load_text(sequence_length=64, data_dir=tmp_path)
    task = language_model(corpus.vocab_size)
    init, apply = init_apply(TransformerLM(max_length=64, depth=2, dim=48,
                                           num_heads=4, mlp_dim=96))
    train_tokens = jnp.asarray(corpus.train.tokens)
    train_mask = jnp.asarray(corpus.train.mask)
    params = jax.jit(init)(jax.random.key(0), train_tokens[:1, :-1])
    optimizer = optax.adam(3e-3)
    steps, batch_size = 200, 32

    @jax.jit
    def fit(key, params):
        def step(state, key):
            params, opt_state = state
            rows = jax.random.randint(key, (batch_size,), 0,
                                      train_tokens.shape[0])
            batch = {"tokens": train_tokens[rows], "mask": train_mask[rows]}
            loss, grad = jax.value_and_grad(
                lambda p: mean_loss(task, apply, p, batch))(params)
            updates, opt_state = optimizer.update(grad, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(
            step, (params, optimizer.init(params)),
            jax.random.split(key, steps))
        return params, losses

    params, losses = fit(jax.random.key(1), params)
    test = evaluate_task(task, apply, params,
                         batch_tokens(corpus.test, 128))
    # Unigram model of the training bytes (add-one smoothing), on the test
    # targets.
    train_targets = corpus.train.tokens[:, 1:][corpus.train.mask[:, 1:]]
    counts = np.bincount(train_targets, minlength=256) + 1.0
    log_probs = np.log(counts / counts.sum())
    test_targets = corpus.test.tokens[:, 1:][corpus.test.mask[:, 1:]]
    unigram = math.exp(-log_probs[test_targets].mean())
    assert int(test["count"]) == test_targets.size
    assert float(losses[-20:].mean()) < float(losses[:20].mean())
    assert float(test["perplexity"]) < 0.8 * unigram, (
        float(test["perplexity"]), unigram)
    # The shuffled batches are what a longer recipe would scan over.
    epoch = shuffled_token_batches(jax.random.key(2), train_tokens,
                                   train_mask, 128)
    assert int(epoch["mask"][:, :, 1:].sum()) == train_targets.size
