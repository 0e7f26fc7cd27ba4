"""The report's plots (matplotlib, imported when a plot is drawn)."""

from __future__ import annotations

import collections
import math
import pathlib

import numpy as np

from recovjax import stats
from recovjax.report.headline import (ACCURACY, Headline, RECOVERED,
                                      log_amounts, value_interval,
                                      _clean_value, _group, _kinds, _select,
                                      _strategies)
from recovjax.report.tables import (_sensitivity_grids)



def _shown(headline: Headline, values) -> np.ndarray:
    """Values as plotted: scaled, with infinities as gaps (NaN)."""
    array = headline.scale * np.asarray(values, dtype=np.float64)
    return np.where(np.isinf(array), np.nan, array)


def _set_value_axis(axis, headline: Headline, shown=()) -> None:
    """Label, scale and range of a value axis showing ``shown`` means."""
    axis.set_ylabel(headline.label)
    if headline.log_axis:
        axis.set_yscale("log")
        # A CI band reaching to or below zero would stretch a log axis by
        # decades; cut it a little below the smallest mean instead.
        positive = [v for v in np.ravel(shown) if math.isfinite(v) and v > 0]
        if positive:
            axis.set_ylim(bottom=0.8 * min(positive))
    if headline.limits is not None:
        axis.set_ylim(*headline.limits)


def _curve_by_ratio(rows, kind, strategy, headline: Headline):
    """``{ratio: (steps, mean value)}`` of a recovery curve."""
    points = _select(rows, damage=kind, stage=RECOVERED + strategy,
                     metric=headline.name)
    out = {}
    for (ratio,), group in sorted(_group(points, ["ratio"]).items()):
        by_step = _group(group, ["step"])
        steps = sorted(step for (step,) in by_step)
        out[ratio] = (np.asarray(steps), np.asarray(
            [np.mean([r["value"] for r in by_step[(s,)]]) for s in steps]))
    return out


def plot_metric_vs_ratio(rows, path: pathlib.Path,
                         headline: Headline = ACCURACY, *,
                         examples: int | None = None
                         ) -> pathlib.Path | None:
    """The metric against damage amount, one panel per damage kind.

    Each stage (damaged, every strategy) is a line through the means over
    seeds with its interval band (:func:`value_interval`) and every seed's
    value as a point on top. A kind whose amounts are all above 0 and span
    at least 2 decades gets a log x axis (:func:`log_amounts`).

    Args:
        rows: final results rows (see :func:`final_rows`).
        path: the PNG to write.
        headline: the metric to plot.
        examples: the test-set size (Wilson bands of one-seed accuracies).

    Returns:
        ``path``, or ``None`` (nothing written) when no row is damaged.
    """
    import matplotlib.pyplot as plt
    kinds = _kinds(rows)
    if not kinds:
        return None
    clean = _clean_value(rows, headline)
    columns = min(3, len(kinds))
    lines = math.ceil(len(kinds) / columns)
    figure, axes = plt.subplots(lines, columns, squeeze=False,
                                figsize=(4.6 * columns, 3.6 * lines))
    stages = ["damaged"] + [RECOVERED + s for s in _strategies(rows)]
    methods: set[str] = set()
    for axis, kind in zip(axes.flat, kinds):
        means = [] if clean is None else [headline.scale * clean]
        amounts = set()
        for stage in stages:
            points = _select(rows, damage=kind, stage=stage,
                             metric=headline.name)
            if not points:
                continue
            groups = sorted(_group(points, ["ratio"]).items())
            ratios = np.asarray([ratio for (ratio,), _ in groups])
            amounts.update(ratios.tolist())
            intervals = [value_interval(headline,
                                        [r["value"] for r in group], examples)
                         for _, group in groups]
            methods.update(i.method for i in intervals)
            label = "damaged" if stage == "damaged" else stage[len(RECOVERED):]
            shown = _shown(headline, [i.estimate for i in intervals])
            means.extend(shown)
            (line,) = axis.plot(ratios, shown, marker="o", ms=3, label=label)
            axis.fill_between(ratios, _shown(headline, [i.low for i in intervals]),
                              _shown(headline, [i.high for i in intervals]),
                              color=line.get_color(), alpha=0.2)
            seeds_x = [ratio for (ratio,), group in groups for _ in group]
            seeds_y = _shown(headline, [r["value"] for _, group in groups
                                        for r in group])
            axis.scatter(seeds_x, seeds_y, s=9, color=line.get_color(),
                         alpha=0.6, edgecolors="none", zorder=3)
        if clean is not None and math.isfinite(clean):
            axis.axhline(headline.scale * clean, color="grey", ls="--", lw=1,
                         label="clean")
        axis.set_title(kind)
        if log_amounts(amounts):
            axis.set_xscale("log")
            axis.set_xlabel("damage amount (log scale)")
        else:
            axis.set_xlabel("damage amount (ratio / rate / scale)")
        _set_value_axis(axis, headline, means)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(kinds):]:
        axis.axis("off")
    # Damage moves the curves toward worse: keep the legend on that side.
    axes.flat[0].legend(fontsize=7, loc="lower left" if
                        headline.higher_is_better else "upper left")
    band = ("Wilson band over test examples"
            if methods == {stats.WILSON} else "95 % interval band")
    figure.suptitle(f"{headline.title} vs damage (mean over seeds, {band}; "
                    "points: seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _training_strategies(rows) -> list[str]:
    """Strategies whose recovery curve has more than one point."""
    steps = collections.defaultdict(set)
    for r in rows:
        if r["stage"].startswith(RECOVERED):
            steps[r["stage"][len(RECOVERED):]].add(r["step"])
    return sorted(s for s, seen in steps.items() if len(seen) > 1)


def plot_recovery_curves(rows, path: pathlib.Path,
                         headline: Headline = ACCURACY
                         ) -> pathlib.Path | None:
    """The metric against fine-tuning steps, one line per damage amount.

    Args:
        rows: all results rows (every step of the recovery curves).
        path: the PNG to write.
        headline: the metric to plot.

    Returns:
        ``path``, or ``None`` (nothing written) when no strategy has a curve.
    """
    import matplotlib.pyplot as plt
    strategies = _training_strategies(rows)
    kinds = [k for k in _kinds(rows)
             if any(_curve_by_ratio(rows, k, s, headline) for s in strategies)]
    if not kinds:
        return None
    strategy = strategies[0]
    clean = _clean_value(rows, headline)
    columns = min(3, len(kinds))
    lines = math.ceil(len(kinds) / columns)
    figure, axes = plt.subplots(lines, columns, squeeze=False,
                                figsize=(4.6 * columns, 3.6 * lines))
    for axis, kind in zip(axes.flat, kinds):
        curves = _curve_by_ratio(rows, kind, strategy, headline)
        colours = plt.cm.viridis(np.linspace(0, 0.9, max(len(curves), 1)))
        for colour, (ratio, (steps, values)) in zip(colours, curves.items()):
            axis.plot(steps, _shown(headline, values), color=colour,
                      label=f"{ratio:g}")
        if clean is not None and math.isfinite(clean):
            axis.axhline(headline.scale * clean, color="grey", ls="--", lw=1)
        axis.set_title(f"{kind} ({strategy})")
        axis.set_xlabel("fine-tuning steps")
        axis.set_ylabel(headline.label)
        if headline.log_axis:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(title="amount", fontsize=7)
    for axis in list(axes.flat)[len(kinds):]:
        axis.axis("off")
    figure.suptitle("Recovery curves (mean over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _colour_map(headline: Headline) -> str:
    """Brighter is better in either direction."""
    return "magma" if headline.higher_is_better else "magma_r"


def _colour_norm(headline: Headline, grid: np.ma.MaskedArray):
    """The colour scale of a heatmap of shown values (``None``: the data's)."""
    import matplotlib.colors
    if headline.limits is not None:
        return matplotlib.colors.Normalize(*headline.limits)
    if headline.log_axis and grid.count() and grid.min() > 0:
        return matplotlib.colors.LogNorm()
    return None


def plot_heatmap(rows, path: pathlib.Path, headline: Headline = ACCURACY
                 ) -> pathlib.Path | None:
    """Damage amount x recovery steps, coloured by the mean metric.

    Brighter is better in either direction.

    Args:
        rows: all results rows (every step of the recovery curves).
        path: the PNG to write.
        headline: the metric to colour by.

    Returns:
        ``path``, or ``None`` (nothing written) when no strategy has a curve.
    """
    import matplotlib.pyplot as plt
    strategies = _training_strategies(rows)
    panels = [(k, s) for k in _kinds(rows) for s in strategies[:1]
              if len(_curve_by_ratio(rows, k, s, headline)) > 0]
    if not panels:
        return None
    columns = min(3, len(panels))
    lines = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(lines, columns, squeeze=False,
                                figsize=(4.8 * columns, 3.6 * lines))
    for axis, (kind, strategy) in zip(axes.flat, panels):
        curves = _curve_by_ratio(rows, kind, strategy, headline)
        ratios = sorted(curves)
        steps = curves[ratios[0]][0]
        grid = np.ma.masked_invalid(_shown(headline, np.stack(
            [curves[r][1] for r in ratios])))
        image = axis.imshow(grid, aspect="auto", origin="lower",
                            cmap=_colour_map(headline),
                            norm=_colour_norm(headline, grid),
                            extent=(steps[0], steps[-1], -0.5,
                                    len(ratios) - 0.5))
        axis.set_yticks(range(len(ratios)), [f"{r:g}" for r in ratios])
        axis.set_xlabel("fine-tuning steps")
        # Rows are equally spaced: log-spaced amounts read as a log axis.
        axis.set_ylabel("damage amount (log-spaced rows)"
                        if log_amounts(ratios) else "damage amount")
        axis.set_title(f"{kind} ({strategy})")
        figure.colorbar(image, ax=axis, label=headline.label)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_sensitivity(rows, path: pathlib.Path, headline: Headline = ACCURACY
                     ) -> pathlib.Path | None:
    """A sensitivity map: layer x damage amount, coloured by the mean metric.

    One panel per damage kind; each cell is the mean over seeds of the model
    with only that layer damaged by that amount, annotated with its value.
    The colour scale is the recovery heatmap's (brighter is better in either
    direction; see :func:`plot_heatmap`).

    Args:
        rows: results rows; only ``damaged`` rows with a non-empty ``layer``
            are drawn.
        path: the PNG to write.
        headline: the metric to colour by.

    Returns:
        ``path``, or ``None`` (nothing written) when no row has a layer.
    """
    import matplotlib.pyplot as plt
    grids = _sensitivity_grids(rows, headline)
    if not grids:
        return None
    columns = min(3, len(grids))
    lines = math.ceil(len(grids) / columns)
    width = max(5.6, 2.5 + 0.9 * max(len(g.amounts) for g in grids))
    height = max(3.0, 1.6 + 0.4 * max(len(g.layers) for g in grids))
    figure, axes = plt.subplots(lines, columns, squeeze=False,
                                figsize=(width * columns, height * lines))
    for axis, grid in zip(axes.flat, grids):
        shown = np.ma.masked_invalid(_shown(headline, grid.means))
        image = axis.imshow(shown, aspect="auto", cmap=_colour_map(headline),
                            norm=_colour_norm(headline, shown))
        image.autoscale_None()  # the final scale, for the text colours
        rgba = np.asarray(image.cmap(image.norm(shown)))
        # Light text on dark cells (luma of the cell colour).
        dark = rgba[..., :3] @ np.asarray([0.299, 0.587, 0.114]) < 0.5
        for (line, column), count in np.ndenumerate(grid.counts):
            if not count:
                continue
            colour = ("white" if dark[line, column]
                      and not np.ma.getmaskarray(shown)[line, column]
                      else "black")
            axis.text(column, line, headline.show(grid.means[line, column]),
                      ha="center", va="center", fontsize=7, color=colour)
        axis.set_xticks(range(len(grid.amounts)),
                        [f"{a:g}" for a in grid.amounts])
        axis.set_yticks(range(len(grid.layers)), grid.layers)
        axis.set_xlabel("damage amount (log-spaced columns)"
                        if log_amounts(grid.amounts) else "damage amount")
        axis.set_ylabel("layer")
        axis.set_title(grid.damage)
        figure.colorbar(image, ax=axis, label=headline.label)
    for axis in list(axes.flat)[len(grids):]:
        axis.axis("off")
    figure.suptitle(f"{headline.title} with one layer damaged (mean over "
                    "seeds)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


