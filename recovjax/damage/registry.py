"""Names of damage operators, for configs and the CLI.

``get_damage("zero", scope="weights")`` builds the same operator as
``make_zero(scope="weights")``, called as ``op(key, params, ratio,
info=model.info)``. Each name carries a :class:`DamageSpec`:
what it damages (``kind``), whether its amount is a fraction (so configs
can validate ratios before anything runs) and its factory's options.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping

from recovjax.damage import (activations, attack, data, memory, params,
                             structure)
from recovjax.damage.activations import mix

Kind = Literal["params", "structure", "data", "activations"]
KINDS = ("params", "structure", "data", "activations")


FRACTIONS = ("ratio", "rate")
"""Amount names that are fractions in ``[0, 1]``; a ``scale`` is any
non-negative number, a ``position`` a bit position and ``flips`` a number
of flips."""

WHOLE_NUMBERS = ("position", "flips")
"""Amount names whose values are whole numbers."""


@dataclasses.dataclass(frozen=True)
class DamageSpec:
    """One registered damage operator.

    Attributes:
        name: registry name.
        kind: ``"params"`` (``op(key, params, amount, *, info=None)``),
            ``"structure"`` (same call, structural masks), ``"data"``
            (``op(key, images, labels, amount, *, num_classes)``) or
            ``"activations"`` (an
            :class:`~recovjax.damage.activations.ActivationFaults`:
            ``faults.apply(model, key, amount)`` is the faulty forward
            pass).
        factory: the ``make_*`` function that builds the operator.
        amount_is_fraction: whether the amount must lie in ``[0, 1]``
            (ratios, rates) rather than be any non-negative scale or a bit
            position.
        amount_name: what the amount is called (``ratio``, ``rate``,
            ``scale``, ``position``).
        doc: one-line description.
        preset: factory options the name fixes (e.g. ``stuck_at_1`` fixes
            ``value=1``); they cannot be overridden.
    """

    name: str
    kind: str
    factory: Callable[..., Callable]
    amount_is_fraction: bool
    amount_name: str
    doc: str
    preset: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))

    @property
    def options(self) -> tuple[str, ...]:
        """Names of the options :func:`get_damage` accepts for this name."""
        signature = inspect.signature(self.factory)
        return tuple(name for name in signature.parameters
                     if name not in self.preset)

    def build(self, **options: Any) -> Callable:
        """Build the operator; see :func:`get_damage`."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(
                f"damage {self.name!r} has no option "
                f"{', '.join(repr(u) for u in unknown)}; valid options: "
                f"{', '.join(self.options) or 'none'}")
        return self.factory(**self.preset, **options)


def _spec(name, kind, factory, amount_name, doc, **preset) -> DamageSpec:
    return DamageSpec(name=name, kind=kind, factory=factory,
                      amount_is_fraction=amount_name in FRACTIONS,
                      amount_name=amount_name, doc=doc,
                      preset=MappingProxyType(preset))


def make_replay_damage(path: str) -> Callable:
    """Replay a saved fault list (:mod:`recovjax.damage.replay`) as damage.

    Args:
        path: the fault list file (from ``sweep.fault_lists`` or
            :func:`~recovjax.damage.replay.save_faults`).

    Returns:
        ``op(key, params, amount, *, info=None) -> Damage``; the key and
        the amount are not used (give ``ratios: [1]``).

    Raises:
        ValueError: naming the file, when it is missing or not a fault
            list.
    """
    from recovjax.damage import replay as replay_lib
    try:
        faults = replay_lib.load_faults(path)
    except FileNotFoundError as error:
        raise ValueError(f"path: {error}") from None
    op = replay_lib.replay(faults)

    def replayed(key, params, amount, *, info=None):
        return op(key, params, amount, info=info)

    replayed.amount_name, replayed.amount_is_fraction = "ratio", True
    replayed.damage_kind, replayed.per_leaf_amounts = "params", False
    replayed.check_traced = False
    replayed._checked_version = lambda: replayed
    return replayed


def make_mixed_faults(activations: list[dict[str, Any]] | None = None,
                      weights: dict[str, Any] | None = None,
                      scales: list[float] | None = None) -> Callable:
    """Weight and activation faults in one point, from names
    (:func:`recovjax.damage.activations.mix`).

    Args:
        activations: ``[{"kind": "activation_bit_flip", "options": {...}},
            ...]``: activation faults, each with its own sites.
        weights: ``{"kind": "bit_flip", "options": {...}}``: a parameter
            damage applied to the weights in the same point, or ``None``.
        scales: one factor of the point's amount per part (``weights``
            first); default all 1.

    Raises:
        ValueError: for an entry without a kind, of the wrong kind, or an
            option its operator does not take (naming it).
    """
    def build(entry: Any, where: str, kind: str):
        if not isinstance(entry, Mapping) or "kind" not in entry or set(
                entry) - {"kind", "options"}:
            raise ValueError(f"{where}: give {{kind: <name>, options: "
                             f"{{...}}}}, got {entry!r}")
        spec = damage_spec(entry["kind"])
        if spec.kind != kind:
            raise ValueError(f"{where}: {entry['kind']!r} is {spec.kind} "
                             f"damage, not {kind}")
        try:
            return spec.build(**dict(entry.get("options") or {}))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None

    parts = [build(entry, f"activations[{index}]", "activations")
             for index, entry in enumerate(activations or [])]
    weight_op = None if weights is None else build(weights, "weights",
                                                   "params")
    return mix(*parts, weights=weight_op,
               scales=None if scales is None else tuple(scales))


_REGISTRY: dict[str, DamageSpec] = {spec.name: spec for spec in (
    _spec("zero", "params", params.make_zero, "ratio",
          "zero floor(n * ratio) entries per leaf (the seed's damage)"),
    _spec("random_uniform", "params", params.make_random_values, "ratio",
          "overwrite entries with U[min, max] of their leaf",
          distribution="uniform"),
    _spec("random_normal", "params", params.make_random_values, "ratio",
          "overwrite entries with N(mean, std) of their leaf",
          distribution="normal"),
    _spec("gaussian_noise", "params", params.make_gaussian_noise, "scale",
          "add Gaussian noise, scale relative to each leaf's std"),
    _spec("multiplicative_noise", "params",
          params.make_multiplicative_noise, "scale",
          "multiply entries by 1 + scale * N(0, 1)"),
    _spec("sign_flip", "params", params.make_sign_flip, "ratio",
          "negate floor(n * ratio) entries per leaf"),
    _spec("bit_flip", "params", params.make_bit_flip, "rate",
          "flip stored float bits at a bit error rate"),
    _spec("stuck_at_0", "params", params.make_stuck_at, "rate",
          "force a fraction of stored bits to 0", value=0),
    _spec("stuck_at_1", "params", params.make_stuck_at, "rate",
          "force a fraction of stored bits to 1", value=1),
    _spec("bit_position_flip", "params", params.make_bit_position_flip,
          "position", "flip bit <position> of the largest (or chosen) "
          "entries"),
    _spec("bit_search", "params", attack.make_bit_search_damage, "flips",
          "the progressive bit search (Bit-Flip Attack) on int8 codes; "
          "amount: flips"),
    _spec("replay", "params", make_replay_damage, "ratio",
          "replay a saved fault list (the amount is not used)"),
    _spec("rowhammer", "params", memory.make_rowhammer, "rate",
          "clustered bit flips in a fraction of the memory pages"),
    _spec("stuck_region", "params", memory.make_stuck_region, "ratio",
          "a contiguous stretch of memory stuck at 0 or 1"),
    _spec("lost_pages", "params", memory.make_lost_pages, "ratio",
          "a fraction of the memory pages reads back as zeros"),
    _spec("remove_neurons", "structure", structure.make_remove_neurons,
          "ratio", "remove dense units / conv output channels"),
    _spec("remove_connections", "structure",
          structure.make_remove_connections, "ratio",
          "remove individual kernel entries (unstructured)"),
    _spec("drop_blocks", "structure", structure.make_drop_blocks, "ratio",
          "turn residual blocks into the identity"),
    _spec("remove_heads", "structure", structure.make_remove_heads, "ratio",
          "remove attention heads"),
    _spec("activation_bit_flip", "activations",
          activations.make_activation_faults, "rate",
          "flip bits of layer outputs while the model runs",
          corruption="flip"),
    _spec("activation_stuck_at_0", "activations",
          activations.make_activation_faults, "rate",
          "force bits of layer outputs to 0", corruption="stuck_at_0"),
    _spec("activation_stuck_at_1", "activations",
          activations.make_activation_faults, "rate",
          "force bits of layer outputs to 1", corruption="stuck_at_1"),
    _spec("activation_zero", "activations",
          activations.make_activation_faults, "rate",
          "zero a fraction of layer outputs", corruption="zero"),
    _spec("activation_noise", "activations",
          activations.make_activation_faults, "scale",
          "add Gaussian noise to layer outputs", corruption="noise"),
    _spec("mixed_faults", "activations", make_mixed_faults, "rate",
          "weight and activation faults in one point, a model per layer"),
    _spec("drop_samples", "data", data.make_drop_samples, "ratio",
          "give weight 0 to a fraction of the training samples"),
    _spec("label_noise", "data", data.make_label_noise, "rate",
          "relabel a fraction of samples (symmetric or class mapping)"),
    _spec("input_noise", "data", data.make_input_noise, "scale",
          "add Gaussian noise to the input images"),
    _spec("remove_classes", "data", data.make_remove_classes, "ratio",
          "give weight 0 to every sample of a fraction of the classes"),
)}


BUILT_IN = tuple(_REGISTRY)
"""The damage operators recovjax ships."""


def register_damage(name: str, factory: Callable[..., Callable], *,
                    kind: Kind = "params", amount_name: str = "ratio",
                    amount_is_fraction: bool | None = None, doc: str = "",
                    overwrite: bool = False) -> DamageSpec:
    """Register a damage operator that configs and the CLI can name.

    Args:
        name: the name (letters, digits, ``_``).
        factory: ``factory(**options) -> op``: for ``kind`` ``"params"`` or
            ``"structure"`` an ``op(key, params, amount, *, info=None) ->
            Damage`` (``info`` may be left out of a signature that does
            not need it), for ``"data"`` an ``op(key, images, labels,
            amount, *, num_classes) -> DataDamage``. Its keyword arguments
            are the options configs may set.
        kind: ``"params"``, ``"structure"`` or ``"data"``.
        amount_name: what the amount is called in messages (``ratio``,
            ``rate``, ``scale``).
        amount_is_fraction: whether amounts must lie in ``[0, 1]``;
            default: every amount but a ``scale`` or a ``position``.
        doc: one line for listings.
        overwrite: replace an earlier registration (never a built-in).

    Returns:
        The :class:`DamageSpec`.

    Raises:
        ValueError: a malformed or taken name, or an unknown kind.
        TypeError: a factory that is not callable.
    """
    if not isinstance(name, str) or not name or not all(
            ch.isalnum() or ch == "_" for ch in name):
        raise ValueError(f"a damage name must be a non-empty string of "
                         f"letters, digits and '_', got {name!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got "
                         f"{kind!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got "
                        f"{type(factory).__name__}")
    if name in BUILT_IN or (name in _REGISTRY and not overwrite):
        raise ValueError(f"damage {name!r} is already registered" + (
            "" if name in BUILT_IN else "; pass overwrite=True to replace "
            "it"))
    fraction = (amount_name not in ("scale",) + WHOLE_NUMBERS
                if amount_is_fraction is None
                else bool(amount_is_fraction))
    spec = DamageSpec(name=name, kind=kind, factory=factory,
                      amount_is_fraction=fraction, amount_name=amount_name,
                      doc=doc or (factory.__doc__ or "").strip().split(
                          "\n")[0])
    _REGISTRY[name] = spec
    return spec


def damage_names(kind: Kind | None = None) -> tuple[str, ...]:
    """Registered names, optionally of one kind only.

    Raises:
        ValueError: for an unknown kind.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown damage kind {kind!r}; valid kinds: "
                         f"{', '.join(KINDS)}")
    return tuple(name for name, spec in _REGISTRY.items()
                 if kind is None or spec.kind == kind)


def damage_spec(name: str) -> DamageSpec:
    """The :class:`DamageSpec` registered under ``name``.

    Raises:
        ValueError: for an unknown name (the message lists valid names).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown damage {name!r}; valid names: "
                         f"{', '.join(damage_names())}")
    return _REGISTRY[name]


def accepts_info(op: Callable) -> bool:
    """Whether ``op`` takes the model's leaf metadata (``info=``).

    recovjax's operators do; a user's plain ``op(key, params, amount)``
    need not.
    """
    try:
        parameters = inspect.signature(op).parameters
    except (TypeError, ValueError):
        return False
    return "info" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def get_damage(name: str, *, check: bool = False, **options: Any
               ) -> Callable:
    """Build a registered damage operator.

    Args:
        name: one of :func:`damage_names`.
        check: the checked mode (:func:`~recovjax.damage.checked`): also
            check *traced* amounts, with :mod:`jax.experimental.checkify`.
            Unchecked, a traced fraction is clipped to ``[0, 1]`` (NaN
            reads as 0) and a traced scale is used as given.
        **options: the factory's options (e.g. ``scope="weights"``,
            ``mode="bernoulli"``, ``bits="exponent"``).

    Returns:
        The operator: ``op(key, params, amount, *, info=None) -> Damage``
        for the ``"params"`` and ``"structure"`` kinds (``info`` is the
        model's leaf metadata, ``model.info``, which role scopes such as
        ``"weights"`` need), ``op(key, images, labels, amount, *,
        num_classes) -> DataDamage`` for ``"data"``, and an
        :class:`~recovjax.damage.activations.ActivationFaults` for
        ``"activations"``.

    Raises:
        ValueError: for an unknown name (listing valid names) or an invalid
            option value.
        TypeError: for an option the operator does not have (naming it and
            listing valid options).

    Example:
        >>> op = get_damage("bit_flip", bits="exponent", mode="exact")
        >>> damage = op(jax.random.key(0), params, 1e-3)
    """
    if not isinstance(check, bool):
        raise TypeError(f"check: must be a bool, got {check!r}")
    spec = damage_spec(name)
    op = spec.build(**options)
    if check and spec.kind == "activations":
        raise ValueError(f"check: {name!r} corrupts activations, whose "
                         "amounts are checked on the host only")
    return params.checked(op) if check else op
