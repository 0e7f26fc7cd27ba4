"""Selection kernels shared by every damage operator.

Every operator in :mod:`recovjax.damage` reduces to "pick these entries",
with the damage amount traced so that one compiled program serves every
ratio and seed. The kernels here do the picking:

* :func:`draw_bits` turns a typed key into pseudo-random ``uint32`` draws,
  one per candidate entry, that are *all distinct* within one call. Each
  key has numbered streams (:func:`stream_seeds`): stream 0 chooses entries,
  stream 1 makes values, so every operator chooses the same entries for the
  same key.
* :func:`select_random` picks exactly ``k`` entries uniformly without
  replacement: the ``k`` smallest draws. Instead of sorting, it finds the
  threshold ``t`` with exactly ``k`` draws below it by a bitwise binary
  search: 16 counting passes over the draws' high halves, then 16 over the
  low halves of the entries that share the answer's high half, all over
  ``uint16`` data. Every array and group is searched at once in one *row
  layout* (each array cut into rows of 128 entries, its last row padded):
  a pass is one comparison of the whole layout with its rows' candidates,
  a count per row folded with elementwise adds (XLA:CPU reduces slowly),
  and one small product that sums rows into groups. The draws are made in
  that layout directly. So the search is one loop over one array however
  many leaves a model has: it compiles to a handful of kernels (about 1 s
  for LeNet-5's ten leaves where a loop per leaf took about 3 s) and runs
  in under half a millisecond per LeNet-5. Because the draws are distinct,
  ``k`` draws below ``t`` always exists and no tie-breaking is needed.
* :func:`select_bernoulli` picks each entry independently with a traced
  probability.
* :func:`select_smallest` / :func:`select_largest_magnitude` pick exactly
  ``k`` entries by value (targeted damage, magnitude pruning), by a
  bitwise search over the values' order-preserving bit patterns (32
  passes: values may repeat); ties at the threshold are broken by position
  (the lowest flat index first) with a second bitwise search that only
  runs when a tie actually straddles the threshold.

All kernels work on a list of flat arrays split into *groups*: each group
gets its own count (a per-leaf ratio puts every leaf in its own group, a
global ratio puts every selected leaf in one group), and one loop serves
all groups at once.

Why not ``jax.random.bits`` for every entry: the draws come from a keyed
bijection of the entry's index (three rounds of a 32-bit integer mixer,
keyed by words hashed from ``jax.random.key_data(key)``). A bijection gives
distinct draws, which makes the exact count exact without a tie-breaking
pass; it costs a few integer operations per entry where XLA:CPU's threefry
costs several times more; and it keeps threefry, which XLA:CPU compiles
slowly, out of the damage programs altogether. Keys are still typed keys,
split and folded by the caller with ``jax.random`` as usual.

The counter hash and the bitwise search are the XLA:CPU formulations
(``random="hash"``, ``select="radix"``, the defaults on CPU). The plain JAX
ones (the defaults on other backends; see :mod:`recovjax.formulations`)
are chosen while a function is traced:

* ``random="jax"``: :func:`draw_bits` returns ``jax.random.bits`` of
  ``jax.random.fold_in(key, stream)`` (threefry), and :func:`select_random`
  takes the ``k`` smallest of those draws with :func:`select_smallest`,
  whose ties (draws may repeat) go to the lowest position.
* ``select="sort"``: :func:`select_smallest` sorts each group's values
  once (a single-key sort, which GPUs run as a radix sort), reads the
  threshold at the traced count, takes every candidate below it and, of
  those equal to it, the first ones by position (a running count). The
  masks are those of the bitwise search, bit for bit.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from recovjax import _checks, formulations
from recovjax._types import Array, PRNGKey

MAX_ENTRIES = 2**32
"""Most candidate entries one call of :func:`draw_bits` can number."""

_UINT32_MAX = 0xFFFFFFFF


# --------------------------------------------------------------------------
# Amounts and keys at the API boundary.
# --------------------------------------------------------------------------


def check_key(key: PRNGKey) -> PRNGKey:
    """Check that ``key`` is one typed key from :func:`jax.random.key`.

    See :func:`recovjax._checks.check_key` (a tracer under ``jit``/``vmap``
    is checked by its dtype only).

    Returns:
        ``key`` unchanged.

    Raises:
        TypeError: for integers, raw ``uint32`` key data (``PRNGKey``),
            key arrays and anything else that is not one typed key.
    """
    _checks.check_key(key, "key")
    return key


def is_amount_tree(amount) -> bool:
    """Whether ``amount`` is a tree of amounts rather than one amount.

    A number, an array (of any shape) or a tracer is one amount; ``None``
    is not a tree (it is refused as an amount); containers (dicts, lists,
    tuples, other pytree nodes) are trees: per-leaf amounts, see
    :mod:`recovjax.damage.params`.
    """
    return amount is not None and not jax.tree_util.treedef_is_leaf(
        jax.tree.structure(amount))


def check_amount(amount, *, name: str, fraction: bool) -> Array:
    """Validate one concrete damage amount; pass a traced one through.

    See :func:`recovjax._checks.check_amount`. A tree of amounts (a dict,
    list or other container) is refused with its own message: per-leaf
    amounts apply to parameter damage, whose operators spread the tree over
    the leaves and check each entry with this function.

    Returns:
        ``amount`` as a ``float32`` scalar array (concrete or traced).

    Raises:
        ValueError: for a tree of amounts, and as
            :func:`recovjax._checks.check_amount`.
        TypeError: as :func:`recovjax._checks.check_amount`.
    """
    if is_amount_tree(amount):
        raise ValueError(f"{name}: per-leaf amounts apply to parameter "
                         f"damage; this operator takes one scalar {name}, "
                         f"got a {type(amount).__name__}")
    return _checks.check_amount(amount, name=name, fraction=fraction)


sanitize_fraction = _checks.sanitize_fraction


def count_of(size: int | Array, fraction: Array) -> Array:
    """``floor(size * fraction)`` in float32, as an ``int32`` count.

    The product is computed in float32 (as it is under ``jit``), so for a
    fraction that is not exactly representable the count is that of its
    float32 value: ``count_of(10, 0.7) == 7`` but, as with Python's
    ``int(100 * 0.29) == 28``, a product that lands just below an integer
    rounds down. Exact for every size below ``2**24``.

    Args:
        size: number of candidates (static or traced).
        fraction: traced or concrete fraction; clipped to ``[0, 1]``.

    Returns:
        ``int32`` scalar in ``[0, size]``.
    """
    fraction = sanitize_fraction(fraction)
    size = jnp.asarray(size, jnp.int32)
    count = jnp.floor(size.astype(jnp.float32) * fraction).astype(jnp.int32)
    return jnp.clip(count, 0, size)


# --------------------------------------------------------------------------
# Draws.
# --------------------------------------------------------------------------


def _mix32(x: Array) -> Array:
    # A 32-bit integer hash with full avalanche (Wellons' "lowbias32"); each
    # step (xor-shift, odd multiply) is invertible, so the mix is a bijection.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _permute(counter: Array, seeds: Array) -> Array:
    # Keyed bijection of uint32: three keyed mixing rounds.
    x = _mix32(counter + seeds[0])
    x = _mix32(x ^ seeds[1])
    return _mix32(x + seeds[2])


SELECT_STREAM = 0
"""Stream of the draws that choose entries (shared by every operator)."""

VALUE_STREAM = 1
"""Stream of the draws that make replacement values and noise."""


def stream_seeds(key: PRNGKey, stream: int = SELECT_STREAM) -> Array:
    """Three ``uint32`` seed words for one stream of a key.

    The key's data (``jax.random.key_data``, whatever the implementation)
    and the stream number are hashed together. Streams play the role of
    ``jax.random.split`` inside an operator without running threefry, which
    XLA:CPU compiles slowly (about half a second per call site).

    Args:
        key: typed key.
        stream: static stream number (:data:`SELECT_STREAM`,
            :data:`VALUE_STREAM`, ...).

    Returns:
        ``uint32[3]``.
    """
    words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    seeds = []
    for index in range(3):
        state = jnp.uint32((0x9E3779B9 * (index + 1)
                            + 0x632BE5AB * (stream + 1)) & _UINT32_MAX)
        for word in range(words.shape[0]):
            state = _mix32(state ^ words[word]) + jnp.uint32(0x6A09E667)
        seeds.append(_mix32(state))
    return jnp.stack(seeds)


def draw_bits(key: PRNGKey, sizes: Sequence[int],
              stream: int = SELECT_STREAM) -> list[Array]:
    """Pseudo-random ``uint32`` draws, one flat array per size.

    Under the ``"hash"`` formulation (:mod:`recovjax.formulations`), entry
    ``i`` of the concatenation of all arrays is a keyed bijection of ``i``,
    so no two draws of one call are equal. Under ``"jax"`` the
    concatenation is ``jax.random.bits(jax.random.fold_in(key, stream))``
    (threefry), independent uniform draws that may repeat. Either way the
    same key and stream give the same draws, and draws for a prefix of
    ``sizes`` do not depend on later sizes (for ``"jax"``, with JAX's
    default ``jax_threefry_partitionable``).

    Args:
        key: typed key.
        sizes: number of draws wanted for each array (static).
        stream: static stream number (see :func:`stream_seeds`).

    Returns:
        One ``uint32[size]`` array per size.

    Raises:
        ValueError: under ``"hash"``, if the sizes add up to more than
            ``2**32``.
    """
    total = sum(int(size) for size in sizes)
    if formulations.current_formulations().random == "jax":
        return _split(jax.random.bits(jax.random.fold_in(key, stream),
                                      (total,), jnp.uint32), sizes)
    if total > MAX_ENTRIES:
        raise ValueError(f"cannot draw {total} distinct uint32 values "
                         f"(at most {MAX_ENTRIES})")
    return _draw_from_seeds(stream_seeds(key, stream), sizes)


def _split(flat: Array, sizes: Sequence[int]) -> list[Array]:
    pieces, offset = [], 0
    for size in sizes:
        pieces.append(flat[offset:offset + int(size)])
        offset += int(size)
    return pieces


def _draw_from_seeds(seeds: Array, sizes: Sequence[int]) -> list[Array]:
    draws, offset = [], 0
    for size in sizes:
        counter = lax.iota(jnp.uint32, int(size)) + jnp.uint32(offset)
        draws.append(_permute(counter, seeds))
        offset += int(size)
    return draws


def uniform_from_bits(bits: Array) -> Array:
    """``uint32`` draws to float32 uniform in the open interval ``(0, 1)``.

    The top 23 bits, centred in their cell: ``(m + 0.5) / 2**23``, which
    float32 holds exactly, so neither 0 nor 1 can occur.
    """
    return ((bits >> 9).astype(jnp.float32) + 0.5) * jnp.float32(2.0 ** -23)


def normal_from_bits(bits: Array) -> Array:
    """``uint32`` draws to standard normal float32 (inverse CDF)."""
    uniform = uniform_from_bits(bits)
    return jnp.float32(np.sqrt(2.0)) * lax.erf_inv(2.0 * uniform - 1.0)


def draw_uniform(key: PRNGKey, sizes: Sequence[int],
                 stream: int = VALUE_STREAM) -> list[Array]:
    """Float32 uniform draws in ``(0, 1)``, one flat array per size."""
    return [uniform_from_bits(bits) for bits in draw_bits(key, sizes, stream)]


def draw_normal(key: PRNGKey, sizes: Sequence[int],
                stream: int = VALUE_STREAM) -> list[Array]:
    """Float32 standard normal draws, one flat array per size."""
    return [normal_from_bits(bits) for bits in draw_bits(key, sizes, stream)]


# --------------------------------------------------------------------------
# Selection.
# --------------------------------------------------------------------------


def _groups(values: Sequence[Array], groups: Sequence[int] | None
            ) -> tuple[tuple[int, ...], int]:
    if groups is None:
        groups = tuple(range(len(values)))
    groups = tuple(int(group) for group in groups)
    if len(groups) != len(values):
        raise ValueError(f"{len(values)} arrays but {len(groups)} group ids")
    count = max(groups) + 1 if groups else 0
    if sorted(set(groups)) != list(range(count)):
        raise ValueError(f"group ids must be 0..G-1, got {groups}")
    return groups, count


def _where(where: Sequence[Array | None] | None, values: Sequence[Array]
           ) -> list[Array | None]:
    if where is None:
        return [None] * len(values)
    if len(where) != len(values):
        raise ValueError(f"{len(values)} arrays but {len(where)} masks")
    return list(where)


def _per_group(totals_by_leaf: Sequence[Array], groups: Sequence[int],
               num_groups: int) -> Array:
    totals = [jnp.zeros((), jnp.int32)] * num_groups
    for total, group in zip(totals_by_leaf, groups):
        totals[group] = totals[group] + total
    return jnp.stack(totals)


def eligible_counts(values: Sequence[Array], where: Sequence[Array | None]
                    | None = None, groups: Sequence[int] | None = None
                    ) -> Array:
    """Number of candidates in each group (``int32[G]``)."""
    groups, num_groups = _groups(values, groups)
    where = _where(where, values)
    sizes = [jnp.asarray(v.size, jnp.int32) if w is None
             else jnp.sum(w, dtype=jnp.int32) for v, w in zip(values, where)]
    return _per_group(sizes, groups, num_groups)


_LANES = 128
"""Width of the rows of the layout :func:`select_random` searches."""


class _RowLayout(NamedTuple):
    # Every array laid out in whole rows of _LANES entries (the last row of
    # each array padded), arrays one after another.
    first_row: list[int]     # first row of each array
    counter: np.ndarray      # uint32[rows]: draw counter of each row's lane 0
    valid: np.ndarray        # int32[rows]: real (unpadded) entries per row
    group: np.ndarray        # int32[rows]: group of each row
    one_hot: np.ndarray      # [rows, G] row-to-group incidence (float32
                             # while sums stay exact, else int32)


def _row_layout(sizes: Sequence[int], groups: Sequence[int],
                num_groups: int) -> _RowLayout:
    first_row, counter, valid, row_groups = [], [], [], []
    offset = 0
    for size, group in zip(sizes, groups):
        rows = -(-size // _LANES)
        first_row.append(len(counter))
        counter += [offset + r * _LANES for r in range(rows)]
        valid += [min(_LANES, size - r * _LANES) for r in range(rows)]
        row_groups += [group] * rows
        offset += size
    row_groups = np.asarray(row_groups, np.int32)
    # Group sums are a [rows] x [rows, G] product: float32 (the fast path)
    # is exact while a group holds fewer than 2**24 entries.
    largest = np.bincount(row_groups, minlength=num_groups).max(initial=0)
    dtype = np.float32 if largest * _LANES < 2**24 else np.int32
    return _RowLayout(
        first_row, np.asarray(counter, np.uint32),
        np.asarray(valid, np.int32), row_groups,
        (row_groups[:, None] == np.arange(num_groups)).astype(dtype))


def _count_rows(mask: Array) -> Array:
    # Ones per row of a [rows, _LANES] mask, folded in halves with uint8
    # adds: elementwise code, which XLA:CPU vectorises, where a reduction
    # along the minor axis is slow. A row holds at most 128 ones.
    x = mask.astype(jnp.uint8)
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        x = x[:, :half] + x[:, half:]
    return x[:, 0]


def _search16_rows(halves: Array, layout: _RowLayout, base: Array,
                   counts: Array) -> tuple[Array, Array]:
    # Per group, the largest c in [0, 2**16) with base + #{h < c} <= count,
    # bit by bit from the top, and that number #{h < c}. Each of the 16
    # passes compares the whole layout with its rows' candidates, counts
    # per row, and sums rows into groups with one small product.
    def step(index, state):
        prefix, below = state
        candidate = prefix | jnp.left_shift(jnp.int32(1), 15 - index)
        row_candidate = candidate[layout.group].astype(jnp.uint16)
        per_row = _count_rows(halves < row_candidate[:, None])
        totals = (per_row.astype(layout.one_hot.dtype)
                  @ layout.one_hot).astype(jnp.int32)
        accept = base + totals <= counts
        return (jnp.where(accept, candidate, prefix),
                jnp.where(accept, totals, below))

    zeros = jnp.zeros(counts.shape, jnp.int32)
    return lax.fori_loop(0, 16, step, (zeros, zeros))


def _to_rows(arrays: Sequence[Array], fill) -> Array:
    # The flat arrays in the row layout, each padded with `fill` to whole
    # rows: [rows, _LANES].
    pieces = []
    for array in arrays:
        padded = -(-array.shape[0] // _LANES) * _LANES
        pieces.append(jnp.pad(array, (0, padded - array.shape[0]),
                              constant_values=np.asarray(fill,
                                                         array.dtype)))
    return jnp.concatenate(pieces).reshape(-1, _LANES)


def _rows_threshold(values: Array, layout: _RowLayout, counts: Array
                    ) -> Array:
    # Per group, the largest t with #{v < t} <= count over uint32 values in
    # the row layout (non-candidates and padding parked at 0xFFFFFFFF,
    # which no threshold exceeds). 16 passes over the high halves, then 16
    # over the low halves of the entries whose high half is the answer
    # (the others parked at 0xFFFF, which no candidate exceeds).
    high = (values >> 16).astype(jnp.uint16)
    top, below = _search16_rows(high, layout, jnp.zeros_like(counts),
                                counts)
    in_bucket = high == top[layout.group].astype(jnp.uint16)[:, None]
    low = jnp.where(in_bucket, (values & 0xFFFF).astype(jnp.uint16),
                    jnp.uint16(0xFFFF))
    bottom, _ = _search16_rows(low, layout, below, counts)
    return (top.astype(jnp.uint32) << 16) | bottom.astype(jnp.uint32)


def _threshold(values: Sequence[Array], counts: Array,
               where: Sequence[Array | None], groups: Sequence[int],
               num_groups: int) -> Array:
    # Per group, the largest t with #{v < t} <= count (values may repeat),
    # every array and group in one row layout.
    layout = _row_layout([v.shape[0] for v in values], groups, num_groups)
    return _rows_threshold(
        _to_rows(_park(values, where), _UINT32_MAX), layout, counts)


def _park(values: Sequence[Array], where: Sequence[Array | None]
          ) -> list[Array]:
    # Non-candidates hold 0xFFFFFFFF, which no threshold exceeds.
    return [v if w is None else jnp.where(w, v, jnp.uint32(_UINT32_MAX))
            for v, w in zip(values, where)]


def _select_below_rank(seeds: Array, sizes: Sequence[int],
                       where: Sequence[Array | None], counts: Array,
                       eligible: Array, groups: Sequence[int],
                       num_groups: int) -> list[Array]:
    # The entries holding each group's `count` smallest draws. The draws
    # are made in the row layout directly; one threshold search serves
    # every array and group: a handful of kernels to compile.
    layout = _row_layout(sizes, groups, num_groups)
    lane = lax.iota(jnp.uint32, _LANES)
    values = _permute(layout.counter[:, None] + lane[None, :], seeds)
    candidate = lane[None, :].astype(jnp.int32) < layout.valid[:, None]
    if any(w is not None for w in where):
        candidate = candidate & _to_rows(
            [jnp.ones((size,), jnp.bool_) if w is None else w
             for size, w in zip(sizes, where)], False)
    values = jnp.where(candidate, values, jnp.uint32(_UINT32_MAX))
    threshold = _rows_threshold(values, layout, counts)
    # With distinct draws exactly `count` lie below the threshold, except
    # when every candidate is wanted and the top draw is 2**32 - 1.
    everything = counts >= eligible
    chosen = (values < threshold[layout.group][:, None]) | (
        everything[layout.group][:, None] & candidate)
    chosen = chosen.reshape(-1)
    return [chosen[first * _LANES:first * _LANES + size]
            for first, size in zip(layout.first_row, sizes)]


SORT_LIMIT = 1024
"""Groups of at most this many entries are ranked by one sort instead.

For small groups a sort is as fast as the counting passes and compiles in
a fraction of the time; the choice is the same either way (the ``k``
smallest values, ties to the lowest position)."""


def _partition(values: Sequence, groups: Sequence[int], num_groups: int
               ) -> tuple[list[int], list[int]]:
    sizes = [0] * num_groups
    for v, g in zip(values, groups):
        sizes[g] += int(v.shape[0])
    small = [g for g in range(num_groups) if sizes[g] <= SORT_LIMIT]
    large = [g for g in range(num_groups) if sizes[g] > SORT_LIMIT]
    return small, large


def _members(groups: Sequence[int], chosen: Sequence[int]
             ) -> tuple[list[int], list[int]]:
    # Leaves of the chosen groups, and their groups renumbered 0..len-1.
    renumber = {g: i for i, g in enumerate(chosen)}
    leaves = [i for i, g in enumerate(groups) if g in renumber]
    return leaves, [renumber[groups[i]] for i in leaves]


def _rank_select(values: Sequence[Array], where: Sequence[Array | None],
                 count: Array) -> list[Array]:
    # One group by sorting: candidates first, then by value, then by
    # position (a stable sort); the first `count` are chosen.
    flat = jnp.concatenate(values) if len(values) > 1 else values[0]
    outside = [jnp.zeros(v.shape, jnp.uint8) if w is None
               else (~w).astype(jnp.uint8) for v, w in zip(values, where)]
    outside = jnp.concatenate(outside) if len(outside) > 1 else outside[0]
    size = flat.shape[0]
    position = lax.iota(jnp.int32, size)
    order = lax.sort((outside, flat, position), num_keys=2,
                     is_stable=True)[2]
    rank = jnp.zeros((size,), jnp.int32).at[order].set(position)
    chosen = (rank < count) & (outside == 0)
    masks, start = [], 0
    for v in values:
        masks.append(chosen[start:start + v.shape[0]])
        start += v.shape[0]
    return masks


def _dispatch(values: Sequence[Array], counts: Array,
              where: Sequence[Array | None], groups: Sequence[int],
              num_groups: int, search: Callable) -> list[Array]:
    # Small groups by one sort each; the others by `search` on the subset.
    small, large = _partition(values, groups, num_groups)
    masks: list[Array | None] = [None] * len(values)
    for g in small:
        leaves = [i for i, group in enumerate(groups) if group == g]
        chosen = _rank_select([values[i] for i in leaves],
                              [where[i] for i in leaves], counts[g])
        for i, mask in zip(leaves, chosen):
            masks[i] = mask
    if large:
        leaves, renumbered = _members(groups, large)
        chosen = search(leaves, jnp.stack([counts[g] for g in large]),
                        renumbered, len(large))
        for i, mask in zip(leaves, chosen):
            masks[i] = mask
    return masks


def select_random(key: PRNGKey, sizes: Sequence[int], counts: Array, *,
                  where: Sequence[Array | None] | None = None,
                  groups: Sequence[int] | None = None) -> list[Array]:
    """Exactly ``counts[g]`` entries of each group, uniformly at random.

    The choice is uniform without replacement: the entries with the
    ``counts[g]`` smallest of the draws of :func:`draw_bits` for ``key``.
    With the XLA:CPU formulations (``random="hash"``, ``select="radix"``)
    the draws are distinct and are made and searched in the row layout
    described in the module docstring (no sort, one loop for every array
    and group); otherwise :func:`select_smallest` picks the smallest draws
    (``"hash"`` draws: the same entries; repeated ``"jax"`` draws: ties to
    the lowest position, which biases the choice only when two of the 2**32
    values meet at the threshold).

    Args:
        key: typed key; the draws are ``draw_bits(key, sizes)``.
        sizes: number of entries of each flat array (static).
        counts: ``int32[G]`` (or a scalar for one group) traced counts;
            clipped to the number of candidates.
        where: optional boolean candidate masks (``None`` = every entry);
            entries outside are never chosen.
        groups: group id of each array (default: each array its own group;
            ``[0] * len(sizes)`` counts over all arrays together).

    Returns:
        One flat boolean mask per array.
    """
    sizes = tuple(int(size) for size in sizes)
    shapes = [jax.ShapeDtypeStruct((size,), jnp.uint32) for size in sizes]
    groups, num_groups = _groups(shapes, groups)
    where = _where(where, shapes)
    if not sizes:
        return []
    chosen = formulations.current_formulations()
    if chosen.random != "hash" or chosen.select != "radix":
        return select_smallest(draw_bits(key, sizes, SELECT_STREAM), counts,
                               where=where, groups=groups)
    counts = jnp.broadcast_to(jnp.asarray(counts, jnp.int32), (num_groups,))
    eligible = eligible_counts(shapes, where, groups)
    return _select_below_rank(stream_seeds(key, SELECT_STREAM), sizes, where,
                              jnp.minimum(counts, eligible), eligible,
                              groups, num_groups)


def select_bernoulli(draws: Sequence[Array], rate: Array, *,
                     where: Sequence[Array | None] | None = None
                     ) -> list[Array]:
    """Each entry independently with probability ``rate``.

    Args:
        draws: flat ``uint32`` draws (e.g. from :func:`draw_bits`).
        rate: traced probability, a scalar for every array or
            ``float32[len(draws)]``, one per array; clipped to ``[0, 1]``
            (NaN = 0). A scalar chooses exactly what the vector of that
            scalar chooses.
        where: optional candidate masks.

    Returns:
        One boolean mask per array.

    Raises:
        ValueError: for a vector ``rate`` whose length is not the number
            of arrays.
    """
    where = _where(where, draws)
    rate = sanitize_fraction(rate)
    if rate.ndim > 1 or (rate.ndim == 1 and rate.shape[0] != len(draws)):
        raise ValueError(f"rate must be a scalar or one per array "
                         f"({len(draws)}), got shape {rate.shape}")
    # rate * 2**32 is exact in float32 and below 2**32 for rate < 1.
    scaled = jnp.minimum(rate * jnp.float32(2.0 ** 32),
                         jnp.float32(_UINT32_MAX - 255))
    threshold = scaled.astype(jnp.uint32)
    every = rate >= 1.0
    masks = []
    for index, (v, w) in enumerate(zip(draws, where)):
        if rate.ndim:
            mask = (v < threshold[index]) | every[index]
        else:
            mask = (v < threshold) | every
        masks.append(mask if w is None else mask & w)
    return masks


def select_smallest(values: Sequence[Array], counts: Array, *,
                    where: Sequence[Array | None] | None = None,
                    groups: Sequence[int] | None = None) -> list[Array]:
    """Exactly ``counts[g]`` entries of each group with the smallest values.

    Ties are broken by position: within a group, entries are numbered
    through its arrays in order (flat index), and the lowest numbers win.
    Under the ``"radix"`` formulation (:mod:`recovjax.formulations`),
    groups of more than :data:`SORT_LIMIT` entries are searched by bits
    like :func:`select_random`; ties straddling the threshold are then
    settled by a second search over position bits, inside a ``while_loop``
    that does no iteration unless such a tie exists. Under ``"sort"`` each
    group is sorted once and thresholded at its count (see the module
    docstring); the masks are the same.

    Args:
        values: flat ``uint32`` arrays (order-preserving bit patterns, see
            :func:`magnitude_bits`).
        counts: ``int32[G]`` (or scalar) traced counts; clipped to the
            number of candidates.
        where: optional candidate masks.
        groups: group id of each array (default: each its own group).

    Returns:
        One boolean mask per array.
    """
    groups, num_groups = _groups(values, groups)
    where = _where(where, values)
    if not values:
        return []
    counts = jnp.broadcast_to(jnp.asarray(counts, jnp.int32), (num_groups,))
    counts = jnp.minimum(counts, eligible_counts(values, where, groups))
    if formulations.current_formulations().select == "sort":
        masks: list[Array | None] = [None] * len(values)
        for group in range(num_groups):
            leaves = [i for i, g in enumerate(groups) if g == group]
            chosen = _sort_select([values[i] for i in leaves],
                                  [where[i] for i in leaves], counts[group])
            for i, mask in zip(leaves, chosen):
                masks[i] = mask
        return masks

    def search(leaves, sub_counts, sub_groups, sub_num_groups):
        return _search_smallest([values[i] for i in leaves], sub_counts,
                                [where[i] for i in leaves], sub_groups,
                                sub_num_groups)

    return _dispatch(values, counts, where, groups, num_groups, search)


def _search_smallest(values: Sequence[Array], counts: Array,
                     where: Sequence[Array | None], groups: Sequence[int],
                     num_groups: int) -> list[Array]:
    threshold = _threshold(values, counts, where, groups, num_groups)
    below = [(v < threshold[g]) if w is None else (v < threshold[g]) & w
             for v, w, g in zip(values, where, groups)]
    equal = [(v == threshold[g]) if w is None else (v == threshold[g]) & w
             for v, w, g in zip(values, where, groups)]
    n_below = _per_group([jnp.sum(b, dtype=jnp.int32) for b in below],
                         groups, num_groups)
    n_equal = _per_group([jnp.sum(e, dtype=jnp.int32) for e in equal],
                         groups, num_groups)
    extra = counts - n_below
    needs_tiebreak = (extra > 0) & (n_equal > extra)

    offsets, sizes = [], [0] * num_groups
    for v, g in zip(values, groups):
        offsets.append(sizes[g])
        sizes[g] += int(v.size)
    index_bits = max(1, max(sizes).bit_length())

    def positions(leaf: int) -> Array:
        return lax.iota(jnp.int32, int(values[leaf].size)) + offsets[leaf]

    def keep_going(state):
        bit, _ = state
        return (bit >= 0) & jnp.any(needs_tiebreak)

    def step(state):
        bit, limit = state
        candidate = limit | jnp.left_shift(jnp.int32(1), bit)
        within = _per_group(
            [jnp.sum(e & (positions(i) < candidate[g]), dtype=jnp.int32)
             for i, (e, g) in enumerate(zip(equal, groups))],
            groups, num_groups)
        limit = jnp.where(needs_tiebreak & (within <= extra), candidate,
                          limit)
        return bit - 1, limit

    _, limit = lax.while_loop(
        keep_going, step,
        (jnp.int32(index_bits - 1), jnp.zeros((num_groups,), jnp.int32)))
    take_all_ties = extra >= n_equal
    return [b | (e & (take_all_ties[g] | (positions(i) < limit[g])))
            for i, (b, e, g) in enumerate(zip(below, equal, groups))]


def _sort_select(values: Sequence[Array], where: Sequence[Array | None],
                 count: Array) -> list[Array]:
    # One group's `count` smallest candidates (count <= candidates), ties
    # to the lowest position. The count-th smallest candidate value is the
    # threshold: non-candidates are parked at 0xFFFFFFFF, which no value
    # exceeds, so they cannot move it. Every candidate below the threshold
    # is chosen and, of those equal to it, the first `count - below` in
    # position order (a running count of the equal ones).
    total = sum(int(v.shape[0]) for v in values)
    if total == 0:
        return [jnp.zeros(v.shape, jnp.bool_) for v in values]
    flat = jnp.concatenate(values) if len(values) > 1 else values[0]
    candidate = None
    if any(w is not None for w in where):
        candidate = jnp.concatenate(
            [jnp.ones(v.shape, jnp.bool_) if w is None else w
             for v, w in zip(values, where)])
        flat = jnp.where(candidate, flat, jnp.uint32(_UINT32_MAX))
    ordered = jnp.sort(flat)
    threshold = lax.dynamic_index_in_dim(ordered, jnp.maximum(count - 1, 0),
                                         keepdims=False)
    below = flat < threshold
    equal = flat == threshold
    if candidate is not None:
        equal = equal & candidate
    extra = count - jnp.sum(below, dtype=jnp.int32)
    chosen = below | (equal & (jnp.cumsum(equal, dtype=jnp.int32) <= extra))
    return _split(chosen, [v.shape[0] for v in values])


def magnitude_bits(x: Array) -> Array:
    """Flat ``uint32`` keys ordered as ``|x|`` (NaN above inf).

    For non-negative IEEE floats the bit pattern, read as an unsigned
    integer, orders exactly as the value; narrower floats are widened to
    float32 first, which is exact.
    """
    magnitude = jnp.abs(jnp.ravel(x).astype(jnp.float32))
    # abs() of NaN keeps its payload; canonicalise so every NaN is equal.
    magnitude = jnp.where(jnp.isnan(magnitude), jnp.float32(np.nan),
                          magnitude)
    return lax.bitcast_convert_type(magnitude, jnp.uint32)


def select_largest_magnitude(leaves: Sequence[Array], counts: Array, *,
                             where: Sequence[Array | None] | None = None,
                             groups: Sequence[int] | None = None
                             ) -> list[Array]:
    """Exactly ``counts[g]`` entries of largest ``|x|`` in each group.

    NaN entries count as the largest. Ties go to the lowest flat index.

    Args:
        leaves: arrays of any shape (flattened in order).
        counts: traced counts per group.
        where: optional flat candidate masks.
        groups: group id of each leaf.

    Returns:
        One flat boolean mask per leaf.
    """
    keys = [~magnitude_bits(leaf) for leaf in leaves]
    return select_smallest(keys, counts, where=where, groups=groups)


def select_smallest_magnitude(leaves: Sequence[Array], counts: Array, *,
                              where: Sequence[Array | None] | None = None,
                              groups: Sequence[int] | None = None
                              ) -> list[Array]:
    """Exactly ``counts[g]`` entries of smallest ``|x|`` in each group.

    Ties go to the lowest flat index; NaN entries are chosen last.
    """
    keys = [magnitude_bits(leaf) for leaf in leaves]
    return select_smallest(keys, counts, where=where, groups=groups)
