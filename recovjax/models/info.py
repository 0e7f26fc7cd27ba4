"""Leaf metadata: what each parameter of a model is, from its module structure.

Every leaf of a :class:`~recovjax.models.Model`'s parameters carries a
:class:`LeafInfo`: its *role* (``kernel``, ``bias``, ``norm_scale``,
``norm_offset``, ``embedding``, ``other``), the *layer* it belongs to (the
path of the module that owns it), its input and output axes, and, for
attention projections, the axis that holds the heads. The info tree has
the structure of the parameters, so ``jax.tree.map(f, params, info)``
pairs every leaf with its facts.

The facts come from the *type* of the module that owns a leaf, never from
the leaf's name or its number of dimensions: a ``flax.linen.Dense``'s
``kernel``, an ``nnx.Linear``'s ``kernel`` and an ``equinox.nn.Linear``'s
``weight`` are all role ``kernel``, with input axis 0, 0 and 1. A module
type recovjax does not know leaves its leaves' role ``None`` ("unknown");
declare it once with :func:`register_layer` (for every instance of the
type) or per leaf with :meth:`~recovjax.models.Model.with_info`. An
operation that needs a role it cannot find raises :class:`InfoError`,
naming the leaf and both ways to declare it.

The dataflow facts (which layer's units a later layer reads, and which
normalisation follows which layer) are added from the model's traced
program by :mod:`recovjax.models.graph`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax

from recovjax.checkpoints import leaf_path

KERNEL = "kernel"
BIAS = "bias"
NORM_SCALE = "norm_scale"
NORM_OFFSET = "norm_offset"
EMBEDDING = "embedding"
OTHER = "other"
ROLES = (KERNEL, BIAS, NORM_SCALE, NORM_OFFSET, EMBEDDING, OTHER)
"""Every role a leaf can have (``None`` means not known)."""

CHANNELS = ("last", "first")


class InfoError(ValueError):
    """A fact about a leaf that could not be inferred and was not declared."""


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """What one parameter leaf is.

    Attributes:
        role: one of :data:`ROLES`, or ``None`` when not known.
        layer: path of the module (layer) that owns the leaf, such as
            ``"Conv_0"`` or ``"layers/0"``; ``None`` when not known.
        in_axes: axes of the leaf indexed by the layer's inputs (a kernel's
            input features or channels); ``()`` if none.
        out_axes: axes indexed by the layer's outputs (a kernel's output
            units, a bias's or a normalisation's features).
        head_axis: for attention projections, the axis whose entries are
            split evenly among ``heads`` heads (for ``[dim, heads,
            head_dim]`` kernels the heads axis itself).
        heads: number of heads along ``head_axis``.
        channels: where the layer's *output activations* hold their
            units, ``"last"`` (``NHWC``, flax) or ``"first"`` (``CHW``,
            equinox and PyTorch); decides which inputs of a dense layer
            after a flatten read a given channel.
        feeds: for a kernel, the layer whose inputs read exactly this
            layer's output units (set by the dataflow analysis when the two
            form a chain link); ``None`` otherwise.
        follows: for a normalisation (or other per-unit leaf of another
            module), the layer whose output units it scales or offsets.
        mixes_units: whether the leaf's module combines the units it acts
            on (a layer norm's mean and variance over the features), so
            that a removed unit changes the others: a layer followed by
            such a module is never a chain producer.
    """

    role: str | None = None
    layer: str | None = None
    in_axes: tuple[int, ...] = ()
    out_axes: tuple[int, ...] = ()
    head_axis: int | None = None
    heads: int | None = None
    channels: str = "last"
    feeds: str | None = None
    follows: str | None = None
    mixes_units: bool = False

    def __post_init__(self):
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)} (or "
                             f"None), got {self.role!r}")
        if self.channels not in CHANNELS:
            raise ValueError(f"channels must be 'last' or 'first', got "
                             f"{self.channels!r}")
        for name in ("in_axes", "out_axes"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(
                    isinstance(axis, int) for axis in value):
                raise TypeError(f"{name} must be a tuple of ints, got "
                                f"{value!r}")
        if (self.heads is None) != (self.head_axis is None):
            raise ValueError("head_axis and heads are declared together")


# A layer spec turns a module and the shape of one of its leaves into the
# leaf's LeafInfo (without the layer path, which the walker adds).
LeafSpec = Callable[[Any, tuple[int, ...]], LeafInfo]
LayerSpec = Mapping[str, "LeafInfo | LeafSpec | str"]

_LAYERS: dict[type, dict[str, Any]] = {}


def register_layer(module_type: type, leaves: LayerSpec) -> None:
    """Declare the leaves of every module of a type.

    Args:
        module_type: a Flax linen or NNX module class, or an equinox module
            class, as defined in the user's code.
        leaves: for each leaf name the module creates (``"kernel"``,
            ``"weight"``, ...), its :class:`LeafInfo` (the layer path is
            filled in), a role string (no axes), or a function ``(module,
            shape) -> LeafInfo`` for facts that depend on the module's
            attributes or the leaf's shape.

    Raises:
        TypeError: if ``module_type`` is not a class or ``leaves`` is not a
            mapping of strings.
        ValueError: for an unknown role.

    Example::

        register_layer(MyConv, {"w": LeafInfo("kernel", in_axes=(2,),
                                              out_axes=(3,)),
                                "b": LeafInfo("bias", out_axes=(0,))})
    """
    if not isinstance(module_type, type):
        raise TypeError(f"module_type must be a class, got "
                        f"{type(module_type).__name__}")
    if not isinstance(leaves, Mapping) or not all(
            isinstance(name, str) for name in leaves):
        raise TypeError("leaves must map leaf names to LeafInfo, role "
                        "strings or functions")
    specs = {}
    for name, spec in leaves.items():
        if isinstance(spec, str):
            spec = LeafInfo(spec)
        elif not (isinstance(spec, LeafInfo) or callable(spec)):
            raise TypeError(f"leaves[{name!r}] must be a LeafInfo, a role "
                            f"string or a function, got "
                            f"{type(spec).__name__}")
        specs[name] = spec
    _LAYERS[module_type] = specs


def registered_spec(module: Any) -> dict[str, Any] | None:
    """The leaf specs registered for ``module``'s type or a base class."""
    for cls in type(module).__mro__:
        if cls in _LAYERS:
            return _LAYERS[cls]
    return None


def leaf_info_of(module: Any, leaf_name: str, shape: tuple[int, ...],
                 layer: str) -> LeafInfo:
    """The :class:`LeafInfo` of leaf ``leaf_name`` of ``module``."""
    specs = registered_spec(module)
    spec = None if specs is None else specs.get(leaf_name)
    if spec is None:
        return LeafInfo(layer=layer)
    info = spec if isinstance(spec, LeafInfo) else spec(module, shape)
    return dataclasses.replace(info, layer=layer)


# --------------------------------------------------------------------------
# Specs of the common layer types, as functions of module and leaf shape.
# --------------------------------------------------------------------------


def dense_kernel(module: Any, shape: tuple[int, ...]) -> LeafInfo:
    """``[in, out]`` kernel (flax Dense, nnx Linear)."""
    del module
    return LeafInfo(KERNEL, in_axes=(0,), out_axes=(len(shape) - 1,))


def features_bias(module: Any, shape: tuple[int, ...]) -> LeafInfo:
    """A bias over the output features (every axis)."""
    del module
    return LeafInfo(BIAS, out_axes=tuple(range(len(shape))))


def channels_last_conv_kernel(module: Any, shape: tuple[int, ...]
                              ) -> LeafInfo:
    """``[*window, in, out]`` kernel (flax Conv, ``HWIO``)."""
    del module
    return LeafInfo(KERNEL, in_axes=(len(shape) - 2,),
                    out_axes=(len(shape) - 1,))


def norm(role: str, *, mixes_units: bool = False) -> LeafSpec:
    """A normalisation scale or offset over the features (every axis).

    Args:
        role: ``norm_scale`` or ``norm_offset``.
        mixes_units: ``True`` for norms whose statistics run over the
            features (layer, RMS and group norms); ``False`` for batch
            norm, which normalises every unit on its own.
    """

    def spec(module: Any, shape: tuple[int, ...]) -> LeafInfo:
        del module
        return LeafInfo(role, out_axes=tuple(range(len(shape))),
                        mixes_units=mixes_units)

    return spec


def norms(batch_norms: tuple[type, ...], feature_norms: tuple[type, ...],
          scale: str = "scale", offset: str = "bias") -> None:
    """Register normalisation module types (their scale and offset leaves).

    Args:
        batch_norms: types that normalise each unit on its own.
        feature_norms: types whose statistics run over the features.
        scale: the scale leaf's name.
        offset: the offset leaf's name.
    """
    for types, mixes in ((batch_norms, False), (feature_norms, True)):
        for module_type in types:
            register_layer(module_type, {
                scale: norm(NORM_SCALE, mixes_units=mixes),
                offset: norm(NORM_OFFSET, mixes_units=mixes)})


def embedding(module: Any, shape: tuple[int, ...]) -> LeafInfo:
    """``[vocabulary, features]`` embedding table."""
    del module
    return LeafInfo(EMBEDDING, out_axes=(len(shape) - 1,))


def general_kernel(in_count: Callable[[Any], int]) -> LeafSpec:
    """A kernel over ``in_count(module)`` input axes, then output axes.

    Attention projections in the per-head layout are recognised from the
    axes: a kernel with two output axes (``[dim, heads, head_dim]``) has
    its heads on the first output axis, one with two input axes
    (``[heads, head_dim, dim]``) on the first input axis.
    """

    def spec(module: Any, shape: tuple[int, ...]) -> LeafInfo:
        count = in_count(module)
        in_axes = tuple(range(count))
        out_axes = tuple(range(count, len(shape)))
        head_axis = heads = None
        if len(out_axes) == 2 and len(in_axes) == 1:
            head_axis, heads = out_axes[0], shape[out_axes[0]]
        elif len(in_axes) == 2 and len(out_axes) == 1:
            head_axis, heads = in_axes[0], shape[in_axes[0]]
        return LeafInfo(KERNEL, in_axes=in_axes, out_axes=out_axes,
                        head_axis=head_axis, heads=heads)

    return spec


def general_bias(module: Any, shape: tuple[int, ...]) -> LeafInfo:
    """Bias of a general dense layer; per head when ``[heads, head_dim]``."""
    del module
    if len(shape) == 2:
        return LeafInfo(BIAS, out_axes=(0, 1), head_axis=0, heads=shape[0])
    return LeafInfo(BIAS, out_axes=tuple(range(len(shape))))


# --------------------------------------------------------------------------
# The info tree.
# --------------------------------------------------------------------------


def paths_of(tree: Any) -> list[str]:
    """``'/'``-joined path of every leaf of ``tree``, in flattening order."""
    return [leaf_path(path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def info_tree(params: Any, infos: Mapping[str, LeafInfo]) -> Any:
    """The tree of :class:`LeafInfo` with the structure of ``params``.

    Leaves missing from ``infos`` get an unknown :class:`LeafInfo`.
    """
    leaves, treedef = jax.tree.flatten(params)
    del leaves
    return jax.tree.unflatten(
        treedef, [infos.get(path, LeafInfo()) for path in paths_of(params)])


def info_by_path(params: Any, info: Any) -> dict[str, LeafInfo]:
    """``{path: LeafInfo}`` for ``info`` laid out like ``params``.

    Raises:
        InfoError: if ``info`` does not have the structure of ``params``.
    """
    is_info = lambda node: isinstance(node, LeafInfo)
    info_leaves, info_def = jax.tree.flatten(info, is_leaf=is_info)
    param_def = jax.tree.structure(params)
    if info_def.num_leaves != param_def.num_leaves or not all(
            isinstance(leaf, LeafInfo) for leaf in info_leaves):
        raise InfoError("info must be a tree of LeafInfo with the structure "
                        "of the parameters (model.info); got one with "
                        f"{info_def.num_leaves} leaves for "
                        f"{param_def.num_leaves} parameter leaves")
    try:
        jax.tree.map(lambda p, i: None, params, info, is_leaf=is_info)
    except (ValueError, TypeError) as error:
        raise InfoError("info does not have the structure of the parameters "
                        f"(use model.info for model.params): {error}"
                        ) from error
    return dict(zip(paths_of(params), info_leaves))


def override(infos: Mapping[str, LeafInfo], changes: Mapping[str, Any]
             ) -> dict[str, LeafInfo]:
    """``infos`` with some leaves' facts replaced.

    Args:
        infos: ``{path: LeafInfo}``.
        changes: ``{path: LeafInfo | role string | {field: value}}``; a
            dict changes only the fields it names.

    Raises:
        InfoError: for a path that is not a leaf (the message lists the
            leaves) or a field :class:`LeafInfo` does not have.
    """
    result = dict(infos)
    fields = {field.name for field in dataclasses.fields(LeafInfo)}
    for path, change in changes.items():
        if path not in result:
            shown = ", ".join(list(result)[:20])
            raise InfoError(f"info override for {path!r}: no such leaf "
                            f"(leaves: {shown})")
        if isinstance(change, LeafInfo):
            result[path] = change
        elif isinstance(change, str):
            result[path] = dataclasses.replace(result[path], role=change)
        elif isinstance(change, Mapping):
            unknown = sorted(set(change) - fields)
            if unknown:
                raise InfoError(f"info override for {path!r}: unknown "
                                f"fields {unknown}; LeafInfo has "
                                f"{sorted(fields)}")
            result[path] = dataclasses.replace(result[path], **change)
        else:
            raise InfoError(f"info override for {path!r} must be a LeafInfo, "
                            f"a role string or a dict of fields, got "
                            f"{type(change).__name__}")
    return result


def how_to_declare(path: str) -> str:
    """The sentence that tells a user how to declare a leaf's facts."""
    return (f"declare it with model.with_info({{'{path}': LeafInfo(role=..., "
            f"in_axes=..., out_axes=...)}}) or, for every module of its "
            f"type, recovjax.models.register_layer(ModuleType, {{...}})")


def require_roles(infos: Mapping[str, LeafInfo], paths: Iterable[str],
                  why: str) -> None:
    """Raise :class:`InfoError` if a leaf among ``paths`` has no role.

    Args:
        infos: ``{path: LeafInfo}``.
        paths: the leaves the operation looks at.
        why: what needs the roles, for the message (``"scope 'weights'"``).
    """
    unknown = [path for path in paths if infos[path].role is None]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise InfoError(f"{why} needs the role of every leaf, and the role "
                        f"of {shown} is not known (its module type is not "
                        f"registered); {how_to_declare(unknown[0])}")
