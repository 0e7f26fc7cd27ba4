"""Layers whose formulation is chosen for speed on XLA:CPU and under vmap.

The convolution is written as im2col from shifted slices followed by one
matmul. On XLA:CPU this is several times faster than ``lax.conv`` for the
small LeNet-style convolutions recovjax trains and evaluates (most of all in
the backward pass), and under ``vmap`` over a stack of kernels it becomes a
batched matmul instead of a grouped convolution.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from recovjax._types import Array


def extract_patches(x: Array, kernel_size: tuple[int, int],
                    padding: Literal["VALID", "SAME"] = "VALID") -> Array:
    """im2col: ``[N, H, W, C] -> [N, H', W', kh * kw * C]`` by shifted slices.

    The last axis is ordered ``(i, j, c)``, matching
    ``kernel.reshape(kh * kw * C, out)`` for an ``HWIO`` kernel.
    """
    kh, kw = kernel_size
    if padding == "SAME":
        x = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2),
                        ((kw - 1) // 2, kw // 2), (0, 0)))
    elif padding != "VALID":
        raise ValueError(f"padding must be 'VALID' or 'SAME', got {padding!r}")
    height = x.shape[1] - kh + 1
    width = x.shape[2] - kw + 1
    slices = [x[:, i:i + height, j:j + width, :]
              for i in range(kh) for j in range(kw)]
    return jnp.concatenate(slices, axis=-1)


def conv2d(x: Array, kernel: Array, bias: Array | None,
           padding: Literal["VALID", "SAME"] = "VALID") -> Array:
    """Stride-1 2-D convolution (cross-correlation) as im2col + matmul.

    Args:
        x: ``[N, H, W, C]``.
        kernel: ``[kh, kw, C, O]`` (HWIO).
        bias: ``[O]`` or ``None``.
        padding: ``"VALID"`` or ``"SAME"``.

    Returns:
        ``[N, H', W', O]``; equal to ``lax.conv_general_dilated`` with NHWC /
        HWIO layouts up to floating-point summation order.
    """
    kh, kw, cin, cout = kernel.shape
    patches = extract_patches(x, (kh, kw), padding)
    y = patches @ kernel.reshape(kh * kw * cin, cout)
    return y if bias is None else y + bias


def max_pool_2x2(x: Array) -> Array:
    """2x2 max pooling with stride 2 (floor), by reshape."""
    n, h, w, c = x.shape
    x = x[:, :h - h % 2, :w - w % 2, :]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Conv(nn.Module):
    """Stride-1 convolution with ``kernel`` (HWIO) and ``bias`` parameters."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    padding: Literal["VALID", "SAME"] = "VALID"
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,),
                          jnp.float32)
        return conv2d(x, kernel.astype(x.dtype), bias.astype(x.dtype),
                      self.padding)


def reference_conv2d(x: Array, kernel: Array, bias: Array | None,
                     padding: Literal["VALID", "SAME"] = "VALID") -> Array:
    """``lax.conv_general_dilated`` version of :func:`conv2d`, for tests."""
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if bias is None else y + bias
