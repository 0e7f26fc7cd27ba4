"""The ``recovjax`` command line: a thin layer over the Python API.

Commands: ``demo``, ``pretrain``, ``sweep``, ``recover``, ``report``,
``list``. Errors a user can fix (bad config, unknown names, missing files,
a run directory made with another config) print one line and exit with
status 2 (set ``RECOVJAX_DEBUG=1`` for the traceback); an interrupted run
exits with 130 and resumes when re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import os
import pathlib
import sys
import time
from typing import Sequence

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _quiet_logs() -> None:
    import logging
    import os
    import warnings
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import absl.logging
    absl.logging.set_verbosity(absl.logging.ERROR)
    for name in ("jax", "absl", "orbax"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, flush=True)


def _load(args: argparse.Namespace, default: str | None = None):
    from recovjax.config import load_config
    path = args.config
    if path is None and default is not None:
        path = importlib.resources.files("recovjax") / "configs" / default
    return load_config(path, args.set or ())


def _run(args: argparse.Namespace, config) -> int:
    from tqdm.auto import tqdm

    from recovjax.experiment import check_config, run_experiment
    check_config(config, source=getattr(args, "config", None))
    run_dir = pathlib.Path(args.run_dir or pathlib.Path("runs") / config.name)
    start = time.perf_counter()
    bar = tqdm(total=None, desc=config.name, unit="step", disable=args.quiet,
               leave=True, dynamic_ncols=True)

    def progress(message: str, done: int, total: int) -> None:
        bar.total = total
        bar.set_postfix_str(message)
        bar.update(done - bar.n)

    try:
        table = run_experiment(config, run_dir, force=args.force,
                               progress=not args.quiet,
                               on_progress=progress)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    _say(args, _summary(table))
    _say(args, f"\nrun directory: {run_dir}  ({seconds:.1f} s)\n"
               f"report:        {run_dir / 'report.md'}")
    return EXIT_OK


def _summary(table) -> str:
    """A few lines a person reads at the end of a run."""
    from recovjax.report import mean_ci
    lines = []
    clean = table.select(stage="clean", metric="accuracy")
    if clean:
        lines.append(f"clean accuracy: {100 * clean[0]['value']:.2f} %")
    stages = sorted({r["stage"] for r in table.rows
                     if r["stage"].startswith("recovered/")})
    header = f"{'damage':<22}{'amount':>9}{'damaged':>10}" + "".join(
        f"{s.split('/', 1)[1][:20]:>22}" for s in stages)
    lines.append(header)
    kinds = []
    for row in table.rows:
        if row["stage"] == "damaged" and row["damage"] not in kinds:
            kinds.append(row["damage"])
    for kind in kinds:
        ratios = sorted({r["ratio"] for r in table.select(damage=kind,
                                                          stage="damaged")})
        for ratio in ratios:
            cells = [mean_ci([r["value"] for r in table.select(
                damage=kind, ratio=ratio, stage="damaged",
                metric="accuracy")])[0]]
            for stage in stages:
                rows = table.select(damage=kind, ratio=ratio, stage=stage,
                                    metric="accuracy")
                last = max((r["step"] for r in rows), default=None)
                cells.append(mean_ci([r["value"] for r in rows
                                      if r["step"] == last])[0]
                             if rows else float("nan"))
            lines.append(f"{kind:<22}{ratio:>9g}" + f"{100 * cells[0]:>9.2f}%"
                         + "".join(f"{100 * c:>21.2f}%" for c in cells[1:]))
    return "\n".join(lines)


def _command_demo(args: argparse.Namespace) -> int:
    return _run(args, _load(args, "demo.yaml"))


def _command_sweep(args: argparse.Namespace) -> int:
    config = dataclasses.replace(_load(args), recovery=None)
    return _run(args, config)


def _command_recover(args: argparse.Namespace) -> int:
    config = _load(args)
    if config.recovery is None:
        from recovjax.config import ConfigError
        raise ConfigError("recovery: is null; 'recovjax recover' needs "
                          "recovery strategies (or use 'recovjax sweep')")
    return _run(args, config)


def _command_report(args: argparse.Namespace) -> int:
    from recovjax.report import write_report
    from recovjax.rundir import CONFIG_FILE
    run_dir = pathlib.Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    threshold, title = 0.5, None
    if (run_dir / CONFIG_FILE).is_file():
        from recovjax.config import load_config
        saved = load_config(run_dir / CONFIG_FILE)
        threshold, title = saved.report.threshold, saved.name
    report = write_report(run_dir, threshold=threshold, title=title)
    _say(args, f"report: {report}")
    return EXIT_OK


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
    _say(args, f"{meta['model']} on {meta['dataset']} (seed {meta['seed']}): "
               f"test accuracy {meta['test_accuracy']:.4f} "
               f"[{meta['epochs']} epochs, trained in "
               f"{meta['train_seconds']:.1f} s]\ncheckpoint: {result.path}  "
               f"({seconds:.1f} s for this command)")
    return EXIT_OK


def _command_list(args: argparse.Namespace) -> int:
    from recovjax.damage import damage_names, damage_spec
    from recovjax.data import dataset_names
    from recovjax.models import model_names
    from recovjax.recovery import strategy_names
    print("models:     " + ", ".join(model_names()))
    print("datasets:   " + ", ".join(dataset_names()))
    print("damage operators:")
    for name in damage_names():
        spec = damage_spec(name)
        print(f"  {name:<22}{spec.kind:<10}{spec.amount_name:<7}{spec.doc}")
    print("recovery strategies (join with '+' to compose):")
    print("  " + ", ".join(strategy_names()))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``recovjax`` command."""
    parser = argparse.ArgumentParser(
        prog="recovjax",
        description="Measure how well pretrained networks recover from "
                    "damage.")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or summaries")
    commands = parser.add_subparsers(dest="command", required=True)

    def experiment_command(name: str, help_text: str, run, default=None):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", default=default,
                             help="experiment YAML file")
        command.add_argument("--set", action="append", metavar="KEY=VALUE",
                             help="override a config key (repeatable), e.g. "
                                  "--set sweep.seeds=10")
        command.add_argument("--run-dir", default=None,
                             help="run directory (default runs/<name>)")
        command.add_argument("--force", action="store_true",
                             help="start over in a run directory made with "
                                  "another config")
        command.add_argument("--quiet", action="store_true",
                             default=argparse.SUPPRESS)
        command.set_defaults(run=run)
        return command

    experiment_command("demo", "the main job on the embedded MNIST digits",
                       _command_demo)
    sweep = experiment_command("sweep", "damage and evaluate (no recovery)",
                               _command_sweep)
    sweep.set_defaults(needs_config=True)
    recover = experiment_command(
        "recover", "damage, evaluate, recover and evaluate again",
        _command_recover)
    recover.set_defaults(needs_config=True)

    report = commands.add_parser("report", help="regenerate a run's report "
                                 "from its saved results")
    report.add_argument("run_dir")
    report.set_defaults(run=_command_report)

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

    listing = commands.add_parser(
        "list", help="models, datasets, damage operators, strategies")
    listing.set_defaults(run=_command_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recovjax`` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "needs_config", False) and args.config is None:
        print(f"recovjax: error: {args.command} needs --config FILE "
              "(see experiments/)", file=sys.stderr)
        return EXIT_USER_ERROR
    _quiet_logs()
    from recovjax.checkpoints import CheckpointError
    from recovjax.config import ConfigError
    from recovjax.rundir import RunConflictError
    try:
        return args.run(args)
    except (ConfigError, RunConflictError, CheckpointError, FileExistsError,
            FileNotFoundError, ValueError, TypeError) as error:
        if os.environ.get("RECOVJAX_DEBUG"):
            raise
        lines = [line.strip() for line in str(error).splitlines()]
        print(f"recovjax: error: {'; '.join(l for l in lines if l)}",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("recovjax: interrupted; re-run the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
