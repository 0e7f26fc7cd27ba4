"""Recovery strategies from the literature, measured side by side.

On the zoo's pretrained models and the 1,000 ``mnist5k`` test images:

* **Layer-wise reconstruction against fine-tuning at equal wall time**
  (LeNet-5, magnitude pruning of every layer's weights at 50 % and 80 %,
  3 seeds). ``reconstruct`` solves each layer's surviving weights from 256
  unlabelled calibration images (no gradient step); fine-tuning (the
  seed's SGD, lr 0.001, momentum 0.9, batch 100, only the surviving
  weights) gets as many steps as fit in the reconstruction's steady wall
  time, measured the same way (the median of 3 runs after a compiling
  one, all points in one call).
* **LoRA against full fine-tuning at the same number of steps** on every
  zoo model given (random zeroing of 30 % of every layer's weights, 3
  seeds, 80 steps of SGD with momentum 0.9, batch 100, for both, at lr
  0.02, or 0.01 for the residual CNN, whose full fine-tuning is unstable
  at 0.02: 48 % where 0.01 reaches 94 %). The
  rank is the largest of 8, 4, 3, 2, 1 whose adapters train under 10 %
  of the parameters (``layers="auto"``: the kernels an adapter of that
  rank makes smaller). The figure is the share of full fine-tuning's recovery
  that LoRA reaches, ``(lora - damaged) / (finetune - damaged)``, per
  damaged model, its mean and bootstrap interval (:mod:`recovjax.stats`).

Usage::

    python benchmarks/bench_strategies.py      # lenet5, mlp, rescnn, vit
    python benchmarks/bench_strategies.py --models lenet5,mlp
    python benchmarks/bench_strategies.py --write        # update RESULTS.md
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from recovjax import stats
from recovjax.damage import get_damage
from recovjax.data import batch_split, load_dataset
from recovjax.models import get_model
from recovjax.recovery import get_strategy, make_task, recover_damage
from recovjax.recovery.lora import make_lora
from recovjax.zoo import load_pretrained
from results_md import cpu_model, write_section

SEEDS = 3
REPEATS = 3
LORA_STEPS = 80
LORA_DAMAGE = 0.3
LORA_RATE = 0.02
LORA_RATES = {"rescnn": 0.01}
RANKS = (8, 4, 3, 2, 1)
PRUNING = (0.5, 0.8)


def _setting(name: str):
    model = get_model(name)
    pretrained = load_pretrained(name, progress=False)
    data = load_dataset("mnist5k")
    task = make_task(model, data.train, checkpoint=pretrained.path,
                     eval_batches=batch_split(data.test, 250))
    return model, pretrained.params, task


def _points(amount: float):
    return dict(damage_keys=jax.random.split(jax.random.key(1), SEEDS),
                amounts=jnp.full((SEEDS,), amount),
                keys=jax.random.split(jax.random.key(2), SEEDS))


def _timed(strategy, task, op, params, amount):
    outcome = recover_damage(strategy, task, op, params, **_points(amount))
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        outcome = recover_damage(strategy, task, op, params,
                                 **_points(amount))
        seconds.append(time.perf_counter() - start)
    return outcome, statistics.median(seconds)


def reconstruction_rows() -> list[dict]:
    model, params, task = _setting("lenet5")
    op = get_damage("zero", scope="weights", target="smallest")
    damaged_strategy = get_strategy("finetune_undamaged", steps=1,
                                    learning_rate=0.0)
    rows = []
    for amount in PRUNING:
        damaged = recover_damage(damaged_strategy, task, op, params,
                                 **_points(amount)).curve.accuracy[:, 0]
        rebuilt, rebuilt_s = _timed(get_strategy("reconstruct",
                                                 calibration=256),
                                    task, op, params, amount)
        probe_steps = 40
        _, probe_s = _timed(get_strategy("finetune_undamaged",
                                         steps=probe_steps), task, op,
                            params, amount)
        steps = max(1, round(probe_steps * rebuilt_s / probe_s))
        tuned, tuned_s = _timed(get_strategy("finetune_undamaged",
                                             steps=steps), task, op, params,
                                amount)
        clean = float(np.asarray(recover_damage(
            get_strategy("restore_full"), task, op, params,
            **_points(amount)).curve.accuracy)[0, 0])
        rows.append({"amount": amount, "clean": clean,
                     "damaged": np.asarray(damaged),
                     "reconstruct": np.asarray(rebuilt.curve.accuracy[:, -1]),
                     "reconstruct_s": rebuilt_s,
                     "finetune": np.asarray(tuned.curve.accuracy[:, -1]),
                     "finetune_s": tuned_s, "steps": steps})
    return rows


def lora_rows(names: list[str]) -> list[dict]:
    rows = []
    op = get_damage("zero", scope="weights")
    for name in names:
        model, params, task = _setting(name)
        total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        for rank in RANKS:
            adapter = make_lora(params, model.info, rank=rank)
            if adapter.trainable < 0.1 * total:
                break
        rate = LORA_RATES.get(name, LORA_RATE)
        common = dict(steps=LORA_STEPS, eval_every=LORA_STEPS,
                      learning_rate=rate)
        full = recover_damage(get_strategy("finetune", **common), task, op,
                              params, **_points(LORA_DAMAGE))
        low_rank = recover_damage(get_strategy("lora", rank=rank, **common),
                                  task, op, params, **_points(LORA_DAMAGE))
        damaged = np.asarray(full.curve.accuracy[:, 0], np.float64)
        after_full = np.asarray(full.curve.accuracy[:, -1], np.float64)
        after_lora = np.asarray(low_rank.curve.accuracy[:, -1], np.float64)
        share = stats.bootstrap_mean((after_lora - damaged)
                                     / (after_full - damaged))
        rows.append({"model": name, "rank": rank, "rate": rate,
                     "trainable": adapter.trainable, "total": total,
                     "damaged": damaged, "finetune": after_full,
                     "lora": after_lora, "share": share})
    return rows


def _pct(values) -> str:
    return f"{100 * float(np.mean(values)):.2f}"


def main(names: list[str]) -> str:
    rebuilt = reconstruction_rows()
    low_rank = lora_rows(names)
    lines = [
        f"CPU: {cpu_model()}; JAX {jax.__version__}; "
        f"`python benchmarks/bench_strategies.py --models "
        f"{','.join(names)}`.",
        "",
        "**Layer-wise reconstruction against fine-tuning at equal wall "
        "time** (LeNet-5, magnitude pruning of every layer's weights, "
        f"{SEEDS} seeds; reconstruction from 256 unlabelled calibration "
        "images, no gradient step; fine-tuning of the surviving weights "
        "with the seed's SGD for as many steps as take the same steady wall "
        "time; mean test accuracy):",
        "",
        "| sparsity | clean | pruned | reconstruct | s | fine-tune | steps "
        "| s | gap recovered by reconstruct / fine-tune |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rebuilt:
        gap = row["clean"] - float(np.mean(row["damaged"]))
        share = [(float(np.mean(row[k])) - float(np.mean(row["damaged"])))
                 / gap if gap > 0 else float("nan")
                 for k in ("reconstruct", "finetune")]
        lines.append(
            f"| {row['amount']:.0%} | {100 * row['clean']:.2f} | "
            f"{_pct(row['damaged'])} | {_pct(row['reconstruct'])} | "
            f"{row['reconstruct_s']:.2f} | {_pct(row['finetune'])} | "
            f"{row['steps']} | {row['finetune_s']:.2f} | "
            f"{share[0]:.0%} / {share[1]:.0%} |")
    lines += [
        "",
        "**LoRA against full fine-tuning at the same number of steps** "
        f"(random zeroing of {LORA_DAMAGE:.0%} of every layer's weights, "
        f"{SEEDS} seeds, {LORA_STEPS} steps of SGD with momentum 0.9, batch "
        "100, at the same learning rate for both; share: "
        "LoRA's recovery over full fine-tuning's per damaged model, mean "
        "[95 % bootstrap interval]):",
        "",
        "| model | lr | rank | trainable | damaged | full fine-tune | LoRA | "
        "share of full fine-tuning's recovery |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in low_rank:
        share = row["share"]
        lines.append(
            f"| {row['model']} | {row['rate']} | {row['rank']} | "
            f"{row['trainable']:,} of "
            f"{row['total']:,} ({row['trainable'] / row['total']:.1%}) | "
            f"{_pct(row['damaged'])} | {_pct(row['finetune'])} | "
            f"{_pct(row['lora'])} | {share.estimate:.0%} "
            f"[{share.low:.0%}, {share.high:.0%}] |")
    return "\n".join(lines)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    models = ["lenet5", "mlp", "rescnn", "vit"]
    if "--models" in arguments:
        models = arguments[arguments.index("--models") + 1].split(",")
    section = main(models)
    print(section)
    if "--write" in arguments:
        write_section("strategies", section)
