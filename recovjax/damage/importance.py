"""Importance scores that rank a model's weights for pruning, from data.

Magnitude pruning ranks weights by ``|W|``. Two data-aware scores of the
pruning literature rank them by what removing them costs on inputs the
model sees:

- **Wanda** (Sun et al. 2023): ``|W_ij| * ||X_j||_2``, the weight's
  magnitude times the norm of the input it multiplies over the
  calibration examples (every position of a convolution's window). No
  labels and no gradients.
- **Taylor** (Molchanov et al. 2019): ``(W_ij * dL/dW_ij)^2``, the
  first-order Taylor estimate of the loss change when the weight is
  removed, with the gradient of the mean cross-entropy over the labelled
  calibration examples.

The input norms are exact for any layer whose kernel enters a matrix
product or a convolution (``dot_general``, ``conv_general_dilated``) of
the model's traced program, directly or through reshapes, transposes and
casts: for such a layer ``||X_j||^2`` summed over the outputs a weight
feeds is the gradient, with respect to the kernel, of the sum of the
same operation applied to the squared inputs. Leaves that are not such
kernels (biases, normalisations, embeddings) keep their magnitude as
their Wanda score. The program is traced with the plain JAX convolution
(:mod:`recovjax.formulations` ``conv="lax"``), whose kernel is an operand
of the convolution itself.

``make_zero(target="wanda")`` (config: ``options: {target: wanda}``)
prunes by these scores; the operator is bound to calibration data with
``op.bind(model, images, labels)``, which experiments do on the first
training examples.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from recovjax._types import Array, Params
from recovjax.models.info import KERNEL, info_by_path, paths_of

IMPORTANCE = ("wanda", "taylor")
"""The data-aware scores :func:`importance_scores` computes."""

_PRODUCTS = frozenset({"dot_general", "conv_general_dilated"})
_PASSING = frozenset({"convert_element_type", "reshape", "transpose",
                      "copy", "copy_p"})


def _kernel_product(jaxpr, var):
    """``(chain, product equation, operand index)`` where ``var`` (a
    kernel) enters a product, through single-input shape operations."""
    chain = []
    while True:
        users = [eqn for eqn in jaxpr.eqns if var in eqn.invars]
        if len(users) != 1:
            return None
        eqn = users[0]
        if eqn.primitive.name in _PRODUCTS:
            return chain, eqn, eqn.invars.index(var)
        if eqn.primitive.name not in _PASSING or len(eqn.invars) != 1:
            return None
        chain.append(eqn)
        var = eqn.outvars[0]


def _bind(eqn, *args):
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        return eqn.primitive.bind(*args, **params)


def input_norms(model: Any, params: Params, images: Any) -> dict[str, Array]:
    """``sum ||X||^2`` of the inputs every kernel entry multiplies.

    Args:
        model: a :class:`~recovjax.models.Model`.
        params: its parameters.
        images: the calibration inputs (one batch).

    Returns:
        ``{kernel path: squared input norms}``, each shaped like its
        kernel, for every kernel that enters a product; kernels used
        otherwise are left out.
    """
    from recovjax.damage.activations import _evaluate, trace_program
    from recovjax.formulations import use_formulations
    with use_formulations(conv="lax"):
        program = trace_program(model, params, images)
        closed = program.program
        leaves = jax.tree.leaves(params)
        env: dict = {}
        _evaluate(closed.jaxpr, closed.consts,
                  leaves + jax.tree.leaves(images), env=env)
        infos = info_by_path(params, model.info)
        out = {}
        for path, leaf, var in zip(paths_of(params), leaves,
                                   closed.jaxpr.invars):
            if infos[path].role != KERNEL:
                continue
            found = _kernel_product(closed.jaxpr, var)
            if found is None:
                continue
            chain, product, position = found
            other = product.invars[1 - position]
            inputs = other.val if hasattr(other, "val") else env[other]

            def summed(kernel, chain=chain, product=product,
                       position=position, squared=jnp.square(inputs)):
                for step in chain:
                    kernel = _bind(step, kernel)
                operands = [squared, kernel] if position == 1 else [
                    kernel, squared]
                return jnp.sum(_bind(product, *operands))

            out[path] = jax.grad(summed)(leaf)
    return out


def importance_scores(kind: str, model: Any, params: Params, images: Any,
                      labels: Array | None = None) -> Params:
    """Scores with the structure of ``params``; a larger one is kept longer.

    Args:
        kind: ``"wanda"`` or ``"taylor"``.
        model: a classifier :class:`~recovjax.models.Model`.
        params: its (clean) parameters.
        images: calibration inputs (one batch).
        labels: their labels (``taylor`` only).

    Returns:
        A float32 tree like ``params``.

    Raises:
        ValueError: an unknown kind, or ``taylor`` without labels.
    """
    if kind not in IMPORTANCE:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}"
                         f", got {kind!r}")
    if kind == "taylor":
        if labels is None:
            raise ValueError("importance 'taylor' weighs each weight by the "
                             "loss gradient and needs the calibration "
                             "labels")
        from recovjax.evaluate import cross_entropy
        gradient = jax.grad(lambda p: jnp.mean(cross_entropy(
            model.forward(p, images), labels)))(params)
        return jax.tree.map(lambda w, g: jnp.square(
            w.astype(jnp.float32) * g.astype(jnp.float32)), params,
            gradient)
    norms = input_norms(model, params, images)
    paths = paths_of(params)
    scores = [jnp.abs(leaf.astype(jnp.float32)) * (
        jnp.sqrt(norms[path].astype(jnp.float32)) if path in norms else 1.0)
        for path, leaf in zip(paths, jax.tree.leaves(params))]
    return jax.tree.unflatten(jax.tree.structure(params), scores)
