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
  threshold ``t`` with exactly ``k`` draws below it: a bitwise binary
  search over the draws' high 16 bits (16 counting passes of ``O(n)``,
  over uint16 data, folded with elementwise adds because XLA:CPU reduces
  slowly), then one ``top_k`` over the few entries (about ``n / 2**16``)
  that share the threshold's high bits. Because the draws are distinct,
  ``k`` draws below ``t`` always exists and no tie-breaking is needed.
  Groups of at most :data:`SORT_LIMIT` entries are ranked by one sort,
  which is as fast there and compiles much faster; the result is the same.
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
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from recovjax._types import Array, PRNGKey

MAX_ENTRIES = 2**32
"""Most candidate entries one call of :func:`draw_bits` can number."""

_UINT32_MAX = 0xFFFFFFFF


# --------------------------------------------------------------------------
# Amounts and keys at the API boundary.
# --------------------------------------------------------------------------


def check_key(key: PRNGKey) -> PRNGKey:
    """Check that ``key`` is a typed key from :func:`jax.random.key`.

    Args:
        key: the key handed to an operator (a tracer under ``jit``/``vmap``
            is checked by its dtype only).

    Returns:
        ``key`` unchanged.

    Raises:
        TypeError: for integers, raw ``uint32`` key data (``PRNGKey``) and
            anything else that is not a typed key.
    """
    dtype = getattr(key, "dtype", None)
    if dtype is None or not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        raise TypeError(
            "key must be a typed key from jax.random.key(seed) (convert an "
            f"integer seed at the boundary), got {type(key).__name__}"
            + (f" of dtype {dtype}" if dtype is not None else ""))
    if getattr(key, "shape", ()) != ():
        raise TypeError(f"key must be a single key, got a key array of shape "
                        f"{key.shape}; vmap over the keys instead")
    return key


def check_amount(amount, *, name: str, fraction: bool) -> Array:
    """Validate a concrete damage amount; pass a traced one through.

    Concrete amounts (Python or NumPy numbers, concrete arrays) are checked
    before any tracing: they must be finite real scalars, at least 0, and at
    most 1 when they are fractions. Traced amounts (inside ``jit``/``vmap``)
    cannot be checked; the kernels then clip fractions to ``[0, 1]`` and read
    a NaN fraction as 0 (see :func:`sanitize_fraction`).

    Args:
        amount: the ratio, rate or scale handed to an operator.
        name: the argument's name, used in error messages.
        fraction: whether ``amount`` is a fraction in ``[0, 1]``.

    Returns:
        ``amount`` as a ``float32`` scalar array (concrete or traced), so
        that ``0``, ``0.5`` and ``np.float64(1)`` all reuse one compiled
        program.

    Raises:
        ValueError: if a concrete amount is not a scalar, is NaN or
            infinite, is negative, or exceeds 1 where a fraction is meant.
        TypeError: if the amount is not a real number (e.g. a string or a
            complex number).
    """
    if isinstance(amount, jax.core.Tracer):
        if amount.shape != ():
            raise ValueError(f"{name} must be a scalar, got shape "
                             f"{amount.shape}; vmap over {name} instead")
        return amount.astype(jnp.float32)
    if isinstance(amount, (str, bytes)) or isinstance(amount, complex):
        raise TypeError(f"{name} must be a real number, got {amount!r}")
    value = np.asarray(amount)
    if value.shape != ():
        raise ValueError(f"{name} must be a scalar, got shape {value.shape}; "
                         f"vmap over {name} instead")
    if not (np.issubdtype(value.dtype, np.floating)
            or np.issubdtype(value.dtype, np.integer)
            or value.dtype == np.bool_):
        raise TypeError(f"{name} must be a real number, got {amount!r}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{name} must be a number, got NaN")
    if math.isinf(number):
        raise ValueError(f"{name} must be finite, got {number}")
    if number < 0:
        raise ValueError(f"{name} must be non-negative, got {number}")
    if fraction and number > 1:
        raise ValueError(f"{name} is a fraction and must be in [0, 1], "
                         f"got {number}")
    return jnp.asarray(number, jnp.float32)


def sanitize_fraction(fraction: Array) -> Array:
    """Clip a (traced) fraction to ``[0, 1]``; NaN becomes 0."""
    fraction = jnp.asarray(fraction, jnp.float32)
    return jnp.where(jnp.isnan(fraction), 0.0, jnp.clip(fraction, 0.0, 1.0))


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
    """Distinct pseudo-random ``uint32`` draws, one flat array per size.

    Entry ``i`` of the concatenation of all arrays is a keyed bijection of
    ``i``, so no two draws of one call are equal. The same key and stream
    give the same draws; draws for a prefix of ``sizes`` do not depend on
    later sizes.

    Args:
        key: typed key.
        sizes: number of draws wanted for each array (static).
        stream: static stream number (see :func:`stream_seeds`).

    Returns:
        One ``uint32[size]`` array per size.

    Raises:
        ValueError: if the sizes add up to more than ``2**32``.
    """
    total = sum(int(size) for size in sizes)
    if total > MAX_ENTRIES:
        raise ValueError(f"cannot draw {total} distinct uint32 values "
                         f"(at most {MAX_ENTRIES})")
    return _draw_from_seeds(stream_seeds(key, stream), sizes)


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


_SUM_WIDTH = 128
_MAX_HALVINGS = 7  # uint8 partial counts hold up to 2**7 ones.


def _halvings(size: int) -> int:
    levels = 0
    while levels < _MAX_HALVINGS and size >> (levels + 1) >= _SUM_WIDTH:
        levels += 1
    return levels


def _count_true(mask: Array, levels: int) -> Array:
    # XLA:CPU vectorises elementwise code well and long reductions poorly, so
    # fold the array in halves with elementwise uint8 adds before the final
    # (short) reduction: several times faster than one jnp.sum. The tail
    # that does not fill a whole fold is summed apart (padding the array
    # instead costs a copy in every pass).
    size = mask.shape[0]
    folded = (size >> levels) << levels
    x = mask[:folded].astype(jnp.uint8)
    for _ in range(levels):
        half = x.shape[0] // 2
        x = x[:half] + x[half:]
    total = jnp.sum(x, dtype=jnp.int32)
    if folded < size:
        total = total + jnp.sum(mask[folded:], dtype=jnp.int32)
    return total


def _search16(halves: Sequence[Array], levels: Sequence[int],
              base: Sequence[Array], counts: Sequence[Array],
              groups: Sequence[int]) -> tuple[list[Array], list[Array]]:
    # Per group, the largest c in [0, 2**16) with base + #{h < c} <= count,
    # bit by bit from the top, and that number #{h < c}. Groups are kept as
    # separate scalars so that each count stays a plain fused reduction.
    num_groups = len(counts)

    def step(index, state):
        prefixes, belows = state
        bit = jnp.left_shift(jnp.uint16(1), (15 - index).astype(jnp.uint16))
        candidates = [prefix | bit for prefix in prefixes]
        totals = [jnp.zeros((), jnp.int32)] * num_groups
        for h, level, g in zip(halves, levels, groups):
            totals[g] = totals[g] + _count_true(h < candidates[g], level)
        accept = [b + t <= c for b, t, c in zip(base, totals, counts)]
        return ([jnp.where(a, c, p)
                 for a, c, p in zip(accept, candidates, prefixes)],
                [jnp.where(a, t, b)
                 for a, t, b in zip(accept, totals, belows)])

    start = ([jnp.zeros((), jnp.uint16)] * num_groups,
             [jnp.zeros((), jnp.int32)] * num_groups)
    return lax.fori_loop(0, 16, step, start)


def _threshold(values: Sequence[Array], counts: Array,
               where: Sequence[Array | None], groups: Sequence[int],
               num_groups: int) -> Array:
    # Per group, the largest t with #{v < t} <= count. Found 16 bits at a
    # time: first over the high halves, then over the low halves of the
    # entries whose high half equals the first answer (the others are
    # parked at 0xFFFF, which no candidate exceeds): 32 counting passes
    # over uint16 data in all, every array and group in the same loop.
    levels = [_halvings(v.shape[0]) for v in values]
    parked = [v if w is None else jnp.where(w, v, jnp.uint32(_UINT32_MAX))
              for v, w in zip(values, where)]
    high = [(v >> 16).astype(jnp.uint16) for v in parked]
    counts = [counts[g] for g in range(num_groups)]
    zero = [jnp.zeros((), jnp.int32)] * num_groups
    top, below = _search16(high, levels, zero, counts, groups)
    low = [jnp.where(h == top[g], (v & 0xFFFF).astype(jnp.uint16),
                     jnp.uint16(0xFFFF))
           for v, h, g in zip(parked, high, groups)]
    bottom, _ = _search16(low, levels, below, counts, groups)
    top, bottom = jnp.stack(top), jnp.stack(bottom)
    return (top.astype(jnp.uint32) << 16) | bottom.astype(jnp.uint32)


def _capacity(size: int) -> int:
    # How many entries of the threshold's high-half bucket are kept for the
    # low-half step. The bucket holds about 1 + size / 2**16 entries and
    # only the needed rank, below that, must fit.
    expected = size / 65536.0
    return int(min(size, 16 + math.ceil(2 * expected
                                        + 8 * math.sqrt(expected))))


def _park(values: Sequence[Array], where: Sequence[Array | None]
          ) -> list[Array]:
    # Non-candidates hold 0xFFFFFFFF, which no threshold exceeds.
    return [v if w is None else jnp.where(w, v, jnp.uint32(_UINT32_MAX))
            for v, w in zip(values, where)]


def _threshold_distinct(draws: Sequence[Array],
                        redraw: Callable[[Array], list[Array]],
                        counts: Array, where: Sequence[Array | None],
                        groups: Sequence[int], num_groups: int) -> Array:
    # As _threshold, for draws distinct within a group; redraw(salt) makes
    # them again when salt is 0. The high half takes 16 counting passes.
    # The entries whose high half is the answer are then few (about
    # size / 2**16), so one top_k gathers their smallest low halves and the
    # needed rank is read off, instead of 16 more passes. Should the rank
    # not fit (astronomically rare), a sort finds it, in a while_loop that
    # otherwise runs no iteration. That loop must not compute from loop
    # invariants only: XLA hoists loop-invariant work out of the loop and
    # would then run the sort every time. So it redraws, salted with the
    # loop's own (always false) flag.
    values = _park(draws, where)
    levels = [_halvings(v.shape[0]) for v in values]
    high = [(v >> 16).astype(jnp.uint16) for v in values]
    counts = [counts[g] for g in range(num_groups)]
    zero = [jnp.zeros((), jnp.int32)] * num_groups
    top, below = _search16(high, levels, zero, counts, groups)
    needed = [c - b for c, b in zip(counts, below)]

    smallest: list[list[Array]] = [[] for _ in range(num_groups)]
    capacity = [0] * num_groups
    for v, h, g in zip(values, high, groups):
        size = _capacity(v.shape[0])
        # Scores in [1, 2**16] are exact in float32, the top_k fast path.
        score = jnp.where(h == top[g],
                          65536.0 - (v & 0xFFFF).astype(jnp.float32), -1.0)
        smallest[g].append(65536.0 - lax.top_k(score, size)[0])
        capacity[g] = size if not capacity[g] else min(capacity[g], size)
    bottom, fits = [], []
    for g in range(num_groups):
        lows = (smallest[g][0] if len(smallest[g]) == 1
                else jnp.sort(jnp.concatenate(smallest[g])))
        low = lows[jnp.clip(needed[g], 0, lows.shape[0] - 1)]
        bottom.append(jnp.minimum(low, 65535.0).astype(jnp.uint16))
        fits.append(needed[g] < capacity[g])

    def sort_low_half(state):
        # The rare path: sort every group's low halves (entries outside
        # the bucket parked at 0xFFFF) and read the needed rank.
        done, bottom = state
        # `done` is False here, so the salt is 0, but XLA cannot know.
        values = _park(redraw(done.astype(jnp.uint32)), where)
        low = [[] for _ in range(num_groups)]
        for v, g in zip(values, groups):
            low[g].append(jnp.where((v >> 16).astype(jnp.uint16) == top[g],
                                    (v & 0xFFFF).astype(jnp.uint16),
                                    jnp.uint16(0xFFFF)))
        searched = []
        for g in range(num_groups):
            ranked = jnp.sort(jnp.concatenate(low[g]) if len(low[g]) > 1
                              else low[g][0])
            searched.append(ranked[jnp.clip(needed[g], 0,
                                            ranked.shape[0] - 1)])
        return jnp.bool_(True), [jnp.where(f, b, s) for f, b, s in
                                 zip(fits, bottom, searched)]

    all_fit = jnp.all(jnp.stack(fits))
    _, bottom = lax.while_loop(lambda state: ~(state[0] | all_fit),
                               sort_low_half, (jnp.bool_(False), bottom))
    top, bottom = jnp.stack(top), jnp.stack(bottom)
    return (top.astype(jnp.uint32) << 16) | bottom.astype(jnp.uint32)


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


def _sort_select_distinct(values: Sequence[Array],
                          where: Sequence[Array | None], count: Array
                          ) -> list[Array]:
    # One group of distinct values by sorting: below the count-th smallest.
    parked = _park(values, where)
    ranked = jnp.sort(jnp.concatenate(parked) if len(parked) > 1
                      else parked[0])
    threshold = ranked[jnp.clip(count, 0, ranked.shape[0] - 1)]
    everything = count >= eligible_counts(values, where, [0] * len(values))[0]
    return [((v < threshold) | everything) if w is None
            else ((v < threshold) | everything) & w
            for v, w in zip(values, where)]


def _dispatch(values: Sequence[Array], counts: Array,
              where: Sequence[Array | None], groups: Sequence[int],
              num_groups: int, search: Callable, distinct: bool = False
              ) -> list[Array]:
    # Small groups by one sort each; the others by `search` on the subset.
    small, large = _partition(values, groups, num_groups)
    masks: list[Array | None] = [None] * len(values)
    for g in small:
        leaves = [i for i, group in enumerate(groups) if group == g]
        rank = _sort_select_distinct if distinct else _rank_select
        chosen = rank([values[i] for i in leaves],
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
    ``counts[g]`` smallest of the distinct draws of :func:`draw_bits` for
    ``key``. For a group of more than :data:`SORT_LIMIT` entries the
    threshold below which exactly that many draws lie is found without
    sorting: a bitwise binary search over the draws' high 16 bits (16
    counting passes), then one ``top_k`` over the few entries sharing the
    threshold's high bits.

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
    counts = jnp.broadcast_to(jnp.asarray(counts, jnp.int32), (num_groups,))
    counts = jnp.minimum(counts, eligible_counts(shapes, where, groups))
    seeds = stream_seeds(key, SELECT_STREAM)
    draws = _draw_from_seeds(seeds, sizes)

    def search(leaves, sub_counts, sub_groups, sub_num_groups):
        sub_where = [where[i] for i in leaves]

        def redraw(salt):
            every = _draw_from_seeds(seeds ^ salt, sizes)
            return [every[i] for i in leaves]

        threshold = _threshold_distinct(
            [draws[i] for i in leaves], redraw, sub_counts, sub_where,
            sub_groups, sub_num_groups)
        # With distinct draws exactly `count` lie below the threshold,
        # except when every candidate is wanted and the top draw is
        # 2**32 - 1.
        everything = sub_counts >= eligible_counts(
            [draws[i] for i in leaves], sub_where, sub_groups)
        masks = []
        for i, w, g in zip(leaves, sub_where, sub_groups):
            mask = (draws[i] < threshold[g]) | everything[g]
            masks.append(mask if w is None else mask & w)
        return masks

    return _dispatch(draws, counts, where, groups, num_groups, search,
                     distinct=True)


def select_bernoulli(draws: Sequence[Array], rate: Array, *,
                     where: Sequence[Array | None] | None = None
                     ) -> list[Array]:
    """Each entry independently with probability ``rate``.

    Args:
        draws: flat ``uint32`` draws (e.g. from :func:`draw_bits`).
        rate: traced probability; clipped to ``[0, 1]`` (NaN = 0).
        where: optional candidate masks.

    Returns:
        One boolean mask per array.
    """
    where = _where(where, draws)
    rate = sanitize_fraction(rate)
    # rate * 2**32 is exact in float32 and below 2**32 for rate < 1.
    scaled = jnp.minimum(rate * jnp.float32(2.0 ** 32),
                         jnp.float32(_UINT32_MAX - 255))
    threshold = scaled.astype(jnp.uint32)
    every = rate >= 1.0
    masks = []
    for v, w in zip(draws, where):
        mask = (v < threshold) | every
        masks.append(mask if w is None else mask & w)
    return masks


def select_smallest(values: Sequence[Array], counts: Array, *,
                    where: Sequence[Array | None] | None = None,
                    groups: Sequence[int] | None = None) -> list[Array]:
    """Exactly ``counts[g]`` entries of each group with the smallest values.

    Ties are broken by position: within a group, entries are numbered
    through its arrays in order (flat index), and the lowest numbers win.
    Groups of more than :data:`SORT_LIMIT` entries are searched by bits
    like :func:`select_random`; ties straddling the threshold are then
    settled by a second search over position bits, inside a ``while_loop``
    that does no iteration unless such a tie exists.

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
