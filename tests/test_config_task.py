"""Tasks from a config: a token dataset, a language-model task, perplexity.

A user's own linen language model (an embedding and a dense layer) reads an
``.npz`` archive of token windows; the config names the task. The run goes
through damage, evaluation, recovery and the report with perplexity as its
headline, and every problem with the task, the data or their options is a
``ConfigError`` that names the key.
"""

from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import pytest

from recovjax.config import ConfigError, load_config
from recovjax.experiment import run_experiment
from recovjax.validation import check_config

VOCAB = 12

MODULE = textwrap.dedent(f"""
    import flax.linen as nn
    import jax, jax.numpy as jnp
    from recovjax.models import from_linen
    from recovjax.tasks import get_task

    class Bigram(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            return nn.Dense({VOCAB})(nn.Embed({VOCAB}, 8)(tokens))

    def _model(task):
        sample = jnp.zeros((1, 8), jnp.int32)
        return from_linen(Bigram(), Bigram().init(jax.random.key(0), sample),
                          sample=sample, name="bigram", task=task)

    def with_task():
        return _model(get_task("language_model", vocab_size={VOCAB}))

    def without_task():
        return _model("classification")
""")


@pytest.fixture()
def user(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "tokennets.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(package))
    rng = np.random.default_rng(0)
    # A predictable next token (3 t + 1 mod V) with 10 % noise: a bigram
    # model learns it within a few steps.
    tokens = np.zeros((40, 9), np.int64)
    tokens[:, 0] = rng.integers(0, VOCAB, 40)
    for t in range(1, 9):
        noise = rng.random(40) < 0.1
        tokens[:, t] = np.where(noise, rng.integers(0, VOCAB, 40),
                                (3 * tokens[:, t - 1] + 1) % VOCAB)
    data = tmp_path / "tokens.npz"
    np.savez(data, tokens=tokens)
    yield tmp_path, data
    sys.modules.pop("tokennets", None)


def _config(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path)


def _values(rows, **where):
    return [row["value"] for row in rows
            if all(row[key] == value for key, value in where.items())]


@pytest.mark.parametrize("factory, task", [
    ("with_task", ""),
    ("without_task",
     f"task: language_model\ntask_options: {{vocab_size: {VOCAB}}}"),
])
def test_language_model_task_runs_from_a_config(user, factory, task):
    tmp_path, data = user
    config = _config(tmp_path, f"""
        name: tokens
        model: tokennets:{factory}
        dataset: {data}
        {task.replace(chr(10), chr(10) + ' ' * 8)}
        damage:
          - kind: zero
            ratios: [0.5]
        sweep: {{seeds: 2}}
        evaluate: {{batch_size: 4}}
        recovery:
          strategies: [finetune, distill, restore_entries]
          optimizer: {{name: adam, learning_rate: 0.05, momentum: null}}
          batch_size: 8
          epochs: null
          steps: 12
          eval_every: 6
        report: {{threshold: 0.9}}
        """)
    check_config(config)
    table = run_experiment(config, tmp_path / "run", progress=False,
                           zoo_dir=tmp_path / "zoo")
    rows = table.rows
    clean = _values(rows, stage="clean", metric="perplexity")
    loss = _values(rows, stage="clean", metric="loss")
    assert len(clean) == 1 and clean[0] == pytest.approx(math.exp(loss[0]),
                                                         rel=1e-6)
    damaged = _values(rows, stage="damaged", metric="perplexity")
    assert len(damaged) == 2 and all(value != clean[0] for value in damaged)
    # Restoring the damaged entries gives back the clean model exactly.
    restored = _values(rows, stage="recovered/restore_entries",
                       metric="perplexity")
    assert restored == [clean[0]] * 2
    # Recovery curves report perplexity at every point, and training on
    # the task's loss lowers it.
    for strategy in ("finetune", "distill"):
        stage = f"recovered/{strategy}"
        steps = sorted({row["step"] for row in rows if row["stage"] == stage
                        and row["metric"] == "perplexity"})
        assert steps == [0, 6, 12]
        for seed in (0, 1):
            first = _values(rows, stage=stage, metric="perplexity",
                            seed=seed, step=0)
            last = _values(rows, stage=stage, metric="perplexity", seed=seed,
                           step=12)
            assert last[0] < first[0]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Clean (pretrained) test perplexity: **" in report
    assert (tmp_path / "run" / "perplexity_vs_ratio.png").is_file()


@pytest.mark.parametrize("text, message", [
    ("dataset_options: {sequence_length: 8}",
     r"dataset_options: dataset '.*tokens.npz' takes no options"),
    ("task: nosuchtask", "task: unknown task 'nosuchtask'"),
    ("task_options: {vocab_size: 12}",
     "task_options: give them with a task name"),
    ("task: language_model\ntask_options: {vocab: 12}",
     "task: task 'language_model'.*vocab"),
    ("task: language_model\ntask_options: {vocab_size: 5}",
     "task: .*vocab_size: the model gives logits of shape"),
    ("recovery: {data: {damage: drop_samples, amount: 0.5}}",
     "recovery.data.damage: data damage applies to image classification"),
])
def test_task_and_data_mistakes_name_their_key(user, text, message):
    tmp_path, data = user
    body = text.replace("\n", "\n" + " " * 8)
    config = _config(tmp_path, f"""
        model: tokennets:with_task
        dataset: {data}
        {body}
        """)
    with pytest.raises(ConfigError, match=message):
        check_config(config)


def test_a_classifier_on_token_windows_is_refused(user):
    tmp_path, data = user
    config = _config(tmp_path, f"""
        model: tokennets:without_task
        dataset: {data}
        """)
    with pytest.raises(ConfigError, match="task: .*token windows.*classifier"):
        check_config(config)


def test_text_corpus_options_are_checked_before_loading(tmp_path):
    config = _config(tmp_path, """
        model: lm_small
        dataset: pysource
        dataset_options: {sequence_length: 16, windows: 3}
        """)
    with pytest.raises(ConfigError, match="dataset_options: 'pysource' takes "
                       "sequence_length, max_file_bytes, not windows"):
        check_config(config)
    config = _config(tmp_path, """
        dataset_options: {sequence_length: 16}
        """)
    with pytest.raises(ConfigError, match="dataset_options: dataset "
                       "'mnist5k' takes no options"):
        check_config(config)


def test_token_archives_are_checked(tmp_path):
    from recovjax.data import load_arrays
    from recovjax.data.arrays import ArraysError
    path = tmp_path / "bad.npz"
    np.savez(path, tokens=np.zeros((10, 4), np.float32))
    with pytest.raises(ArraysError, match="tokens must be an integer array"):
        load_arrays(path)
    np.savez(path, tokens=np.zeros((10, 4), np.int32),
             mask=np.ones((10, 3), bool))
    with pytest.raises(ArraysError, match=r"mask \[8, 3\] must have the "
                       r"shape of tokens \[8, 4\]"):
        load_arrays(path)
    np.savez(path, train_tokens=np.zeros((6, 4), np.int32),
             test_tokens=np.full((2, 4), 7, np.int32))
    dataset = load_arrays(path, num_classes=9)
    assert (dataset.vocab_size, dataset.sequence_length) == (9, 3)
    assert dataset.pad_id is None and len(dataset.test) == 2
    with pytest.raises(ArraysError, match=r"token ids must lie in \[0, 5\)"):
        load_arrays(path, num_classes=5)
