"""Memory-layout faults: damage that follows where the weights sit in memory.

DRAM faults are not spread uniformly over a model's parameters. Rowhammer
flips bits in the rows next to a hammered one, a failing row or bank
reads back stuck bits over a contiguous stretch, and a lost page reads back
as zeros. These operators see the parameters as the device stores them:
the leaves in scope serialised one after another, in flattening order, each
entry as its stored code (the leaf's own dtype, or a deployed format's
codes: :mod:`recovjax.damage.formats`), each leaf starting at a multiple of
its code's size. The buffer is cut into pages of ``page_bytes``.

* :func:`make_rowhammer`: a fraction of the pages is hit, and each hit page
  gets ``flips_per_page`` bit flips, one in each of that many equal
  stretches of the page (so the flips are distinct and spread over the
  page as a row's are).
* :func:`make_stuck_region`: one contiguous region, a fraction of the
  buffer long, starting at a uniformly drawn byte, whose bits all read
  ``value``.
* :func:`make_lost_pages`: a fraction of the pages reads back as zero
  bytes (a code of 0: the value 0 in every supported format).

The amount (a fraction of the pages, or of the buffer) is traced, so a
sweep compiles once. ``byte_order`` says which bits of a code a byte of the
buffer holds: ``"little"`` (x86, ARM, GPUs: the first byte holds the least
significant bits) or ``"big"``; it decides where a region's edge falls
inside a code and which bit of a code a flip at a buffer address hits.
Codes must be whole bytes (int4 codes, packed two to a byte, are refused).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from recovjax._types import Array, Damage, Params, PRNGKey
from recovjax.damage import compose, formats, select
from recovjax.damage.params import (DamageFn, check_choice, make_operator,
                                    operator_doc)
from recovjax.damage.scope import ScopeLike, parse_scope

BYTE_ORDERS = ("little", "big")
DEFAULT_PAGE_BYTES = 8192


class _Buffer:
    """Where each leaf in scope sits in the serialised buffer (static)."""

    def __init__(self, flat: compose.Leaves, fmt: formats.Format | None,
                 page_bytes: int):
        self.formats, self.starts, self.sizes, self.widths = [], [], [], []
        offset = 0
        for i in flat.chosen:
            leaf = flat.leaves[i]
            try:
                stored = fmt or formats.format_of_dtype(leaf.dtype)
            except TypeError as error:
                raise TypeError(f"leaf {flat.paths[i]!r}: {error}") from None
            if stored.layout.width % 8:
                raise ValueError(
                    f"leaf {flat.paths[i]!r}: memory-layout faults need "
                    f"codes of whole bytes; {stored.name} codes are "
                    f"{stored.layout.width} bits, packed")
            width = stored.layout.width // 8
            if page_bytes % width:
                raise ValueError(f"page_bytes: {page_bytes} is not a "
                                 f"multiple of {width}-byte codes")
            offset = -(-offset // width) * width  # aligned to its code
            self.formats.append(stored)
            self.starts.append(offset)
            self.sizes.append(int(leaf.size))
            self.widths.append(width)
            offset += int(leaf.size) * width
        if offset >= 2 ** 31:
            raise ValueError(f"scope: the leaves in scope take {offset} "
                             "bytes; memory-layout faults address buffers "
                             "below 2 GiB")
        self.total = offset
        self.page_bytes = page_bytes
        self.pages = max(1, -(-offset // page_bytes))

    def entry_bytes(self, position: int) -> np.ndarray:
        """First byte of every entry of the ``position``-th leaf."""
        return (self.starts[position]
                + np.arange(self.sizes[position], dtype=np.int64)
                * self.widths[position]).astype(np.int32)


def _bit_of(byte_in_code, bit_in_byte, width: int, byte_order: str):
    # Which bit of a code the bit_in_byte-th bit of its byte_in_code-th byte
    # (in buffer order) is.
    if byte_order == "little":
        return byte_in_code * 8 + bit_in_byte
    return (width - 1 - byte_in_code) * 8 + bit_in_byte


def _encode_all(flat, buffer, fmt):
    encoded = []
    for position, i in enumerate(flat.chosen):
        leaf = flat.leaves[i]
        if fmt is None:
            uint = buffer.formats[position].layout.uint
            encoded.append((jax.lax.bitcast_convert_type(leaf, uint), None))
        else:
            codes = formats.encode(leaf, fmt)
            encoded.append((codes.codes, codes))
    return encoded


def _decode(codes, encoded, leaf, fmt):
    if fmt is None:
        return jax.lax.bitcast_convert_type(codes, leaf.dtype)
    return formats.decode(encoded._replace(codes=codes), fmt, leaf.dtype)


def _memory_core(change, scope, fmt, page_bytes):
    # core(key, params, amount, infos): the leaves in scope encoded, their
    # codes rewritten by change(key, amount, buffer, codes) -> (codes,
    # hit masks), decoded back.
    def core(key: PRNGKey, params: Params, amount: Array, infos) -> Damage:
        flat = compose.flatten(params, scope, infos, amount)
        if fmt is not None:
            for i in flat.chosen:
                if not jnp.issubdtype(flat.leaves[i].dtype, jnp.floating):
                    raise TypeError(f"deploying in {fmt.name} needs floating-"
                                    f"point leaves; leaf {flat.paths[i]!r} "
                                    f"has dtype {flat.leaves[i].dtype}")
        buffer = _Buffer(flat, fmt, page_bytes)
        encoded = _encode_all(flat, buffer, fmt)
        codes, hits = change(key, flat.amounts, buffer,
                             [c.ravel() for c, _ in encoded])
        new, masks = {}, {}
        for position, i in enumerate(flat.chosen):
            leaf = flat.leaves[i]
            new[i] = _decode(codes[position].reshape(leaf.shape),
                             encoded[position][1], leaf, fmt)
            masks[i] = hits[position]
        return compose.assemble(flat, new, masks)
    return core


def _pages_hit(key: PRNGKey, buffer: _Buffer, rate: Array) -> Array:
    # Exactly floor(pages * rate) pages, uniformly without replacement.
    count = select.count_of(buffer.pages, rate)[None]
    (hit,) = select.select_random(key, [buffer.pages], count)
    return hit


def _check_common(page_bytes, byte_order, format, granularity, scope):
    if isinstance(page_bytes, bool) or not isinstance(
            page_bytes, (int, np.integer)) or page_bytes < 1:
        raise ValueError(f"page_bytes must be a positive int, got "
                         f"{page_bytes!r}")
    check_choice("byte_order", byte_order, BYTE_ORDERS)
    fmt = None if format is None else formats.get_format(format, granularity)
    if fmt is None and granularity != "tensor":
        raise ValueError(f"granularity={granularity!r} needs a scaled "
                         "format (format='int8', ...)")
    return fmt, parse_scope(scope)


_CALL = "op(key, params, rate, *, info=None) -> Damage"
_ONE_RATE = "a memory-layout fault takes one rate for the whole buffer"


def make_rowhammer(flips_per_page: int = 4, scope: ScopeLike = "all", *,
                   page_bytes: int = DEFAULT_PAGE_BYTES,
                   byte_order: Literal["little", "big"] = "little",
                   format: str | None = None, granularity: str = "tensor"
                   ) -> DamageFn:
    """Build clustered bit flips: a fraction of the pages, each hit many
    times.

    Args:
        flips_per_page: flips in every hit page (static); the page is cut
            into that many equal stretches of bits and each gets one flip
            at a uniformly drawn bit.
        scope: the leaves in the buffer (see :mod:`recovjax.damage.scope`).
        page_bytes: the page (or DRAM row) size.
        byte_order: ``"little"`` or ``"big"`` (see the module docstring).
        format: the deployed format of the leaves (``None``: their own
            dtypes).
        granularity: ``"tensor"`` or ``"channel"`` (scaled formats).

    Returns:
        ``op(key, params, rate, *, info=None) -> Damage``: ``rate`` is the
        fraction of pages hit (exactly ``floor(pages * rate)``, chosen
        uniformly); the mask marks entries with a flipped bit.

    Raises:
        ValueError: for a bad choice (now), or codes that are not whole
            bytes or a page size that is not a multiple of them (when
            called).
    """
    if isinstance(flips_per_page, bool) or not isinstance(
            flips_per_page, (int, np.integer)) or flips_per_page < 1:
        raise ValueError(f"flips_per_page must be a positive int, got "
                         f"{flips_per_page!r}")
    fmt, resolved = _check_common(page_bytes, byte_order, format,
                                  granularity, scope)
    per_page = int(flips_per_page)
    page_bits = page_bytes * 8
    if per_page > page_bits:
        raise ValueError(f"flips_per_page: {per_page} flips do not fit in a "
                         f"page of {page_bits} bits")

    def change(key, rate, buffer, codes):
        hit_pages = _pages_hit(key, buffer, rate)
        stretch = page_bits // per_page
        (draws,) = select.draw_bits(key, [buffer.pages * per_page],
                                    select.VALUE_STREAM)
        offsets = (jnp.arange(per_page, dtype=jnp.uint32) * stretch
                   + draws.reshape(buffer.pages, per_page)
                   % jnp.uint32(stretch))
        # Byte addresses (int32: buffers below 2 GiB) and bits within them.
        offsets = offsets.astype(jnp.int32).ravel()
        address = (jnp.repeat(jnp.arange(buffer.pages, dtype=jnp.int32),
                              per_page) * page_bytes + offsets // 8)
        bit_in_byte = offsets % 8
        live = jnp.repeat(hit_pages, per_page)
        out, hits = [], []
        for position, flat in enumerate(codes):
            width, start = buffer.widths[position], buffer.starts[position]
            uint = buffer.formats[position].layout.uint
            inside = address - start
            entry = inside // width
            in_leaf = live & (inside >= 0) & (entry < buffer.sizes[position])
            bit = _bit_of(inside % width, bit_in_byte, width, byte_order)
            index = jnp.where(in_leaf, entry, buffer.sizes[position])
            pattern = jnp.zeros(flat.shape, uint).at[index].add(
                jnp.left_shift(jnp.ones((), uint), bit.astype(uint)),
                mode="drop")
            out.append(flat ^ pattern)
            hits.append(pattern != 0)
        return out, hits

    core = _memory_core(change, resolved, fmt, page_bytes)
    return make_operator(core, name="rowhammer", amount_name="rate",
                         fraction=True, per_leaf=_ONE_RATE,
                         doc=operator_doc(make_rowhammer, dict(
                             flips_per_page=flips_per_page, scope=scope,
                             page_bytes=page_bytes, byte_order=byte_order,
                             format=format, granularity=granularity), _CALL))


def make_stuck_region(value: Literal[0, 1] = 1, scope: ScopeLike = "all", *,
                      byte_order: Literal["little", "big"] = "little",
                      format: str | None = None, granularity: str = "tensor"
                      ) -> DamageFn:
    """Build a contiguous stretch of memory whose bits all read ``value``.

    Args:
        value: 0 or 1.
        scope: the leaves in the buffer.
        byte_order: ``"little"`` or ``"big"``.
        format: the deployed format (``None``: the leaves' dtypes).
        granularity: ``"tensor"`` or ``"channel"``.

    Returns:
        ``op(key, params, ratio, *, info=None) -> Damage``: the region is
        ``floor(bytes * ratio)`` bytes long and starts at a byte drawn
        uniformly among those that keep it inside the buffer; the mask
        marks entries with a byte in it (whether or not its bits changed).

    Raises:
        ValueError: as :func:`make_rowhammer`, or for a value other than 0
            or 1.
    """
    if isinstance(value, bool) or value not in (0, 1):
        raise ValueError(f"value must be 0 or 1, got {value!r}")
    fmt, resolved = _check_common(DEFAULT_PAGE_BYTES, byte_order, format,
                                  granularity, scope)

    def change(key, ratio, buffer, codes):
        length = select.count_of(buffer.total, ratio)
        (draw,) = select.draw_bits(key, [1], select.VALUE_STREAM)
        room = jnp.maximum(buffer.total - length + 1, 1).astype(jnp.uint32)
        begin = (draw[0] % room).astype(jnp.int32)
        end = begin + length
        out, hits = [], []
        for position, flat in enumerate(codes):
            width = buffer.widths[position]
            uint = buffer.formats[position].layout.uint
            first = jnp.asarray(buffer.entry_bytes(position))
            pattern = jnp.zeros(flat.shape, uint)
            for byte in range(width):
                covered = (first + byte >= begin) & (first + byte < end)
                shift = _bit_of(byte, 0, width, byte_order)
                pattern = pattern | jnp.where(
                    covered, jnp.asarray(0xFF << shift, uint),
                    jnp.zeros((), uint))
            out.append(flat | pattern if value else flat & ~pattern)
            hits.append(pattern != 0)
        return out, hits

    core = _memory_core(change, resolved, fmt, DEFAULT_PAGE_BYTES)
    return make_operator(core, name=f"stick_region_at_{value}",
                         amount_name="ratio", fraction=True,
                         per_leaf=_ONE_RATE,
                         doc=operator_doc(make_stuck_region, dict(
                             value=value, scope=scope, byte_order=byte_order,
                             format=format, granularity=granularity),
                             "op(key, params, ratio, *, info=None) -> "
                             "Damage"))


def make_lost_pages(scope: ScopeLike = "all", *,
                    page_bytes: int = DEFAULT_PAGE_BYTES,
                    format: str | None = None, granularity: str = "tensor"
                    ) -> DamageFn:
    """Build the loss of whole pages: they read back as zero bytes.

    Args:
        scope: the leaves in the buffer.
        page_bytes: the page size.
        format: the deployed format (``None``: the leaves' dtypes).
        granularity: ``"tensor"`` or ``"channel"``.

    Returns:
        ``op(key, params, ratio, *, info=None) -> Damage``: exactly
        ``floor(pages * ratio)`` pages, chosen uniformly, are lost; the mask
        marks their entries.

    Raises:
        ValueError: as :func:`make_rowhammer`.
    """
    fmt, resolved = _check_common(page_bytes, "little", format, granularity,
                                  scope)

    def change(key, ratio, buffer, codes):
        lost = _pages_hit(key, buffer, ratio)
        out, hits = [], []
        for position, flat in enumerate(codes):
            page = jnp.asarray(buffer.entry_bytes(position) // page_bytes)
            gone = lost[page]
            out.append(jnp.where(gone, jnp.zeros((), flat.dtype), flat))
            hits.append(gone)
        return out, hits

    core = _memory_core(change, resolved, fmt, page_bytes)
    return make_operator(core, name="lose_pages", amount_name="ratio",
                         fraction=True, per_leaf=_ONE_RATE,
                         doc=operator_doc(make_lost_pages, dict(
                             scope=scope, page_bytes=page_bytes,
                             format=format, granularity=granularity),
                             "op(key, params, ratio, *, info=None) -> "
                             "Damage"))
