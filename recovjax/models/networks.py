"""The networks recovjax ships, as Flax modules.

Parameter names are chosen to be readable in damage scopes and reports
(``conv1/kernel``, ``block2/conv_b/bias``, ``layer0/attention/out/kernel``).
Structural damage is expressed on these parameters: silencing a unit,
a residual branch or an attention head is done by zeroing exactly the
parameters that produce it, so the networks need no extra mask inputs.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from recovjax._types import Array
from recovjax.models.layers import (Conv, ConvParams, conv_relu_pool_stack,
                                    max_pool_2x2)


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
