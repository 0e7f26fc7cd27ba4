"""Layers whose formulation is chosen for speed on XLA:CPU and under vmap.

Convolutions are a GEMM of image-row slabs with a *band matrix* built from
the kernel (:func:`conv2d`): the output width is cut into tiles of ``tile``
columns, each output row of a tile is ``concat_i(x[h + i, tile span])``
times a ``[kh * span * C, tile * O]`` matrix holding the kernel on shifted
diagonals. Only ``kh`` shifted slabs are copied (no ``kh * kw``-fold im2col
tensor), and the work is a few large, well-shaped matmuls, which XLA:CPU
runs several times faster than ``lax.conv`` or im2col for the small
LeNet-style convolutions recovjax evaluates and trains, forward and
backward; under ``vmap`` over a stack of kernels it is a batched matmul
rather than a grouped convolution. The price is multiplying by the band's
zeros: ``(tile + kw - 1) / kw`` times the im2col FLOPs.
``benchmarks/bench_recovery.py`` and ``benchmarks/bench_sweep.py`` measure
the alternatives (``lax.conv``, im2col, full-width bands, tile sizes); the
default tile of 4 is what they kept.

Pooling is two pairwise maxima over wide contiguous vectors
(:func:`max_pool_2x2`), which XLA:CPU runs about 3x faster than a
reshape-and-reduce over a 6-channel minor axis, forward and backward.

:func:`patch_conv` is a drop-in for ``lax.conv_general_dilated`` that
flax's ``nn.Conv`` takes (``conv_general_dilated=patch_conv``): on CPU it
computes a convolution as one GEMM of the ``kh * kw`` shifted (and strided)
slices of the padded input (im2col), forward and backward; elsewhere it is
``lax.conv_general_dilated``. XLA:CPU's convolution is slow for the small
feature maps (4x4 and below) and strided convolutions of ResNet-18 on 28x28
images, where the GEMM is the faster formulation.

Training has a second layout. :func:`conv_relu_pool` computes a
convolution-ReLU-pooling block *batch-minor*: the same banded GEMM,
transposed, so that pooling, the ReLU and their gradients (the
column-to-image sums of the next block's input gradient included) run over
vectors thousands of elements long. :func:`conv_relu_pool_stack` evaluates
a stack of such blocks in the ``[N, H, W, C]`` layout, which compiles
fastest, and differentiates it in the batch-minor one, which trains
fastest; LeNet-5 uses it.

These are the ``"banded"`` formulation of convolutions, the default on
XLA:CPU. Under the ``"lax"`` formulation (the default on other backends;
see :mod:`recovjax.formulations`) :func:`conv2d` is
:func:`reference_conv2d` (``lax.conv_general_dilated``) and
:func:`conv_relu_pool_stack` composes it with the ReLU and
:func:`max_pool_2x2`, differentiated by JAX; the choice is read while a
function is traced. :func:`conv_relu_pool`, the batch-minor block itself,
is always banded.
"""

from __future__ import annotations

import functools
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recovjax import formulations
from recovjax._types import Array

DEFAULT_TILE = 4
"""Output columns per band tile; see the module docstring."""


def _pad_same(x: Array, kh: int, kw: int,
              padding: Literal["VALID", "SAME"]) -> Array:
    if padding == "SAME":
        return jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2),
                           ((kw - 1) // 2, kw // 2), (0, 0)))
    if padding != "VALID":
        raise ValueError(f"padding must be 'VALID' or 'SAME', got {padding!r}")
    return x


def extract_patches(x: Array, kernel_size: tuple[int, int],
                    padding: Literal["VALID", "SAME"] = "VALID") -> Array:
    """im2col: ``[N, H, W, C] -> [N, H', W', kh * kw * C]`` by shifted slices.

    The last axis is ordered ``(i, j, c)``, matching
    ``kernel.reshape(kh * kw * C, out)`` for an ``HWIO`` kernel.
    """
    kh, kw = kernel_size
    x = _pad_same(x, kh, kw, padding)
    height = x.shape[1] - kh + 1
    width = x.shape[2] - kw + 1
    slices = [x[:, i:i + height, j:j + width, :]
              for i in range(kh) for j in range(kw)]
    return jnp.concatenate(slices, axis=-1)


def band_matrix(kernel: Array, tile: int) -> Array:
    """The ``[kh * (tile + kw - 1) * C, tile * O]`` band of an HWIO kernel.

    Row ``(i, v, c)`` and column ``(w, o)`` hold ``kernel[i, v - w, c, o]``
    where ``0 <= v - w < kw``, and zero elsewhere.
    """
    kh, kw, cin, cout = kernel.shape
    span = tile + kw - 1
    shift = np.zeros((kw, span, tile), np.float32)
    for j in range(kw):
        shift[j, np.arange(tile) + j, np.arange(tile)] = 1.0
    band = jnp.einsum("ijco,jvw->ivcwo", kernel, shift.astype(kernel.dtype))
    return band.reshape(kh * span * cin, tile * cout)


def conv2d(x: Array, kernel: Array, bias: Array | None,
           padding: Literal["VALID", "SAME"] = "VALID",
           tile: int = DEFAULT_TILE) -> Array:
    """Stride-1 2-D convolution (cross-correlation) as a banded GEMM.

    Args:
        x: ``[N, H, W, C]``.
        kernel: ``[kh, kw, C, O]`` (HWIO).
        bias: ``[O]`` or ``None``.
        padding: ``"VALID"`` or ``"SAME"``.
        tile: output columns per band tile (the width is zero-padded up to
            a multiple of it and cropped afterwards).

    Returns:
        ``[N, H', W', O]``; equal to ``lax.conv_general_dilated`` with NHWC /
        HWIO layouts up to floating-point summation order. Under the
        ``"lax"`` formulation (:mod:`recovjax.formulations`) it is
        :func:`reference_conv2d` (``tile`` is then only checked).
    """
    if tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    if formulations.current_formulations().conv == "lax":
        if padding not in ("VALID", "SAME"):
            raise ValueError(f"padding must be 'VALID' or 'SAME', got "
                             f"{padding!r}")
        return reference_conv2d(x, kernel, bias, padding)
    kh, kw, cin, cout = kernel.shape
    x = _pad_same(x, kh, kw, padding)
    n, h, w, _ = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    tile = min(tile, wo)
    count = -(-wo // tile)
    span = tile + kw - 1
    extra = count * tile - wo
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0)))
    slabs = jnp.stack([
        jnp.stack([x[:, i:i + ho, t * tile:t * tile + span]
                   for i in range(kh)], axis=2)
        for t in range(count)], axis=2)  # [N, ho, tiles, kh, span, C]
    slabs = slabs.reshape(n * ho * count, kh * span * cin)
    y = (slabs @ band_matrix(kernel, tile)).reshape(n, ho, count * tile, cout)
    if extra:
        y = y[:, :, :wo]
    return y if bias is None else y + bias


_FLAX_2D = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1),
                                        (0, 3, 1, 2))
"""``NHWC`` / ``HWIO`` / ``NHWC``: the dimension numbers flax's ``nn.Conv``
passes for 2-D inputs."""


def _is_unit(dilation) -> bool:
    return dilation is None or all(int(d) == 1 for d in dilation)


def patch_conv(lhs: Array, rhs: Array, window_strides, padding, *,
               lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
               feature_group_count: int = 1, precision=None,
               preferred_element_type=None) -> Array:
    """``lax.conv_general_dilated`` as one GEMM of shifted slices on CPU.

    Takes ``lax.conv_general_dilated``'s arguments, so that it can be given
    to ``flax.linen.Conv(conv_general_dilated=patch_conv)``. Under the
    ``"banded"`` convolution formulation (the CPU default, see
    :mod:`recovjax.formulations`), a 2-D convolution with flax's
    ``NHWC``/``HWIO`` layout, no dilation and one feature group is computed
    as the ``[N * H' * W', kh * kw * C]`` matrix of the strided slices of
    the padded input (see :func:`extract_patches`) times the kernel
    reshaped to ``[kh * kw * C, O]``. Anything else, and the ``"lax"``
    formulation (the default on accelerators), calls
    ``lax.conv_general_dilated`` itself.

    Args:
        lhs: the input, ``[N, H, W, C]``.
        rhs: the kernel, ``[kh, kw, C, O]``.
        window_strides: ``(sh, sw)``.
        padding: ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left,
            right))``.
        lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
        precision, preferred_element_type: as ``lax.conv_general_dilated``.

    Returns:
        ``[N, H', W', O]``; equal to ``lax.conv_general_dilated`` up to
        floating-point summation order.
    """
    def reference() -> Array:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type)

    numbers = (None if dimension_numbers is None else
               jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                              dimension_numbers))
    if (formulations.current_formulations().conv == "lax" or lhs.ndim != 4
            or numbers != _FLAX_2D or feature_group_count != 1
            or not _is_unit(lhs_dilation) or not _is_unit(rhs_dilation)):
        return reference()
    kh, kw, channels, features = rhs.shape
    n, height, width, _ = lhs.shape
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads((height, width), (kh, kw), strides,
                                          padding)
    (top, bottom), (left, right) = padding
    out_height = (height + top + bottom - kh) // strides[0] + 1
    out_width = (width + left + right - kw) // strides[1] + 1
    x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    slices = [x[:, i:i + (out_height - 1) * strides[0] + 1:strides[0],
                j:j + (out_width - 1) * strides[1] + 1:strides[1], :]
              for i in range(kh) for j in range(kw)]
    patches = slices[0] if len(slices) == 1 else jnp.concatenate(slices, -1)
    y = jnp.matmul(patches.reshape(-1, kh * kw * channels),
                   rhs.reshape(kh * kw * channels, features),
                   precision=precision,
                   preferred_element_type=preferred_element_type)
    return y.reshape(n, out_height, out_width, features)


def max_pool_2x2(x: Array) -> Array:
    """2x2 max pooling with stride 2 (floor), as two pairwise maxima.

    Rows are paired first (a reshape that keeps ``W * C`` contiguous), then
    columns (the two halves of a ``2 * C`` minor axis), so both maxima run
    over wide contiguous vectors instead of a 6- or 16-wide channel axis.
    """
    n, h, w, c = x.shape
    h, w = h - h % 2, w - w % 2
    x = x[:, :h, :w].reshape(n, h // 2, 2, w * c)
    x = jnp.maximum(x[:, :, 0], x[:, :, 1]).reshape(n, h // 2, w // 2, 2 * c)
    return jnp.maximum(x[..., :c], x[..., c:])


def to_batch_minor(x: Array) -> Array:
    """``[N, H, W, C]`` -> the batch-minor ``[1, C, H, W, N]`` layout."""
    return jnp.transpose(x, (3, 1, 2, 0))[None]


def flatten_batch_minor(x: Array) -> Array:
    """Batch-minor ``[P, C, H, Wq, N]`` -> ``[(h, w, c) features, N]``.

    The features are ordered as ``x.reshape(N, -1)`` orders an
    ``[N, H, W, C]`` array, so dense weights are the same in both layouts.
    """
    parts, channels, height, quarter, batch = x.shape
    x = jnp.transpose(x, (2, 3, 0, 1, 4))
    return x.reshape(height * quarter * parts * channels, batch)


def conv_relu_pool(x: Array, kernel: Array, bias: Array,
                   tile: int = DEFAULT_TILE) -> Array:
    """``max_pool_2x2(relu(conv(x) + bias))`` in the batch-minor layout.

    The layout is ``[P, C, H, W / P, N]``: column ``w`` of channel ``c`` of
    image ``n`` is ``x[w % P, c, h, w // P, n]`` (:func:`to_batch_minor`
    gives ``P = 1``; this function returns ``P = tile / 2``, which the next
    call reads as it is). The convolution is the banded GEMM of
    :func:`conv2d`, transposed: the slab matrix is ``[kh * span * C, rows]``
    with rows ordered ``(row parity, row pair, tile, image)`` and the band's
    columns ``(column parity, column pair, channel)``, so the GEMM's output
    is ``[tile * O, rows]``, the two rows of every 2x2 window are its two
    column halves and the two columns its two row halves. Pooling, the ReLU
    and their gradients are then maxima and selects over contiguous vectors
    thousands of elements long; in the ``[N, H, W, C]`` layout the same work
    runs over 6- or 16-wide channel vectors and is several times slower on
    XLA:CPU, forward and backward. Only the rows and columns that pooling
    keeps are computed (odd sizes are floored, as in :func:`max_pool_2x2`).

    Args:
        x: ``[P, C, H, W / P, N]``.
        kernel: ``[kh, kw, C, O]`` (HWIO); VALID padding, stride 1.
        bias: ``[O]``.
        tile: output columns per band tile, even.

    Returns:
        ``[tile / 2, O, H', W' / (tile / 2), N]`` with ``H' = (H - kh + 1)
        // 2`` (and ``W'`` likewise), or ``[1, O, H', W', N]`` when ``tile /
        2`` does not divide ``W'``. Equal to the ``[N, H, W, C]`` composition
        up to floating-point summation order.

    Raises:
        ValueError: for an odd or non-positive ``tile``, an input too small
            for the kernel and the pooling, or channels that do not match.
    """
    if not isinstance(tile, int) or tile < 2 or tile % 2:
        raise ValueError(f"tile must be a positive even integer, got {tile!r}")
    parts, channels, height, quarter, batch = x.shape
    kh, kw, kernel_channels, features = kernel.shape
    if kernel_channels != channels:
        raise ValueError(f"kernel expects {kernel_channels} input channels, "
                         f"x has {channels}")
    width = parts * quarter
    pooled_h, pooled_w = (height - kh + 1) // 2, (width - kw + 1) // 2
    if pooled_h < 1 or pooled_w < 1:
        raise ValueError(f"input of {height}x{width} is too small for a "
                         f"{kh}x{kw} convolution and 2x2 pooling")
    tile = min(tile, 2 * pooled_w)
    count = -(-(2 * pooled_w) // tile)
    span = tile + kw - 1
    step = tile // parts if tile % parts == 0 else None
    if step is None:
        # The column interleave does not fit the tiles: undo it first.
        x = jnp.transpose(x, (1, 2, 3, 0, 4)).reshape(
            1, channels, height, width, batch)
        parts, quarter, step = 1, width, tile
    # Slab row (i, v, c), column (row parity, row pair, t, n) holds input
    # column t * tile + v of row 2 * pair + parity + i. One piece per (i,
    # v // P) holds all P column parities, so it is a strided view
    # transposed into place and the stack is the final layout (and its
    # gradient a handful of wide pads); ``span`` is rounded up to a multiple
    # of P with zero rows of the band.
    groups = -(-span // parts)
    needed = (count - 1) * step + groups
    if needed > quarter:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, needed - quarter),
                        (0, 0)))
    pieces = []
    for i in range(kh):
        rows = x[:, :, i:i + 2 * pooled_h].reshape(
            parts, channels, pooled_h, 2, x.shape[3], batch)
        for group in range(groups):
            pieces.append(rows[..., group:group + (count - 1) * step + 1:step,
                               :].transpose(0, 1, 3, 2, 4, 5))
    slabs = jnp.stack(pieces).reshape(kh * groups * parts * channels,
                                      2 * pooled_h * count * batch)
    band = band_matrix(kernel, tile).reshape(kh, span, channels,
                                             tile * features)
    band = jnp.pad(band, ((0, 0), (0, groups * parts - span), (0, 0),
                          (0, 0)))
    band = band.reshape(-1, tile // 2, 2, features)
    band = band.transpose(2, 1, 3, 0).reshape(tile * features, -1)
    y = jax.nn.relu(band @ slabs + jnp.tile(bias, tile)[:, None])
    half = y.shape[1] // 2
    y = jnp.maximum(y[:, :half], y[:, half:])            # row pairs
    half = y.shape[0] // 2
    y = jnp.maximum(y[:half], y[half:])                  # column pairs
    y = y.reshape(tile // 2, features, pooled_h, count, batch)
    if count * tile // 2 == pooled_w:
        return y
    y = jnp.transpose(y, (1, 2, 3, 0, 4)).reshape(
        1, features, pooled_h, count * tile // 2, batch)
    return y[:, :, :, :pooled_w]


def _nhwc_blocks(x: Array, layers: tuple[tuple[Array, Array], ...],
                 tile: int) -> Array:
    for kernel, bias in layers:
        x = max_pool_2x2(jax.nn.relu(conv2d(x, kernel, bias, "VALID", tile)))
    return x.reshape(x.shape[0], -1)


def _batch_minor_blocks(x: Array, layers: tuple[tuple[Array, Array], ...],
                        tile: int) -> Array:
    x = to_batch_minor(x)
    for kernel, bias in layers:
        x = conv_relu_pool(x, kernel, bias, tile)
    return flatten_batch_minor(x).T


def conv_relu_pool_stack(x: Array, layers: tuple[tuple[Array, Array], ...],
                         tile: int = DEFAULT_TILE) -> Array:
    """Conv-ReLU-pool blocks, evaluated NHWC and differentiated batch-minor.

    Evaluation runs the ``[N, H, W, C]`` banded GEMMs (:func:`conv2d`,
    :func:`max_pool_2x2`), which compile fastest and evaluate as fast as
    any layout. Under differentiation the forward pass and its gradient are
    those of :func:`conv_relu_pool` in the batch-minor layout, whose pooling
    and ReLU gradients run over long contiguous vectors and make a LeNet-5
    training step about a sixth cheaper on XLA:CPU
    (``benchmarks/bench_recovery.py`` measures both). The two agree up to
    floating-point summation order. Forward-mode differentiation
    (``jax.jvp``) is not available through the banded formulation.

    Under the ``"lax"`` formulation (:mod:`recovjax.formulations`) the
    blocks are ``max_pool_2x2(relu(lax.conv(x) + bias))``, evaluated and
    differentiated by JAX in one layout (``jax.jvp`` works).

    Args:
        x: ``[N, H, W, C]``.
        layers: ``((kernel, bias), ...)`` with HWIO kernels, VALID padding.
        tile: output columns per band tile (even).

    Returns:
        ``[N, H' * W' * O]``: the last block's output, flattened like
        ``reshape(N, -1)`` of its ``[N, H', W', O]`` form.
    """
    if formulations.current_formulations().conv == "lax":
        for kernel, bias in layers:
            x = max_pool_2x2(jax.nn.relu(reference_conv2d(x, kernel, bias)))
        return x.reshape(x.shape[0], -1)
    return _banded_stack(x, layers, tile)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _banded_stack(x: Array, layers: tuple[tuple[Array, Array], ...],
                  tile: int) -> Array:
    return _nhwc_blocks(x, layers, tile)


def _stack_forward(x, layers, tile):
    return jax.vjp(lambda x, layers: _batch_minor_blocks(x, layers, tile),
                   x, layers)


def _stack_backward(tile, pullback, cotangent):
    del tile
    return pullback(cotangent)


_banded_stack.defvjp(_stack_forward, _stack_backward)


class Conv(nn.Module):
    """Stride-1 convolution with ``kernel`` (HWIO) and ``bias`` parameters."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    padding: Literal["VALID", "SAME"] = "VALID"
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    tile: int = DEFAULT_TILE

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,),
                          jnp.float32)
        return conv2d(x, kernel.astype(x.dtype), bias.astype(x.dtype),
                      self.padding, self.tile)


class ConvParams(nn.Module):
    """:class:`Conv`'s parameters (``kernel`` HWIO, ``bias``), returned as is.

    For networks that compute their convolutions in a pure function of the
    parameters, such as :func:`conv_relu_pool_stack`.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, channels: int) -> tuple[Array, Array]:
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, channels, self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,),
                          jnp.float32)
        return kernel, bias


def reference_conv2d(x: Array, kernel: Array, bias: Array | None,
                     padding: Literal["VALID", "SAME"] = "VALID") -> Array:
    """``lax.conv_general_dilated`` version of :func:`conv2d`.

    The ``"lax"`` formulation of :func:`conv2d`, and the reference that
    tests compare the banded one with, whichever formulation is chosen.
    """
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if bias is None else y + bias
