"""Number formats as deployed: the stored codes that hardware faults hit.

A model trained in float32 is usually deployed in a smaller format, and a
fault in memory flips a bit of *that* representation, not of the float32
weight. A :class:`Format` says how a floating-point leaf is stored:

==================  =====  ==========================================  ======
name                bits   stored code                                 scale
==================  =====  ==========================================  ======
``float32``         32     the value itself                            none
``bfloat16``        16     the value rounded to bfloat16               none
``float16``         16     the value rounded to float16                none
``float8_e4m3``     8      ``x / s`` in float8 e4m3 (``e4m3fn``:       yes
                           finite, 448 at most)
``float8_e5m2``     8      ``x / s`` in float8 e5m2                    yes
``int8``            8      ``round(x / s)``, two's complement          yes
``int4``            4      ``round(x / s)``, two's complement          yes
==================  =====  ==========================================  ======

The scaled formats are symmetric quantization by `qwix
<https://github.com/google/qwix>`_ (``qwix.quantize``, absmax calibration):
``s`` maps the largest magnitude to the format's bound, one scale per
tensor (``granularity="tensor"``) or per output channel
(``granularity="channel"``: one per entry of the leaf's last axis, the
output features of a flax kernel; a leaf of one axis, a bias, keeps one
scale). The scales are computed from the leaf being encoded and are not
themselves damaged. The float8 types come from ``ml_dtypes`` through JAX.

:func:`encode` gives the codes as unsigned integers of the format's width
(``uint32``, ``uint16`` or ``uint8``; an ``int4`` code sits in the low 4
bits of a ``uint8``) and :func:`decode` turns codes back into values, so a
fault is a bitwise operation on the codes between the two, with bit
positions counted in the format's own layout (:attr:`Format.layout`: 0 is
the least significant bit of the code). :func:`deploy` is the model as the
format stores it, with no fault: the clean reference of a deployed model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from recovjax._types import Array, Params

GRANULARITIES = ("tensor", "channel")


class BitLayout(NamedTuple):
    """Where the fields of a stored format sit in its bits.

    Attributes:
        uint: the unsigned integer dtype that holds one code.
        width: bits per code.
        sign: position of the sign bit (0 = least significant bit).
        exponent: positions of the exponent bits (``()`` for integers).
        mantissa: positions of the mantissa (fraction) bits (``()`` for
            integers).
    """

    uint: object
    width: int
    sign: tuple[int, ...]
    exponent: tuple[int, ...]
    mantissa: tuple[int, ...]


def _float_layout(width: int, mantissa: int, uint) -> BitLayout:
    return BitLayout(uint=uint, width=width, sign=(width - 1,),
                     exponent=tuple(range(mantissa, width - 1)),
                     mantissa=tuple(range(mantissa)))


class Format(NamedTuple):
    """How a floating-point leaf is stored (see the module docstring).

    Attributes:
        name: the format's name (:data:`FORMATS`).
        layout: its :class:`BitLayout`.
        dtype: the JAX dtype of the stored value (``jnp.int4`` for int4).
        scaled: whether values are divided by a scale before storing.
        granularity: ``"tensor"`` or ``"channel"`` (scaled formats; always
            ``"tensor"`` for the others).
    """

    name: str
    layout: BitLayout
    dtype: Any
    scaled: bool
    granularity: str = "tensor"

    @property
    def integer(self) -> bool:
        """Whether the codes are two's-complement integers."""
        return not self.layout.exponent


_FORMATS = {
    "float32": Format("float32", _float_layout(32, 23, jnp.uint32),
                      jnp.float32, False),
    "bfloat16": Format("bfloat16", _float_layout(16, 7, jnp.uint16),
                       jnp.bfloat16, False),
    "float16": Format("float16", _float_layout(16, 10, jnp.uint16),
                      jnp.float16, False),
    "float8_e4m3": Format("float8_e4m3", _float_layout(8, 3, jnp.uint8),
                          jnp.float8_e4m3fn, True),
    "float8_e5m2": Format("float8_e5m2", _float_layout(8, 2, jnp.uint8),
                          jnp.float8_e5m2, True),
    "int8": Format("int8", BitLayout(jnp.uint8, 8, (7,), (), ()), jnp.int8,
                   True),
    "int4": Format("int4", BitLayout(jnp.uint8, 4, (3,), (), ()), jnp.int4,
                   True),
}

FORMATS = tuple(_FORMATS)
"""The names :func:`get_format` knows."""


def get_format(name: Any, granularity: str = "tensor") -> Format:
    """The :class:`Format` called ``name``.

    Args:
        name: one of :data:`FORMATS`, or a :class:`Format` (returned as
            it is when ``granularity`` is left at its default).
        granularity: ``"tensor"`` or ``"channel"``; only scaled formats
            take ``"channel"``.

    Raises:
        ValueError: for an unknown name or granularity, or a channel
            granularity for a format without a scale.
    """
    if isinstance(name, Format):
        if granularity == "tensor":
            return name
        name = name.name
    if not isinstance(name, str) or name not in _FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got "
                         f"{name!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of "
                         f"{', '.join(GRANULARITIES)}; got {granularity!r}")
    fmt = _FORMATS[name]
    if granularity == "channel" and not fmt.scaled:
        raise ValueError(f"granularity='channel' needs a scaled format "
                         f"(float8_e4m3, float8_e5m2, int8, int4); {name} "
                         "has no scale")
    return fmt._replace(granularity=granularity)


def format_of_dtype(dtype) -> Format:
    """The unscaled format of a floating dtype (float32, bfloat16, float16).

    Raises:
        TypeError: for any other dtype.
    """
    dtype = jnp.dtype(dtype)
    for fmt in _FORMATS.values():
        if not fmt.scaled and jnp.dtype(fmt.dtype) == dtype:
            return fmt
    raise TypeError(f"bit faults in a leaf's own dtype support float32, "
                    f"bfloat16 and float16, not {dtype}; deploy it in a "
                    f"format (format=one of {', '.join(FORMATS)})")


class Encoded(NamedTuple):
    """A leaf as a format stores it.

    Attributes:
        codes: the stored codes, unsigned, with the leaf's shape.
        scale: float32 scales that broadcast against the leaf (``None``
            for unscaled formats).
    """

    codes: Array
    scale: Array | None


def _channel_axes(x: Array, fmt: Format) -> tuple[int, ...]:
    return (x.ndim - 1,) if fmt.granularity == "channel" and x.ndim > 1 \
        else ()


def encode(x: Array, fmt: Format) -> Encoded:
    """The stored codes (and scales) of a floating array in ``fmt``.

    Raises:
        TypeError: for an array that is not floating-point.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"deploying in {fmt.name} needs floating-point "
                        f"values, not {x.dtype}")
    if not fmt.scaled:
        return Encoded(lax.bitcast_convert_type(x.astype(fmt.dtype),
                                                fmt.layout.uint), None)
    import qwix
    quantized = qwix.quantize(x.astype(jnp.float32), fmt.dtype,
                              channelwise_axes=_channel_axes(x, fmt))
    value = quantized.qvalue
    if fmt.name == "int4":
        codes = (value.astype(jnp.int8) & 0xF).astype(jnp.uint8)
    else:
        codes = lax.bitcast_convert_type(value, fmt.layout.uint)
    return Encoded(codes, quantized.scale)


def codes_at_scale(x: Array, fmt: Format, scale: Array | None) -> Array:
    """The codes of ``x`` in ``fmt`` with given scales (those of another
    encoding, such as the clean weights'), rounded to nearest and clipped
    to the format's range.

    For values a decoding produced with the same scales this recovers the
    codes exactly: ``x / scale`` lands within an ulp of the integer (or
    float8 value) it was made from.
    """
    x = jnp.asarray(x, jnp.float32)
    if not fmt.scaled:
        return lax.bitcast_convert_type(x.astype(fmt.dtype),
                                        fmt.layout.uint)
    value = x / scale
    if fmt.name in ("int8", "int4"):
        bound = 2 ** (fmt.layout.width - 1)
        value = jnp.clip(jnp.round(value), -bound, bound - 1).astype(
            jnp.int8)
        if fmt.name == "int4":
            return (value & 0xF).astype(jnp.uint8)
        return lax.bitcast_convert_type(value, jnp.uint8)
    return lax.bitcast_convert_type(value.astype(fmt.dtype), fmt.layout.uint)


def decode(encoded: Encoded, fmt: Format, dtype) -> Array:
    """Values of ``dtype`` from stored codes (the inverse of :func:`encode`
    up to the format's rounding)."""
    codes = encoded.codes
    if fmt.name == "int4":
        low = (codes & 0xF).astype(jnp.int8)
        value = jnp.where(low >= 8, low - 16, low).astype(jnp.float32)
    else:
        value = lax.bitcast_convert_type(
            codes.astype(fmt.layout.uint), fmt.dtype).astype(jnp.float32)
    if encoded.scale is not None:
        value = value * encoded.scale
    return value.astype(dtype)


def deploy(params: Params, fmt: Format | str, granularity: str = "tensor"
           ) -> Params:
    """``params`` as ``fmt`` stores them (no fault): each floating leaf
    encoded and decoded back to its own dtype; other leaves unchanged.

    The entries a bit fault in ``fmt`` does not hit equal these up to the
    float32 rounding of the scale (the two are separate compiled programs).
    """
    fmt = get_format(fmt, granularity)
    stored = jax.jit(lambda leaf: decode(encode(leaf, fmt), fmt, leaf.dtype))

    def one(leaf):
        leaf = jnp.asarray(leaf)
        return stored(leaf) if jnp.issubdtype(leaf.dtype, jnp.floating) \
            else leaf

    return jax.tree.map(one, params)


def bit_positions(fmt: Format, bits) -> tuple[int, ...]:
    """Positions (0 = least significant) that ``bits`` covers in ``fmt``.

    Args:
        fmt: the format.
        bits: ``"any"``, ``"sign"``, ``"exponent"``, ``"mantissa"`` (the
            last two for float formats) or one bit position.

    Raises:
        ValueError: for a field the format has not, or a position outside
            its width.
    """
    layout = fmt.layout
    if bits == "any":
        return tuple(range(layout.width))
    if isinstance(bits, str):
        positions = getattr(layout, bits)
        if not positions:
            raise ValueError(f"bits={bits!r}: {fmt.name} codes are "
                             "two's-complement integers with no such field "
                             "(use 'any', 'sign' or a bit position)")
        return positions
    if not 0 <= bits < layout.width:
        raise ValueError(f"bits={bits} is not a bit position of {fmt.name} "
                         f"(0..{layout.width - 1})")
    return (int(bits),)


__all__ = ["BitLayout", "Encoded", "FORMATS", "Format", "GRANULARITIES",
           "bit_positions", "decode", "deploy", "encode", "format_of_dtype",
           "get_format"]
