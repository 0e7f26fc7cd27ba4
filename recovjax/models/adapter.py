"""One contract for every model: :class:`Model`, and :func:`from_apply`.

A :class:`Model` is a pure ``apply`` function with the arrays it needs::

    outputs, state = model.apply(params, state, inputs, train=False, key=None)

* ``params`` are what damage touches and recovery trains: always a plain
  nested dict of arrays with string keys, whatever the framework's own
  layout (an NNX ``State``, an equinox module, a list of layers). Their
  ``'/'``-joined leaf paths are the names scopes, checkpoints and reports
  use (``"Conv_0/kernel"``, ``"layers/0/weight"``).
* ``state`` is everything else the forward pass reads and a training step
  may update, such as batch statistics (a nested dict, possibly empty). It
  is frozen while a model is evaluated: ``train=False`` returns it
  unchanged. ``train=True`` runs the framework's training mode (dropout on,
  batch statistics from the batch and updated); stochastic layers then need
  ``key``.
* ``info`` says what each leaf is (:mod:`recovjax.models.info`);
  ``task`` says what the outputs are scored on (``"classification"`` or a
  :class:`recovjax.tasks.Task`).

``model.forward(params, inputs) -> outputs`` is the evaluation-mode pass
with the model's own state, the form evaluation, sweeps and damage take.
It is one function object per model, so compiled programs keyed on it are
reused.

The framework adapters (:func:`~recovjax.models.from_linen`,
:func:`~recovjax.models.from_nnx`, :func:`~recovjax.models.from_equinox`)
and :func:`from_apply` all build a :class:`Model` through
:func:`build_model`, which converts the framework's trees to nested dicts
(:class:`TreeLayout`) and reads the dataflow facts
(:mod:`recovjax.models.graph`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from recovjax._types import Params, PRNGKey
from recovjax.models import graph
from recovjax.models.info import (InfoError, LeafInfo, info_by_path,
                                  info_tree, override, paths_of)

NativeApply = Callable[..., tuple[Any, Any]]
"""``native_apply(params, state, inputs, train, key) -> (outputs, state)``
on the framework's own trees."""


# --------------------------------------------------------------------------
# Framework trees <-> nested dicts.
# --------------------------------------------------------------------------


def key_name(entry: Any) -> str:
    """One entry of a key path (dict key, attribute, index) as a string."""
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


@dataclasses.dataclass(frozen=True, eq=False)
class TreeLayout:
    """How a framework's parameter tree maps onto a nested dict.

    Attributes:
        treedef: the framework tree's structure.
        keys: for each leaf (in the framework's flattening order), its
            path in the nested dict.
    """

    treedef: Any
    keys: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, tree: Any, what: str = "params") -> "TreeLayout":
        """The layout of ``tree``.

        Raises:
            ValueError: if two leaves would get the same path (keys ``0``
                and ``"0"`` side by side), naming the path.
        """
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        keys = tuple(tuple(key_name(entry) for entry in path)
                     for path, _ in flat)
        seen = set()
        for key in keys:
            if key in seen or not key:
                raise ValueError(f"{what}: two leaves share the path "
                                 f"{'/'.join(key) or '<root>'}; give them "
                                 "distinct names")
            seen.add(key)
        return cls(treedef, keys)

    def to_dict(self, tree: Any) -> dict:
        """The framework tree as a nested dict."""
        result: dict = {}
        for key, leaf in zip(self.keys, jax.tree.leaves(tree)):
            node = result
            for part in key[:-1]:
                node = node.setdefault(part, {})
            node[key[-1]] = leaf
        return result

    def from_dict(self, tree: Mapping) -> Any:
        """The nested dict back in the framework's layout."""
        leaves = []
        for key in self.keys:
            node = tree
            for part in key:
                node = node[part]
            leaves.append(node)
        return jax.tree.unflatten(self.treedef, leaves)


# --------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------


def _struct(value: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(value), jnp.result_type(value))


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model as a pure ``apply`` function with its arrays.

    Attributes:
        apply: ``apply(params, state, inputs, *, train=False, key=None) ->
            (outputs, state)``; pure.
        params: the parameters, a nested dict of arrays.
        state: the non-trained arrays (batch statistics), a nested dict.
        info: a :class:`~recovjax.models.info.LeafInfo` tree laid out like
            ``params``.
        task: ``"classification"`` (the default) or a task object.
        sample: the shape and dtype of one input batch.
        name: a name for reports.
        init: ``init(key, sample=None) -> params`` (fresh parameters of
            the shapes :attr:`sample` fixes; ``sample`` is accepted for
            the ``init(key, sample)`` form and not needed), or ``None``
            when the model was built without one; rebuild strategies need
            it.
        layout: how ``params`` map onto the framework's tree (see
            :meth:`to_native`).
        native: the framework object a :meth:`to_native` result is put
            into, or ``None``.
        init_state: ``init_state(key) -> state``: the state of a freshly
            initialised model (the initial batch statistics) for
            :attr:`init`'s parameters, or ``None`` when the model was built
            without one; training from scratch starts from it.
    """

    apply: Callable[..., tuple[Any, Any]]
    params: Params
    state: Any
    info: Any
    task: Any = "classification"
    sample: jax.ShapeDtypeStruct | None = None
    name: str = "model"
    init: Callable[[PRNGKey], Params] | None = None
    layout: TreeLayout | None = None
    native: Callable[[Any], Any] | None = None
    init_state: Callable[[PRNGKey], Any] | None = None
    forward: Callable[[Params, Any], Any] | None = dataclasses.field(
        default=None, repr=False)
    """``forward(params, inputs) -> outputs``: evaluation mode with the
    model's state; built once and kept by :meth:`with_params`."""

    def __post_init__(self):
        if self.forward is not None:
            return
        apply, state = self.apply, self.state

        def forward(params: Params, inputs: Any) -> Any:
            return apply(params, state, inputs)[0]

        forward.__doc__ = (f"Outputs of {self.name} for ``inputs`` "
                           "(evaluation mode, the model's own state).")
        forward.__name__ = f"{self.name}_forward"
        object.__setattr__(self, "forward", forward)

    @property
    def infos(self) -> dict[str, LeafInfo]:
        """``{path: LeafInfo}``, in the parameters' flattening order."""
        return info_by_path(self.params, self.info)

    def abstract_params(self, sample: Any = None) -> Params:
        """Shapes and dtypes of the parameters (``jax.ShapeDtypeStruct``)."""
        del sample
        return jax.tree.map(_struct, self.params)

    @functools.cached_property
    def output_struct(self) -> Any:
        """Shapes and dtypes of the outputs for :attr:`sample`."""
        return jax.eval_shape(lambda p, s, x: self.apply(p, s, x)[0],
                              self.abstract_params(),
                              jax.tree.map(_struct, self.state), self.sample)

    @property
    def num_classes(self) -> int:
        """Width of the last output axis (the classes of a classifier)."""
        return int(self.output_struct.shape[-1])

    def with_params(self, params: Params) -> "Model":
        """The same model with other parameters of the same structure.

        Raises:
            ValueError: if ``params`` differ in paths, shapes or dtypes
                (the message lists the differences).
        """
        check_params(self, params, "params")
        return dataclasses.replace(self, params=params)

    def with_state(self, state: Any) -> "Model":
        """The same model with other state (batch statistics)."""
        return dataclasses.replace(self, state=state, forward=None)

    def with_info(self, changes: Mapping[str, Any]) -> "Model":
        """The same model with some leaves' facts declared.

        Args:
            changes: ``{path: LeafInfo | role | {field: value}}``, e.g.
                ``{"position": "other", "w1": {"role": "kernel",
                "in_axes": (1,), "out_axes": (0,)}}``.

        Returns:
            A new :class:`Model`; the dataflow facts (``feeds``,
            ``follows``) are read again with the new roles unless declared.

        Raises:
            InfoError: for a path that is not a leaf or an unknown field.
        """
        infos = override(self.infos, changes)
        infos = _link(self.apply, self.params, self.state, self.sample, infos)
        return dataclasses.replace(self, info=info_tree(self.params, infos))

    def to_native(self, params: Params | None = None) -> Any:
        """``params`` (default: the model's) in the framework's own form.

        For NNX and equinox models this is the module with those
        parameters; otherwise the framework's parameter tree.
        """
        params = self.params if params is None else params
        tree = self.layout.from_dict(params) if self.layout else params
        return self.native(tree) if self.native else tree


def check_params(model: Model, params: Params, name: str = "params") -> None:
    """Raise ``ValueError`` unless ``params`` fit ``model`` exactly.

    Args:
        model: the model.
        params: a parameter tree (arrays or shape structs).
        name: the argument's name, for the message.
    """
    from recovjax.checkpoints import structure_differences
    if not isinstance(params, Mapping):
        raise ValueError(
            f"{name} must be the model's nested dict of parameters "
            f"(model.params, or model.to_native's inverse), got "
            f"{type(params).__name__}")
    differences = structure_differences(model.abstract_params(), params)
    if differences:
        shown = "; ".join(differences[:5]) + (
            f"; ... ({len(differences)} in all)" if len(differences) > 5
            else "")
        raise ValueError(f"{name} do not fit model {model.name!r}: {shown}")


def _link(apply, params, state, sample, infos) -> dict[str, LeafInfo]:
    if sample is None:
        return infos
    flow = graph.dataflow(lambda p, s, x: apply(p, s, x)[0],
                          jax.tree.map(_struct, params), sample, infos,
                          jax.tree.map(_struct, state))
    return graph.link_layers(infos, flow)


def as_sample(sample: Any, name: str = "sample") -> jax.ShapeDtypeStruct:
    """A batch of inputs (or its shape struct) as a ``ShapeDtypeStruct``.

    Raises:
        TypeError: if ``sample`` has no shape and dtype.
    """
    if isinstance(sample, jax.ShapeDtypeStruct):
        return sample
    if not hasattr(sample, "shape") or not hasattr(sample, "dtype"):
        raise TypeError(f"{name} must be an input batch (an array with a "
                        f"leading batch axis) or a jax.ShapeDtypeStruct, got "
                        f"{type(sample).__name__}")
    return jax.ShapeDtypeStruct(tuple(sample.shape), sample.dtype)


def build_model(native_apply: NativeApply, native_params: Any,
                native_state: Any, *, sample: Any, infos: Mapping[str,
                LeafInfo] | None = None, task: Any = "classification",
                name: str = "model", init: Callable[[PRNGKey], Any] | None
                = None, native: Callable[[Any], Any] | None = None,
                info: Mapping[str, Any] | None = None,
                init_state: Callable[[PRNGKey], Any] | None = None) -> Model:
    """Build a :class:`Model` from a framework's trees and apply function.

    Args:
        native_apply: ``native_apply(params, state, inputs, train, key) ->
            (outputs, state)`` on the framework's trees.
        native_params: the parameters in the framework's layout.
        native_state: the state in the framework's layout (``{}`` if none).
        sample: an input batch or its shape struct.
        infos: inferred ``{path: LeafInfo}`` (paths of the nested dict);
            leaves not named are unknown.
        task: the task.
        name: the model's name.
        init: ``init(key) -> params`` in the framework's layout, or None.
        native: turns the framework's parameter tree into the object
            :meth:`Model.to_native` returns, or None.
        info: the user's overrides (see :meth:`Model.with_info`).
        init_state: ``init_state(key) -> state`` in the framework's layout
            (the state that goes with ``init(key)``), or None.

    Returns:
        The :class:`Model`.
    """
    sample = as_sample(sample)
    layout = TreeLayout.of(native_params, "params")
    state_layout = TreeLayout.of(native_state, "state") if jax.tree.leaves(
        native_state) else None
    params = layout.to_dict(native_params)
    state = state_layout.to_dict(native_state) if state_layout else {}

    def to_native_state(tree):
        return state_layout.from_dict(tree) if state_layout else native_state

    def from_native_state(tree):
        return state_layout.to_dict(tree) if state_layout else {}

    def apply(params: Params, state: Any, inputs: Any, *, train: bool = False,
              key: PRNGKey | None = None) -> tuple[Any, Any]:
        outputs, new_state = native_apply(
            layout.from_dict(params), to_native_state(state), inputs,
            bool(train), key)
        return outputs, (from_native_state(new_state) if train else state)

    apply.__doc__ = (f"``apply(params, state, inputs, *, train=False, "
                     f"key=None) -> (outputs, state)`` of {name}.")
    flat_infos = dict(infos or {})
    resolved = {path: flat_infos.get(path, LeafInfo())
                for path in paths_of(params)}
    if info:
        resolved = override(resolved, info)
    resolved = {path: _with_layer(path, leaf)
                for path, leaf in resolved.items()}
    wrapped_init = None
    if init is not None:
        def wrapped_init(key: PRNGKey, sample: Any = None) -> Params:
            del sample  # the model's own sample fixes the shapes
            return layout.to_dict(init(key))
    wrapped_init_state = None
    if init_state is not None:
        def wrapped_init_state(key: PRNGKey) -> Any:
            return from_native_state(init_state(key))
    model = Model(apply=apply, params=params, state=state,
                  info=info_tree(params, resolved), task=task, sample=sample,
                  name=name, init=wrapped_init, layout=layout, native=native,
                  init_state=wrapped_init_state)
    linked = _link(apply, params, state, sample, resolved)
    return dataclasses.replace(model, info=info_tree(params, linked))


def _with_layer(path: str, info: LeafInfo) -> LeafInfo:
    # A leaf without a layer (a plain function's tree has no modules): its
    # layer is its parent path (``hidden`` of ``hidden/kernel``), or the
    # leaf itself at the root.
    if info.layer is not None:
        return info
    parent = path.rsplit("/", 1)[0] if "/" in path else path
    return dataclasses.replace(info, layer=parent)


def from_apply(apply: Callable, params: Any, *, sample: Any,
               state: Any = None, info: Mapping[str, Any] | None = None,
               task: Any = "classification", name: str = "model",
               init: Callable[[PRNGKey], Any] | None = None) -> Model:
    """A model from any pure function.

    Args:
        apply: without ``state``, ``apply(params, inputs) -> outputs``;
            with ``state``, ``apply(params, state, inputs, *, train, key)
            -> (outputs, state)``.
        params: the parameters, any pytree of arrays (converted to a
            nested dict; :meth:`Model.to_native` converts back).
        sample: an input batch (or its ``jax.ShapeDtypeStruct``).
        state: non-trained arrays the function reads, or ``None``.
        info: what the leaves are: ``{path: LeafInfo | role | {field:
            value}}``. A plain function has no module structure to read
            them from, so leaves not declared have unknown roles; scopes
            such as ``"weights"`` and structural damage then ask for them.
        task: the task (default ``"classification"``).
        name: a name for reports.
        init: ``init(key) -> params``, for strategies that re-initialise.

    Returns:
        The :class:`Model`.

    Raises:
        TypeError: if ``apply`` is not callable or ``sample`` has no shape.
        InfoError: for an ``info`` path that is not a leaf.

    Example::

        def mlp(params, x):
            return jnp.tanh(x @ params["w1"]) @ params["w2"]
        model = from_apply(mlp, params, sample=x[:1], info={
            "w1": LeafInfo("kernel", in_axes=(0,), out_axes=(1,)),
            "w2": LeafInfo("kernel", in_axes=(0,), out_axes=(1,))})
    """
    if not callable(apply):
        raise TypeError(f"apply must be a function, got "
                        f"{type(apply).__name__}")
    if state is None:
        def native_apply(params, state, inputs, train, key):
            del train, key
            return apply(params, inputs), state
        native_state: Any = {}
    else:
        def native_apply(params, state, inputs, train, key):
            return apply(params, state, inputs, train=train, key=key)
        native_state = state
    return build_model(native_apply, params, native_state, sample=sample,
                       infos=None, task=task, name=name, init=init,
                       info=info)


def require_model(model: Any, name: str = "model") -> Model:
    """Raise ``TypeError`` unless ``model`` is a :class:`Model`."""
    if not isinstance(model, Model):
        raise TypeError(
            f"{name} must be a recovjax.models.Model (build one with "
            f"from_linen, from_nnx, from_equinox or from_apply), got "
            f"{type(model).__name__}")
    return model


__all__ = ["InfoError", "Model", "TreeLayout", "as_sample", "build_model",
           "check_params", "from_apply", "key_name", "require_model"]
