"""Parameter damage: zeroing, random values, noise, sign and bit faults.

Every operator here is built by a factory that settles the static choices
(scope, selection mode, ...) and returns a pure function::

    op(key, params, amount, *, info=None) -> Damage(params=..., mask=...)

``params`` is any pytree of arrays and ``amount`` (a ratio, a bit error
rate or a noise scale) may be traced, so one compiled program damages many
copies at once. ``info`` is the model's leaf metadata (``model.info``, a
tree of :class:`~recovjax.models.info.LeafInfo`), which role scopes such
as ``"weights"`` need; it is static, so under ``jit``/``vmap`` bind it
rather than pass it as an argument::

    op = functools.partial(make_zero(scope="weights"), info=model.info)
    damage = jax.jit(jax.vmap(op, in_axes=(0, None, 0)))(keys, model.params,
                                                        ratios)

``mask`` marks every damaged entry (``True``), with the structure of
``params``; leaves outside the scope are returned unchanged with an
all-``False`` mask. Inputs are never modified. The same key gives the same
output; the entries chosen for a given key are the same for every operator
that selects entries (zero, sign flip, random values), so damage types can
be compared entry for entry.

**Per-leaf amounts.** ``amount`` may also be a pytree prefix of
``params`` (as jaxpruner's sparsity distributions), with a number (or a
traced scalar) or ``None`` per leaf or subtree::

    op(key, params, {"Conv_0": 0.3, "Dense_0": {"kernel": 0.1,
                                                "bias": None}})
    op(key, params, {"Conv_0/kernel": 0.3, "Conv_0/bias": 0.0,
                     "Dense_0": None})           # flat, by leaf path

A number at a subtree applies to every leaf under it; paths are those of
:func:`~recovjax.damage.scope.leaf_paths`, and nested and flat (path-keyed)
forms may be mixed. Every leaf must get exactly one entry; an entry the
parameters do not have is a ``ValueError`` naming it and listing the valid
keys at that level. ``None`` leaves a leaf undamaged (unchanged, all-
``False`` mask) exactly as if it were outside the scope: its position is
static (part of the amount's tree structure) and the leaf drops out of the
selection, so the entries chosen elsewhere are those the operator chooses
with the leaf out of scope. A number, including ``0.0``, keeps the leaf in
the selection: a scalar amount gives exactly (bit for bit) what the full
tree of that scalar gives, and a tree that is ``0.0`` everywhere but one
leaf damages that leaf exactly as the scalar call does. The scope still
applies (a leaf outside it is untouched whatever its amount), and an
amount of 0 damages nothing (all-``False`` mask on that leaf; the noise
operators also leave such a leaf unchanged). The numbers may be traced, so
a stack of amount trees vmaps in one compiled program, as a sensitivity map
needs::

    one_hot = {"Conv_0": jnp.array([0.5, 0.0]),
               "Dense_0": jnp.array([0.0, 0.5])}
    damage = jax.jit(jax.vmap(op, in_axes=(0, None, 0)))(keys, params,
                                                        one_hot)

Per-leaf amounts need ``ratio_over="leaf"`` (the default) where an
operator has that choice; structural and data damage take one scalar.

Concrete amounts are validated before tracing (see
:func:`recovjax.damage.select.check_amount`), each entry of an amount tree
on its own (the message names its path). Traced amounts cannot be
checked on the host: unchecked, traced fractions are clipped to ``[0, 1]``
(NaN reads as 0, so ``1.5`` damages every entry and ``NaN`` none) and
traced noise scales are used as given; :func:`checked` (or
``get_damage(name, check=True)``) checks them, every entry of a tree, with
:mod:`jax.experimental.checkify` instead.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Protocol, \
    Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from recovjax import _checks
from recovjax._types import Array, Damage, Params, PRNGKey
from recovjax.damage import compose, corrupt, formats, select
from recovjax.damage.compose import Infos, LeafAmounts
from recovjax.damage.formats import BitLayout
from recovjax.damage.scope import ScopeLike, parse_scope, spread_prefix
from recovjax.models.info import LeafInfo, info_by_path


Amount = Any
"""What operators accept as ``amount``: a number or a traced scalar, or
(parameter damage) a pytree prefix of the parameters with a number, a traced
scalar or ``None`` per leaf or subtree (see the module docstring)."""


class DamageFn(Protocol):
    """``op(key, params, amount, *, info=None) -> Damage``."""

    def __call__(self, key: PRNGKey, params: Params, amount: Amount,
                 *, info: Any = None) -> Damage:
        ...


DamageCore = Callable[[PRNGKey, Params, "Array | LeafAmounts",
                       "Infos | None"], Damage]
"""``core(key, params, amount, infos) -> Damage``, what
:func:`make_operator` wraps; ``amount`` is a float32 scalar, or
:data:`LeafAmounts` for a core built with ``per_leaf=True``."""

Mode = Literal["exact", "bernoulli"]
RatioOver = Literal["leaf", "global"]
Target = Literal["random", "largest", "smallest", "wanda", "taylor"]
Bits = Union[Literal["any", "sign", "exponent", "mantissa"], int]
"""A bit class or one bit position (0 = least significant)."""

MODES = ("exact", "bernoulli")
RATIO_OVER = ("leaf", "global")
TARGETS = ("random", "largest", "smallest")
BIT_CLASSES = ("any", "sign", "exponent", "mantissa")


def check_choice(name: str, value, allowed: Sequence) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is allowed."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of "
                         f"{', '.join(repr(a) for a in allowed)}; got "
                         f"{value!r}")


def make_operator(core: DamageCore, *, name: str, amount_name: str,
                  fraction: bool, doc: str, check: bool = False,
                  per_leaf: bool | str = False,
                  integer: bool = False) -> DamageFn:
    """Wrap a traceable core as a validated, compiled operator.

    The returned ``op(key, params, amount, *, info=None)`` checks the key
    and a concrete amount (before any tracing) and converts the amount to a
    float32 scalar, so that every value reuses one compiled program. It
    resolves ``info`` (the model's tree of
    :class:`~recovjax.models.info.LeafInfo`, laid out like ``params``, or
    ``None``) on the host into ``infos = {path: LeafInfo}`` (paths as
    :func:`~recovjax.damage.scope.leaf_paths` writes them) and calls
    ``core(key, params, amount, infos)`` under ``jax.jit`` with ``infos``
    static: one program per (parameter structure, leaf metadata), whatever
    the key and amount. Under an outer ``jit``/``vmap`` the inner ``jit`` is
    inlined; bind ``info`` there (``functools.partial(op, info=...)``), as
    it is not an array.

    With ``per_leaf=True`` the amount may also be a pytree prefix of
    ``params`` (see the module docstring): it is spread over the leaves on
    the host (:func:`~recovjax.damage.scope.spread_prefix`), each entry is
    checked like a scalar (the message names its path), and the core gets
    :data:`LeafAmounts`: a tuple with one float32 scalar per leaf, or
    ``None`` where the leaf is not damaged. The positions of ``None`` are
    part of the program's structure; the numbers are arguments, so new
    values (and a vmapped stack of trees) reuse one program. A scalar
    amount still reaches the core as a scalar; the core must treat it as
    the full tree of that scalar (:func:`_flatten` does).

    A traced amount cannot be checked on the host. Unchecked
    (``check=False``), a traced fraction is clipped to ``[0, 1]`` and NaN
    reads as 0, so ``1.5`` damages every entry and ``NaN`` none; a traced
    scale is used as given. With ``check=True`` (see :func:`checked`) a
    traced amount (every traced entry of a tree) is checked by
    :func:`jax.experimental.checkify.check`.

    Args:
        core: ``core(key, params, amount, infos) -> Damage``, traceable in
            ``key``, ``params`` and ``amount``; ``infos`` is a fresh
            ``dict[str, LeafInfo]`` (one entry per leaf of ``params``) or
            ``None`` when the operator got no ``info``, and is static (the
            core may branch on it in Python; resolve a scope with
            ``scope.select(params, infos)``).
        name: the operator's ``__name__``.
        amount_name: the amount's name in error messages (``"ratio"``).
        fraction: whether the amount must lie in ``[0, 1]``.
        doc: the operator's docstring.
        check: the checked mode for traced amounts.
        per_leaf: ``True`` if the core takes :data:`LeafAmounts`; ``False``
            (one scalar only, as structural damage) or a string, which is
            then the message (after ``"<amount_name>: "``) when a tree is
            passed.
        integer: whether a concrete amount must be a whole number (a bit
            position).

    Returns:
        ``op(key, params, amount, *, info=None) -> Damage``, with attributes
        ``amount_name``, ``amount_is_fraction``, ``damage_kind``
        (``"params"``, for structural damage too), ``check_traced``
        (whether traced amounts are checked) and ``per_leaf_amounts``
        (whether amount trees are accepted). It raises
        :class:`~recovjax.models.info.InfoError` if ``info`` does not have
        the structure of ``params``, and ``ValueError`` for an amount tree
        the operator does not take or that does not match ``params``.
    """

    def run_core(key: PRNGKey, params: Params, amount: Array | LeafAmounts,
                 info_items: tuple[tuple[str, LeafInfo], ...] | None
                 ) -> Damage:
        infos = None if info_items is None else dict(info_items)
        return core(key, params, amount, infos)

    # The metadata travels as a tuple of (path, LeafInfo): hashable, so it
    # can be a static argument, and equal for equal metadata (no retrace).
    compiled = jax.jit(run_core, static_argnums=3)

    def check_one(amount: Any, label: str) -> Array:
        traced = _checks.is_traced(amount)
        amount = select.check_amount(amount, name=label, fraction=fraction)
        if integer and not traced and float(amount) != int(amount):
            raise ValueError(f"{label} must be a whole number (a bit "
                             f"position), got {float(amount)}")
        if check and traced:
            _checks.check_traced_amount(amount, name=label,
                                        fraction=fraction)
        return amount

    def operator(key: PRNGKey, params: Params, amount: Amount, *,
                 info: Any = None) -> Damage:
        select.check_key(key)
        if select.is_amount_tree(amount):
            if per_leaf is not True:
                reason = per_leaf or (f"per-leaf amounts apply to parameter "
                                      f"damage; {name} takes one scalar "
                                      f"{amount_name}")
                raise ValueError(f"{amount_name}: {reason} (got a "
                                 f"{type(amount).__name__})")
            amount = _leaf_amounts(amount, params, amount_name, check_one)
        else:
            amount = check_one(amount, amount_name)
        info_items = (None if info is None else
                      tuple(info_by_path(params, info).items()))
        return compiled(key, params, amount, info_items)

    operator.__name__ = operator.__qualname__ = name
    operator.__doc__ = doc
    _describe(operator, amount_name, fraction, "params", check,
              lambda: make_operator(core, name=name, amount_name=amount_name,
                                    fraction=fraction, doc=doc, check=True,
                                    per_leaf=per_leaf, integer=integer),
              per_leaf=per_leaf is True)
    return operator


def _leaf_amounts(amount: Any, params: Params, amount_name: str,
                  check_one: Callable[[Any, str], Array]) -> LeafAmounts:
    # Spread the prefix over the leaves; check each entry once, by its path.
    spread = spread_prefix(amount, params, name=amount_name)
    checked_entries: dict[str, Array | None] = {}
    for entry, value in spread:
        if entry not in checked_entries:
            checked_entries[entry] = (None if value is None else check_one(
                value, f"{amount_name} at {entry!r}"))
    return tuple(checked_entries[entry] for entry, _ in spread)


def _describe(operator: Callable, amount_name: str, fraction: bool,
              kind: str, check: bool, rebuild: Callable[[], Callable],
              per_leaf: bool = False) -> None:
    # What the sweep and checked() need to know about a built operator.
    operator.amount_name = amount_name
    operator.amount_is_fraction = fraction
    operator.damage_kind = kind
    operator.check_traced = check
    operator.per_leaf_amounts = per_leaf
    operator._checked_version = rebuild


def checked(op: Callable) -> Callable:
    """The checked mode of a damage operator: traced amounts are checked too.

    Concrete amounts are always checked on the host. A *traced* amount
    (inside ``jit``/``vmap``) is not: the unchecked operator clips a traced
    fraction to ``[0, 1]`` and reads NaN as 0 (``1.5`` damages every
    entry, ``NaN`` none) and uses a traced noise scale as given. The
    checked operator stages a :func:`jax.experimental.checkify.check`
    instead (one per traced entry of a per-leaf amount tree, whose message
    names the entry's path), so functionalise the traced call with
    :func:`jax.experimental.checkify.checkify` and throw its error::

        from jax.experimental import checkify
        op = checked(make_zero())          # or get_damage("zero", check=True)
        error, damage = checkify.checkify(jax.jit(op))(key, params, 1.5)
        error.throw()  # ValueError: ratio: must be a fraction in [0, 1] ...

    Args:
        op: an operator built by this package (``make_*`` or
            :func:`~recovjax.damage.get_damage`), of parameter, structure or
            data damage.

    Returns:
        The same operator in checked mode (``op.check_traced`` is true;
        ``op.unchecked`` is the operator given). Called under ``jit``
        without ``checkify``, JAX refuses to stage the check.

    Raises:
        TypeError: if ``op`` was not built by :mod:`recovjax.damage`.
    """
    rebuild = getattr(op, "_checked_version", None)
    if rebuild is None:
        raise TypeError(f"op: checked() needs an operator built by "
                        f"recovjax.damage (a make_* factory or get_damage), "
                        f"got {op!r}")
    if op.check_traced:
        return op
    checked_op = rebuild()
    # The sweep checks every amount on the host and runs the unchecked op.
    checked_op.unchecked = op
    return checked_op


def operator_doc(factory: Callable, settings: dict, call: str) -> str:
    """Docstring of a built operator: what it does, how it was built."""
    summary = (factory.__doc__ or "").strip().splitlines()[0]
    options = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    return (f"{summary}\n\nBuilt by ``{factory.__name__}({options})``; "
            f"call as ``{call}``. See :func:`{factory.__module__}."
            f"{factory.__name__}` for the semantics.")


# --------------------------------------------------------------------------
# Selection.
# --------------------------------------------------------------------------


def _per_leaf(ratio_over: str) -> bool | str:
    # Per-leaf amounts need one count per leaf.
    return True if ratio_over == "leaf" else compose.GLOBAL_NEEDS_SCALAR


def _check_selection(mode: str, ratio_over: str, target: str,
                     targets: Sequence[str] = TARGETS) -> None:
    check_choice("mode", mode, MODES)
    check_choice("ratio_over", ratio_over, RATIO_OVER)
    check_choice("target", target, targets)
    if target != "random" and mode != "exact":
        raise ValueError(f"target={target!r} chooses a fixed number of "
                         f"entries and needs mode='exact', got mode={mode!r}")


# --------------------------------------------------------------------------
# Zero, sign flip, random values.
# --------------------------------------------------------------------------


PRUNING_TARGETS = TARGETS + ("wanda", "taylor")
"""Targets of :func:`make_zero`: the magnitude ones and the data-aware
importance scores of :mod:`recovjax.damage.importance`."""
CALIBRATION_EXAMPLES = 256
"""Calibration examples an importance target is bound to by default."""


def make_zero(scope: ScopeLike = "all", *, mode: Mode = "exact",
              ratio_over: RatioOver = "leaf", target: Target = "random",
              scores: Params | None = None,
              calibration: int = CALIBRATION_EXAMPLES) -> DamageFn:
    """Build an operator that zeroes a fraction of the parameters.

    With the defaults this is the seed's damage: in every leaf, exactly
    ``floor(n * ratio)`` entries chosen uniformly without replacement are
    set to zero.

    Args:
        scope: leaves to damage: ``"all"``, a role keyword
            (``"weights"``, ``"biases"``, ...; needs ``info`` when called),
            a regex on the leaf path, a predicate ``(path, leaf, info) ->
            bool`` or a label tree of bools (see
            :mod:`recovjax.damage.scope`).
        mode: ``"exact"`` (exact count) or ``"bernoulli"`` (each entry
            independently with probability ``ratio``: independent faults).
        ratio_over: ``"leaf"`` (each leaf loses its own fraction) or
            ``"global"`` (one exact count over all selected entries; one
            scalar ratio only).
        target: ``"random"``, ``"largest"`` (largest magnitudes first: an
            attack), ``"smallest"`` (magnitude pruning), or the smallest
            data-aware importance (:mod:`recovjax.damage.importance`):
            ``"wanda"`` (``|W| * ||X||``) or ``"taylor"`` (``(W *
            dL/dW)^2``); those return an operator to bind to calibration
            data first, ``op.bind(model, images, labels)``.
        scores: a tree like the parameters ranking the entries for
            ``"largest"`` / ``"smallest"`` instead of their magnitudes
            (what a bound importance target passes).
        calibration: the calibration examples an importance target uses
            (the first ones it is bound to).

    Returns:
        ``op(key, params, ratio, *, info=None) -> Damage``, where
        ``info`` is the model's leaf metadata (``model.info``) and
        ``ratio`` one fraction for every leaf or, with
        ``ratio_over="leaf"``, a per-leaf prefix tree of fractions and
        ``None`` (see the module docstring). The mask marks the chosen
        entries; it equals the set of changed entries except where an
        entry was already zero.

    Raises:
        ValueError: for an unknown choice or an invalid scope regex (now),
            and, when called, for a concrete ``ratio`` outside ``[0, 1]``
            or non-finite (naming the entry of a ratio tree), a ratio tree
            that does not match the parameters or comes with
            ``ratio_over="global"``, or a scope that matches no leaf.
        InfoError: when called with a role scope and no ``info``, or with
            a leaf whose role is not known (naming it).

    Example:
        >>> op = make_zero(scope="weights")
        >>> damage = op(jax.random.key(0), model.params, 0.3,
        ...             info=model.info)
        >>> # Only the first convolution, a quarter of each of its leaves:
        >>> damage = op(jax.random.key(0), model.params,
        ...             {"Conv_0": 0.25, "Conv_1": None, "Dense_0": None},
        ...             info=model.info)
    """
    resolved = parse_scope(scope)
    _check_selection(mode, ratio_over, target, PRUNING_TARGETS)
    if target in ("wanda", "taylor"):
        return ImportanceDamage(target, calibration, lambda scores: make_zero(
            scope, mode=mode, ratio_over=ratio_over, target="smallest",
            scores=scores))

    zero = compose.parameter_core(
        compose.fraction_of_entries(mode, ratio_over, target),
        corrupt.zero(), resolved, scores=scores)
    return make_operator(zero, name="zero", amount_name="ratio",
                         fraction=True, per_leaf=_per_leaf(ratio_over),
                         doc=operator_doc(
                             make_zero, dict(scope=scope, mode=mode,
                                             ratio_over=ratio_over,
                                             target=target),
                             "op(key, params, ratio, *, info=None) -> Damage"))


class ImportanceDamage:
    """A pruning operator ranked by importance scores, once bound to data.

    Built by ``make_zero(target="wanda")`` (or ``"taylor"``). :meth:`bind`
    computes the scores of the clean parameters on the first
    ``calibration`` examples it is given
    (:func:`~recovjax.damage.importance.importance_scores`) and returns the
    operator that zeroes the entries of smallest score, ``op(key, params,
    ratio, *, info=None) -> Damage``. An experiment binds it to its first
    training examples and its pretrained parameters.
    """

    amount_name = "ratio"
    amount_is_fraction = True
    damage_kind = "params"
    per_leaf_amounts = True
    check_traced = False

    def __init__(self, importance: str, calibration: int,
                 build: Callable[[Params], Callable]):
        if isinstance(calibration, bool) or not isinstance(
                calibration, (int, np.integer)) or calibration < 1:
            raise ValueError(f"calibration must be a positive int, got "
                             f"{calibration!r}")
        self.importance = importance
        self.attack_examples = int(calibration)
        self._build = build

    def __call__(self, key: PRNGKey, params: Params, amount, *,
                 info=None) -> Damage:
        raise TypeError(f"target={self.importance!r} ranks weights by "
                        "scores from data: op.bind(model, images, labels) "
                        "first")

    def unscored(self) -> Callable:
        """The operator ranking by magnitude: the same shapes and program
        structure, for checks before any data is read."""
        return self._build(None)

    def bind(self, model, images: Array, labels: Array | None = None,
             params: Params | None = None) -> Callable:
        """The operator ranking by scores of ``params`` (default:
        ``model.params``) on the first ``calibration`` of ``images``.

        Raises:
            ValueError: for fewer examples than ``calibration``.
        """
        from recovjax.damage.importance import importance_scores
        count = int(jnp.shape(images)[0])
        if count < self.attack_examples:
            raise ValueError(f"calibration: {self.attack_examples} examples "
                             f"asked for, {count} given")
        size = self.attack_examples
        scores = importance_scores(
            self.importance, model,
            model.params if params is None else params,
            jnp.asarray(images)[:size],
            None if labels is None else jnp.asarray(labels)[:size])
        return self._build(jax.device_get(scores))


def make_sign_flip(scope: ScopeLike = "all", *, mode: Mode = "exact",
                   ratio_over: RatioOver = "leaf", target: Target = "random"
                   ) -> DamageFn:
    """Build an operator that negates a fraction of the parameters.

    Args:
        scope: leaves to damage (see :func:`make_zero`).
        mode: ``"exact"`` or ``"bernoulli"``.
        ratio_over: ``"leaf"`` or ``"global"``.
        target: ``"random"``, ``"largest"`` or ``"smallest"``.

    Returns:
        ``op(key, params, ratio, *, info=None) -> Damage``, ``ratio`` a
        fraction or a per-leaf tree as for :func:`make_zero`; the mask
        marks the negated entries (an entry equal to 0 changes only its
        sign bit).

    Raises:
        ValueError: as :func:`make_zero`.
        TypeError: when called on a non-floating leaf in scope.
    """
    resolved = parse_scope(scope)
    _check_selection(mode, ratio_over, target)

    flip_sign = compose.parameter_core(
        compose.fraction_of_entries(mode, ratio_over, target),
        corrupt.negate(), resolved)
    return make_operator(flip_sign, name="flip_sign", amount_name="ratio",
                         fraction=True, per_leaf=_per_leaf(ratio_over),
                         doc=operator_doc(
                             make_sign_flip, dict(scope=scope, mode=mode,
                                                  ratio_over=ratio_over,
                                                  target=target),
                             "op(key, params, ratio, *, info=None) -> Damage"))


def make_random_values(distribution: Literal["uniform", "normal"] = "uniform",
                       scope: ScopeLike = "all", *, mode: Mode = "exact",
                       ratio_over: RatioOver = "leaf",
                       target: Target = "random") -> DamageFn:
    """Build an operator that overwrites a fraction of entries with noise.

    Replacement values follow each leaf's own statistics, computed on the
    undamaged leaf: uniform on ``[min, max]`` or normal with the leaf's mean
    and standard deviation. A leaf of one entry gets its own value back
    under ``"uniform"`` and its mean under ``"normal"``.

    Args:
        distribution: ``"uniform"`` or ``"normal"``.
        scope: leaves to damage (see :func:`make_zero`).
        mode: ``"exact"`` or ``"bernoulli"``.
        ratio_over: ``"leaf"`` or ``"global"``.
        target: ``"random"``, ``"largest"`` or ``"smallest"``.

    Returns:
        ``op(key, params, ratio, *, info=None) -> Damage``, ``ratio`` a
        fraction or a per-leaf tree as for :func:`make_zero`; the mask
        marks the overwritten entries. The entries chosen for a key are
        those :func:`make_zero` chooses for the same key and ratio.

    Raises:
        ValueError: as :func:`make_zero`, or for an unknown distribution.
        TypeError: when called on a non-floating leaf in scope.
    """
    check_choice("distribution", distribution, ("uniform", "normal"))
    resolved = parse_scope(scope)
    _check_selection(mode, ratio_over, target)

    randomize = compose.parameter_core(
        compose.fraction_of_entries(mode, ratio_over, target),
        corrupt.random_values(distribution), resolved)
    return make_operator(randomize, name=f"randomize_{distribution}",
                         amount_name="ratio", fraction=True,
                         per_leaf=_per_leaf(ratio_over), doc=operator_doc(
                             make_random_values,
                             dict(distribution=distribution, scope=scope,
                                  mode=mode, ratio_over=ratio_over,
                                  target=target),
                             "op(key, params, ratio, *, info=None) -> Damage"))


# --------------------------------------------------------------------------
# Noise.
# --------------------------------------------------------------------------


def make_gaussian_noise(scope: ScopeLike = "all", *, relative: bool = True
                        ) -> DamageFn:
    """Build an operator that adds Gaussian noise to every entry in scope.

    ``x + scale * s * z`` with ``z ~ N(0, 1)`` per entry, where ``s`` is the
    leaf's standard deviation (``relative=True``: the scale is relative to
    each leaf's spread, so one scale means the same for a kernel and a
    bias) or 1 (``relative=False``: absolute noise). A leaf whose entries
    are all equal has ``s = 0`` and gets no relative noise.

    Args:
        scope: leaves to perturb (see :func:`make_zero`).
        relative: scale noise by each leaf's standard deviation.

    Returns:
        ``op(key, params, scale, *, info=None) -> Damage``, ``scale`` one
        scale for every leaf or a per-leaf prefix tree of scales and
        ``None`` (see the module docstring). The mask marks every entry of
        each leaf in scope whose scale is not 0 (all of them are
        perturbed); a leaf of scale 0 is returned unchanged with an
        all-``False`` mask.

    Raises:
        ValueError: for an invalid scope now; when called, for a concrete
            ``scale`` that is negative or not finite (naming the entry of
            a scale tree), a scale tree that does not match the
            parameters, or a scope matching no leaf.
        TypeError: when called on a non-floating leaf in scope.
    """
    resolved = parse_scope(scope)
    if not isinstance(relative, bool):
        raise TypeError(f"relative must be a bool, got {relative!r}")

    add_noise = compose.parameter_core(
        compose.every_entry(), corrupt.gaussian_noise(relative), resolved)
    return make_operator(add_noise, name="add_gaussian_noise",
                         amount_name="scale", fraction=False, per_leaf=True,
                         doc=operator_doc(
                             make_gaussian_noise,
                             dict(scope=scope, relative=relative),
                             "op(key, params, scale, *, info=None) -> Damage"))


def make_multiplicative_noise(scope: ScopeLike = "all") -> DamageFn:
    """Build an operator that multiplies every entry by ``1 + scale * z``.

    ``z ~ N(0, 1)`` per entry: relative noise proportional to each weight
    (device variation in analog hardware, for instance). Zero entries stay
    zero.

    Args:
        scope: leaves to perturb (see :func:`make_zero`).

    Returns:
        ``op(key, params, scale, *, info=None) -> Damage``, ``scale`` a
        scale or a per-leaf tree as for :func:`make_gaussian_noise`; the
        mask marks every entry of each leaf in scope whose scale is not 0
        (a leaf of scale 0 is unchanged, with an all-``False`` mask).

    Raises:
        ValueError: as :func:`make_gaussian_noise`.
        TypeError: when called on a non-floating leaf in scope.
    """
    resolved = parse_scope(scope)

    multiply_noise = compose.parameter_core(
        compose.every_entry(), corrupt.multiplicative_noise(), resolved)
    return make_operator(multiply_noise, name="add_multiplicative_noise",
                         amount_name="scale", fraction=False, per_leaf=True,
                         doc=operator_doc(
                             make_multiplicative_noise, dict(scope=scope),
                             "op(key, params, scale, *, info=None) -> Damage"))


# --------------------------------------------------------------------------
# Bit faults.
# --------------------------------------------------------------------------


def bit_layout(dtype) -> BitLayout:
    """The :class:`~recovjax.damage.formats.BitLayout` of float32, bfloat16
    or float16 (a leaf's own storage).

    Raises:
        TypeError: for any other dtype.
    """
    return formats.format_of_dtype(dtype).layout


def bit_positions(dtype, bits) -> tuple[int, ...]:
    """Positions (0 = least significant) a ``bits`` choice covers in dtype.

    Args:
        dtype: float32, bfloat16 or float16.
        bits: ``"any"``, ``"sign"``, ``"exponent"``, ``"mantissa"`` or one
            bit position.

    Returns:
        The positions, ascending.

    Raises:
        TypeError: for an unsupported dtype.
        ValueError: for a position outside the dtype's width.
    """
    return formats.bit_positions(formats.format_of_dtype(dtype), bits)


def _check_bits(bits) -> None:
    if isinstance(bits, str):
        check_choice("bits", bits, BIT_CLASSES)
    elif isinstance(bits, (bool, np.bool_)) or not isinstance(
            bits, (int, np.integer)):
        raise TypeError(f"bits must be one of {', '.join(BIT_CLASSES)} or an "
                        f"int bit position, got {bits!r}")
    elif bits < 0:
        raise ValueError(f"bits must be a non-negative bit position, got "
                         f"{bits}")


def _make_bit_fault(fault: str, bits, scope: ScopeLike, mode: str,
                    ratio_over: str, deployed: str | None, granularity: str,
                    *, name: str, doc: str) -> DamageFn:
    _check_bits(bits)
    resolved = parse_scope(scope)
    check_choice("mode", mode, MODES)
    check_choice("ratio_over", ratio_over, RATIO_OVER)
    fmt = None if deployed is None else formats.get_format(deployed,
                                                           granularity)
    if fmt is None and granularity != "tensor":
        raise ValueError(f"granularity={granularity!r} needs a scaled "
                         "format (format='int8', ...)")
    if fmt is not None:
        formats.bit_positions(fmt, bits)  # a field the format has not

    fault_bits = compose.parameter_core(
        compose.fraction_of_entries(mode, ratio_over, "random"),
        corrupt.bit_fault(fault, bits, fmt), resolved)
    return make_operator(fault_bits, name=name, amount_name="rate",
                         fraction=True, per_leaf=_per_leaf(ratio_over),
                         doc=doc)


def make_bit_flip(bits: Bits = "any", scope: ScopeLike = "all", *,
                  mode: Mode = "bernoulli", ratio_over: RatioOver = "leaf",
                  format: str | None = None, granularity: str = "tensor"
                  ) -> DamageFn:
    """Build an operator that flips bits of the stored values.

    The amount is the bit error rate over the eligible bits: with
    ``mode="bernoulli"`` every eligible bit flips independently with that
    probability (the usual soft-error model); with ``mode="exact"`` exactly
    ``floor(n_bits * rate)`` eligible bits flip, chosen uniformly, where
    ``n_bits`` is the leaf's entries times eligible bits per entry (or the
    total over all leaves in scope with ``ratio_over="global"``). Bits are
    manipulated through :func:`jax.lax.bitcast_convert_type`; NaN and inf
    weights that flips produce are legitimate results, not errors.

    **Deployed formats.** By default the bits are those of each leaf's own
    dtype. With ``format`` (one of
    :data:`~recovjax.damage.formats.FORMATS`: ``"bfloat16"``,
    ``"float16"``, ``"float8_e4m3"``, ``"float8_e5m2"``, ``"int8"``,
    ``"int4"``, ...) every leaf in scope is first stored in that format
    (:func:`~recovjax.damage.formats.encode`: int8, int4 and float8 are
    symmetric quantization by qwix, with a scale per tensor or per output
    channel), the faults hit the stored codes, and the leaf comes back
    decoded to its own dtype: the model runs with the dequantized, damaged
    weights, and entries no fault hit carry the format's rounding, as
    :func:`~recovjax.damage.formats.deploy` gives them (the clean deployed
    model, which a rate of 0 reproduces). Bit positions are those of the
    format's code (``format="int8"``: 7 is the sign bit of the two's-
    complement code; ``"float8_e4m3"``: 3..6 are the exponent).

    Args:
        bits: which bits are eligible: ``"any"``, ``"sign"``,
            ``"exponent"``, ``"mantissa"`` (float formats) or one position
            (0 = least significant bit of the stored pattern; e.g. 30 is
            the top exponent bit of float32, 14 that of bfloat16).
        scope: leaves to damage (see :func:`make_zero`); they must be
            float32, bfloat16 or float16 (any floating dtype with
            ``format``).
        mode: ``"bernoulli"`` or ``"exact"``.
        ratio_over: ``"leaf"`` or ``"global"`` (exact mode; one scalar
            rate only).
        format: the deployed format whose codes the faults hit (``None``:
            each leaf's own dtype).
        granularity: ``"tensor"`` or ``"channel"``: one scale per leaf or
            per entry of its last axis (scaled formats only).

    Returns:
        ``op(key, params, rate, *, info=None) -> Damage``, ``rate`` one
        bit error rate or, with ``ratio_over="leaf"``, a per-leaf prefix
        tree of rates and ``None`` (see the module docstring); the mask
        marks entries with at least one flipped bit (exactly the entries
        whose stored bits changed).

    Raises:
        ValueError: for an unknown choice or a negative position now; when
            called, for a concrete rate outside ``[0, 1]`` (naming the
            entry of a rate tree), a rate tree that does not match the
            parameters or comes with ``ratio_over="global"``, or a
            position beyond a leaf's width (naming the leaf); now, for an
            unknown format or granularity, or a field (``"exponent"``) the
            format has not.
        TypeError: when called on a leaf of another dtype (naming it).
    """
    return _make_bit_fault("flip", bits, scope, mode, ratio_over, format,
                           granularity, name="flip_bits", doc=operator_doc(
                               make_bit_flip,
                               dict(bits=bits, scope=scope, mode=mode,
                                    ratio_over=ratio_over, format=format,
                                    granularity=granularity),
                               "op(key, params, rate, *, info=None) -> "
                               "Damage"))


def make_stuck_at(value: Literal[0, 1], bits: Bits = "any",
                  scope: ScopeLike = "all", *, mode: Mode = "bernoulli",
                  ratio_over: RatioOver = "leaf", format: str | None = None,
                  granularity: str = "tensor") -> DamageFn:
    """Build an operator that forces a fraction of stored bits to 0 or 1.

    Faulty memory cells are chosen exactly as :func:`make_bit_flip` chooses
    flipped bits (the amount is the fraction of faulty eligible bits); a
    faulty bit then reads ``value`` whatever was stored.

    Args:
        value: 0 (stuck-at-0) or 1 (stuck-at-1).
        bits: eligible bits, as in :func:`make_bit_flip`.
        scope: leaves to damage.
        mode: ``"bernoulli"`` or ``"exact"``.
        ratio_over: ``"leaf"`` or ``"global"`` (exact mode).
        format: the deployed format whose codes the faults hit, as for
            :func:`make_bit_flip`.
        granularity: ``"tensor"`` or ``"channel"`` (scaled formats).

    Returns:
        ``op(key, params, rate, *, info=None) -> Damage``, ``rate`` a rate
        or a per-leaf tree as for :func:`make_bit_flip`. The mask marks
        entries that hold at least one faulty bit, *whether or not* the
        stored value changed (a stuck-at-1 bit that was already 1 changes
        nothing but is still a faulty cell): the changed entries are a
        subset of the mask, as for :func:`make_zero` on entries that were
        already zero.

    Raises:
        ValueError: as :func:`make_bit_flip`, or for a value other than 0
            or 1.
        TypeError: as :func:`make_bit_flip`.
    """
    if isinstance(value, bool) or value not in (0, 1):
        raise ValueError(f"value must be 0 or 1, got {value!r}")
    return _make_bit_fault(f"stuck_at_{value}", bits, scope, mode,
                           ratio_over, format, granularity,
                           name=f"stick_bits_at_{value}",
                           doc=operator_doc(
                               make_stuck_at,
                               dict(value=value, bits=bits, scope=scope,
                                    mode=mode, ratio_over=ratio_over,
                                    format=format, granularity=granularity),
                               "op(key, params, rate, *, info=None) -> "
                               "Damage"))


def make_bit_position_flip(count: int = 1, target: Target = "largest",
                           scope: ScopeLike = "all", *,
                           format: str | None = None,
                           granularity: str = "tensor") -> DamageFn:
    """Build an operator that flips one given bit of a few chosen entries.

    The amount is the **bit position** (0 = least significant bit of the
    stored code), so a sweep over positions (``ratios: [0, 1, ..., 31]``)
    draws the curve of a single bit's effect in one compiled program: on a
    float32 model, the top exponent bit (30) of the largest weight turns it
    into about ``1e38``; a low mantissa bit changes it by one unit in the
    last place. ``count`` entries over every leaf in scope together are
    hit: the largest magnitudes (``target="largest"``, ties to the first
    leaf and the lowest index), the smallest, or uniformly at random for
    the key (``"random"``). A position at or beyond the stored width flips
    nothing (the mask still marks the chosen entries).

    Args:
        count: how many entries get the flip (static, at least 1).
        target: ``"largest"``, ``"smallest"`` or ``"random"``.
        scope: leaves to damage (see :func:`make_zero`).
        format: the deployed format whose codes the flip hits, as for
            :func:`make_bit_flip` (``None``: each leaf's own dtype).
        granularity: ``"tensor"`` or ``"channel"`` (scaled formats).

    Returns:
        ``op(key, params, position, *, info=None) -> Damage``; ``position``
        may be traced (a float or integer scalar; a traced one is truncated
        to an integer). The mask marks the chosen entries: those whose bit
        flipped, for a position within the stored width.

    Raises:
        ValueError: for a bad choice now; when called, for a concrete
            position that is negative or not an integer.
        TypeError: when called on a leaf with no bit layout (naming it).
    """
    check_choice("target", target, TARGETS)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) \
            or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    resolved = parse_scope(scope)
    fmt = None if format is None else formats.get_format(format,
                                                         granularity)
    if fmt is None and granularity != "tensor":
        raise ValueError(f"granularity={granularity!r} needs a scaled "
                         "format (format='int8', ...)")
    core = compose.parameter_core(compose.fixed_count(int(count), target),
                                  corrupt.flip_bit_at(fmt), resolved)
    return make_operator(core, name="flip_bit_at", amount_name="position",
                         fraction=False, integer=True,
                         per_leaf="a bit position applies to every leaf in "
                                  "scope",
                         doc=operator_doc(
                             make_bit_position_flip,
                             dict(count=count, target=target, scope=scope,
                                  format=format, granularity=granularity),
                             "op(key, params, position, *, info=None) -> "
                             "Damage"))


# --------------------------------------------------------------------------
# Ready-made operators.
# --------------------------------------------------------------------------

zero_parameters = make_zero()
"""The seed's damage: zero exactly ``floor(n * ratio)`` entries per leaf."""

zero_largest = make_zero(target="largest")
"""Zero the largest-magnitude ``floor(n * ratio)`` entries of each leaf."""

flip_signs = make_sign_flip()
"""Negate exactly ``floor(n * ratio)`` entries per leaf."""

randomize_uniform = make_random_values("uniform")
"""Overwrite ``floor(n * ratio)`` entries per leaf with U[min, max]."""

randomize_normal = make_random_values("normal")
"""Overwrite ``floor(n * ratio)`` entries per leaf with N(mean, std)."""

add_gaussian_noise = make_gaussian_noise()
"""Add ``N(0, (scale * std)^2)`` noise to every entry."""

add_multiplicative_noise = make_multiplicative_noise()
"""Multiply every entry by ``1 + scale * N(0, 1)``."""

flip_bits = make_bit_flip()
"""Flip each stored bit with probability ``rate``."""

stick_bits_at_zero = make_stuck_at(0)
"""Force each stored bit to 0 with probability ``rate``."""

stick_bits_at_one = make_stuck_at(1)
"""Force each stored bit to 1 with probability ``rate``."""
