"""The seed's experiment, reproduced through the Python API.

Pretrained LeNet-5 on ``mnist5k``; zero 10 % of the entries of every tensor;
evaluate; fine-tune 2 epochs with SGD (lr 0.001, momentum 0.9, batch 100);
evaluate. One vmapped program damages and one recovers all seeds at once.
The config is ``experiments/seed_mnist.yaml``::

    python -m recovjax.recovery.seed experiments/seed_mnist.yaml
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recovjax import stats
from recovjax._types import Damage, Dataset, Params, Split
from recovjax.data import batch_split, load_dataset
from recovjax.evaluate import evaluate
from recovjax.models import get_model
from recovjax.recovery.points import recover_damage
from recovjax.recovery.registry import get_strategy, make_task
from recovjax.recovery.measure import recovery_ratio, recovery_records

@dataclasses.dataclass(frozen=True)
class SeedExperimentResult:
    """Accuracies of the seed's experiment, one entry per seed.

    Attributes:
        seeds: the integer seeds.
        clean_accuracy: test accuracy of the pretrained model (one value).
        damaged_accuracy: ``[seeds]`` after zeroing.
        recovered_accuracy: ``[seeds]`` after fine-tuning.
        recovered_loss: ``[seeds]`` test loss after fine-tuning.
        diverged: ``[seeds]`` bool.
        rows: tidy rows (damage, ratio, seed, stage, metric, value, step).
        seconds: wall time of damage + recovery (compilation included).
        config: the settings used.
    """

    seeds: tuple[int, ...]
    clean_accuracy: float
    damaged_accuracy: np.ndarray
    recovered_accuracy: np.ndarray
    recovered_loss: np.ndarray
    diverged: np.ndarray
    rows: list[dict[str, Any]]
    seconds: float
    config: dict[str, Any]

    def summary(self) -> dict[str, stats.Interval]:
        """``{stage: interval}`` of the accuracies (:mod:`recovjax.stats`).

        ``clean`` is one model: its Wilson score interval over the test
        examples. ``damaged`` and ``recovered`` are the bootstrap
        percentile intervals of the mean over seeds (for one seed, the
        Wilson interval over the test examples).
        """
        examples = self.config.get("test_examples")
        return {"clean": stats.mean_interval([self.clean_accuracy],
                                             examples=examples),
                "damaged": stats.mean_interval(self.damaged_accuracy,
                                               examples=examples),
                "recovered": stats.mean_interval(self.recovered_accuracy,
                                                 examples=examples)}

    def describe(self) -> str:
        """One line per stage: ``mean [low, high]``, and the method."""
        lines = [f"{len(self.seeds)} seeds, {self.config['model']} on "
                 f"{self.config['dataset']}, zero {self.config['ratio']:.0%} "
                 "of every tensor:"]
        summary = self.summary()
        for stage, interval in summary.items():
            shown = f"{interval.estimate:.4f}"
            if not np.isnan(interval.low):
                shown += f" [{interval.low:.4f}, {interval.high:.4f}]"
            lines.append(f"  {stage:<9} accuracy {shown}")
        examples = self.config.get("test_examples")
        lines.append("  " + stats.describe_method(
            {i.method for i in summary.values()}, examples=examples))
        ratios = recovery_ratio(self.clean_accuracy, self.damaged_accuracy,
                                self.recovered_accuracy, examples=examples)
        defined = ratios[np.isfinite(ratios)]
        if defined.size:
            ratio = stats.bootstrap_mean(defined)
            shown = f"{ratio.estimate:.3f}"
            if not np.isnan(ratio.low):
                shown += f" [{ratio.low:.3f}, {ratio.high:.3f}]"
            lines.append(f"  recovery ratio {shown} (mean over the "
                         f"{defined.size}/{ratios.size} seeds where it is "
                         "defined)")
        else:
            lines.append("  recovery ratio undefined (the damage is within "
                         "the clean model's test noise)")
        return "\n".join(lines)


def _zero_damage(**options: Any) -> Callable[..., Damage]:
    from recovjax.damage import get_damage
    return get_damage("zero", **options)


def _subset(split: Split, size: int | None) -> Split:
    if size is None:
        return split
    return Split(split.images[:size], split.labels[:size])


def run_seed_experiment(seeds: int = 10, *, model: str = "lenet5",
                        dataset: str | Dataset = "mnist5k",
                        ratio: float = 0.1, learning_rate: float = 1e-3,
                        momentum: float = 0.9, batch_size: int = 100,
                        epochs: int | None = 2, steps: int | None = None,
                        pretrained_seed: int = 0,
                        pretrained_params: Params | None = None,
                        pretrained_state: Any = None,
                        train_size: int | None = None,
                        test_size: int | None = None,
                        eval_every: int | None = None,
                        damage_op: Callable[..., Damage] | None = None,
                        damage_options: Mapping[str, Any] | None = None,
                        eval_batch_size: int = 500,
                        first_seed: int = 0) -> SeedExperimentResult:
    """Reproduce the seed's experiment over ``seeds`` seeds.

    Seed ``s`` (an int, converted to a key here at the API boundary) gives the
    damage key ``fold_in(key(s), 0)`` and the data-order key
    ``fold_in(key(s), 1)``. All seeds are damaged by one vmapped call and
    recovered by one vmapped fine-tune; evaluation happens inside it (before
    the first step and after the last), so the device is read once.

    Args:
        seeds: number of seeds (``first_seed, ..., first_seed + seeds - 1``).
        model: model name.
        dataset: dataset name or a loaded dataset.
        ratio: fraction of every tensor's entries zeroed.
        learning_rate: SGD learning rate.
        momentum: SGD momentum.
        batch_size: fine-tuning batch size.
        epochs: fine-tuning epochs (``None`` when ``steps`` is given).
        steps: fine-tuning steps instead of epochs.
        pretrained_seed: seed of the pretrained zoo model.
        pretrained_params: use these parameters instead of the zoo's.
        pretrained_state: the model state (batch statistics) that goes
            with ``pretrained_params``, for a model with state; the zoo's
            weights come with theirs.
        train_size: use only the first examples of the train split (tests).
        test_size: use only the first examples of the test split (tests).
        eval_every: also record the curve every this many steps.
        damage_op: ``op(key, params, amount) -> Damage``; default the
            registry's ``zero`` built with ``damage_options``.
        damage_options: options of the registry's ``zero`` (e.g. ``scope``).
        eval_batch_size: evaluation batch size.
        first_seed: the first seed.

    Returns:
        :class:`SeedExperimentResult`.

    Raises:
        ValueError: non-positive ``seeds`` or a ratio outside ``[0, 1]``;
            ``pretrained_params`` of a model with state given without
            ``pretrained_state``, or ``pretrained_state`` without
            ``pretrained_params``.
    """
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if steps is not None:
        epochs = None
    network = get_model(model)
    if pretrained_params is None and pretrained_state is not None:
        raise ValueError("pretrained_state: given without pretrained_params "
                         "(the zoo's weights come with their own state)")
    if (pretrained_params is not None and network.state
            and pretrained_state is None):
        raise ValueError(f"pretrained_state: model {model!r} has state "
                         "(batch statistics); pass the state trained with "
                         "pretrained_params")
    data = load_dataset(dataset) if isinstance(dataset, str) else dataset
    train = _subset(data.train, train_size)
    test = _subset(data.test, test_size)
    if pretrained_params is None:
        from recovjax.pretrain import load_pretrained
        pretrained = load_pretrained(model, data.name, seed=pretrained_seed,
                                     progress=False)
        pretrained_params, pretrained_state = (pretrained.params,
                                               pretrained.state)
    if network.state:
        network = network.with_state(pretrained_state)
    if damage_op is None:
        damage_op = _zero_damage(**dict(damage_options or {}))
    seed_values = tuple(range(first_seed, first_seed + seeds))
    keys = jax.vmap(jax.random.key)(jnp.asarray(seed_values))
    damage_keys = jax.vmap(lambda key: jax.random.fold_in(key, 0))(keys)
    order_keys = jax.vmap(lambda key: jax.random.fold_in(key, 1))(keys)
    eval_batches = batch_split(test, eval_batch_size)
    task = make_task(network, train, eval_batches=eval_batches)

    start = time.perf_counter()
    clean = jax.jit(lambda p: evaluate(network.forward, p, eval_batches,
                                       network.num_classes))(
                                           pretrained_params)
    strategy = get_strategy(
        "finetune", optimizer=optax.sgd(learning_rate,
                                        momentum=momentum or None),
        batch_size=batch_size, epochs=epochs, steps=steps,
        eval_every=eval_every)
    # Each seed's damaged model is re-derived inside the recovery program.
    result = recover_damage(strategy, task, damage_op, pretrained_params,
                            damage_keys=damage_keys,
                            amounts=jnp.full((seeds,), ratio, jnp.float32),
                            keys=order_keys)
    result, clean = jax.device_get((result, clean))
    seconds = time.perf_counter() - start

    config = {"model": model, "dataset": data.name, "ratio": ratio,
              "damage": "zero", "learning_rate": learning_rate,
              "momentum": momentum, "batch_size": batch_size,
              "epochs": epochs, "steps": steps,
              "pretrained_seed": pretrained_seed,
              "train_examples": len(train), "test_examples": len(test)}
    rows = recovery_records(
        result, damage="zero", ratios=[ratio] * seeds, seeds=seed_values,
        clean_accuracy=float(clean.accuracy), clean_loss=float(clean.loss),
        cost={"wall_seconds": seconds}, strategy="finetune",
        examples=len(test))
    return SeedExperimentResult(
        seeds=seed_values, clean_accuracy=float(clean.accuracy),
        damaged_accuracy=np.asarray(result.curve.accuracy[:, 0]),
        recovered_accuracy=np.asarray(result.curve.accuracy[:, -1]),
        recovered_loss=np.asarray(result.curve.loss[:, -1]),
        diverged=np.asarray(result.diverged), rows=rows, seconds=seconds,
        config=config)


def load_config(path: os.PathLike[str] | str,
                overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read an experiment config (``experiments/seed_mnist.yaml``) as arguments.

    The file is loaded and validated by :func:`recovjax.config.load_config`
    (the same schema as ``recovjax recover --config``), then mapped by
    :func:`config_arguments`.

    Raises:
        recovjax.config.ConfigError: a missing file or an invalid config.
        ValueError: a config this experiment does not run.
    """
    from recovjax.config import load_config as load_experiment
    return config_arguments(load_experiment(path, overrides))


def config_arguments(config: Any) -> dict[str, Any]:
    """Map an :class:`~recovjax.config.ExperimentConfig` to arguments.

    ``sweep.seeds`` becomes ``seeds`` and the root ``seed`` the first seed;
    the one damage must be ``zero`` with one ratio (its options, e.g.
    ``scope``, are passed to the operator); the one strategy must be
    ``finetune`` with SGD.

    Raises:
        ValueError: a config this experiment does not run.
    """
    if len(config.damage) != 1 or config.damage[0].kind != "zero":
        raise ValueError("the seed experiment zeroes weights: exactly one "
                         "damage entry of kind 'zero'")
    damage = config.damage[0]
    if len(damage.ratios) != 1:
        raise ValueError("the seed experiment uses one damage ratio, got "
                         f"{list(damage.ratios)}")
    recovery = config.recovery
    names = [getattr(s, "name", s) for s in (recovery.strategies
                                             if recovery else ())]
    if names != ["finetune"]:
        raise ValueError("the seed experiment recovers by fine-tuning "
                         f"(strategies: [finetune]), got {names}")
    if recovery.optimizer.name != "sgd":
        raise ValueError("the seed experiment fine-tunes with SGD, got "
                         f"{recovery.optimizer.name!r}")
    return {"seeds": config.sweep.seeds, "model": config.model,
            "dataset": config.dataset, "ratio": float(damage.ratios[0]),
            "damage_options": dict(damage.options),
            "learning_rate": recovery.optimizer.learning_rate,
            "momentum": recovery.optimizer.momentum or 0.0,
            "batch_size": recovery.batch_size,
            "epochs": None if recovery.steps is not None else recovery.epochs,
            "steps": recovery.steps,
            "pretrained_seed": config.pretrain_seed,
            "test_size": config.evaluate.test_examples,
            "train_size": recovery.data.train_examples,
            "eval_batch_size": config.evaluate.batch_size,
            "eval_every": recovery.eval_every,
            "first_seed": config.seed}


def main(argv: list[str] | None = None) -> int:
    """``python -m recovjax.recovery.seed [config.yaml]``: run and print."""
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else os.path.join("experiments", "seed_mnist.yaml")
    result = run_seed_experiment(**load_config(path))
    print(result.describe())
    print("  damaged per seed:   "
          + " ".join(f"{a:.3f}" for a in result.damaged_accuracy))
    print("  recovered per seed: "
          + " ".join(f"{a:.3f}" for a in result.recovered_accuracy))
    print(f"  ({result.seconds:.1f} s for damage + recovery of "
          f"{len(result.seeds)} models, compilation included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
