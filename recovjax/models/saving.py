"""A user's own weights: saved as verified Orbax checkpoints, loaded from files.

:func:`save_pretrained` writes a :class:`~recovjax.models.Model`'s
parameters (and state, such as batch statistics) as the same checkpoint the
zoo writes: Orbax arrays, JSON metadata with per-leaf SHA-256 digests and a
file list. The restore, detect-and-restore and rebuild strategies then read
it like a zoo entry. :func:`load_weights` puts weights from such a
checkpoint, a ``.safetensors`` file (PyTorch layout through a mapping) or
an ``.npz`` archive into a model.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

from recovjax import checkpoints, weights
from recovjax.models.adapter import Model, require_model

PathLike = os.PathLike[str] | str

FORMATS = ("orbax", "safetensors", "npz")


def _task_name(task: Any) -> str:
    return task if isinstance(task, str) else getattr(task, "name", "custom")


def save_pretrained(model: Model, directory: PathLike,
                    metadata: Mapping[str, Any] | None = None, *,
                    overwrite: bool = False) -> pathlib.Path:
    """Save a model's parameters and state as a verified Orbax checkpoint.

    Args:
        model: the model (``model.params`` and ``model.state`` are saved).
        directory: the checkpoint directory to create.
        metadata: JSON-serialisable facts to record (dataset, accuracy,
            provenance); ``model``, ``task`` and the leaf roles are added.
        overwrite: replace an existing checkpoint.

    Returns:
        The checkpoint directory (written atomically: an interrupted save
        leaves nothing at ``directory``).

    Raises:
        TypeError: if ``model`` is not a :class:`Model`, its parameters
            are abstract, or ``metadata`` is not JSON-serialisable.
        FileExistsError: if ``directory`` exists and ``overwrite`` is false.

    Example::

        model = from_linen(net, variables, sample=images[:1])
        save_pretrained(model, "checkpoints/mynet", {"dataset": "mine"})
        restored = load_weights(model, "checkpoints/mynet")
    """
    require_model(model)
    if _abstract(model.params) or _abstract(model.state):
        raise TypeError(f"model {model.name!r} holds abstract parameters "
                        "(shapes only); give it weights first "
                        "(model.with_params, load_weights)")
    record = {"model": model.name, "task": _task_name(model.task),
              "source": "save_pretrained",
              "roles": {path: info.role for path, info in
                        model.infos.items()}}
    record.update(dict(metadata or {}))
    return checkpoints.save_checkpoint(directory, model.params, record,
                                       overwrite=overwrite,
                                       state=model.state)


def _format_of(path: pathlib.Path) -> str:
    if path.is_dir():
        return "orbax"
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".npz":
        return "npz"
    raise ValueError(f"{path}: cannot tell the weights format from the "
                     f"path; pass format= one of {', '.join(FORMATS)}")


def load_weights(model: Model, path: PathLike, *,
                 mapping: Mapping[str, Any] | None = None,
                 format: str | None = None, strict: bool = True,
                 cast: bool = False) -> Model:
    """The model with weights read from a file or checkpoint.

    Args:
        model: the model (or a definition with abstract parameters, such
            as :func:`~recovjax.models.get_model`'s) fixing the expected
            paths, shapes and dtypes.
        path: an Orbax checkpoint directory (from :func:`save_pretrained`
            or the zoo), a ``.safetensors`` file or an ``.npz`` archive.
        mapping: target leaf path to source name, or to ``(source name,
            transform)``, for files in another layout (see
            :func:`recovjax.weights.torch_mapping` for PyTorch's); Orbax
            checkpoints of the same model need none.
        format: ``"orbax"``, ``"safetensors"`` or ``"npz"``; default from
            the path.
        strict: refuse source tensors that no leaf uses.
        cast: allow float widening (``bfloat16`` to ``float32``).

    Returns:
        ``model`` with the weights (and, from a checkpoint saved with
        state, its batch statistics).

    Raises:
        FileNotFoundError: for a missing path (naming it).
        ValueError: for an unknown format.
        recovjax.weights.WeightsError: a leaf missing from the file, or of
            another shape or dtype (the message names the leaf, the
            expected and the found shape).
        recovjax.CheckpointError: a corrupted checkpoint.
    """
    require_model(model)
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no weights file or checkpoint here")
    kind = format or _format_of(path)
    if kind not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got "
                         f"{kind!r}")
    expected = model.abstract_params()
    loader = {"orbax": weights.load_orbax,
              "safetensors": weights.load_safetensors,
              "npz": weights.load_npz}[kind]
    params = loader(path, expected, mapping=mapping, strict=strict,
                    cast=cast)
    loaded = model.with_params(params)
    if kind == "orbax" and model.state:
        metadata = checkpoints.read_metadata(path)
        if "state_digests" in metadata:
            loaded = loaded.with_state(checkpoints.restore_state(
                path, model.state))
    if _abstract(loaded.state):
        raise ValueError(f"{path}: holds no model state, and the state of "
                         f"model {model.name!r} (batch statistics) is only "
                         "shapes; save the model with save_pretrained, or "
                         "give it its state with model.with_state(...)")
    return loaded


def _abstract(tree: Any) -> bool:
    import jax
    return any(isinstance(leaf, jax.ShapeDtypeStruct)
               for leaf in jax.tree.leaves(tree))
