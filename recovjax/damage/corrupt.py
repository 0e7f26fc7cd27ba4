"""What a fault does to the values it hits: the corrupt half of an operator.

A damage operator is a *selection* (which entries, or which bits of which
entries: :mod:`recovjax.damage.compose`) followed by a *corruption* (what
happens to them). A :class:`Corruption` works on plain arrays, so the same
corruption serves parameter leaves, activations at a site
(:mod:`recovjax.damage.activations`) and the stored codes of a deployed
format::

    values = corruption.apply(key, values, masks, amounts)

``values`` is a list of arrays of any shapes, ``masks`` one boolean mask
per array (of its shape, with a trailing axis of :attr:`Corruption.cells`
when that is more than one per entry: bit faults select bit positions),
``amounts`` one
float32 scalar per array (the operator's amount: a noise corruption scales
by it, the others ignore it). Entries outside the mask come back bit for
bit. A corruption that draws uses stream
:data:`~recovjax.damage.select.VALUE_STREAM` of the key, the selection
stream :data:`~recovjax.damage.select.SELECT_STREAM`, so one key serves
both and every selecting operator chooses the same entries.

:func:`chain` applies several corruptions in order (as ``optax.chain``
composes transformations), the ``i``-th with ``fold_in(key, i)``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from recovjax._types import Array, PRNGKey
from recovjax.damage import formats, select

Apply = Callable[[PRNGKey, Sequence[Array], Sequence[Array],
                  Sequence[Array]], list]
"""``apply(key, values, masks, amounts) -> values`` (see the module
docstring)."""


def _one_cell(leaf: Array) -> int:
    return 1


class Corruption(NamedTuple):
    """What happens to the selected entries (see the module docstring).

    Attributes:
        name: what the corruption does, for messages (``"sign flip"``).
        apply: ``apply(key, values, masks, amounts) -> values``.
        cells: ``cells(leaf) -> int``: how many cells of each entry the
            selection chooses among (1, or the eligible bit positions of a
            bit fault); it may raise ``TypeError``/``ValueError`` for a leaf
            it cannot corrupt.
        floating: whether the values must be floating-point.
    """

    name: str
    apply: Apply
    cells: Callable[[Array], int] = _one_cell
    floating: bool = True


def require_floating(corruption: Corruption, values: Sequence[Array],
                     names: Sequence[str], *, noun: str = "leaf",
                     plural: str = "leaves") -> None:
    """Raise ``TypeError`` naming the first non-floating array it needs.

    Args:
        corruption: the corruption to apply.
        values: the arrays it is to corrupt.
        names: one name per array (a leaf path, a site), for the message.
        noun, plural: what the arrays are, for the message.
    """
    if not corruption.floating:
        return
    for value, name in zip(values, names):
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"{corruption.name} needs floating-point "
                            f"{plural}; {noun} {name!r} has dtype "
                            f"{value.dtype}")


def _where(masks, new, values) -> list:
    return [jnp.where(m, n, x) for m, n, x in zip(masks, new, values)]


def zero() -> Corruption:
    """Set the selected entries to 0."""
    def apply(key, values, masks, amounts):
        return [jnp.where(m, jnp.zeros((), x.dtype), x)
                for m, x in zip(masks, values)]
    return Corruption("zeroing", apply, floating=False)


def negate() -> Corruption:
    """Negate the selected entries (an entry equal to 0 changes sign)."""
    def apply(key, values, masks, amounts):
        return _where(masks, [-x for x in values], values)
    return Corruption("sign flip", apply)


def random_values(distribution: str) -> Corruption:
    """Overwrite the selected entries with draws from each array's spread.

    Args:
        distribution: ``"uniform"``: on ``[min, max]`` of the array;
            ``"normal"``: with its mean and standard deviation (computed on
            the array as given, before the corruption).
    """
    if distribution not in ("uniform", "normal"):
        raise ValueError(f"distribution must be 'uniform' or 'normal', got "
                         f"{distribution!r}")

    def apply(key, values, masks, amounts):
        sizes = [int(x.size) for x in values]
        if distribution == "uniform":
            draws = select.draw_uniform(key, sizes)
        else:
            draws = select.draw_normal(key, sizes)
        out = []
        for x, m, draw in zip(values, masks, draws):
            # Statistics over the flat array: its reduction order, and so
            # its rounding, does not depend on the array's shape.
            wide = x.ravel().astype(jnp.float32)
            if distribution == "uniform":
                low, high = jnp.min(wide), jnp.max(wide)
                new = low + (high - low) * draw
            else:
                new = jnp.mean(wide) + jnp.std(wide) * draw
            out.append(jnp.where(m, new.reshape(x.shape).astype(x.dtype),
                                 x))
        return out
    return Corruption(f"random {distribution} values", apply)


def gaussian_noise(relative: bool = True) -> Corruption:
    """Add ``amount * s * N(0, 1)``, ``s`` the array's standard deviation
    (``relative=True``) or 1, to the selected entries."""
    def apply(key, values, masks, amounts):
        noise = select.draw_normal(key, [int(x.size) for x in values])
        out = []
        for x, m, z, scale in zip(values, masks, noise, amounts):
            wide = x.ravel().astype(jnp.float32)
            spread = jnp.std(wide) if relative else jnp.float32(1.0)
            noisy = (wide + scale * spread * z).reshape(x.shape).astype(
                x.dtype)
            out.append(jnp.where(m, noisy, x))
        return out
    return Corruption("Gaussian noise", apply)


def multiplicative_noise() -> Corruption:
    """Multiply the selected entries by ``1 + amount * N(0, 1)``."""
    def apply(key, values, masks, amounts):
        noise = select.draw_normal(key, [int(x.size) for x in values])
        out = []
        for x, m, z, scale in zip(values, masks, noise, amounts):
            noisy = (x.astype(jnp.float32)
                     * (1.0 + scale * z.reshape(x.shape))).astype(x.dtype)
            out.append(jnp.where(m, noisy, x))
        return out
    return Corruption("multiplicative noise", apply)


def clip(low: Array, high: Array) -> Corruption:
    """Clip the selected entries to ``[low, high]`` (scalars or per entry).

    Range restriction and weight saturation are this corruption with the
    bounds of the clean model.
    """
    def apply(key, values, masks, amounts):
        return _where(masks, [jnp.clip(x, low, high).astype(x.dtype)
                              for x in values], values)
    return Corruption("clipping", apply)


BIT_FAULTS = ("flip", "stuck_at_0", "stuck_at_1")


def apply_bit_pattern(codes: Array, pattern: Array, fault: str) -> Array:
    """Flip (``"flip"``), clear (``"stuck_at_0"``) or set (``"stuck_at_1"``)
    the bits of ``pattern`` in ``codes`` (unsigned integers of one width).
    """
    if fault == "flip":
        return codes ^ pattern
    if fault == "stuck_at_1":
        return codes | pattern
    if fault == "stuck_at_0":
        return codes & ~pattern
    raise ValueError(f"fault must be one of {', '.join(BIT_FAULTS)}, got "
                     f"{fault!r}")


def bit_fault(fault: str, bits, fmt: formats.Format | None = None
              ) -> Corruption:
    """Flip or stick bits of the stored representation.

    The selection chooses among the eligible bit positions of each entry
    (:attr:`Corruption.cells`; its mask has a trailing axis of them). With
    ``fmt`` each array is stored in that format first
    (:func:`~recovjax.damage.formats.encode`), the bits of its codes are
    hit and it is decoded back to its dtype, so entries no fault hit carry
    the format's rounding; without, the bits are those of the array's own
    dtype (float32, bfloat16, float16).

    Args:
        fault: ``"flip"``, ``"stuck_at_0"`` or ``"stuck_at_1"``.
        bits: ``"any"``, ``"sign"``, ``"exponent"``, ``"mantissa"`` or one
            position, in the stored format's layout.
        fmt: the deployed format, or ``None``.
    """
    if fault not in BIT_FAULTS:
        raise ValueError(f"fault must be one of {', '.join(BIT_FAULTS)}, "
                         f"got {fault!r}")

    def format_of(leaf: Array) -> formats.Format:
        return fmt or formats.format_of_dtype(leaf.dtype)

    def cells(leaf: Array) -> int:
        return len(formats.bit_positions(format_of(leaf), bits))

    def apply(key, values, masks, amounts):
        out = []
        for x, chosen in zip(values, masks):
            stored = format_of(x)
            places = formats.bit_positions(stored, bits)
            uint = stored.layout.uint
            chosen = chosen.reshape(x.shape + (len(places),))
            weights = jnp.asarray([1 << p for p in places], uint)
            pattern = jnp.sum(jnp.where(chosen, weights, 0), axis=-1,
                              dtype=uint)
            if fmt is None:
                codes = lax.bitcast_convert_type(x, uint)
                out.append(lax.bitcast_convert_type(
                    apply_bit_pattern(codes, pattern, fault), x.dtype))
            else:
                encoded = formats.encode(x, fmt)
                codes = apply_bit_pattern(encoded.codes, pattern, fault)
                out.append(formats.decode(encoded._replace(codes=codes),
                                          fmt, x.dtype))
        return out

    name = {"flip": "bit flip", "stuck_at_0": "stuck-at-0",
            "stuck_at_1": "stuck-at-1"}[fault]
    if fmt is not None:  # the leaf is encoded before any bit is touched
        name = f"deploying in {fmt.name}"
    return Corruption(name, apply, cells, floating=fmt is not None)


def flip_one_bit(bits) -> Corruption:
    """Flip one eligible bit, drawn uniformly, of each selected entry.

    The single-bit fault model of PyTorchFI: a fault hits a value and flips
    one of its bits. One draw per entry (stream
    :data:`~recovjax.damage.select.VALUE_STREAM`) picks the position among
    the eligible ones (``bits``: ``"any"``, ``"sign"``, ``"exponent"``,
    ``"mantissa"`` or one position) of the value's own dtype.
    """

    def cells(leaf: Array) -> int:
        formats.bit_positions(formats.format_of_dtype(leaf.dtype), bits)
        return 1

    def apply(key, values, masks, amounts):
        draws = select.draw_bits(key, [int(x.size) for x in values],
                                 select.VALUE_STREAM)
        out = []
        for x, chosen, draw in zip(values, masks, draws):
            stored = formats.format_of_dtype(x.dtype)
            uint = stored.layout.uint
            places = jnp.asarray(formats.bit_positions(stored, bits),
                                 jnp.uint32)
            # A uniform index among the places: the top 24 bits of the
            # draw times their number, over 2**24 (bias below 2**-19).
            index = ((draw >> 8) * jnp.uint32(places.size)) >> 24
            bit = jnp.left_shift(jnp.ones((), uint),
                                 places[index].astype(uint)).reshape(x.shape)
            pattern = jnp.where(chosen, bit, jnp.zeros((), uint))
            codes = lax.bitcast_convert_type(x, uint)
            out.append(lax.bitcast_convert_type(codes ^ pattern, x.dtype))
        return out

    return Corruption("bit flip", apply, cells)


def flip_bit_at(fmt: formats.Format | None = None) -> Corruption:
    """Flip one bit of each selected entry: bit ``amount`` (a traced
    position, 0 = least significant, in the stored format's layout).

    The amount is the position, so a sweep over positions is one compiled
    program; a position at or beyond the format's width flips nothing.
    ``fmt`` is the deployed format, as for :func:`bit_fault`.
    """

    def apply(key, values, masks, amounts):
        out = []
        for x, chosen, position in zip(values, masks, amounts):
            stored = fmt or formats.format_of_dtype(x.dtype)
            uint = stored.layout.uint
            position = jnp.asarray(position).astype(jnp.int32)
            inside = (position >= 0) & (position < stored.layout.width)
            bit = jnp.left_shift(jnp.ones((), uint),
                                 jnp.clip(position, 0, stored.layout.width
                                          - 1).astype(uint))
            pattern = jnp.where(chosen & inside, bit, jnp.zeros((), uint))
            if fmt is None:
                codes = lax.bitcast_convert_type(x, uint)
                out.append(lax.bitcast_convert_type(codes ^ pattern, x.dtype))
            else:
                encoded = formats.encode(x, fmt)
                out.append(formats.decode(encoded._replace(
                    codes=encoded.codes ^ pattern), fmt, x.dtype))
        return out

    def cells(leaf: Array) -> int:
        if fmt is None:
            formats.format_of_dtype(leaf.dtype)  # a dtype with a layout
        return 1

    name = "bit flip" if fmt is None else f"deploying in {fmt.name}"
    return Corruption(name, apply, cells, floating=fmt is not None)


def chain(*corruptions: Corruption) -> Corruption:
    """Apply corruptions in order to the same selection.

    The ``i``-th gets ``fold_in(key, i)``; one corruption is returned as it
    is (same key, same output). All must select the same cells.

    Raises:
        ValueError: for no corruption.
    """
    if not corruptions:
        raise ValueError("chain needs at least one corruption")
    if len(corruptions) == 1:
        return corruptions[0]

    def cells(leaf: Array) -> int:
        counts = {c.cells(leaf) for c in corruptions}
        if len(counts) != 1:
            raise ValueError(f"chained corruptions select different cells "
                             f"per entry: {sorted(counts)}")
        return counts.pop()

    def apply(key, values, masks, amounts):
        for i, corruption in enumerate(corruptions):
            values = corruption.apply(jax.random.fold_in(key, i), values,
                                      masks, amounts)
        return values

    return Corruption(" then ".join(c.name for c in corruptions), apply,
                      cells, floating=any(c.floating for c in corruptions))
