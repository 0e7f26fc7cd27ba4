"""Orbax checkpoints of model parameters, verified on the way back in.

A recovjax checkpoint is an Orbax ``CheckpointManager`` directory with two
items per step: ``params`` (a ``StandardSave`` pytree) and ``metadata`` (JSON:
model, dataset, seed, optimiser, accuracy, library versions and a SHA-256 of
every parameter leaf). Restoring checks the on-disk tree against the model's
expected structure before reading any array and checks every leaf against
its recorded digest after, so a checkpoint of another model or a corrupted
one is reported, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from recovjax._types import Params

PARAMS_ITEM = "params"
METADATA_ITEM = "metadata"


class CheckpointError(Exception):
    """Base class of checkpoint errors; ``path`` names the checkpoint."""

    def __init__(self, path: os.PathLike[str] | str, message: str):
        self.path = pathlib.Path(path)
        super().__init__(f"{self.path}: {message}")


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the given path."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint holds parameters of another structure (model)."""


class CheckpointCorruptedError(CheckpointError):
    """The checkpoint is truncated or its contents fail verification."""


def leaf_path(path: Sequence[Any]) -> str:
    """``('conv1', 'kernel')`` key path to the string ``'conv1/kernel'``."""
    parts = []
    for entry in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def leaf_digests(params: Params) -> dict[str, str]:
    """SHA-256 of every leaf's bytes, keyed by leaf path."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {leaf_path(path): hashlib.sha256(
        np.ascontiguousarray(np.asarray(leaf)).tobytes()).hexdigest()
            for path, leaf in flat}


def _describe(tree: Params) -> dict[str, tuple[tuple[int, ...], str]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {leaf_path(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
            for path, leaf in flat}


def structure_differences(expected: Params, found: Params) -> list[str]:
    """Human-readable differences between two trees' paths, shapes, dtypes."""
    want, have = _describe(expected), _describe(found)
    lines = []
    for name in sorted(set(want) | set(have)):
        if name not in have:
            lines.append(f"missing leaf {name} {want[name][0]} {want[name][1]}")
        elif name not in want:
            lines.append(f"unexpected leaf {name} {have[name][0]} "
                         f"{have[name][1]}")
        elif want[name] != have[name]:
            lines.append(f"leaf {name}: expected shape {want[name][0]} "
                         f"{want[name][1]}, found {have[name][0]} "
                         f"{have[name][1]}")
    return lines


def _manager(directory: pathlib.Path, *, read_only: bool
             ) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=not read_only, read_only=read_only,
            # Read-only managers save nothing; saying so up front spares
            # Orbax's warning that it changed the option.
            save_interval_steps=0 if read_only else 1),
        item_handlers={PARAMS_ITEM: ocp.StandardCheckpointHandler(),
                       METADATA_ITEM: ocp.JsonCheckpointHandler()})


def save_checkpoint(directory: os.PathLike[str] | str, params: Params,
                    metadata: dict[str, Any], *, step: int = 0,
                    overwrite: bool = False) -> pathlib.Path:
    """Save parameters and metadata as an Orbax checkpoint, atomically.

    The checkpoint is written into a temporary sibling directory and renamed
    into place only once Orbax has finished, so an interrupted save leaves
    no partial checkpoint at ``directory``.

    Args:
        directory: checkpoint directory to create.
        params: parameter pytree.
        metadata: JSON-serialisable description (model, dataset, ...). A
            ``digests`` entry with per-leaf SHA-256 is added.
        step: the step number recorded by the manager (e.g. epochs trained).
        overwrite: replace an existing checkpoint at ``directory``.

    Returns:
        The checkpoint directory.

    Raises:
        FileExistsError: if ``directory`` exists and ``overwrite`` is false.
    """
    directory = pathlib.Path(directory).expanduser().absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(
            f"{directory}: a checkpoint already exists; refusing to overwrite "
            "it (pass overwrite=True to replace it)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}.tmp")
    params = jax.device_get(params)
    record = dict(metadata, digests=leaf_digests(params))
    try:  # Fail before touching the disk, not in Orbax's writer thread.
        json.dumps(record, allow_nan=True)
    except TypeError as error:
        raise TypeError(f"{directory}: checkpoint metadata must be JSON "
                        f"serialisable ({error})") from None
    try:
        manager = _manager(staging, read_only=False)
        manager.save(step, args=ocp.args.Composite(
            **{PARAMS_ITEM: ocp.args.StandardSave(params),
               METADATA_ITEM: ocp.args.JsonSave(record)}))
        manager.wait_until_finished()
        manager.close()
        if directory.exists():
            retired = directory.with_name(
                f".{directory.name}.{uuid.uuid4().hex}.old")
            directory.rename(retired)
            staging.rename(directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def _open(directory: os.PathLike[str] | str
          ) -> tuple[pathlib.Path, ocp.CheckpointManager, int]:
    directory = pathlib.Path(directory).expanduser().absolute()
    if not directory.is_dir():
        raise CheckpointNotFoundError(directory, "no checkpoint directory here")
    try:
        manager = _manager(directory, read_only=True)
        step = manager.latest_step()
    except Exception as error:  # Orbax raises many types for bad layouts.
        raise CheckpointCorruptedError(
            directory, f"not a readable Orbax checkpoint ({error})") from error
    if step is None:
        raise CheckpointNotFoundError(
            directory, "directory holds no finished checkpoint step")
    return directory, manager, step


def read_metadata(directory: os.PathLike[str] | str) -> dict[str, Any]:
    """Read a checkpoint's JSON metadata without touching its arrays.

    Raises:
        CheckpointNotFoundError: if there is no checkpoint at ``directory``.
        CheckpointCorruptedError: if the metadata cannot be read.
    """
    directory, manager, step = _open(directory)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            **{METADATA_ITEM: ocp.args.JsonRestore()}))
        return dict(restored[METADATA_ITEM])
    except Exception as error:
        raise CheckpointCorruptedError(
            directory, f"cannot read metadata ({error})") from error
    finally:
        manager.close()


def stored_structure(directory: os.PathLike[str] | str) -> Params:
    """The on-disk parameter tree as ``jax.ShapeDtypeStruct`` leaves.

    Raises:
        CheckpointNotFoundError, CheckpointCorruptedError.
    """
    directory, manager, step = _open(directory)
    try:
        tree = manager.item_metadata(step)[PARAMS_ITEM]
        tree = getattr(tree, "tree", tree)
        return jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype),
            tree)
    except Exception as error:
        raise CheckpointCorruptedError(
            directory, f"cannot read the parameter tree ({error})") from error
    finally:
        manager.close()


def restore_checkpoint(directory: os.PathLike[str] | str,
                       abstract_params: Params, *, verify: bool = True
                       ) -> tuple[Params, dict[str, Any]]:
    """Restore parameters with exactly the expected structure and dtypes.

    Args:
        directory: checkpoint directory written by :func:`save_checkpoint`.
        abstract_params: the expected tree (``jax.ShapeDtypeStruct`` or
            array leaves), e.g. ``model.abstract_params(sample)``.
        verify: check every leaf against its recorded SHA-256.

    Returns:
        ``(params, metadata)``.

    Raises:
        CheckpointNotFoundError: no checkpoint at ``directory``.
        CheckpointMismatchError: the stored tree differs from
            ``abstract_params`` (the message lists leaf paths and shapes).
        CheckpointCorruptedError: truncated files or failed verification.
    """
    expected = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype),
        abstract_params)
    found = stored_structure(directory)
    differences = structure_differences(expected, found)
    metadata = read_metadata(directory)
    if differences:
        model = metadata.get("model", "unknown model")
        raise CheckpointMismatchError(
            directory, f"checkpoint of {model!r} does not match the expected "
            "parameters:\n  " + "\n  ".join(differences))
    directory, manager, step = _open(directory)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            **{PARAMS_ITEM: ocp.args.StandardRestore(expected)}))
        params = jax.tree.map(np.asarray, restored[PARAMS_ITEM])
    except Exception as error:
        raise CheckpointCorruptedError(
            directory, f"cannot read parameters ({error})") from error
    finally:
        manager.close()
    if verify:
        recorded = metadata.get("digests", {})
        actual = leaf_digests(params)
        bad = sorted(name for name, digest in actual.items()
                     if recorded.get(name) != digest)
        if bad:
            raise CheckpointCorruptedError(
                directory, "leaf contents differ from their recorded SHA-256: "
                + ", ".join(bad))
    params = jax.tree.map(lambda leaf, spec: jnp.asarray(leaf, spec.dtype),
                          params, expected)
    return params, metadata
