"""W3 and W4: memory and time of a ResNet-18 sweep and recovery against the
number of points.

    .venv/bin/python benchmarks/bench_resnet.py [--w3-points 10,100,1000]
                                                [--w4-points 10,100] [--write]
    .venv/bin/python benchmarks/bench_resnet.py --rows FILE --write

(``--rows``: the rows of earlier runs, as printed, tabulated together.)

* **W3**: a sweep of the zoo's ResNet-18-style model (``resnet18``, about
  11 M parameters, BatchNorm) pretrained on Fashion-MNIST, ``zero`` damage
  over 10 ratios, each point evaluated on the first 1,000 Fashion-MNIST
  test images.
* **W4**: a recovery of damaged copies of the same model: each fine-tuned
  50 steps (batch 32, SGD 0.001 with momentum 0.9, BatchNorm in training
  mode) on 2,000 training images, evaluated on the 1,000 test images
  before and after.

Each measurement is a fresh process with the persistent compilation cache
off, set up as the CLI is (one CPU device per core, glibc's mmap threshold
fixed and one malloc arena per core), that runs the points once: its peak
RSS (``ru_maxrss``) covers setup, compilation and the run, and the time
per point includes the compilation (about a minute for these programs, so
the largest rows show the steady cost). Both re-derive each damaged model
on device from its key and amount, one group at a time, in calls sized by
the runner, so the peak should not grow with the number of points. The
pretrained weights come from the zoo (``recovjax pretrain --model resnet18
--dataset fashion_mnist`` makes them); without
them the run uses freshly initialised weights and says so (memory and time
do not depend on the weight values).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from results_md import cpu_model, run_fresh

HERE = os.path.dirname(os.path.abspath(__file__))
EVAL_EXAMPLES = 1000
TRAIN_EXAMPLES = 2000
STEPS = 50
BATCH = 32
RATIOS = 10


def _model(name: str, dataset: str):
    """``(model with weights, whether they are pretrained)``."""
    import jax

    import recovjax
    from recovjax.pretrain import zoo_path, zoo_sample

    model = recovjax.get_model(name, sample=zoo_sample(dataset))
    if zoo_path(name, dataset, 0).exists():
        pretrained = recovjax.load_pretrained(name, dataset, progress=False)
        return pretrained.attach(model), True
    params = model.init(jax.random.key(0))
    return model.with_params(params), False


def _measure(kind: str, points: int, name: str, dataset: str) -> dict:
    """One measurement, in this (fresh) process."""
    import resource

    import recovjax
    recovjax.use_all_cores()
    recovjax.tune_malloc()  # as the CLI does

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from recovjax.damage import get_damage
    from recovjax.data import batch_split, load_dataset
    from recovjax.recovery import get_strategy, make_task, recover_damage
    from recovjax.sweep import point_keys

    data = load_dataset(dataset)
    model, pretrained = _model(name, dataset)
    params = model.params
    size = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    test = recovjax.Split(data.test.images[:EVAL_EXAMPLES],
                          data.test.labels[:EVAL_EXAMPLES])
    op = get_damage("zero")
    ratios = np.linspace(0.05, 0.5, RATIOS)
    start = time.perf_counter()
    if kind == "w3":
        result = recovjax.sweep(model, params, damages={"zero": op},
                                ratios=list(ratios),
                                seeds=max(1, points // RATIOS), data=test,
                                root_key=0)
        rows = [r for r in result.table.rows
                if r["metric"] == "accuracy" and r["stage"] == "clean"]
        clean = rows[0]["value"]
    else:
        train = recovjax.Split(data.train.images[:TRAIN_EXAMPLES],
                               data.train.labels[:TRAIN_EXAMPLES])
        task = make_task(model, train, eval_batches=batch_split(test, 250))
        strategy = get_strategy("finetune", optimizer=optax.sgd(
            1e-3, momentum=0.9), steps=STEPS, batch_size=BATCH,
            eval_every=STEPS)
        indices = np.arange(points) % RATIOS
        seeds = np.arange(points) // RATIOS
        damage_keys = point_keys(jax.random.key(0), "zero", indices, seeds)
        keys = jax.vmap(lambda key: jax.random.fold_in(key, 1))(damage_keys)
        outcome = recover_damage(
            strategy, task, op, params, damage_keys=damage_keys,
            amounts=jnp.asarray(ratios[indices], jnp.float32), keys=keys)
        jax.block_until_ready(outcome)
        clean = None
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kind": kind, "points": points, "model": name,
            "dataset": dataset, "parameters": size,
            "pretrained": pretrained, "clean_accuracy": clean,
            "peak_rss_mb": round(peak / 2**20, 1),
            "seconds": round(seconds, 3),
            "devices": len(jax.devices())}


def _table(results: list[dict]) -> str:
    lines = ["| run | points | peak RSS (MB) | growth over the fewest points "
             "| wall (s, compile included) | s/point |",
             "| --- | --- | --- | --- | --- | --- |"]
    for kind, label in (("w3", "W3 sweep"), ("w4", "W4 recovery")):
        rows = [r for r in results if r["kind"] == kind]
        if not rows:
            continue
        base = rows[0]["peak_rss_mb"]
        for row in rows:
            growth = 100.0 * (row["peak_rss_mb"] - base) / base
            lines.append(
                f"| {label} | {row['points']} | {row['peak_rss_mb']:.0f} | "
                f"{growth:+.1f} % | {row['seconds']:.1f} | "
                f"{row['seconds'] / row['points']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--w3-points", default="10,100,1000",
                        help="comma-separated W3 point counts ('' skips)")
    parser.add_argument("--w4-points", default="10,100",
                        help="comma-separated W4 point counts ('' skips)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--write", action="store_true",
                        help="replace the W3/W4 section of RESULTS.md")
    parser.add_argument("--rows", metavar="FILE",
                        help="measure nothing: tabulate the JSON rows this "
                        "script printed (one per line) in FILE")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "POINTS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_measure(args.one[0], int(args.one[1]), args.model,
                                  args.dataset)))
        return 0
    if args.rows:
        with open(args.rows) as file:
            rows = [json.loads(line) for line in file
                    if line.startswith("{")]
        results = ([r for r in rows if r["kind"] == "w3"] +
                   [r for r in rows if r["kind"] == "w4"])
    else:
        results = []
        runs = [("w3", int(p)) for p in args.w3_points.split(",") if p] + [
            ("w4", int(p)) for p in args.w4_points.split(",") if p]
        for kind, points in runs:
            try:
                results.append(run_fresh(__file__, [
                    kind, str(points), "--model", args.model,
                    "--dataset", args.dataset]))
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
        weights = ("pretrained zoo weights" if first["pretrained"] else
                   "freshly initialised weights (no zoo entry)")
        accuracy = next((r["clean_accuracy"] for r in results
                         if r["clean_accuracy"] is not None), None)
        write_section("resnet", (
            "## W3 and W4: ResNet-18 sweep and recovery against the number "
            "of points\n\n"
            "`benchmarks/bench_resnet.py --write` on "
            f"`{cpu_model()}` "
            f"({os.cpu_count()} cores, {first['devices']} CPU devices), jax "
            f"{jax.__version__}. `{first['model']}` "
            f"({first['parameters'] / 1e6:.2f} M parameters, {weights}"
            + (f", clean accuracy {100 * accuracy:.2f} % on these images"
               if accuracy is not None else "") +
            f") on the first {EVAL_EXAMPLES} `{first['dataset']}` test "
            f"images; `zero` damage over {RATIOS} ratios in [0.05, 0.5]. "
            f"W3 damages and evaluates; W4 fine-tunes each damaged model "
            f"{STEPS} steps (batch {BATCH}, SGD 0.001, momentum 0.9, "
            f"BatchNorm in training mode) on {TRAIN_EXAMPLES} training "
            "images and evaluates it before and after. Each row is a fresh "
            "process run once (compilation included, persistent cache "
            "off), set up as the CLI is"
            + (" (rows of separate runs of the script, tabulated with "
               "`--rows`)" if args.rows else "") + ".\n\n" + table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
