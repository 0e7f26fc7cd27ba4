"""Memory and time against the number of points, for a sweep and a recovery.

    .venv/bin/python benchmarks/bench_memory.py [--points 10,100,1000]
                                                 [--write]

A point is one damaged model: in the sweep it is damaged and evaluated, in
the recovery it is damaged, fine-tuned for 20 steps and evaluated before,
during and after. Both re-derive each damaged model on device from its key
and amount, inside the program, one group at a time, so what a run holds
should not grow with the number of points.

The model is a user's own flax module (an MLP 784-1024-512-10, 1.34 M
parameters) through :func:`recovjax.from_linen`, evaluated on 100 real
mnist5k test digits; recovery trains on 500 digits in batches of 16 with
the seed's SGD. Every measurement runs in a fresh process, so its peak RSS
(``ru_maxrss``) is its own: the process builds everything, runs the points
once (compilation included, the persistent compilation cache off) and
again (the steady state, timed), and reports its peak resident memory. The table gives the peak RSS, its growth
over the smallest run, and the steady-state seconds per point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from results_md import cpu_model, run_fresh

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 20
EVAL_EXAMPLES = 100
TRAIN_EXAMPLES = 500
HIDDEN = (1024, 512)


def _measure(kind: str, points: int) -> dict:
    """One measurement, in this (fresh) process."""
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import recovjax
    from recovjax.data import batch_split, load_dataset
    from recovjax.damage import get_damage
    from recovjax.models.networks import MLP
    from recovjax.recovery import get_strategy, make_task, recover_damage
    from recovjax.sweep import point_keys

    recovjax.use_all_cores()
    if os.environ.get("BENCH_MALLOC", "fixed") == "fixed":
        from recovjax._malloc import tune_malloc
        tune_malloc()  # as the CLI does
    data = load_dataset("mnist5k")
    sample = jnp.asarray(data.test.images[:1])
    module = MLP(hidden=HIDDEN)
    model = recovjax.from_linen(module, module.init(jax.random.key(0),
                                                    sample),
                                sample=sample, name="mlp_1024_512")
    params = model.params
    size = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    test = recovjax.Split(data.test.images[:EVAL_EXAMPLES],
                          data.test.labels[:EVAL_EXAMPLES])
    op = get_damage("zero")
    ratios = np.linspace(0.05, 0.5, 10)

    if kind == "sweep":
        def run():
            return recovjax.sweep(model, params, damages={"zero": op},
                                  ratios=list(ratios),
                                  seeds=max(1, points // len(ratios)),
                                  data=test, root_key=0)
    else:
        train = recovjax.Split(data.train.images[:TRAIN_EXAMPLES],
                               data.train.labels[:TRAIN_EXAMPLES])
        task = make_task(model, train, eval_batches=batch_split(test, 50))
        strategy = get_strategy("finetune", optimizer=optax.sgd(
            1e-3, momentum=0.9), steps=STEPS, batch_size=16, eval_every=10)
        indices = np.arange(points) % len(ratios)
        seeds = np.arange(points) // len(ratios)
        damage_keys = point_keys(jax.random.key(0), "zero", indices, seeds)
        keys = jax.vmap(lambda key: jax.random.fold_in(key, 1))(damage_keys)
        amounts = jnp.asarray(ratios[indices], jnp.float32)

        def run():
            return recover_damage(strategy, task, op, params,
                                  damage_keys=damage_keys, amounts=amounts,
                                  keys=keys)

    start = time.perf_counter()
    jax.block_until_ready(run())
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(run())
    steady = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kind": kind, "points": points, "parameters": size,
            "malloc": os.environ.get("BENCH_MALLOC", "fixed"),
            "peak_rss_mb": round(peak / 2**20, 1),
            "first_seconds": round(first, 3),
            "steady_seconds": round(steady, 3),
            "devices": len(jax.devices())}


def _table(results: list[dict]) -> str:
    lines = ["| run | glibc malloc | points | peak RSS (MB) | "
             "growth over the fewest points | first call (s) | steady (s) "
             "| steady s/point |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind, malloc in ((k, m) for m in ("fixed", "default")
                         for k in ("sweep", "recovery")):
        rows = [r for r in results
                if r["kind"] == kind and r["malloc"] == malloc]
        if not rows:
            continue
        base = rows[0]["peak_rss_mb"]
        shown = ("tuned (the CLI)" if malloc == "fixed"
                 else "glibc's dynamic default")
        for row in rows:
            growth = 100.0 * (row["peak_rss_mb"] - base) / base
            lines.append(
                f"| {kind} | {shown} | {row['points']} | "
                f"{row['peak_rss_mb']:.0f} | "
                f"{growth:+.1f} % | {row['first_seconds']:.2f} | "
                f"{row['steady_seconds']:.2f} | "
                f"{row['steady_seconds'] / row['points']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default="10,100,1000",
                        help="comma-separated point counts")
    parser.add_argument("--kinds", default="sweep,recovery")
    parser.add_argument("--malloc", default="fixed,default",
                        help="allocator settings to measure: fixed (the "
                        "CLI's tune_malloc) and/or default (glibc's)")
    parser.add_argument("--write", action="store_true",
                        help="replace the memory section of RESULTS.md")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "POINTS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_measure(args.one[0], int(args.one[1]))))
        return 0
    results = []
    runs = [(malloc, kind) for malloc in args.malloc.split(",")
            for kind in args.kinds.split(",")]
    for malloc, kind in runs:
        for points in (int(p) for p in args.points.split(",")):
            try:
                results.append(run_fresh(__file__, [kind, str(points)],
                                         {"BENCH_MALLOC": malloc}))
            except RuntimeError as error:
                print(error, file=sys.stderr)
                return 1
            print(json.dumps(results[-1]), flush=True)
    table = _table(results)
    print(table)
    if args.write:
        sys.path.insert(0, HERE)
        from results_md import write_section
        import jax
        first = results[0]
        write_section("memory", (
            "## Memory and time against the number of points\n\n"
            f"`benchmarks/bench_memory.py` on `{cpu_model()}` ({os.cpu_count()} "
            f"cores, {first['devices']} CPU devices), jax {jax.__version__}."
            f" A user's flax MLP 784-{HIDDEN[0]}-{HIDDEN[1]}-10 "
            f"({first['parameters'] / 1e6:.2f} M parameters) through "
            f"`from_linen`; {EVAL_EXAMPLES} mnist5k test digits; recovery "
            f"fine-tunes each damaged model {STEPS} steps (batch 16, SGD "
            f"0.001, momentum 0.9) on {TRAIN_EXAMPLES} digits, with a "
            "curve point every 10 steps. Each row is a fresh process: "
            "peak RSS (`ru_maxrss`) over setup, a first call (compilation "
            "included, persistent compilation cache off) and a steady call "
            "(timed). The CLI tunes glibc's malloc "
            "(`recovjax.tune_malloc()`: the mmap threshold fixed at 1 MiB, "
            "one arena per core): with glibc's dynamic threshold, freed "
            "temporary buffers stay resident in the threads' arenas and "
            "the peak climbs over the first few calls before it settles."
            "\n\n" + table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
