"""A small decoder-only transformer language model (Flax linen).

Byte-level by default: 257 token ids (256 bytes and the pad id 256 of
:mod:`recovjax.data.text`), 4 pre-LayerNorm blocks of width 128 with 4
heads and an MLP of 512, learned position embeddings and a causal mask.

Parameter names follow :mod:`recovjax.models.networks`, so that damage
scopes read the same: ``embed/embedding``, ``position``,
``block0/attention/query/kernel``, ``block3/mlp2/bias``, ``norm/scale``,
``head/kernel``. Attention keeps the per-head layout of the ViT's
:class:`~recovjax.models.networks.SelfAttention`: ``query``, ``key`` and
``value`` kernels are ``[dim, heads, head_dim]`` (biases ``[heads,
head_dim]``) and the ``out`` kernel is ``[heads, head_dim, dim]``, so
removing head ``h`` is zeroing ``[:, h]`` of the first three kernels,
``[h]`` of their biases and ``[h]`` of ``out/kernel`` (what
:func:`recovjax.damage.structure.make_remove_heads` does: it finds these
modules by their ``query``/``key``/``value``/``out`` children).

The output head is *untied* (its own ``head`` Dense layer rather than the
transposed token embedding), so that damaging the embedding and damaging
the read-out are separate experiments, and every output layer in the
library is a ``Dense`` with a ``kernel`` and a ``bias``.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from recovjax._types import Array, Params, PRNGKey
from recovjax.models.networks import EncoderLayer, SelfAttention


class CausalSelfAttention(SelfAttention):
    """Multi-head causal self-attention with the per-head parameter layout.

    Position ``q`` attends to positions ``k <= q`` only. The layout is that
    of :class:`~recovjax.models.networks.SelfAttention` (this is it, with
    ``causal=True``): one head is one slice along the ``heads`` axis of
    ``query``, ``key``, ``value`` (kernel ``[dim, heads, head_dim]``) and
    ``out`` (kernel ``[heads, head_dim, dim]``).

    Attributes:
        num_heads: number of heads; must divide the input width.
    """

    causal: bool = True


class DecoderBlock(EncoderLayer):
    """Pre-LayerNorm residual block: ``x + attn(ln(x))``, ``x + mlp(ln(x))``,
    with causal attention (:class:`~recovjax.models.networks.EncoderLayer`
    with ``causal=True``).

    Attributes:
        num_heads: attention heads.
        mlp_dim: hidden width of the GELU MLP.
    """

    causal: bool = True


class TransformerLM(nn.Module):
    """Decoder-only transformer: ``tokens int[B, T] -> logits f32[B, T, V]``.

    ``logits[:, t]`` is the model's distribution of token ``t + 1`` given
    tokens ``0..t``. Blocks are ``block0`` ... ``block{depth - 1}``.

    Attributes:
        vocab_size: number of token ids (default 257: bytes and a pad id).
        max_length: longest sequence; the learned position table has this
            many rows and shorter inputs use its first ``T``.
        depth: number of blocks.
        dim: model width.
        num_heads: attention heads per block (must divide ``dim``).
        mlp_dim: MLP hidden width.
    """

    vocab_size: int = 257
    max_length: int = 128
    depth: int = 4
    dim: int = 128
    num_heads: int = 4
    mlp_dim: int = 512

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected int[batch, length], got shape "
                             f"{tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens: must be integer ids, got dtype "
                            f"{tokens.dtype}")
        length = tokens.shape[1]
        if length > self.max_length:
            raise ValueError(f"tokens: length {length} exceeds max_length="
                             f"{self.max_length}")
        x = nn.Embed(self.vocab_size, self.dim, name="embed")(tokens)
        position = self.param("position", nn.initializers.normal(0.02),
                              (self.max_length, self.dim), jnp.float32)
        x = x + position[:length]
        for index in range(self.depth):
            x = DecoderBlock(self.num_heads, self.mlp_dim,
                             name=f"block{index}")(x)
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(self.vocab_size, name="head")(x)


def init_apply(module: nn.Module
               ) -> tuple[Callable[[PRNGKey, Array], Params],
                          Callable[[Params, Array], Array]]:
    """The pure ``init``/``apply`` pair of a module, on plain parameters.

    Args:
        module: e.g. ``TransformerLM(depth=2, dim=32)``.

    Returns:
        ``(init, apply)``: ``init(key, tokens) -> params`` (the ``"params"``
        collection) and ``apply(params, tokens) -> logits``.

    Example::

        init, apply = init_apply(TransformerLM())
        params = init(jax.random.key(0), jnp.zeros((1, 128), jnp.int32))
        logits = apply(params, tokens)  # [B, T, 257]
    """

    def init(key: PRNGKey, sample: Array) -> Params:
        return module.init(key, jnp.asarray(sample))["params"]

    def apply(params: Params, tokens: Array) -> Array:
        return module.apply({"params": params}, tokens)

    return init, apply

