"""Flax NNX modules as :class:`~recovjax.models.Model`.

The module is split once, at construction (``nnx.split``): its
``nnx.Param`` variables become ``model.params``, its ``nnx.BatchStat``
variables ``model.state``, and everything else (RNG streams, other
variables) stays with the graph definition. ``apply`` merges them back
(``nnx.merge``) for one call, so the module object the user passed is never
changed.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
from flax import nnx

from recovjax._types import PRNGKey
from recovjax.models import info as info_lib
from recovjax.models.adapter import (Model, as_sample, build_model,
                                     key_name)
from recovjax.models.info import LeafInfo


def _linear_general_inputs(module: Any) -> int:
    return len(module.in_features)


info_lib.register_layer(nnx.Linear, {"kernel": info_lib.dense_kernel,
                                     "bias": info_lib.features_bias})
info_lib.register_layer(nnx.LinearGeneral, {
    "kernel": info_lib.general_kernel(_linear_general_inputs),
    "bias": info_lib.general_bias})
for _conv in (nnx.Conv, nnx.ConvTranspose):
    info_lib.register_layer(_conv, {
        "kernel": info_lib.channels_last_conv_kernel,
        "bias": info_lib.features_bias})
info_lib.register_layer(nnx.Embed, {"embedding": info_lib.embedding})
info_lib.norms((nnx.BatchNorm,), (nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm))


def _infer(module: nnx.Module, params: Mapping) -> dict[str, LeafInfo]:
    owners = {tuple(str(part) for part in path): node
              for path, node in nnx.iter_graph(module)
              if isinstance(node, nnx.Module)}
    infos = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(key_name(entry) for entry in path)
        owner = owners.get(keys[:-1])
        layer = "/".join(keys[:-1])
        infos["/".join(keys)] = (
            info_lib.leaf_info_of(owner, keys[-1], tuple(leaf.shape), layer)
            if owner is not None else LeafInfo(layer=layer))
    return infos


def _reseed(module: nnx.Module, key: PRNGKey) -> None:
    # Give every RNG stream of the merged module a key derived from ``key``.
    index = 0
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.RngStream):
            node.key.value = jax.random.fold_in(key, index)
            node.count.value = jax.numpy.zeros_like(node.count.value)
            index += 1


def from_nnx(module: nnx.Module, *, sample: Any,
             task: Any = "classification", name: str | None = None,
             info: Mapping[str, Any] | None = None,
             init: Callable[[PRNGKey], Any] | None = None) -> Model:
    """A Flax NNX module as a :class:`Model`.

    Evaluation runs a copy of the module in evaluation mode
    (``module.eval()``: dropout off, running batch statistics); training
    (``model.apply(..., train=True, key=key)``) a copy in training mode,
    its RNG streams reseeded from ``key`` and its batch statistics
    returned updated.

    Args:
        module: the module, with its (pretrained) parameters.
        sample: an input batch (or its ``jax.ShapeDtypeStruct``).
        task: the task (default ``"classification"``).
        name: a name for reports (default: the class name).
        info: leaf facts to declare (see :meth:`Model.with_info`).
        init: ``init(key) -> params`` (as a nested dict of the module's
            parameter paths), for rebuild strategies; ``None`` if not needed.

    Returns:
        The :class:`Model`; ``model.to_native(params)`` is an NNX module
        (in evaluation mode) holding ``params``.

    Raises:
        TypeError: if ``module`` is not an NNX module.
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module, got "
                        f"{type(module).__name__}")
    sample = as_sample(sample)
    evaluating, training = nnx.clone(module), nnx.clone(module)
    evaluating.eval()
    training.train()
    eval_def, params_state, stats_state, rest = nnx.split(
        evaluating, nnx.Param, nnx.BatchStat, ...)
    train_def, _, _, train_rest = nnx.split(
        training, nnx.Param, nnx.BatchStat, ...)
    params = params_state.to_pure_dict()
    stats = stats_state.to_pure_dict()

    def merged(definition, rest_state, params, stats):
        params_copy = nnx.State(params_state)
        nnx.replace_by_pure_dict(params_copy, params)
        stats_copy = nnx.State(stats_state)
        nnx.replace_by_pure_dict(stats_copy, stats)
        return nnx.merge(definition, params_copy, stats_copy, rest_state)

    def native_apply(params, stats, inputs, train, key):
        if not train:
            return merged(eval_def, rest, params, stats)(inputs), stats
        live = merged(train_def, train_rest, params, stats)
        if key is not None:
            _reseed(live, key)
        outputs = live(inputs)
        return outputs, nnx.state(live, nnx.BatchStat).to_pure_dict()

    def native(params):
        return merged(eval_def, rest, params, stats)

    return build_model(native_apply, params, stats, sample=sample,
                       infos=_infer(evaluating, params), task=task,
                       name=name or type(module).__name__, init=init,
                       native=native, info=info)
