"""One accelerator run: W1 at 10,000 LeNet-5 models, W3 and a mesh sweep.

Written for one lent GPU (an NVIDIA H200) and a hard limit of ten minutes,
it measures what the CPU benchmarks cannot:

1. **W1 at scale**: the W1 sweep of ``benchmarks/bench_sweep.py``
   (pretrained LeNet-5 on ``mnist5k``, damage ``zero``) over 100 ratios in
   [0, 0.95] x 100 seeds = 10,000 models, each on the 1,000 test images:
   the first call (compilation included) and the steady state, as
   model-images per second, under the backend's default formulations and
   under the others (the other backend's defaults, and each mechanism
   swapped alone), which is what confirms or refutes the accelerator
   defaults of :mod:`recovjax.formulations`.
2. **W3**: a 1,000-point sweep (20 ratios x 50 seeds) of ``--w3-model``
   (default ``resnet18`` on ``--w3-dataset fashion_mnist``) over 1,000
   test images: time per point and peak device memory
   (``device.memory_stats()``), under the default formulations and, if the
   budget allows, the other backend's. Without pretrained weights in the zoo, or
   for a model this checkout does not know (then the built-in residual
   ``rescnn``), or a dataset it cannot load (then random images of the
   same shape), it says so in one line and goes on: timing does not depend
   on the values.
3. **Mesh**: W3's sweep on fewer seeds with ``model_devices`` = every
   visible device, a points x model mesh (``1 x n``; on one GPU ``1 x 1``,
   the runner's points-only mesh), its time per point and how far its
   accuracies lie from the same points of W3.

Usage::

    python benchmarks/gpu.py --write           # on the GPU: section "gpu" of RESULTS.md
    python benchmarks/gpu.py --out gpu.json    # every figure as JSON, too
    python benchmarks/gpu.py --tiny --out x.json   # CPU-sized (tests/test_gpu_bench.py)

Each part runs in its own process, so its peak device memory is its own
and a part that overruns ``--budget-s`` (default 540 s) is stopped without
losing what the others measured; progress lines go to stderr. The
persistent compilation cache is off, so first calls include compiling.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable

HERE = pathlib.Path(__file__).resolve().parent

MAX_RATIO = 0.95
"""The W1 ratio grid's top, as in ``bench_sweep.py``."""

W1_SHARE = 0.45
"""Share of the budget W1's optional formulations may use (its default
formulation always runs)."""

GRACE_S = 15.0
"""Seconds a part may run past the budget before it is stopped."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How large each part is."""

    w1_ratios: int
    w1_seeds: int
    images: int
    w1_batch: int
    w1_vmap: int
    w3_ratios: int
    w3_seeds: int
    w3_batch: int
    w3_vmap: int
    mesh_seeds: int
    repeats: int
    all_variants: bool
    w3_variants: bool
    min_part_s: float


FULL = Sizes(w1_ratios=100, w1_seeds=100, images=1000, w1_batch=1000,
             w1_vmap=500, w3_ratios=20, w3_seeds=50, w3_batch=250,
             w3_vmap=25, mesh_seeds=5, repeats=3, all_variants=True,
             w3_variants=True, min_part_s=45.0)
"""The sizes of the GPU run."""

TINY = Sizes(w1_ratios=5, w1_seeds=4, images=100, w1_batch=100, w1_vmap=2,
             w3_ratios=2, w3_seeds=2, w3_batch=50, w3_vmap=2, mesh_seeds=1,
             repeats=1, all_variants=False, w3_variants=False,
             min_part_s=0.0)
"""A CPU-sized run of every part (20 W1 points, 100 images; W3 under the
default formulations only)."""


def ratio_grid(count: int) -> list[float]:
    """``count`` evenly spaced ratios in [0, 0.95] (W1's grid)."""
    if count == 1:
        return [0.0]
    return [round(MAX_RATIO * i / (count - 1), 10) for i in range(count)]


# --------------------------------------------------------------------------
# Inside a part's process.
# --------------------------------------------------------------------------


class Reporter:
    """Results on stdout (one JSON object a line), progress on stderr."""

    def __init__(self, part: str):
        self.part = part
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        seconds = time.perf_counter() - self.start
        print(f"[gpu {self.part} {seconds:6.1f}s] {text}", file=sys.stderr,
              flush=True)

    def emit(self, section: str, value: Any, *, append: bool = False
             ) -> None:
        print("RESULT " + json.dumps({"section": section, "value": value,
                                      "append": append}), flush=True)


def _memory() -> dict[str, int | None]:
    # The process's peaks so far: device memory (the largest over the
    # local devices, where the backend reports it) and host RSS (VmHWM).
    import jax
    stats = [device.memory_stats() or {} for device in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    limits = [s["bytes_limit"] for s in stats if "bytes_limit" in s]
    with open("/proc/self/status") as status:
        rss = [int(line.split()[1]) * 1024 for line in status
               if line.startswith("VmHWM:")]
    return {"peak_device_bytes": max(peaks) if peaks else None,
            "device_bytes_limit": min(limits) if limits else None,
            "peak_host_rss_bytes": rss[0] if rss else None}


def _memory_budget() -> int | None:
    # A group of models may take 40 % of the device (the sweep lowers
    # vmap_size to fit); the library's default where nothing is known.
    limit = _memory()["device_bytes_limit"]
    return int(0.4 * limit) if limit else None


def meta() -> dict[str, Any]:
    """What ran: device, versions, the default formulations."""
    import jax

    from recovjax.formulations import describe_formulations
    from recovjax.pretrain import library_versions
    devices = jax.devices()
    versions = library_versions()
    return {"platform": devices[0].platform,
            "device_kind": devices[0].device_kind,
            "device_count": len(devices), "jax": versions["jax"],
            "jaxlib": versions["jaxlib"], "python": versions["python"],
            "date": time.strftime("%Y-%m-%d"),
            "formulations": describe_formulations()}


def program_ops(model, op, params, batches) -> dict[str, int]:
    """Operations in one sweep point's program: the formulation traced.

    ``convolution`` appears with ``conv="lax"`` only, ``threefry`` with
    ``random="jax"``, and ``select="sort"`` sorts every group of every
    leaf (the bitwise search sorts small groups only, and none of
    ``"hash"`` draws).
    """
    import re

    import jax
    import jax.numpy as jnp

    from recovjax.sweep.program import point_fn
    point = (jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
             jax.ShapeDtypeStruct((), jnp.float32),
             jax.ShapeDtypeStruct((), jnp.bool_))
    text = jax.jit(point_fn(model, op, None)).lower(
        point, (params, batches)).as_text()
    return {"convolution": len(re.findall(r"stablehlo\.convolution", text)),
            "sort": len(re.findall(r"stablehlo\.sort", text)),
            "threefry": len(re.findall(r"threefry2x32", text)),
            "dot_general": len(re.findall(r"stablehlo\.dot_general", text))}


def _accuracies(table) -> dict[tuple[float, int], float]:
    return {(row["ratio"], row["seed"]): float(row["value"])
            for row in table.rows
            if row["metric"] == "accuracy" and row["stage"] == "damaged"}


def _timed(run: Callable[[Callable], Any]) -> tuple[float, float, Any]:
    # Wall time of run(on_chunk), and the time its last chunk arrived:
    # after that the sweep only builds its results table on the host.
    marks = []
    start = time.perf_counter()
    result = run(lambda chunk: marks.append(time.perf_counter()))
    end = time.perf_counter()
    return end - start, (marks[-1] if marks else end) - start, result


def measure_sweep(run: Callable[[Callable], Any], *, points: int,
                  images: int, repeats: int) -> dict[str, Any]:
    """First call and steady state of ``run(on_chunk)`` (a sweep).

    ``steady_s`` is the median wall time of ``repeats`` further calls,
    ``stream_s`` the median time until the last chunk's results were on
    the host (the rest is the results table, built on the host).
    """
    first, _, result = _timed(run)
    walls, streams = [], []
    for _ in range(repeats):
        wall, stream, _ = _timed(run)
        walls.append(wall)
        streams.append(stream)
    wall, stream = statistics.median(walls), statistics.median(streams)
    accuracy = _accuracies(result.table)
    ratios = sorted({ratio for ratio, _ in accuracy})

    def mean_at(ratio):
        return statistics.fmean(value for (r, _), value in accuracy.items()
                                if r == ratio)

    return {"first_s": first, "steady_s": wall, "steady_runs_s": walls,
            "stream_s": stream, "table_s": wall - stream,
            "points": points, "images": images,
            "model_images_per_s": points * images / wall,
            "stream_model_images_per_s": points * images / stream,
            "seconds_per_point": wall / points,
            "plan": dataclasses.asdict(result.plan),
            "accuracy_at_lowest_ratio": mean_at(ratios[0]),
            "accuracy_at_highest_ratio": mean_at(ratios[-1]),
            "accuracies": accuracy}


def estimate_s(first_s: float, steady_s: float, runs: float) -> float:
    """Seconds a measurement like one that took ``first_s`` to compile
    and run and ``steady_s`` per further run needs for ``runs`` more, with
    a 30 % margin (compile times differ between formulations)."""
    return 1.3 * (first_s + steady_s * runs)


def skip_note(what: str, needed_s: float, deadline: float,
              now: float | None = None) -> str | None:
    """``None`` if ``needed_s`` seconds from now end before ``deadline``,
    else the note that says why ``what`` is skipped."""
    now = time.time() if now is None else now
    if now + needed_s <= deadline:
        return None
    return (f"{what} skipped (needs about {needed_s:.0f} s, "
            f"{max(0.0, deadline - now):.0f} s left of its budget)")


def formulation_variants(all_variants: bool) -> list[tuple[str, dict]]:
    """``(label, overrides)``: the defaults first, then the alternatives.

    The alternatives are the other backend's defaults (the CPU
    formulations on an accelerator, the plain JAX ones on CPU) and, with
    ``all_variants``, the defaults with one mechanism swapped to it.
    """
    import jax

    from recovjax import formulations
    chosen = formulations.current_formulations()
    other = (formulations.ACCELERATOR_DEFAULTS
             if jax.default_backend() == "cpu"
             else formulations.CPU_DEFAULTS)
    variants = [("defaults", {})]
    if other != chosen:
        name = ("plain JAX formulations" if jax.default_backend() == "cpu"
                else "CPU formulations")
        variants.append((name, other._asdict()))
    if all_variants:
        for mechanism in formulations.MECHANISMS:
            if getattr(other, mechanism) != getattr(chosen, mechanism):
                swap = {mechanism: getattr(other, mechanism)}
                variant = chosen._replace(**swap)
                if variant != other:
                    label = f"defaults, {mechanism}={swap[mechanism]}"
                    variants.append((label, swap))
    return variants


def run_variants(report: Reporter, section: str, variants, make_run,
                 *, model, op, params, batches, points: int, images: int,
                 repeats: int, deadline: float) -> list[dict[str, Any]]:
    """Measure ``make_run()`` under each formulation variant in turn.

    The first variant always runs; a later one only if, judged by the
    first, it ends before ``deadline`` (a note says which were skipped).

    Returns:
        The figures of each variant measured (also emitted), accuracies
        as ``[ratio, seed, accuracy]`` triples.
    """
    measured = []
    import recovjax
    from recovjax.formulations import describe_formulations
    cost = None
    for index, (label, overrides) in enumerate(variants):
        runs = repeats if index == 0 else min(repeats, 2)
        if cost is not None:
            note = skip_note(f"{section}: {label}",
                             estimate_s(cost["first"], cost["steady"], runs),
                             deadline)
            if note:
                report.say(note)
                report.emit("notes", note, append=True)
                continue
        with recovjax.use_formulations(**overrides):
            described = describe_formulations()
            report.say(f"{label}: conv={described['conv']} "
                       f"random={described['random']} "
                       f"select={described['select']}")
            figures = measure_sweep(make_run, points=points, images=images,
                                    repeats=runs)
            figures["ops"] = program_ops(model, op, params, batches)
        if cost is None:
            cost = {"first": figures["first_s"],
                    "steady": figures["steady_s"]}
        figures.update(label=label, formulations=described,
                       **_memory())
        figures["accuracies"] = [[r, s, v] for (r, s), v in
                                 sorted(figures["accuracies"].items())]
        report.say(f"{label}: first {figures['first_s']:.2f} s, steady "
                   f"{figures['steady_s']:.3f} s, "
                   f"{figures['model_images_per_s']:,.0f} model-images/s")
        report.emit(section, figures, append=True)
        measured.append(figures)
    return measured


def part_w1(args: argparse.Namespace, sizes: Sizes) -> None:
    """W1 at scale under each formulation variant."""
    report = Reporter("w1")
    import jax  # noqa: F401  (JAX starts here, after use_all_cores)

    from recovjax import Split
    from recovjax.damage import get_damage
    from recovjax.data import batch_split, load_dataset
    from recovjax.models import get_model
    from recovjax.pretrain import load_pretrained
    from recovjax.sweep import sweep

    report.emit("meta", meta())
    start = time.perf_counter()
    dataset = load_dataset("mnist5k")
    test = Split(dataset.test.images[:sizes.images],
                 dataset.test.labels[:sizes.images])
    pretrained = load_pretrained("lenet5", "mnist5k", seed=0, progress=False)
    model, params = get_model("lenet5"), pretrained.params
    setup = time.perf_counter() - start
    report.say(f"setup (data, pretrained LeNet-5) {setup:.1f} s")
    op = get_damage("zero")
    grid = ratio_grid(sizes.w1_ratios)
    points = sizes.w1_ratios * sizes.w1_seeds
    budget = _memory_budget()
    options = {} if budget is None else {"memory_budget_bytes": budget}
    report.emit("w1_setup", {
        "setup_s": setup, "points": points, "ratios": sizes.w1_ratios,
        "seeds": sizes.w1_seeds, "images": sizes.images,
        "batch_size": sizes.w1_batch, "vmap_size": sizes.w1_vmap,
        "model": "lenet5", "dataset": "mnist5k", "damage": "zero",
        "pretrained_accuracy": pretrained.metadata.get("test_accuracy"),
        **options})

    def run(on_chunk):
        return sweep(model, params, damages={"zero": op}, ratios=grid,
                     seeds=sizes.w1_seeds, data=test, root_key=0,
                     batch_size=sizes.w1_batch, vmap_size=sizes.w1_vmap,
                     include_clean=False, on_chunk=on_chunk, **options)

    run_variants(report, "w1", formulation_variants(sizes.all_variants),
                 run, model=model, op=op, params=params,
                 batches=batch_split(test, sizes.w1_batch), points=points,
                 images=sizes.images, repeats=sizes.repeats,
                 deadline=args.deadline)


def w3_setup(name: str, dataset_name: str, images: int
             ) -> tuple[Any, Any, Any, dict[str, Any], list[str]]:
    """W3's model, parameters and test split, falling back where needed.

    Returns:
        ``(model, params, split, facts, notes)``: an unknown model becomes
        ``rescnn``; a dataset that cannot be loaded becomes random images
        of 28x28x1; weights missing from the zoo (or unreadable) become
        freshly initialised ones. Each fallback adds one line to ``notes``.
    """
    import jax
    import numpy as np

    from recovjax import Split
    from recovjax.data import load_dataset
    from recovjax.models import get_model, model_names
    from recovjax.pretrain import load_pretrained, zoo_path

    notes = []
    if name not in model_names():
        notes.append(f"w3: model {name!r} is not registered here (known: "
                     f"{', '.join(model_names())}); timing 'rescnn' instead,"
                     " freshly initialised")
        model_name = "rescnn"
    else:
        model_name = name
    try:
        dataset = load_dataset(dataset_name)
        split = Split(dataset.test.images[:images],
                      dataset.test.labels[:images])
        num_classes = dataset.num_classes
    except Exception as error:  # noqa: BLE001  (any failure: say it, go on)
        reason = " ".join(str(error).split())[:200]
        notes.append(f"w3: dataset {dataset_name!r} is not available "
                     f"({type(error).__name__}: {reason}); timing {images} "
                     "random 28x28x1 images instead")
        rng = np.random.default_rng(0)
        split = Split(rng.random((images, 28, 28, 1), np.float32),
                      rng.integers(0, 10, images).astype(np.int32))
        num_classes = 10
    model = get_model(model_name, num_classes=num_classes,
                      sample=split.images[:1])
    weights = "fresh"
    params = None
    if model_name == name:
        path = zoo_path(model_name, dataset_name, 0)
        if path.exists():
            try:
                pretrained = load_pretrained(model_name, dataset_name,
                                             seed=0, progress=False)
                params, weights = pretrained.params, "pretrained"
                state = getattr(pretrained, "state", None)
                if state is not None:
                    model = model.with_state(state)
            except Exception as error:  # noqa: BLE001
                reason = " ".join(str(error).split())[:200]
                notes.append(f"w3: pretrained {model_name} for "
                             f"{dataset_name} could not be restored "
                             f"({reason}); freshly initialised weights "
                             "(timing does not depend on them)")
        else:
            notes.append(f"w3: no pretrained {model_name} for "
                         f"{dataset_name} in the zoo ({path}); freshly "
                         "initialised weights (timing does not depend on "
                         "them)")
    if params is None:
        params = model.init(jax.random.key(0))
    facts = {"model": model_name, "requested_model": name,
             "dataset": dataset_name, "weights": weights,
             "parameters": int(sum(np.size(leaf)
                                   for leaf in jax.tree.leaves(params)))}
    return model, params, split, facts, notes


def part_w3(args: argparse.Namespace, sizes: Sizes) -> None:
    """W3, then the mesh sweep on its model."""
    report = Reporter("w3")
    import jax

    from recovjax.damage import get_damage
    from recovjax.data import batch_split
    from recovjax.sweep import sweep

    report.emit("meta", meta())
    start = time.perf_counter()
    model, params, split, facts, notes = w3_setup(
        args.w3_model, args.w3_dataset, sizes.images)
    for note in notes:
        report.say(note)
        report.emit("notes", note, append=True)
    setup = time.perf_counter() - start
    report.say(f"setup ({facts['model']}, {facts['parameters']:,} "
               f"parameters, {facts['weights']} weights) {setup:.1f} s")
    op = get_damage("zero")
    grid = ratio_grid(sizes.w3_ratios)
    points = sizes.w3_ratios * sizes.w3_seeds
    budget = _memory_budget()
    options = {} if budget is None else {"memory_budget_bytes": budget}
    report.emit("w3_setup", {**facts, "setup_s": setup, "points": points,
                             "ratios": sizes.w3_ratios,
                             "seeds": sizes.w3_seeds,
                             "images": sizes.images,
                             "batch_size": sizes.w3_batch,
                             "vmap_size": sizes.w3_vmap, **options})

    def sweep_of(seeds: int, **extra):
        return lambda on_chunk: sweep(
            model, params, damages={"zero": op}, ratios=grid, seeds=seeds,
            data=split, root_key=0, batch_size=sizes.w3_batch,
            vmap_size=sizes.w3_vmap, include_clean=False, on_chunk=on_chunk,
            **options, **extra)

    # W3 leaves a quarter of what remains, judged after its first
    # formulation, to the mesh sweep (a tenth of the points or fewer).
    variants = formulation_variants(False)[:2 if sizes.w3_variants else 1]
    measured = run_variants(
        report, "w3", variants, sweep_of(sizes.w3_seeds),
        model=model, op=op, params=params,
        batches=batch_split(split, sizes.w3_batch), points=points,
        images=sizes.images, repeats=1,
        deadline=args.deadline - 0.25 * max(0.0,
                                            args.deadline - time.time()))

    devices = jax.devices()
    mesh_points = sizes.w3_ratios * sizes.mesh_seeds
    first = measured[0]
    note = skip_note("mesh:", estimate_s(first["first_s"], first["steady_s"],
                                         2 * mesh_points / points),
                     args.deadline)
    if note:
        report.say(note)
        report.emit("notes", note, append=True)
        return
    report.say(f"mesh: {mesh_points} points, model_devices={len(devices)} "
               f"(mesh 1 x {len(devices)})")
    # The defaults, as W3's first variant: the same points must give the
    # same accuracies (exactly on one device; a model axis may move an
    # example across the decision boundary only within rounding).
    figures = measure_sweep(sweep_of(sizes.mesh_seeds,
                                     model_devices=len(devices)),
                            points=mesh_points, images=sizes.images,
                            repeats=1)
    reference = {(ratio, seed): value
                 for ratio, seed, value in measured[0]["accuracies"]}
    differences = [abs(value - reference[key])
                   for key, value in figures.pop("accuracies").items()
                   if key in reference]
    figures.update(devices=len(devices),
                   mesh={"points": 1, "model": len(devices)},
                   compared_points=len(differences),
                   max_accuracy_difference=max(differences)
                   if differences else None, **_memory())
    report.say(f"mesh: first {figures['first_s']:.2f} s, steady "
               f"{figures['steady_s']:.3f} s; accuracies within "
               f"{figures['max_accuracy_difference']} of W3's")
    report.emit("mesh", figures)


PARTS = {"w1": part_w1, "w3": part_w3}
"""Each part's function, run in a process of its own (``--part``)."""


# --------------------------------------------------------------------------
# The driver: one process per part, within the budget.
# --------------------------------------------------------------------------


def run_part(part: str, args: argparse.Namespace, soft_deadline: float,
             hard_deadline: float) -> tuple[list[dict], str | None]:
    """Run one part in a child process; its results and an error, if any.

    The child is stopped ``GRACE_S`` after ``hard_deadline``; what it
    reported until then is kept.
    """
    command = [sys.executable, str(pathlib.Path(__file__).resolve()),
               "--part", part, "--deadline", repr(soft_deadline),
               "--w3-model", args.w3_model, "--w3-dataset", args.w3_dataset]
    if args.tiny:
        command.append("--tiny")
    env = dict(os.environ, RECOVJAX_COMPILATION_CACHE="0")
    child = subprocess.Popen(command, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    # Progress (stderr) is passed through as it comes, and its last lines
    # are kept to say why a part failed; results (stdout) are collected.
    tail: collections.deque[str] = collections.deque(maxlen=20)
    lines: list[str] = []

    def relay():
        for line in child.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line.rstrip())

    readers = [threading.Thread(target=relay, daemon=True),
               threading.Thread(target=lambda: lines.extend(child.stdout),
                                daemon=True)]
    for reader in readers:
        reader.start()
    timeout = max(1.0, hard_deadline - time.time() + GRACE_S)
    error = None
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        error = (f"{part}: stopped after {timeout:.0f} s, at the end of the "
                 "budget; what it measured until then is kept")
    for reader in readers:
        reader.join(timeout=10)
    if child.returncode and error is None:
        last = next((line for line in reversed(tail) if line.strip()), "")
        error = (f"{part}: failed with exit status {child.returncode}"
                 + (f" ({last[:300]})" if last else ""))
    results = []
    for line in lines:
        if line.startswith("RESULT "):
            try:
                results.append(json.loads(line[len("RESULT "):]))
            except json.JSONDecodeError:  # cut short by a kill
                pass
    return results, error


def collect(results: list[dict], into: dict[str, Any]) -> None:
    """Merge a part's ``RESULT`` lines into the report's sections."""
    for result in results:
        section, value = result["section"], result["value"]
        if result["append"]:
            into.setdefault(section, []).append(value)
        elif section == "meta":
            into.setdefault("meta", {}).update(value)
        else:
            into[section] = value


def _rate(value: float) -> str:
    return f"{value / 1e6:,.2f} M" if value >= 1e6 else f"{value:,.0f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f}"


def _triple(described: dict) -> str:
    return (f"{described['conv']} / {described['random']} / "
            f"{described['select']}")


def markdown(report: dict[str, Any], command: str) -> str:
    """The RESULTS.md section of one run."""
    meta = report.get("meta", {})
    defaults = meta.get("formulations")
    chosen = (f"Default formulations (conv / random / select): "
              f"{_triple(defaults)}. " if defaults else "")
    header = (f"Command: `{command}` on {meta.get('device_count', '?')} x "
              f"{meta.get('device_kind', '?')} ({meta.get('platform', '?')}),"
              f" {meta.get('date', '?')}; jax {meta.get('jax', '?')}, jaxlib "
              f"{meta.get('jaxlib', '?')}, Python {meta.get('python', '?')}. "
              f"{chosen}Whole run {report.get('elapsed_s', 0):.0f} s of a "
              f"{report.get('budget_s', 0):.0f} s budget; first calls "
              "include compiling (persistent cache off).")
    title = ("## GPU: W1 at 10,000 models, W3, a mesh sweep "
             "(`benchmarks/gpu.py`)")
    lines = [title, "", header]
    setup = report.get("w1_setup")
    if setup:
        intro = (f"**W1**: `zero` damage of pretrained LeNet-5 on mnist5k, "
                 f"{setup['ratios']} ratios x {setup['seeds']} seeds = "
                 f"{setup['points']:,} models, each on {setup['images']:,} "
                 f"test images (batches of {setup['batch_size']}, vmap "
                 f"groups of up to {setup['vmap_size']}); setup (data, "
                 f"pretrained weights) {setup['setup_s']:.1f} s.")
        lines += ["", intro, "",
                  ("| formulation | conv / random / select | first call (s) "
                   "| steady (s) | of which results table (s) | "
                   "model-images/s | vs defaults | accuracy at lowest / "
                   "highest ratio | peak device MiB |"),
                  ("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | "
                   "---: |")]
        variants = report.get("w1", [])
        base = variants[0]["model_images_per_s"] if variants else None
        for row in variants:
            lines.append(
                f"| {row['label']} | {_triple(row['formulations'])} | "
                f"{row['first_s']:.2f} | {row['steady_s']:.3f} | "
                f"{row['table_s']:.3f} | "
                f"{_rate(row['model_images_per_s'])} | "
                f"{row['model_images_per_s'] / base:.2f}x | "
                f"{row['accuracy_at_lowest_ratio']:.4f} / "
                f"{row['accuracy_at_highest_ratio']:.4f} | "
                f"{_mib(row['peak_device_bytes'])} |")
        if variants:
            best = max(variants, key=lambda row: row["model_images_per_s"])
            fastest = (f"Fastest in this run: {best['label']} "
                       f"({_triple(best['formulations'])}). Steady is the "
                       "whole `sweep()` call; the results table (one row "
                       "per point and metric, sorted on the host) is built "
                       "after the last chunk's metrics arrive.")
            lines += ["", fastest]
    setup = report.get("w3_setup")
    if setup:
        intro = (f"**W3**: `zero` damage of {setup['model']} "
                 f"({setup['parameters']:,} parameters, {setup['weights']} "
                 f"weights) on {setup['dataset']}, {setup['ratios']} ratios "
                 f"x {setup['seeds']} seeds = {setup['points']:,} points, "
                 f"each on {setup['images']:,} test images (batches of "
                 f"{setup['batch_size']}, vmap groups of up to "
                 f"{setup['vmap_size']}).")
        lines += ["", intro, "",
                  ("| formulation | conv / random / select | first call (s) "
                   "| steady (s) | ms per point | model-images/s | peak "
                   "device MiB | peak host RSS MiB |"),
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in report.get("w3", []):
            lines.append(
                f"| {row['label']} | {_triple(row['formulations'])} | "
                f"{row['first_s']:.2f} | {row['steady_s']:.3f} | "
                f"{1000 * row['seconds_per_point']:.2f} | "
                f"{_rate(row['model_images_per_s'])} | "
                f"{_mib(row['peak_device_bytes'])} | "
                f"{_mib(row['peak_host_rss_bytes'])} |")
    mesh = report.get("mesh")
    if mesh:
        shape = mesh["mesh"]
        text = (f"**Mesh**: W3's sweep on {mesh['points']} points with "
                f"`model_devices={shape['model']}` over {mesh['devices']} "
                f"device(s) (mesh {shape['points']} x {shape['model']}): "
                f"first call {mesh['first_s']:.2f} s, steady "
                f"{mesh['steady_s']:.3f} s "
                f"({1000 * mesh['seconds_per_point']:.2f} ms per point); "
                f"accuracies of the {mesh['compared_points']} points W3 "
                f"also ran differ by at most "
                f"{mesh['max_accuracy_difference']}.")
        lines += ["", text]
    notes = report.get("notes", [])
    if notes:
        lines += ["", "Notes: " + " ".join(
            note if note.endswith(".") else note + "." for note in notes)]
    return "\n".join(lines)


def _finite_check(report: dict[str, Any]) -> None:
    # Every timing must be a positive finite number; a part that produced
    # none is reported in the notes instead.
    for section in ("w1", "w3"):
        for row in report.get(section, []):
            for key in ("first_s", "steady_s", "model_images_per_s"):
                if not (math.isfinite(row[key]) and row[key] > 0):
                    raise RuntimeError(f"{section} {row['label']}: {key} = "
                                       f"{row[key]!r}")


def main(argv: list[str] | None = None) -> int:
    """Run every part within the budget; write the JSON and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="sizes for a CPU run in well under a minute")
    parser.add_argument("--write", action="store_true",
                        help="replace the gpu section of RESULTS.md")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="write every figure to this JSON file")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="seconds the whole run may take (default 540)")
    parser.add_argument("--w3-model", default="resnet18",
                        help="W3's registered model (default resnet18)")
    parser.add_argument("--w3-dataset", default="fashion_mnist",
                        help="W3's dataset (default fashion_mnist)")
    parser.add_argument("--part", choices=sorted(PARTS),
                        help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or not math.isfinite(args.budget_s):
        parser.error(f"--budget-s must be a positive number of seconds, got "
                     f"{args.budget_s}")
    sizes = TINY if args.tiny else FULL
    if args.part:
        import recovjax
        recovjax.use_all_cores()  # CPU devices only; before JAX starts
        PARTS[args.part](args, sizes)
        return 0

    start = time.time()
    deadline = start + args.budget_s
    command = "python benchmarks/gpu.py" + "".join(
        f" {arg}" for arg in (argv if argv is not None else sys.argv[1:]))
    report: dict[str, Any] = {"tiny": args.tiny, "budget_s": args.budget_s,
                              "command": command}
    failed = False
    plan = [("w1", start + W1_SHARE * args.budget_s), ("w3", deadline)]
    for part, soft in plan:
        left = deadline - time.time()
        if left < max(sizes.min_part_s, 1e-9):
            report.setdefault("notes", []).append(
                f"{part}: skipped ({max(0.0, left):.0f} s left of the "
                f"{args.budget_s:.0f} s budget; a part needs at least "
                f"{sizes.min_part_s:.0f} s)")
            continue
        print(f"== {part} ({left:.0f} s left)", file=sys.stderr, flush=True)
        results, error = run_part(part, args, soft, deadline)
        collect(results, report)
        if error:
            report.setdefault("notes", []).append(error)
            failed = failed or "failed" in error
    report["elapsed_s"] = time.time() - start
    _finite_check(report)
    section = markdown(report, command)
    print(section)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1, sort_keys=True))
    if args.write:
        sys.path.insert(0, str(HERE))
        from results_md import write_section
        write_section("gpu", section)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
