"""The zoo's byte-level language model: a decoder-only transformer on Python.

``lm`` is :class:`~recovjax.models.transformer.TransformerLM` (4 blocks,
width 128, 4 heads) wrapped by :func:`~recovjax.models.from_linen` with the
``language_model`` task, and registered as a model name like the image
networks. It is pretrained on the ``pysource`` corpus (the Python standard
library's own source files, read at run time; see
:mod:`recovjax.data.text`) and kept in the zoo as a verified Orbax
checkpoint. Its metadata records the test perplexity and that of a unigram
(byte frequency) model of the training text, the baseline a language model
must beat.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recovjax import checkpoints, tasks
from recovjax._checks import check_seed
from recovjax._progress import Progress
from recovjax._types import PRNGKey
from recovjax.data import text
from recovjax.models import Model, from_linen, register_model
from recovjax.models.transformer import TransformerLM

NAME = "lm"
CORPUS = text.NAME
RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LMRecipe:
    """How the language model is built and pretrained (Adam, fixed epochs).

    Attributes:
        depth, dim, num_heads, mlp_dim: the transformer.
        sequence_length: tokens the model reads per window.
        epochs: passes over the training windows.
        batch_size: windows per step.
        learning_rate: Adam's step size.
        max_file_bytes: bytes read from each source file.
    """

    depth: int = 4
    dim: int = 128
    num_heads: int = 4
    mlp_dim: int = 512
    sequence_length: int = 128
    epochs: int = 6
    batch_size: int = 32
    learning_rate: float = 2e-3
    max_file_bytes: int = text.DEFAULT_MAX_FILE_BYTES

    def describe(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), optimizer="adam",
                    recipe_version=RECIPE_VERSION)


def task() -> tasks.Task:
    """The ``language_model`` task over bytes and the pad id."""
    return tasks.get_task("language_model", vocab_size=text.VOCAB_SIZE,
                          pad_id=text.PAD_ID)


def build_lm(recipe: LMRecipe = LMRecipe()) -> Model:
    """The language model's definition (abstract parameters)."""
    network = TransformerLM(vocab_size=text.VOCAB_SIZE,
                            max_length=recipe.sequence_length,
                            depth=recipe.depth, dim=recipe.dim,
                            num_heads=recipe.num_heads,
                            mlp_dim=recipe.mlp_dim)
    sample = jax.ShapeDtypeStruct((1, recipe.sequence_length), jnp.int32)
    variables = jax.eval_shape(lambda: network.init(
        jax.random.key(0), jnp.zeros(sample.shape, sample.dtype)))
    return from_linen(network, variables, sample=sample, task=task(),
                      name=NAME)


SMALL = LMRecipe(depth=2, dim=32, num_heads=4, mlp_dim=64, sequence_length=32,
                 epochs=3, batch_size=32, max_file_bytes=4096)
"""``lm_small``: 2 blocks of width 32 on 32-byte windows (about a minute of
pretraining on 2 CPU cores)."""

RECIPES = {NAME: LMRecipe(), f"{NAME}_small": SMALL}
"""The registered language models and their recipes."""


def _recipe_for(name: str, sample: Any) -> LMRecipe:
    recipe = RECIPES[name]
    shape = getattr(sample, "shape", ())
    if len(shape) == 2:
        recipe = dataclasses.replace(recipe, sequence_length=int(shape[1]))
    return recipe


def _registered(name: str):
    def factory(num_classes: int, sample: jax.ShapeDtypeStruct) -> Model:
        if num_classes != text.VOCAB_SIZE:
            raise ValueError(f"{name} predicts {text.VOCAB_SIZE} token ids, "
                             f"not {num_classes} classes")
        if len(sample.shape) != 2 or not jnp.issubdtype(sample.dtype,
                                                        jnp.integer):
            raise ValueError(f"{name} reads int32[batch, length] token "
                             f"windows, not {sample.dtype}"
                             f"{list(sample.shape)} (use a text dataset, "
                             f"e.g. {CORPUS!r})")
        return dataclasses.replace(build_lm(_recipe_for(name, sample)),
                                   name=name)

    def pretrained(model: Model, *, seed: int, zoo_dir=None, data_dir=None,
                   progress: bool = True) -> pathlib.Path:
        recipe = _recipe_for(name, model.sample)
        return load_pretrained_lm(seed=seed, recipe=recipe, zoo_dir=zoo_dir,
                                  data_dir=data_dir, progress=progress)[1]

    return factory, pretrained


for _name in RECIPES:
    _factory, _loader = _registered(_name)
    register_model(_name, _factory, pretrained=_loader)


def unigram_perplexity(train: text.TextSplit, test: text.TextSplit) -> float:
    """Perplexity on ``test`` of byte frequencies counted on ``train``.

    Add-one smoothed over the 256 byte values; targets are every real token
    after the first of a window, as the language-model task counts them.
    """
    def targets(split):
        tokens = np.asarray(split.tokens)[:, 1:]
        return tokens[np.asarray(split.mask)[:, 1:] > 0]

    counts = np.bincount(targets(train), minlength=256)[:256] + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(np.exp(-log_probs[targets(test)].mean()))


def _train(key: PRNGKey, model: Model, corpus: text.TextDataset,
           recipe: LMRecipe, progress: bool) -> tuple[Any, list[float]]:
    lm_task = model.task
    optimizer = optax.adam(recipe.learning_rate)
    tokens = jnp.asarray(corpus.train.tokens)
    mask = jnp.asarray(corpus.train.mask)

    def step(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(
            lambda p: tasks.mean_loss(lm_task, model.forward, p, batch))(
                params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def epoch(params, opt_state, key):
        batches = text.shuffled_token_batches(key, tokens, mask,
                                              recipe.batch_size)
        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state), batches)
        return params, opt_state, losses.mean()

    init_key, order_key = jax.random.split(key)
    params = model.init(init_key)
    opt_state = optimizer.init(params)
    losses = []
    report = Progress(f"pretrain {NAME}", unit="epoch", enabled=progress,
                      leave=False)
    for index in range(recipe.epochs):
        params, opt_state, loss = epoch(params, opt_state,
                                        jax.random.fold_in(order_key, index))
        losses.append(float(loss))
        report(f"loss={losses[-1]:.4f}", index + 1, recipe.epochs)
    report.close()
    return params, losses


def test_metrics(model: Model, corpus: text.TextDataset,
                 batch_size: int = 64) -> dict[str, float]:
    """Test loss, perplexity and token accuracy of ``model``."""
    batches = text.batch_tokens(corpus.test, batch_size)
    metrics = jax.jit(lambda p: tasks.evaluate_task(
        model.task, model.forward, p, batches))(model.params)
    return {name: float(metrics[name])
            for name in ("loss", "perplexity", "accuracy")}


def pretrain_lm(*, seed: int, directory: os.PathLike[str] | str | None
                = None, recipe: LMRecipe = LMRecipe(), data_dir=None,
                progress: bool = True, overwrite: bool = False) -> Model:
    """Pretrain the language model from scratch and save it to Orbax.

    Args:
        seed: integer seed (initialisation and data order).
        directory: where to save the checkpoint; ``None`` saves nothing.
        recipe: the model and its training.
        data_dir: where the corpus is prepared.
        progress: show progress.
        overwrite: replace an existing checkpoint.

    Returns:
        The trained :class:`~recovjax.models.Model`.

    Raises:
        FileExistsError: if ``directory`` holds a checkpoint (checked before
            training) and ``overwrite`` is false.
        TypeError, ValueError: for a bad seed.
    """
    seed = check_seed(seed)
    if directory is not None and pathlib.Path(directory).exists() and (
            not overwrite):
        raise FileExistsError(f"{directory}: a checkpoint already exists; "
                              "refusing to overwrite it")
    corpus = text.load_text(sequence_length=recipe.sequence_length,
                            max_file_bytes=recipe.max_file_bytes,
                            data_dir=data_dir)
    definition = build_lm(recipe)
    start = time.perf_counter()
    params, losses = _train(jax.random.key(seed), definition, corpus, recipe,
                            progress)
    model = definition.with_params(jax.device_get(params))
    metadata = {"model": NAME, "dataset": CORPUS, "seed": seed,
                **recipe.describe(), "train_loss": losses,
                "train_seconds": round(time.perf_counter() - start, 3),
                "test": test_metrics(model, corpus),
                "unigram_perplexity": unigram_perplexity(corpus.train,
                                                         corpus.test)}
    if directory is not None:
        checkpoints.save_checkpoint(directory, model.params, metadata,
                                    step=recipe.epochs, overwrite=overwrite)
    return model


def load_pretrained_lm(*, seed: int = 0, recipe: LMRecipe = LMRecipe(),
                       zoo_dir=None, data_dir=None, progress: bool = True
                       ) -> tuple[Model, pathlib.Path]:
    """The pretrained language model from the zoo, pretraining on first use.

    Returns:
        ``(model, checkpoint directory)``.
    """
    from recovjax import _paths
    seed = check_seed(seed)
    tag = "-".join(f"{value}" for value in (
        recipe.depth, recipe.dim, recipe.num_heads, recipe.mlp_dim,
        recipe.sequence_length, recipe.epochs, recipe.batch_size,
        recipe.learning_rate, recipe.max_file_bytes))
    path = _paths.zoo_dir(zoo_dir) / (
        f"{NAME}-{CORPUS}-seed{seed}-{tag}-r{RECIPE_VERSION}")
    if not path.exists():
        try:
            pretrain_lm(seed=seed, directory=path, recipe=recipe,
                        data_dir=data_dir, progress=progress)
        except FileExistsError:
            pass  # Another process finished first.
    definition = build_lm(recipe)
    checkpoints.verify_files(path, contents=True)
    params, _ = checkpoints.restore_checkpoint(path,
                                               definition.abstract_params())
    return definition.with_params(params), path
