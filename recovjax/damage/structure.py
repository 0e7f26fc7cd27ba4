"""Structural damage, expressed as parameters plus a mask so that it vmaps.

Removing a unit, a block or an attention head is done by zeroing exactly
the parameters that produce it (and that consume it), so networks need no
extra inputs: the damaged parameters compute the same function as the
network with the unit absent. ``Damage.mask`` marks every zeroed entry.

Which parameters belong to a unit is read from the model's leaf metadata
(``info=model.info``, see :mod:`recovjax.models.info`), never from leaf
names:

* ``remove_neurons``: output unit ``u`` of a producer layer (a dense unit
  or a convolution channel) is the slice ``u`` of its kernel's output axis
  and of its bias, plus every normalisation that *follows* it (batch-norm
  scale and offset ``[u]``), plus the consumer layer's input rows that read
  it: the rows ``i`` with ``i % units == u`` when the producer's
  activations keep their channels last (``NHWC`` then flatten), ``i //
  (rows / units) == u`` when first (``CHW``). Producer/consumer pairs come
  from the model's dataflow (a layer *feeds* the next when the second reads
  the first alone); the classifier never loses outputs.
* ``drop_blocks``: every leaf under a module path that matches a pattern
  (``block\\d+``) is zeroed and masked, so a residual block ``x + f(x)``
  computes the identity and retraining cannot revive it.
* ``remove_heads``: in every attention module, head ``h`` is the slice
  ``h`` of the heads axis (``head_axis``) of each projection; an output
  bias shared by all heads is kept.

A removed unit stays removed only as long as its entries stay zero.
Recovery that retrains the network must keep them at zero (multiply
updates by ``~mask``, or call :func:`silence_removed` after each step)
unless it deliberately rebuilds the unit.
"""

from __future__ import annotations

import re
from typing import Literal, Mapping, Sequence

import jax
import jax.numpy as jnp

from recovjax._types import Array, Damage, Mask, Params, PRNGKey
from recovjax.damage import select
from recovjax.damage.params import (DamageFn, Mode, RatioOver, check_choice,
                                    make_operator, make_zero, operator_doc)
from recovjax.damage.scope import ScopeLike, leaf_paths
from recovjax.models.info import (BIAS, KERNEL, InfoError, LeafInfo,
                                  how_to_declare, require_roles)

Layers = Sequence[str] | Sequence[tuple[str, "str | None"]]
"""A chain of layer paths, or explicit ``(producer, consumer)`` pairs."""

Infos = Mapping[str, LeafInfo]

UNIT_TARGETS = ("random", "smallest_norm")


def silence_removed(params: Params, mask: Mask) -> Params:
    """Zero every masked entry: keeps removed structure removed.

    Args:
        params: parameters (e.g. after an optimiser step).
        mask: a ``Damage.mask`` of the same structure.

    Returns:
        ``params`` with masked entries set to zero.
    """
    return jax.tree.map(
        lambda leaf, m: jnp.where(m, jnp.zeros((), leaf.dtype), leaf),
        params, mask)


# --------------------------------------------------------------------------
# Helpers shared by the structural operators.
# --------------------------------------------------------------------------


def _require_infos(infos: Infos | None, operation: str) -> Infos:
    if infos is None:
        raise InfoError(
            f"{operation} reads which leaves make a unit from the model's "
            f"leaf metadata: call it with info=model.info (a model from "
            f"recovjax.models.from_linen, from_nnx, from_equinox or "
            f"from_apply)")
    return infos


def _leaves_by_path(params: Params) -> dict[str, Array]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return dict(zip(leaf_paths(params), (leaf for _, leaf in flat)))


def _damage_from_masks(params: Params, masks: dict[str, list[Array]]
                       ) -> Damage:
    leaves, treedef = jax.tree.flatten(params)
    new, mask_leaves = [], []
    for path, leaf in zip(leaf_paths(params), leaves):
        leaf = jnp.asarray(leaf)
        parts = masks.get(path)
        if parts:
            mask = parts[0]
            for part in parts[1:]:
                mask = mask | part
            mask = jnp.broadcast_to(mask, leaf.shape)
            new.append(jnp.where(mask, jnp.zeros((), leaf.dtype), leaf))
        else:
            mask = jnp.zeros(leaf.shape, jnp.bool_)
            new.append(leaf)
        mask_leaves.append(mask)
    return Damage(params=jax.tree.unflatten(treedef, new),
                  mask=jax.tree.unflatten(treedef, mask_leaves))


def _along(values: Array, axis: int, ndim: int) -> Array:
    # ``values`` indexed along ``axis`` of an ``ndim``-dimensional leaf.
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return values.reshape(shape)


def _choose_units(key: PRNGKey, ratio: Array, unit_counts: Sequence[int],
                  norms: Sequence[Array] | None) -> list[Array]:
    # Exactly floor(units * ratio) units of each group: keyed, or those of
    # smallest norm (ties to the lowest index).
    counts = jnp.stack([select.count_of(n, ratio) for n in unit_counts])
    if norms is None:
        return select.select_random(key, unit_counts, counts)
    return select.select_smallest_magnitude(norms, counts)


def _check_unit_target(target: str) -> None:
    check_choice("target", target, UNIT_TARGETS)


def _unit_squares(leaf: Array, axis: int) -> Array:
    # Per-unit sum of squares along ``axis``.
    moved = jnp.moveaxis(jnp.asarray(leaf).astype(jnp.float32), axis, 0)
    return jnp.sum(jnp.square(moved).reshape(moved.shape[0], -1), axis=1)


# --------------------------------------------------------------------------
# Neurons and channels.
# --------------------------------------------------------------------------


def _kernel_of(infos: Infos, layer: str) -> str:
    kernels = [path for path, info in infos.items()
               if info.layer == layer and info.role == KERNEL]
    if len(kernels) != 1:
        layers = sorted({info.layer for info in infos.values()
                         if info.role == KERNEL and info.layer is not None})
        raise ValueError(
            f"layer {layer!r} has {'no' if not kernels else 'several'} "
            f"kernel leaves{'' if not kernels else ' ' + str(kernels)}; "
            f"layers with one kernel: {', '.join(layers) or 'none'}")
    return kernels[0]


def infer_layers(infos: Infos) -> tuple[tuple[str, str], ...]:
    """The ``(producer, consumer)`` links of a model, from its leaf metadata.

    A link is a kernel layer whose output units only the next layer reads
    (``LeafInfo.feeds``, filled in from the model's dataflow), in the
    order of the parameters.

    Args:
        infos: ``{path: LeafInfo}`` (``model.infos``).

    Returns:
        Pairs such as ``(("Conv_0", "Conv_1"), ("Conv_1", "Dense_0"))``.

    Raises:
        ValueError: if the model has no such link (a network whose every
            layer feeds a residual stream); pass ``layers`` explicitly then.
    """
    feeds = {}
    for info in infos.values():
        if info.role == KERNEL and info.feeds is not None:
            feeds.setdefault(info.layer, info.feeds)
    # Chains in dataflow order: from each layer no other feeds, follow on.
    pairs = []
    for start in [layer for layer in feeds if layer not in feeds.values()]:
        layer = start
        while layer in feeds and (layer, feeds[layer]) not in pairs:
            pairs.append((layer, feeds[layer]))
            layer = feeds[layer]
    if not pairs:
        raise ValueError(
            "no layer of the model feeds its units to exactly one next "
            "layer (a chain link), so there are no neurons to remove; pass "
            "layers=[(producer, consumer), ...], declare LeafInfo.feeds "
            "with model.with_info, or use drop_blocks / remove_heads")
    return tuple(pairs)


def _normalise_layers(layers: Layers | None
                      ) -> tuple[tuple[str, str | None], ...] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        raise TypeError("layers must be a sequence of layer paths or of "
                        "(producer, consumer) pairs, not a string")
    layers = list(layers)
    if not layers:
        raise ValueError("layers must name at least one producer layer")
    if all(isinstance(entry, str) for entry in layers):
        if len(layers) < 2:
            raise ValueError("a layer chain needs at least two layers (the "
                             "last one keeps its outputs)")
        return tuple(zip(layers[:-1], layers[1:]))
    pairs = []
    for entry in layers:
        if (not isinstance(entry, (tuple, list)) or len(entry) != 2
                or not isinstance(entry[0], str)
                or not (entry[1] is None or isinstance(entry[1], str))):
            raise TypeError(f"layers entries must be (producer, consumer) "
                            f"pairs of paths (consumer may be None), got "
                            f"{entry!r}")
        pairs.append((entry[0], entry[1]))
    return tuple(pairs)


def _single_axis(info: LeafInfo, path: str, which: str) -> int:
    axes = info.out_axes if which == "output" else info.in_axes
    if len(axes) != 1:
        raise InfoError(f"leaf {path!r} has {len(axes)} {which} axes "
                        f"{axes}; neuron removal needs exactly one; "
                        f"{how_to_declare(path)}")
    return axes[0]


def _unit_members(infos: Infos, leaves: Mapping[str, Array], producer: str,
                  units: int) -> list[tuple[str, int]]:
    # (path, unit axis) of every leaf that holds the producer's units; a
    # leaf of the producer whose role is unknown is an error, not skipped.
    owned = [path for path, info in infos.items()
             if info.layer == producer or info.follows == producer]
    require_roles(infos, owned, "remove_neurons")
    members = []
    for path in owned:
        info = infos[path]
        if info.layer == producer and info.role not in (KERNEL, BIAS):
            continue  # e.g. a scale the layer applies to all its units
        axis = _single_axis(info, path, "output")
        shape = leaves[path].shape
        if axis >= len(shape) or shape[axis] != units:
            raise InfoError(
                f"leaf {path!r} (shape {tuple(shape)}) belongs to the units "
                f"of layer {producer!r} but has no axis {axis} of its "
                f"{units} units; {how_to_declare(path)}")
        members.append((path, axis))
    return members


def make_remove_neurons(layers: Layers | None = None, *,
                        target: Literal["random", "smallest_norm"] = "random"
                        ) -> DamageFn:
    """Build an operator that removes dense units and conv output channels.

    In every producer layer exactly ``floor(units * ratio)`` output units
    are removed: the unit's kernel slice and bias, the entries of the
    normalisations that follow the layer, and the consumer's input rows
    that read it are zeroed and masked, so the network computes what it
    would without the unit (see the module docstring).

    Args:
        layers: ``None`` for every chain link of the model (from its
            dataflow, see :func:`infer_layers`); a chain of layer paths
            (``["Conv_0", "Conv_1", "Dense_0"]``, the last keeps its
            outputs); or ``(producer, consumer)`` pairs of layer paths
            such as ``("block0/conv_a", "block0/conv_b")`` (a consumer of
            ``None`` zeroes only the producer's outputs).
        target: ``"random"`` (keyed, uniform without replacement) or
            ``"smallest_norm"`` (structured magnitude pruning: units whose
            kernel slice and bias have the smallest L2 norm).

    Returns:
        ``op(key, params, ratio, *, info) -> Damage``.

    Raises:
        ValueError: for an unknown target or malformed ``layers`` now; when
            called, for a bad ratio, a missing layer, or a consumer whose
            input size is not a multiple of the producer's units.
        InfoError: when called without ``info``, or on leaves whose role
            or axes are not known.
        TypeError: for ``layers`` entries of the wrong type.
    """
    pairs = _normalise_layers(layers)
    _check_unit_target(target)

    def remove(key: PRNGKey, params: Params, ratio: Array,
               infos: Infos | None) -> Damage:
        infos = _require_infos(infos, "remove_neurons")
        graph = pairs if pairs is not None else infer_layers(infos)
        leaves = _leaves_by_path(params)
        units, norms, groups = [], [], []
        for producer, consumer in graph:
            kernel_path = _kernel_of(infos, producer)
            info = infos[kernel_path]
            axis = _single_axis(info, kernel_path, "output")
            count = leaves[kernel_path].shape[axis]
            members = _unit_members(infos, leaves, producer, count)
            squares = sum(_unit_squares(leaves[path], member_axis)
                          for path, member_axis in members
                          if infos[path].layer == producer)
            reader = None
            if consumer is not None:
                reader = _kernel_of(infos, consumer)
                reader_axis = _single_axis(infos[reader], reader, "input")
                if reader_axis >= leaves[reader].ndim:
                    raise InfoError(f"leaf {reader!r} (shape "
                                    f"{leaves[reader].shape}) has no input "
                                    f"axis {reader_axis}; "
                                    f"{how_to_declare(reader)}")
                size = leaves[reader].shape[reader_axis]
                if size % count:
                    raise ValueError(
                        f"layer {consumer!r} reads {size} inputs, not a "
                        f"multiple of the {count} units of {producer!r}")
                reader = (reader, reader_axis, size)
            units.append(count)
            norms.append(squares)
            groups.append((members, reader, info.channels))
        chosen = _choose_units(key, ratio, units,
                               norms if target == "smallest_norm" else None)
        masks: dict[str, list[Array]] = {}
        for (members, reader, channels), unit_mask in zip(groups, chosen):
            for path, axis in members:
                masks.setdefault(path, []).append(
                    _along(unit_mask, axis, leaves[path].ndim))
            if reader is None:
                continue
            path, axis, size = reader
            rows = jnp.arange(size)
            unit_of_row = (rows % unit_mask.size if channels == "last"
                           else rows // (size // unit_mask.size))
            masks.setdefault(path, []).append(
                _along(unit_mask[unit_of_row], axis, leaves[path].ndim))
        return _damage_from_masks(params, masks)

    return make_operator(remove, name="remove_neurons", amount_name="ratio",
                         fraction=True, doc=operator_doc(
                             make_remove_neurons,
                             dict(layers=layers, target=target),
                             "op(key, params, ratio, *, info) -> Damage"))


def make_remove_connections(scope: ScopeLike = "weights", *,
                            mode: Mode = "exact",
                            ratio_over: RatioOver = "leaf",
                            target: Literal["random", "smallest"] = "random"
                            ) -> DamageFn:
    """Build an operator that removes individual connections (unstructured).

    A connection is one kernel entry; removing it zeroes and masks it. This
    is :func:`recovjax.damage.params.make_zero` restricted to kernels, with
    ``target="smallest"`` giving magnitude pruning.

    Args:
        scope: leaves holding connections (default ``"weights"``: kernels).
        mode: ``"exact"`` or ``"bernoulli"``.
        ratio_over: ``"leaf"`` (each layer loses the same fraction) or
            ``"global"`` (one fraction over all connections).
        target: ``"random"`` or ``"smallest"`` (smallest magnitudes first).

    Returns:
        ``op(key, params, ratio) -> Damage``.

    Raises:
        ValueError: as :func:`recovjax.damage.params.make_zero`.
    """
    check_choice("target", target, ("random", "smallest"))
    operator = make_zero(scope, mode=mode, ratio_over=ratio_over,
                         target=target)
    operator.__name__ = operator.__qualname__ = "remove_connections"
    operator.__doc__ = operator_doc(
        make_remove_connections,
        dict(scope=scope, mode=mode, ratio_over=ratio_over, target=target),
        "op(key, params, ratio) -> Damage")
    return operator


# --------------------------------------------------------------------------
# Blocks.
# --------------------------------------------------------------------------


def find_blocks(params: Params, pattern: str) -> tuple[str, ...]:
    """Module paths that fully match ``pattern``, in order of first leaf.

    Each leaf belongs to the shortest prefix of its path (``block2`` of
    ``block2/conv_a/kernel``, ``layers/3`` of ``layers/3/mlp/weight``)
    that matches; blocks are listed in the parameters' flattening order.

    Raises:
        ValueError: if none matches (the message names the pattern and
            shows some module paths).
    """
    compiled = re.compile(pattern)
    blocks = []
    for path in leaf_paths(params):
        block = _block_of(path, compiled)
        if block is not None and block not in blocks:
            blocks.append(block)
    if not blocks:
        modules = sorted({path.rsplit("/", 1)[0] for path in leaf_paths(
            params) if "/" in path})
        shown = ", ".join(modules[:12]) + (" ..." if len(modules) > 12
                                           else "")
        raise ValueError(f"block pattern '{pattern}' matches no module path "
                         f"of the parameters (modules: {shown or 'none'})")
    return tuple(blocks)


def _block_of(path: str, compiled: "re.Pattern[str]") -> str | None:
    parts = path.split("/")[:-1]
    for end in range(1, len(parts) + 1):
        prefix = "/".join(parts[:end])
        if compiled.fullmatch(prefix):
            return prefix
    return None


def make_drop_blocks(pattern: str = r"block\d+") -> DamageFn:
    """Build an operator that drops whole blocks (residual branches).

    Exactly ``floor(blocks * ratio)`` blocks, chosen by key, lose every
    parameter: for a residual block ``x + f(x)`` (``rescnn``'s
    ``relu(x + conv_b(relu(conv_a(x))))``, a transformer block) the branch
    is then zero and the block is the identity on its input, so the damaged
    network equals the one with the block skipped.

    Args:
        pattern: regex that a block's module path matches in full, at any
            depth (default ``block\\d+``; ``layers/\\d+`` for equinox
            lists, ``encoder/layer_\\d+`` for nested ones).

    Returns:
        ``op(key, params, ratio, *, info=None) -> Damage``; the mask marks
        every entry of the dropped blocks.

    Raises:
        ValueError: for an invalid pattern now; when called, for a bad
            ratio or a pattern that matches no module.
    """
    try:
        compiled = re.compile(pattern)
    except (re.error, TypeError) as error:
        raise ValueError(f"block pattern '{pattern}' is not a valid regular "
                         f"expression: {error}") from error

    def drop(key: PRNGKey, params: Params, ratio: Array,
             infos: Infos | None) -> Damage:
        del infos
        blocks = find_blocks(params, pattern)
        chosen = _choose_units(key, ratio, [len(blocks)], None)[0]
        masks: dict[str, list[Array]] = {}
        for path in leaf_paths(params):
            block = _block_of(path, compiled)
            if block is not None:
                masks[path] = [chosen[blocks.index(block)]]
        return _damage_from_masks(params, masks)

    return make_operator(drop, name="drop_blocks", amount_name="ratio",
                         fraction=True, doc=operator_doc(
                             make_drop_blocks, dict(pattern=pattern),
                             "op(key, params, ratio) -> Damage"))


# --------------------------------------------------------------------------
# Attention heads.
# --------------------------------------------------------------------------


def find_attention(infos: Infos) -> dict[str, tuple[str, ...]]:
    """Attention modules and their per-head leaves, from leaf metadata.

    An attention module is the parent module of layers whose leaves have a
    ``head_axis`` (query, key, value and output projections).

    Args:
        infos: ``{path: LeafInfo}``.

    Returns:
        ``{module path: (leaf paths with a head axis, ...)}`` in order.

    Raises:
        ValueError: if no leaf has a head axis.
    """
    found: dict[str, list[str]] = {}
    for path, info in infos.items():
        if info.head_axis is None:
            continue
        layer = info.layer or ""
        module = layer.rsplit("/", 1)[0] if "/" in layer else layer
        found.setdefault(module, []).append(path)
    if not found:
        raise ValueError(
            "no attention module in the parameters: no leaf has a heads "
            "axis (LeafInfo.head_axis); models built from flax "
            "MultiHeadDotProductAttention / DenseGeneral((heads, head_dim)), "
            "nnx MultiHeadAttention or equinox MultiheadAttention have one, "
            "others can declare it with model.with_info")
    return {module: tuple(paths) for module, paths in found.items()}


def make_remove_heads(*, target: Literal["random", "smallest_norm"] = "random"
                      ) -> DamageFn:
    """Build an operator that removes attention heads.

    In every attention module exactly ``floor(heads * ratio)`` heads are
    removed: their slices of the query/key/value kernels and biases and of
    the output kernel are zeroed and masked, so they contribute nothing.

    Args:
        target: ``"random"`` or ``"smallest_norm"`` (heads whose parameters
            have the smallest L2 norm).

    Returns:
        ``op(key, params, ratio, *, info) -> Damage``.

    Raises:
        ValueError: for an unknown target now; when called, for a bad ratio,
            parameters without attention, or inconsistent head counts.
        InfoError: when called without ``info``.
    """
    _check_unit_target(target)

    def remove(key: PRNGKey, params: Params, ratio: Array,
               infos: Infos | None) -> Damage:
        infos = _require_infos(infos, "remove_heads")
        leaves = _leaves_by_path(params)
        modules = find_attention(infos)
        heads, norms, members = [], [], []
        for module, paths in modules.items():
            counts = {infos[path].heads for path in paths}
            if len(counts) != 1:
                raise ValueError(f"attention module {module!r}: its leaves "
                                 f"disagree on the number of heads "
                                 f"({sorted(counts)})")
            (count,) = counts
            group, squares = [], jnp.zeros((count,), jnp.float32)
            for path in paths:
                axis = infos[path].head_axis
                size = leaves[path].shape[axis]
                if size % count:
                    raise ValueError(
                        f"{path} of shape {leaves[path].shape} cannot split "
                        f"axis {axis} into {count} heads")
                head_of = jnp.arange(size) // (size // count)
                group.append((path, axis, head_of))
                squares = squares + jax.ops.segment_sum(
                    _unit_squares(leaves[path], axis), head_of,
                    num_segments=count)
            heads.append(count)
            norms.append(squares)
            members.append(group)
        chosen = _choose_units(key, ratio, heads,
                               norms if target == "smallest_norm" else None)
        masks: dict[str, list[Array]] = {}
        for group, head_mask in zip(members, chosen):
            for path, axis, head_of in group:
                masks[path] = [_along(head_mask[head_of], axis,
                                      leaves[path].ndim)]
        return _damage_from_masks(params, masks)

    return make_operator(remove, name="remove_heads", amount_name="ratio",
                         fraction=True, doc=operator_doc(
                             make_remove_heads, dict(target=target),
                             "op(key, params, ratio, *, info) -> Damage"))


# --------------------------------------------------------------------------
# Ready-made operators.
# --------------------------------------------------------------------------

remove_neurons = make_remove_neurons()
"""Remove ``floor(units * ratio)`` random units of every hidden layer."""

remove_connections = make_remove_connections()
"""Remove ``floor(n * ratio)`` random kernel entries of every layer."""

drop_blocks = make_drop_blocks()
"""Drop ``floor(blocks * ratio)`` random residual blocks."""

remove_heads = make_remove_heads()
"""Remove ``floor(heads * ratio)`` random heads of every attention layer."""
