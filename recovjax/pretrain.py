"""Pretraining with optax, saved to Orbax, and the cached zoo of pretrained weights."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import pathlib
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from recovjax import _paths, checkpoints
from recovjax._checks import check_seed
from recovjax._io import move_aside
from recovjax._progress import Progress
from recovjax._types import Dataset, Params, PRNGKey
from recovjax.data import batch_split, load_dataset, shuffled_batches
from recovjax.evaluate import cross_entropy, evaluate
from recovjax.models import Model, get_model

logger = logging.getLogger(__name__)

RECIPE_VERSION = 3
"""Bumped whenever the default recipe or the models' arithmetic changes (the
same recipe then trains different bits), so the zoo never serves stale
weights."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a model is pretrained (Adam, fixed epochs)."""

    epochs: int = 12
    batch_size: int = 50
    learning_rate: float = 1e-3

    def describe(self) -> dict[str, Any]:
        return {"optimizer": "adam", "learning_rate": self.learning_rate,
                "batch_size": self.batch_size, "epochs": self.epochs}


DEFAULT_RECIPES: dict[str, Recipe] = {
    "lenet5": Recipe(epochs=15, batch_size=32, learning_rate=1e-3),
    "mlp": Recipe(epochs=15, batch_size=32, learning_rate=1e-3),
    "rescnn": Recipe(epochs=12, batch_size=50, learning_rate=2e-3),
    "vit": Recipe(epochs=20, batch_size=50, learning_rate=1e-3),
}


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Pretrained parameters and where they are stored.

    Attributes:
        params: the parameters.
        metadata: the checkpoint's metadata (model, dataset, seed, recipe,
            test accuracy, versions, digests).
        path: the Orbax checkpoint directory.
    """

    params: Params
    metadata: dict[str, Any]
    path: pathlib.Path


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries results depend on."""
    import importlib.metadata as md
    versions = {"python": platform.python_version()}
    for name in ("recovjax", "jax", "jaxlib", "flax", "optax",
                 "orbax-checkpoint", "tensorflow-datasets", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@functools.lru_cache(maxsize=32)
def _make_epoch(model: Model, learning_rate: float, batch_size: int):
    """One compiled epoch: shuffle, then every step inside ``lax.scan``.

    Cached per (model, learning rate, batch size), so repeated pretraining
    in one process compiles once.
    """
    optimizer = optax.adam(learning_rate)

    def loss_fn(params, images, labels, weights):
        losses = cross_entropy(model.forward(params, images), labels)
        return jnp.sum(losses * weights) / jnp.maximum(weights.sum(), 1.0)

    def step(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def epoch(params, opt_state, key, images, labels):
        weights = jnp.ones(labels.shape, jnp.float32)
        batches = shuffled_batches(key, images, labels, weights, batch_size)
        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state),
            (batches.images, batches.labels, batches.mask))
        return params, opt_state, losses.mean()

    return epoch


def train(key: PRNGKey, model: Model, dataset: Dataset, recipe: Recipe, *,
          progress: bool = True) -> tuple[Params, list[float]]:
    """Initialise and train ``model`` on ``dataset.train``.

    Args:
        key: initialisation and data-order key.
        model: the model.
        dataset: the data.
        recipe: epochs, batch size, learning rate.
        progress: show a progress bar.

    Returns:
        ``(params, epoch_losses)``; the mean training loss of every epoch is
        read back once per epoch (never per step).
    """
    init_key, order_key = jax.random.split(key)
    images = jnp.asarray(dataset.train.images)
    labels = jnp.asarray(dataset.train.labels)
    params = model.init(init_key, images[:1])
    opt_state = optax.adam(recipe.learning_rate).init(params)
    epoch = _make_epoch(model, float(recipe.learning_rate),
                        int(recipe.batch_size))
    losses = []
    report = Progress(f"pretrain {model.name}", unit="epoch",
                      enabled=progress, leave=False)
    for index in range(recipe.epochs):
        params, opt_state, loss = epoch(
            params, opt_state, jax.random.fold_in(order_key, index),
            images, labels)
        losses.append(float(loss))
        report(f"loss={losses[-1]:.4f}", index + 1, recipe.epochs)
    report.close()
    return params, losses


def test_accuracy(model: Model, params: Params, dataset: Dataset,
                  batch_size: int = 500) -> float:
    """Accuracy of ``params`` on the whole test split."""
    batches = batch_split(dataset.test, batch_size)
    metrics = _evaluate_program(model, dataset.num_classes)(params, batches)
    return float(metrics.accuracy)


@functools.lru_cache(maxsize=32)
def _evaluate_program(model: Model, num_classes: int):
    return jax.jit(functools.partial(evaluate, model.forward,
                                     num_classes=num_classes))


def pretrain(model: Model | str, dataset: Dataset | str, *, seed: int,
             directory: os.PathLike[str] | str | None = None,
             recipe: Recipe | None = None, progress: bool = True,
             overwrite: bool = False, data_dir=None) -> Pretrained:
    """Train a model from scratch and save it as an Orbax checkpoint.

    Args:
        model: a :class:`~recovjax.models.Model` or registry name.
        dataset: a loaded :class:`~recovjax.Dataset` or registry name.
        seed: integer seed (converted to a key here, at the API boundary).
        directory: where to save; ``None`` saves nothing.
        recipe: training recipe; defaults to the model's entry in
            :data:`DEFAULT_RECIPES`.
        progress: show a progress bar.
        overwrite: replace an existing checkpoint at ``directory``.
        data_dir: data directory for a dataset given by name.

    Returns:
        :class:`Pretrained` (``path`` is ``None`` when nothing was saved).

    Raises:
        FileExistsError: if ``directory`` holds a checkpoint and ``overwrite``
            is false (checked before training).
        TypeError: if ``seed`` is not an int.
        ValueError: if ``seed`` lies outside ``[0, 2**31)``.
    """
    if isinstance(model, str):
        model = get_model(model)
    if isinstance(dataset, str):
        dataset = load_dataset(dataset, data_dir=data_dir)
    if model.num_classes != dataset.num_classes:
        raise ValueError(f"model {model.name!r} has {model.num_classes} "
                         f"classes but dataset {dataset.name!r} has "
                         f"{dataset.num_classes}")
    seed = check_seed(seed)
    recipe = recipe or DEFAULT_RECIPES.get(model.name, Recipe())
    if directory is not None and pathlib.Path(directory).exists() and (
            not overwrite):
        raise FileExistsError(f"{directory}: a checkpoint already exists; "
                              "refusing to overwrite it")
    start = time.perf_counter()
    params, losses = train(jax.random.key(seed), model, dataset, recipe,
                           progress=progress)
    seconds = time.perf_counter() - start
    metadata = {
        "model": model.name,
        "dataset": dataset.name,
        "seed": int(seed),
        **recipe.describe(),
        "recipe_version": RECIPE_VERSION,
        "train_loss": losses,
        "test_accuracy": test_accuracy(model, params, dataset),
        "train_seconds": round(seconds, 3),
        "versions": library_versions(),
    }
    path = None
    if directory is not None:
        path = checkpoints.save_checkpoint(directory, params, metadata,
                                           step=recipe.epochs,
                                           overwrite=overwrite)
    return Pretrained(params=params, metadata=metadata, path=path)


def zoo_path(model: str, dataset: str, seed: int,
             zoo_dir: os.PathLike[str] | str | None = None) -> pathlib.Path:
    """Where the zoo keeps pretrained ``model`` on ``dataset`` with ``seed``."""
    return _paths.zoo_dir(zoo_dir) / (
        f"{model}-{dataset}-seed{seed}-r{RECIPE_VERSION}")


def load_pretrained(model: str, dataset: str = "mnist5k", *, seed: int = 0,
                    zoo_dir=None, data_dir=None, progress: bool = True
                    ) -> Pretrained:
    """Pretrained weights from the zoo, pretraining them on first use.

    Args:
        model: model name (see :func:`recovjax.models.model_names`).
        dataset: dataset name.
        seed: pretraining seed.
        zoo_dir: zoo root (default ``~/.cache/recovjax/zoo``, or under
            ``$RECOVJAX_CACHE_DIR``).
        data_dir: data directory for the dataset.
        progress: show a progress bar when pretraining.

    Returns:
        :class:`Pretrained` restored from the checkpoint on disk.

    An entry that is there but cannot be used (truncated or changed files,
    leaves failing their SHA-256, another model's tree) is moved aside to
    ``<entry>.corrupt-<UTC time>`` and pretrained again with the same seed
    (the same weights on the same machine); a warning on the
    ``recovjax.pretrain`` logger says so in one line naming both paths.

    Raises:
        TypeError: if ``seed`` is not an int.
        ValueError: if ``seed`` lies outside ``[0, 2**31)`` (checked before
            anything is pretrained or cached).
    """
    seed = check_seed(seed)
    network = get_model(model)
    path = zoo_path(model, dataset, seed, zoo_dir)
    if not path.exists():
        _pretrain_into(network, dataset, seed, path, progress, data_dir)
    abstract = get_model(model, sample=zoo_sample(dataset, data_dir)
                         ).abstract_params()
    try:
        # Zoo checkpoints are small: hashing their files too catches bit rot
        # before Orbax's reader threads trip over it.
        checkpoints.verify_files(path, contents=True)
        params, metadata = checkpoints.restore_checkpoint(path, abstract)
    except checkpoints.CheckpointError as error:
        # A zoo entry is a cache: a damaged one is moved aside (kept for
        # inspection, never deleted) and rebuilt; same seed, same weights.
        try:
            moved = move_aside(path)
        except FileNotFoundError:
            pass  # Another process moved it first and is rebuilding it.
        else:
            logger.warning("%s", _rebuild_message(path, moved, error))
        _pretrain_into(network, dataset, seed, path, progress, data_dir)
        params, metadata = checkpoints.restore_checkpoint(path, abstract)
    if not (path / checkpoints.FILES_MANIFEST).is_file():
        # An entry saved before checkpoints listed their files: its leaves
        # just verified, so record its files for the cheap check next time.
        with contextlib.suppress(OSError):
            checkpoints.record_files(path)
    return Pretrained(params=params, metadata=metadata, path=path)


def _pretrain_into(network: Model, dataset: str, seed: int,
                   path: pathlib.Path, progress: bool, data_dir) -> None:
    try:
        pretrain(network, dataset, seed=seed, directory=path,
                 progress=progress, data_dir=data_dir)
    except FileExistsError:
        pass  # Another process finished first; use its checkpoint.


def zoo_sample(dataset: str, data_dir=None) -> Any:
    """One input of ``dataset`` (or its shape), to build a model's tree."""
    if dataset in ("mnist5k", "mnist", "fashion_mnist"):
        return jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    return jnp.asarray(load_dataset(dataset, data_dir=data_dir)
                       .test.images[:1])


def _rebuild_message(path: pathlib.Path, moved: pathlib.Path,
                        error: Exception) -> str:
    """The one line said when a damaged zoo entry is moved and rebuilt."""
    reason = " ".join(str(error).split())
    prefix = f"{path}: "
    if reason.startswith(prefix):
        reason = reason[len(prefix):]
    if len(reason) > 300:
        reason = reason[:297] + "..."
    return (f"zoo checkpoint {path} is unusable ({reason}); moved "
            f"it to {moved} and pretraining it again")
