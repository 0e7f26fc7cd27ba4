"""Structural damage, expressed as parameters plus a mask so that it vmaps.

Removing a unit, a residual block or an attention head is done by zeroing
exactly the parameters that produce it (and that consume it), so the
shipped networks need no extra inputs: the damaged parameters compute the
same function as the network with the unit absent. ``Damage.mask`` marks
every zeroed entry.

A removed unit stays removed only as long as its entries stay zero.
Recovery that retrains the network must keep them at zero (multiply
updates by ``~mask``, or call :func:`silence_removed` after each step)
unless it deliberately rebuilds the unit.

Which parameters belong to a unit:

* ``remove_neurons``: output unit ``u`` of a producer layer (a dense unit or
  a convolution output channel) is ``kernel[..., u]`` and ``bias[u]``, plus
  the consumer layer's input rows that read it: ``kernel[:, :, u, :]`` for
  a convolution consumer, and for a dense consumer every row ``i`` with
  ``i % units == u`` (the NHWC flatten order puts the channel last, so a
  conv -> flatten -> dense consumer reads channel ``u`` at ``(h * W + w) *
  C + u``). For ``lenet5`` and ``mlp`` the chain is read off the tree:
  top-level layers in natural name order (``conv1, conv2, fc1, fc2, fc3``)
  and the last layer (the classifier) never loses outputs.
* ``drop_blocks``: a residual block ``x + conv_b(relu(conv_a(x)))`` becomes
  the identity when its branch is zero: every leaf of the block (``conv_a``
  and ``conv_b``) is zeroed and masked, so retraining cannot revive it.
* ``remove_heads``: head ``h`` of a ViT attention layer is
  ``{query,key,value}/kernel[:, h]``, ``{query,key,value}/bias[h]`` and
  ``out/kernel[h]``; ``out/bias`` is shared by all heads and kept.
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

Layers = Sequence[str] | Sequence[tuple[str, "str | None"]]
"""A chain of layer paths, or explicit ``(producer, consumer)`` pairs."""

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


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part
            for part in re.split(r"(\d+)", name)]


def _subtree(params: Params, path: str):
    node = params
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"no layer {path!r} in the parameters")
        node = node[part]
    return node


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


# --------------------------------------------------------------------------
# Neurons and channels.
# --------------------------------------------------------------------------


def infer_layers(params: Params) -> tuple[tuple[str, str | None], ...]:
    """The ``(producer, consumer)`` chain of a plain feed-forward tree.

    Works for trees whose top-level entries are all layers with a
    ``kernel`` (and optionally a ``bias``), such as ``lenet5`` and ``mlp``:
    layers are chained in natural name order (``conv1 < conv2 < fc1 < fc2
    < fc10``) and the last one (the classifier) is never a producer.

    Args:
        params: the parameter tree.

    Returns:
        Pairs ``((conv1, conv2), (conv2, fc1), ...)``.

    Raises:
        ValueError: if some top-level entry is not such a layer (e.g. the
            residual CNN or the ViT); pass ``layers`` explicitly then.
    """
    if not isinstance(params, Mapping):
        raise ValueError("cannot infer layers of a non-dict parameter tree; "
                         "pass layers=[(producer, consumer), ...]")
    names = sorted(params, key=_natural_key)
    odd = [name for name in names
           if not (isinstance(params[name], Mapping)
                   and "kernel" in params[name]
                   and set(params[name]) <= {"kernel", "bias"})]
    if odd or len(names) < 2:
        raise ValueError(
            "cannot infer a layer chain: top-level entries "
            f"{', '.join(odd) or 'fewer than two layers'} are not plain "
            "kernel/bias layers; pass layers=[(producer, consumer), ...] "
            "(or use drop_blocks / remove_heads for residual blocks and "
            "attention heads)")
    return tuple(zip(names[:-1], names[1:]))


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


def _input_axis(kernel: Array) -> int:
    # HWIO convolution kernels read their input on axis 2, dense and
    # DenseGeneral kernels on axis 0.
    return 2 if kernel.ndim == 4 else 0


def make_remove_neurons(layers: Layers | None = None, *,
                        target: Literal["random", "smallest_norm"] = "random"
                        ) -> DamageFn:
    """Build an operator that removes dense units and conv output channels.

    In every producer layer exactly ``floor(units * ratio)`` output units
    are removed: the unit's kernel column and bias and the consumer's input
    rows that read it are zeroed and masked, so the network computes what
    it would without the unit (see the module docstring).

    Args:
        layers: ``None`` to infer the chain from the tree (``lenet5``,
            ``mlp``); a chain of layer paths (``["conv1", "conv2", "fc1"]``,
            the last keeps its outputs); or ``(producer, consumer)`` pairs
            of paths such as ``("block0/conv_a", "block0/conv_b")`` (a
            consumer of ``None`` zeroes only the producer's outputs).
        target: ``"random"`` (keyed, uniform without replacement) or
            ``"smallest_norm"`` (structured magnitude pruning: units whose
            incoming kernel column and bias have the smallest L2 norm).

    Returns:
        ``op(key, params, ratio) -> Damage``.

    Raises:
        ValueError: for an unknown target or malformed ``layers`` now; when
            called, for a bad ratio, a missing layer, or a consumer whose
            input size does not match the producer's units.
        TypeError: for ``layers`` entries of the wrong type.
    """
    pairs = _normalise_layers(layers)
    _check_unit_target(target)

    def remove(key: PRNGKey, params: Params, ratio: Array) -> Damage:
        graph = pairs if pairs is not None else infer_layers(params)
        leaves = _leaves_by_path(params)
        units, norms = [], []
        for producer, consumer in graph:
            group = _subtree(params, producer)
            if not isinstance(group, Mapping) or "kernel" not in group:
                raise ValueError(f"layer {producer!r} has no kernel")
            kernel = jnp.asarray(group["kernel"])
            if kernel.ndim < 2:
                raise ValueError(f"layer {producer!r}: kernel of shape "
                                 f"{kernel.shape} has no unit axis")
            count = kernel.shape[-1]
            units.append(count)
            squares = jnp.sum(jnp.square(kernel.astype(jnp.float32)).reshape(
                -1, count), axis=0)
            if "bias" in group:
                squares = squares + jnp.square(
                    jnp.asarray(group["bias"]).astype(jnp.float32))
            norms.append(squares)
            if consumer is not None:
                reader = _subtree(params, consumer)
                if not isinstance(reader, Mapping) or "kernel" not in reader:
                    raise ValueError(f"layer {consumer!r} has no kernel")
                reader_kernel = jnp.asarray(reader["kernel"])
                size = reader_kernel.shape[_input_axis(reader_kernel)]
                if size % count:
                    raise ValueError(
                        f"layer {consumer!r} reads {size} inputs, not a "
                        f"multiple of the {count} units of {producer!r}")
        chosen = _choose_units(key, ratio, units,
                               norms if target == "smallest_norm" else None)
        masks: dict[str, list[Array]] = {}
        for (producer, consumer), unit_mask in zip(graph, chosen):
            masks.setdefault(f"{producer}/kernel", []).append(unit_mask)
            if f"{producer}/bias" in leaves:
                masks.setdefault(f"{producer}/bias", []).append(unit_mask)
            if consumer is None:
                continue
            kernel = leaves[f"{consumer}/kernel"]
            axis = _input_axis(kernel)
            rows = unit_mask[jnp.arange(kernel.shape[axis]) % unit_mask.size]
            shape = [1] * kernel.ndim
            shape[axis] = kernel.shape[axis]
            masks.setdefault(f"{consumer}/kernel", []).append(
                rows.reshape(shape))
        return _damage_from_masks(params, masks)

    return make_operator(remove, name="remove_neurons", amount_name="ratio",
                         fraction=True, doc=operator_doc(
                             make_remove_neurons,
                             dict(layers=layers, target=target),
                             "op(key, params, ratio) -> Damage"))


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
# Residual blocks.
# --------------------------------------------------------------------------


def find_blocks(params: Params, pattern: str) -> tuple[str, ...]:
    """Top-level entries whose name fully matches ``pattern``, in order.

    Raises:
        ValueError: if none matches (the message names the pattern).
    """
    compiled = re.compile(pattern)
    names = [name for name in (params if isinstance(params, Mapping) else ())
             if compiled.fullmatch(name) and isinstance(params[name], Mapping)]
    if not names:
        top = ", ".join(sorted(params)) if isinstance(params, Mapping) else ""
        raise ValueError(f"block pattern '{pattern}' matches no top-level "
                         f"entry of the parameters (entries: {top or 'none'})")
    return tuple(sorted(names, key=_natural_key))


def make_drop_blocks(pattern: str = r"block\d+") -> DamageFn:
    """Build an operator that drops whole residual blocks.

    Exactly ``floor(blocks * ratio)`` blocks, chosen by key, lose every
    parameter: for ``rescnn``'s ``relu(x + conv_b(relu(conv_a(x))))`` the
    branch is then zero and the block is the identity on its (non-negative)
    input, so the damaged network equals the one with the block skipped.

    Args:
        pattern: regex that the names of block entries match in full
            (top-level entries of the tree; default ``block\\d+``).

    Returns:
        ``op(key, params, ratio) -> Damage``; the mask marks every entry of
        the dropped blocks.

    Raises:
        ValueError: for an invalid pattern now; when called, for a bad
            ratio or a pattern that matches no entry.
    """
    try:
        re.compile(pattern)
    except (re.error, TypeError) as error:
        raise ValueError(f"block pattern '{pattern}' is not a valid regular "
                         f"expression: {error}") from error

    def drop(key: PRNGKey, params: Params, ratio: Array) -> Damage:
        blocks = find_blocks(params, pattern)
        chosen = _choose_units(key, ratio, [len(blocks)], None)[0]
        masks: dict[str, list[Array]] = {}
        for path in leaf_paths(params):
            block = path.split("/", 1)[0]
            if block in blocks:
                masks[path] = [chosen[blocks.index(block)]]
        return _damage_from_masks(params, masks)

    return make_operator(drop, name="drop_blocks", amount_name="ratio",
                         fraction=True, doc=operator_doc(
                             make_drop_blocks, dict(pattern=pattern),
                             "op(key, params, ratio) -> Damage"))


# --------------------------------------------------------------------------
# Attention heads.
# --------------------------------------------------------------------------

_PROJECTIONS = ("query", "key", "value")


def find_attention(params: Params) -> tuple[str, ...]:
    """Paths of every attention module (``query``/``key``/``value``/``out``).

    Raises:
        ValueError: if the tree holds none.
    """
    found = []

    def visit(node, path):
        if not isinstance(node, Mapping):
            return
        if all(name in node and isinstance(node[name], Mapping)
               and "kernel" in node[name]
               for name in _PROJECTIONS + ("out",)):
            found.append(path)
            return
        for name in node:
            visit(node[name], f"{path}/{name}" if path else str(name))

    visit(params, "")
    if not found:
        raise ValueError("no attention module (query/key/value/out kernels) "
                         "in the parameters")
    return tuple(sorted(found, key=_natural_key))


def make_remove_heads(*, target: Literal["random", "smallest_norm"] = "random"
                      ) -> DamageFn:
    """Build an operator that removes attention heads of a ViT.

    In every attention module exactly ``floor(heads * ratio)`` heads are
    removed: their query/key/value kernel and bias slices and their slice
    of the output kernel are zeroed and masked, so they contribute nothing.

    Args:
        target: ``"random"`` or ``"smallest_norm"`` (heads whose parameters
            have the smallest L2 norm).

    Returns:
        ``op(key, params, ratio) -> Damage``.

    Raises:
        ValueError: for an unknown target now; when called, for a bad ratio,
            parameters without attention, or inconsistent head shapes.
    """
    _check_unit_target(target)

    def remove(key: PRNGKey, params: Params, ratio: Array) -> Damage:
        modules = find_attention(params)
        heads, norms = [], []
        for path in modules:
            module = _subtree(params, path)
            out = jnp.asarray(module["out"]["kernel"])
            count = out.shape[0]
            squares = jnp.sum(jnp.square(out.astype(jnp.float32)).reshape(
                count, -1), axis=1)
            for name in _PROJECTIONS:
                for leaf_name in ("kernel", "bias"):
                    if leaf_name not in module[name]:
                        continue
                    leaf = jnp.asarray(module[name][leaf_name])
                    axis = 1 if leaf_name == "kernel" else 0
                    if leaf.ndim <= axis or leaf.shape[axis] != count:
                        raise ValueError(
                            f"{path}/{name}/{leaf_name} of shape "
                            f"{leaf.shape} does not have {count} heads on "
                            f"axis {axis}")
                    squares = squares + jnp.sum(jnp.square(
                        jnp.moveaxis(leaf.astype(jnp.float32), axis, 0)
                    ).reshape(count, -1), axis=1)
            heads.append(count)
            norms.append(squares)
        chosen = _choose_units(key, ratio, heads,
                               norms if target == "smallest_norm" else None)
        masks: dict[str, list[Array]] = {}
        for path, head_mask in zip(modules, chosen):
            module = _subtree(params, path)
            masks[f"{path}/out/kernel"] = [head_mask[:, None, None]]
            for name in _PROJECTIONS:
                masks[f"{path}/{name}/kernel"] = [head_mask[None, :, None]]
                if "bias" in module[name]:
                    masks[f"{path}/{name}/bias"] = [head_mask[:, None]]
        return _damage_from_masks(params, masks)

    return make_operator(remove, name="remove_heads", amount_name="ratio",
                         fraction=True, doc=operator_doc(
                             make_remove_heads, dict(target=target),
                             "op(key, params, ratio) -> Damage"))


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
