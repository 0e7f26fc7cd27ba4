"""Restore damaged parameters from the pretrained Orbax checkpoint.

Four strategies, from coarse to fine, each reading only what it needs:

- :func:`restore_full`: every leaf (the seed's "replace with pretrained
  parameters").
- :func:`restore_leaves`: chosen leaves, by Orbax partial restore; the other
  leaves are neither read nor changed.
- :func:`restore_entries`: the entries a damage mask marks (reads the leaves
  the mask touches, then ``where(mask, checkpoint, damaged)``).
- :func:`detect_and_restore`: no mask. Leaves whose SHA-256 differs from the
  digest recorded in the checkpoint metadata are found without reading any
  array; only those leaves are read, compared block by block, and only the
  differing blocks are restored.

Each returns a :class:`RestoreResult` with the bytes read from the checkpoint
files (measured by the kernel's per-process read counter where available)
and the bytes of the arrays restored. The pure counterparts
:func:`replace_leaves` and :func:`replace_entries` work on reference
parameters already in memory, inside ``jit``/``vmap``.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from recovjax import checkpoints
from recovjax._types import Mask, Params
from recovjax.checkpoints import (CheckpointCorruptedError,
                                  CheckpointMismatchError, leaf_digests,
                                  leaf_path, structure_differences)

PathLike = os.PathLike[str] | str


class RestoreResult(NamedTuple):
    """Outcome of a restore strategy.

    Attributes:
        params: the restored parameters.
        restored_leaves: paths (``"conv1/kernel"``) of the leaves read from
            the checkpoint, sorted.
        mask: boolean pytree of the entries that were replaced by checkpoint
            values (for :func:`detect_and_restore`, the detected blocks).
        bytes_read: bytes read from the checkpoint's files (metadata
            included), from ``/proc/self/io``; where the platform lacks that
            counter, the bytes of the restored arrays.
        array_bytes: total ``nbytes`` of the arrays restored.
        seconds: wall time of the strategy.
    """

    params: Params
    restored_leaves: tuple[str, ...]
    mask: Mask
    bytes_read: int
    array_bytes: int
    seconds: float


def _read_counter() -> int | None:
    """Bytes this process has read through read syscalls (Linux ``rchar``)."""
    try:
        with open("/proc/self/io") as handle:
            for line in handle:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class _ReadMeter:
    """Measures bytes read and wall time of a block of checkpoint reads."""

    def __enter__(self) -> "_ReadMeter":
        self.start_bytes = _read_counter()
        self.start_time = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        end = _read_counter()
        self.seconds = time.perf_counter() - self.start_time
        self.bytes = (None if end is None or self.start_bytes is None
                      else end - self.start_bytes)


def _flat(tree: Params) -> dict[str, Any]:
    return {leaf_path(path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten_like(tree: Params, values: Mapping[str, Any]) -> Params:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [values[leaf_path(path)] for path, _ in flat])


def _spec(leaf: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(np.shape(leaf)), np.dtype(leaf.dtype))


def check_structure(directory: PathLike, params: Params) -> dict[str, Any]:
    """Check that a checkpoint stores parameters shaped like ``params``.

    Reads only the checkpoint's metadata files.

    Args:
        directory: checkpoint directory.
        params: parameters (arrays or ``ShapeDtypeStruct`` leaves).

    Returns:
        The checkpoint's metadata (model, digests, ...).

    Raises:
        CheckpointNotFoundError: no checkpoint at ``directory``.
        CheckpointMismatchError: the stored tree differs (names the leaves).
    """
    found = checkpoints.stored_structure(directory)
    metadata = checkpoints.read_metadata(directory)
    differences = structure_differences(jax.tree.map(_spec, params), found)
    if differences:
        model = metadata.get("model", "unknown model")
        raise CheckpointMismatchError(
            directory, f"checkpoint of {model!r} does not match the "
            "parameters to restore:\n  " + "\n  ".join(differences))
    return metadata


def read_leaves(directory: PathLike, specs: Mapping[str, Any], *,
                metadata: Mapping[str, Any] | None = None,
                verify: bool = True) -> dict[str, np.ndarray]:
    """Read only the named leaves of a checkpoint (Orbax partial restore).

    Uses ``PyTreeRestore(item=subtree, partial_restore=True)`` on the
    ``params`` item, so the arrays of unnamed leaves are not read. Leaf paths
    name nested dict keys (``"conv1/kernel"``), as in Flax parameters.

    Args:
        directory: checkpoint directory.
        specs: ``{leaf path: array or ShapeDtypeStruct}`` of the leaves to read.
        metadata: the checkpoint's metadata if already read (for digests).
        verify: check each leaf against its recorded SHA-256.

    Returns:
        ``{leaf path: numpy array}``.

    Raises:
        CheckpointNotFoundError, CheckpointCorruptedError.
    """
    if not specs:
        return {}
    directory, manager, step = checkpoints._open(directory)
    try:
        item_dir = pathlib.Path(manager.directory) / str(step) / (
            checkpoints.PARAMS_ITEM)
    finally:
        manager.close()
    item: dict[str, Any] = {}
    for name, leaf in specs.items():
        node = item
        *parents, last = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = _spec(leaf)
    restore_args = jax.tree.map(
        lambda spec: ocp.RestoreArgs(restore_type=np.ndarray,
                                     dtype=spec.dtype), item)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(
                item_dir, args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args,
                    partial_restore=True))
    except Exception as error:
        raise CheckpointCorruptedError(
            directory, f"cannot read leaves {sorted(specs)} ({error})"
        ) from error
    values = {name: np.asarray(value) for name, value in
              _flat(restored).items()}
    if verify:
        recorded = (metadata if metadata is not None
                    else checkpoints.read_metadata(directory)).get(
                        "digests", {})
        actual = leaf_digests(values)
        bad = sorted(name for name, digest in actual.items()
                     if recorded.get(name) != digest)
        if bad:
            raise CheckpointCorruptedError(
                directory, "leaf contents differ from their recorded "
                "SHA-256: " + ", ".join(bad))
    return values


def replace_leaves(reference: Params, params: Params,
                   leaf_paths: Iterable[str]) -> Params:
    """Take the named leaves from ``reference``, the others from ``params``.

    Pure; works inside ``jit``/``vmap``.

    Raises:
        ValueError: for a leaf path not in the tree.
    """
    names = set(leaf_paths)
    known = set(_flat(params))
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(f"unknown leaf paths {unknown}; valid paths: "
                         f"{', '.join(sorted(known))}")
    return _unflatten_like(params, {
        name: (_flat(reference)[name] if name in names else leaf)
        for name, leaf in _flat(params).items()})


@jax.jit
def replace_entries(reference: Params, params: Params, mask: Mask) -> Params:
    """``where(mask, reference, params)`` leaf by leaf; pure and vmappable.

    A stacked ``params``/``mask`` (leading model axis) broadcasts against an
    unstacked ``reference``. Compiled as one program for the whole tree.
    """
    return jax.tree.map(
        lambda r, p, m: jnp.where(m, jnp.asarray(r, p.dtype), p), reference,
        params, mask)


def _touched_leaves(mask: Mask) -> list[str]:
    return sorted(name for name, leaf in _flat(mask).items()
                  if bool(np.any(np.asarray(leaf))))


def _nbytes(values: Mapping[str, np.ndarray]) -> int:
    return int(sum(value.nbytes for value in values.values()))


def _result(params, names, mask, meter, array_bytes) -> RestoreResult:
    bytes_read = meter.bytes if meter.bytes is not None else array_bytes
    return RestoreResult(params=params, restored_leaves=tuple(sorted(names)),
                         mask=mask, bytes_read=int(bytes_read),
                         array_bytes=int(array_bytes), seconds=meter.seconds)


def _leaf_shapes(params: Params, stacked: bool) -> Params:
    if not stacked:
        return params
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
        tuple(np.shape(leaf))[1:], np.dtype(leaf.dtype)), params)


def restore_full(directory: PathLike, abstract_params: Params
                 ) -> RestoreResult:
    """Restore every leaf from the checkpoint.

    Args:
        directory: checkpoint directory.
        abstract_params: expected tree (arrays or ``ShapeDtypeStruct``).

    Returns:
        :class:`RestoreResult` (mask all true).

    Raises:
        CheckpointNotFoundError: no checkpoint at ``directory``.
        CheckpointMismatchError: the checkpoint holds another structure.
        CheckpointCorruptedError: unreadable or failing verification.
    """
    with _ReadMeter() as meter:
        params, _ = checkpoints.restore_checkpoint(directory, abstract_params)
    mask = jax.tree.map(lambda leaf: np.ones(np.shape(leaf), bool), params)
    names = list(_flat(params))
    array_bytes = sum(np.asarray(leaf).nbytes
                      for leaf in jax.tree.leaves(params))
    return _result(params, names, mask, meter, array_bytes)


def restore_leaves(directory: PathLike, params: Params,
                   leaf_paths: Iterable[str], *, stacked: bool = False
                   ) -> RestoreResult:
    """Replace the named leaves by their checkpoint values, reading only those.

    Args:
        directory: checkpoint directory.
        params: damaged parameters (leading model axis when ``stacked``; every
            model gets the same checkpoint leaves).
        leaf_paths: leaves to restore, e.g. ``["conv1/kernel"]``.
        stacked: ``params`` is a stack of models.

    Returns:
        :class:`RestoreResult`; leaves not named are the input arrays,
        unchanged.

    Raises:
        ValueError: for a leaf path not in ``params``.
        CheckpointNotFoundError, CheckpointMismatchError,
        CheckpointCorruptedError.
    """
    names = sorted(set(leaf_paths))
    shapes = _leaf_shapes(params, stacked)
    with _ReadMeter() as meter:
        metadata = check_structure(directory, shapes)
        flat = _flat(shapes)
        unknown = sorted(set(names) - set(flat))
        if unknown:
            raise ValueError(f"unknown leaf paths {unknown}; valid paths: "
                             f"{', '.join(sorted(flat))}")
        values = read_leaves(directory, {name: flat[name] for name in names},
                             metadata=metadata)
    restored = {
        name: (np.broadcast_to(np.asarray(values[name], leaf.dtype),
                               leaf.shape) if name in values else leaf)
        for name, leaf in _flat(params).items()}
    mask = _unflatten_like(params, {
        name: np.full(np.shape(leaf), name in values, bool)
        for name, leaf in _flat(params).items()})
    return _result(_unflatten_like(params, restored), names, mask, meter,
                   _nbytes(values))


def restore_entries(directory: PathLike, params: Params, mask: Mask, *,
                    stacked: bool = False) -> RestoreResult:
    """Replace exactly the masked entries by their checkpoint values.

    Reads only the leaves where ``mask`` has a true entry (for a stack, where
    any model's mask does).

    Args:
        directory: checkpoint directory.
        params: damaged parameters (leading model axis when ``stacked``).
        mask: boolean pytree of damaged entries, shaped like ``params``.
        stacked: ``params`` and ``mask`` are stacks of models.

    Returns:
        :class:`RestoreResult`; unmasked entries are bit-identical to the
        input.

    Raises:
        CheckpointNotFoundError, CheckpointMismatchError,
        CheckpointCorruptedError.
    """
    shapes = _leaf_shapes(params, stacked)
    with _ReadMeter() as meter:
        metadata = check_structure(directory, shapes)
        names = _touched_leaves(mask)
        flat = _flat(shapes)
        values = read_leaves(directory, {name: flat[name] for name in names},
                             metadata=metadata)
    flat_params, flat_mask = _flat(params), _flat(mask)
    replaced = replace_entries(
        values, {name: flat_params[name] for name in values},
        {name: flat_mask[name] for name in values})
    restored = {name: replaced.get(name, leaf)
                for name, leaf in flat_params.items()}
    return _result(_unflatten_like(params, restored), names, mask, meter,
                   _nbytes(values))


def _differing_blocks(current: np.ndarray, stored: np.ndarray,
                      block_size: int) -> np.ndarray:
    """Boolean mask (shape of the leaf) of blocks whose bits differ."""
    flat_current = np.ascontiguousarray(current).reshape(-1)
    flat_stored = np.ascontiguousarray(stored).reshape(-1)
    # Bit comparison, so that NaN damage and -0.0 are detected too.
    width = flat_current.dtype.itemsize
    unsigned = np.dtype(f"u{width}")
    differs = flat_current.view(unsigned) != flat_stored.view(unsigned)
    count = -(-differs.size // block_size)
    padded = np.zeros(count * block_size, bool)
    padded[:differs.size] = differs
    blocks = padded.reshape(count, block_size).any(axis=1)
    return np.repeat(blocks, block_size)[:differs.size].reshape(current.shape)


def detect_and_restore(directory: PathLike, params: Params, *,
                       block_size: int = 1) -> RestoreResult:
    """Find damaged blocks without a mask and restore only those.

    Leaf-level detection compares each leaf's SHA-256 with the digest the
    checkpoint metadata records, reading no arrays. Only leaves that differ
    are read (Orbax partial restore); within them, entries are grouped into
    consecutive blocks of ``block_size`` (in C order) and every block whose
    bits differ from the checkpoint is restored whole.

    Args:
        directory: checkpoint directory.
        params: possibly damaged parameters of one model.
        block_size: entries per block (1 = entry-exact restore).

    Returns:
        :class:`RestoreResult` whose ``mask`` marks the restored blocks and
        ``restored_leaves`` the leaves found damaged.

    Raises:
        ValueError: for a non-positive ``block_size``.
        CheckpointNotFoundError, CheckpointMismatchError,
        CheckpointCorruptedError (e.g. a checkpoint without digests).
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got "
                         f"{block_size!r}")
    host = jax.tree.map(np.asarray, jax.device_get(params))
    with _ReadMeter() as meter:
        metadata = check_structure(directory, host)
        recorded = metadata.get("digests")
        if not recorded:
            raise CheckpointCorruptedError(
                directory, "metadata holds no per-leaf digests; cannot "
                "detect damage without reading every leaf")
        current = leaf_digests(host)
        names = sorted(name for name, digest in current.items()
                       if recorded.get(name) != digest)
        flat = _flat(host)
        values = read_leaves(directory, {name: flat[name] for name in names},
                             metadata=metadata)
    restored, detected = {}, {}
    for name, leaf in flat.items():
        if name in values:
            blocks = _differing_blocks(leaf, values[name], block_size)
            restored[name] = np.where(blocks, values[name], leaf)
            detected[name] = blocks
        else:
            restored[name] = leaf
            detected[name] = np.zeros(leaf.shape, bool)
    restored_params = jax.tree.map(
        lambda new, old: jnp.asarray(new, old.dtype),
        _unflatten_like(host, restored), params)
    mask = jax.tree.map(jnp.asarray, _unflatten_like(host, detected))
    return _result(restored_params, names, mask, meter, _nbytes(values))


def damaged_leaf_paths(mask: Mask) -> list[str]:
    """Paths of the leaves where ``mask`` marks at least one entry."""
    return _touched_leaves(mask)


