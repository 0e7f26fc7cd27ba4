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
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
        HWIO layouts up to floating-point summation order.
    """
    if tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
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


def reference_conv2d(x: Array, kernel: Array, bias: Array | None,
                     padding: Literal["VALID", "SAME"] = "VALID") -> Array:
    """``lax.conv_general_dilated`` version of :func:`conv2d`, for tests."""
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if bias is None else y + bias
