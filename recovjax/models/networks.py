"""The networks recovjax ships, as Flax modules.

Parameter names are chosen to be readable in damage scopes and reports
(``conv1/kernel``, ``block2/conv_b/bias``, ``layer0/attention/out/kernel``).
Structural damage is expressed on these parameters: silencing a unit,
a residual branch or an attention head is done by zeroing exactly the
parameters that produce it, so the networks need no extra mask inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from recovjax._types import Array
from recovjax.models.layers import (Conv, ConvParams, conv_relu_pool_stack,
                                    max_pool_2x2, patch_conv)


class LeNet5(nn.Module):
    """The seed's LeNet-5: conv 6@5x5 - pool - conv 16@5x5 - pool - 120 - 84 - 10.

    The two convolution blocks are :func:`~recovjax.models.layers.
    conv_relu_pool_stack`: evaluated in the ``[N, H, W, C]`` layout and
    differentiated in the batch-minor one, whichever is faster for each.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv1 = ConvParams(6, (5, 5), name="conv1")(x.shape[-1])
        conv2 = ConvParams(16, (5, 5), name="conv2")(6)
        x = conv_relu_pool_stack(x, (conv1, conv2))
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)


class MLP(nn.Module):
    """LeNet-300-100: flatten - 300 - 100 - classes, ReLU."""

    num_classes: int = 10
    hidden: tuple[int, ...] = (300, 100)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x.reshape(x.shape[0], -1)
        for index, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"fc{index + 1}")(x))
        return nn.Dense(self.num_classes, name=f"fc{len(self.hidden) + 1}")(x)


class ResidualBlock(nn.Module):
    """``x + conv_b(relu(conv_a(x)))`` followed by ReLU.

    Zeroing ``conv_b`` (kernel and bias) turns the block into the identity
    (up to the trailing ReLU, which is the identity on the block's
    non-negative inputs), which is how block-drop damage is expressed.
    """

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.relu(Conv(self.features, (3, 3), "SAME", name="conv_a")(x))
        h = Conv(self.features, (3, 3), "SAME", name="conv_b")(h)
        return nn.relu(x + h)


class ResCNN(nn.Module):
    """A small residual CNN: stem, 4 residual blocks in 2 stages, linear head."""

    num_classes: int = 10
    features: int = 16
    blocks_per_stage: int = 2

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.relu(Conv(self.features, (3, 3), name="stem")(x))
        index = 0
        for _ in range(2):
            x = max_pool_2x2(x)
            for _ in range(self.blocks_per_stage):
                x = ResidualBlock(self.features, name=f"block{index}")(x)
                index += 1
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


_HE_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
"""He initialisation over the output fan, as torchvision's ResNets use."""


ConvFunction = Callable[..., Any]
"""A function with ``lax.conv_general_dilated``'s signature."""


def _conv(conv: ConvFunction, features: int, kernel_size: tuple[int, int],
          name: str, strides: int = 1, padding: int = 1) -> nn.Conv:
    # Without bias: the batch norm after it has one.
    return nn.Conv(features, kernel_size, strides=strides, padding=padding,
                   use_bias=False, kernel_init=_HE_FAN_OUT,
                   conv_general_dilated=conv, name=name)


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    # momentum 0.9 is PyTorch's 0.1: running statistics that settle within
    # an epoch, so few-epoch recipes evaluate with representative ones.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5, name=name)


class ResidualBranch(nn.Module):
    """The residual branch of a ResNet basic block.

    ``norm_b(conv_b(relu(norm_a(conv_a(x)))))`` with 3x3 convolutions;
    ``conv_a`` carries the block's stride. The shortcut is a sibling module
    (see :class:`Projection`), so zeroing every parameter of the branch, as
    ``drop_blocks`` does (zeroing ``norm_b``'s scale and bias alone has
    the same effect), leaves ``relu(shortcut(x))``: the network with the
    branch skipped.

    Attributes:
        features: output channels.
        strides: stride of ``conv_a``.
        conv: the convolution (see :class:`ResNet18`).
    """

    features: int
    strides: int = 1
    conv: ConvFunction = patch_conv

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        h = _conv(self.conv, self.features, (3, 3), "conv_a", self.strides)(x)
        h = nn.relu(_batch_norm(train, "norm_a")(h))
        h = _conv(self.conv, self.features, (3, 3), "conv_b")(h)
        return _batch_norm(train, "norm_b")(h)


class Projection(nn.Module):
    """A 1x1 convolution and batch norm: the shortcut where shapes change.

    Attributes:
        features: output channels.
        strides: stride of the convolution.
        conv: the convolution (see :class:`ResNet18`).
    """

    features: int
    strides: int = 1
    conv: ConvFunction = patch_conv

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = _conv(self.conv, self.features, (1, 1), "conv", self.strides,
                  padding=0)(x)
        return _batch_norm(train, "norm")(x)


class ResNet18(nn.Module):
    """ResNet-18 with batch norm, for small grey images.

    The standard topology: a stem, four stages of two basic blocks
    (``relu(shortcut(x) + branch(x))``, see :class:`ResidualBranch`) of
    widths ``width * (1, 2, 4, 8)``, 1x1 projection shortcuts with batch
    norm where the shape changes, global average pooling and a dense head.
    With ``width=64``, one input channel and 10 classes it has 11,172,810
    parameters (11,166,976 in the stages, exactly torchvision's
    ``resnet18`` without its 3-channel 7x7 stem and 1000-class head) and
    9,600 batch statistics.

    The stem fits 28x28 images: a 3x3 stride-2 convolution, batch norm,
    ReLU and a 3x3 stride-2 max-pool take 28x28 to 7x7 (ImageNet's 7x7
    stride-2 stem and pool take 224x224 to 56x56). Stage strides are
    ``stage_strides``; the default ``(1, 2, 2, 1)`` keeps the last stage at
    2x2: with the standard ``(1, 2, 2, 2)`` it would run at 1x1, where a
    3x3 convolution reads only its centre tap and 8/9 of the last stage's
    kernels (about 6.9 M of the 11.2 M parameters) would never touch the
    output, and damage to them would change nothing. One forward pass of
    one 28x28 image is 57.7 M multiply-adds counting every kernel tap (7.2,
    8.4, 8.4 and 33.6 M in the four stages; XLA's cost analysis, which
    leaves out the taps over padding, counts 63 MFLOP);
    ``stage_strides=(1, 2, 2, 2)`` is 32.5 M (35 MFLOP).

    Convolutions are ``nn.Conv`` without bias, computed by ``conv``:
    by default :func:`~recovjax.models.layers.patch_conv`, a GEMM of
    patches on CPU (XLA:CPU's own convolution is many times slower at
    these small feature maps) and ``lax.conv_general_dilated`` elsewhere.

    Parameter paths: ``stem``, ``stem_norm``, ``block0`` ... ``block7``
    (the residual branches: ``conv_a``, ``norm_a``, ``conv_b``,
    ``norm_b``), ``shortcut2``, ``shortcut4``, ``shortcut6`` (the
    projections of the blocks that change width: ``conv``, ``norm``) and
    ``head``. Batch statistics live in the ``batch_stats`` collection;
    ``train=True`` normalises with the batch's statistics and updates them.

    Attributes:
        num_classes: size of the output layer.
        width: channels of the first stage (64 for ResNet-18; small values
            make tiny models for tests).
        stage_strides: stride of the first block of each of the 4 stages.
        conv: the convolution, a function with
            ``lax.conv_general_dilated``'s signature (``nn.Conv``'s
            ``conv_general_dilated``); ``lax.conv_general_dilated`` itself
            compiles faster, which suits tiny models.
    """

    num_classes: int = 10
    width: int = 64
    stage_strides: tuple[int, int, int, int] = (1, 2, 2, 1)
    conv: ConvFunction = patch_conv

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if len(self.stage_strides) != 4:
            raise ValueError(f"stage_strides: ResNet-18 has 4 stages, got "
                             f"{len(self.stage_strides)} strides")
        x = _conv(self.conv, self.width, (3, 3), "stem", strides=2)(x)
        x = nn.relu(_batch_norm(train, "stem_norm")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        index = 0
        for stage, strides in enumerate(self.stage_strides):
            features = self.width * 2 ** stage
            for block in range(2):
                stride = strides if block == 0 else 1
                if stride != 1 or x.shape[-1] != features:
                    shortcut = Projection(features, stride, self.conv,
                                          name=f"shortcut{index}")(x, train)
                else:
                    shortcut = x
                branch = ResidualBranch(features, stride, self.conv,
                                        name=f"block{index}")(x, train)
                x = nn.relu(shortcut + branch)
                index += 1
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with per-head parameter layout.

    ``query/key/value`` kernels are ``[dim, heads, head_dim]`` and the output
    kernel is ``[heads, head_dim, dim]``, so one head is one slice along the
    ``heads`` axis: removing head ``h`` zeroes ``out/kernel[h]``.
    """

    num_heads: int
    causal: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = x.shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} heads do not "
                             f"divide the width {dim}")
        head_dim = dim // self.num_heads
        project = lambda name: nn.DenseGeneral(
            (self.num_heads, head_dim), name=name)(x)
        query, key, value = project("query"), project("key"), project("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.sqrt(
            jnp.asarray(head_dim, x.dtype))
        if self.causal:
            length = x.shape[-2]
            allowed = jnp.tril(jnp.ones((length, length), bool))
            # The most negative finite number, not -inf: a row is never
            # empty (the diagonal is allowed), and exp() of it is zero.
            logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
        weights = nn.softmax(logits, axis=-1)
        heads = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        return nn.DenseGeneral(dim, axis=(-2, -1), name="out")(heads)


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer (causal attention if ``causal``)."""

    num_heads: int
    mlp_dim: int
    causal: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x + SelfAttention(self.num_heads, causal=self.causal,
                              name="attention")(
            nn.LayerNorm(name="norm1")(x))
        h = nn.LayerNorm(name="norm2")(x)
        h = nn.Dense(self.mlp_dim, name="mlp1")(h)
        h = nn.Dense(x.shape[-1], name="mlp2")(nn.gelu(h))
        return x + h


class ViT(nn.Module):
    """A small vision transformer: 7x7 patches, 4 layers, 4 heads, mean pooling."""

    num_classes: int = 10
    patch: int = 7
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 128

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n, h, w, c = x.shape
        p = self.patch
        x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(n, (h // p) * (w // p), p * p * c)
        x = nn.Dense(self.dim, name="embed")(x)
        position = self.param("position", nn.initializers.normal(0.02),
                              (1, x.shape[1], self.dim), jnp.float32)
        x = x + position
        for index in range(self.depth):
            x = EncoderLayer(self.num_heads, self.mlp_dim,
                             name=f"layer{index}")(x)
        x = nn.LayerNorm(name="norm")(x).mean(axis=1)
        return nn.Dense(self.num_classes, name="head")(x)
