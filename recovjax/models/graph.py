"""Dataflow facts read off a model's traced program.

Which layer's output units a later layer reads cannot be told from names
(``Dense_10`` sorts before ``Dense_2``) or from the order of a parameter
tree; it is a fact of the computation. :func:`dataflow` traces the model's
forward pass once (``jax.make_jaxpr``, nothing is computed) and follows
every value from the input to the outputs:

* A value that depends on parameters only (a kernel cast to another dtype,
  a band matrix built from it) is *parameter-derived*.
* An operation that combines an activation with parameter-derived values
  holding a layer's kernel *applies* that layer: its result is that
  layer's output. Operations that combine an activation with other
  parameters (a bias, a normalisation's scale and offset) keep the
  activation's origin, and record which layer's units those parameters
  act on.
* Every other operation (activation functions, pooling, reshapes, sums of
  branches) passes on the union of its inputs' origins.

From this, layer ``P`` *feeds* layer ``C`` when ``C``'s inputs come from
``P`` alone and ``P``'s output reaches no other layer and not the model's
output. Such a pair is a chain link: removing a unit of ``P`` means zeroing
its kernel column and bias, the normalisation entries that *follow* it,
and ``C``'s input rows that read it, and the network then computes what it
would without the unit. A residual stream (``x + f(x)``) mixes origins, so
its layers are never linked; the layers inside a residual branch are.

Sub-programs (``jit``, ``custom_jvp``/``custom_vjp`` calls, ``remat``,
``scan`` bodies) are followed into. Layers applied inside a ``while`` or
``cond`` are seen as one opaque operation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
from jax.extend import core as jax_core

from recovjax.models.info import EMBEDDING, KERNEL, LeafInfo

INPUT = "<input>"
"""The origin of the model's inputs."""

_Act = frozenset  # origins of an activation: layer paths (or INPUT)


@dataclasses.dataclass(frozen=True)
class _Param:
    leaves: frozenset  # indices of the parameter leaves it derives from


class Dataflow:
    """What :func:`dataflow` found.

    Attributes:
        inputs: for each applied layer, the origins of its inputs.
        acted_on: for each layer whose non-kernel leaves met an activation,
            the origins of the activations they met.
        outputs: the origins of the model's outputs.
        channels: for layers applied by a convolution, where its output
            holds the channels (``"last"`` or ``"first"``).
        order: layers in the order the program first applies them.
        program: the traced program (a ``ClosedJaxpr``) whose dataflow
            this is.
        steps: for each equation of the program's top level, in order,
            ``(ins, outs)``: what its inputs and outputs hold (a frozenset
            of origins for an activation, a parameter-derived value, or
            ``None`` for a constant), which is where activation fault
            sites are found (:mod:`recovjax.damage.activations`).
    """

    def __init__(self):
        self.inputs: dict[str, set] = {}
        self.acted_on: dict[str, set] = {}
        self.outputs: set = set()
        self.channels: dict[str, str] = {}
        self.order: list[str] = []
        self.program: Any = None
        self.steps: list[tuple[list, list]] = []

    def consumers(self, layer: str) -> set[str]:
        """Layers whose inputs come (in part) from ``layer``."""
        return {other for other, origins in self.inputs.items()
                if layer in origins}


def _sub_jaxpr(eqn) -> tuple[Any, list] | None:
    # The sub-program whose inputs align one to one with the equation's.
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(name)
        if sub is None:
            continue
        jaxpr = getattr(sub, "jaxpr", sub)
        if isinstance(jaxpr, jax_core.Jaxpr) and len(jaxpr.invars) == len(
                eqn.invars):
            return jaxpr, list(getattr(sub, "consts", ()))
    return None


def dataflow(forward: Callable, params: Any, sample: Any,
             infos: Mapping[str, LeafInfo], state: Any = None, *,
             program: Any = None) -> Dataflow:
    """Trace ``forward(params, state, sample)`` and follow its dataflow.

    Args:
        forward: ``forward(params, state, inputs) -> outputs``.
        params: the parameters (arrays or shape structs).
        sample: an input batch (array or shape struct).
        state: the model's state (arrays or shape structs); its values are
            treated as constants.
        infos: ``{path: LeafInfo}`` in the flattening order of ``params``;
            the roles say which leaves are kernels.
        program: the program of ``forward`` already traced (a
            ``ClosedJaxpr`` whose inputs are the leaves of ``params``,
            ``state`` and ``sample``, in order), instead of tracing it.

    Returns:
        The :class:`Dataflow`.
    """
    closed = (jax.make_jaxpr(forward)(params, state, sample)
              if program is None else program)
    num_state = len(jax.tree.leaves(state))
    paths = list(infos)
    leaf_infos = [infos[path] for path in paths]
    count = len(paths)
    flow = Dataflow()

    def read(env, var):
        if isinstance(var, jax_core.Literal):
            return None
        return env.get(var)

    def apply_layers(eqn, states) -> Any:
        acts = [s for s in states if isinstance(s, frozenset)]
        params_in = [s for s in states if isinstance(s, _Param)]
        leaves = frozenset().union(*(p.leaves for p in params_in))
        if not acts:
            return _Param(leaves) if leaves else None
        origins = frozenset().union(*acts)
        applied = []
        for index in sorted(leaves):
            info = leaf_infos[index]
            if info.role in (KERNEL, EMBEDDING) and info.layer is not None:
                if info.layer not in applied:
                    applied.append(info.layer)
            elif info.layer is not None:
                flow.acted_on.setdefault(info.layer, set()).update(origins)
        if not applied:
            return origins
        for layer in applied:
            flow.inputs.setdefault(layer, set()).update(origins)
            if layer not in flow.order:
                flow.order.append(layer)
            if eqn.primitive.name == "conv_general_dilated":
                spec = eqn.params["dimension_numbers"].out_spec
                flow.channels[layer] = ("last" if spec[1] > max(spec[2:])
                                        else "first")
        return frozenset(applied)

    def run(jaxpr, states: list, top: bool = False) -> list:
        env = dict(zip(jaxpr.invars, states))
        for eqn in jaxpr.eqns:
            ins = [read(env, var) for var in eqn.invars]
            sub = _sub_jaxpr(eqn)
            if sub is not None and eqn.primitive.name != "scan":
                outs = run(sub[0], ins)
            elif sub is not None:
                # A scan's carries flow back into the body: run it until
                # their origins stop growing (twice suffices for a chain).
                num_consts = eqn.params["num_consts"]
                num_carry = eqn.params["num_carry"]
                for _ in range(3):
                    outs = run(sub[0], ins)
                    carry = [_merge(a, b) for a, b in zip(
                        ins[num_consts:num_consts + num_carry],
                        outs[:num_carry])]
                    if carry == ins[num_consts:num_consts + num_carry]:
                        break
                    ins = ins[:num_consts] + carry + ins[
                        num_consts + num_carry:]
            else:
                out = apply_layers(eqn, ins)
                outs = [out] * len(eqn.outvars)
            for var, state in zip(eqn.outvars, outs):
                env[var] = state
            if top:
                flow.steps.append((ins, list(outs)))
        return [read(env, var) for var in jaxpr.outvars]

    inputs = ([_Param(frozenset([i])) for i in range(count)]
              + [None] * num_state
              + [frozenset([INPUT])] * (len(closed.jaxpr.invars) - count
                                        - num_state))
    flow.program = closed
    for state in run(closed.jaxpr, inputs, top=True):
        if isinstance(state, frozenset):
            flow.outputs.update(state)
    return flow


def _merge(a, b):
    if isinstance(a, frozenset) and isinstance(b, frozenset):
        return a | b
    if isinstance(a, _Param) and isinstance(b, _Param):
        return _Param(a.leaves | b.leaves)
    return b if a is None else a


def link_layers(infos: Mapping[str, LeafInfo], flow: Dataflow
                ) -> dict[str, LeafInfo]:
    """``infos`` with ``feeds``, ``follows`` and ``channels`` filled in.

    Declared values (not ``None``) of ``feeds`` and ``follows`` are kept.

    Args:
        infos: ``{path: LeafInfo}``.
        flow: the model's :class:`Dataflow`.

    Returns:
        The updated ``{path: LeafInfo}``.
    """
    kernel_layers = {info.layer for info in infos.values()
                     if info.role == KERNEL and info.layer is not None}
    feeds = {}
    for layer in kernel_layers:
        consumers = flow.consumers(layer)
        if (len(consumers) == 1 and layer not in flow.outputs):
            (consumer,) = consumers
            if consumer in kernel_layers and flow.inputs[consumer] == {layer}:
                feeds[layer] = consumer
    follows = {}
    for layer, origins in flow.acted_on.items():
        if layer in kernel_layers or len(origins) != 1:
            continue
        (origin,) = origins
        if origin in kernel_layers:
            follows[layer] = origin
    # A module that mixes the units it normalises (a layer norm) between two
    # layers breaks the link: removing a unit would change the others.
    for path, info in infos.items():
        if info.mixes_units and info.layer in follows:
            feeds.pop(follows[info.layer], None)
    result = {}
    for path, info in infos.items():
        changes = {}
        if info.role == KERNEL and info.feeds is None and (
                info.layer in feeds):
            changes["feeds"] = feeds[info.layer]
        if (info.role is not None and info.role != KERNEL
                and info.follows is None and info.layer in follows):
            changes["follows"] = follows[info.layer]
        if info.layer in flow.channels:
            changes["channels"] = flow.channels[info.layer]
        result[path] = dataclasses.replace(info, **changes) if changes else (
            info)
    return result


def parameter_leaves(state: Any) -> frozenset:
    """The parameter leaves (indices in flattening order) a value of
    :attr:`Dataflow.steps` derives from; empty for an activation or a
    constant."""
    return state.leaves if isinstance(state, _Param) else frozenset()
