"""Orbax checkpoints of model parameters, verified on the way back in.

A recovjax checkpoint is an Orbax ``CheckpointManager`` directory with two
items per step: ``params`` (a ``StandardSave`` pytree) and ``metadata`` (JSON:
model, dataset, seed, optimiser, accuracy, library versions and a SHA-256 of
every parameter leaf). Next to the step, ``recovjax_files.json`` records the
size and SHA-256 of every file Orbax wrote. Restoring checks their sizes
first (a truncated array file would otherwise fail deep inside Orbax's
reader threads), then the on-disk tree against the model's expected
structure before reading any array, and every leaf against its recorded
digest after, so a checkpoint of another model or a corrupted one is
reported, never silently used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import uuid
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from recovjax._io import atomic_write
from recovjax._types import Params

PARAMS_ITEM = "params"
METADATA_ITEM = "metadata"
STATE_ITEM = "state"
"""The optional item holding a model's state (batch statistics)."""
FILES_MANIFEST = "recovjax_files.json"
"""Sizes and SHA-256 of a checkpoint's files, at the checkpoint's root."""
_FILES_FORMAT = "recovjax-checkpoint-files"


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


class _DropReadOnlyNotice(logging.Filter):
    """Drops Orbax's "Given directory is read only" notice, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(
            "Given directory is read only"))


@contextlib.contextmanager
def _without_read_only_notice():
    # Orbax logs the notice (through absl) every time a read-only manager
    # is made, i.e. on every restore: it says nothing the caller did not
    # ask for. One filter instance per call, so that concurrent callers do
    # not remove each other's.
    logger = logging.getLogger("absl")
    notice = _DropReadOnlyNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _alone() -> ocp.options.MultiprocessingOptions:
    """This process as the only one of its checkpoint operations.

    recovjax's checkpoints hold host arrays (pretrained weights), which
    every process of a multi-process run reads, and the first writes, on
    its own; Orbax would otherwise wait for every process at each one.
    """
    index = jax.process_index()
    return ocp.options.MultiprocessingOptions(
        primary_host=index, active_processes={index},
        barrier_sync_key_prefix=f"recovjax-process{index}")


def _manager(directory: pathlib.Path, *, read_only: bool
             ) -> ocp.CheckpointManager:
    alone = _alone()
    options = ocp.CheckpointManagerOptions(
        # save_checkpoint makes the directory (Orbax cannot, for a
        # manager of one process of several).
        max_to_keep=None, create=False, read_only=read_only,
        # Read-only managers save nothing; saying so up front spares
        # Orbax's warning that it changed the option.
        save_interval_steps=0 if read_only else 1,
        multiprocessing_options=alone)
    handlers = {
        PARAMS_ITEM: ocp.StandardCheckpointHandler(
            multiprocessing_options=alone),
        STATE_ITEM: ocp.StandardCheckpointHandler(
            multiprocessing_options=alone),
        METADATA_ITEM: ocp.JsonCheckpointHandler(
            multiprocessing_options=alone)}
    if not read_only:
        return ocp.CheckpointManager(directory, options=options,
                                     item_handlers=handlers)
    with _without_read_only_notice():
        return ocp.CheckpointManager(directory, options=options,
                                     item_handlers=handlers)


def _file_digest(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_files(directory: os.PathLike[str] | str) -> pathlib.Path:
    """Write a checkpoint's file list (sizes and SHA-256), atomically.

    :func:`save_checkpoint` does this for every checkpoint it writes; call
    it for a checkpoint saved before such lists existed, once its leaves
    have verified.

    Args:
        directory: the checkpoint directory.

    Returns:
        The path of ``recovjax_files.json``.
    """
    directory = pathlib.Path(directory).expanduser().absolute()
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != FILES_MANIFEST:
            files[path.relative_to(directory).as_posix()] = {
                "bytes": path.stat().st_size, "sha256": _file_digest(path)}
    return atomic_write(directory / FILES_MANIFEST, json.dumps(
        {"format": _FILES_FORMAT, "version": 1, "files": files},
        sort_keys=True, indent=1) + "\n")


def file_problems(directory: os.PathLike[str] | str, *,
                  contents: bool = False) -> list[str]:
    """Files of a checkpoint that are missing, truncated or changed.

    Compares every file listed in the checkpoint's ``recovjax_files.json``
    with its recorded size (and, with ``contents``, its SHA-256), without
    starting Orbax. Checkpoints saved before the list existed have nothing
    to compare and give ``[]``.

    Args:
        directory: the checkpoint directory.
        contents: also hash every file (reads the whole checkpoint; the
            sizes alone cost one ``stat`` per file).

    Returns:
        One line per bad file (e.g. ``"0/params/manifest.ocdbt: 100 of 379
        bytes (truncated)"``); empty when every listed file is intact.
    """
    directory = pathlib.Path(directory).expanduser().absolute()
    manifest = directory / FILES_MANIFEST
    if not manifest.is_file():
        return []
    try:
        document = json.loads(manifest.read_bytes().decode("utf-8"))
        files = document["files"]
        if document.get("format") != _FILES_FORMAT or not isinstance(
                files, dict):
            raise ValueError("not a file list")
        listed = {str(name): (int(entry["bytes"]), str(entry["sha256"]))
                  for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return [f"{FILES_MANIFEST}: unreadable file list ({error})"]
    problems = []
    for name, (size, digest) in sorted(listed.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        found = path.stat().st_size
        if found != size:
            what = "truncated" if found < size else "too long"
            problems.append(f"{name}: {found} of {size} bytes ({what})")
        elif contents and _file_digest(path) != digest:
            problems.append(f"{name}: contents differ from the recorded "
                            "SHA-256")
    return problems


def save_checkpoint(directory: os.PathLike[str] | str, params: Params,
                    metadata: dict[str, Any], *, step: int = 0,
                    overwrite: bool = False, state: Any = None
                    ) -> pathlib.Path:
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
        state: a model's state (batch statistics) to keep beside the
            parameters, with its own ``state_digests``; ``None`` or an
            empty tree keeps none (see :func:`restore_state`).

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
    items = {PARAMS_ITEM: ocp.args.StandardSave(params)}
    if state is not None and jax.tree.leaves(state):
        state = jax.device_get(state)
        record["state_digests"] = leaf_digests(state)
        items[STATE_ITEM] = ocp.args.StandardSave(state)
    try:  # Fail before touching the disk, not in Orbax's writer thread.
        json.dumps(record, allow_nan=True)
    except TypeError as error:
        raise TypeError(f"{directory}: checkpoint metadata must be JSON "
                        f"serialisable ({error})") from None
    try:
        staging.mkdir()
        manager = _manager(staging, read_only=False)
        manager.save(step, args=ocp.args.Composite(
            **items, **{METADATA_ITEM: ocp.args.JsonSave(record)}))
        manager.wait_until_finished()
        manager.close()
        record_files(staging)
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


def verify_files(directory: os.PathLike[str] | str, *,
                 contents: bool = False) -> None:
    """Raise unless every file in the checkpoint's file list is intact.

    Args:
        directory: the checkpoint directory.
        contents: also compare every file's SHA-256 (see
            :func:`file_problems`).

    Raises:
        CheckpointNotFoundError: no checkpoint directory at ``directory``.
        CheckpointCorruptedError: a listed file is missing, has another size
            or (with ``contents``) other bytes; the message names each.
    """
    checked = pathlib.Path(directory).expanduser().absolute()
    if not checked.is_dir():
        raise CheckpointNotFoundError(checked, "no checkpoint directory here")
    problems = file_problems(checked, contents=contents)
    if problems:
        raise CheckpointCorruptedError(
            checked, "files differ from those saved: " + "; ".join(problems))


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


def stored_structure(directory: os.PathLike[str] | str, *,
                     state: bool = False) -> Params:
    """The on-disk parameter tree as ``jax.ShapeDtypeStruct`` leaves.

    Args:
        directory: the checkpoint directory.
        state: the tree of the model state saved beside the parameters
            instead (``{}`` when the checkpoint holds none).

    Raises:
        CheckpointNotFoundError, CheckpointCorruptedError.
    """
    if state and "state_digests" not in read_metadata(directory):
        return {}
    item, what = ((STATE_ITEM, "model state") if state else
                  (PARAMS_ITEM, "parameter tree"))
    directory, manager, step = _open(directory)
    try:
        tree = manager.item_metadata(step)[item]
        tree = getattr(tree, "tree", tree)
        return jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype),
            tree)
    except Exception as error:
        raise CheckpointCorruptedError(
            directory, f"cannot read the {what} ({error})") from error
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
        verify: check every file's size against the checkpoint's file
            list (before Orbax reads anything) and every leaf against its
            recorded SHA-256 (after).

    Returns:
        ``(params, metadata)``.

    Raises:
        CheckpointNotFoundError: no checkpoint at ``directory``.
        CheckpointMismatchError: the stored tree differs from
            ``abstract_params`` (the message lists leaf paths and shapes).
        CheckpointCorruptedError: truncated, missing or changed files (the
            message names them) or failed verification (it names the
            leaves).
    """
    expected = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype),
        abstract_params)
    if verify:
        # Sizes only: a truncated or missing file would otherwise fail in
        # Orbax's reader threads; changed contents are the leaf digests' job,
        # so the files are not read twice.
        verify_files(directory)
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


def restore_state(directory: os.PathLike[str] | str, abstract_state: Any
                  ) -> Any:
    """Restore the state saved beside a checkpoint's parameters.

    Args:
        directory: checkpoint directory written by :func:`save_checkpoint`
            with ``state``.
        abstract_state: the expected tree (shape structs or arrays); an
            empty tree restores nothing and returns it.

    Returns:
        The state, verified against its recorded SHA-256.

    Raises:
        CheckpointNotFoundError: no checkpoint at ``directory``.
        CheckpointMismatchError: the checkpoint holds no state, or another
            structure (the message lists the differences).
        CheckpointCorruptedError: unreadable or changed state.
    """
    if not jax.tree.leaves(abstract_state):
        return abstract_state
    expected = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype),
        abstract_state)
    metadata = read_metadata(directory)
    recorded = metadata.get("state_digests")
    directory, manager, step = _open(directory)
    try:
        if recorded is None:
            raise CheckpointMismatchError(
                directory, "the checkpoint holds no model state (batch "
                "statistics), but the model has some")
        stored = manager.item_metadata(step)[STATE_ITEM]
        stored = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype),
            getattr(stored, "tree", stored))
        differences = structure_differences(expected, stored)
        if differences:
            raise CheckpointMismatchError(
                directory, "the stored state does not match the model's:\n  "
                + "\n  ".join(differences))
        restored = manager.restore(step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(expected)}))
        state = jax.tree.map(np.asarray, restored[STATE_ITEM])
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointCorruptedError(
            directory, f"cannot read the model state ({error})") from error
    finally:
        manager.close()
    bad = sorted(name for name, digest in leaf_digests(state).items()
                 if recorded.get(name) != digest)
    if bad:
        raise CheckpointCorruptedError(
            directory, "state contents differ from their recorded SHA-256: "
            + ", ".join(bad))
    return jax.tree.map(lambda leaf, spec: jnp.asarray(leaf, spec.dtype),
                        state, expected)
