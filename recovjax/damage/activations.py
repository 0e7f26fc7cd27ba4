"""Activation faults: corruptions of layer outputs while the model runs.

Soft errors in a processor's datapath or registers hit the values a layer
computes, not the stored weights. Here a fault is injected at *sites*,
the outputs of the model's layers, by re-running the model's own traced
program with a corruption applied to the site values. This works for any
:class:`~recovjax.models.Model` (linen, NNX, equinox, :func:`from_apply`):
the sites come from the dataflow analysis of :mod:`recovjax.models.graph`,
which finds where each layer's output is complete, after its kernel and
the per-unit parameters of the same layer (a bias) have been applied, and
before what follows (an activation function, a normalisation). Calls to
``jit``-compiled functions inside the model are inlined so that layers
inside them are sites too, and so are calls with custom derivative rules
(whose rules the faulty pass drops: it is for evaluation). A layer applied
inside a ``scan``, ``cond`` or ``while`` is not a site (its output is not a
value of the program's top level), nor is a layer applied by an operation
that also applies other layers.

::

    faults = make_activation_faults("flip", bits="exponent")
    apply = faults.apply(model, key, 1e-4)   # apply(params, x, batch=0)
    metrics = evaluate(apply, model.params, batches, 10)

``evaluate`` passes each batch's index, so **transient** faults (the
default) are drawn afresh for every evaluated batch, keyed by
``fold_in(key, batch)``; **permanent** faults hit the same units of every
example (one draw over a site's per-example shape, shared by the batch),
a broken unit of the hardware. Within one batch the examples' faults are
independent (transient) or equal (permanent). Site ``i`` of the chosen
sites (in program order) gets ``fold_in(..., i)``, so faults at one site
do not depend on which other sites are chosen.

The amount is traced: a sweep over rates is one compiled program. A rate
of 0 hits nothing: every site value passes through unchanged, and the
outputs are the clean model's up to the last bits (the program around the
sites is fused differently). A model evaluated with no
fault does not go through this module at all, so the clean path compiles
to the program it always did.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from recovjax import _checks
from recovjax._types import Array, Params, PRNGKey
from recovjax.damage import compose, corrupt, select
from recovjax.damage.params import _check_bits, check_choice
from recovjax.models import graph
from recovjax.models.info import EMBEDDING, KERNEL, info_by_path

PERSISTENCE = ("transient", "permanent")
CORRUPTIONS = ("flip", "stuck_at_0", "stuck_at_1", "zero", "sign_flip",
               "noise")
SITE_KINDS = ("conv", "dense", "embedding")
# Calls whose bodies run in line, so that layers inside them are sites. A
# custom derivative rule (custom_jvp/custom_vjp) is dropped with its call:
# the faulty forward pass is for evaluation, and differentiating it goes
# through the body's own operations.
_INLINED = frozenset({"jit", "pjit", "closed_call", "core_call",
                      "custom_jvp_call", "custom_vjp_call"})


class Site(NamedTuple):
    """One place where a layer's output can be corrupted.

    Attributes:
        layer: the layer's path (its leaves' ``LeafInfo.layer``).
        shape: the output's shape for the traced input batch (axis 0 is
            the batch).
        dtype: the output's dtype.
        kind: ``"conv"`` (a kernel of 3 or more axes), ``"dense"`` (2
            axes) or ``"embedding"``.
        index: its position among the model's sites, in program order.
    """

    layer: str
    shape: tuple[int, ...]
    dtype: Any
    kind: str
    index: int


SiteChoice = Any
"""``"all"``; a site kind (``"conv"``, ``"dense"``, ``"embedding"``); a
layer path or a regex matched against the whole path; a list of layer
paths; or a predicate ``(site: Site) -> bool``."""


# --------------------------------------------------------------------------
# The program and its sites.
# --------------------------------------------------------------------------


def _evaluate(jaxpr, consts, args, hooks=None, env=None) -> list:
    # Run a jaxpr's top level, inlining jit calls; hooks[i] rewrites the
    # outputs of top-level equation i; env (if given) keeps every value of
    # the top level by variable.
    env = {} if env is None else env

    def read(var):
        return var.val if isinstance(var, jax_core.Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for index, eqn in enumerate(jaxpr.eqns):
        ins = [read(var) for var in eqn.invars]
        if eqn.primitive.name in _INLINED:
            sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            outs = _evaluate(getattr(sub, "jaxpr", sub),
                             getattr(sub, "consts", ()), ins)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*ins, **params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        if hooks is not None and index in hooks:
            outs = hooks[index](list(outs))
        for var, value in zip(eqn.outvars, outs):
            env[var] = value
    return [read(var) for var in jaxpr.outvars]


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """A model's forward pass for one input shape, with its sites.

    Attributes:
        program: the traced forward pass (a ``ClosedJaxpr`` of the
            parameter leaves and the input), jit calls inlined.
        sites: every site, by layer path, in program order.
        equations: for each site's layer, the top-level equation whose
            output is the site.
        out_tree: the structure of the forward pass's outputs.
    """

    program: Any
    sites: dict[str, Site]
    equations: dict[str, int]
    out_tree: Any


def trace_program(model, params: Params, inputs: Any) -> Program:
    """Trace ``model.forward`` for ``inputs``' shape and find its sites.

    Args:
        model: a :class:`~recovjax.models.Model`.
        params: its parameters (arrays, tracers or shape structs).
        inputs: an input batch (array, tracer or shape struct).

    Returns:
        The :class:`Program`.
    """
    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        jnp.shape(x), jnp.result_type(x)), (params, inputs))
    traced = jax.make_jaxpr(model.forward, return_shape=True)(*structs)
    closed, out_shape = traced
    flat_in = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
               for v in closed.jaxpr.invars]
    inlined = jax.make_jaxpr(lambda *args: _evaluate(
        closed.jaxpr, closed.consts, args))(*flat_in)
    infos = info_by_path(structs[0], model.info)
    flow = graph.dataflow(None, structs[0], structs[1], infos,
                          program=inlined)
    leaf_infos = list(infos.values())
    kernels = {info.layer: info for info in leaf_infos
               if info.role in (KERNEL, EMBEDDING) and info.layer}
    kernel_ndim = {}
    for path, info in infos.items():
        if info.role in (KERNEL, EMBEDDING) and info.layer:
            leaf = _leaf_at(structs[0], path)
            kernel_ndim[info.layer] = len(leaf.shape)
    found: dict[str, int] = {}
    for index, (ins, outs) in enumerate(flow.steps):
        if len(outs) != 1 or not isinstance(outs[0], frozenset) or len(
                outs[0]) != 1:
            continue
        (layer,) = outs[0]
        if layer not in kernels:
            continue
        leaves = frozenset().union(*(graph.parameter_leaves(s) for s in ins))
        # The layer's own leaves only: an operation that also applies other
        # layers (a fused block) is not this layer's output.
        if leaves and all(leaf_infos[i].layer == layer for i in leaves):
            found[layer] = index
    ordered = sorted(found, key=found.get)
    sites = {}
    for position, layer in enumerate(ordered):
        var = inlined.jaxpr.eqns[found[layer]].outvars[0]
        if kernels[layer].role == EMBEDDING:
            kind = "embedding"
        else:
            kind = "conv" if kernel_ndim[layer] >= 3 else "dense"
        sites[layer] = Site(layer, tuple(var.aval.shape), var.aval.dtype,
                            kind, position)
    return Program(inlined, sites, {layer: found[layer] for layer in ordered},
                   jax.tree.structure(out_shape))


def _leaf_at(tree, path: str):
    node = tree
    for part in path.split("/"):
        node = node[part]
    return node


def find_sites(model, sample: Any) -> dict[str, Site]:
    """The model's fault sites for a batch shaped like ``sample``.

    Args:
        model: a :class:`~recovjax.models.Model`.
        sample: an input batch (array or shape struct, axis 0 the batch).

    Returns:
        ``{layer path: Site}`` in program order.
    """
    return trace_program(model, model.params, sample).sites


def choose_sites(sites: dict[str, Site], choice: SiteChoice) -> list[Site]:
    """The sites a choice names, in program order.

    Raises:
        ValueError: for a layer path the model has no site for, or a
            choice that matches no site (listing the sites).
        TypeError: for a choice of another type.
    """
    listing = ", ".join(sites) or "none"
    if callable(choice):
        chosen = [site for site in sites.values() if choice(site)]
    elif isinstance(choice, str):
        if choice == "all":
            chosen = list(sites.values())
        elif choice in SITE_KINDS:
            chosen = [s for s in sites.values() if s.kind == choice]
        else:
            try:
                pattern = re.compile(choice)
            except re.error as error:
                raise ValueError(f"sites: {choice!r} is not a valid regex: "
                                 f"{error}") from None
            chosen = [s for s in sites.values()
                      if pattern.fullmatch(s.layer)]
    elif isinstance(choice, (list, tuple)) and all(
            isinstance(c, str) for c in choice):
        missing = [c for c in choice if c not in sites]
        if missing:
            raise ValueError(f"sites: the model has no site {missing[0]!r}; "
                             f"its sites are {listing}")
        chosen = [s for s in sites.values() if s.layer in choice]
    else:
        raise TypeError(f"sites must be 'all', a site kind, a layer path or "
                        f"regex, a list of layer paths or a predicate "
                        f"(site) -> bool, got {choice!r}")
    if not chosen:
        raise ValueError(f"sites: {choice!r} matches no site; the model's "
                         f"sites are {listing}")
    return chosen


def with_site_hooks(model, hooks: Callable[[Program, Any], dict]
                    ) -> Callable:
    """The model's forward pass with functions applied at its sites.

    Args:
        model: a :class:`~recovjax.models.Model`.
        hooks: ``hooks(program, batch) -> {layer: fn}``, called while
            tracing: each ``fn(value) -> value`` replaces the site's value.

    Returns:
        ``apply(params, x, batch=0) -> outputs`` with ``takes_batch =
        True``; the program is traced once per input shape.
    """
    programs: dict = {}

    def apply(params: Params, x: Any, batch: Any = 0) -> Any:
        signature = (jax.tree.structure((params, x)), tuple(
            (jnp.shape(v), jnp.result_type(v))
            for v in jax.tree.leaves((params, x))))
        if signature not in programs:
            programs[signature] = trace_program(model, params, x)
        program = programs[signature]
        by_layer = hooks(program, batch)
        by_equation = {program.equations[layer]: (
            lambda outs, fn=fn: [fn(outs[0])] + list(outs[1:]))
            for layer, fn in by_layer.items()}
        outs = _evaluate(program.program.jaxpr, program.program.consts,
                         jax.tree.leaves((params, x)), by_equation)
        return jax.tree.unflatten(program.out_tree, outs)

    apply.takes_batch = True
    return apply


def site_values(model, params: Params, x: Any, sites: SiteChoice = "all"
                ) -> dict[str, Array]:
    """The values at the chosen sites for one batch (traceable).

    Returns:
        ``{layer: value}`` in program order.
    """
    seen: dict = {}

    def hooks(program, batch):
        def record(layer):
            def fn(value):
                seen[layer] = value
                return value
            return fn
        return {site.layer: record(site.layer)
                for site in choose_sites(program.sites, sites)}

    with_site_hooks(model, hooks)(params, x)
    return dict(seen)


# --------------------------------------------------------------------------
# Range restriction.
# --------------------------------------------------------------------------

RESTRICTIONS = ("clip", "zero")


@dataclasses.dataclass(frozen=True, eq=False)
class RangeRestriction:
    """Ranger's protection: site values kept to the range seen on clean
    data.

    Attributes:
        low, high: ``{layer: float32 scalar}``: each bounded site's smallest
            and largest value over the profiling data.
        mode: ``"clip"`` (values outside the range are clipped to it) or
            ``"zero"`` (they become 0). Either way a NaN becomes 0: a
            detector that passed NaN on would protect nothing from the
            exponent flips that make it.
    """

    low: dict
    high: dict
    mode: str = "clip"

    def restrict(self, value: Array, layer: str) -> Array:
        """``value`` at site ``layer`` restricted to its range."""
        low = jnp.asarray(self.low[layer], value.dtype)
        high = jnp.asarray(self.high[layer], value.dtype)
        if self.mode == "clip":
            kept = jnp.clip(value, low, high)
        else:
            kept = jnp.where((value >= low) & (value <= high), value,
                             jnp.zeros((), value.dtype))
        return jnp.where(jnp.isnan(value), jnp.zeros((), value.dtype), kept)

    def hooks(self, program: Program, inner: dict | None = None) -> dict:
        """Hooks restricting every bounded site, after ``inner``'s."""
        inner = dict(inner or {})
        missing = sorted(set(self.low) - set(program.sites))
        if missing:
            raise ValueError(f"restriction: the model has no site "
                             f"{missing[0]!r}; its sites are "
                             f"{', '.join(program.sites)}")

        def chained(layer, first):
            def fn(value):
                if first is not None:
                    value = first(value)
                return self.restrict(value, layer)
            return fn

        for layer in self.low:
            inner[layer] = chained(layer, inner.get(layer))
        return inner

    def apply(self, model) -> Callable:
        """The model's forward pass with range restriction and no fault:
        what protection costs a clean evaluation."""
        return with_site_hooks(model, lambda program, batch: self.hooks(
            program))


def profile_ranges(model, params: Params, batches, *,
                   sites: SiteChoice = "all", mode: str = "clip"
                   ) -> RangeRestriction:
    """Profile each site's range on clean data (Ranger's bounds).

    Args:
        model: a :class:`~recovjax.models.Model`.
        params: its clean parameters.
        batches: the profiling data, :class:`~recovjax.Batches` (padding
            excluded from the ranges).
        sites: the sites to bound.
        mode: ``"clip"`` or ``"zero"`` (see :class:`RangeRestriction`).

    Returns:
        The :class:`RangeRestriction`.

    Raises:
        ValueError: for an unknown mode or a site choice matching nothing.
    """
    check_choice("mode", mode, RESTRICTIONS)

    def ranges(params, batches):
        def step(carry, batch):
            images, mask = batch
            values = site_values(model, params, images, sites)
            valid = mask > 0
            out = {}
            for layer, value in values.items():
                keep = valid.reshape((-1,) + (1,) * (value.ndim - 1))
                low = jnp.min(jnp.where(keep, value, jnp.inf))
                high = jnp.max(jnp.where(keep, value, -jnp.inf))
                out[layer] = (jnp.minimum(carry[layer][0], low),
                              jnp.maximum(carry[layer][1], high))
            return out, None

        first = site_values(model, params, batches.images[0], sites)
        start = {layer: (jnp.float32(jnp.inf), jnp.float32(-jnp.inf))
                 for layer in first}
        out, _ = jax.lax.scan(step, start, (batches.images, batches.mask))
        return out

    found = jax.device_get(jax.jit(ranges)(params, batches))
    return RangeRestriction({k: float(v[0]) for k, v in found.items()},
                            {k: float(v[1]) for k, v in found.items()}, mode)


# --------------------------------------------------------------------------
# Faults.
# --------------------------------------------------------------------------


def _corruption(name: str, bits, mode: str
                ) -> tuple[corrupt.Corruption, bool]:
    # The corruption, and whether the amount is a fraction (not a scale).
    if name == "flip" and mode == "value":
        return corrupt.flip_one_bit(bits), True
    if name in ("flip", "stuck_at_0", "stuck_at_1"):
        return corrupt.bit_fault(name, bits), True
    if name == "zero":
        return corrupt.zero(), True
    if name == "sign_flip":
        return corrupt.negate(), True
    return corrupt.gaussian_noise(relative=True), False


@dataclasses.dataclass(frozen=True, eq=False)
class ActivationFaults:
    """Faults at a model's activation sites (see the module docstring).

    Built by :func:`make_activation_faults`; :meth:`apply` gives the faulty
    forward pass.

    Attributes:
        corruption: what a fault does.
        selection: which entries of a site it hits.
        sites: the site choice.
        persistence: ``"transient"`` or ``"permanent"``.
        amount_name: ``"rate"`` or ``"scale"``.
        amount_is_fraction: whether the amount lies in ``[0, 1]``.
        damage_kind: ``"activations"``.
        protection: a :class:`RangeRestriction` applied after the faults
            (see :meth:`protected`), or ``None``.
        wants_restriction: the range restriction asked for and not yet
            profiled (``"clip"`` or ``"zero"``; see :meth:`profiled`).
        max_rate: the largest rate of sparse sampling (see
            :func:`make_activation_faults`), or ``None``.
    """

    corruption: corrupt.Corruption
    selection: compose.Selection
    sites: SiteChoice
    persistence: str
    amount_name: str
    amount_is_fraction: bool
    damage_kind: str = "activations"
    per_leaf_amounts: bool = False
    check_traced: bool = False
    protection: Any = None
    wants_restriction: str | None = None
    max_rate: float | None = None

    def __call__(self, key: PRNGKey, params: Params, amount: Any, *,
                 info: Any = None):
        """Refused: activation faults change the forward pass, not the
        parameters.

        Raises:
            TypeError: always, saying how to use them.
        """
        raise TypeError(
            "activation faults corrupt layer outputs while the model runs; "
            "they do not damage parameters. Evaluate faults.apply(model, "
            "key, amount) instead of model.forward, or sweep them "
            "(recovjax.sweep); recovery from activation faults is not "
            "defined")

    def apply(self, model, key: PRNGKey, amount: Any) -> Callable:
        """The faulty forward pass of ``model``.

        Args:
            model: a :class:`~recovjax.models.Model`.
            key: typed key of this faulty model.
            amount: the rate (or noise scale); may be traced.

        Returns:
            ``apply(params, x, batch=0) -> outputs``, the model's outputs
            with faults at the chosen sites; ``batch`` (an int or a traced
            int32) keys transient faults. It has ``takes_batch = True``, so
            :func:`recovjax.evaluate.evaluate` passes each batch's index.

        Raises:
            ValueError: for a concrete amount out of range, or (when
                called) a site choice that matches no site.
        """
        select.check_key(key)
        faulty = with_site_hooks(model, self.site_hooks(key, amount))
        faulty.__name__ = f"{getattr(model, 'name', 'model')}_with_faults"
        return faulty

    def site_hooks(self, key: PRNGKey, amount: Any) -> Callable:
        """``hooks(program, batch) -> {layer: fn}`` of these faults (what
        :meth:`apply` runs; :func:`mix` merges several)."""
        amount = select.check_amount(amount, name=self.amount_name,
                                     fraction=self.amount_is_fraction)
        if (self.max_rate is not None and not _checks.is_traced(amount)
                and np.float32(amount) > np.float32(self.max_rate)):
            raise ValueError(f"{self.amount_name}: {float(amount)} is above "
                             f"max_rate={self.max_rate}")
        if self.wants_restriction is not None and self.protection is None:
            raise ValueError(
                f"range_restriction={self.wants_restriction!r} needs bounds "
                "profiled on clean data: faults.profiled(model, params, "
                "batches) first")
        protection = self.protection

        def hooks(program: Program, batch: Any) -> dict:
            chosen = choose_sites(program.sites, self.sites)
            batch_key = (key if self.persistence == "permanent"
                         else jax.random.fold_in(key, batch))
            found = {site.layer: functools.partial(
                self._hit, jax.random.fold_in(batch_key, site.index), amount,
                site.layer) for site in chosen}
            if protection is not None:
                found = protection.hooks(program, found)
            return found

        return hooks

    def protected(self, restriction: "RangeRestriction") -> "ActivationFaults":
        """These faults with range restriction at the sites it bounds:
        every site value is faulted first, then restricted."""
        if not isinstance(restriction, RangeRestriction):
            raise TypeError(f"restriction must be a RangeRestriction, got "
                            f"{type(restriction).__name__}")
        return dataclasses.replace(self, protection=restriction)

    def unprofiled(self) -> "ActivationFaults":
        """These faults with no range restriction asked for: what a check
        traces before any bounds exist."""
        return dataclasses.replace(self, wants_restriction=None)

    def profiled(self, model, params: Params, batches) -> "ActivationFaults":
        """These faults protected by the range restriction they ask for,
        with bounds profiled on ``batches`` (see :func:`profile_ranges`);
        the faults themselves when they ask for none."""
        if self.wants_restriction is None:
            return self
        return self.protected(profile_ranges(
            model, params, batches, mode=self.wants_restriction))

    def _hit(self, key: PRNGKey, amount: Array, layer: str,
             value: Array) -> Array:
        def corrupt_one(value, key):
            if self.max_rate is not None:
                return compose.corrupt_sparse(
                    key, self.corruption, value, jnp.minimum(
                        amount, self.max_rate),
                    compose.capacity(value.size, self.max_rate), layer)
            (new,), _ = compose.corrupt_arrays(
                key, self.selection, self.corruption, [value], amount,
                [layer], noun="site", plural="values")
            return new

        if self.persistence == "permanent":
            # One draw over the per-example shape, shared by the batch.
            return jax.vmap(corrupt_one, in_axes=(0, None))(value, key)
        return corrupt_one(value, key)


def make_activation_faults(
        corruption: str = "flip", *, bits="any", sites: SiteChoice = "all",
        persistence: Literal["transient", "permanent"] = "transient",
        mode: Literal["value", "bernoulli", "exact"] = "value",
        range_restriction: Literal["clip", "zero"] | None = None,
        max_rate: float | None = None) -> ActivationFaults:
    """Build faults that corrupt layer outputs as the model runs.

    Args:
        corruption: ``"flip"``, ``"stuck_at_0"``, ``"stuck_at_1"`` (bits of
            the activation's own dtype), ``"zero"``, ``"sign_flip"`` or
            ``"noise"`` (Gaussian, relative to the site's standard
            deviation over the batch, or over the example when permanent).
        bits: the eligible bits of a bit fault, as for
            :func:`~recovjax.damage.make_bit_flip`.
        sites: which sites (see :data:`SiteChoice`).
        persistence: ``"transient"`` (drawn afresh per batch) or
            ``"permanent"`` (the same units of every example).
        mode: ``"value"`` (each value of a site is hit independently with
            probability ``rate``, and a hit value gets one flip of a
            uniformly drawn eligible bit: PyTorchFI's single-bit model; for
            corruptions other than ``"flip"`` the same as
            ``"bernoulli"``), ``"bernoulli"`` (each eligible bit, or each
            value for the corruptions without bits, independently with
            probability ``rate``) or ``"exact"`` (exactly ``floor(n *
            rate)`` bits or values per site and draw); unused by
            ``"noise"``, which perturbs every entry of a site. ``"value"``
            draws once per value, ``"bernoulli"`` once per eligible bit.
        range_restriction: ask for Ranger's protection (``"clip"`` or
            ``"zero"``, see :class:`RangeRestriction`) at every site, with
            bounds profiled on clean data: :meth:`ActivationFaults.profiled`
            profiles them (an experiment does it on the first 1,000
            training examples); the faults cannot be applied before. In
            Python, ``faults.protected(profile_ranges(...))`` is the same.
        max_rate: sample the faults sparsely, for rates up to this: each
            site draws the positions of its faults by their geometric
            gaps, so a point costs in its faults, not in the site's values,
            with the distribution of one draw per value (see
            :func:`~recovjax.damage.compose.corrupt_sparse`). Needs
            ``mode="value"`` and a corruption of whole values (``"flip"``,
            ``"zero"``, ``"sign_flip"``). A concrete rate above it is
            refused, a traced one is clipped to it. ``None``: one draw per
            value (or per bit), exact at any rate.

    Returns:
        The :class:`ActivationFaults`; its amount is a ``rate`` (or, for
        ``"noise"``, a ``scale``).

    Raises:
        ValueError: for an unknown choice or bit class (now).
    """
    check_choice("corruption", corruption, CORRUPTIONS)
    check_choice("persistence", persistence, PERSISTENCE)
    check_choice("mode", mode, ("value", "bernoulli", "exact"))
    _check_bits(bits)
    if not (callable(sites) or isinstance(sites, (str, list, tuple))):
        raise TypeError(f"sites must be 'all', a site kind, a layer path or "
                        f"regex, a list of layer paths or a predicate "
                        f"(site) -> bool, got {sites!r}")
    if range_restriction is not None:
        check_choice("range_restriction", range_restriction, RESTRICTIONS)
    if max_rate is not None:
        if isinstance(max_rate, bool) or not isinstance(
                max_rate, (int, float)) or not 0 < max_rate <= 1:
            raise ValueError(f"max_rate must be a rate in (0, 1], got "
                             f"{max_rate!r}")
        if mode != "value" or corruption not in ("flip", "zero",
                                                 "sign_flip"):
            raise ValueError("max_rate (sparse faults) needs mode='value' "
                             "and corruption 'flip', 'zero' or "
                             "'sign_flip'")
        max_rate = float(max_rate)
    fault, fraction = _corruption(corruption, bits, mode)
    selection = (compose.fraction_of_entries(
        "bernoulli" if mode == "value" else mode, "leaf", "random")
        if fraction else compose.every_entry())
    return ActivationFaults(fault, selection,
                            tuple(sites) if isinstance(sites, list)
                            else sites, persistence,
                            "rate" if fraction else "scale", fraction,
                            wants_restriction=range_restriction,
                            max_rate=max_rate)


@dataclasses.dataclass(frozen=True, eq=False)
class MixedFaults:
    """Weight and activation faults in one point (built by :func:`mix`).

    Attributes:
        weights: a parameter damage operator, or ``None``.
        activations: the activation faults, applied in order.
        scales: the factor of the point's amount each part gets
            (``weights`` first, if any).
    """

    weights: Any
    activations: tuple
    scales: tuple
    amount_name: str = "rate"
    amount_is_fraction: bool = True
    damage_kind: str = "activations"
    per_leaf_amounts: bool = False
    check_traced: bool = False

    def __call__(self, key: PRNGKey, params: Params, amount: Any, *,
                 info: Any = None):
        """Refused, as for :class:`ActivationFaults`."""
        return ActivationFaults.__call__(self, key, params, amount, info=info)

    @property
    def wants_restriction(self) -> str | None:
        """The range restriction a part asks for and has not profiled."""
        return next((part.wants_restriction for part in self.activations
                     if part.wants_restriction is not None
                     and part.protection is None), None)

    def profiled(self, model, params: Params, batches) -> "MixedFaults":
        """Every part's range restriction profiled (see
        :meth:`ActivationFaults.profiled`)."""
        return dataclasses.replace(self, activations=tuple(
            part.profiled(model, params, batches)
            for part in self.activations))

    def unprofiled(self) -> "MixedFaults":
        """No part asking for range restriction (for checks)."""
        return dataclasses.replace(self, activations=tuple(
            part.unprofiled() for part in self.activations))

    def damage_params(self, key: PRNGKey, params: Params, amount: Any, *,
                      info: Any = None) -> Params:
        """The parameters with the weight faults of this point (all of
        them when there are none)."""
        if self.weights is None:
            return params
        from recovjax.damage.registry import accepts_info
        extra = ({"info": info} if info is not None
                 and accepts_info(self.weights) else {})
        return self.weights(jax.random.fold_in(key, 0), params,
                            amount * self.scales[0], **extra).params

    def apply(self, model, key: PRNGKey, amount: Any) -> Callable:
        """The forward pass with every part's activation faults: part ``i``
        keyed by ``fold_in(key, i + 1)``, its amount scaled by its factor;
        at a site several parts hit, in the order given."""
        select.check_key(key)
        first = 0 if self.weights is None else 1
        parts = [faults.site_hooks(jax.random.fold_in(key, index + 1),
                                   amount * scale)
                 for index, (faults, scale) in enumerate(zip(
                     self.activations, self.scales[first:]))]

        def hooks(program: Program, batch: Any) -> dict:
            merged: dict = {}
            for part in parts:
                for layer, fn in part(program, batch).items():
                    before = merged.get(layer)
                    merged[layer] = fn if before is None else (
                        lambda value, fn=fn, before=before: fn(before(value)))
            return merged

        faulty = with_site_hooks(model, hooks)
        faulty.__name__ = f"{getattr(model, 'name', 'model')}_with_faults"
        return faulty


def mix(*activations: ActivationFaults, weights: Any = None,
        scales: tuple | None = None) -> MixedFaults:
    """Weight and activation faults in one point, a fault model per layer.

    Each part gets the point's amount times its scale, so one sweep over
    amounts moves every part together::

        faults = mix(make_activation_faults("flip", sites="conv"),
                     make_activation_faults("zero", sites=["fc1"]),
                     weights=make_bit_flip(format="int8"),
                     scales=(1.0, 1.0, 0.1))   # weights, conv, fc1

    Args:
        *activations: activation faults (each with its own sites).
        weights: a parameter damage operator (``op(key, params, amount, *,
            info=None)``) applied to the weights first, or ``None``.
        scales: one factor per part, ``weights`` first; default all 1.

    Returns:
        The :class:`MixedFaults`; sweeps evaluate it like activation
        faults, with the damaged weights.

    Raises:
        ValueError: for no part, or scales of the wrong length.
        TypeError: for a part that is not activation faults.
    """
    if not activations and weights is None:
        raise ValueError("mix needs at least one part")
    for part in activations:
        if not isinstance(part, ActivationFaults):
            raise TypeError(f"mix: {part!r} is not activation faults "
                            "(make_activation_faults); pass parameter "
                            "damage as weights=")
    count = len(activations) + (weights is not None)
    scales = (1.0,) * count if scales is None else tuple(
        float(scale) for scale in scales)
    if len(scales) != count:
        raise ValueError(f"scales: one per part ({count}), got "
                         f"{len(scales)}")
    fraction = all(part.amount_is_fraction for part in activations) and (
        weights is None or getattr(weights, "amount_is_fraction", True))
    return MixedFaults(weights, tuple(activations), scales,
                       amount_is_fraction=fraction)


def sites_of(faults: ActivationFaults, model, sample: Any) -> list[Site]:
    """The sites ``faults`` hit in ``model`` for a batch like ``sample``."""
    return choose_sites(find_sites(model, sample), faults.sites)


__all__ = ["ActivationFaults", "MixedFaults", "Program", "RangeRestriction",
           "Site", "choose_sites", "find_sites", "make_activation_faults",
           "mix",
           "profile_ranges", "site_values", "sites_of", "trace_program",
           "with_site_hooks"]
