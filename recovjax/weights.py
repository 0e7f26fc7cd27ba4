"""Pretrained weights from safetensors, ``.npz`` and Orbax files.

Every loader reads named source tensors and assembles them into a tree with
the structure of ``expected`` (target leaf paths ``'/'``-joined, as
:func:`recovjax.checkpoints.leaf_path` writes them). A ``mapping`` says, per
target leaf, which source tensor to use and how to lay it out::

    {"Conv_0/kernel": ("features.0.weight", "oihw_to_hwio"),
     "Conv_0/bias": "features.0.bias"}

A transform is a named layout (see :data:`LAYOUTS`) or an explicit axes
tuple for :func:`numpy.transpose`. Leaves the mapping does not name are
looked up under their own path, untransformed; without a mapping every leaf
is. :func:`torch_mapping` builds the usual PyTorch naming for flax trees.
All three loaders share one assembly step, so they validate alike.
"""

from __future__ import annotations

import difflib
import os
import pathlib
from typing import Callable, Iterable, Mapping, Union

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors import safe_open

from recovjax import checkpoints
from recovjax._io import atomic_write
from recovjax._types import Params

Transform = Union[str, tuple[int, ...]]
"""A named layout from :data:`LAYOUTS` or axes for :func:`numpy.transpose`."""

WeightMapping = Mapping[str, Union[str, tuple[str, Transform]]]
"""Target leaf path -> source name, or ``(source name, transform)``."""

LAYOUTS: dict[str, tuple[int, ...] | None] = {
    "identity": None,
    "oihw_to_hwio": (2, 3, 1, 0),  # Conv [O,I,kh,kw] -> flax [kh,kw,I,O].
    "out_in_to_in_out": (1, 0),    # Linear [out,in] -> flax [in,out].
}
"""Named layout transforms: the ``np.transpose`` axes each applies."""

_SHOWN = 8  # Names listed in an error before "... (N in all)".


class WeightsError(ValueError):
    """Weights that cannot be read into the expected parameter tree."""


def _listing(names: Iterable[str], near: str | None = None) -> str:
    names = sorted(names)
    shown = difflib.get_close_matches(near, names, n=_SHOWN, cutoff=0.5) \
        if near is not None else []
    rest = [name for name in names if name not in shown]
    shown += rest[:_SHOWN - len(shown)]
    more = f", ... ({len(names)} in all)" if len(names) > len(shown) else ""
    return ", ".join(repr(name) for name in shown) + more if names else "none"


def _leaves(tree: Params) -> dict[str, object]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {checkpoints.leaf_path(path): leaf for path, leaf in flat}


def _plan(expected: dict[str, object], mapping: WeightMapping | None
          ) -> dict[str, tuple[str, Transform, tuple[int, ...] | None]]:
    """Per target leaf: (source name, transform as given, transpose axes)."""
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - set(expected))
    if unknown:
        raise WeightsError(
            f"mapping names paths that are not leaves of the expected tree: "
            f"{', '.join(map(repr, unknown))}; leaves are "
            f"{_listing(expected, unknown[0])}")
    plan = {}
    for target in expected:
        entry = mapping.get(target, target)
        if isinstance(entry, str):
            source, transform = entry, "identity"
        elif isinstance(entry, (tuple, list)) and len(entry) == 2 \
                and isinstance(entry[0], str):
            source, transform = entry
        else:
            raise WeightsError(
                f"mapping[{target!r}] must be a source name or a (source "
                f"name, transform) pair, not {entry!r}")
        if isinstance(transform, str):
            if transform not in LAYOUTS:
                raise WeightsError(
                    f"mapping[{target!r}]: unknown transform {transform!r}; "
                    f"use one of {', '.join(map(repr, LAYOUTS))} or an axes "
                    "tuple")
            axes = LAYOUTS[transform]
        elif isinstance(transform, (tuple, list)) and all(
                isinstance(axis, int) for axis in transform) and sorted(
                transform) == list(range(len(transform))):
            axes = transform = tuple(transform)
        else:
            raise WeightsError(
                f"mapping[{target!r}]: transform {transform!r} is neither a "
                "named layout nor a permutation of range(ndim)")
        plan[target] = (source, transform, axes)
    return plan


def _castable(found: np.dtype, wanted: np.dtype) -> bool:
    """Whether real float ``found`` widens to ``wanted`` losing no value."""
    if "c" in (found.kind, wanted.kind):
        return False  # finfo(complex) describes a part; casts drop the other.
    try:
        have, want = ml_dtypes.finfo(found), ml_dtypes.finfo(wanted)
    except (TypeError, ValueError):
        return False  # Not both floating point.
    return have.nmant <= want.nmant and have.maxexp <= want.maxexp \
        and have.minexp >= want.minexp


def _assemble(where: str, expected: Params, names: Iterable[str],
              read: Callable[[str], np.ndarray], mapping: WeightMapping | None,
              *, strict: bool, cast: bool) -> Params:
    """The one mapping/transform/validation step behind every loader."""
    wanted = _leaves(expected)
    for target, leaf in wanted.items():
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise WeightsError(f"expected leaf {target!r} is {leaf!r}, not an "
                               "array or jax.ShapeDtypeStruct")
    plan = _plan(wanted, mapping)
    available = set(names)
    missing = [(target, source) for target, (source, _, _) in plan.items()
               if source not in available]
    if missing:
        target, source = missing[0]
        others = (f" ({len(missing) - 1} other leaves lack theirs too)"
                  if len(missing) > 1 else "")
        raise WeightsError(
            f"{where}: no source tensor {source!r} for leaf {target!r}"
            f"{others}; available: {_listing(available, source)}")
    unused = set(available) - {source for source, _, _ in plan.values()}
    if unused and strict:
        raise WeightsError(
            f"{where}: {len(unused)} source tensor(s) used by no leaf: "
            f"{_listing(unused)}; map them or pass strict=False to ignore "
            "them")
    leaves = []
    for target, (source, transform, axes) in plan.items():
        shape = tuple(wanted[target].shape)
        dtype = np.dtype(wanted[target].dtype)
        try:
            tensor = read(source)
        except WeightsError as error:
            raise WeightsError(
                f"{error}; wanted by leaf {target!r}") from error
        if axes is not None and tensor.ndim != len(axes):
            raise WeightsError(
                f"{where}: leaf {target!r}: transform {transform!r} needs a "
                f"{len(axes)}-d tensor, but source {source!r} has shape "
                f"{tuple(tensor.shape)} ({tensor.ndim}-d)")
        laid_out = tensor if axes is None else np.transpose(tensor, axes)
        if tuple(laid_out.shape) != shape:
            raise WeightsError(
                f"{where}: leaf {target!r}: expected shape {shape}, found "
                f"{tuple(laid_out.shape)} from source {source!r} of shape "
                f"{tuple(tensor.shape)} after transform {transform!r}")
        if laid_out.dtype != dtype:
            if not (cast and _castable(laid_out.dtype, dtype)):
                hint = ("; pass cast=True to widen it" if not cast and
                        _castable(laid_out.dtype, dtype) else "")
                raise WeightsError(
                    f"{where}: leaf {target!r}: expected dtype {dtype}, found "
                    f"{laid_out.dtype} (source {source!r}){hint}")
            laid_out = np.asarray(laid_out, dtype)
        leaves.append(np.ascontiguousarray(laid_out))
    return jax.tree_util.tree_unflatten(jax.tree.structure(expected), leaves)


def _existing(path: os.PathLike[str] | str) -> pathlib.Path:
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such weights file")
    return path


def load_safetensors(path: os.PathLike[str] | str, expected: Params, *,
                     mapping: WeightMapping | None = None, strict: bool = True,
                     cast: bool = False) -> Params:
    """Read a safetensors file into a tree shaped like ``expected``.

    Tensors are read one at a time, only those the mapping uses, so a large
    file with ``strict=False`` costs only what is kept. bfloat16 tensors
    come back as ``ml_dtypes.bfloat16`` arrays.

    Args:
        path: the ``.safetensors`` file.
        expected: a tree of arrays or ``jax.ShapeDtypeStruct`` (e.g.
            ``model.params`` or ``jax.eval_shape`` output) fixing the target
            paths, shapes and dtypes.
        mapping: target leaf path -> source name or ``(source name,
            transform)``; unnamed leaves use their own path, untransformed.
        strict: raise if the file holds tensors that no leaf uses.
        cast: allow lossless float widening (e.g. float16 or bfloat16 to
            float32); otherwise dtypes must match exactly.

    Returns:
        A tree with ``expected``'s structure and containers, whose leaves are
        C-contiguous numpy arrays of the expected shapes and dtypes.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightsError: the file cannot be read (the message names ``path``),
            or the weights do not fit: a missing source tensor, a shape,
            dtype or transform mismatch (each naming the leaf), unused
            source tensors (``strict``), or mapping keys that are not leaves.

    Example::

        params = load_safetensors("resnet.safetensors", model.params,
                                  mapping=torch_mapping(model.params))
    """
    path = _existing(path)
    try:
        handle = safe_open(str(path), framework="numpy")
        names = list(handle.keys())
    except Exception as error:  # SafetensorError, OSError: bad header etc.
        raise WeightsError(f"{path}: not a readable safetensors file "
                           f"({error})") from error

    def read(name: str) -> np.ndarray:
        try:
            return handle.get_tensor(name)
        except Exception as error:  # The Rust reader's own error types.
            raise WeightsError(f"{path}: cannot read tensor {name!r} "
                               f"({error})") from error

    with handle:
        return _assemble(str(path), expected, names, read, mapping,
                         strict=strict, cast=cast)


def load_npz(path: os.PathLike[str] | str, expected: Params, *,
             mapping: WeightMapping | None = None, strict: bool = True,
             cast: bool = False) -> Params:
    """Read a ``.npz`` archive (its keys are the source names).

    Arguments, return value and errors are those of
    :func:`load_safetensors`; object arrays are refused (no pickles).
    """
    path = _existing(path)
    # Our own handle: np.load leaks the one it opens when the zip is bad.
    with open(path, "rb") as handle:
        try:
            archive = np.load(handle, allow_pickle=False)
        except Exception as error:  # BadZipFile, ValueError, OSError, ...
            raise WeightsError(f"{path}: not a readable .npz archive "
                               f"({error})") from error
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise WeightsError(f"{path}: holds a single array, not a .npz "
                               "archive of named arrays")

        def read(name: str) -> np.ndarray:
            try:
                return archive[name]
            except Exception as error:  # Object arrays, bad members.
                raise WeightsError(f"{path}: cannot read array {name!r} "
                                   f"({error})") from error

        with archive:
            return _assemble(str(path), expected, archive.files, read,
                             mapping, strict=strict, cast=cast)


def load_orbax(path: os.PathLike[str] | str, expected: Params, *,
               mapping: WeightMapping | None = None, strict: bool = True,
               cast: bool = False) -> Params:
    """Read a checkpoint of :func:`recovjax.checkpoints.save_checkpoint`.

    The source names are the stored leaf paths (``'/'``-joined), so a
    checkpoint of another model (or another naming) can be mapped in. Every
    leaf is verified against its recorded SHA-256 before use.

    Arguments and return value are those of :func:`load_safetensors`.

    Raises:
        FileNotFoundError: no checkpoint at ``path``
            (:class:`~recovjax.checkpoints.CheckpointNotFoundError`).
        WeightsError: a corrupted checkpoint, or weights that do not fit.
    """
    where = str(pathlib.Path(path).expanduser())
    try:
        stored = checkpoints.stored_structure(path)
        params, _ = checkpoints.restore_checkpoint(path, stored)
    except checkpoints.CheckpointCorruptedError as error:
        raise WeightsError(str(error)) from error
    declared = _leaves(stored)
    restored = {name: np.asarray(leaf)
                for name, leaf in _leaves(params).items()}

    def read(name: str) -> np.ndarray:
        # restore_checkpoint returns JAX arrays, so without jax_enable_x64 a
        # float64 leaf comes back narrowed: refuse it rather than pass it on.
        kept, found = np.dtype(declared[name].dtype), restored[name].dtype
        if kept != found:
            raise WeightsError(
                f"{where}: source {name!r} is stored as {kept}, which JAX "
                f"restores as {found} (is jax_enable_x64 off?)")
        return restored[name]

    return _assemble(where, expected, restored, read, mapping, strict=strict,
                     cast=cast)


def torch_mapping(expected: Params, *, renames: Mapping[str, str] | None = None
                  ) -> dict[str, tuple[str, Transform]]:
    """The usual PyTorch names and layouts for a flax-style tree.

    A convenience only, encoding one convention; edit its result, or pass
    any explicit mapping instead, to use another. Layer paths turn ``'/'``
    into ``'.'`` (or take their ``renames`` entry), and per leaf:

    * ``<layer>/kernel`` -> ``<layer>.weight``: 2-d ``out_in_to_in_out``
      (Linear), 4-d ``oihw_to_hwio`` (Conv2d), other ranks the same
      ``[out, in, *spatial] -> [*spatial, in, out]`` axes (Conv1d/3d);
    * ``<layer>/scale`` (norms), ``<layer>/embedding`` -> ``<layer>.weight``;
    * ``<layer>/<other>`` (e.g. ``bias``) -> ``<layer>.<other>``, unchanged.

    Args:
        expected: the target tree (arrays or ``jax.ShapeDtypeStruct``).
        renames: target layer path (``'/'``-joined) -> source prefix, e.g.
            ``{"Conv_0": "features.0"}``; other layers keep their path.

    Returns:
        A mapping for the loaders and :func:`save_safetensors`.

    Raises:
        WeightsError: a ``renames`` key is no layer of ``expected``, or a
            kernel has a rank with no PyTorch layout (1-d).
    """
    leaves = _leaves(expected)
    renames = dict(renames or {})
    layers = {target.rpartition("/")[0] for target in leaves}
    unknown = sorted(set(renames) - layers)
    if unknown:
        raise WeightsError(
            f"renames names paths that are not layers of the expected tree: "
            f"{', '.join(map(repr, unknown))}; layers are "
            f"{_listing(layers, unknown[0])}")
    mapping: dict[str, tuple[str, Transform]] = {}
    for target, leaf in leaves.items():
        layer, _, name = target.rpartition("/")
        prefix = renames.get(layer, layer.replace("/", "."))
        prefix = f"{prefix}." if prefix else ""
        transform: Transform = "identity"
        if name == "kernel":
            ndim = len(leaf.shape)
            if ndim < 2:
                raise WeightsError(f"leaf {target!r}: no PyTorch layout for a "
                                   f"{ndim}-d kernel")
            # PyTorch [out, in, *spatial] -> flax [*spatial, in, out].
            transform = {2: "out_in_to_in_out", 4: "oihw_to_hwio"}.get(
                ndim, (*range(2, ndim), 1, 0))
        source = "weight" if name in ("kernel", "scale", "embedding") else name
        mapping[target] = (prefix + source, transform)
    return mapping


def save_safetensors(path: os.PathLike[str] | str, params: Params, *,
                     mapping: WeightMapping | None = None,
                     metadata: Mapping[str, str] | None = None
                     ) -> pathlib.Path:
    """Write ``params`` as a safetensors file, inverting ``mapping``.

    Each leaf is stored under its source name, laid out back through the
    inverse of its transform, so ``load_safetensors(path, params,
    mapping=mapping)`` gives ``params`` back bit for bit. The file is written
    to a temporary sibling and renamed into place.

    Args:
        path: the file to write (replaced if it exists).
        params: the parameter tree.
        mapping: as for :func:`load_safetensors`.
        metadata: string key/value pairs for the file's header.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        WeightsError: the mapping is invalid, a transform does not fit a
            leaf's rank (the message names the leaf), or two leaves map to
            one source name.
    """
    leaves = _leaves(jax.device_get(params))
    tensors: dict[str, np.ndarray] = {}
    owners: dict[str, str] = {}
    for target, (source, transform, axes) in _plan(leaves, mapping).items():
        leaf = np.asarray(leaves[target])
        if source in owners:
            raise WeightsError(f"leaves {owners[source]!r} and {target!r} "
                               f"both map to source name {source!r}")
        if axes is not None and leaf.ndim != len(axes):
            raise WeightsError(
                f"leaf {target!r}: transform {transform!r} needs a "
                f"{len(axes)}-d tensor, but the leaf has shape {leaf.shape}")
        owners[source] = target
        inverse = None if axes is None else tuple(np.argsort(axes))
        tensors[source] = np.ascontiguousarray(
            leaf if inverse is None else np.transpose(leaf, inverse))
    data = safetensors.numpy.save(tensors,
                                  metadata=dict(metadata or {}) or None)
    return atomic_write(pathlib.Path(path).expanduser(), data)
