"""Damage-recover cycles: Han et al.'s prune-retrain, gradual pruning.

The ``iterative`` strategy (:mod:`recovjax.recovery.registry`) damages and
recovers in stages up to a point's amount; this module holds its schedule
and its point function.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from recovjax.recovery import points
from recovjax.recovery.finetune import Curve


def cubic_fractions(stages: int) -> tuple[float, ...]:
    """Gradual pruning's schedule (Zhu & Gupta 2017): the fraction of the
    final amount after stage ``t`` of ``n`` is ``1 - (1 - t / n) ** 3``."""
    return tuple(1.0 - (1.0 - t / stages) ** 3 for t in range(1, stages + 1))


def stages_fn(fn: points.PointStrategyFn, fractions: tuple[float, ...]
              ) -> Callable:
    """A strategy's point function applied in damage-recover cycles.

    Cycle ``k`` damages the previous cycle's model at ``fractions[k]`` of
    the point's amount (:class:`~recovjax.recovery.points.Stages`) and
    recovers it with ``fn``; the outcome joins the cycles' curves and
    losses.
    """
    def staged(key, params, mask, shared, stages: points.Stages):
        del params, mask  # the one-shot damage; the stages damage afresh
        current, outcomes = stages.clean, []
        for index, fraction in enumerate(fractions):
            damage = stages.damage_at(current, fraction)
            outcome = fn(jax.random.fold_in(key, index), damage.params,
                         damage.mask, shared)
            outcomes.append(outcome)
            current = outcome.params
        # One curve over every stage's steps; a stage's first point (its
        # freshly damaged model) shows the dip of each cycle.
        offsets, done = [], jnp.int32(0)
        samples = jnp.float32(0)
        for outcome in outcomes:
            offsets.append((done, samples))
            if outcome.curve.steps.shape[0]:
                done = done + outcome.curve.steps[-1]
                samples = samples + outcome.curve.samples[-1]
        curve = Curve(*(jnp.concatenate(parts) for parts in zip(*[
            (o.curve.steps + d, o.curve.samples + s, o.curve.accuracy,
             o.curve.loss) for o, (d, s) in zip(outcomes, offsets)])))
        steps = [o.losses.shape[-1] for o in outcomes]
        first = jnp.int32(-1)
        for outcome, start in zip(outcomes, np.cumsum([0] + steps[:-1])):
            first = jnp.where((first < 0) & (outcome.diverged_step >= 0),
                              outcome.diverged_step + int(start), first)
        return points.PointOutcome(
            params=current, curve=curve,
            losses=jnp.concatenate([o.losses for o in outcomes]),
            diverged=first >= 0, diverged_step=first, restored={},
            state=outcomes[-1].state)

    return staged
