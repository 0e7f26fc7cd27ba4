"""Measures of recovery: ratio, steps to a threshold, cost, and tidy rows.

Everything here runs on the host, on arrays already read back from the
device once per run.
"""

from __future__ import annotations

import math
import resource
import sys
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jax_core

from recovjax import stats
from recovjax._types import ApplyFn, Params
from recovjax.evaluate import cross_entropy
from recovjax.recovery.finetune import Curve, FinetuneResult

THRESHOLDS: tuple[float, ...] = (0.95, 0.99)
"""Fractions of clean accuracy whose steps-to-reach are reported."""


def recovery_ratio(clean: Any, damaged: Any, after: Any, *,
                   examples: int | None = None) -> Any:
    """``(after - damaged) / (clean - damaged)``, elementwise.

    1 means full recovery, 0 none, negative a further loss. Where the damage
    did not change the metric (``clean == damaged``) the ratio is undefined
    and NaN is returned, rather than a misleading 1 or infinity. Given the
    test-set size ``examples`` of an accuracy, the ratio is also NaN where
    ``|clean - damaged|`` is within the clean model's test noise (less than
    2 binomial standard errors ``2 sqrt(p (1 - p) / n)`` of the clean
    accuracy ``p``; see :func:`recovjax.stats.recovery_ratio`).

    Args:
        clean: metric of the undamaged model (scalar or array).
        damaged: metric right after damage.
        after: metric after recovery.
        examples: the number of test examples the accuracies were measured
            on; ``None``: only a zero gap is undefined.

    Returns:
        A float, or a float array of the broadcast shape.

    Raises:
        ValueError, TypeError: for an ``examples`` that is not a positive
            int.
    """
    return stats.recovery_ratio(clean, damaged, after, examples=examples)


def steps_to_fraction(steps: Sequence[int], accuracy: Sequence[float],
                      clean_accuracy: float, fraction: float = 0.95
                      ) -> int | None:
    """First curve step whose accuracy reaches ``fraction * clean_accuracy``.

    Args:
        steps: ``[P]`` curve steps (ascending).
        accuracy: ``[P]`` accuracy at those steps.
        clean_accuracy: accuracy of the undamaged model.
        fraction: e.g. 0.95 or 0.99.

    Returns:
        The step, or ``None`` when the curve never reaches it ("not
        reached"). The resolution is the curve's evaluation interval.
    """
    index = _first_reaching(accuracy, clean_accuracy, fraction)
    return None if index is None else int(np.asarray(steps)[index])


def samples_to_fraction(curve: Curve, clean_accuracy: float,
                        fraction: float = 0.95) -> int | None:
    """Training examples used before the curve reaches the threshold."""
    index = _first_reaching(curve.accuracy, clean_accuracy, fraction)
    return None if index is None else int(np.asarray(curve.samples)[index])


def _first_reaching(accuracy, clean_accuracy, fraction) -> int | None:
    accuracy = np.asarray(accuracy, np.float64)
    reached = np.flatnonzero(accuracy >= fraction * float(clean_accuracy))
    return int(reached[0]) if reached.size else None


class Cost(NamedTuple):
    """XLA's cost analysis of one compiled function.

    Attributes:
        flops: floating-point operations (XLA's count; NaN if unavailable).
        bytes_accessed: bytes XLA expects the program to read and write.
    """

    flops: float
    bytes_accessed: float


def compiled_cost(function: Callable[..., Any], *args: Any) -> Cost:
    """Cost of ``jax.jit(function)`` on ``args`` from XLA's cost analysis.

    Args:
        function: a traceable function.
        *args: example arguments (arrays or ``ShapeDtypeStruct``).

    Returns:
        :class:`Cost`.
    """
    analysis = jax.jit(function).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # Older JAX: one per device.
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return Cost(flops=float(analysis.get("flops", math.nan)),
                bytes_accessed=float(analysis.get("bytes accessed",
                                                  math.nan)))


_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call",
                    "custom_jvp_call", "custom_vjp_call", "remat",
                    "checkpoint"})


def _sub_jaxpr(eqn: Any) -> Any:
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return inner if hasattr(inner, "jaxpr") else None


def _has_scan(jaxpr: Any, seen: dict) -> bool:
    key = id(jaxpr)
    if key not in seen:
        seen[key] = any(
            eqn.primitive.name == "scan" or (
                eqn.primitive.name in _CALLS and _sub_jaxpr(eqn) is not None
                and _has_scan(_sub_jaxpr(eqn).jaxpr, seen))
            for eqn in jaxpr.eqns)
    return seen[key]


def _jaxpr_flops(closed: Any, seen: dict) -> tuple[float, float]:
    """``(FLOPs with every loop iteration, XLA's own count)`` of a jaxpr.

    XLA's cost analysis counts the body of a loop once, whatever its trip
    count. So the program's own count is taken, and each ``scan`` adds its
    body ``length - 1`` more times (the body's count found the same way,
    so nested loops multiply). Only calls that hold a loop are looked
    into; XLA counts the others in line.
    """
    xla = _xla_flops(closed)
    total = xla
    for eqn in closed.jaxpr.eqns:
        if eqn.primitive.name == "scan":
            body_total, body_xla = _jaxpr_flops(eqn.params["jaxpr"], seen)
            total += eqn.params["length"] * body_total - body_xla
        elif eqn.primitive.name in _CALLS and _sub_jaxpr(eqn) is not None \
                and _has_scan(_sub_jaxpr(eqn).jaxpr, seen):
            inner_total, inner_xla = _jaxpr_flops(_sub_jaxpr(eqn), seen)
            total += inner_total - inner_xla
    return total, xla


def _xla_flops(closed: Any) -> float:
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
             for v in closed.jaxpr.invars]
    # The lowered (unoptimised) program's count: the same operations as
    # the compiled one's without the cost of compiling it once more.
    lowered = jax.jit(jax_core.jaxpr_as_fun(closed)).lower(*avals)
    try:
        analysis = lowered.cost_analysis()
    except Exception:  # A backend that counts only compiled programs.
        analysis = lowered.compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # Older JAX: one per device.
        analysis = analysis[0] if analysis else {}
    if not analysis:
        return math.nan  # the backend does not count
    # A program of integer and data movement operations has no "flops".
    return float(analysis.get("flops", 0.0))


def program_flops(function: Callable[..., Any], *args: Any) -> float:
    """FLOPs of one call of ``function`` on ``args``, loops unrolled.

    XLA's cost analysis of the lowered program (the operations as traced,
    before XLA's optimisations; nothing is compiled), with every
    ``lax.scan`` body counted once per iteration (XLA's own count takes a loop body
    once); a ``while_loop``, whose trip count is unknown before it runs,
    counts once.

    Args:
        function: a traceable function.
        *args: example arguments (arrays or ``ShapeDtypeStruct``).

    Returns:
        The FLOPs, or NaN where the backend does not count them.
    """
    return _jaxpr_flops(jax.make_jaxpr(function)(*args), {})[0]


def train_step_cost(apply: ApplyFn, params: Params, batch_shape: tuple[int, ...],
                    optimizer: optax.GradientTransformation | None = None
                    ) -> Cost:
    """Cost of one fine-tuning step (forward, backward, optimiser update).

    Args:
        apply: ``apply(params, x) -> logits``.
        params: parameters (or ``ShapeDtypeStruct`` leaves) of one model.
        batch_shape: ``(batch_size, H, W, C)``.
        optimizer: optax transformation (default SGD with momentum).

    Returns:
        :class:`Cost` of the compiled step.
    """
    from recovjax.recovery.finetune import default_optimizer
    optimizer = optimizer if optimizer is not None else default_optimizer()

    def step(params, opt_state, images, labels):
        def objective(params):
            return cross_entropy(apply(params, images), labels).mean()
        value, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = jax.eval_shape(optimizer.init, params)
    images = jax.ShapeDtypeStruct(tuple(batch_shape), jnp.float32)
    labels = jax.ShapeDtypeStruct(tuple(batch_shape[:1]), jnp.int32)
    return compiled_cost(step, params, opt_state, images, labels)


def task_step_cost(task: Any, forward: ApplyFn, params: Params,
                   batch: Any,
                   optimizer: optax.GradientTransformation | None = None
                   ) -> Cost:
    """Cost of one fine-tuning step on a :class:`~recovjax.tasks.Task`.

    Args:
        task: the task.
        forward: ``forward(params, inputs) -> outputs``.
        params: parameters (or ``ShapeDtypeStruct`` leaves) of one model.
        batch: one batch (arrays or ``ShapeDtypeStruct`` leaves, leading
            batch axis) of the task's keys.
        optimizer: optax transformation (default SGD with momentum).

    Returns:
        :class:`Cost` of the compiled step.
    """
    from recovjax.recovery.finetune import default_optimizer
    from recovjax.tasks import mean_loss
    optimizer = optimizer if optimizer is not None else default_optimizer()

    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(
            lambda p: mean_loss(task, forward, p, batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = jax.eval_shape(optimizer.init, params)
    return compiled_cost(step, params, opt_state, batch)


class PeakMemory(NamedTuple):
    """Peak memory of this process.

    Attributes:
        host_bytes: peak resident set size (``getrusage`` ``ru_maxrss``).
        device_bytes: peak bytes in use on the default device where the
            backend reports it (GPU/TPU), else ``None``.
    """

    host_bytes: int
    device_bytes: int | None


def peak_memory() -> PeakMemory:
    """Peak host RSS and, where available, peak device memory."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux and bytes on macOS.
    host = int(rss if sys.platform == "darwin" else rss * 1024)
    device = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # Backends without memory statistics.
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        device = int(stats["peak_bytes_in_use"])
    return PeakMemory(host_bytes=host, device_bytes=device)


def _model_rows(result: FinetuneResult, index: int | None
                ) -> tuple[Curve, np.ndarray, np.ndarray]:
    curve = jax.tree.map(np.asarray, result.curve)
    diverged = np.asarray(result.diverged)
    diverged_step = np.asarray(result.diverged_step)
    if index is not None:
        curve = jax.tree.map(lambda x: x[index], curve)
        diverged, diverged_step = diverged[index], diverged_step[index]
    return curve, diverged, diverged_step


def recovery_records(result: FinetuneResult, *, damage: str,
                     ratios: Iterable[float], seeds: Iterable[int],
                     clean_accuracy: float, clean_loss: float | None = None,
                     damaged_accuracy: Sequence[float] | None = None,
                     damaged_loss: Sequence[float] | None = None,
                     cost: dict[str, float] | None = None,
                     thresholds: Sequence[float] = THRESHOLDS,
                     examples: int | None = None,
                     **columns: Any) -> list[dict[str, Any]]:
    """Tidy rows (damage, ratio, seed, stage, metric, value, step) of a run.

    One call covers a stack of recovered models (model ``i`` has
    ``ratios[i]`` and ``seeds[i]``). Rows per model:

    - stage ``clean``: accuracy (and loss) of the undamaged model, step 0;
    - stage ``damaged``: accuracy/loss at step 0, taken from the first curve
      point unless ``damaged_accuracy`` is given;
    - stage ``recovered``: accuracy/loss at every curve point (``step`` =
      updates performed), ``recovery_ratio`` at the final step,
      ``steps_to_95``/``samples_to_95`` (and 99; value NaN = not reached),
      ``diverged`` (1.0/0.0) with ``step`` = first non-finite slot (or -1),
      and any ``cost`` entries (wall seconds, FLOPs, bytes read, memory).

    A diverged model's rows are kept, with its NaN metrics, so one diverging
    point never hides the others.

    Args:
        result: a (stacked) :class:`FinetuneResult` with a curve.
        damage: damage name.
        ratios: damage amount of every model.
        seeds: seed of every model.
        clean_accuracy: accuracy of the undamaged model.
        clean_loss: its loss, if known.
        damaged_accuracy: per-model accuracy after damage (default: the
            curve's first point).
        damaged_loss: per-model loss after damage.
        cost: per-run measures to add as ``recovered`` rows at the last step.
        thresholds: fractions of clean accuracy for steps-to-reach.
        examples: the number of test examples behind the accuracies; the
            ``recovery_ratio`` row is NaN where the damage is within their
            noise (see :func:`recovery_ratio`). ``None``: only a zero gap.
        **columns: extra constant columns (e.g. ``strategy="finetune"``).

    Returns:
        A list of row dicts.
    """
    ratios, seeds = list(ratios), list(seeds)
    if len(ratios) != len(seeds):
        raise ValueError(f"{len(ratios)} ratios but {len(seeds)} seeds")
    stacked = np.ndim(result.diverged) > 0
    count = np.shape(result.diverged)[0] if stacked else 1
    if len(ratios) != count:
        raise ValueError(f"result holds {count} models but {len(ratios)} "
                         "ratios/seeds were given")
    rows: list[dict[str, Any]] = []

    def add(index, stage, metric, value, step):
        rows.append({"damage": damage, "ratio": float(ratios[index]),
                     "seed": int(seeds[index]), "stage": stage,
                     "metric": metric, "value": float(value),
                     "step": int(step), **columns})

    for index in range(count):
        curve, diverged, diverged_step = _model_rows(
            result, index if stacked else None)
        if curve.accuracy.size == 0:
            raise ValueError("the result has no curve; run the fine-tune with "
                             "eval_batches")
        add(index, "clean", "accuracy", clean_accuracy, 0)
        if clean_loss is not None:
            add(index, "clean", "loss", clean_loss, 0)
        before_accuracy = (curve.accuracy[0] if damaged_accuracy is None
                           else damaged_accuracy[index])
        before_loss = (curve.loss[0] if damaged_loss is None
                       else damaged_loss[index])
        add(index, "damaged", "accuracy", before_accuracy, 0)
        add(index, "damaged", "loss", before_loss, 0)
        for step, accuracy, loss in zip(curve.steps, curve.accuracy,
                                        curve.loss):
            add(index, "recovered", "accuracy", accuracy, step)
            add(index, "recovered", "loss", loss, step)
        last = int(curve.steps[-1])
        add(index, "recovered", "recovery_ratio", recovery_ratio(
            clean_accuracy, before_accuracy, curve.accuracy[-1],
            examples=examples), last)
        for fraction in thresholds:
            label = f"{round(fraction * 100):d}"
            step = steps_to_fraction(curve.steps, curve.accuracy,
                                     clean_accuracy, fraction)
            samples = samples_to_fraction(curve, clean_accuracy, fraction)
            add(index, "recovered", f"steps_to_{label}",
                math.nan if step is None else step, last)
            add(index, "recovered", f"samples_to_{label}",
                math.nan if samples is None else samples, last)
        add(index, "recovered", "diverged", float(diverged),
            int(diverged_step))
        for metric, value in (cost or {}).items():
            add(index, "recovered", metric, value, last)
    return rows
