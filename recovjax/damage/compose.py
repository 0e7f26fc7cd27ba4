"""Operators as select × corrupt: one selection kernel, any corruption.

Every entry-level parameter operator of :mod:`recovjax.damage.params` is
the composition of a :class:`Selection` (which entries, or which bit
cells of which entries, an amount chooses) and a
:class:`~recovjax.damage.corrupt.Corruption` (what happens to them)::

    core = parameter_core(fraction_of_entries("exact", "leaf", "random"),
                          corrupt.zero(), parse_scope("weights"))
    damage = core(key, params, ratio, infos)   # -> Damage(params, mask)

:func:`parameter_core` flattens the leaves in scope, has the selection
choose, the corruption apply, and assembles the tree and the mask once, so
no operator repeats the flatten → select → assemble steps. The same
selections and corruptions serve activations at sites
(:mod:`recovjax.damage.activations`).
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovjax._types import Array, Damage, Params, PRNGKey
from recovjax.damage import select
from recovjax.damage.corrupt import Corruption, require_floating
from recovjax.damage.scope import Scope, leaf_paths
from recovjax.models.info import LeafInfo

Infos = Mapping[str, LeafInfo]
"""``{path: LeafInfo}`` for every leaf of the parameters."""

LeafAmounts = tuple
"""What a per-leaf core gets for an amount tree: one entry per leaf of the
parameters, in flattening order, a float32 scalar (traced or not) or
``None`` where the leaf is not damaged."""

Choose = Callable[[PRNGKey, Sequence[Array], Array, Sequence[int]], list]
"""``choose(key, values, amounts, cells) -> masks``: ``values`` flat arrays,
``amounts`` a float32 scalar or one per array, ``cells`` the cells per entry
of each array; one flat boolean mask of ``n * cells`` per array."""


class Selection(NamedTuple):
    """Which entries (or bit cells) an amount chooses.

    Attributes:
        name: for messages.
        choose: see :data:`Choose`.
        mask_of_amount: whether the mask is every entry of an array whose
            amount is not 0 (noise: the amount is a scale, not a count).
    """

    name: str
    choose: Choose
    mask_of_amount: bool = False


GLOBAL_NEEDS_SCALAR = (
    "per-leaf amounts need ratio_over='leaf' (the default): "
    "ratio_over='global' draws one count over every leaf in scope, so it "
    "takes one scalar amount")


def counts_of(sizes: Sequence[int], ratio: Array, ratio_over: str
              ) -> tuple[Array, list[int]]:
    """Exact counts per group for a ratio: one group per array, or one over
    all (``ratio_over="global"``, which takes a scalar ratio).

    Returns:
        ``(counts, groups)``, as :func:`~recovjax.damage.select.select_random`
        takes them.

    Raises:
        ValueError: for a per-array ratio with ``"global"`` or a ratio of the
            wrong length.
    """
    if ratio_over == "global":
        if jnp.ndim(ratio) != 0:
            raise ValueError(f"ratio: {GLOBAL_NEEDS_SCALAR}")
        return select.count_of(sum(sizes), ratio)[None], [0] * len(sizes)
    if jnp.ndim(ratio) not in (0, 1) or (
            jnp.ndim(ratio) == 1 and jnp.shape(ratio)[0] != len(sizes)):
        raise ValueError(f"ratio must be a scalar or one per leaf "
                         f"({len(sizes)}), got shape {jnp.shape(ratio)}")
    return (select.count_of(np.asarray(sizes, np.int32), ratio),
            list(range(len(sizes))))


def select_entries(key: PRNGKey, leaves: Sequence[Array], ratio: Array, *,
                   mode: str = "exact", ratio_over: str = "leaf",
                   target: str = "random") -> list[Array]:
    """Flat boolean masks choosing entries of ``leaves``.

    Args:
        key: typed key (unused for targeted selection).
        leaves: the arrays to choose from.
        ratio: traced fraction of entries to choose: a scalar for every
            leaf, or ``float32[len(leaves)]``, one per leaf (needs
            ``ratio_over="leaf"``). A scalar chooses exactly what the
            vector of that scalar chooses.
        mode: ``"exact"``: exactly ``floor(n * ratio)`` entries, ``n`` per
            leaf or over all leaves (``ratio_over``); ``"bernoulli"``: each
            entry independently with probability ``ratio``.
        ratio_over: ``"leaf"`` or ``"global"`` (exact mode only; the two
            coincide for Bernoulli selection).
        target: ``"random"`` (uniform without replacement), ``"largest"``
            or ``"smallest"`` magnitudes first (exact mode only; ties go to
            the lowest flat index).

    Returns:
        One flat boolean mask per leaf.

    Raises:
        ValueError: for a per-leaf ``ratio`` with ``ratio_over="global"``
            or of the wrong length.
    """
    return fraction_of_entries(mode, ratio_over, target).choose(
        key, [jnp.ravel(leaf) for leaf in leaves], ratio,
        [1] * len(leaves))


def fraction_of_entries(mode: str, ratio_over: str, target: str
                        ) -> Selection:
    """A fraction of the cells: exact counts or Bernoulli, random or by
    magnitude (see :func:`select_entries`).

    Magnitude targets choose whole entries (one cell per entry); random
    selection chooses among ``n * cells`` cells, the bit positions of a bit
    fault.
    """

    def choose(key, values, ratio, cells):
        sizes = [int(x.size) * c for x, c in zip(values, cells)]
        if target == "random":
            if mode == "bernoulli":
                if ratio_over == "global" and jnp.ndim(ratio) != 0:
                    raise ValueError(f"ratio: {GLOBAL_NEEDS_SCALAR}")
                return select.select_bernoulli(select.draw_bits(key, sizes),
                                               ratio)
            counts, groups = counts_of(sizes, ratio, ratio_over)
            return select.select_random(key, sizes, counts, groups=groups)
        if any(c != 1 for c in cells):  # pragma: no cover - factories check
            raise ValueError(f"target={target!r} chooses whole entries")
        counts, groups = counts_of(sizes, ratio, ratio_over)
        if target == "largest":
            return select.select_largest_magnitude(values, counts,
                                                   groups=groups)
        return select.select_smallest_magnitude(values, counts,
                                                groups=groups)

    return Selection(f"{mode} {target} over {ratio_over}", choose)


def fixed_count(count: int, target: str) -> Selection:
    """``count`` entries over all the arrays together, whatever the amount:
    the largest or smallest magnitudes (ties to the lowest flat index, the
    first array first) or uniformly at random. Fewer when there are fewer
    entries."""

    def choose(key, values, amounts, cells):
        sizes = [int(x.size) for x in values]
        counts = jnp.minimum(jnp.int32(count), sum(sizes))[None]
        groups = [0] * len(values)
        if target == "random":
            return select.select_random(key, sizes, counts, groups=groups)
        if target == "largest":
            return select.select_largest_magnitude(values, counts,
                                                   groups=groups)
        return select.select_smallest_magnitude(values, counts,
                                                groups=groups)

    return Selection(f"{count} {target}", choose)


def every_entry() -> Selection:
    """Every entry of each array whose amount is not 0 (noise scales)."""

    def choose(key, values, amounts, cells):
        return [jnp.broadcast_to(amount != 0, (x.size * c,))
                for x, amount, c in zip(values, amounts, cells)]

    return Selection("every entry", choose, mask_of_amount=True)


def corrupt_arrays(key: PRNGKey, selection: Selection,
                   corruption: Corruption, values: Sequence[Array],
                   amounts: Array | Sequence[Array], names: Sequence[str],
                   *, noun: str = "leaf", plural: str = "leaves",
                   ranking: Sequence[Array] | None = None
                   ) -> tuple[list[Array], list[Array]]:
    """Select and corrupt a list of arrays of any shapes.

    Args:
        key: typed key: stream 0 selects, stream 1 makes values.
        selection: which entries.
        corruption: what happens to them.
        values: the arrays.
        amounts: a float32 scalar for all, or ``float32[len(values)]``.
        names: one name per array, for messages.
        noun, plural: what the arrays are, for messages.
        ranking: arrays shaped like ``values`` that a magnitude target
            ranks by instead of the values (importance scores), or
            ``None``.

    Returns:
        ``(new, hit)``: the corrupted arrays (shapes and dtypes as given)
        and one boolean mask per array of the entries the selection hit.

    Raises:
        TypeError, ValueError: for an array the corruption cannot take
            (naming it).
    """
    require_floating(corruption, values, names, noun=noun, plural=plural)
    cells = []
    for value, name in zip(values, names):
        try:
            cells.append(corruption.cells(value))
        except TypeError as error:
            raise TypeError(f"{noun} {name!r}: {error}") from None
        except ValueError as error:
            raise ValueError(f"{noun} {name!r}: {error}") from None
    amounts = jnp.asarray(amounts, jnp.float32)
    per_array = [amounts if amounts.ndim == 0 else amounts[i]
                 for i in range(len(values))]
    ranked = values if ranking is None else ranking
    masks = selection.choose(key, [jnp.ravel(value) for value in ranked],
                             per_array if selection.mask_of_amount
                             else amounts, cells)
    masks = [m.reshape(v.shape if c == 1 else v.shape + (c,))
             for m, v, c in zip(masks, values, cells)]
    new = corruption.apply(key, list(values), masks, per_array)
    hit = [m if c == 1 else jnp.any(m, axis=-1)
           for m, c in zip(masks, cells)]
    return [n.astype(v.dtype) for n, v in zip(new, values)], hit


def capacity(size: int, max_rate: float) -> int:
    """Fault slots for ``size`` values at rates up to ``max_rate``: the
    binomial mean plus 8 standard deviations plus 8, so that more faults
    than slots has a probability below ``1e-15``."""
    mean = size * max_rate
    return int(min(size, np.ceil(mean + 8 * np.sqrt(mean * (1 - max_rate))
                                 + 8)))


def corrupt_sparse(key: PRNGKey, corruption: Corruption, value: Array,
                   rate: Array, slots: int, name: str) -> Array:
    """Corrupt each value independently with probability ``rate``, at a
    cost in the number of faults rather than of values.

    The hit positions are those of a Bernoulli(``rate``) sequence over the
    flat values, drawn by their gaps: each gap is geometric
    (``floor(log(u) / log(1 - rate)) + 1`` for a uniform ``u``) and the
    positions are the gaps' running sums, so they are distinct and exactly
    as likely as one draw per value makes them, as long as they fit in
    ``slots`` (:func:`capacity` sizes them so that more hits than slots
    has a probability below ``1e-15``). The corruption sees the chosen
    values only (one cell each).

    Args:
        key: typed key (stream 0 chooses, the corruption draws from its own
            streams of the same key).
        corruption: a corruption of one cell per entry.
        value: the array.
        rate: traced probability per value, clipped to ``[0, 1]``.
        slots: static number of fault slots.
        name: the array's name, for messages.

    Returns:
        The corrupted array.
    """
    require_floating(corruption, [value], [name], noun="site",
                     plural="values")
    if corruption.cells(value) != 1:  # pragma: no cover - factories check
        raise ValueError(f"{corruption.name} selects bits; sparse faults "
                         "hit whole values")
    flat = value.ravel()
    size = flat.size
    rate = select.sanitize_fraction(jnp.asarray(rate, jnp.float32))
    # Uniform in (0, 1) from the cheap hashed draws of the select stream
    # (23 bits: a gap is cut at about 16.6 / rate, which a geometric gap
    # exceeds with probability 6e-8).
    (bits,) = select.draw_bits(key, [slots], select.SELECT_STREAM)
    uniform = select.uniform_from_bits(bits)
    # Geometric gaps; past the end (size + 1) for a rate of 0.
    gaps = jnp.floor(jnp.log(uniform) / jnp.log1p(-rate)) + 1
    gaps = jnp.where(rate > 0, jnp.minimum(gaps, size + 1), size + 1)
    # Running sums that saturate past the end, so int32 cannot overflow.
    ends = jax.lax.associative_scan(
        lambda a, b: jnp.minimum(a + b, size + 1), gaps.astype(jnp.int32))
    places = ends - 1
    live = places < size
    chosen = flat[jnp.minimum(places, size - 1)]
    (new,) = corruption.apply(key, [chosen], [live], [rate])
    return flat.at[jnp.where(live, places, size)].set(
        new, mode="drop").reshape(value.shape)


class Leaves(NamedTuple):
    """The leaves of a parameter tree and which of them an operator hits."""

    leaves: list
    treedef: object
    paths: list[str]
    chosen: list[int]  # indices of the leaves damaged: in scope, not None
    amounts: Array     # float32 scalar (for all), or [len(chosen)] per leaf


def flatten(params: Params, scope: Scope, infos: Infos | None,
            amount: Array | LeafAmounts) -> Leaves:
    """The leaves in scope and their amounts; a leaf whose amount is
    ``None`` drops out exactly as a leaf outside the scope does."""
    flags = scope.select(params, infos)
    leaves, treedef = jax.tree.flatten(params)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    if isinstance(amount, tuple):
        if len(amount) != len(leaves):  # pragma: no cover - make_operator
            raise ValueError(f"{len(amount)} amounts for {len(leaves)} "
                             f"leaves")
        chosen = [i for i, flag in enumerate(flags)
                  if flag and amount[i] is not None]
        amounts = (jnp.stack([jnp.asarray(amount[i], jnp.float32)
                              for i in chosen]) if chosen
                   else jnp.zeros((0,), jnp.float32))
    else:
        chosen = [i for i, flag in enumerate(flags) if flag]
        amounts = jnp.asarray(amount, jnp.float32)
    return Leaves(leaves, treedef, leaf_paths(params), chosen, amounts)


def assemble(flat: Leaves, new: Mapping[int, Array],
             masks: Mapping[int, Array]) -> Damage:
    """The damaged tree: ``new`` leaves at their indices, the rest as given
    (with all-``False`` masks)."""
    leaves, mask_leaves = [], []
    for i, leaf in enumerate(flat.leaves):
        if i in new:
            leaves.append(new[i].reshape(leaf.shape).astype(leaf.dtype))
            mask_leaves.append(masks[i].reshape(leaf.shape))
        else:
            leaves.append(leaf)
            mask_leaves.append(jnp.zeros(leaf.shape, jnp.bool_))
    return Damage(params=jax.tree.unflatten(flat.treedef, leaves),
                  mask=jax.tree.unflatten(flat.treedef, mask_leaves))


def parameter_core(selection: Selection, corruption: Corruption,
                   scope: Scope, scores: Params | None = None
                   ) -> Callable[[PRNGKey, Params, "Array | LeafAmounts",
                                  "Infos | None"], Damage]:
    """``core(key, params, amount, infos) -> Damage`` for the leaves in
    ``scope``: what :func:`recovjax.damage.params.make_operator` wraps.
    ``scores`` (a tree like the parameters) ranks the entries for a
    magnitude target instead of their values."""
    score_leaves = None if scores is None else jax.tree.leaves(scores)

    def core(key: PRNGKey, params: Params, amount: Array | LeafAmounts,
             infos: Infos | None) -> Damage:
        flat = flatten(params, scope, infos, amount)
        values = [flat.leaves[i] for i in flat.chosen]
        ranking = None
        if score_leaves is not None:
            if len(score_leaves) != len(flat.leaves):
                raise ValueError(f"scores: {len(score_leaves)} leaves for "
                                 f"parameters of {len(flat.leaves)}")
            ranking = [jnp.asarray(score_leaves[i]) for i in flat.chosen]
        new, hit = corrupt_arrays(key, selection, corruption, values,
                                  flat.amounts,
                                  [flat.paths[i] for i in flat.chosen],
                                  ranking=ranking)
        return assemble(flat, dict(zip(flat.chosen, new)),
                        dict(zip(flat.chosen, hit)))

    return core
