"""The zoo's language model: pretrained on real text, damaged, recovered.

A small recipe (2 blocks of width 32 on 32-byte windows) keeps the test
fast; the default zoo entry is the same code with 4 blocks of width 128.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import recovjax
from recovjax import checkpoints, language
from recovjax.damage import get_damage
from recovjax.data import text
from recovjax.models import get_model
from recovjax.recovery import make_finetune

RECIPE = language.SMALL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    zoo = tmp_path_factory.mktemp("zoo")
    model, path = language.load_pretrained_lm(seed=0, recipe=RECIPE,
                                              zoo_dir=zoo, progress=False)
    corpus = text.load_text(sequence_length=RECIPE.sequence_length,
                            max_file_bytes=RECIPE.max_file_bytes)
    return model, path, corpus, zoo


def test_pretrained_lm_beats_a_unigram_model(pretrained):
    model, path, corpus, _ = pretrained
    metadata = checkpoints.read_metadata(path)
    unigram = language.unigram_perplexity(corpus.train, corpus.test)
    assert metadata["unigram_perplexity"] == pytest.approx(unigram)
    measured = language.test_metrics(model, corpus)["perplexity"]
    assert measured == pytest.approx(metadata["test"]["perplexity"],
                                     rel=1e-5)
    assert measured < 0.8 * unigram


def test_head_removal_raises_perplexity_and_finetuning_lowers_it(pretrained):
    model, _, corpus, _ = pretrained
    batches = text.batch_tokens(corpus.test, 128)
    result = recovjax.sweep(model, model.params, damages=["remove_heads"],
                            ratios=[0.0, 0.5], seeds=2, data=batches,
                            root_key=0)
    perplexity = {}
    for row in result.table.rows:
        if row["metric"] == "perplexity" and row["stage"] == "damaged":
            perplexity.setdefault(row["ratio"], []).append(row["value"])
    assert min(perplexity[0.5]) > 1.2 * max(perplexity[0.0])
    damage = get_damage("remove_heads")(jax.random.key(0), model.params, 0.5,
                                        info=model.info)
    train = {"tokens": jnp.asarray(corpus.train.tokens),
             "mask": jnp.asarray(corpus.train.mask)}
    recover = jax.jit(make_finetune(model.forward, optax.adam(1e-3),
                                    steps=20, batch_size=32, task=model.task,
                                    eval_every=10))
    out = recover(jax.random.key(0), damage.params, damage.mask, train, None,
                  jnp.ones(train["tokens"].shape[0]), batches, damage.mask)
    losses = np.asarray(out.curve.loss)
    assert losses[-1] < losses[0]
    # removed heads stay removed
    assert jax.tree.all(jax.tree.map(
        lambda p, m: not np.asarray(p)[np.asarray(m)].any(), out.params,
        damage.mask))


def test_lm_is_a_registered_model_with_a_task():
    model = get_model("lm", 257, sample=jax.ShapeDtypeStruct((1, 16),
                                                              jnp.int32))
    assert model.task.name == "language_model"
    assert model.num_classes == 257
    heads = [path for path, info in model.infos.items()
             if info.head_axis is not None]
    assert "block0/attention/query/kernel" in heads


def test_every_strategy_recovers_the_lm_on_its_task(pretrained):
    from recovjax.recovery import get_strategy, make_task
    model, path, corpus, _ = pretrained
    test = text.batch_tokens(corpus.test, 128)
    train = {"tokens": jnp.asarray(corpus.train.tokens[:256]),
             "mask": jnp.asarray(corpus.train.mask[:256])}
    task = make_task(model, train, checkpoint=path, eval_batches=test)
    op = get_damage("remove_heads")
    keys = jax.random.split(jax.random.key(0), 2)
    damaged = jax.vmap(lambda key: op(key, model.params, 0.5,
                                      info=model.info))(keys)
    clean = language.test_metrics(model, corpus)["loss"]
    options = dict(steps=8, batch_size=32, optimizer="adam",
                   learning_rate=1e-3, momentum=None)
    for name, kw in [("finetune", dict(options, structural=True)),
                     ("distill", options), ("rebuild_reinit", options),
                     ("restore_entries", {}), ("detect_restore", {})]:
        outcome = get_strategy(name, **kw)(keys, recovjax.Damage(
            damaged.params, damaged.mask), task)
        loss = np.asarray(outcome.curve.loss)
        assert np.isfinite(loss).all(), name
        if name.startswith("restore") or name.startswith("detect"):
            np.testing.assert_allclose(loss[:, -1], clean, rtol=1e-5)
        else:
            assert loss.shape == (2, 2)
            assert (loss[:, -1] < loss[:, 0]).all(), name


def test_lm_config_reports_perplexity(pretrained, tmp_path):
    from recovjax.config import load_config
    from recovjax.experiment import run_experiment
    model, _, corpus, zoo = pretrained
    path = tmp_path / "lm.yaml"
    path.write_text("""
name: lm
model: lm_small
dataset: pysource
dataset_options: {sequence_length: 32, max_file_bytes: 4096}
damage:
  - kind: remove_heads
    ratios: [0.5]
sweep: {seeds: 1}
evaluate: {batch_size: 128}
recovery:
  optimizer: {name: adam, learning_rate: 0.001, momentum: null}
  batch_size: 32
  epochs: null
  steps: 10
  eval_every: 5
  strategies: [finetune, restore_entries]
""")
    table = run_experiment(load_config(path), tmp_path / "run",
                           zoo_dir=zoo, progress=False)
    values = {(row["stage"], row["step"]): row["value"] for row in table.rows
              if row["metric"] == "perplexity"}
    clean = values[("clean", 0)]
    assert clean == pytest.approx(
        language.test_metrics(model, corpus)["perplexity"], rel=1e-5)
    assert values[("damaged", 0)] > 1.2 * clean
    assert values[("recovered/finetune", 10)] < values[("damaged", 0)]
    assert values[("recovered/restore_entries", 0)] == pytest.approx(
        clean, rel=1e-6)
    assert "test perplexity" in (tmp_path / "run" / "report.md").read_text()
