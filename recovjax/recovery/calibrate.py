"""Recoveries from a small unlabelled calibration set, without training.

Both strategies here compare each layer's outputs in the damaged model
with the clean (pretrained) model's outputs of the same layer on a few
calibration inputs, and change the damaged model's parameters layer by
layer, in program order, so that every layer sees the inputs its already
corrected predecessors produce:

- **Bias correction** (Nagel et al. 2019, data-driven form): subtract
  from each layer's bias the mean shift of its output units against the
  clean model. One forward pass per layer; no labels, no gradients.
- **Layer-wise reconstruction** (the least-squares step of OBC and
  SparseGPT): for each layer, solve for its surviving weights (and bias)
  so that the layer reproduces the clean model's outputs of that layer,

      min_V ||J (W + V) + b - Y_clean||^2 + lambda ||V||^2,

  over the entries the damage left alone (``V`` is zero wherever the
  damage mask is set, so pruned weights stay pruned and removed units
  stay removed). ``J`` is the layer's map from its kernel to its output
  for the calibration inputs, applied through ``jax.linearize`` and its
  transpose, so a dense layer, a convolution or any other linear layer of
  a user's model is solved the same way, and the normal equations are
  solved by conjugate gradients. ``lambda`` is ``damping`` times the mean
  diagonal of ``J^T J`` (SparseGPT's ``percdamp``), estimated with
  Rademacher probes drawn from the model's key.

The layers are the model's *sites* (:mod:`recovjax.damage.activations`):
outputs of a layer with a kernel, after its bias. The calibration inputs
are the first ``calibration`` kept examples of the recovery data; their
labels are never read.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from recovjax._types import Array, Mask, Params, PRNGKey
from recovjax.damage.activations import site_values, trace_program
from recovjax.models.info import BIAS, KERNEL, info_by_path, paths_of

DEFAULT_CALIBRATION = 256
"""Calibration examples by default (SparseGPT and Wanda use 128 sequences;
a vision model's inputs are smaller)."""
DEFAULT_DAMPING = 0.01
"""Ridge weight relative to the mean diagonal of ``J^T J`` (SparseGPT's)."""
DEFAULT_ITERATIONS = 50
"""Conjugate-gradient iterations per layer, at most."""


class Layer(NamedTuple):
    """One layer the calibration strategies change.

    Attributes:
        name: the layer's path (its site).
        kernel: the kernel leaf's path.
        bias: the bias leaf's path, or ``None`` for a layer without one.
        unit_axis: the axis of the layer's output that holds its units.
    """

    name: str
    kernel: str
    bias: str | None
    unit_axis: int


def calibration_layers(model: Any, params: Params, sample: Any
                       ) -> tuple[Layer, ...]:
    """The model's layers with a kernel and a site, in program order.

    Args:
        model: a :class:`~recovjax.models.Model`.
        params: one model's parameters (arrays or shape structs).
        sample: an input batch (array or shape struct).

    Returns:
        The :class:`Layer` tuple.

    Raises:
        ValueError: if the model has no such layer (the message says how
            to declare a user model's kernels).
    """
    program = trace_program(model, params, sample)
    infos = info_by_path(params, model.info)
    layers = []
    for name, site in program.sites.items():
        if site.kind == "embedding":
            continue  # a lookup, not a linear map of the layer's inputs
        kernels = [p for p, i in infos.items()
                   if i.layer == name and i.role == KERNEL]
        biases = [p for p, i in infos.items()
                  if i.layer == name and i.role == BIAS]
        if len(kernels) != 1 or len(biases) > 1:
            continue
        channels = infos[kernels[0]].channels
        layers.append(Layer(name, kernels[0], biases[0] if biases else None,
                            1 if channels == "first" else -1))
    if not layers:
        raise ValueError("the model has no layer with a kernel whose output "
                         "is a site (see recovjax.damage.find_sites); "
                         "declare its kernels with info= (role 'kernel' and "
                         "the layer path)")
    return tuple(layers)


def check_calibration(size: Any) -> None:
    """Raise ``ValueError`` unless ``size`` is a positive int (examples)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"calibration must be a positive int (examples), "
                         f"got {size!r}")


def calibration_inputs(inputs: Any, weights: Array, size: int) -> Any:
    """The first ``size`` kept examples (weight > 0) of the recovery inputs.

    Raises:
        ValueError: if ``size`` is not a positive int or exceeds the kept
            examples.
    """
    check_calibration(size)
    kept = np.flatnonzero(np.asarray(weights) > 0)
    if kept.size < size:
        raise ValueError(f"calibration: {size} examples asked for, but the "
                         f"recovery data keep only {kept.size}")
    index = jnp.asarray(kept[:size])
    return jax.tree.map(lambda a: jnp.asarray(a)[index], inputs)


def _get(params: Params, path: str) -> Array:
    return dict(zip(paths_of(params), jax.tree.leaves(params)))[path]


def _replace(params: Params, values: dict[str, Array]) -> Params:
    paths = paths_of(params)
    leaves = [values.get(p, leaf)
              for p, leaf in zip(paths, jax.tree.leaves(params))]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


def clean_outputs(model: Any, clean: Params, inputs: Any,
                  layers: tuple[Layer, ...]) -> dict[str, Array]:
    """The clean model's output of every layer on the calibration inputs."""
    names = [layer.name for layer in layers]
    return jax.jit(lambda p, x: site_values(model, p, x, names))(clean,
                                                                  inputs)


def _unit_mean(value: Array, unit_axis: int) -> Array:
    # Summed in blocks of about sqrt(rows), then the block sums: a
    # float32 sum over every example and position in one pass loses
    # digits in proportion to their number (a corrected mean that misses
    # the clean one by 1e-4 of its size for 100 LeNet images).
    rows = jnp.moveaxis(value, unit_axis % value.ndim, -1)
    rows = rows.reshape(-1, rows.shape[-1])
    count = rows.shape[0]
    block = max(1, int(np.ceil(np.sqrt(count))))
    blocks = -(-count // block)
    rows = jnp.pad(rows, ((0, blocks * block - count), (0, 0)))
    sums = rows.reshape(blocks, block, -1).sum(axis=1).sum(axis=0)
    return sums / count


def correct_biases(model: Any, params: Params, inputs: Any,
                   targets: dict[str, Array], layers: tuple[Layer, ...]
                   ) -> Params:
    """Bias correction, layer by layer (traceable, vmappable).

    Args:
        model: the model.
        params: one damaged model's parameters.
        inputs: the calibration inputs.
        targets: the clean model's layer outputs (:func:`clean_outputs`).
        layers: the layers (:func:`calibration_layers`).

    Returns:
        ``params`` with every bias shifted by its layer's mean output
        shift against the clean model.
    """
    for layer in layers:
        if layer.bias is None:
            continue
        value = site_values(model, params, inputs, [layer.name])[layer.name]
        shift = _unit_mean(value.astype(jnp.float32) - targets[
            layer.name].astype(jnp.float32), layer.unit_axis)
        bias = _get(params, layer.bias)
        params = _replace(params, {layer.bias: (bias - shift.reshape(
            bias.shape)).astype(bias.dtype)})
    return params


def _inner(a: Any, b: Any) -> Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a),
                                              jax.tree.leaves(b)))


def reconstruct_layers(key: PRNGKey, model: Any, params: Params, mask: Mask,
                       inputs: Any, targets: dict[str, Array],
                       layers: tuple[Layer, ...], *,
                       damping: float = DEFAULT_DAMPING,
                       iterations: int = DEFAULT_ITERATIONS,
                       probes: int = 8) -> Params:
    """Layer-wise least-squares reconstruction (traceable, vmappable).

    Args:
        key: this model's key (the ridge scale's probes).
        model: the model.
        params: one damaged model's parameters.
        mask: its damage mask (``True``: damaged, held as it is).
        inputs: the calibration inputs.
        targets: the clean model's layer outputs (:func:`clean_outputs`).
        layers: the layers (:func:`calibration_layers`).
        damping: ridge weight relative to the mean diagonal of ``J^T J``.
        iterations: conjugate-gradient iterations per layer, at most.
        probes: Rademacher probes estimating that diagonal.

    Returns:
        The reconstructed parameters.
    """
    masks = dict(zip(paths_of(mask), jax.tree.leaves(mask)))
    for index, layer in enumerate(layers):
        names = [layer.kernel] + ([layer.bias] if layer.bias else [])
        start = {name: _get(params, name) for name in names}
        free = {name: ~jnp.asarray(masks[name], bool) for name in names}

        def output(values, params=params, layer=layer):
            return site_values(model, _replace(params, values), inputs,
                               [layer.name])[layer.name]

        current, forward = jax.linearize(output, start)
        transpose = jax.linear_transpose(forward, start)
        residual = targets[layer.name] - current

        def only_free(tree, free=free):
            return {n: jnp.where(free[n], tree[n], 0) for n in tree}

        def normal(tree, forward=forward, transpose=transpose,
                   only_free=only_free):
            (back,) = transpose(forward(only_free(tree)))
            return only_free(back)

        # The mean diagonal of J^T J is E||J v||^2 / size for Rademacher v.
        probe_keys = jax.random.split(jax.random.fold_in(key, index), probes)

        def probe(probe_key, start=start, forward=forward, free=free):
            signs = {n: jnp.where(
                jax.random.bernoulli(jax.random.fold_in(probe_key, i), 0.5,
                                     start[n].shape), 1.0, -1.0
            ).astype(start[n].dtype) for i, n in enumerate(sorted(start))}
            return jnp.sum(jnp.square(forward(signs)))

        size = sum(v.size for v in start.values())
        diagonal = jnp.mean(jax.vmap(probe)(probe_keys)) / size
        ridge = damping * diagonal + jnp.finfo(jnp.float32).tiny

        def operator(tree, normal=normal, ridge=ridge, only_free=only_free):
            applied = normal(tree)
            return {n: applied[n] + ridge * only_free(tree)[n] for n in tree}

        (rhs,) = transpose(residual)
        rhs = only_free(rhs)
        change = _conjugate_gradients(operator, rhs, iterations)
        params = _replace(params, {
            n: (start[n] + jnp.where(free[n], change[n], 0)).astype(
                start[n].dtype) for n in names})
    return params


def _conjugate_gradients(operator: Callable[[Any], Any], rhs: Any,
                         iterations: int) -> Any:
    """``iterations`` steps of conjugate gradients from zero, in a scan.

    A fixed number of steps (stopping early once the residual is zero), so
    that every model of a vmapped group runs the same program.
    """
    zeros = jax.tree.map(jnp.zeros_like, rhs)
    scale = _inner(rhs, rhs)

    def step(carry, _):
        x, r, p, rr = carry
        ap = operator(p)
        pap = _inner(p, ap)
        live = (rr > 1e-12 * scale) & (pap > 0)
        alpha = jnp.where(live, rr / jnp.where(live, pap, 1.0), 0.0)
        x = jax.tree.map(lambda a, b: a + alpha * b, x, p)
        r = jax.tree.map(lambda a, b: a - alpha * b, r, ap)
        new = _inner(r, r)
        beta = jnp.where(live, new / jnp.where(live, rr, 1.0), 0.0)
        p = jax.tree.map(lambda a, b: a + beta * b, r, p)
        return (x, r, p, jnp.where(live, new, rr)), None

    (x, _, _, _), _ = jax.lax.scan(step, (zeros, rhs, rhs, scale), None,
                                   length=iterations)
    return x
