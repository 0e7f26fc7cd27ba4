"""Flax linen modules as :class:`~recovjax.models.Model`."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import flax.errors
import flax.linen as nn
import jax

from recovjax._types import PRNGKey
from recovjax.models import info as info_lib
from recovjax.models.adapter import (Model, as_sample, build_model,
                                     key_name)
from recovjax.models.info import LeafInfo

_MODE_ARGUMENTS = {"train": True, "training": True, "is_training": True,
                   "deterministic": False, "use_running_average": False}
"""``__call__`` arguments that switch training mode, and their value when
training."""


def _dense_general_inputs(module: Any) -> int:
    axis = module.axis
    return len(axis) if isinstance(axis, (tuple, list)) else 1


info_lib.register_layer(nn.Dense, {"kernel": info_lib.dense_kernel,
                                   "bias": info_lib.features_bias})
info_lib.register_layer(nn.DenseGeneral, {
    "kernel": info_lib.general_kernel(_dense_general_inputs),
    "bias": info_lib.general_bias})
for _conv in (nn.Conv, nn.ConvTranspose):
    info_lib.register_layer(_conv, {
        "kernel": info_lib.channels_last_conv_kernel,
        "bias": info_lib.features_bias})
info_lib.register_layer(nn.Embed, {"embedding": info_lib.embedding})
info_lib.norms((nn.BatchNorm,), (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
                                 nn.InstanceNorm))


def _mode_argument(module: nn.Module, method: str) -> tuple[str, bool] | None:
    try:
        parameters = inspect.signature(getattr(module, method)).parameters
    except (TypeError, ValueError):
        return None
    for name, when_training in _MODE_ARGUMENTS.items():
        if name in parameters:
            return name, when_training
    return None


def _modules_by_path(module: nn.Module, variables: Mapping, sample: Any,
                     kwargs: dict) -> dict[tuple[str, ...], nn.Module]:
    # Every module the forward pass calls, by its path in the variables.
    found: dict[tuple[str, ...], nn.Module] = {}

    def interceptor(next_fun, args, call_kwargs, context):
        found.setdefault(tuple(context.module.path), context.module)
        return next_fun(*args, **call_kwargs)

    def run(variables, inputs):
        with nn.intercept_methods(interceptor):
            return module.apply(variables, inputs, **kwargs)

    jax.eval_shape(run, variables, sample)
    return found


def _infer(modules: Mapping[tuple[str, ...], nn.Module], params: Mapping
           ) -> dict[str, LeafInfo]:
    infos = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(key_name(entry) for entry in path)
        owner = keys[:-1]
        module = modules.get(owner)
        layer = "/".join(owner)
        infos["/".join(keys)] = (
            info_lib.leaf_info_of(module, keys[-1], tuple(leaf.shape), layer)
            if module is not None else LeafInfo(layer=layer))
    return infos


def from_linen(module: nn.Module, variables: Mapping[str, Any], *,
               sample: Any, task: Any = "classification",
               name: str | None = None,
               info: Mapping[str, Any] | None = None,
               mode_argument: str | None = None,
               rng_names: tuple[str, ...] = ("dropout",),
               init: Callable[[PRNGKey], Any] | None = None) -> Model:
    """A Flax linen module and its variables as a :class:`Model`.

    Every collection is kept: ``params`` become ``model.params`` and the
    others (``batch_stats``, ...) ``model.state``. In evaluation mode the
    state is read and never changed; in training mode
    (``model.apply(..., train=True, key=key)``) the non-parameter
    collections are mutable and returned updated, and ``key`` seeds the
    ``rng_names`` streams (dropout).

    Args:
        module: the module.
        variables: what ``module.init`` returned (or the same layout
            restored from a checkpoint): ``{"params": ..., "batch_stats":
            ...}``.
        sample: an input batch (or its ``jax.ShapeDtypeStruct``); fixes
            the shapes the module is traced with.
        task: the task (default ``"classification"``).
        name: a name for reports (default: the module's class name).
        info: leaf facts to declare (see :meth:`Model.with_info`).
        mode_argument: the ``__call__`` argument that switches training
            mode. By default the first of ``train``, ``training``,
            ``is_training`` (``True`` when training), ``deterministic``,
            ``use_running_average`` (``False`` when training) that the
            signature has; ``""`` for a module without one.
        rng_names: RNG streams the module draws from when training.
        init: ``init(key) -> params`` for rebuild strategies; default
            ``module.init(key, sample)["params"]``. The model's
            ``init_state(key)`` is the other collections of
            ``module.init(key, sample)``.

    Returns:
        The :class:`Model`.

    Raises:
        TypeError: if ``module`` is not a linen module or ``variables`` is
            not a mapping with ``"params"``.
        ValueError: for a ``mode_argument`` the module does not take.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a flax.linen.Module, got "
                        f"{type(module).__name__}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError("variables must be the mapping module.init returns, "
                        "with a 'params' collection")
    sample = as_sample(sample)
    if mode_argument is None:
        mode = _mode_argument(module, "__call__")
    elif mode_argument == "":
        mode = None
    else:
        detected = _mode_argument(module, "__call__")
        parameters = inspect.signature(module.__call__).parameters
        if mode_argument not in parameters:
            raise ValueError(f"mode_argument: {type(module).__name__}."
                             f"__call__ takes no argument {mode_argument!r}")
        when_training = (detected[1] if detected and detected[0] ==
                         mode_argument else _MODE_ARGUMENTS.get(
                             mode_argument, True))
        mode = (mode_argument, when_training)

    def mode_kwargs(train: bool) -> dict:
        if mode is None:
            return {}
        name_, when_training = mode
        return {name_: when_training if train else not when_training}

    params = dict(variables["params"])
    state = {collection: value for collection, value in variables.items()
             if collection != "params"}

    def native_apply(params, state, inputs, train, key):
        full = {"params": params, **state}
        rngs = None
        if key is not None:
            rngs = {stream: jax.random.fold_in(key, index)
                    for index, stream in enumerate(rng_names)}
        try:
            if train and state:
                outputs, updates = module.apply(
                    full, inputs, rngs=rngs, mutable=list(state),
                    **mode_kwargs(True))
                return outputs, {**state, **updates}
            return module.apply(full, inputs, rngs=rngs,
                                **mode_kwargs(train)), state
        except flax.errors.InvalidRngError as error:
            raise ValueError(
                f"key: {type(module).__name__} draws random numbers in "
                f"training mode (dropout); pass key=... to model.apply, or "
                f"train=False") from error

    modules = _modules_by_path(module, {"params": params, **state}, sample,
                               mode_kwargs(False))
    infos = _infer(modules, params)
    def init_variables(key: PRNGKey) -> Any:
        return module.init(key, jax.numpy.zeros(sample.shape, sample.dtype),
                           **mode_kwargs(False))

    if init is None:
        def init(key: PRNGKey) -> Any:
            return init_variables(key)["params"]

    def init_state(key: PRNGKey) -> Any:
        if not state:
            return {}
        # Compiled without the parameters, so that their initialisers are
        # left out.
        return jax.jit(lambda key: {
            collection: value for collection, value in
            init_variables(key).items() if collection in state})(key)

    return build_model(native_apply, params, state, sample=sample,
                       infos=infos, task=task,
                       name=name or type(module).__name__, init=init,
                       info=info, init_state=init_state)
