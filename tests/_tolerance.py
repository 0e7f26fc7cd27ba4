"""Tolerances derived from float32 rounding, the same on every CPU.

XLA:CPU generates kernels for the machine's SIMD width (SSE, AVX2,
AVX-512), so a float32 dot product or reduction sums its terms in an order
that depends on the CPU; two programs that compute the same sum differently
(banded GEMM vs ``lax.conv``, vmapped vs one model at a time) agree only up
to rounding, and by how much depends on the machine. A tolerance read off
one machine's result (``rtol=1e-5``) therefore fails on another. The
tolerances here come from bounds on the rounding error instead, which hold
for any summation order:

A float32 sum of ``n`` terms, in any order and any blocking, is within
``gamma(n) = n * u / (1 - n * u)`` (``u = eps / 2``) of the exact sum,
relative to the sum of the terms' absolute values (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., eq. 3.4 and §4.2). That bound
assumes every rounding goes the same way; rounding errors behave as
independent, zero-mean variables, and then the error stays within
``lambda * sqrt(n) * u`` of that sum except with probability at most
``2 * n * exp(-lambda**2 / 2)`` (Higham and Mary, "A new approach to
probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019,
Theorem 3.1). With ``lambda = 8`` that is below ``1e-13 * n``: no machine
will see it. Two float32 evaluations (or one and a float64 reference)
differ by at most twice the bound, the smaller of the two bounds.

Through a chain of sums (layers, forward and backward passes) the terms of
the chain's last sum carry the rounding of the earlier ones, so ``n`` is
the total of the chain's reduction lengths, relative to the last sum's
absolute terms (or, where cheap, to the chain computed on absolute values).
Elementwise functions (``tanh``, ``exp``, ``cos``) add a few ulps each:
count each as one more term.
"""

from __future__ import annotations

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
"""2**-23, the spacing of float32 numbers at 1."""


LAMBDA = 8.0
"""Probabilistic bound's multiple of ``sqrt(n) * u`` (see above)."""


def sum_error_bound(terms: int) -> float:
    """Largest difference of two float32 evaluations of one sum, relative to
    the sum of the absolute values of its terms.

    Args:
        terms: the reduction length, or the total of a chain's lengths
            (plus one per elementwise function on the way).

    Returns:
        Twice the smaller of the worst-case ``gamma(terms + 1)`` and the
        probabilistic ``LAMBDA * sqrt(terms + 1) * u``; the extra term is
        the rounding of each product (none with a fused multiply-add).

    Raises:
        ValueError: if ``terms`` is not positive or too large for float32.
    """
    count = terms + 1
    u = EPS32 / 2
    if terms < 1 or count * u >= 0.5:
        raise ValueError(f"no float32 error bound for {terms} terms")
    worst = count * u / (1 - count * u)
    return 2 * min(worst, LAMBDA * math.sqrt(count) * u)


def assert_sums_close(actual, desired, *, terms: int, magnitude,
                      err_msg: str = "") -> None:
    """Assert ``|actual - desired| <= sum_error_bound(terms) * magnitude``.

    Args:
        actual, desired: the two results (arrays of one shape, or scalars).
        terms: as in :func:`sum_error_bound`.
        magnitude: the sum of the absolute values of the summed terms, per
            element or one upper bound for all (broadcast against
            ``desired``); typically the same computation applied to the
            absolute values of its inputs.
        err_msg: appended to the failure message.

    Raises:
        AssertionError: if some element is further apart than the bound.
    """
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    bound = sum_error_bound(terms) * np.broadcast_to(
        np.asarray(magnitude, np.float64), desired.shape)
    excess = np.abs(actual - desired) - bound
    if not np.all(excess <= 0):  # Also catches NaN on one side.
        worst = np.unravel_index(np.nanargmax(np.where(
            np.isnan(excess), np.inf, excess)), excess.shape)
        raise AssertionError(
            f"{int(np.sum(~(excess <= 0)))} of {excess.size} elements differ "
            f"beyond the float32 bound for {terms} terms; worst at {worst}: "
            f"{actual[worst]!r} vs {desired[worst]!r}, bound "
            f"{bound[worst]:.3g}. {err_msg}")


# LeNet-5 (the suite's trained model): the reduction lengths of its chain
# (conv 5x5x1 and 5x5x6, dense 256, 120 and 84, each plus its bias).
LENET5_TERMS = (25 + 1) + (150 + 1) + (256 + 1) + (120 + 1) + (84 + 1)


def lenet5_logit_magnitude(params, images) -> np.ndarray:
    """The sum of the absolute values of each LeNet-5 logit's last terms.

    Args:
        params: LeNet-5 parameters (``conv1`` ... ``fc3``), any widths.
        images: ``[N, 28, 28, 1]`` inputs.

    Returns:
        ``[N, classes]``: ``|h| @ |W_fc3| + |b_fc3|`` with ``h`` the
        ``fc2`` activations, in float64.
    """
    from recovjax.models.layers import conv_relu_pool_stack
    layers = tuple((params[name]["kernel"], params[name]["bias"])
                   for name in ("conv1", "conv2"))
    hidden = np.asarray(conv_relu_pool_stack(images, layers), np.float64)
    for name in ("fc1", "fc2"):
        hidden = np.maximum(hidden @ np.asarray(params[name]["kernel"],
                                                np.float64)
                            + np.asarray(params[name]["bias"], np.float64),
                            0.0)
    return (np.abs(hidden) @ np.abs(np.asarray(params["fc3"]["kernel"],
                                               np.float64))
            + np.abs(np.asarray(params["fc3"]["bias"], np.float64)))


def lenet5_loss_bound(params, images, loss: float) -> float:
    """How far two float32 evaluations of LeNet-5's mean cross-entropy over
    ``images`` may lie apart.

    Each logit is within the chain's bound of its exact value, relative to
    its last sum's absolute terms; the cross-entropy moves by at most twice
    the largest logit change (its gradient, softmax minus one-hot, has an
    L1 norm of at most 2); the log-sum-exp over the classes and the mean
    over the examples add their own sums.

    Args:
        params: LeNet-5 parameters.
        images: the evaluated inputs (padding excluded).
        loss: the mean cross-entropy (for the mean's own rounding).

    Returns:
        An absolute bound on the difference of the two losses.
    """
    magnitude = lenet5_logit_magnitude(params, images)
    terms = LENET5_TERMS + magnitude.shape[1] + 2 + len(images)
    return sum_error_bound(terms) * (2 * magnitude.max(axis=1).mean()
                                     + abs(float(loss)))


def lenet5_near_ties(params, images) -> int:
    """Examples whose predicted class rounding could change.

    Two float32 programs agree on an example's argmax unless its top two
    logits are closer than their rounding can move them; these are counted
    (with this function's own evaluation's rounding on top), so an accuracy
    count can only differ between programs by at most this many.

    Args:
        params: LeNet-5 parameters.
        images: the evaluated inputs (padding excluded).

    Returns:
        The number of examples with a top-two margin within the bound.
    """
    from recovjax.models import get_model
    logits = np.asarray(get_model(
        "lenet5", num_classes=np.shape(params["fc3"]["bias"])[-1]).forward(
            params, images), np.float64)
    top = np.sort(logits, axis=1)
    margin = top[:, -1] - top[:, -2]
    slack = 2 * sum_error_bound(LENET5_TERMS) * lenet5_logit_magnitude(
        params, images).max(axis=1)
    return int(np.sum(~(margin > slack)))  # NaN logits count as ties.
