"""Low-rank adapters (LoRA) as a recovery: train few parameters, merge them.

The damaged kernels stay frozen; each chosen kernel ``W`` gets a low-rank
correction ``W + (alpha / rank) * A @ B`` (Hu et al. 2021), trained on the
recovery data and merged into the kernel afterwards, so the recovered
model has the damaged model's structure and size. This is LLM-Pruner's
recovery after structural pruning (rank 8, alpha 16, the default here).

A kernel of any layout is factorised over its units: its output axes
(``LeafInfo.out_axes``: the last axis of a flax ``Dense`` or ``Conv``, the
first of an equinox or PyTorch ``Linear``) form the columns of ``B`` and
every other axis (input features, the window of a convolution) the rows
of ``A``. ``B`` starts at zero, so training starts from the damaged model
exactly; ``A`` starts uniform in ``±1/sqrt(rows)`` (PEFT's default).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recovjax._types import Params, PRNGKey
from recovjax.models.info import KERNEL, info_by_path, paths_of

DEFAULT_RANK = 8
"""LLM-Pruner's rank."""


class Adapter(NamedTuple):
    """Trainable parameters that reparametrise a model's parameters.

    Attributes:
        init: ``init(key, params) -> adapter`` for one model.
        merge: ``merge(params, adapter) -> params``, traceable; the
            merged parameters have the structure of ``params``.
        trainable: the number of trainable values per model.
        layers: the paths of the adapted kernels.
    """

    init: Callable[[PRNGKey, Params], Any]
    merge: Callable[[Params, Any], Params]
    trainable: int
    layers: tuple[str, ...]


class _Factor(NamedTuple):
    order: tuple[int, ...]   # axes: the rows' axes, then the output axes
    rows: int
    cols: int


def _factor(shape: tuple[int, ...], out_axes: tuple[int, ...]) -> _Factor:
    outs = tuple(axis % len(shape) for axis in out_axes)
    others = tuple(axis for axis in range(len(shape)) if axis not in outs)
    rows = int(np.prod([shape[a] for a in others], dtype=np.int64))
    cols = int(np.prod([shape[a] for a in outs], dtype=np.int64))
    return _Factor(others + outs, rows, cols)


def _leaf(tree: Any, path: str) -> Any:
    node = tree
    for part in path.split("/"):
        node = node[part]
    return node


def _chosen(paths: Sequence[str], layers: Any) -> list[str]:
    if layers in (None, "auto"):
        return list(paths)
    if isinstance(layers, str):
        try:
            pattern = re.compile(layers)
        except re.error as error:
            raise ValueError(f"layers: {layers!r} is not a valid regex: "
                             f"{error}") from None
        chosen = [p for p in paths if pattern.fullmatch(p)
                  or pattern.fullmatch(p.rsplit("/", 1)[0])]
    elif isinstance(layers, (list, tuple)) and all(
            isinstance(layer, str) for layer in layers):
        chosen = [p for p in paths if p in layers
                  or p.rsplit("/", 1)[0] in layers]
        named = {p for p in paths} | {p.rsplit("/", 1)[0] for p in paths}
        missing = [layer for layer in layers if layer not in named]
        if missing:
            raise ValueError(f"layers: {missing[0]!r} is not a kernel or "
                             f"layer of the model; its kernels are "
                             f"{', '.join(paths) or 'none'}")
    else:
        raise TypeError(f"layers must be 'auto', a regex or a list of layer "
                        f"paths, got {layers!r}")
    if not chosen:
        raise ValueError(f"layers: {layers!r} matches no kernel; the model's "
                         f"kernels are {', '.join(paths) or 'none'}")
    return chosen


def make_lora(params: Params, info: Any, *, rank: int = DEFAULT_RANK,
              alpha: float | None = None, layers: Any = "auto") -> Adapter:
    """Low-rank adapters for the kernels of a model.

    Args:
        params: one model's parameters (arrays or shape structs).
        info: the model's leaf facts (``model.info``): which leaves are
            kernels and which of their axes are the output units.
        rank: the adapters' rank (static).
        alpha: the scale numerator, ``delta = alpha / rank * A @ B``;
            ``None``: ``2 * rank`` (LLM-Pruner's 16 at rank 8).
        layers: ``"auto"`` adapts every kernel whose adapter has fewer
            values than the kernel itself (a small kernel is cheaper to
            leave frozen); a regex or a list of kernel or layer paths
            adapts exactly those.

    Returns:
        The :class:`Adapter`.

    Raises:
        ValueError: a non-positive rank or alpha, no kernel leaf declared
            or none to adapt, a
            named layer the model lacks, or a chosen kernel whose output
            axes are unknown (the message says how to declare them).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if alpha is None:
        alpha = 2.0 * rank
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
            and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    infos = info_by_path(params, info)
    kernels = [path for path, leaf in infos.items()
               if leaf.role == KERNEL and len(_leaf(params, path).shape) >= 2]
    if not kernels:
        raise ValueError("layers: the model declares no kernel leaf to "
                         "adapt; declare them with info= (LeafInfo(role="
                         "'kernel', out_axes=(...,)))")
    chosen = _chosen(kernels, layers)
    factors = {}
    for path in chosen:
        shape = tuple(_leaf(params, path).shape)
        if not infos[path].out_axes:
            raise ValueError(
                f"layers: kernel {path!r} has no known output axes; declare "
                f"them with info= (LeafInfo(role='kernel', out_axes=(...,)))")
        factor = _factor(shape, infos[path].out_axes)
        if layers in (None, "auto") and rank * (
                factor.rows + factor.cols) >= factor.rows * factor.cols:
            continue
        factors[path] = factor
    if not factors:
        raise ValueError(f"layers: no kernel is large enough for rank "
                         f"{rank} adapters (each would have as many values "
                         "as its kernel); lower the rank or name the layers")
    scale = float(alpha) / rank
    trainable = sum(rank * (f.rows + f.cols) for f in factors.values())

    def init(key: PRNGKey, params: Params) -> dict:
        adapters = {}
        for index, (path, factor) in enumerate(sorted(factors.items())):
            dtype = _leaf(params, path).dtype
            bound = 1.0 / math.sqrt(factor.rows)
            a = jax.random.uniform(jax.random.fold_in(key, index),
                                   (factor.rows, rank), dtype, -bound, bound)
            adapters[path] = {"a": a,
                              "b": jnp.zeros((rank, factor.cols), dtype)}
        return adapters

    def merge(params: Params, adapters: dict) -> Params:
        flat = dict(zip(paths_of(params), jax.tree.leaves(params)))
        for path, factor in factors.items():
            kernel = flat[path]
            delta = scale * (adapters[path]["a"] @ adapters[path]["b"])
            permuted = tuple(kernel.shape[a] for a in factor.order)
            delta = jnp.transpose(delta.reshape(permuted),
                                  np.argsort(factor.order))
            flat[path] = (kernel + delta).astype(kernel.dtype)
        return jax.tree.unflatten(jax.tree.structure(params),
                                  [flat[p] for p in paths_of(params)])

    return Adapter(init=init, merge=merge, trainable=trainable,
                   layers=tuple(sorted(factors)))

