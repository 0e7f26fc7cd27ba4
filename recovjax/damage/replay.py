"""Fault lists: the concrete faults of one damaged model, saved and replayed.

A damage operator draws its faults from a key; a *fault list* is what it
drew, written out: for every leaf, the flat positions of the damaged
entries and their stored bits before and after. Read back, it is a damage
operator again (:func:`replay`), which needs no key:

    damage = op(key, params, 0.01)
    faults = fault_list(params, damage)
    save_faults("faults.safetensors", faults, metadata={"op": "flip_bits"})
    again = replay(load_faults("faults.safetensors"))(None, params)
    # again.params == damage.params, bit for bit

Replayed into *another* version of the model (the same architecture after
recovery, say), ``kind="bits"`` applies the same faults to the same
locations: the bits that changed (``before ^ after``) are flipped again
wherever the new model stores them, as a stuck memory cell would corrupt
whatever is written there; ``kind="values"`` writes the faulty values
themselves (a zeroed weight is zero again). Every leaf of the list must be
in the model with the same shape and dtype width; the error names it.

**File format** (version :data:`VERSION`): a safetensors file (the
``safetensors`` library) whose header metadata holds
``"format": "recovjax-faults"``, ``"version"``, ``"kind"`` and
``"leaves"`` (JSON: ``{path: {"shape": [...], "dtype": "float32"}}``, in
the model's flattening order) and any string metadata the caller adds.
For each leaf ``P`` there are three tensors: ``P::index`` (``int64``,
ascending flat indices of the damaged entries), ``P::before`` and
``P::after`` (the stored bits of those entries, unsigned integers of the
dtype's width: ``uint32`` for float32, ``uint16`` for bfloat16 and
float16). Bit positions are those of the leaf's own dtype (0 = least
significant). A leaf without faults has empty tensors. A list made with
``format=`` (faults in a deployed format's codes) also holds
``P::code_before`` and ``P::code_after``: the entries' codes in that
format, in its own layout (``uint8`` for int8, int4 and float8), and its
metadata names ``stored_format`` and ``granularity``.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from recovjax._types import Array, Damage, Params
from recovjax.damage.scope import leaf_paths

FORMAT = "recovjax-faults"
"""The ``format`` entry of a fault file's metadata."""

VERSION = 1
"""The version of the fault file format this module writes and reads."""

KINDS = ("bits", "values")


class LeafFaults(NamedTuple):
    """The faults of one leaf.

    Attributes:
        shape: the leaf's shape.
        dtype: the leaf's dtype name.
        index: ``int64[k]`` ascending flat indices of the damaged entries.
        before: their stored bits before the damage.
        after: their stored bits after it.
        code_before: with a deployed format, the entries' codes in that
            format before the damage (its own layout: int8 codes as
            ``uint8``, ...), or ``None``.
        code_after: their codes after it, or ``None``.
    """

    shape: tuple[int, ...]
    dtype: str
    index: np.ndarray
    before: np.ndarray
    after: np.ndarray
    code_before: np.ndarray | None = None
    code_after: np.ndarray | None = None

    @property
    def changed_bits(self) -> np.ndarray:
        """``before ^ after``: the bits each fault changed."""
        return self.before ^ self.after


class FaultList(NamedTuple):
    """The faults of one damaged model.

    Attributes:
        leaves: leaf path -> :class:`LeafFaults`, in flattening order.
        kind: ``"bits"`` or ``"values"``: how :func:`replay` applies them.
        metadata: string metadata (the operator, its amount, ...).
    """

    leaves: dict[str, LeafFaults]
    kind: str = "bits"
    metadata: dict[str, str] = {}

    @property
    def count(self) -> int:
        """Damaged entries over every leaf."""
        return sum(int(leaf.index.size) for leaf in self.leaves.values())


def _uint(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    return np.dtype(f"uint{8 * dtype.itemsize}")


def _bits(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    return values.view(_uint(values.dtype)) if values.dtype.kind != "b" \
        else values.astype(np.uint8)


def fault_list(params: Params, damage: Damage, *, kind: str = "bits",
               metadata: Mapping[str, str] | None = None,
               format: str | None = None, granularity: str = "tensor"
               ) -> FaultList:
    """The concrete faults of ``damage`` (one model, not a stack).

    Args:
        params: the parameters before the damage.
        damage: the operator's result on ``params``.
        kind: ``"bits"`` (replay flips the bits that changed) or
            ``"values"`` (replay writes the damaged values).
        metadata: strings to keep with the list.
        format: the deployed format the damage hit (``format=`` of a bit
            fault): the list then also holds each damaged entry's codes in
            that format before and after (``code_before``,
            ``code_after``), so bit positions read in the format's own
            layout. The codes after are those of the damaged values at the
            clean weights' scales. Replay still applies the leaf's own
            bits, exactly.
        granularity: the format's scales, ``"tensor"`` or ``"channel"``.

    Raises:
        ValueError: for an unknown kind, or a damage whose structure or
            shapes are not those of ``params`` (a stack of damaged models,
            for instance: take one with ``jax.tree.map(lambda x: x[i], ...)``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got "
                         f"{kind!r}")
    from recovjax.damage import formats
    fmt = None if format is None else formats.get_format(format, granularity)
    before_leaves, treedef = jax.tree.flatten(params)
    after_leaves, after_def = jax.tree.flatten(damage.params)
    mask_leaves, mask_def = jax.tree.flatten(damage.mask)
    if after_def != treedef or mask_def != treedef:
        raise ValueError("damage: its params and mask need the structure of "
                         "params")
    leaves = {}
    for path, before, after, mask in zip(leaf_paths(params), before_leaves,
                                         after_leaves, mask_leaves):
        before, after, mask = (np.asarray(a) for a in (before, after, mask))
        if after.shape != before.shape or mask.shape != before.shape:
            raise ValueError(f"damage: leaf {path!r} has shape {after.shape} "
                             f"(mask {mask.shape}), params {before.shape}: "
                             "one damaged model at a time")
        index = np.flatnonzero(mask).astype(np.int64)
        codes = (None, None)
        if fmt is not None and np.issubdtype(before.dtype, np.floating):
            codes = _codes(before, after, index, fmt)
        leaves[path] = LeafFaults(
            tuple(before.shape), before.dtype.name, index,
            _bits(before.ravel()[index]),
            _bits(after.astype(before.dtype).ravel()[index]), *codes)
    extra = dict(metadata or {})
    if fmt is not None:
        extra.setdefault("stored_format", fmt.name)
        extra.setdefault("granularity", fmt.granularity)
    return FaultList(leaves, kind, extra)


def _codes(before: np.ndarray, after: np.ndarray, index: np.ndarray, fmt
           ) -> tuple[np.ndarray, np.ndarray]:
    # The entries' codes in fmt before and after, at the clean scales.
    from recovjax.damage import formats

    def both(clean, damaged):
        encoded = formats.encode(clean, fmt)
        return encoded.codes, formats.codes_at_scale(damaged, fmt,
                                                     encoded.scale)

    code_before, code_after = jax.jit(both)(before, after)
    return (np.asarray(code_before).ravel()[index],
            np.asarray(code_after).ravel()[index])


def save_faults(path: os.PathLike[str] | str, faults: FaultList,
                metadata: Mapping[str, str] | None = None) -> pathlib.Path:
    """Write ``faults`` to ``path`` (safetensors; see the module docstring).

    The file is written whole or not at all (a temporary file renamed).

    Raises:
        ValueError: for metadata that are not strings or that use a
            reserved key.
    """
    from safetensors.numpy import save

    from recovjax._io import atomic_write
    extra = {**faults.metadata, **dict(metadata or {})}
    reserved = {"format", "version", "kind", "leaves"} & set(extra)
    if reserved:
        raise ValueError(f"metadata: {sorted(reserved)} are reserved keys")
    bad = [k for k, v in extra.items()
           if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"metadata: keys and values must be strings "
                         f"({bad!r})")
    tensors = {}
    for name, leaf in faults.leaves.items():
        tensors[f"{name}::index"] = np.ascontiguousarray(leaf.index)
        tensors[f"{name}::before"] = np.ascontiguousarray(leaf.before)
        tensors[f"{name}::after"] = np.ascontiguousarray(leaf.after)
        if leaf.code_before is not None:
            tensors[f"{name}::code_before"] = np.ascontiguousarray(
                leaf.code_before)
            tensors[f"{name}::code_after"] = np.ascontiguousarray(
                leaf.code_after)
    header = {"format": FORMAT, "version": str(VERSION),
              "kind": faults.kind,
              "leaves": json.dumps({name: {"shape": list(leaf.shape),
                                           "dtype": leaf.dtype}
                                    for name, leaf in faults.leaves.items()}),
              **extra}
    path = pathlib.Path(path)
    atomic_write(path, save(tensors, metadata=header))
    return path


def load_faults(path: os.PathLike[str] | str) -> FaultList:
    """Read a fault list written by :func:`save_faults`.

    Raises:
        FileNotFoundError: naming a missing file.
        ValueError: naming the file when it is not a fault list, is of
            another version, or is inconsistent.
    """
    from safetensors import SafetensorError, safe_open
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fault list there")
    try:
        with safe_open(str(path), framework="numpy") as file:
            header = dict(file.metadata() or {})
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a fault list ({error})") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fault list (format "
                         f"{header.get('format')!r}, want {FORMAT!r})")
    if header.get("version") != str(VERSION):
        raise ValueError(f"{path}: fault list version "
                         f"{header.get('version')!r}; this recovjax reads "
                         f"version {VERSION}")
    kind = header.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{path}: kind {kind!r} is not one of "
                         f"{', '.join(KINDS)}")
    try:
        shapes = json.loads(header["leaves"])
        leaves = {}
        for name, spec in shapes.items():
            index, before, after = (tensors[f"{name}::{part}"] for part in
                                    ("index", "before", "after"))
            if not (index.shape == before.shape == after.shape):
                raise ValueError(f"leaf {name!r}: index, before and after "
                                 "differ in length")
            codes = (tensors.get(f"{name}::code_before"),
                     tensors.get(f"{name}::code_after"))
            if (codes[0] is None) != (codes[1] is None) or (
                    codes[0] is not None
                    and not (codes[0].shape == codes[1].shape
                             == index.shape)):
                raise ValueError(f"leaf {name!r}: code_before and "
                                 "code_after do not match the index")
            leaves[name] = LeafFaults(tuple(spec["shape"]), spec["dtype"],
                                      index.astype(np.int64), before, after,
                                      *codes)
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: inconsistent fault list ({error!r} "
                         "missing or malformed)") from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    metadata = {k: v for k, v in header.items()
                if k not in ("format", "version", "kind", "leaves")}
    return FaultList(leaves, kind, metadata)


def _apply(leaf: Array, faults: LeafFaults, kind: str) -> tuple[Array, Array]:
    uint = _uint(leaf.dtype)
    flat = jnp.ravel(leaf)
    index = jnp.asarray(faults.index)
    if leaf.dtype == jnp.bool_:
        bits = flat.astype(jnp.uint8)
    else:
        bits = jax.lax.bitcast_convert_type(flat, uint)
    if kind == "bits":
        new = bits.at[index].set(bits[index] ^ jnp.asarray(
            faults.changed_bits, uint))
    else:
        new = bits.at[index].set(jnp.asarray(faults.after, uint))
    values = new.astype(jnp.bool_) if leaf.dtype == jnp.bool_ else \
        jax.lax.bitcast_convert_type(new, leaf.dtype)
    mask = jnp.zeros(flat.shape, jnp.bool_).at[index].set(True)
    return values.reshape(leaf.shape), mask.reshape(leaf.shape)


def replay(faults: FaultList):
    """A damage operator that applies ``faults`` (no randomness).

    Returns:
        ``op(key, params, amount=None, *, info=None) -> Damage``: the key
        (``None`` will do), amount and info are accepted for the operator
        protocol and not used. The mask marks exactly the listed entries. Leaves of
        ``params`` the list does not name are unchanged.

    The returned operator raises ``ValueError`` naming a listed leaf that
    ``params`` lacks or whose shape differs, and ``TypeError`` for a dtype
    of another width than the list's.
    """

    def op(key: Any, params: Params, amount: Any = None, *,
           info: Any = None) -> Damage:
        del key, amount, info
        if params is None:
            raise ValueError("params: the model to replay the faults into")
        leaves, treedef = jax.tree.flatten(params)
        paths = leaf_paths(params)
        missing = sorted(set(faults.leaves) - set(paths))
        if missing:
            raise ValueError(f"params: no leaf {missing[0]!r} to replay its "
                             f"faults into (the model has {len(paths)} "
                             f"leaves, e.g. {paths[:3]})")
        new, masks = [], []
        for path, leaf in zip(paths, leaves):
            leaf = jnp.asarray(leaf)
            listed = faults.leaves.get(path)
            if listed is None:
                new.append(leaf)
                masks.append(jnp.zeros(leaf.shape, jnp.bool_))
                continue
            if tuple(leaf.shape) != listed.shape:
                raise ValueError(f"params: leaf {path!r} has shape "
                                 f"{tuple(leaf.shape)}; the faults were "
                                 f"listed for {listed.shape}")
            if _uint(leaf.dtype) != _uint(listed.dtype):
                raise TypeError(f"params: leaf {path!r} is {leaf.dtype}; "
                                f"the faults were listed in {listed.dtype} "
                                "bits")
            value, mask = _apply(leaf, listed, faults.kind)
            new.append(value)
            masks.append(mask)
        return Damage(jax.tree.unflatten(treedef, new),
                      jax.tree.unflatten(treedef, masks))

    op.__name__ = op.__qualname__ = "replay_faults"
    op.damage_kind = "params"
    return op


__all__ = ["FORMAT", "FaultList", "KINDS", "LeafFaults", "VERSION",
           "fault_list", "load_faults", "replay", "save_faults"]
