"""W1: a damage sweep of pretrained LeNet-5, recovjax against the PyTorch loop.

Workload: pretrained LeNet-5 on ``mnist5k``, damage ``zero`` (exactly
``floor(n * ratio)`` entries of every tensor), 20 ratios in [0, 0.95] x 5
seeds = 100 damaged models, each evaluated on the 1,000 test images.

Measured side by side in one run:

* the PyTorch seed loop (copy the model, zero a fraction of every tensor
  with ``torch.randperm``, evaluate in batches of 100), in process;
* recovjax formulations of the same sweep (how the stack of models meets
  the convolutions), first call (compile included) and steady state;
* the default ``recovjax.sweep``: first call with cold caches (persistent
  cache off), steady state (median of 3);
* whole processes as a user runs them (import, load data and weights,
  compile, run, write a results CSV), recovjax with a cold and a warm
  compilation cache, and PyTorch;
* GFLOP/s achieved by the sweep against a large fp32 matmul;
* scaling: 100 / 500 / 1,000 models, time and peak RSS (in subprocesses).

Usage::

    python benchmarks/bench_sweep.py            # print the markdown section
    python benchmarks/bench_sweep.py --write    # also update RESULTS.md
    python benchmarks/bench_sweep.py --quick    # fewer formulations

Needs PyTorch (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any, Callable

from results_md import write_section

HERE = pathlib.Path(__file__).resolve().parent

NUM_RATIOS, NUM_SEEDS = 20, 5
MAX_RATIO = 0.95
TORCH_BATCH = 100


PROCESS_ROUNDS = 3
"""Alternating rounds of the whole-process measurements."""


def ratios(count: int = NUM_RATIOS) -> list[float]:
    """The W1 ratio grid: ``count`` evenly spaced values in [0, 0.95]."""
    return [round(MAX_RATIO * i / (count - 1), 10) for i in range(count)]


# --------------------------------------------------------------------------
# Child processes: the whole sweep as a user runs it.
# --------------------------------------------------------------------------

RECOVJAX_PROCESS = textwrap.dedent("""
    import sys, time
    start = time.perf_counter()
    import numpy as np
    import recovjax
    recovjax.use_all_cores()  # as the README asks, and the CLI does
    import recovjax.damage
    from recovjax.data import load_dataset
    from recovjax.models import get_model
    from recovjax.pretrain import load_pretrained
    from recovjax.sweep import sweep
    models, out = int(sys.argv[1]), sys.argv[2]
    seeds = models // {num_ratios}
    dataset = load_dataset("mnist5k")
    params = load_pretrained("lenet5", "mnist5k", seed=0, progress=False).params
    begin = time.perf_counter()
    result = sweep(get_model("lenet5"), params, damages=["zero"],
                   ratios=np.linspace(0, {max_ratio}, {num_ratios}),
                   seeds=seeds, data=dataset.test, root_key=0)
    result.table.to_csv(out)
    end = time.perf_counter()
    # VmHWM, not ru_maxrss: Linux carries the forking parent's peak over
    # exec into ru_maxrss, VmHWM belongs to this process's memory alone.
    with open("/proc/self/status") as status:
        rss = [int(line.split()[1]) * 1024 for line in status
               if line.startswith("VmHWM:")][0]
    print("RESULT", end - begin, rss, end - start)
""").format(num_ratios=NUM_RATIOS, max_ratio=MAX_RATIO)

TORCH_PROCESS = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {here!r})
    import csv
    import numpy as np
    import torch
    from torch_lenet import lenet_from_params, torch_data, zero_seed_loop
    data = np.load(sys.argv[1])
    params = {{layer: {{"kernel": data[layer + "/kernel"],
                       "bias": data[layer + "/bias"]}}
               for layer in ("conv1", "conv2", "fc1", "fc2", "fc3")}}
    model = lenet_from_params(params)
    images, labels = torch_data(data["images"], data["labels"])
    ratios = np.linspace(0, {max_ratio}, {num_ratios})
    rows = zero_seed_loop(model, ratios, range({num_seeds}), images, labels,
                          batch_size={batch})
    with open(sys.argv[2], "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["damage", "ratio", "seed", "accuracy", "loss"])
        for ratio, seed, accuracy, loss in rows:
            writer.writerow(["zero", repr(ratio), seed, repr(accuracy),
                             repr(loss)])
""").format(here=str(HERE), max_ratio=MAX_RATIO, num_ratios=NUM_RATIOS,
            num_seeds=NUM_SEEDS, batch=TORCH_BATCH)


def _run_child(code: str, args: list[str], env: dict[str, str] | None = None
               ) -> tuple[float, str]:
    environment = dict(os.environ)
    environment.update(env or {})
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], env=environment,
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}):\n"
                           f"{done.stderr[-4000:]}")
    return seconds, done.stdout


def _child_result(stdout: str) -> tuple[float, int, float]:
    line = [l for l in stdout.splitlines() if l.startswith("RESULT")][-1]
    sweep_seconds, rss, inside = line.split()[1:]
    return float(sweep_seconds), int(rss), float(inside)


# --------------------------------------------------------------------------
# In-process measurements.
# --------------------------------------------------------------------------


def _time(function: Callable[[], Any], repeats: int) -> tuple[float, float,
                                                               float]:
    """``(first, median, min)`` seconds; the first call includes compiling."""
    import jax
    start = time.perf_counter()
    jax.block_until_ready(function())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        times.append(time.perf_counter() - start)
    times.sort()
    return first, times[len(times) // 2], times[0]


def matmul_gflops(size: int = 2048) -> float:
    """Best-of-7 fp32 ``size x size`` matmul throughput, GFLOP/s."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    product = jax.jit(lambda x: x @ x)
    _, _, best = _time(lambda: product(a), 7)
    return 2 * size ** 3 / best / 1e9


def model_flops(apply, params, images) -> float:
    """FLOPs of one forward pass of one model over ``images`` (XLA count)."""
    import jax
    compiled = jax.jit(apply).lower(params, images).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis["flops"])


def _lenet_with(conv):
    """LeNet-5 forward (the registry's parameters) with another convolution."""

    def apply(params, x):
        import jax
        from recovjax.models.layers import max_pool_2x2
        for layer in ("conv1", "conv2"):
            x = max_pool_2x2(jax.nn.relu(conv(
                x, params[layer]["kernel"], params[layer]["bias"])))
        x = x.reshape(x.shape[0], -1)
        for layer in ("fc1", "fc2"):
            x = jax.nn.relu(x @ params[layer]["kernel"]
                            + params[layer]["bias"])
        return x @ params["fc3"]["kernel"] + params["fc3"]["bias"]

    return apply


def _lax_conv(x, kernel, bias):
    from recovjax.models.layers import reference_conv2d
    return reference_conv2d(x, kernel, bias)


def _im2col_conv(x, kernel, bias):
    from recovjax.models.layers import extract_patches
    kh, kw, cin, cout = kernel.shape
    return extract_patches(x, (kh, kw)) @ kernel.reshape(-1, cout) + bias


lax_conv_lenet = _lenet_with(_lax_conv)
"""LeNet-5 forward with ``lax.conv`` (the naive formulation)."""

im2col_lenet = _lenet_with(_im2col_conv)
"""LeNet-5 forward with im2col convolutions."""


def _time_once(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> str:
    """Run W1 and return the markdown section (``--write``: into RESULTS.md)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help="replace the sweep section of RESULTS.md")
    parser.add_argument("--quick", action="store_true",
                        help="fewer formulations and no scaling check")
    parser.add_argument("--devices", type=int, default=None,
                        help="CPU devices JAX shows (default: one per core, "
                        "recovjax.use_all_cores())")
    args = parser.parse_args(argv)
    import recovjax
    recovjax.use_all_cores(args.devices)  # before JAX starts
    # Time compiles honestly: no persistent cache in this process.
    os.environ["RECOVJAX_COMPILATION_CACHE"] = "0"

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    sweeping = importlib.import_module("recovjax.sweep")
    from recovjax._compile_cache import disable_compilation_cache
    from recovjax.damage import get_damage
    from recovjax.data import batch_split, load_dataset
    from recovjax.models import from_apply, get_model
    from recovjax.pretrain import load_pretrained, library_versions

    sys.path.insert(0, str(HERE))
    from torch_lenet import (evaluate_torch, lenet_from_params, torch_data,
                             zero_seed_loop)

    disable_compilation_cache()
    lines: list[str] = []
    say = lambda text="": (lines.append(text), print(text, flush=True))
    model = get_model("lenet5")
    dataset = load_dataset("mnist5k")
    params = load_pretrained("lenet5", "mnist5k", seed=0,
                             progress=False).params
    test = dataset.test
    zero = get_damage("zero")
    grid = ratios()
    count = NUM_RATIOS * NUM_SEEDS

    # ---- PyTorch seed loop, in process.
    torch_model = lenet_from_params(params)
    images, labels = torch_data(test.images, test.labels)
    torch_clean = evaluate_torch(torch_model, images, labels, TORCH_BATCH)

    def torch_seed_loop():
        zero_seed_loop(torch_model, grid, range(NUM_SEEDS), images, labels,
                       TORCH_BATCH)

    start = time.perf_counter()
    for _ in range(5):
        evaluate_torch(torch_model, images, labels, TORCH_BATCH)
    torch_eval = (time.perf_counter() - start) / 5

    # ---- recovjax formulations.
    def run_sweep(network=model, **options):
        return sweeping.sweep(network, params, damages={"zero": zero},
                              ratios=grid, seeds=NUM_SEEDS, data=test,
                              root_key=0, include_clean=False, **options)

    def naive_vmap():
        # jit(vmap) of damage + evaluate over all 100 models, lax.conv.
        from recovjax.evaluate import evaluate
        batches = batch_split(test, 1000)
        keys = jax.random.split(jax.random.key(0), count)
        amounts = jnp.repeat(jnp.asarray(grid, jnp.float32), NUM_SEEDS)

        @jax.jit
        def program(keys, amounts, params, batches):
            def one(key, amount):
                return evaluate(lax_conv_lenet, zero(key, params, amount)
                                .params, batches, 10)
            return jax.vmap(one)(keys, amounts)

        return lambda: program(keys, amounts, params, batches)

    # The same network and leaf roles, other convolution formulations.
    lax_model = from_apply(lax_conv_lenet, params, sample=model.sample,
                           init=model.init, info=model.infos,
                           name="lenet5-laxconv")
    im2col_model = from_apply(im2col_lenet, params, sample=model.sample,
                              init=model.init, info=model.infos,
                              name="lenet5-im2col")
    big = 1 << 40  # Let vmap_size through unchanged for the trials.
    trials = [
        ("naive jit(vmap) of all 100, lax.conv, batch 1000", naive_vmap()),
        ("lax.map over vmap pairs, lax.conv, batch 1000",
         lambda: run_sweep(lax_model, batch_size=1000, vmap_size=2)),
        ("lax.map over vmap pairs, im2col, batch 1000",
         lambda: run_sweep(im2col_model, batch_size=1000, vmap_size=2)),
        ("lax.map (1 at a time), banded, batch 1000",
         lambda: run_sweep(batch_size=1000, vmap_size=1)),
        ("lax.map over vmap pairs, banded, batch 1000",
         lambda: run_sweep(batch_size=1000, vmap_size=2)),
        ("lax.map over vmap pairs, banded, batch 250",
         lambda: run_sweep(batch_size=250, vmap_size=2)),
        ("lax.map (1 at a time, default), banded, batch 100",
         lambda: run_sweep(batch_size=100, vmap_size=1)),
    ]
    if not args.quick:
        trials += [
            ("lax.map (1 at a time), banded, batch 250",
             lambda: run_sweep(batch_size=250, vmap_size=1)),
            ("vmap of all 100, banded, batch 100",
             lambda: run_sweep(batch_size=100, vmap_size=100,
                               memory_budget_bytes=big)),
            ("chunked vmap 5, banded, batch 250",
             lambda: run_sweep(batch_size=250, vmap_size=5,
                               memory_budget_bytes=big)),
            ("chunked vmap 10, banded, batch 100",
             lambda: run_sweep(batch_size=100, vmap_size=10,
                               memory_budget_bytes=big)),
        ]
    measured = []
    for name, function in trials:
        jax.clear_caches()
        first, median, best = _time(function, 1)
        measured.append((name, first, median, best))
        print(f"  {name}: first {first:.2f} s, steady {median:.2f} s",
              flush=True)

    # ---- the default sweep: first call (cold), then steady state measured
    # in rounds that alternate with the PyTorch loop, so that both see the
    # same load on a shared machine.
    jax.clear_caches()
    start = time.perf_counter()
    result = run_sweep()
    default_first = time.perf_counter() - start
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        torch_seed_loop()
        middle = time.perf_counter()
        run_sweep()
        rounds.append((middle - start, time.perf_counter() - middle))
    torch_times = sorted(t for t, _ in rounds)
    jax_times = sorted(j for _, j in rounds)
    speedups = sorted(t / j for t, j in rounds)
    torch_loop, default_steady = torch_times[1], jax_times[1]
    # The same sweep on one device: what a Python user gets who skips
    # use_all_cores().
    one_device = jax.devices()[:1]
    run_sweep(devices=one_device)
    one_device_steady = sorted(_time_once(lambda: run_sweep(
        devices=one_device)) for _ in range(3))[1]
    # One thread: on a busy machine PyTorch's two OpenMP threads can spin
    # against other processes; this row shows how much that costs it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    torch_seed_loop()
    torch_one_thread = time.perf_counter() - start
    torch.set_num_threads(threads)
    plan = result.plan
    flops = model_flops(model.forward, params,
                        jnp.asarray(test.images)) * count
    peak = matmul_gflops()

    # ---- whole processes.
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    npz = scratch / "w1.npz"
    flat = {f"{layer}/{name}": np.asarray(value)
            for layer, leaves in params.items()
            for name, value in leaves.items()}
    np.savez(npz, images=test.images, labels=test.labels, **flat)
    # Rounds alternate the three processes (each cold run with a fresh
    # compilation cache), so that all see the same load; medians reported.
    cold_runs, warm_runs, torch_runs = [], [], []
    for round_index in range(1 if args.quick else PROCESS_ROUNDS):
        cache = scratch / f"xla{round_index}"
        cold_runs.append(_run_child(
            RECOVJAX_PROCESS, [str(count), str(scratch / "cold.csv")],
            {"RECOVJAX_COMPILATION_CACHE": str(cache)}))
        warm_runs.append(_run_child(
            RECOVJAX_PROCESS, [str(count), str(scratch / "warm.csv")],
            {"RECOVJAX_COMPILATION_CACHE": str(cache)}))
        torch_runs.append(_run_child(TORCH_PROCESS,
                                     [str(npz), str(scratch / "torch.csv")]))
    median = lambda runs: sorted(runs, key=lambda run: run[0])[
        len(runs) // 2]
    cold_wall, cold_out = median(cold_runs)
    warm_wall, warm_out = median(warm_runs)
    torch_wall, _ = median(torch_runs)
    process_rounds = [(t[0], c[0], w[0]) for t, c, w in
                      zip(torch_runs, cold_runs, warm_runs)]
    cold_sweep = _child_result(cold_out)[0]
    warm_sweep = _child_result(warm_out)[0]
    same_csv = (scratch / "cold.csv").read_bytes() == (
        scratch / "warm.csv").read_bytes()

    # ---- scaling: 100 / 500 / 1,000 models (warm cache, same program).
    scaling = []
    if not args.quick:
        for models in (100, 500, 1000):
            wall, out = _run_child(
                RECOVJAX_PROCESS, [str(models), str(scratch / f"s{models}.csv")],
                {"RECOVJAX_COMPILATION_CACHE": str(cache)})
            seconds, rss, _ = _child_result(out)
            scaling.append((models, seconds, rss, wall))

    # ---- report.
    clean_acc = float(result.table.select(ratio=0.0, seed=0,
                                          metric="accuracy")[0]["value"])
    versions = library_versions()
    say(f"### W1: zero-damage sweep of LeNet-5 on mnist5k "
        f"({NUM_RATIOS} ratios x {NUM_SEEDS} seeds = {count} models, "
        f"{len(test)} test images each)")
    say()
    say(f"Command: `python benchmarks/bench_sweep.py"
        f"{' --quick' if args.quick else ''}` on {platform.machine()} "
        f"({os.cpu_count()} CPUs, {platform.processor() or 'cpu'}), "
        f"{time.strftime('%Y-%m-%d')}. jax {versions['jax']}, jaxlib "
        f"{versions['jaxlib']}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {versions['numpy']}, "
        f"Python {versions['python']}. JAX shows {len(jax.devices())} CPU "
        "device(s) (`recovjax.use_all_cores()`, `--devices`). Damage op: "
        "recovjax.damage.get_damage('zero'). "
        f"Clean accuracy: recovjax {clean_acc:.4f}, PyTorch "
        f"{torch_clean[0]:.4f}. The machine is shared: figures are noisy.")
    say()
    say("| measurement | seconds | vs PyTorch loop |")
    say("| --- | ---: | ---: |")
    say(f"| PyTorch seed loop, {count} models (in process, median of 3) | "
        f"{torch_loop:.2f} | 1.00x |")
    say(f"| PyTorch seed loop, 1 thread | {torch_one_thread:.2f} | "
        f"{torch_loop / torch_one_thread:.2f}x |")
    say(f"| recovjax default sweep, first call incl. compile (cold) | "
        f"{default_first:.2f} | {torch_loop / default_first:.2f}x |")
    say(f"| recovjax default sweep, steady state (median of 3) | "
        f"{default_steady:.2f} | {torch_loop / default_steady:.2f}x |")
    say(f"| recovjax default sweep, 1 device (without use_all_cores; "
        f"median of 3) | {one_device_steady:.2f} | "
        f"{torch_loop / one_device_steady:.2f}x |")
    say(f"| recovjax steady state vs the 1-thread PyTorch loop | | "
        f"{torch_one_thread / default_steady:.2f}x |")
    say(f"| (steady-state speed-up per alternating round: "
        f"{', '.join(f'{x:.2f}x' for x in speedups)}) | | |")
    say(f"| whole PyTorch process (import, load, loop, write CSV; median "
        f"of {len(torch_runs)}) | {torch_wall:.2f} | 1.00x |")
    say(f"| whole recovjax process, cold compilation cache (median) | "
        f"{cold_wall:.2f} | {torch_wall / cold_wall:.2f}x |")
    say(f"| whole recovjax process, warm compilation cache (median) | "
        f"{warm_wall:.2f} | {torch_wall / warm_wall:.2f}x |")
    say()
    say("Whole processes per alternating round (PyTorch / recovjax cold / "
        "recovjax warm, s): " + "; ".join(
            f"{t:.2f} / {c:.2f} / {w:.2f}" for t, c, w in process_rounds)
        + ".")
    say()
    say(f"Default plan: {plan}. One PyTorch evaluation of "
        f"{len(test)} images: {1000 * torch_eval:.1f} ms. The `sweep` call "
        f"inside the whole process took {cold_sweep:.2f} s cold and "
        f"{warm_sweep:.2f} s warm; cold and warm CSVs byte-identical: "
        f"{same_csv}.")
    say()
    say(f"Throughput: the sweep's model FLOPs ({flops / 1e9:.1f} GFLOP, "
        f"XLA cost analysis of one forward pass x {count}) at steady state "
        f"run at {flops / default_steady / 1e9:.1f} GFLOP/s; a 2048x2048 "
        f"fp32 matmul reaches {peak:.1f} GFLOP/s in the same run "
        f"({100 * flops / default_steady / 1e9 / peak:.0f} %).")
    say()
    say("Formulations (same sweep; first call includes compiling):")
    say()
    say("| formulation | first call (s) | second call (s) | vs PyTorch loop |")
    say("| --- | ---: | ---: | ---: |")
    for name, first, median, best in measured:
        say(f"| {name} | {first:.2f} | {median:.2f} | "
            f"{torch_loop / median:.2f}x |")
    best = min(measured, key=lambda trial: trial[2])
    say()
    say(f"Fastest formulation in this run: {best[0]} ({best[2]:.2f} s). "
        f"The sweep's default is vmap groups of "
        f"{sweeping.DEFAULT_VMAP_SIZE} (one model at a time) inside "
        f"`lax.map`, the model's own "
        f"apply (banded-GEMM convolutions), batches of "
        f"{sweeping.DEFAULT_BATCH_SIZE}.")
    if scaling:
        say()
        say("Scaling (whole process, warm compilation cache; `sweep` call "
            "time and peak RSS of the process):")
        say()
        say("| models | sweep (s) | per model (ms) | peak RSS (MiB) | "
            "process (s) |")
        say("| ---: | ---: | ---: | ---: | ---: |")
        for models, seconds, rss, wall in scaling:
            say(f"| {models} | {seconds:.2f} | {1000 * seconds / models:.1f}"
                f" | {rss / 2**20:.0f} | {wall:.2f} |")
    section = "\n".join(lines)
    if args.write:
        write_section("sweep", section)
    return section


if __name__ == "__main__":
    main()
