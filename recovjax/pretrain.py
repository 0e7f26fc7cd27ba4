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
from typing import Any, NamedTuple

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
from recovjax.models.adapter import require_model

logger = logging.getLogger(__name__)

RECIPE_VERSION = 3
"""Bumped whenever the default recipe or the models' arithmetic changes (the
same recipe then trains different bits), so the zoo never serves stale
weights."""

TRAIN_MODE_STREAM = 0x7EA1
"""``fold_in`` tag of the pretraining key's training-mode stream (dropout and
any other randomness of the model's training mode), kept apart from the
initialisation and data-order keys."""


SCHEDULES = ("constant", "cosine")
"""Learning-rate schedules a :class:`Recipe` can name."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a model is pretrained (Adam, fixed epochs).

    Attributes:
        epochs: passes over the training split.
        batch_size: examples per step.
        learning_rate: Adam's (peak) learning rate.
        schedule: ``"constant"``, or ``"cosine"``: the learning rate decays
            from ``learning_rate`` to zero over all the steps of all the
            epochs along a half cosine.
    """

    epochs: int = 12
    batch_size: int = 50
    learning_rate: float = 1e-3
    schedule: str = "constant"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of "
                             f"{', '.join(SCHEDULES)}, got {self.schedule!r}")

    def describe(self) -> dict[str, Any]:
        return {"optimizer": "adam", "learning_rate": self.learning_rate,
                "schedule": self.schedule, "batch_size": self.batch_size,
                "epochs": self.epochs}

    def optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        """Adam with this recipe's learning rate (schedule) for an epoch of
        ``steps_per_epoch`` steps."""
        return _adam(float(self.learning_rate), self.schedule,
                     self.decay_steps(steps_per_epoch))

    def decay_steps(self, steps_per_epoch: int) -> int:
        """Steps the learning rate decays over (0 for a constant one)."""
        if self.schedule == "constant":
            return 0
        return int(self.epochs) * int(steps_per_epoch)


def _adam(learning_rate: float, schedule: str, decay_steps: int
          ) -> optax.GradientTransformation:
    if schedule == "cosine":
        return optax.adam(optax.cosine_decay_schedule(learning_rate,
                                                      decay_steps))
    return optax.adam(learning_rate)


DEFAULT_RECIPES: dict[str, Recipe] = {
    "lenet5": Recipe(epochs=15, batch_size=32, learning_rate=1e-3),
    "mlp": Recipe(epochs=15, batch_size=32, learning_rate=1e-3),
    "rescnn": Recipe(epochs=12, batch_size=50, learning_rate=2e-3),
    "vit": Recipe(epochs=20, batch_size=50, learning_rate=1e-3),
    "resnet18": Recipe(epochs=5, batch_size=100, learning_rate=1e-3,
                       schedule="cosine"),
}


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Pretrained parameters, the model state, and where they are stored.

    Attributes:
        params: the parameters.
        metadata: the checkpoint's metadata (model, dataset, seed, recipe,
            test accuracy, versions, digests).
        path: the Orbax checkpoint directory.
        state: the model state trained with them (batch statistics); empty
            for a model without state.
    """

    params: Params
    metadata: dict[str, Any]
    path: pathlib.Path
    state: Any = dataclasses.field(default_factory=dict)

    def attach(self, model: Model) -> Model:
        """``model`` (a definition of the same network) holding these
        parameters and this state.

        Raises:
            TypeError: if ``model`` is not a :class:`~recovjax.models.Model`.
            ValueError: if the parameters do not fit ``model``, or
                ``model``'s state is only shapes and there is no state
                here to give it.
        """
        model = require_model(model).with_params(self.params)
        if self.state:
            return model.with_state(self.state)
        if any(isinstance(leaf, jax.ShapeDtypeStruct)
               for leaf in jax.tree.leaves(model.state)):
            raise ValueError(f"state: model {model.name!r} has state (batch "
                             "statistics) and these pretrained weights come "
                             "without any")
        return model


class Trained(NamedTuple):
    """What :func:`train` returns.

    Attributes:
        params: the trained parameters.
        state: the model state after training (batch statistics updated by
            every step); empty for a model without state.
        losses: the mean training loss of every epoch.
    """

    params: Params
    state: Any
    losses: list[float]


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
def _make_epoch(model: Model, learning_rate: float, schedule: str,
                decay_steps: int, batch_size: int):
    """One compiled epoch: shuffle, then every step inside ``lax.scan``.

    Every step runs the model in training mode (``model.apply(...,
    train=True, key=...)``): batch statistics come from the batch and the
    updated state is carried from step to step; the step's key seeds
    dropout. Cached per (model, optimizer, batch size), so repeated
    pretraining in one process compiles once.
    """
    optimizer = _adam(learning_rate, schedule, decay_steps)

    def loss_fn(params, state, images, labels, weights, key):
        logits, state = model.apply(params, state, images, train=True,
                                    key=key)
        losses = cross_entropy(logits, labels)
        return (jnp.sum(losses * weights) / jnp.maximum(weights.sum(), 1.0),
                state)

    def step(carry, batch):
        params, state, opt_state = carry
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), state, opt_state), loss

    @jax.jit
    def epoch(params, state, opt_state, order_key, mode_key, images, labels):
        weights = jnp.ones(labels.shape, jnp.float32)
        batches = shuffled_batches(order_key, images, labels, weights,
                                   batch_size)
        step_keys = jax.random.split(mode_key, batches.labels.shape[0])
        (params, state, opt_state), losses = jax.lax.scan(
            step, (params, state, opt_state),
            (batches.images, batches.labels, batches.mask, step_keys))
        return params, state, opt_state, losses.mean()

    return epoch


def initial_state(key: PRNGKey, model: Model) -> Any:
    """The state a model starts training from (initial batch statistics).

    Args:
        key: the initialisation key (the one ``model.init`` gets).
        model: the model.

    Returns:
        ``model.init_state(key)`` where the model has one, otherwise
        ``model.state``; empty for a model without state.

    Raises:
        ValueError: if the model's state is only shapes
            (``jax.ShapeDtypeStruct``) and it has no ``init_state``.
    """
    if model.init_state is not None:
        return model.init_state(key)
    if any(isinstance(leaf, jax.ShapeDtypeStruct)
           for leaf in jax.tree.leaves(model.state)):
        raise ValueError(f"model: the state of {model.name!r} (batch "
                         "statistics) is only shapes and the model has no "
                         "init_state to draw it from; give it its initial "
                         "state with model.with_state(...)")
    return model.state


def train(key: PRNGKey, model: Model, dataset: Dataset, recipe: Recipe, *,
          progress: bool = True) -> Trained:
    """Initialise and train ``model`` on ``dataset.train``.

    Every step runs the model in training mode: a model with state (batch
    norm) normalises with the batch's statistics and updates its running
    ones, which :attr:`Trained.state` returns; dropout draws from
    ``fold_in(key, TRAIN_MODE_STREAM)``. For a model without state or
    dropout, training mode computes exactly what evaluation mode does.

    Args:
        key: initialisation, data-order and training-mode key.
        model: the model.
        dataset: the data.
        recipe: epochs, batch size, learning rate (schedule).
        progress: show a progress bar.

    Returns:
        :class:`Trained` ``(params, state, losses)``; the mean training
        loss of every epoch is read back once per epoch (never per step).

    Raises:
        ValueError: for a model whose state cannot be initialised (see
            :func:`initial_state`).
    """
    init_key, order_key = jax.random.split(key)
    mode_root = jax.random.fold_in(key, TRAIN_MODE_STREAM)
    images = jnp.asarray(dataset.train.images)
    labels = jnp.asarray(dataset.train.labels)
    params = model.init(init_key, images[:1])
    state = initial_state(init_key, model)
    steps_per_epoch = -(-labels.shape[0] // recipe.batch_size)
    opt_state = recipe.optimizer(steps_per_epoch).init(params)
    epoch = _make_epoch(model, float(recipe.learning_rate), recipe.schedule,
                        recipe.decay_steps(steps_per_epoch),
                        int(recipe.batch_size))
    losses = []
    report = Progress(f"pretrain {model.name}", unit="epoch",
                      enabled=progress, leave=False)
    for index in range(recipe.epochs):
        params, state, opt_state, loss = epoch(
            params, state, opt_state, jax.random.fold_in(order_key, index),
            jax.random.fold_in(mode_root, index), images, labels)
        losses.append(float(loss))
        report(f"loss={losses[-1]:.4f}", index + 1, recipe.epochs)
    report.close()
    return Trained(params, state, losses)


def test_accuracy(model: Model, params: Params, dataset: Dataset,
                  batch_size: int = 500, *, state: Any = None) -> float:
    """Accuracy of ``params`` on the whole test split, in evaluation mode.

    Args:
        model: the model.
        params: its parameters.
        dataset: the data.
        batch_size: evaluation batch size.
        state: the model state to evaluate with (the batch statistics
            trained with ``params``); ``None`` uses ``model.state``.
    """
    batches = batch_split(dataset.test, batch_size)
    state = model.state if state is None else state
    metrics = _evaluate_program(model, dataset.num_classes)(params, state,
                                                            batches)
    return float(metrics.accuracy)


@functools.lru_cache(maxsize=32)
def _evaluate_program(model: Model, num_classes: int):
    def run(params, state, batches):
        return evaluate(lambda p, x: model.apply(p, state, x)[0], params,
                        batches, num_classes)

    return jax.jit(run)


def pretrain(model: Model | str, dataset: Dataset | str, *, seed: int,
             directory: os.PathLike[str] | str | None = None,
             recipe: Recipe | None = None, progress: bool = True,
             overwrite: bool = False, data_dir=None) -> Pretrained:
    """Train a model from scratch and save it as an Orbax checkpoint.

    The checkpoint holds the parameters and the model state trained with
    them (batch statistics); ``test_accuracy`` in the metadata is measured
    in evaluation mode with that state.

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
        :class:`Pretrained` (``path`` is ``None`` when nothing was saved),
        with the trained ``state``.

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
    params, state, losses = train(jax.random.key(seed), model, dataset,
                                  recipe, progress=progress)
    seconds = time.perf_counter() - start
    metadata = {
        "model": model.name,
        "dataset": dataset.name,
        "seed": int(seed),
        **recipe.describe(),
        "recipe_version": RECIPE_VERSION,
        "train_loss": losses,
        "test_accuracy": test_accuracy(model, params, dataset, state=state),
        "train_seconds": round(seconds, 3),
        "versions": library_versions(),
    }
    path = None
    if directory is not None:
        path = checkpoints.save_checkpoint(directory, params, metadata,
                                           step=recipe.epochs,
                                           overwrite=overwrite, state=state)
    return Pretrained(params=params, metadata=metadata, path=path,
                      state=state)


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
        :class:`Pretrained` restored from the checkpoint on disk: the
        parameters and the model state (batch statistics) saved with them;
        :meth:`Pretrained.attach` puts both into a model.

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
    definition = get_model(model, sample=zoo_sample(dataset, data_dir))
    try:
        pretrained = read_pretrained(path, definition)
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
        pretrained = read_pretrained(path, definition)
    if not (path / checkpoints.FILES_MANIFEST).is_file():
        # An entry saved before checkpoints listed their files: its leaves
        # just verified, so record its files for the cheap check next time.
        with contextlib.suppress(OSError):
            checkpoints.record_files(path)
    return pretrained


def read_pretrained(path: os.PathLike[str] | str, model: Model
                    ) -> Pretrained:
    """A pretrained checkpoint of ``model``, verified in full.

    Every file is hashed against the checkpoint's file list (zoo
    checkpoints are small: this catches bit rot before Orbax's reader
    threads trip over it), then the parameters and, for a model with
    state, the state are restored and checked against their SHA-256.

    Args:
        path: the checkpoint directory (a zoo entry or another pretrained
            checkpoint written by :func:`pretrain` or a registered loader).
        model: the definition fixing the expected parameters and state
            (shapes are enough).

    Returns:
        :class:`Pretrained` with the parameters, metadata, path and state.

    Raises:
        recovjax.CheckpointError: missing, damaged or mismatched files,
            parameters or state (a model with state and a checkpoint
            without any included).
    """
    path = pathlib.Path(path)
    checkpoints.verify_files(path, contents=True)
    params, metadata = checkpoints.restore_checkpoint(
        path, model.abstract_params())
    state = checkpoints.restore_state(path, model.state)
    return Pretrained(params=params, metadata=metadata, path=path,
                      state=state)


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
