"""Fault models: the cost of faults and of protection, on LeNet-5.

Measured side by side in one run, on the zoo's pretrained LeNet-5 and the
1,000 ``mnist5k`` test images:

* **Transient activation faults, 100 points in one program**: a sweep of
  exponent bit flips in every layer's outputs (PyTorchFI's single-bit
  model: each value hit with probability ``rate``, drawn afresh for every
  batch), 20 rates x 5 seeds, against the same sweep of 100 clean
  evaluations (an operator that leaves the parameters as they are). Both
  through :func:`recovjax.sweep` with one chunk of 100 points, steady
  state (median of the runs after a first, compiling, one).
* **Protection on clean evaluation**: one clean evaluation of the test set
  as is, with range restriction at every site (Ranger), after weight
  saturation, after checksum detection over every weight (blocks of 256
  entries) and after comparing every weight with a clean copy, each
  compiled once and timed in interleaved rounds (the best round);
  and what range restriction buys under transient exponent flips.
* **The bit search**: seconds for the progressive bit search of 30 flips
  on int8 codes, and for 30 random flips, with accuracy after the flips;
  and the search over 8 attack batches in one vmapped program
  (``run_bit_search``), 40 flips each.

Usage::

    python benchmarks/bench_faults.py            # print the section
    python benchmarks/bench_faults.py --write    # also update RESULTS.md
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import recovjax
from recovjax._types import Damage
from recovjax.damage.activations import make_activation_faults, profile_ranges
from recovjax.damage.attack import make_bit_search, run_bit_search
from recovjax.data import batch_split, load_dataset
from recovjax.evaluate import evaluate
from recovjax.models import get_model
from recovjax.recovery.protect import block_checksums
from recovjax.zoo import load_pretrained
from results_md import cpu_model, write_section

RATES = [float(r) for r in np.geomspace(1e-6, 1e-2, 20)]
SEEDS = 5
REPEATS = 5
PROTECTION_ROUNDS = 15
RUNS, RUN_FLIPS = 8, 40
BITS = "exponent"


def _median_seconds(run, repeats: int = REPEATS) -> float:
    run()  # compile (or warm up)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _unchanged(key, params, amount):
    # 100 clean evaluations in the sweep's program, each of its own copy:
    # x + 0 * amount equals x and cannot be folded away (0 * inf is NaN),
    # so every point is evaluated, as a damaged one is.
    return Damage(jax.tree.map(lambda x: x + 0.0 * amount, params),
                  jax.tree.map(lambda x: jnp.zeros(x.shape, bool), params))


def sweep_rows(model, params, test) -> dict:
    """Seconds per point of the faulty and the clean 100-point sweeps."""
    dense = make_activation_faults("flip", bits=BITS)
    sparse = make_activation_faults("flip", bits=BITS, max_rate=max(RATES))
    out = {}
    for name, op in (("clean", _unchanged), ("transient", sparse),
                     ("transient, dense draws", dense)):
        def run(op=op):
            recovjax.sweep(model, params, damages={name: op}, ratios=RATES,
                           seeds=SEEDS, data=test, root_key=0,
                           chunk_size=len(RATES) * SEEDS,
                           include_clean=False, batch_size=250)
        out[name] = _median_seconds(run) / (len(RATES) * SEEDS)
    return out


def protection_rows(model, params, test) -> dict:
    """Seconds of one clean evaluation with each protection."""
    batches = batch_split(test, 250)
    profile = batch_split(load_dataset("mnist5k").train, 250)
    bounds = profile_ranges(model, params, profile)
    lows = jax.tree.map(jnp.min, params)
    highs = jax.tree.map(jnp.max, params)
    clean_sums = jax.tree.map(lambda x: block_checksums(x, 256), params)

    def plain(p):
        return evaluate(model.forward, p, batches, 10).accuracy

    def ranger(p):
        return evaluate(bounds.apply(model), p, batches, 10).accuracy

    def saturated(p):
        clipped = jax.tree.map(lambda x, lo, hi: jnp.clip(x, lo, hi), p,
                               lows, highs)
        return evaluate(model.forward, clipped, batches, 10).accuracy

    def checksummed(p):
        flagged = jax.tree.map(lambda x, s: jnp.any(block_checksums(x, 256)
                                                    != s), p, clean_sums)
        flags = jnp.stack(jax.tree.leaves(flagged))
        return evaluate(model.forward, p, batches, 10).accuracy, flags

    clean_bits = jax.tree.map(
        lambda x: jax.lax.bitcast_convert_type(x, jnp.uint32), params)

    def compared(p):
        # Detection by comparing every weight with a clean copy.
        flagged = jax.tree.map(lambda x, c: jnp.any(
            jax.lax.bitcast_convert_type(x, jnp.uint32) != c), p, clean_bits)
        flags = jnp.stack(jax.tree.leaves(flagged))
        return evaluate(model.forward, p, batches, 10).accuracy, flags

    variants = {"plain": plain, "range restriction": ranger,
                "weight saturation": saturated,
                "checksum detection (blocks of 256)": checksummed,
                "comparison with a clean copy": compared}
    compiled = {name: jax.jit(fn) for name, fn in variants.items()}
    for run in compiled.values():
        jax.block_until_ready(run(params))
    samples = {name: [] for name in variants}
    # Interleaved rounds of 5 calls each, so that drift hits all alike.
    for _ in range(PROTECTION_ROUNDS):
        for name, run in compiled.items():
            start = time.perf_counter()
            for _ in range(5):
                jax.block_until_ready(run(params))
            samples[name].append((time.perf_counter() - start) / 5)
    out = {name: min(times) for name, times in samples.items()}
    faults = make_activation_faults("flip", bits=BITS)
    protected = faults.protected(bounds)
    accuracy = {}
    for rate in (1e-4, 1e-3):
        for name, chosen in (("unprotected", faults),
                             ("range restriction", protected)):
            accuracy[(name, rate)] = float(jax.jit(
                lambda p, chosen=chosen, rate=rate: evaluate(
                    chosen.apply(model, jax.random.key(0), rate), p,
                    batches, 10).accuracy)(params))
    return {"seconds": out, "accuracy": accuracy,
            "clean": float(jax.jit(plain)(params))}


def attack_rows(model, params, test) -> dict:
    """The bit search and its random baseline, 30 flips."""
    train = load_dataset("mnist5k").train
    attack = (jnp.asarray(train.images[:128]), jnp.asarray(train.labels[:128]))
    batches = batch_split(test, 500)
    out = {}
    for strategy in ("gradient", "random"):
        search = jax.jit(make_bit_search(model, flips=30, strategy=strategy))
        start = time.perf_counter()
        result = jax.block_until_ready(search(jax.random.key(1), params,
                                              attack, batches))
        first = time.perf_counter() - start
        steady = _median_seconds(lambda: jax.block_until_ready(search(
            jax.random.key(1), params, attack, batches)), 3)
        out[strategy] = {"first_s": first, "steady_s": steady,
                         "accuracy": np.asarray(result.accuracy).tolist()}
    # Eight attack batches drawn from 1,000 training images, one program.
    pool_images = jnp.asarray(train.images[:1000])
    pool_labels = jnp.asarray(train.labels[:1000])
    picks = jnp.stack([jax.random.choice(jax.random.key(seed + 10), 1000,
                                         (128,), replace=False)
                       for seed in range(RUNS)])
    keys = jax.random.split(jax.random.key(2), RUNS)
    start = time.perf_counter()
    runs = jax.block_until_ready(run_bit_search(
        make_bit_search(model, flips=RUN_FLIPS), keys, params,
        (pool_images[picks], pool_labels[picks]), batches))
    out["runs"] = {"seconds": time.perf_counter() - start,
                   "accuracy": np.asarray(runs.accuracy)}
    return out


def main(argv: list[str] | None = None) -> str:
    """Run every measurement; return the markdown section."""
    argv = sys.argv[1:] if argv is None else argv
    recovjax.use_all_cores()
    model = get_model("lenet5")
    params = load_pretrained("lenet5", progress=False).params
    test = load_dataset("mnist5k").test
    sweep = sweep_rows(model, params, test)
    protection = protection_rows(model, params, test)
    attack = attack_rows(model, params, test)
    ratio = sweep["transient"] / sweep["clean"]
    lines = [
        "## Fault models: activation faults, protection, the bit search",
        "",
        f"Command: `python benchmarks/bench_faults.py"
        f"{' --write' if '--write' in argv else ''}`  ",
        f"CPU: `{cpu_model()}`, {len(jax.devices())} JAX CPU devices, jax "
        f"{jax.__version__}. LeNet-5 from the zoo, the 1,000 mnist5k test "
        "images.",
        "",
        f"**Transient activation faults, {len(RATES) * SEEDS} points in one "
        f"program** ({len(RATES)} rates in [1e-6, 1e-2] x {SEEDS} seeds, "
        f"exponent flips at every site, drawn afresh per batch of 250):",
        "",
        "| sweep | ms per point | x clean |",
        "| --- | ---: | ---: |",
        f"| 100 clean evaluations | {1e3 * sweep['clean']:.2f} | 1.00 |",
        f"| 100 transient-fault points (sparse: max_rate=1e-2) | "
        f"{1e3 * sweep['transient']:.2f} | {ratio:.2f} |",
        f"| 100 transient-fault points (one draw per value) | "
        f"{1e3 * sweep['transient, dense draws']:.2f} | "
        f"{sweep['transient, dense draws'] / sweep['clean']:.2f} |",
        "",
        f"Cost per point: **{ratio:.2f}x** a clean evaluation "
        f"({'within' if ratio <= 1.5 else 'NOT within'} the 1.5x target).",
        "",
        "**Protection on clean evaluation** (one evaluation of the 1,000 "
        f"images; the best of {PROTECTION_ROUNDS} interleaved rounds of 5 "
        "calls):",
        "",
        "| protection | ms | overhead |",
        "| --- | ---: | ---: |",
    ]
    base = protection["seconds"]["plain"]
    for name, seconds in protection["seconds"].items():
        lines.append(f"| {name} | {1e3 * seconds:.2f} | "
                     f"{100 * (seconds / base - 1):+.1f} % |")
    entries = sum(int(x.size) for x in jax.tree.leaves(params))
    words = sum(2 * -(-int(x.size) // 256) for x in jax.tree.leaves(params))
    lines += [
        "",
        f"Checksum detection keeps {words:,} words for "
        f"the {entries:,} weights (2 per block of 256); the comparison keeps "
        "a whole clean copy. "
        + ("In time the checksums cost more than the comparison here: what "
           "they save is the clean copy (its memory, or a read of the "
           "checkpoint), not computation."
           if protection["seconds"]["checksum detection (blocks of 256)"]
           > protection["seconds"]["comparison with a clean copy"] else
           "In time the checksums cost no more than the comparison here, "
           "and they save the clean copy."),
    ]
    lines += [
        "",
        f"Under transient exponent flips (clean accuracy "
        f"{100 * protection['clean']:.2f} %):",
        "",
        "| rate | unprotected | range restriction |",
        "| --- | ---: | ---: |",
    ]
    for rate in (1e-4, 1e-3):
        lines.append(
            f"| {rate:g} | "
            f"{100 * protection['accuracy'][('unprotected', rate)]:.2f} % | "
            f"{100 * protection['accuracy'][('range restriction', rate)]:.2f}"
            " % |")
    lines += [
        "",
        "**The bit search** (int8 per-tensor codes, 30 flips, attack batch "
        "of 128 training images, accuracy on the test set after every "
        "flip):",
        "",
        "| strategy | first call s | steady s | accuracy after 0 / 5 / 10 / "
        "20 / 30 flips |",
        "| --- | ---: | ---: | --- |",
    ]
    for strategy in ("gradient", "random"):
        row = attack[strategy]
        acc = row["accuracy"]
        shown = " / ".join(f"{100 * acc[i]:.1f}" for i in (0, 5, 10, 20, 30))
        lines.append(f"| {strategy} | {row['first_s']:.1f} | "
                     f"{row['steady_s']:.1f} | {shown} % |")
    runs = attack["runs"]["accuracy"]
    budgets = (0, 10, 20, 30, 36, 40)
    lines += [
        "",
        f"Over {RUNS} attack batches of 128 images drawn from 1,000 "
        f"training images (`run_bit_search`: one vmapped program, "
        f"{attack['runs']['seconds']:.1f} s with its compilation), test "
        "accuracy after each budget:",
        "",
        "| flips | " + " | ".join(str(b) for b in budgets) + " |",
        "| --- |" + " ---: |" * len(budgets),
        "| mean | " + " | ".join(f"{100 * runs[:, b].mean():.1f} %"
                                for b in budgets) + " |",
        "| worst (highest) | " + " | ".join(
            f"{100 * runs[:, b].max():.1f} %" for b in budgets) + " |",
        "| best (lowest) | " + " | ".join(
            f"{100 * runs[:, b].min():.1f} %" for b in budgets) + " |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    section = main()
    print(section)
    if "--write" in sys.argv[1:]:
        write_section("faults", section)
