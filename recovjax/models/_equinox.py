"""Equinox modules as :class:`~recovjax.models.Model` (the ``equinox`` extra).

The module is partitioned once (``eqx.partition(module,
eqx.is_inexact_array)``): its floating-point arrays become
``model.params`` (a nested dict keyed by attribute names and list
indices, ``layers/0/weight``) and the rest stays static. Equinox layers
work on one example, so by default ``apply`` maps the module over the
batch axis with ``jax.vmap``. A stateful module (``eqx.nn.BatchNorm``)
brings its ``eqx.nn.State`` as ``model.state``, threaded through
``module(x, state)`` under a ``vmap`` with the norm's axis name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from recovjax._types import PRNGKey
from recovjax.models import info as info_lib
from recovjax.models.adapter import (Model, as_sample, build_model,
                                     key_name)
from recovjax.models.info import LeafInfo

try:
    import equinox as eqx
except ImportError:  # pragma: no cover - exercised only without the extra
    eqx = None


def _require_equinox() -> None:
    if eqx is None:
        raise ImportError("from_equinox needs equinox: pip install "
                          "'recovjax[equinox]'")


def _linear_weight(module: Any, shape: tuple[int, ...]) -> LeafInfo:
    del module
    if len(shape) != 2:  # "scalar" in or out features
        return LeafInfo(info_lib.KERNEL, out_axes=(0,) if shape else ())
    return LeafInfo(info_lib.KERNEL, in_axes=(1,), out_axes=(0,))


def _conv_weight(module: Any, shape: tuple[int, ...]) -> LeafInfo:
    del module, shape
    return LeafInfo(info_lib.KERNEL, in_axes=(1,), out_axes=(0,),
                    channels="first")


def _channel_bias(module: Any, shape: tuple[int, ...]) -> LeafInfo:
    del module, shape
    return LeafInfo(info_lib.BIAS, out_axes=(0,), channels="first")


def _register() -> None:
    info_lib.register_layer(eqx.nn.Linear, {"weight": _linear_weight,
                                            "bias": info_lib.features_bias})
    for conv in (eqx.nn.Conv, eqx.nn.ConvTranspose):
        info_lib.register_layer(conv, {"weight": _conv_weight,
                                       "bias": _channel_bias})
    info_lib.register_layer(eqx.nn.Embedding,
                            {"weight": info_lib.embedding})
    info_lib.norms((eqx.nn.BatchNorm,), (eqx.nn.LayerNorm, eqx.nn.RMSNorm,
                                         eqx.nn.GroupNorm),
                   scale="weight", offset="bias")


if eqx is not None:
    _register()

_PROJECTIONS = {"query_proj": 0, "key_proj": 0, "value_proj": 0,
                "output_proj": 1}
"""Axis of each ``MultiheadAttention`` projection's weight that holds the
heads (``[heads * head_dim, dim]`` in, ``[dim, heads * head_dim]`` out)."""


def _walk(node: Any, prefix: tuple[str, ...], found: dict) -> None:
    # Every array attribute of every module, with its owner.
    if isinstance(node, eqx.Module):
        for field in dataclasses.fields(node):
            value = getattr(node, field.name, None)
            path = prefix + (field.name,)
            if eqx.is_array(value):
                found[path] = node
            else:
                _walk(value, path, found)
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            _walk(value, prefix + (str(index),), found)
    elif isinstance(node, dict):
        for key, value in node.items():
            _walk(value, prefix + (str(key),), found)


def _infer(module: Any, params: Mapping) -> dict[str, LeafInfo]:
    owners: dict[tuple[str, ...], Any] = {}
    _walk(module, (), owners)
    attention = {}
    for path, owner in owners.items():
        del owner
        for depth in range(len(path) - 2, 0, -1):
            parent_path = path[:depth]
            parent = _get(module, parent_path)
            if isinstance(parent, eqx.nn.MultiheadAttention):
                attention[path] = parent
                break
    infos = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(key_name(entry) for entry in path)
        owner = owners.get(keys)
        layer = "/".join(keys[:-1])
        info = (info_lib.leaf_info_of(owner, keys[-1], tuple(leaf.shape),
                                      layer)
                if owner is not None else LeafInfo(layer=layer))
        parent = attention.get(keys)
        projection = keys[-2] if len(keys) > 1 else None
        if parent is not None and projection in _PROJECTIONS:
            axis = 0 if keys[-1] == "bias" else _PROJECTIONS[projection]
            if keys[-1] == "bias" and projection == "output_proj":
                axis = None
            if axis is not None:
                info = dataclasses.replace(info, head_axis=axis,
                                           heads=parent.num_heads)
        infos["/".join(keys)] = info
    return infos


def _get(module: Any, path: tuple[str, ...]) -> Any:
    node = module
    for part in path:
        if isinstance(node, (list, tuple)):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node[part]
        else:
            node = getattr(node, part)
    return node


def from_equinox(module: Any, *, sample: Any, state: Any = None,
                 task: Any = "classification",
                 name: str | None = None, batched: bool = False,
                 info: Mapping[str, Any] | None = None,
                 init: Callable[[PRNGKey], Any] | None = None,
                 axis_name: str = "batch") -> Model:
    """An equinox module as a :class:`Model`.

    Evaluation runs the module in inference mode
    (``eqx.nn.inference_mode``: dropout off), training in training mode
    with ``key`` split over the examples of the batch and passed as the
    module's ``key`` argument.

    Args:
        module: the module, with its (pretrained) weights.
        sample: an input batch (or its ``jax.ShapeDtypeStruct``), with a
            leading batch axis.
        state: the ``eqx.nn.State`` of a stateful module (one holding
            ``eqx.nn.BatchNorm``, from ``eqx.nn.make_with_state``), or
            ``None``. The module is then called as ``module(x, state) ->
            (outputs, state)``, mapped over the batch with ``axis_name``
            (the name its ``BatchNorm`` layers were built with); the state
            is frozen while evaluating and updated in training mode.
        task: the task (default ``"classification"``).
        name: a name for reports (default: the class name).
        batched: ``False`` (equinox's convention) maps the module over the
            batch axis; ``True`` calls it on the whole batch.
        info: leaf facts to declare (see :meth:`Model.with_info`).
        init: ``init(key) -> params`` (the partitioned array tree), for
            rebuild strategies; ``None`` if not needed.
        axis_name: the batch axis name of a stateful module's ``vmap``.

    Returns:
        The :class:`Model`; ``model.to_native(params)`` is the module with
        ``params`` (in inference mode).

    Raises:
        ImportError: without equinox.
        TypeError: if ``module`` is not an equinox module.
        ValueError: if the module holds ``eqx.nn.BatchNorm`` and no
            ``state`` is given, or ``batched`` is combined with a state.
    """
    _require_equinox()
    if not isinstance(module, eqx.Module):
        raise TypeError(f"module must be an equinox.Module, got "
                        f"{type(module).__name__}")
    sample = as_sample(sample)
    evaluating = eqx.nn.inference_mode(module, True)
    training = eqx.nn.inference_mode(module, False)
    params, static = eqx.partition(evaluating, eqx.is_inexact_array)
    _, train_static = eqx.partition(training, eqx.is_inexact_array)
    found = {}
    _walk(module, (), found)
    if state is None and any(isinstance(owner, eqx.nn.BatchNorm)
                             for owner in found.values()):
        raise ValueError("state: equinox BatchNorm keeps its statistics in "
                         "an eqx.nn.State; build the module with "
                         "module, state = eqx.nn.make_with_state(Net)(...) "
                         "and pass from_equinox(module, state=state, ...)")
    if state is not None:
        if batched:
            raise ValueError("batched: a stateful equinox module is mapped "
                             "over the batch (its BatchNorm needs the axis "
                             "name); leave batched=False")
        return _stateful(params, static, train_static, state, sample,
                         evaluating, task, name or type(module).__name__,
                         init, info, axis_name)

    def native_apply(params, state, inputs, train, key):
        live = eqx.combine(params, train_static if train else static)
        if batched:
            outputs = live(inputs, key=key) if train and key is not None \
                else live(inputs)
        elif train and key is not None:
            keys = jax.random.split(key, inputs.shape[0])
            outputs = jax.vmap(lambda x, k: live(x, key=k))(inputs, keys)
        else:
            outputs = jax.vmap(live)(inputs)
        return outputs, state

    def native(params):
        return eqx.combine(params, static)

    return build_model(native_apply, params, {}, sample=sample,
                       infos=_infer(evaluating, eqx.filter(
                           evaluating, eqx.is_inexact_array)),
                       task=task, name=name or type(module).__name__,
                       init=init, native=native, info=info)


def _stateful(params, static, train_static, state, sample, evaluating, task,
              name, init, info, axis_name) -> Model:
    """A module called as ``module(x, state) -> (outputs, state)``."""

    def native_apply(params, state, inputs, train, key):
        live = eqx.combine(params, train_static if train else static)
        if train and key is not None:
            keys = jax.random.split(key, inputs.shape[0])
            call = lambda x, s, k: live(x, s, key=k)
            args = (inputs, state, keys)
            in_axes = (0, None, 0)
        else:
            call = lambda x, s: live(x, s)
            args = (inputs, state)
            in_axes = (0, None)
        outputs, state = jax.vmap(call, axis_name=axis_name, in_axes=in_axes,
                                  out_axes=(0, None))(*args)
        return outputs, state

    def native(params):
        return eqx.combine(params, static)

    return build_model(native_apply, params, state, sample=sample,
                       infos=_infer(evaluating, eqx.filter(
                           evaluating, eqx.is_inexact_array)),
                       task=task, name=name, init=init, native=native,
                       info=info)
