"""The ``recovjax`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence


class UserError(Exception):
    """A mistake in the command line or config: reported in one line."""


def _quiet_logs() -> None:
    import logging
    import os
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import absl.logging
    absl.logging.set_verbosity(absl.logging.ERROR)
    logging.getLogger("jax").setLevel(logging.ERROR)


def _command_pretrain(args: argparse.Namespace) -> int:
    from recovjax.pretrain import load_pretrained, pretrain
    start = time.perf_counter()
    if args.out:
        result = pretrain(args.model, args.dataset, seed=args.seed,
                          directory=args.out, progress=not args.quiet,
                          overwrite=args.force, data_dir=args.data_dir)
    else:
        result = load_pretrained(args.model, args.dataset, seed=args.seed,
                                 data_dir=args.data_dir,
                                 progress=not args.quiet)
    seconds = time.perf_counter() - start
    meta = result.metadata
    print(f"{meta['model']} on {meta['dataset']} (seed {meta['seed']}): "
          f"test accuracy {meta['test_accuracy']:.4f} "
          f"[{meta['epochs']} epochs, trained in {meta['train_seconds']:.1f} s]"
          f"\ncheckpoint: {result.path}  ({seconds:.1f} s for this command)")
    return 0


def _command_demo(args: argparse.Namespace) -> int:
    args.model, args.dataset, args.out, args.force = "lenet5", "mnist5k", None, False
    return _command_pretrain(args)


def _command_list(args: argparse.Namespace) -> int:
    from recovjax.data import dataset_names
    from recovjax.models import model_names
    print("models:   " + ", ".join(model_names()))
    print("datasets: " + ", ".join(dataset_names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recovjax",
        description="Measure how well pretrained networks recover from damage.")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="the main job on the embedded MNIST digits")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--data-dir", default=None)
    demo.set_defaults(run=_command_demo)

    pre = commands.add_parser("pretrain", help="pretrain a model")
    pre.add_argument("--model", default="lenet5")
    pre.add_argument("--dataset", default="mnist5k")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--data-dir", default=None)
    pre.add_argument("--out", default=None,
                     help="checkpoint directory (default: the zoo cache)")
    pre.add_argument("--force", action="store_true",
                     help="replace an existing checkpoint at --out")
    pre.set_defaults(run=_command_pretrain)

    listing = commands.add_parser("list", help="list models and datasets")
    listing.set_defaults(run=_command_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recovjax`` console script."""
    args = build_parser().parse_args(argv)
    _quiet_logs()
    from recovjax.checkpoints import CheckpointError
    try:
        return args.run(args)
    except (UserError, CheckpointError, FileExistsError, FileNotFoundError,
            ValueError, TypeError) as error:
        print(f"recovjax: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recovjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
