"""Plots and a markdown report, made from saved results without recomputing.

The report reads the tidy table (``results.csv``, with its metadata sidecar
``results.meta.json``) and the cost records (``costs.json``) of a run
directory; a damaged file is refused with an error naming it and the line,
never drawn. Stage names follow the pipeline:
``clean``, ``damaged`` and ``recovered/<strategy>``; a recovered stage has
rows at every evaluated ``step`` of its recovery curve, and its final rows
(largest ``step``) are the result after recovery.

Rows with a ``layer`` (a sensitivity map: one layer damaged at a time) make
their own section, a layer x amount table and heatmap; every other table and
plot shows the whole model only, so per-layer rows never mix into it.

Every plot and table shows one *headline metric* (a :class:`Headline`):
``accuracy`` (higher is better, shown in %) for classifiers, ``perplexity``
(lower is better, a plain number) for language models, or any metric the
caller names together with its direction.

Statistics come from :mod:`recovjax.stats`, and each table says which it
uses: values are ``mean [low, high]`` with the 95 % bootstrap percentile
interval of the mean over seeds (or, for one seed's accuracy, the Wilson
score interval over the ``test_examples`` that the results metadata
record), so an interval never leaves the metric's range. Strategies are
compared paired by seed ("Paired comparisons"); recovery ratios and steps to
95 / 99 % of clean are per damage kind and amount ("Recovery"), a ratio
undefined where the damage is within the clean model's test noise and a
step median counting the models that never reach the level.
"""


from __future__ import annotations

import math
import os
import pathlib

import numpy as np

from recovjax import stats
from recovjax._io import atomic_write
from recovjax.report import frontier as frontier_lib
from recovjax.report.headline import (ACCURACY, Headline, PERPLEXITY,
                                      RECOVERED, final_rows, headline_metric,
                                      log_amounts, show_interval,
                                      value_interval, _clean_value, _kinds,
                                      _layer, _whole_model)
from recovjax.report.tables import (RatioCell, best_strategies, outcome_table,
                                    paired_table, recovery_ratio_cell,
                                    recovery_table, sensitivity_table,
                                    _cost_table, _curve_summary,
                                    _difference_unit, _recovery_note,
                                    _summary_table)
from recovjax.report.plots import (plot_heatmap, plot_metric_vs_ratio,
                                   plot_recovery_curves, plot_sensitivity)



def write_report(run_dir: os.PathLike[str] | str, rows: list[dict] | None = None,
                 *, threshold: float = 0.5, title: str | None = None,
                 metric: str | None = None,
                 higher_is_better: bool | None = None,
                 test_examples: int | None = None) -> pathlib.Path:
    """Write the PNG plots and ``report.md`` of a run directory.

    Every plot and table shows one headline metric (see
    :func:`headline_metric`): accuracy in %, or, for a language model,
    perplexity as a plain number. The metric-vs-amount plot is
    ``<metric>_vs_ratio.png`` (``accuracy_vs_ratio.png`` for accuracy); the
    others are ``recovery_curves.png``, ``recovery_heatmap.png`` and
    ``frontier.png`` (the strategies' Pareto frontier of cost and
    recovery, :mod:`recovjax.report.frontier`, with its table). When
    rows have a ``layer`` (a sensitivity map), the section "Sensitivity
    (layer x amount)" holds their table (:func:`sensitivity_table`) and
    ``sensitivity.png`` (:func:`plot_sensitivity`); every other section
    shows the whole-model rows only (and the whole-model summaries are
    left out when only the clean model has such rows).

    Args:
        run_dir: a run directory holding ``results.csv`` (and optionally
            ``costs.json`` and ``config.yaml``).
        rows: the results rows; read from ``results.csv`` when omitted.
        threshold: the level of the amount-at-threshold column. For a
            higher-is-better metric, an absolute value: the column is the
            damage amount where the metric falls below ``threshold``. For a
            lower-is-better metric, a fraction of the clean quality: the
            column is the amount where the metric rises above
            ``clean / threshold`` (0.5: twice the clean perplexity; 0.9:
            11 % above it).
        title: report title (default: the directory name).
        metric: the headline metric; ``None``: ``"perplexity"`` when any row
            has that metric, else ``"accuracy"``.
        higher_is_better: whether a larger ``metric`` is better; ``None``:
            ``True`` for accuracy, ``False`` for perplexity and loss.
        test_examples: the number of test examples each model was evaluated
            on (the test-set noise of an accuracy: Wilson intervals for one
            seed, the floor below which a recovery ratio is undefined);
            ``None``: the ``test_examples`` that ``results.meta.json``
            records, if any, else unknown (the report says so).

    Intervals are :mod:`recovjax.stats`'s, named under each table: the 95 %
    bootstrap percentile interval of the mean over seeds, or for one seed's
    accuracy the Wilson score interval over the test examples, shown as
    ``mean [low, high]``. The section "Paired comparisons" compares the
    best strategy of each damage kind and amount with every other one on
    the same damaged models (:func:`paired_table`); "Recovery" gives the
    recovery ratio and steps to 95 / 99 % of clean per kind, amount and
    strategy (:func:`recovery_table`).

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError: if ``run_dir`` has no ``results.csv`` and no rows
            are given.
        TypeError: if ``higher_is_better`` is neither ``None`` nor a bool.
        ValueError: if ``test_examples`` is not a positive int; if
            ``results.csv`` (see :func:`recovjax.results.read_csv`)
            or ``costs.json`` cannot be read (the message names the file and
            the line); if ``metric`` is given and no clean or damaged row has
            it, or has no default direction and ``higher_is_better`` is
            ``None`` (see :func:`headline_metric`); or if ``threshold`` is not
            a positive number for a lower-is-better metric.
    """
    import matplotlib
    matplotlib.use("Agg")
    from recovjax.results import read_csv
    run_dir = pathlib.Path(run_dir)
    results = run_dir / "results.csv"
    if rows is None:
        if not results.is_file():
            raise FileNotFoundError(f"{results}: no results to report on")
        table = read_csv(results)
        rows = table.rows
        if test_examples is None:
            test_examples = table.test_examples
    elif test_examples is None and results.is_file():
        test_examples = read_csv(results).test_examples
    if test_examples is not None and (
            isinstance(test_examples, bool)
            or not isinstance(test_examples, (int, np.integer))
            or test_examples < 1):
        raise ValueError(f"test_examples must be a positive int or None, "
                         f"got {test_examples!r}")
    headline = headline_metric(rows, metric, higher_is_better)
    layered = [r for r in rows if _layer(r)]
    rows = _whole_model(rows)
    if not headline.higher_is_better and not (math.isfinite(threshold)
                                              and threshold > 0):
        raise ValueError(f"threshold: a lower-is-better {headline.name} needs "
                         f"a fraction of the clean quality > 0, got "
                         f"{threshold!r}")
    costs = frontier_lib.read_costs(run_dir)
    curves, rows = rows, final_rows(rows)
    plots = [(f"{headline.title} vs damage amount", plot_metric_vs_ratio(
                 rows, run_dir / headline.ratio_plot, headline,
                 examples=test_examples)),
             ("Recovery curves", plot_recovery_curves(
                 curves, run_dir / "recovery_curves.png", headline)),
             ("Damage amount x recovery steps", plot_heatmap(
                 curves, run_dir / "recovery_heatmap.png", headline)),
             ]
    sensitivity = sensitivity_table(layered, headline)
    sensitivity_plot = plot_sensitivity(layered, run_dir / "sensitivity.png",
                                        headline)
    clean = _clean_value(rows, headline)
    text = [f"# {title or run_dir.name}", ""]
    if clean is not None:
        text += [f"Clean (pretrained) test {headline.name}: "
                 f"**{headline.show(clean, unit=True)}**.", ""]
    if _kinds(rows) or not sensitivity:
        table_lines, methods = _summary_table(rows, headline, test_examples)
        text += [f"## {headline.title} (mean over seeds [95 % interval])",
                 "", stats.describe_method(
                     methods, examples=test_examples) + ".", ""]
        text += table_lines + [""]
        text += ["## Robustness curve summary", ""] + _curve_summary(
            rows, threshold, headline) + [""]
    outcomes = outcome_table(rows)
    if outcomes:
        text += ["## Outcomes (mean over seeds)", "",
                 "Each example against the clean model's top-1: *masked* "
                 "(the same class), *SDC* (silent data corruption: another "
                 "class, finite outputs) or *DUE* (a NaN or infinite output, "
                 "a detectable error).", ""] + outcomes + [""]
    paired = paired_table(rows, headline)
    if paired:
        unit = _difference_unit(headline)
        text += ["## Paired comparisons", "",
                 "For each damage kind and amount, the best strategy (best "
                 f"mean {headline.name}) against each other strategy on the "
                 "same damaged models (same seed): the mean of the per-model "
                 f"differences in {unit} (positive: the best is better) with "
                 "its 95 % bootstrap percentile interval "
                 f"({stats.thousands(stats.RESAMPLES)} resamples), and how "
                 "many seeds favour each side. ✓: the difference holds "
                 "across seeds (every seed favours the best and the "
                 "interval excludes 0).", ""] + paired + [""]
    measures = recovery_table(curves, headline, examples=test_examples)
    if measures:
        text += ["## Recovery", ""] + _recovery_note(
            headline, clean, test_examples) + [""] + measures + [""]
    cost_lines = _cost_table(costs)
    if cost_lines:
        text += ["## Cost of recovery", "",
                 "Per model: wall time (compilation included), FLOPs of the "
                 "recovery itself (XLA's cost analysis of the lowered "
                 "program that ran, every loop body counted per iteration, "
                 "the damage and the curve evaluations left out), samples "
                 "read with and without labels, trainable parameters, bytes "
                 "read from the checkpoint; peak memory of the process.", ""
                 ] + cost_lines + [""]
    cost_axis = "flops" if any(
        record.get("flops_per_model") is not None
        for record in costs.get("recovery", [])) else "seconds"
    points = frontier_lib.frontier(rows, costs, headline, cost=cost_axis,
                                   examples=test_examples) if costs else []
    if any(p.strategy != frontier_lib.NO_RECOVERY for p in points):
        axis = frontier_lib.COSTS[cost_axis]
        plot = frontier_lib.plot_frontier(points, run_dir / "frontier.png",
                                          headline, cost_axis)
        text += ["## Cost and recovery (Pareto frontier)", "",
                 f"Every strategy (and budget) at every damage kind and "
                 f"amount, its {headline.name} after recovery against its "
                 f"cost ({axis.label}), next to the damaged model itself, "
                 f"with no recovery at no cost "
                 f"(`{frontier_lib.NO_RECOVERY}`). A strategy is "
                 "dominated when another costs no more and recovers at "
                 "least as well on the mean over seeds (better in one of "
                 "the two); `recovjax compare RUN_DIR --budget X` names "
                 "the best one under a budget, with its paired difference "
                 "to the runner-up.", ""]
        text += frontier_lib.frontier_table(points, headline, cost_axis)
        text += ["", f"![Cost and recovery]({plot.name})", ""]
    if sensitivity:
        caption = "Sensitivity (layer x amount)"
        text += [f"## {caption}", "",
                 f"Mean {headline.label} over seeds with one layer damaged "
                 "at a time (a line per layer, a column per damage amount).",
                 ""] + sensitivity + [""]
        if sensitivity_plot is not None:
            text += [f"![{caption}]({sensitivity_plot.name})", ""]
    for caption, plot in plots:
        if plot is not None:
            text += [f"## {caption}", "", f"![{caption}]({plot.name})", ""]
    report = run_dir / "report.md"
    atomic_write(report, "\n".join(text))
    return report

__all__ = [
    "ACCURACY", "PERPLEXITY", "RECOVERED", "Headline", "RatioCell",
    "best_strategies", "final_rows", "headline_metric", "log_amounts",
    "outcome_table", "paired_table", "plot_heatmap", "plot_metric_vs_ratio",
    "plot_frontier", "plot_recovery_curves", "plot_sensitivity",
    "recovery_ratio_cell", "recovery_table", "sensitivity_table",
    "show_interval", "value_interval", "write_report",
]
