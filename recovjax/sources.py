"""What a config's ``model``, ``weights`` and ``dataset`` name, resolved.

A config names

* a model: a registered name (``lenet5``, or one given to
  :func:`~recovjax.models.register_model`), or a factory by import path,
  ``my_package.nets:make_model``, called without arguments and returning a
  :class:`~recovjax.models.Model`;
* optionally its weights: an Orbax checkpoint directory, a ``.safetensors``
  file or an ``.npz`` archive (``weights_layout: torch`` reads PyTorch's
  names and layouts through :func:`recovjax.weights.torch_mapping`);
* a dataset: a registered name, a text corpus (``pysource``, with
  ``dataset_options``), or an ``.npz`` archive of ``images`` and ``labels``
  or of ``tokens`` (:func:`recovjax.data.load_arrays`);
* optionally a task (``task``, ``task_options``): a registered
  :mod:`recovjax.tasks` name; by default the model's own.

Relative paths are read from the working directory. The same functions
serve the config checks (before anything runs) and the run itself, so the
two cannot disagree.
"""

from __future__ import annotations

import importlib
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from recovjax import checkpoints
from recovjax._types import Split
from recovjax.models import Model, get_model
from recovjax.models.saving import load_weights, save_pretrained

LAYOUTS = ("native", "torch")


def is_import_path(spec: str) -> bool:
    """Whether a config's ``model`` is ``module.path:callable``."""
    return isinstance(spec, str) and ":" in spec


def is_array_file(spec: str) -> bool:
    """Whether a config's ``dataset`` is an ``.npz`` archive."""
    return isinstance(spec, str) and spec.lower().endswith(".npz")


def import_model(spec: str) -> Model:
    """Call the factory ``module.path:callable`` and return its model.

    Raises:
        ValueError: if the module cannot be imported, has no such
            attribute, or the callable does not return a Model (the message
            names the import path).
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{spec!r}: an import path is 'module.path:"
                         "callable'")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module may raise anything
        raise ValueError(f"{spec!r}: cannot import {module_name!r} "
                         f"({type(error).__name__}: {error})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"{spec!r}: module {module_name!r} has no callable "
                         f"{attribute!r}")
    try:
        model = factory()
    except Exception as error:
        raise ValueError(f"{spec!r}: the factory raised "
                         f"{type(error).__name__}: {error}") from None
    if not isinstance(model, Model):
        raise ValueError(f"{spec!r}: the factory returned "
                         f"{type(model).__name__}, not a recovjax Model "
                         "(build one with from_linen, from_nnx, "
                         "from_equinox or from_apply)")
    return model


def is_text(spec: str) -> bool:
    """Whether a config's ``dataset`` names a text corpus."""
    from recovjax.data.text import text_names
    return spec in text_names()


def resolve_dataset(spec: str, data_dir=None,
                    options: dict[str, Any] | None = None):
    """The dataset a config names: a registered name, a text corpus or an
    ``.npz`` archive (of images and labels, or of token windows).

    Returns:
        A :class:`~recovjax.Dataset`, or a
        :class:`~recovjax.data.text.TextDataset` of token windows.

    Raises:
        ValueError: options for a dataset that takes none, or an option the
            corpus does not take (the message lists those it does); what the
            loaders raise.
    """
    from recovjax.data import load_arrays, load_dataset
    from recovjax.data.text import load_text
    options = dict(options or {})
    if is_text(spec):
        accepted = ("sequence_length", "max_file_bytes")
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"dataset_options: {spec!r} takes "
                             f"{', '.join(accepted)}, not "
                             f"{', '.join(unknown)}")
        return load_text(spec, data_dir=data_dir, **options)
    if options:
        raise ValueError(f"dataset_options: dataset {spec!r} takes no "
                         f"options, got {', '.join(sorted(options))}")
    if is_array_file(spec):
        return load_arrays(spec)
    return load_dataset(spec, data_dir=data_dir)


def is_tokens(dataset: Any) -> bool:
    """Whether a resolved dataset holds token windows (not images)."""
    from recovjax.data.text import TextDataset
    return isinstance(dataset, TextDataset)


def dataset_sample(spec: str, data_dir=None,
                   options: dict[str, Any] | None = None
                   ) -> tuple[jax.ShapeDtypeStruct, int]:
    """``(one model input, number of classes)`` of a config's dataset.

    The input is ``float32[1, ...]`` for images and ``int32[1, T]`` for
    token windows (whose "classes" are the vocabulary).
    """
    from recovjax.data.loading import dataset_features
    if is_array_file(spec) or is_text(spec) or options:
        return dataset_sample_of(resolve_dataset(spec, data_dir, options))
    shape, classes = dataset_features(spec, data_dir=data_dir)
    return jax.ShapeDtypeStruct((1, *shape), jnp.float32), classes


def dataset_sample_of(dataset: Any) -> tuple[jax.ShapeDtypeStruct, int]:
    """``(one model input, number of classes)`` of a resolved dataset."""
    if is_tokens(dataset):
        return (jax.ShapeDtypeStruct((1, dataset.sequence_length),
                                     jnp.int32), dataset.vocab_size)
    return (jax.ShapeDtypeStruct((1, *dataset.input_shape), jnp.float32),
            dataset.num_classes)


def subset(split: Split, count: int | None) -> Split:
    """The first ``count`` examples of a split (all of them for ``None``)."""
    if count is None or count >= len(split):
        return split
    return Split(split.images[:count], split.labels[:count])


def task_examples(dataset, split, count: int | None) -> dict[str, Any]:
    """A split as a task's batch dict of ``[N, ...]`` arrays.

    Token windows give ``{"tokens", "mask"}``; images ``{"images",
    "labels", "mask"}``. ``count`` keeps the first examples.
    """
    if is_tokens(dataset):
        end = len(split) if count is None else min(count, len(split))
        return {"tokens": jnp.asarray(split.tokens[:end]),
                "mask": jnp.asarray(split.mask[:end])}
    split = subset(split, count)
    return {"images": jnp.asarray(split.images),
            "labels": jnp.asarray(split.labels),
            "mask": jnp.ones(split.labels.shape, bool)}


def task_batches(dataset, split, batch_size: int, count: int | None
                 ) -> dict[str, Any]:
    """A split as a task's fixed-shape stacked batches (padding masked)."""
    if is_tokens(dataset):
        from recovjax.data.text import batch_tokens
        if count is not None and count < len(split):
            split = split._replace(**{name: getattr(split, name)[:count]
                                      for name in split._fields})
        pad = dataset.pad_id if dataset.pad_id is not None else 0
        return batch_tokens(split, batch_size, pad_id=pad)
    from recovjax.data import batch_split
    return batch_split(subset(split, count), batch_size)._asdict()


def resolve_model(spec: str, num_classes: int,
                  sample: jax.ShapeDtypeStruct) -> Model:
    """The model (definition or with weights) a config's ``model`` names,
    for inputs like ``sample``."""
    if is_import_path(spec):
        return import_model(spec)
    return get_model(spec, num_classes, sample=sample)


def resolve_task(model: Model, name: str | None,
                 options: dict[str, Any] | None = None) -> Model:
    """``model`` with the task a config names (unchanged for ``None``).

    Raises:
        ValueError, TypeError: as :func:`recovjax.tasks.get_task`, or
            options without a task name.
    """
    import dataclasses
    from recovjax.tasks import get_task
    if name is None:
        if options:
            raise ValueError("task_options: give them with a task name "
                             "(task: ...)")
        return model
    return dataclasses.replace(model, task=get_task(name, **(options or {})))


def with_weights(model: Model, weights: str | None, layout: str = "native"
                 ) -> Model:
    """``model`` with the weights a config names (unchanged without any).

    Raises:
        ValueError: for an unknown layout.
        FileNotFoundError, recovjax.weights.WeightsError,
            recovjax.CheckpointError: as :func:`~recovjax.models.saving.
            load_weights`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"weights_layout must be one of "
                         f"{', '.join(LAYOUTS)}, got {layout!r}")
    if weights is None:
        return model
    mapping = None
    if layout == "torch":
        from recovjax.weights import torch_mapping
        mapping = torch_mapping(model.abstract_params())
    return load_weights(model, weights, mapping=mapping)


def has_weights(model: Model) -> bool:
    """Whether the model holds real parameters (not only their shapes)."""
    return not any(isinstance(leaf, jax.ShapeDtypeStruct)
                   for leaf in jax.tree.leaves(model.params))


def user_checkpoint(model: Model, zoo_dir=None) -> pathlib.Path:
    """A verified checkpoint of a user's weights, for restore strategies.

    Kept in the zoo under the weights' digest, so a rerun reuses it and
    other weights never collide with it.
    """
    import hashlib
    from recovjax import _paths
    digest = hashlib.sha256("".join(
        f"{path}:{value}" for path, value in sorted(
            checkpoints.leaf_digests(model.params).items())).encode())
    path = _paths.zoo_dir(zoo_dir) / "user" / (
        f"{model.name}-{digest.hexdigest()[:16]}")
    if not path.exists():
        try:
            save_pretrained(model, path, {"source": "config"})
        except FileExistsError:
            pass  # Another process wrote the same weights first.
    checkpoints.verify_files(path, contents=True)
    return path


__all__ = ["LAYOUTS", "dataset_sample", "dataset_sample_of", "has_weights",
           "import_model", "is_array_file", "is_import_path", "is_text",
           "is_tokens", "resolve_dataset", "resolve_model", "resolve_task",
           "subset", "task_batches", "task_examples", "user_checkpoint",
           "with_weights"]
