"""The ``recovjax`` command line: a thin layer over the Python API.

Commands: ``demo``, ``pretrain``, ``sweep``, ``recover``, ``report``,
``list``. Everything a command is given is checked before it claims
anything: the whole config (registry names, options, the model's parameter
leaves, whether the dataset is prepared) and the run directory (not a file,
not under a file, writable, not made with another config) are checked
before any run directory is created and before any work.

Errors a user can fix (bad config, unknown names, missing files, unusable
directories, a run directory made with another config, bad arguments)
print one line and exit with status 2 (set ``RECOVJAX_DEBUG=1`` for the
traceback); an unexpected internal error prints one line naming the
exception and exits with status 1; an interrupted run exits with 130 and
resumes when re-run.

Progress goes to stderr: a progress bar on a terminal, and otherwise (CI
logs, ``| tee``) one plain line per finished unit of work.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import os
import pathlib
import sys
import time
from typing import Callable, Sequence

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

DEBUG_ENV = "RECOVJAX_DEBUG"


def _quiet_logs() -> None:
    import logging
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
    """Load the config; ``args.source`` names it in later messages."""
    from recovjax.config import load_config
    path = args.config
    if path is None and default is not None:
        path = importlib.resources.files("recovjax") / "configs" / default
    args.source = None if path is None else (
        f"{path} (with --set overrides)" if args.set else str(path))
    return load_config(path, args.set or ())


def _run(args: argparse.Namespace, config) -> int:
    from recovjax.experiment import run_experiment
    run_dir = pathlib.Path(args.run_dir or pathlib.Path("runs") / config.name)
    from recovjax._progress import Progress
    # Units of work take seconds: in a log, a line for each of them.
    progress = Progress(config.name, enabled=not args.quiet, interval=0)
    start = time.perf_counter()
    try:
        table = run_experiment(
            config, run_dir, force=args.force,
            progress=not args.quiet,
            on_progress=progress, source=getattr(args, "source", None))
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    _say(args, _summary(table))
    _say(args, f"\nrun directory: {run_dir}  ({seconds:.1f} s)\n"
               f"report:        {run_dir / 'report.md'}")
    return EXIT_OK


def _summary(table) -> str:
    """A few lines a person reads at the end of a run."""
    from recovjax.report import headline_metric
    from recovjax.stats import mean_interval

    def mean(values) -> float:
        values = list(values)
        return mean_interval(values).estimate if values else float("nan")

    lines = []
    headline = headline_metric(table.rows)
    clean = table.select(stage="clean", metric=headline.name)
    if clean:
        lines.append(f"clean {headline.name}: "
                     f"{headline.show(clean[0]['value'], unit=True)}")
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
            cells = [mean([r["value"] for r in table.select(
                damage=kind, ratio=ratio, stage="damaged",
                metric=headline.name)])]
            for stage in stages:
                rows = table.select(damage=kind, ratio=ratio, stage=stage,
                                    metric=headline.name)
                last = max((r["step"] for r in rows), default=None)
                cells.append(mean([r["value"] for r in rows
                                   if r["step"] == last]))
            unit = headline.unit[:1]  # "%" or none
            narrow = len(unit)
            lines.append(f"{kind:<22}{ratio:>9g}"
                         + f"{headline.show(cells[0]):>{10 - narrow}}{unit}"
                         + "".join(f"{headline.show(c):>{22 - narrow}}{unit}"
                                   for c in cells[1:]))
    return "\n".join(lines)


def _command_demo(args: argparse.Namespace) -> int:
    return _run(args, _load(args, "demo.yaml"))


def _command_sweep(args: argparse.Namespace) -> int:
    config = dataclasses.replace(_load(args), recovery=None)
    return _run(args, config)


def _command_sensitivity(args: argparse.Namespace) -> int:
    from recovjax.experiment import run_sensitivity
    config = _load(args)
    run_dir = pathlib.Path(args.run_dir or pathlib.Path("runs")
                           / f"{config.name}-sensitivity")
    layers = None if not args.layers else [
        layer.strip() for layer in args.layers.split(",") if layer.strip()]
    start = time.perf_counter()
    table = run_sensitivity(config, run_dir, layers=layers, force=args.force,
                            progress=not args.quiet,
                            source=getattr(args, "source", None))
    from recovjax.report import headline_metric
    headline = headline_metric(table.rows)
    lines = []
    for row in table.select(stage="clean", metric=headline.name):
        lines.append(f"clean {headline.name}: "
                     f"{headline.show(row['value'], unit=True)}")
    layers_seen = sorted({row["layer"] for row in table.rows if row["layer"]})
    lines.append(f"{len(layers_seen)} layers x "
                 f"{len({row['ratio'] for row in table.rows})} amounts "
                 f"mapped; see {run_dir / 'report.md'}  "
                 f"({time.perf_counter() - start:.1f} s)")
    _say(args, "\n".join(lines))
    return EXIT_OK


def _command_recover(args: argparse.Namespace) -> int:
    config = _load(args)
    if config.recovery is None:
        from recovjax.config import ConfigError
        raise ConfigError(f"{args.source}: recovery: is null; 'recovjax "
                          "recover' needs recovery strategies (or use "
                          "'recovjax sweep')")
    return _run(args, config)


def _command_report(args: argparse.Namespace) -> int:
    from recovjax.report import write_report
    from recovjax.rundir import CONFIG_FILE, check_writable_directory
    run_dir = pathlib.Path(args.run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir}: is not a run directory (not "
                                 "a directory)")
    check_writable_directory(run_dir)
    threshold, title = 0.5, None
    if (run_dir / CONFIG_FILE).is_file():
        from recovjax.config import load_config
        saved = load_config(run_dir / CONFIG_FILE)
        threshold, title = saved.report.threshold, saved.name
    report = write_report(run_dir, threshold=threshold, title=title)
    _say(args, f"report: {report}")
    return EXIT_OK


def _command_compare(args: argparse.Namespace) -> int:
    from recovjax.report import frontier
    run_dir = pathlib.Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    headline, points, choices = frontier.compare_run(
        run_dir, cost=args.cost, budget=args.budget, metric=args.metric)
    axis = frontier.COSTS[args.cost]
    lines = [f"{run_dir}: {headline.name} after recovery against "
             f"{axis.label}", "", "frontier (cheapest first):"]
    groups: dict = {}
    for point in points:
        if point.on_frontier:
            groups.setdefault((point.damage, point.ratio), []).append(point)
    for (kind, ratio), group in groups.items():
        shown = ", ".join(
            f"{p.strategy} {headline.show(p.value, unit=True)} at "
            f"{frontier.show_cost(axis, p.cost)}" for p in group)
        lines.append(f"  {kind} {ratio:g}: {shown}")
    budget = (float("inf") if args.budget is None
              else args.budget / axis.scale)
    lines += [""] + frontier.describe_choices(choices, headline, axis,
                                              budget)
    print("\n".join(lines))
    return EXIT_OK


def _command_pretrain(args: argparse.Namespace) -> int:
    from recovjax.data.loading import dataset_features
    from recovjax.pretrain import load_pretrained, pretrain
    from recovjax.rundir import check_writable_directory
    # Before any work: a dataset that is not prepared, or an --out that
    # cannot be written, fails now rather than after training.
    dataset_features(args.dataset, data_dir=args.data_dir)
    if args.out:
        check_writable_directory(args.out)
    progress = not args.quiet
    start = time.perf_counter()
    if args.out:
        result = pretrain(args.model, args.dataset, seed=args.seed,
                          directory=args.out, progress=progress,
                          overwrite=args.force, data_dir=args.data_dir)
    else:
        result = load_pretrained(args.model, args.dataset, seed=args.seed,
                                 data_dir=args.data_dir, progress=progress)
    seconds = time.perf_counter() - start
    meta = dict(result.metadata)
    trained = (f", trained in {meta['train_seconds']:.1f} s"
               if isinstance(meta.get("train_seconds"), (int, float)) else "")
    accuracy = meta.get("test_accuracy")
    accuracy = (f"{accuracy:.4f}" if isinstance(accuracy, (int, float))
                else "unknown")
    _say(args, f"{meta.get('model', args.model)} on "
               f"{meta.get('dataset', args.dataset)} (seed "
               f"{meta.get('seed', args.seed)}): test accuracy {accuracy} "
               f"[{meta.get('epochs', '?')} epochs{trained}]\n"
               f"checkpoint: {result.path}  ({seconds:.1f} s for this "
               "command)")
    return EXIT_OK


def _defaults(factory: Callable, skip=()) -> str:
    import inspect
    shown = []
    for name, parameter in inspect.signature(factory).parameters.items():
        if name in skip:
            continue
        if parameter.default is inspect.Parameter.empty:
            shown.append(name)
        else:
            shown.append(f"{name}={parameter.default!r}")
    return ", ".join(shown) or "none"


def _command_list(args: argparse.Namespace) -> int:
    from recovjax.damage import damage_names, damage_spec
    from recovjax.data.loading import EMBEDDED, dataset_names, dataset_prepared
    from recovjax.models import model_names
    from recovjax.recovery import strategy_names
    from recovjax.recovery.registry import OPTIMIZER_NAMES, strategy_options
    out = []
    out.append("models:")
    out.append("  NAME")
    out.extend(f"  {name}" for name in model_names())
    out.append("")
    out.append("datasets:")
    out.append(f"  {'NAME':<22}{'KIND':<11}STATUS")
    for name in dataset_names():
        if name == "fashion_mnist":
            kind = "local"
            status = ("ready (built on first use from the IDX files)"
                      if dataset_prepared(name) else
                      "NO FILES here (apt-get install dataset-fashion-mnist)")
        elif name in EMBEDDED:
            kind, status = "embedded", "ready (built on first use)"
        else:
            kind = "catalogue"
            status = ("prepared" if dataset_prepared(name) else
                      "NOT PREPARED here (looked in $TFDS_DATA_DIR or "
                      "~/tensorflow_datasets; see README, Data)")
        out.append(f"  {name:<22}{kind:<11}{status}")
    out.append("")
    out.append("damage operators (options go under damage[].options):")
    out.append(f"  {'NAME':<22}{'KIND':<11}{'AMOUNT':<8}DESCRIPTION")
    indent = " " * (2 + 22 + 11 + 8)
    for name in damage_names():
        spec = damage_spec(name)
        out.append(f"  {name:<22}{spec.kind:<11}{spec.amount_name:<8}"
                   f"{spec.doc}")
        out.append(f"{indent}options: "
                   f"{_defaults(spec.factory, skip=spec.preset)}")
    out.append("")
    out.append("recovery strategies (join with '+' to compose; options go "
               "under recovery.strategies[].options):")
    out.append(f"  {'NAME':<22}OPTIONS")
    for name in strategy_names():
        options = ", ".join(sorted(strategy_options(name))) or "none"
        out.append(f"  {name:<22}{options}")
    out.append("  (optimizer, learning_rate, momentum, batch_size, epochs, "
               "steps and eval_every default to the recovery: section)")
    out.append("")
    out.append(f"optimizers (recovery.optimizer.name): "
               f"{', '.join(OPTIMIZER_NAMES)}")
    print("\n".join(out))
    return EXIT_OK


def _command_zoo(args: argparse.Namespace) -> int:
    """``recovjax zoo verify|repair``: one line per damaged entry.

    ``verify`` exits with status 2 when any entry is damaged. ``repair``
    exits with 0 once every damaged entry has been moved aside and
    pretrained again, and with 2 when some entry could not be rebuilt (an
    older recipe's entry is only moved aside).
    """
    import logging

    from recovjax import _paths, zoo
    # This command prints its own line per entry; the library's warnings
    # would repeat them.
    logging.getLogger("recovjax.zoo").setLevel(logging.ERROR)
    root = _paths.zoo_dir(args.zoo_dir)
    if args.action == "verify":
        problems = zoo.verify_zoo(args.zoo_dir, data_dir=args.data_dir)
        for path, problem in problems:
            print(f"{path}: {problem}", flush=True)
    else:
        problems = zoo.repair_zoo(args.zoo_dir, data_dir=args.data_dir,
                                  progress=not args.quiet)
        for path, problem, moved, rebuilt in problems:
            print(f"{path}: {problem}; moved to {moved}"
                  + ("; pretrained again" if rebuilt else
                     "; not rebuilt (not the current recipe)"), flush=True)
        if all(repair.rebuilt for repair in problems):
            problems = []
    if problems:
        return EXIT_USER_ERROR
    _say(args, f"zoo {root}: {len(zoo.zoo_entries(args.zoo_dir))} entries, "
               "all intact")
    return EXIT_OK


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` where a default says something: not for
    flags, ``None`` or defaults the help text already describes."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or "default" in text
                or any(action.default is nothing for nothing in
                       (None, False, argparse.SUPPRESS))
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage dump)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see "
                                   f"'{self.prog} --help')\n")


def _version() -> str:
    from recovjax import __version__
    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``recovjax`` command.

    Each command is added by :func:`add_command`, which gives it the shared
    help formatting and ``--quiet``; a new command needs one call and a
    ``run(args) -> int`` function.
    """
    from recovjax.data import dataset_names
    from recovjax.models import BUILT_IN
    parser = _Parser(
        prog="recovjax", formatter_class=_HelpFormatter,
        description="Measure how well pretrained networks recover from "
                    "damage. Errors print one line and exit with status 2.")
    parser.add_argument("--version", action="version",
                        version=f"recovjax {_version()}",
                        help="print recovjax's version and exit")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress output or summaries (also accepted "
                             "after the command)")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="COMMAND",
                                     parser_class=_Parser)
    parser.commands = commands

    def experiment_command(name: str, help_text: str, run,
                           config_help: str):
        command = add_command(parser, name, help_text, run)
        command.add_argument("--config", default=None, metavar="FILE",
                             help=config_help)
        command.add_argument("--set", action="append", metavar="KEY=VALUE",
                             help="override a config key (repeatable), e.g. "
                                  "--set sweep.seeds=10 (default: none)")
        command.add_argument("--run-dir", default=None, metavar="DIR",
                             help="run directory (default: runs/<name>)")
        command.add_argument("--force", action="store_true",
                             help="start over in a run directory made with "
                                  "another config (deletes its results)")
        several = command.add_argument_group(
            "several processes (jax.distributed; run the same command in "
            "each, the first writes the run directory)")
        several.add_argument("--coordinator", default=None,
                             metavar="HOST:PORT",
                             help="address of process 0's coordinator "
                                  "(default: one process)")
        several.add_argument("--num-processes", type=int, default=None,
                             metavar="N", help="number of processes")
        several.add_argument("--process-id", type=int, default=None,
                             metavar="I", help="this process, 0 to N - 1")
        return command

    experiment_command(
        "demo", "the main job on the embedded MNIST digits", _command_demo,
        "experiment YAML file (default: the packaged demo.yaml)")
    sweep = experiment_command(
        "sweep", "damage and evaluate (no recovery)", _command_sweep,
        "experiment YAML file, e.g. experiments/security.yaml (required)")
    sweep.set_defaults(needs_config=True)
    sensitivity = experiment_command(
        "sensitivity", "damage one layer at a time: a layer x amount map",
        _command_sensitivity,
        "experiment YAML file; its damage kinds and amounts are mapped "
        "(required)")
    sensitivity.add_argument(
        "--layers", metavar="A,B", default=None,
        help="layers to map (default: every layer holding a kernel)")
    sensitivity.set_defaults(needs_config=True)
    recover = experiment_command(
        "recover", "damage, evaluate, recover and evaluate again",
        _command_recover,
        "experiment YAML file, e.g. experiments/seed_mnist.yaml (required)")
    recover.set_defaults(needs_config=True)

    report = add_command(parser, "report", "regenerate a run's report from "
                         "its saved results", _command_report)
    report.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run directory written by demo, sweep or "
                             "recover")

    compare = add_command(parser, "compare", "which recovery strategy is "
                          "best under a budget, from a run's saved results "
                          "and costs", _command_compare)
    compare.add_argument("run_dir", metavar="RUN_DIR",
                         help="a run directory written by demo or recover")
    compare.add_argument("--cost", default="flops", choices=tuple(
        ("flops", "seconds", "samples", "labelled", "params", "bytes")),
        help="what a recovery costs: GFLOP, wall seconds, samples read "
             "(labelled or all), trainable parameters or checkpoint bytes, "
             "per model")
    compare.add_argument("--budget", type=float, default=None, metavar="X",
                         help="the most a strategy may cost, in the cost's "
                              "unit (default: any cost)")
    compare.add_argument("--metric", default=None,
                         help="the metric to compare on (default: accuracy, "
                              "or perplexity for a language model)")

    pre = add_command(parser, "pretrain", "pretrain a model (into the zoo "
                      "cache, or --out)", _command_pretrain)
    pre.add_argument("--model", default="lenet5", choices=BUILT_IN,
                     help="image classifier to train (for the language "
                          "model: recovjax.load_pretrained_lm)")
    pre.add_argument("--dataset", default="mnist5k", choices=dataset_names(),
                     help="training data (catalogue datasets must be "
                          "prepared; see README, Data)")
    pre.add_argument("--seed", type=int, default=0,
                     help="initialisation and data-order seed")
    pre.add_argument("--data-dir", default=None, metavar="DIR",
                     help="where prepared datasets live (default: "
                          "$RECOVJAX_DATA_DIR for mnist5k, $TFDS_DATA_DIR "
                          "for catalogue datasets)")
    pre.add_argument("--out", default=None, metavar="DIR",
                     help="checkpoint directory (default: the zoo cache)")
    pre.add_argument("--force", action="store_true",
                     help="replace an existing checkpoint at --out")

    add_command(parser, "list", "models, datasets, damage operators, "
                "strategies and their options", _command_list)

    zoo = add_command(parser, "zoo", "verify or repair the zoo of pretrained "
                      "checkpoints (status 2 if any entry was damaged)",
                      _command_zoo)
    zoo.add_argument("action", choices=("verify", "repair"),
                     help="verify: list damaged entries; repair: also move "
                          "each aside (<entry>.corrupt-<time>) and pretrain "
                          "it again")
    zoo.add_argument("--zoo-dir", default=None, metavar="DIR",
                     help="zoo root (default: $RECOVJAX_CACHE_DIR/zoo or "
                          "~/.cache/recovjax/zoo)")
    zoo.add_argument("--data-dir", default=None, metavar="DIR",
                     help="where prepared datasets live, for rebuilding "
                          "(default: as for pretrain)")
    return parser


def add_command(parser: argparse.ArgumentParser, name: str, help_text: str,
                run: Callable[[argparse.Namespace], int]
                ) -> argparse.ArgumentParser:
    """Add the command ``name`` to a parser from :func:`build_parser`.

    Args:
        parser: the top-level parser.
        name: the command's name.
        help_text: one line, shown by ``recovjax --help`` and as the
            command's description.
        run: ``run(args) -> exit status``.

    Returns:
        The command's parser, for its own arguments.
    """
    command = parser.commands.add_parser(
        name, help=help_text, description=help_text[:1].upper()
        + help_text[1:] + ".", formatter_class=_HelpFormatter)
    command.add_argument("--quiet", action="store_true",
                         default=argparse.SUPPRESS,
                         help="no progress output or summaries")
    command.set_defaults(run=run)
    return command


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines()]
    return "; ".join(line for line in lines if line) or type(error).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    import yaml

    from recovjax.checkpoints import CheckpointError
    from recovjax.config import ConfigError
    from recovjax.rundir import RunConflictError, RunDirectoryError
    return (ConfigError, RunConflictError, RunDirectoryError,
            CheckpointError, OSError, yaml.YAMLError, ValueError, TypeError,
            MemoryError)


def _distributed_problem(args: argparse.Namespace) -> str | None:
    """Join the processes of a multi-process run, if asked.

    Returns:
        What is wrong with the flags or the start, in one line; ``None``
        when the process joined (or runs alone).
    """
    coordinator = getattr(args, "coordinator", None)
    count = getattr(args, "num_processes", None)
    index = getattr(args, "process_id", None)
    if coordinator is None and count is None and index is None:
        return None
    if coordinator is None or count is None or index is None:
        return ("--coordinator, --num-processes and --process-id go "
                "together: give all three, or none for one process")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        return f"--coordinator: expected HOST:PORT, got {coordinator!r}"
    if count < 1:
        return f"--num-processes: must be at least 1, got {count}"
    if not 0 <= index < count:
        return (f"--process-id: must lie in [0, {count}) for "
                f"--num-processes {count}, got {index}")
    import jax
    # CPU processes exchange results through gloo (GPUs use their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes=count,
                                   process_id=index)
    except (RuntimeError, ValueError) as error:
        return (f"--coordinator: cannot join {coordinator} as process "
                f"{index} of {count} ({_one_line(error)})")
    if index != 0:
        args.quiet = True  # the first process reports
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recovjax`` console script."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a one-line error
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or EXIT_OK
        return EXIT_USER_ERROR
    if getattr(args, "needs_config", False) and args.config is None:
        print(f"recovjax: error: {args.command} needs --config FILE "
              "(see experiments/)", file=sys.stderr)
        return EXIT_USER_ERROR
    _quiet_logs()
    from recovjax._malloc import tune_malloc
    from recovjax.cores import use_all_cores
    use_all_cores()  # one CPU device per core, before JAX starts
    tune_malloc()  # freed working sets go back; few arenas
    problem = _distributed_problem(args)
    if problem:
        print(f"recovjax: error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    from recovjax._progress import is_terminal
    if not is_terminal(sys.stderr):
        # Logs get plain lines, not TFDS's redrawn bars.
        import tensorflow_datasets as tfds
        tfds.disable_progress_bar()
    user_errors = _user_errors()
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("recovjax: interrupted; re-run the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors as error:
        if os.environ.get(DEBUG_ENV):
            raise
        memory = "out of memory: " if isinstance(error, MemoryError) else ""
        print(f"recovjax: error: {memory}{_one_line(error)}",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as error:  # a bug: still one line, and say so
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"recovjax: internal error: {type(error).__name__}: "
              f"{_one_line(error)} (set {DEBUG_ENV}=1 for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
