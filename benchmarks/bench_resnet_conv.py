"""ResNet-18 on 28x28 images: patch_conv against XLA:CPU's convolution.

The built-in ``resnet18`` computes its convolutions with
:func:`recovjax.models.layers.patch_conv` (one GEMM of strided patches on
CPU). This measures, for the full-width network (11.2 M parameters):

* a training step (batch 100, training-mode batch norm, Adam), ``steps``
  of them in one ``lax.scan``, as pretraining runs them;
* the evaluation forward pass over 1,000 images (batches of 500);

once with ``patch_conv`` and once with ``lax.conv_general_dilated``, the
same parameters and data for both.

Run ``python benchmarks/bench_resnet_conv.py`` to print the section, add
``--write`` to replace it in ``benchmarks/RESULTS.md`` (between the
``<!-- begin resnet_conv -->`` / ``<!-- end resnet_conv -->`` markers) and
``--steps N`` for the scan length (default 3).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import optax

from recovjax.models.layers import patch_conv
from recovjax.models.networks import ResNet18
from results_md import write_section

BATCH = 100
EVAL_IMAGES, EVAL_BATCH = 1000, 500


def _timed(function, *args):
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    return time.perf_counter() - start


def measure(conv, steps: int) -> dict[str, float]:
    """Seconds of the first and a second call of the train scan and the
    evaluation, for the network with convolution ``conv``."""
    network = ResNet18(conv=conv)
    variables = jax.jit(network.init)(jax.random.key(0),
                                      jnp.zeros((1, 28, 28, 1)))
    params, stats = variables["params"], variables["batch_stats"]
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    images = jax.random.normal(jax.random.key(1), (steps, BATCH, 28, 28, 1))
    labels = jax.random.randint(jax.random.key(2), (steps, BATCH), 0, 10)

    def loss(params, stats, x, y):
        logits, updates = network.apply(
            {"params": params, "batch_stats": stats}, x, train=True,
            mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, y).mean(), updates["batch_stats"]

    @jax.jit
    def train(params, stats, opt_state, images, labels):
        def step(carry, batch):
            params, stats, opt_state = carry
            (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(
                params, stats, *batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), stats,
                    opt_state), value
        return jax.lax.scan(step, (params, stats, opt_state),
                            (images, labels))

    @jax.jit
    def evaluate(variables, images):
        return jax.lax.map(lambda x: network.apply(variables, x).argmax(-1),
                           images)

    test = jax.random.normal(jax.random.key(3), (
        EVAL_IMAGES // EVAL_BATCH, EVAL_BATCH, 28, 28, 1))
    args = (params, stats, opt_state, images, labels)
    return {"train_first": _timed(train, *args),
            "train_step": _timed(train, *args) / steps,
            "eval_first": _timed(evaluate, variables, test),
            "eval": _timed(evaluate, variables, test)}


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; return its markdown section for RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    load = os.getloadavg()[0]
    results = {"patch_conv (registry resnet18)": measure(patch_conv,
                                                         args.steps),
               "lax.conv_general_dilated": measure(
                   jax.lax.conv_general_dilated, args.steps)}
    device = jax.devices()[0]
    command = " ".join(["python benchmarks/bench_resnet_conv.py"]
                       + (["--write"] if args.write else [])
                       + ([f"--steps {args.steps}"] if args.steps != 3
                          else []))
    lines = [
        "## ResNet-18 (28x28, 11.2 M parameters): convolution formulations",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, load "
        f"average {load:.1f} at start, jax {jax.__version__}, device "
        f"{device.platform} ({device.device_kind}).  ",
        f"Workload: `ResNet18()` with each convolution; {args.steps} "
        f"training steps of batch {BATCH} (training-mode batch norm, Adam) "
        f"in one `lax.scan`, and the evaluation of {EVAL_IMAGES:,} images "
        f"in batches of {EVAL_BATCH}; first call (compilation included) "
        f"and a second call.",
        "",
        "| convolution | s per train step | first train call s | eval s "
        f"per {EVAL_IMAGES:,} images | first eval call s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, result in results.items():
        lines.append(f"| {name} | {result['train_step']:.2f} | "
                     f"{result['train_first']:.1f} | {result['eval']:.2f} | "
                     f"{result['eval_first']:.1f} |")
    patch, plain = results.values()
    lines += [
        "",
        f"patch_conv trains {plain['train_step'] / patch['train_step']:.1f}x "
        f"and evaluates {plain['eval'] / patch['eval']:.1f}x faster. "
        "XLA:CPU's convolution is slow for 3x3 kernels over the 2x2 maps "
        "of the last two stages, forward and backward; the GEMM of "
        "patches runs them near the machine's matmul speed.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    section = main()
    print(section)
    if "--write" in sys.argv[1:]:
        write_section("resnet_conv", section)
