"""Exact-count damage on 100 LeNet-5 copies at once, against its rivals.

The workload of a damage sweep: zero a fraction of every leaf of LeNet-5
for 20 ratios in [0, 0.95] x 5 seeds = 100 damaged copies, as one
compiled program::

    jax.jit(jax.vmap(op, in_axes=(0, None, 0)))(keys, params, ratios)

Variants, all producing the damaged parameters and their masks:

* ``recovjax exact``: :func:`recovjax.damage.make_zero` (the default:
  exactly ``floor(n * ratio)`` entries per leaf, bitwise threshold search).
* ``recovjax bernoulli``: ``make_zero(mode="bernoulli")``, same draws.
* ``jax.random.bernoulli``: the textbook Bernoulli draw (threefry), the
  baseline the exact count is held to (at most 3x).
* ``single sort``: exact count by sorting the uniform draws once and
  thresholding at the k-th value.
* ``double argsort``: exact count by ranking, ``argsort(argsort(u)) < k``.

Run ``python benchmarks/bench_damage.py`` to print the section, add
``--write`` to replace it in ``benchmarks/RESULTS.md`` (between the
``<!-- begin damage -->`` / ``<!-- end damage -->`` markers).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from recovjax._types import Damage
from recovjax.damage import make_zero
from recovjax.models import get_model
from results_md import write_section

RATIOS, SEEDS = 20, 5
REPEATS = 9


def _per_leaf(choose):
    # A zero operator from a per-leaf chooser: choose(key, leaf, ratio).
    def zero(key, params, ratio):
        leaves, treedef = jax.tree.flatten(params)
        masks = [choose(jax.random.fold_in(key, index), leaf, ratio)
                 for index, leaf in enumerate(leaves)]
        new = [jnp.where(mask, 0.0, leaf) for leaf, mask in zip(leaves,
                                                                masks)]
        return Damage(jax.tree.unflatten(treedef, new),
                      jax.tree.unflatten(treedef, masks))
    return zero


def _jax_bernoulli(key, leaf, ratio):
    return jax.random.bernoulli(key, ratio, leaf.shape)


def _single_sort(key, leaf, ratio):
    draws = jax.random.bits(key, (leaf.size,), jnp.uint32)
    count = jnp.floor(leaf.size * ratio).astype(jnp.int32)
    kth = jnp.sort(draws)[jnp.clip(count - 1, 0, leaf.size - 1)]
    return ((draws <= kth) & (count > 0)).reshape(leaf.shape)


def _double_argsort(key, leaf, ratio):
    draws = jax.random.uniform(key, (leaf.size,))
    count = jnp.floor(leaf.size * ratio).astype(jnp.int32)
    return (jnp.argsort(jnp.argsort(draws)) < count).reshape(leaf.shape)


VARIANTS = {
    "recovjax exact (bitwise search)": make_zero(),
    "recovjax bernoulli (same draws)": make_zero(mode="bernoulli"),
    "jax.random.bernoulli": _per_leaf(_jax_bernoulli),
    "single sort": _per_leaf(_single_sort),
    "double argsort": _per_leaf(_double_argsort),
    "recovjax exact, global ratio": make_zero(ratio_over="global"),
    "recovjax exact, largest first": make_zero(target="largest"),
}
EXACT, BERNOULLI, BASELINE = list(VARIANTS)[:3]


def measure(repeats: int = REPEATS) -> dict[str, dict[str, float]]:
    """Compile every variant, then time them interleaved.

    Returns:
        Per variant: ``compile_s``, ``median_ms``, ``min_ms``.
    """
    model = get_model("lenet5")
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    keys = jax.random.split(jax.random.key(1), RATIOS * SEEDS)
    ratios = jnp.repeat(jnp.linspace(0.0, 0.95, RATIOS), SEEDS)
    compiled, results = {}, {}
    for name, op in VARIANTS.items():
        start = time.perf_counter()
        compiled[name] = jax.jit(jax.vmap(op, in_axes=(0, None, 0))).lower(
            keys, params, ratios).compile()
        jax.block_until_ready(compiled[name](keys, params, ratios))
        results[name] = {"compile_s": time.perf_counter() - start}
    times = {name: [] for name in VARIANTS}
    # Interleaved, so that load from elsewhere hits every variant alike.
    for _ in range(repeats):
        for name, run in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(run(keys, params, ratios))
            times[name].append(time.perf_counter() - start)
    for name, samples in times.items():
        results[name]["median_ms"] = 1e3 * statistics.median(samples)
        results[name]["min_ms"] = 1e3 * min(samples)
    return results


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; return its markdown section for RESULTS.md."""
    argv = sys.argv[1:] if argv is None else argv
    results = measure()
    base = results[BASELINE]["median_ms"]
    own = results[BERNOULLI]["median_ms"]
    exact = results[EXACT]["median_ms"]
    device = jax.devices()[0]
    lines = [
        "## Damage: exact-count selection on 100 LeNet-5 copies",
        "",
        f"Command: `python benchmarks/bench_damage.py{' --write' if '--write' in argv else ''}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs "
        f"({platform.processor() or 'unknown processor'}), jax "
        f"{jax.__version__}, device {device.platform} "
        f"({device.device_kind}).  ",
        f"Workload: zero a fraction of every leaf of LeNet-5 (44,426 "
        f"parameters) for {RATIOS} ratios in [0, 0.95] x {SEEDS} seeds = "
        f"{RATIOS * SEEDS} copies in one `jit(vmap(op))` call; median and "
        f"minimum of {REPEATS} interleaved runs after a warm-up.",
        "",
        "| variant | ms / call (median) | ms (min) | x jax.random.bernoulli "
        "| compile s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, result in results.items():
        lines.append(
            f"| {name} | {result['median_ms']:.1f} | {result['min_ms']:.1f} "
            f"| {result['median_ms'] / base:.2f} | "
            f"{result['compile_s']:.1f} |")
    verdict = "meets" if exact <= 3 * base else "MISSES"
    lines += [
        "",
        f"Exact / Bernoulli draw (`jax.random.bernoulli`): "
        f"**{exact / base:.2f}x** ({verdict} the 3x target). Exact / "
        f"recovjax's own Bernoulli mode, which shares the cheap hashed "
        f"draws: {exact / own:.1f}x.",
        "",
        "The exact count costs 32 counting passes (16 over the draws' high "
        "halves, 16 over the low halves of the threshold's bucket), every "
        "leaf at once in one layout of 128-entry rows (see "
        "`recovjax/damage/select.py`); targeted selection (largest first) "
        "runs the same search over the magnitudes, ranks leaves of at most "
        "1,024 entries by one sort, and breaks ties by position. "
        "Timings on a shared machine are noisy; the minimum is the better "
        "estimate of the intrinsic cost.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    section = main()
    print(section)
    if "--write" in sys.argv[1:]:
        write_section("damage", section)
