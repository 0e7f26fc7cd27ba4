"""Learning-rate rewinding: the pretraining schedule, rewound.

Renda et al. (2020) retrain a pruned network with the learning-rate
schedule it was trained with, from a point of that schedule, instead of
fine-tuning at a small constant rate. A schedule is described by a recipe
(the zoo's checkpoints record theirs) and rewound by an offset into its
step count; the ``lr_rewind`` strategy
(:mod:`recovjax.recovery.registry`) retrains with it.
"""

from __future__ import annotations

from typing import Any, Callable

import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
"""The optimisers a recipe can name."""

SCHEDULE_NAMES = ("constant", "cosine", "linear")
"""Learning-rate schedules :func:`training_schedule` builds."""


def training_schedule(recipe: dict, steps_per_epoch: int | None = None
                      ) -> tuple[str, Callable[[Any], Any], int, float | None,
                                 int | None]:
    """The pretraining schedule a recipe describes.

    Args:
        recipe: ``{"optimizer", "learning_rate", "schedule", "total_steps"}``
            (or ``"epochs"`` with ``steps_per_epoch``), optionally
            ``"momentum"`` and ``"batch_size"``; the zoo's checkpoints
            record exactly these (with ``epochs``).
        steps_per_epoch: optimiser steps per epoch of pretraining, for a
            recipe that gives ``epochs``.

    Returns:
        ``(optimizer name, schedule(count) -> learning rate, total steps,
        momentum, batch size)``.

    Raises:
        ValueError: a missing or malformed entry (named).
    """
    if not isinstance(recipe, dict):
        raise TypeError(f"schedule must be a dict, got {recipe!r}")
    optimizer = recipe.get("optimizer", "sgd")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"schedule.optimizer must be one of "
                         f"{', '.join(OPTIMIZERS)}, got {optimizer!r}")
    rate = recipe.get("learning_rate")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (
            rate > 0):
        raise ValueError(f"schedule.learning_rate must be a positive "
                         f"number, got {rate!r}")
    shape = recipe.get("schedule", "constant")
    if shape not in SCHEDULE_NAMES:
        raise ValueError(f"schedule.schedule must be one of "
                         f"{', '.join(SCHEDULE_NAMES)}, got {shape!r}")
    total = recipe.get("total_steps")
    if total is None and "epochs" in recipe and steps_per_epoch:
        total = int(recipe["epochs"]) * int(steps_per_epoch)
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"schedule.total_steps must be a positive int (or "
                         f"give epochs and batch_size), got {total!r}")
    if shape == "cosine":
        function = optax.cosine_decay_schedule(float(rate), total)
    elif shape == "linear":
        function = optax.linear_schedule(float(rate), 0.0, total)
    else:
        function = optax.constant_schedule(float(rate))
    return (optimizer, function, total, recipe.get("momentum"),
            recipe.get("batch_size"))


def rewound_optimizer(name: str, schedule: Callable[[Any], Any],
                      start: int, momentum: float | None
                      ) -> optax.GradientTransformation:
    """The optimiser ``name`` on ``schedule`` from step ``start``."""
    rewound = lambda count: schedule(count + start)
    if name == "sgd":
        return optax.sgd(rewound, momentum=momentum or None)
    if name == "adam":
        return optax.adam(rewound)
    return optax.adamw(rewound)
