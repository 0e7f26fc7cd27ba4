"""What a config's ``model``, ``weights`` and ``dataset`` name, resolved.

A config names

* a model: a registered name (``lenet5``, or one given to
  :func:`~recovjax.models.register_model`), or a factory by import path,
  ``my_package.nets:make_model``, called without arguments and returning a
  :class:`~recovjax.models.Model`;
* optionally its weights: an Orbax checkpoint directory, a ``.safetensors``
  file or an ``.npz`` archive (``weights_layout: torch`` reads PyTorch's
  names and layouts through :func:`recovjax.weights.torch_mapping`);
* a dataset: a registered name, or an ``.npz`` archive of ``images`` and
  ``labels`` (:func:`recovjax.data.load_arrays`).

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
from recovjax._types import Dataset
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


def resolve_dataset(spec: str, data_dir=None) -> Dataset:
    """The dataset a config names (a registered name or an ``.npz``)."""
    from recovjax.data import load_arrays, load_dataset
    if is_array_file(spec):
        return load_arrays(spec)
    return load_dataset(spec, data_dir=data_dir)


def dataset_shape(spec: str, data_dir=None) -> tuple[tuple[int, ...], int]:
    """``(example shape, number of classes)`` of a config's dataset."""
    from recovjax.data.loading import dataset_features
    if is_array_file(spec):
        dataset = resolve_dataset(spec)
        return dataset.input_shape, dataset.num_classes
    return dataset_features(spec, data_dir=data_dir)


def resolve_model(spec: str, num_classes: int, shape: tuple[int, ...]
                  ) -> Model:
    """The model (definition or with weights) a config's ``model`` names."""
    if is_import_path(spec):
        return import_model(spec)
    return get_model(spec, num_classes,
                     sample=jax.ShapeDtypeStruct((1, *shape), jnp.float32))


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


__all__ = ["LAYOUTS", "dataset_shape", "has_weights", "import_model",
           "is_array_file", "is_import_path", "resolve_dataset",
           "resolve_model", "user_checkpoint", "with_weights"]
