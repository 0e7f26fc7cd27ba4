"""W2: recovery of damaged LeNet-5 copies, recovjax against the PyTorch loop.

Workload W2: pretrained LeNet-5 on ``mnist5k``; 20 damaged copies (zero
damage, 4 ratios x 5 seeds); each fine-tuned for 200 steps of batch 100 with
SGD (lr 0.001, momentum 0.9), its own data order per copy.

Measured side by side in one run:

* convolution formulations of the vmapped train step (how a stack of models
  meets the convolutions), per model-step, with XLA's FLOP count;
* W2 with ``stack_recover`` (one compiled program for the 20 copies)
  through the library's own LeNet-5, sharded over all devices (JAX is
  started with one CPU device per core, ``--devices``), then on one device,
  and as one ``vmap`` over the whole stack: first call (compilation
  included) and steady state;
* W2 in chunks of 10 models (two calls of one vmapped program);
* W2 as a sequential JAX loop (one compiled single-model program, 20 calls);
* steady-state rounds alternating ``stack_recover`` and the PyTorch loop
  (the target is judged on their median ratio);
* W2 as the PyTorch loop (``torch.optim.SGD``, same damaged weights, same
  batch size and number of steps);
* the restore strategies against a full restore: time and bytes read.

Usage::

    python benchmarks/bench_recovery.py            # print the markdown section
    python benchmarks/bench_recovery.py --write    # also update RESULTS.md
    python benchmarks/bench_recovery.py --quick    # 20 steps, for a smoke run

The machine is shared: the section records the load average at the start,
and PyTorch runs with the faster of 1 and 2 threads (measured first).

Needs PyTorch (``pip install -e '.[bench]'``) for the baseline.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from results_md import write_section

HERE = pathlib.Path(__file__).resolve().parent

RATIOS = (0.1, 0.25, 0.5, 0.75)
SEEDS = (0, 1, 2, 3, 4)
STEPS = 200
BATCH = 100
LEARNING_RATE, MOMENTUM = 1e-3, 0.9
ROUNDS = 3
"""Alternating steady-state rounds of recovjax and PyTorch (see bench_rounds)."""


# --------------------------------------------------------------------------
# Convolution formulations of LeNet-5 (same parameter tree as the registry's
# model; only how the convolutions are computed differs).
# --------------------------------------------------------------------------


def _head(params, x):
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    x = jax.nn.relu(x @ params["fc2"]["kernel"] + params["fc2"]["bias"])
    return x @ params["fc3"]["kernel"] + params["fc3"]["bias"]


def _reshape_pool(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _im2col(x, kernel, bias):
    from recovjax.models.layers import extract_patches
    kh, kw, cin, cout = kernel.shape
    patches = extract_patches(x, (kh, kw))
    return patches @ kernel.reshape(kh * kw * cin, cout) + bias


def _lax_conv(x, kernel, bias):
    from recovjax.models.layers import reference_conv2d
    return reference_conv2d(x, kernel, bias)


def make_lenet(conv: Callable, pool: Callable | None = None) -> Callable:
    """LeNet-5 (the registry's parameter tree) with the given conv / pool."""
    from recovjax.models.layers import max_pool_2x2
    pool = max_pool_2x2 if pool is None else pool

    def apply(params, x):
        for name in ("conv1", "conv2"):
            x = pool(jax.nn.relu(conv(x, params[name]["kernel"],
                                      params[name]["bias"])))
        return _head(params, x)

    return apply


def _banded(tile: int) -> Callable:
    from recovjax.models.layers import conv2d
    return lambda x, kernel, bias: conv2d(x, kernel, bias, "VALID", tile)


def formulations() -> dict[str, Callable]:
    """Ways of computing LeNet-5; the first is the library's own model."""
    from recovjax.models import get_model
    return {
        "registry lenet5 (batch-minor banded GEMM, tiles of 4)":
            get_model("lenet5").forward,
        "NHWC banded GEMM, tiles of 4, pairwise pooling": make_banded(4),
        "banded GEMM, tiles of 4, reshape pooling": make_lenet(
            _banded(4), _reshape_pool),
        "im2col, reshape pooling": make_lenet(_im2col, _reshape_pool),
        "im2col": make_lenet(_im2col),
        "banded GEMM, full width": make_banded(1000),
        "banded GEMM, tiles of 8": make_banded(8),
        "banded GEMM, tiles of 2": make_banded(2),
    }


def make_banded(tile: int) -> Callable:
    """LeNet-5 whose convolutions are banded GEMMs with ``tile`` columns."""
    return make_lenet(_banded(tile))


# --------------------------------------------------------------------------
# Setup: data, pretrained weights, 20 damaged copies.
# --------------------------------------------------------------------------


class Setup:
    """Everything W2 needs, prepared once."""

    def __init__(self, steps: int):
        from recovjax.damage import get_damage
        from recovjax.data import batch_split, load_dataset
        from recovjax.pretrain import load_pretrained
        self.steps = steps
        self.dataset = load_dataset("mnist5k")
        self.pretrained = load_pretrained("lenet5", "mnist5k", seed=0,
                                          progress=False)
        self.images = jnp.asarray(self.dataset.train.images)
        self.labels = jnp.asarray(self.dataset.train.labels)
        self.weights = jnp.ones(self.labels.shape, jnp.float32)
        self.test = batch_split(self.dataset.test, 500)
        self.points = [(r, s) for r in RATIOS for s in SEEDS]
        keys = jax.vmap(jax.random.key)(jnp.asarray([s for _, s in
                                                     self.points]))
        self.damage_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
        self.order_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        ratios = jnp.asarray([r for r, _ in self.points], jnp.float32)
        self.damage = jax.jit(jax.vmap(get_damage("zero"),
                                       in_axes=(0, None, 0)))(
            self.damage_keys, self.pretrained.params, ratios)
        jax.block_until_ready(self.damage)

    @property
    def count(self) -> int:
        return len(self.points)


def _optimizer():
    import optax
    return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)


def _timed(function, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(function(*args))
    return out, time.perf_counter() - start


def _stack_args(setup: Setup, lo: int = 0, hi: int | None = None):
    hi = setup.count if hi is None else hi
    pick = lambda tree: jax.tree.map(lambda x: x[lo:hi], tree)
    return (setup.order_keys[lo:hi], pick(setup.damage.params),
            pick(setup.damage.mask), setup.images, setup.labels,
            setup.weights)


def _test_accuracy(setup: Setup, apply, params_stack) -> np.ndarray:
    from recovjax.evaluate import evaluate
    metrics = jax.jit(jax.vmap(lambda p: evaluate(apply, p, setup.test, 10)))(
        params_stack)
    return np.asarray(metrics.accuracy)


# --------------------------------------------------------------------------
# Measurements.
# --------------------------------------------------------------------------


def bench_formulations(setup: Setup, steps: int = 20, repeats: int = 3
                       ) -> list[dict[str, Any]]:
    """Per model-step time of the vmapped recovery for each formulation."""
    from recovjax.recovery import (make_finetune, stack_recover,
                                   train_step_cost)
    rows = []
    single = jax.tree.map(lambda x: x[0], setup.damage.params)
    for name, apply in formulations().items():
        run = stack_recover(make_finetune(apply, _optimizer(), steps=steps,
                                          batch_size=BATCH))
        args = _stack_args(setup)
        _, first = _timed(run, *args)
        times = [_timed(run, *args)[1] for _ in range(repeats)]
        cost = train_step_cost(apply, single, (BATCH, 28, 28, 1),
                               _optimizer())
        rows.append({"name": name, "first": first,
                     "per_step_ms": min(times) / (setup.count * steps) * 1e3,
                     "median_ms": statistics.median(times)
                     / (setup.count * steps) * 1e3,
                     "mflop": cost.flops / 1e6})
    return rows


def bench_vmapped(setup: Setup, apply, **options) -> dict[str, Any]:
    """W2 with one program over the 20 models (``stack_recover(**options)``)."""
    from recovjax.recovery import make_finetune, stack_recover
    run = stack_recover(make_finetune(apply, _optimizer(), steps=setup.steps,
                                      batch_size=BATCH), **options)
    args = _stack_args(setup)
    _, first = _timed(run, *args)
    result, steady = _timed(run, *args)
    accuracy = _test_accuracy(setup, apply, result.params)
    return {"first": first, "steady": steady, "accuracy": accuracy,
            "diverged": int(np.asarray(result.diverged).sum())}


def bench_api(setup: Setup) -> dict[str, Any]:
    """W2 through the API a user calls: a strategy on re-derived damage.

    ``get_strategy("finetune")`` and :func:`recovjax.recover_damage`: every
    damaged copy is made on device, inside the recovery program, from the
    same keys and ratios as the stack the other rows share.
    """
    from recovjax.damage import get_damage
    from recovjax.models import get_model
    from recovjax.recovery import get_strategy, make_task, recover_damage
    task = make_task(get_model("lenet5"), setup.dataset.train)
    strategy = get_strategy("finetune", optimizer=_optimizer(),
                            steps=setup.steps, batch_size=BATCH)
    ratios = jnp.asarray([r for r, _ in setup.points], jnp.float32)
    op = get_damage("zero")

    def run():
        return recover_damage(strategy, task, op, setup.pretrained.params,
                              damage_keys=setup.damage_keys, amounts=ratios,
                              keys=setup.order_keys)

    _, first = _timed(run)
    result, steady = _timed(run)
    return {"first": first, "steady": steady,
            "diverged": int(np.asarray(result.diverged).sum())}


def bench_chunked(setup: Setup, apply, chunk: int = 10) -> dict[str, Any]:
    """W2 as ``count / chunk`` calls of one vmapped program of ``chunk``."""
    from recovjax.recovery import make_finetune, stack_recover
    run = stack_recover(make_finetune(apply, _optimizer(), steps=setup.steps,
                                      batch_size=BATCH))
    start = time.perf_counter()
    for lo in range(0, setup.count, chunk):
        _timed(run, *_stack_args(setup, lo, lo + chunk))
    first = time.perf_counter() - start
    start = time.perf_counter()
    for lo in range(0, setup.count, chunk):
        _timed(run, *_stack_args(setup, lo, lo + chunk))
    return {"first": first, "steady": time.perf_counter() - start}


def bench_sequential(setup: Setup, apply) -> dict[str, Any]:
    """W2 as a loop calling one compiled single-model program 20 times."""
    from recovjax.recovery import make_finetune
    run = jax.jit(make_finetune(apply, _optimizer(), steps=setup.steps,
                                batch_size=BATCH))
    keys, params, masks, images, labels, weights = _stack_args(setup)
    pick = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
    start = time.perf_counter()
    _timed(run, keys[0], pick(params, 0), pick(masks, 0), images, labels,
           weights)
    first_model = time.perf_counter() - start
    for index in range(1, setup.count):
        _timed(run, keys[index], pick(params, index), pick(masks, index),
               images, labels, weights)
    return {"first": time.perf_counter() - start,
            "steady": (time.perf_counter() - start - first_model)
            * setup.count / (setup.count - 1)}


def _torch_threads(images, labels, candidates=(1, 2), steps: int = 20,
                   trials: int = 3) -> int:
    """The faster PyTorch thread count for this step, measured briefly.

    Candidates alternate for ``trials`` rounds and each keeps its best time,
    so one slow moment of a noisy machine cannot pick the slower setting.
    """
    import torch
    import torch.nn.functional as F
    from torch_lenet import TorchLeNet5
    best_times = {threads: float("inf") for threads in candidates}
    for trial in range(trials + 1):          # the first round warms up
        for threads in candidates:
            torch.set_num_threads(threads)
            model = TorchLeNet5()
            optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE,
                                        momentum=MOMENTUM)
            start = time.perf_counter()
            for step in range(steps):
                batch = torch.arange(step * BATCH, (step + 1) * BATCH)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(images[batch]), labels[batch]).backward()
                optimizer.step()
            if trial:
                best_times[threads] = min(best_times[threads],
                                          time.perf_counter() - start)
    return min(candidates, key=best_times.__getitem__)


def bench_torch(setup: Setup, threads: int | None = None) -> dict[str, Any]:
    """W2 as the PyTorch loop: same damaged weights, batch, steps, optimiser.

    ``threads=None`` uses the faster of 1 and 2 intra-op threads (measured
    on 20 steps first), so the baseline is not handicapped by a bad choice.
    """
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, str(HERE))
    from torch_lenet import evaluate_torch, lenet_from_params, torch_data
    images, labels = torch_data(setup.dataset.train.images,
                                setup.dataset.train.labels)
    test_images, test_labels = torch_data(setup.dataset.test.images,
                                          setup.dataset.test.labels)
    if threads is None:
        threads = _torch_threads(images, labels)
    torch.set_num_threads(threads)
    host = jax.device_get(setup.damage.params)
    accuracies = []
    start = time.perf_counter()
    for index, (_, seed) in enumerate(setup.points):
        model = lenet_from_params(jax.tree.map(lambda x: x[index], host))
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE,
                                    momentum=MOMENTUM)
        generator = torch.Generator().manual_seed(1000 * index + seed)
        order = torch.empty(0, dtype=torch.long)
        for step in range(setup.steps):
            if len(order) < BATCH:
                order = torch.randperm(len(labels), generator=generator)
            batch, order = order[:BATCH], order[BATCH:]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
        accuracies.append(evaluate_torch(model.eval(), test_images,
                                         test_labels)[0])
    seconds = time.perf_counter() - start
    return {"steady": seconds, "accuracy": np.asarray(accuracies),
            "threads": threads, "version": torch.__version__}


def bench_rounds(setup: Setup, apply, threads: int, rounds: int
                 ) -> list[tuple[float, float]]:
    """Steady-state W2 in alternating rounds: ``stack_recover``, then PyTorch.

    The machine's speed drifts by tens of percent from minute to minute, so
    one measurement of each side says little; rounds that alternate the two
    see the same drift, and the target is judged on their median ratio.

    Returns:
        ``(recovjax seconds, PyTorch seconds)`` per round.
    """
    from recovjax.recovery import make_finetune, stack_recover
    run = stack_recover(make_finetune(apply, _optimizer(), steps=setup.steps,
                                      batch_size=BATCH))
    args = _stack_args(setup)
    _timed(run, *args)
    pairs = []
    for _ in range(rounds):
        ours = _timed(run, *args)[1]
        pairs.append((ours, bench_torch(setup, threads=threads)["steady"]))
    return pairs


def bench_restore(setup: Setup, repeats: int = 5) -> list[dict[str, Any]]:
    """Restore strategies on one damaged copy: time and bytes read."""
    from recovjax.checkpoints import save_checkpoint
    from recovjax.recovery import (damaged_leaf_paths, detect_and_restore,
                                   restore_entries, restore_full,
                                   restore_leaves)
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_checkpoint(pathlib.Path(tmp) / "ckpt",
                                    setup.pretrained.params,
                                    {"model": "lenet5"})
        every = jax.tree.map(lambda x: x[0], setup.damage)
        # A fault confined to two leaves: where partial reads pay off.
        few = {"conv1/kernel", "fc3/bias"}
        flat_params = {layer: {name: (leaf if f"{layer}/{name}" in few else
                                      setup.pretrained.params[layer][name])
                               for name, leaf in leaves.items()}
                       for layer, leaves in every.params.items()}
        flat_mask = {layer: {name: (leaf if f"{layer}/{name}" in few else
                                    jnp.zeros_like(leaf))
                             for name, leaf in leaves.items()}
                     for layer, leaves in every.mask.items()}
        cases = {"every tensor damaged": (every.params, every.mask),
                 "2 of 10 tensors damaged": (flat_params, flat_mask)}
        rows = []
        for case, (params, mask) in cases.items():
            strategies = {
                "restore_full": lambda: restore_full(directory, params),
                "restore_leaves": lambda: restore_leaves(
                    directory, params, damaged_leaf_paths(mask)),
                "restore_entries": lambda: restore_entries(directory, params,
                                                           mask),
                "detect_restore": lambda: detect_and_restore(directory,
                                                             params),
            }
            for name, run in strategies.items():
                run()
                results = [run() for _ in range(repeats)]
                rows.append({
                    "case": case, "name": name,
                    "seconds": statistics.median(r.seconds for r in results),
                    "bytes_read": results[-1].bytes_read,
                    "array_bytes": results[-1].array_bytes,
                    "leaves": len(results[-1].restored_leaves)})
    return rows


# --------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------


def _machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0, 0, 0)
    return (f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at start, "
            f"JAX {jax.__version__} ({jax.default_backend()})")


def main(argv: list[str] | None = None) -> str:
    """Run W2 and the restore comparison; return the markdown section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help="replace the recovery section of RESULTS.md")
    parser.add_argument("--quick", action="store_true",
                        help="20 steps instead of 200 (smoke run)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--devices", type=int, default=os.cpu_count(),
                        help="CPU devices JAX shows (default: one per core)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # Before anything starts JAX's backend.
    jax.config.update("jax_num_cpu_devices", args.devices)
    from recovjax.recovery import peak_memory
    machine = _machine()
    devices = len(jax.devices())
    steps = 20 if args.quick else STEPS
    setup = Setup(steps)
    model_steps = setup.count * steps
    log = functools.partial(print, file=sys.stderr, flush=True)

    log("formulations ...")
    table = bench_formulations(setup)
    best = min(table, key=lambda row: row["per_step_ms"])
    library_name, library_apply = next(iter(formulations().items()))
    log(f"fastest formulation: {best['name']}; W2 vmapped ...")
    vmapped = bench_vmapped(setup, library_apply)
    log("W2 through the API ...")
    api = bench_api(setup)
    log("W2 one device ...")
    one_device = bench_vmapped(setup, library_apply,
                               devices=jax.devices()[:1])
    log("W2 one vmap over the stack ...")
    whole_vmap = bench_vmapped(setup, library_apply, devices=jax.devices()[:1],
                               group_size=setup.count)
    log("W2 chunks ...")
    chunked = bench_chunked(setup, library_apply)
    log("W2 sequential ...")
    sequential = bench_sequential(setup, library_apply)
    torch_result, rounds = None, []
    if not args.skip_torch:
        log("W2 PyTorch ...")
        torch_result = bench_torch(setup)
        log("W2 alternating rounds ...")
        rounds = bench_rounds(setup, library_apply, torch_result["threads"],
                              1 if args.quick else ROUNDS)
    log("restore ...")
    restore = bench_restore(setup)
    memory = peak_memory()

    def per_step(seconds):
        return seconds / model_steps * 1e3

    lines = [
        "## W2: recovery (fine-tune 20 damaged LeNet-5 copies)",
        "",
        "Command: `python benchmarks/bench_recovery.py"
        + "".join(f" {a}" for a in (argv if argv is not None
                                    else sys.argv[1:])) + "`"
        f" on {machine}.",
        f"Workload: zero damage at ratios {list(RATIOS)} x seeds "
        f"{list(SEEDS)} = {setup.count} models, {steps} steps of batch "
        f"{BATCH} each ({model_steps} model-steps), SGD lr {LEARNING_RATE} "
        f"momentum {MOMENTUM}, own data order per model. JAX shows {devices} "
        "CPU device(s) (`--devices`, default one per core).",
        "",
        "### Convolution formulations (vmapped train step, 20 models x 20 "
        "steps)",
        "",
        "| formulation | ms per model-step (best / median) | XLA MFLOP per "
        "step | first call s |",
        "|---|---|---|---|",
    ]
    for row in table:
        lines.append(f"| {row['name']} | {row['per_step_ms']:.2f} / "
                     f"{row['median_ms']:.2f} | {row['mflop']:.0f} | "
                     f"{row['first']:.1f} |")
    lines += [
        "",
        f"Fastest in this run: **{best['name']}**. Every row has the "
        "registry's LeNet-5 parameters; W2 below runs the library's own "
        f"model ({library_name}), as `recovjax.recovery` does.",
        "",
        "### W2",
        "",
        "| run | first call s (compile incl.) | steady s | ms per "
        "model-step | vs PyTorch |",
        "|---|---|---|---|---|",
    ]
    baseline = torch_result["steady"] if torch_result else None

    def speed(seconds):
        return f"{baseline / seconds:.2f}x" if baseline else "n/a"

    runs = [(f"recovjax `stack_recover` (one program, 20 models, "
             f"sharded over all {devices} device{'s' if devices > 1 else ''})",
             vmapped),
            ("recovjax API: `recover_damage` with strategy `finetune`, "
             "each damaged copy re-derived on device, all devices", api),
            ("recovjax `stack_recover`, 1 device", one_device),
            ("recovjax one `vmap` over all 20 models, 1 device", whole_vmap),
            ("recovjax 2 chunks of 10", chunked),
            ("recovjax sequential loop of jitted single-model calls, "
             "1 device", sequential)]
    for name, run in runs:
        lines.append(f"| {name} | {run['first']:.1f} | {run['steady']:.1f} "
                     f"| {per_step(run['steady']):.2f} | "
                     f"{speed(run['steady'])} |")
    if torch_result:
        lines.append(f"| PyTorch {torch_result['version']} loop "
                     f"({torch_result['threads']} threads) | - | "
                     f"{torch_result['steady']:.1f} | "
                     f"{per_step(torch_result['steady']):.2f} | 1.00x |")
    if torch_result:
        ratios = [theirs / ours for ours, theirs in rounds]
        ratio = statistics.median(ratios)
        shown = "; ".join(f"{ours:.1f} / {theirs:.1f} ({theirs / ours:.2f}x)"
                          for ours, theirs in rounds)
        lines += ["", f"Alternating rounds, steady state (recovjax "
                  f"`stack_recover` on all devices / PyTorch loop, s): "
                  f"{shown}.",
                  "", f"Target (vmapped recovery, steady state, >= 2x the "
                  "PyTorch loop, median of the alternating rounds): "
                  f"**{'met' if ratio >= 2 else 'not met'}** "
                  f"({ratio:.2f}x; the single measurements in the table "
                  f"give {torch_result['steady'] / vmapped['steady']:.2f}x, "
                  f"{torch_result['steady'] / vmapped['first']:.2f}x "
                  "counting the first call's compilation)."]
    lines += ["", "Mean test accuracy after recovery (sanity check, same "
              "damaged weights): recovjax "
              f"{vmapped['accuracy'].mean():.4f}"
              + (f", PyTorch {torch_result['accuracy'].mean():.4f}"
                 if torch_result else "")
              + f"; diverged: {vmapped['diverged']}.",
              f"Peak RSS of the benchmark process: "
              f"{memory.host_bytes / 2 ** 20:.0f} MiB.",
              "",
              "### Restore from the Orbax checkpoint (one damaged copy)",
              "",
              "| damage | strategy | median s | bytes read (files) | array "
              "bytes restored | leaves read |",
              "|---|---|---|---|---|---|"]
    for row in restore:
        lines.append(f"| {row['case']} | {row['name']} | "
                     f"{row['seconds']:.4f} | {row['bytes_read']:,} | "
                     f"{row['array_bytes']:,} | {row['leaves']} |")
    lines += ["", "Bytes read are the process's `rchar` delta (checkpoint "
              "metadata included); array bytes are the restored arrays' "
              "`nbytes`. The checkpoint is compressed by Orbax, so a full "
              "read is slightly below the raw array size."]
    section = "\n".join(lines) + "\n"
    if args.write:
        write_section("recovery", section)
    print(section)
    return section


if __name__ == "__main__":
    main()
