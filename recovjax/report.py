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

import collections
import dataclasses
import math
import os
import pathlib
import re
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from recovjax import stats
from recovjax._io import atomic_write, read_json_file
from recovjax.results import _natural as _natural_key

RECOVERED = "recovered/"


@dataclasses.dataclass(frozen=True)
class Headline:
    """The metric a report shows, and how to show it.

    Attributes:
        name: the ``metric`` of the rows shown (``"accuracy"``).
        label: the axis label (``"test accuracy (%)"``).
        short: the name in table headers (``"acc."``).
        scale: shown value per stored value (100 for a fraction in %).
        unit: the unit of a shown value (``"%"``, or ``""`` for none).
        format: the format spec of a shown value (``".2f"``).
        higher_is_better: whether a larger value is better (accuracy) or
            worse (perplexity, loss).
        limits: a fixed axis range of shown values, or ``None`` for one that
            follows the data.
        log_axis: whether plots use a log axis (perplexities of damaged
            models span orders of magnitude).
    """

    name: str
    label: str
    short: str
    scale: float
    unit: str
    format: str
    higher_is_better: bool
    limits: tuple[float, float] | None = None
    log_axis: bool = False

    @property
    def title(self) -> str:
        """The name as it starts a heading (``"Accuracy"``)."""
        return self.name[:1].upper() + self.name[1:]

    @property
    def suffix(self) -> str:
        """The unit as a table header adds it (``" (%)"``, or ``""``)."""
        return f" ({self.unit})" if self.unit else ""

    @property
    def ratio_plot(self) -> str:
        """The file name of the metric-vs-amount plot."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.name) + "_vs_ratio.png"

    def show(self, value: float | None, *, unit: bool = False) -> str:
        """``value`` scaled and formatted.

        Args:
            value: a stored value; ``None`` or NaN for none.
            unit: whether to append the unit (``"96.90 %"``).

        Returns:
            The shown number (``"96.90"``), ``"n/a"`` for no value, or
            ``"inf"``/``"-inf"``.
        """
        if value is None or math.isnan(value):
            shown = "n/a"
        elif math.isinf(value):
            shown = "inf" if value > 0 else "-inf"
        else:
            shown = format(self.scale * value, self.format)
        return f"{shown} {self.unit}" if unit and self.unit else shown

    def best(self, values: dict[str, float]) -> str | None:
        """The key of the best finite value (the first one on a tie).

        Args:
            values: values by name (e.g. mean recovered value by strategy).

        Returns:
            The name, or ``None`` when no value is finite.
        """
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        if not finite:
            return None
        pick = max if self.higher_is_better else min
        return pick(finite, key=finite.__getitem__)


ACCURACY = Headline(name="accuracy", label="test accuracy (%)", short="acc.",
                    scale=100.0, unit="%", format=".2f", higher_is_better=True,
                    limits=(0.0, 100.0))
PERPLEXITY = Headline(name="perplexity", label="test perplexity",
                      short="perplexity", scale=1.0, unit="", format=".2f",
                      higher_is_better=False, log_axis=True)
_DIRECTIONS = {"accuracy": True, "perplexity": False, "loss": False}


def headline_metric(rows: Iterable[dict], metric: str | None = None,
                    higher_is_better: bool | None = None) -> Headline:
    """The headline metric of a report on ``rows``.

    Args:
        rows: the results rows.
        metric: the metric to show; ``None``: ``"perplexity"`` when any row
            has that metric (a language model), else ``"accuracy"``.
        higher_is_better: whether a larger ``metric`` is better; ``None``:
            ``True`` for accuracy, ``False`` for perplexity and loss.

    Returns:
        The :class:`Headline` (:data:`ACCURACY` and :data:`PERPLEXITY` for
        those metrics in their own direction).

    Raises:
        TypeError: if ``higher_is_better`` is neither ``None`` nor a bool.
        ValueError: if ``metric`` is not one of accuracy, perplexity and loss
            and ``higher_is_better`` is ``None``, or if ``metric`` is given
            and no clean or damaged row has it (the message lists the
            metrics they have).
    """
    rows = list(rows)
    given = metric is not None
    if metric is None:
        language = any(r["metric"] == "perplexity" for r in rows)
        metric = "perplexity" if language else "accuracy"
    if higher_is_better is not None and not isinstance(higher_is_better, bool):
        raise TypeError(f"higher_is_better must be a bool or None, got "
                        f"{higher_is_better!r}")
    if higher_is_better is None:
        if metric not in _DIRECTIONS:
            raise ValueError(
                f"higher_is_better: no default direction for metric "
                f"{metric!r}; say whether a larger {metric} is better")
        higher_is_better = _DIRECTIONS[metric]
    if given:
        present = sorted({r["metric"] for r in rows
                          if r["stage"] in ("clean", "damaged")})
        if metric not in present:
            listed = ", ".join(present) or "none (no such rows)"
            raise ValueError(f"metric: no clean or damaged row has metric "
                             f"{metric!r}; their metrics: {listed}")
    for known in (ACCURACY, PERPLEXITY):
        if metric == known.name:
            return dataclasses.replace(known,
                                       higher_is_better=higher_is_better)
    return Headline(name=metric, label=f"test {metric}", short=metric,
                    scale=1.0, unit="", format=".4g",
                    higher_is_better=higher_is_better)


def value_interval(headline: Headline, values: Sequence[float],
                   examples: int | None = None) -> stats.Interval:
    """The interval a report shows for ``values`` (one per seed).

    The bootstrap percentile interval of the mean over seeds; for one seed
    of an accuracy with a known test-set size, the Wilson score interval
    over the test examples (see :func:`recovjax.stats.mean_interval`).

    Args:
        headline: the metric the values are.
        values: one value per seed (at least one).
        examples: the test-set size, used only for accuracy.

    Returns:
        The :class:`~recovjax.stats.Interval`.
    """
    return stats.mean_interval(
        values, examples=examples if headline.name == "accuracy" else None)


def show_interval(headline: Headline, interval: stats.Interval) -> str:
    """``"80.00 [79.10, 80.90]"``; the estimate alone without an interval."""
    shown = headline.show(interval.estimate)
    if math.isnan(interval.low) or math.isnan(interval.high):
        return shown
    return (f"{shown} [{headline.show(interval.low)}, "
            f"{headline.show(interval.high)}]")


def log_amounts(amounts: Iterable[float]) -> bool:
    """Whether amounts are best shown on a log axis.

    All above 0 and the largest at least 10 times the smallest, so that they
    reach into a second decade (bit-flip rates 1e-6 .. 3e-5, whose small
    values a linear axis would crush against 0); amounts such as 0.1 .. 0.5
    stay linear.
    """
    values = [float(a) for a in amounts]
    return bool(values) and min(values) > 0 and max(values) >= 10 * min(
        values)


def _group(rows: Iterable[dict], keys: Sequence[str]) -> dict[tuple, list]:
    groups: dict[tuple, list] = collections.defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    return groups


def _select(rows, **where) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _layer(row) -> str:
    # Rows built by hand (or read from version 1 files) may lack a layer.
    return row.get("layer", "")


def _whole_model(rows) -> list[dict]:
    """The rows of the whole model (no ``layer``)."""
    return [r for r in rows if not _layer(r)]


def final_rows(rows) -> list[dict]:
    """Rows of the last step of every (damage, ratio, seed, stage, metric)."""
    last: dict[tuple, int] = {}
    for r in rows:
        key = (r["damage"], r["ratio"], r["seed"], r["stage"])
        last[key] = max(last.get(key, r["step"]), r["step"])
    return [r for r in rows
            if r["step"] == last[(r["damage"], r["ratio"], r["seed"],
                                  r["stage"])]]


def _strategies(rows) -> list[str]:
    return sorted({r["stage"][len(RECOVERED):] for r in rows
                   if r["stage"].startswith(RECOVERED)})


def _kinds(rows) -> list[str]:
    seen = []
    for r in rows:
        if r["stage"] == "damaged" and r["damage"] not in seen:
            seen.append(r["damage"])
    return seen


def _clean_value(rows, headline: Headline) -> float | None:
    clean = _select(rows, stage="clean", metric=headline.name)
    return clean[0]["value"] if clean else None


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


def plot_strategies(rows, path: pathlib.Path, headline: Headline = ACCURACY
                    ) -> pathlib.Path | None:
    """The recovered metric per strategy and damage kind (equal step budget).

    Args:
        rows: final results rows (see :func:`final_rows`).
        path: the PNG to write.
        headline: the metric to plot.

    Returns:
        ``path``, or ``None`` (nothing written) without strategies or damage.
    """
    import matplotlib.pyplot as plt
    strategies = _strategies(rows)
    kinds = _kinds(rows)
    if not strategies or not kinds:
        return None
    figure, axis = plt.subplots(figsize=(max(5.0, 1.2 * len(kinds) *
                                            (len(strategies) + 1)), 3.8))
    width = 0.8 / (len(strategies) + 1)
    x = np.arange(len(kinds))
    def bar(values):
        interval = value_interval(headline, values) if values else (
            stats.Interval(math.nan, math.nan, math.nan, stats.NONE, 0))
        mean, low, high = _shown(headline, [interval.estimate, interval.low,
                                            interval.high])
        below, above = np.nan_to_num([mean - low, high - mean])
        return mean, (max(below, 0.0), max(above, 0.0))

    means = []
    for index, stage in enumerate(["damaged"] + [RECOVERED + s
                                                 for s in strategies]):
        bars = [bar([r["value"] for r in _select(
            rows, damage=k, stage=stage, metric=headline.name)])
            for k in kinds]
        means.append(np.asarray([b[0] for b in bars]))
        errors = np.asarray([b[1] for b in bars]).T
        options = ({"label": "damaged", "color": "lightgrey"} if index == 0
                   else {"label": stage[len(RECOVERED):]})
        axis.bar(x + index * width, means[-1], width, yerr=errors, **options)
    axis.set_xticks(x + width * len(strategies) / 2, kinds)
    _set_value_axis(axis, headline, means)
    axis.set_title("Strategies at equal compute (mean over amounts and seeds, "
                   "95 % interval)", fontsize=9)
    axis.legend(fontsize=7, ncol=2)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


class _SensitivityGrid(NamedTuple):
    """One damage kind of a sensitivity map."""

    damage: str
    layers: list[str]
    amounts: list[float]
    means: np.ndarray  # (layer, amount) mean over seeds; NaN without rows
    counts: np.ndarray  # (layer, amount) number of rows (seeds)


def _sensitivity_grids(rows, headline: Headline) -> list[_SensitivityGrid]:
    """The per-layer ``damaged`` rows of ``headline``, one grid per kind.

    Kinds come in the order they first appear, layers in natural order
    (``Dense_2`` before ``Dense_10``), amounts ascending.
    """
    found = [r for r in rows if _layer(r) and r["stage"] == "damaged"
             and r["metric"] == headline.name]
    grids = []
    for kind in dict.fromkeys(r["damage"] for r in found):
        groups = _group([r for r in found if r["damage"] == kind],
                        ["layer", "ratio"])
        layers = sorted({layer for layer, _ in groups}, key=_natural_key)
        amounts = sorted({ratio for _, ratio in groups})
        means = np.full((len(layers), len(amounts)), np.nan)
        counts = np.zeros((len(layers), len(amounts)), dtype=int)
        for (layer, ratio), group in groups.items():
            cell = layers.index(layer), amounts.index(ratio)
            means[cell] = np.mean([r["value"] for r in group])
            counts[cell] = len(group)
        grids.append(_SensitivityGrid(kind, layers, amounts, means, counts))
    return grids


def sensitivity_table(rows, headline: Headline = ACCURACY) -> list[str]:
    """A markdown table of a sensitivity map: layer x amount, mean over seeds.

    Only ``damaged`` rows with a non-empty ``layer`` count; one table per
    damage kind (separated by a blank line), a line per layer (natural
    order) and a column per damage amount.

    Args:
        rows: results rows (whole-model rows are ignored).
        headline: the metric to show.

    Returns:
        The table's lines (``[]`` when no row has a layer). A cell without
        rows is empty; a NaN mean (e.g. a diverged model) shows ``n/a``.

    Example::

        | damage | layer | 0.5 | 1 |
        |---|---|---|---|
        | gaussian_noise | Conv_0 | 81.25 | 40.10 |
    """
    lines = []
    for grid in _sensitivity_grids(rows, headline):
        header = ["damage", "layer"] + [f"{a:g}" for a in grid.amounts]
        if lines:
            lines.append("")
        lines += ["| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for index, layer in enumerate(grid.layers):
            cells = [grid.damage, layer] + [
                headline.show(mean) if count else ""
                for mean, count in zip(grid.means[index], grid.counts[index])]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


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


def best_strategies(rows, headline: Headline = ACCURACY) -> dict[str, str]:
    """The best recovery strategy of every damage kind.

    A strategy's score is its mean final value over the amounts and seeds of
    the kind; the best is the largest score for a higher-is-better metric and
    the smallest otherwise (e.g. the lowest perplexity).

    Args:
        rows: results rows (only the final step of each curve counts).
        headline: the metric to compare.

    Returns:
        ``{damage kind: strategy}``, in the order the kinds appear; a kind
        without a finite score is left out.
    """
    rows = final_rows(rows)
    best = {}
    for kind in _kinds(rows):
        scores = {}
        for strategy in _strategies(rows):
            values = [r["value"] for r in _select(
                rows, damage=kind, stage=RECOVERED + strategy,
                metric=headline.name)]
            if values:
                scores[strategy] = float(np.mean(values))
        pick = headline.best(scores)
        if pick is not None:
            best[kind] = pick
    return best


def outcome_table(rows) -> list[str]:
    """Markdown lines: the masked / SDC / DUE fractions per damage kind and
    amount (means over seeds), or ``[]`` when the rows have none."""
    names = ("masked", "sdc", "due")
    outcome = [r for r in rows if r["stage"] == "damaged"
               and r["metric"].startswith("outcome/")]
    if not outcome:
        return []
    lines = ["| damage | amount | n | masked | SDC | DUE |",
             "|---|---|---|---|---|---|"]
    for kind in _kinds(outcome):
        for (ratio,), group in sorted(_group(_select(
                outcome, damage=kind), ["ratio"]).items()):
            cells = [kind, f"{ratio:g}"]
            values = {}
            for name in names:
                got = [r["value"] for r in group
                       if r["metric"] == f"outcome/{name}"]
                values[name] = got
            cells.append(str(len(values["masked"])))
            cells += [f"{100 * float(np.mean(values[n])):.1f} %"
                      if values[n] else "" for n in names]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _summary_table(rows, headline: Headline, examples: int | None
                   ) -> tuple[list[str], set[str]]:
    """The metric table's lines and the interval methods its cells used."""
    strategies = _strategies(rows)
    header = ["damage", "amount", "n",
              f"damaged {headline.short}{headline.suffix}"] + [
        f"{s}{headline.suffix}" for s in strategies]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    methods: set[str] = set()
    for kind in _kinds(rows):
        damaged = _select(rows, damage=kind, stage="damaged",
                          metric=headline.name)
        for (ratio,), group in sorted(_group(damaged, ["ratio"]).items()):
            interval = value_interval(headline, [r["value"] for r in group],
                                      examples)
            methods.add(interval.method)
            cells = [kind, f"{ratio:g}", str(len(group)),
                     show_interval(headline, interval)]
            for strategy in strategies:
                got = [r["value"] for r in _select(
                    rows, damage=kind, ratio=ratio,
                    stage=RECOVERED + strategy, metric=headline.name)]
                if got:
                    interval = value_interval(headline, got, examples)
                    methods.add(interval.method)
                    cells.append(show_interval(headline, interval))
                else:
                    cells.append("")
            lines.append("| " + " | ".join(cells) + " |")
    return lines, methods


def _difference_unit(headline: Headline) -> str:
    """The unit of a difference of shown values (``"pp"`` for %)."""
    if headline.unit == "%":
        return "pp"
    return headline.unit or headline.name


def _by_seed(rows, **where) -> dict[int, float]:
    return {r["seed"]: r["value"] for r in _select(rows, **where)}


def paired_table(rows, headline: Headline = ACCURACY) -> list[str]:
    """Markdown lines: the best strategy against each other, paired by seed.

    For every damage kind and amount, the best strategy (the best mean final
    value there) is compared with every other strategy on the same damaged
    models (the same seed) by :func:`recovjax.stats.paired_difference`: the
    mean advantage of the best (in pp for accuracy; positive: the best is
    better, in either direction of the metric) with its bootstrap interval,
    how many seeds favour each side, and a ✓ where the difference holds
    across seeds.

    Args:
        rows: final results rows (see :func:`final_rows`).
        headline: the metric to compare.

    Returns:
        The table's lines, or ``[]`` with fewer than two strategies.
    """
    strategies = _strategies(rows)
    if len(strategies) < 2:
        return []
    unit = _difference_unit(headline)
    sign = 1.0 if headline.higher_is_better else -1.0
    lines = [f"| damage | amount | best | compared with | advantage of best "
             f"({unit}) | seeds: best better / other better / tied | holds "
             "across seeds |", "|---|---|---|---|---|---|---|"]
    for kind in _kinds(rows):
        ratios = sorted({r["ratio"] for r in _select(rows, damage=kind,
                                                     stage="damaged")})
        for ratio in ratios:
            values = {s: _by_seed(rows, damage=kind, ratio=ratio,
                                  stage=RECOVERED + s, metric=headline.name)
                      for s in strategies}
            values = {s: v for s, v in values.items() if v}
            means = {s: float(np.mean(list(v.values())))
                     for s, v in values.items()}
            best = headline.best(means)
            if best is None:
                continue
            for other in values:
                if other == best:
                    continue
                seeds = sorted(set(values[best]) & set(values[other]))
                if not seeds:
                    continue
                result = stats.paired_difference(
                    [sign * values[best][s] for s in seeds],
                    [sign * values[other][s] for s in seeds])
                interval = result.interval
                shown = show_interval(headline, interval)
                lines.append(
                    f"| {kind} | {ratio:g} | {best} | {other} | {shown} | "
                    f"{result.a_better} / {result.b_better} / {result.ties} "
                    f"| {'✓' if result.holds else ''} |")
    return lines if len(lines) > 2 else []


def _curve_summary(rows, threshold: float, headline: Headline) -> list[str]:
    name = headline.name
    if headline.higher_is_better:
        limit = threshold
        condition = f"{name} < {threshold:g}"
    else:
        clean = _clean_value(rows, headline)
        limit = None if clean is None else clean / threshold
        condition = f"{name} > clean / {threshold:g}"
    lines = [f"| damage | area under {name}-vs-amount (mean {headline.short})"
             f" | amount where {condition} |", "|---|---|---|"]
    for kind in _kinds(rows):
        damaged = _select(rows, damage=kind, stage="damaged", metric=name)
        groups = sorted(_group(damaged, ["ratio"]).items())
        ratios = np.asarray([r for (r,), _ in groups], dtype=np.float64)
        means = np.asarray([np.mean([x["value"] for x in g])
                            for _, g in groups])
        if len(ratios) > 1 and ratios[-1] > ratios[0]:
            area = float(np.trapezoid(means, ratios) / (ratios[-1] - ratios[0]))
        else:
            area = float(means[0]) if len(means) else math.nan
        if limit is None:
            crossing, worse = "n/a (no clean value)", np.empty(0, dtype=int)
        else:
            crossing = "not reached"
            worse = np.flatnonzero(means < limit if headline.higher_is_better
                                   else means > limit)
        if worse.size:
            i = worse[0]
            if i == 0:
                crossing = f"{ratios[0]:g}"
            else:
                # An infinite a1 (a diverged model) puts the crossing at r0.
                r0, r1, a0, a1 = ratios[i - 1], ratios[i], means[i - 1], means[i]
                crossing = f"{r0 + (a0 - limit) / (a0 - a1) * (r1 - r0):.3g}"
        lines.append(f"| {kind} | {headline.show(area, unit=True)} | "
                     f"{crossing} |")
    return lines


class RatioCell(NamedTuple):
    """The recovery ratio of one damage kind, amount and strategy.

    Attributes:
        ratios: the per-model (per-seed) ratios, NaN where undefined.
        gaps: the per-model ``clean - damaged``.
        floor: the test-noise floor of the gap (2 binomial standard errors),
            or ``None`` when unknown or without a binomial noise model.
        interval: the mean over the defined ratios with its bootstrap
            interval, or ``None`` when no ratio is defined.
    """

    ratios: np.ndarray
    gaps: np.ndarray
    floor: float | None
    interval: stats.Interval | None


def recovery_ratio_cell(clean: float, damaged: Sequence[float],
                        after: Sequence[float], *,
                        examples: int | None = None) -> RatioCell:
    """Per-model recovery ratios and their aggregate.

    Args:
        clean: the clean model's value.
        damaged: each model's value after damage.
        after: each model's final value after recovery (same order).
        examples: the test-set size of an accuracy (``None``: unknown, or a
            metric without a binomial noise model; then only a zero gap is
            undefined).

    Returns:
        The :class:`RatioCell`.
    """
    damaged = np.asarray(damaged, np.float64)
    after = np.asarray(after, np.float64)
    ratios = np.atleast_1d(stats.recovery_ratio(clean, damaged, after,
                                                examples=examples))
    floor = (None if examples is None or not 0.0 <= clean <= 1.0
             else stats.noise_floor(clean, examples))
    defined = ratios[np.isfinite(ratios)]
    interval = stats.bootstrap_mean(defined) if defined.size else None
    return RatioCell(ratios, clean - damaged, floor, interval)


def _show_ratio(cell: RatioCell, headline: Headline) -> str:
    n = cell.ratios.size
    if cell.interval is not None:
        interval = cell.interval
        shown = f"{interval.estimate:.3f}"
        if not math.isnan(interval.low):
            shown += f" [{interval.low:.3f}, {interval.high:.3f}]"
        return f"{shown} ({interval.n}/{n} defined)"
    gaps = cell.gaps[np.isfinite(cell.gaps)]
    if not gaps.size:
        return "n/a (no finite values)"
    unit = _difference_unit(headline)
    largest = float(np.max(np.abs(gaps)))
    scale = headline.scale
    if cell.floor is not None and 0 < largest < cell.floor:
        every = "gap" if n == 1 else "every gap ≤"
        return (f"undefined (damage within test noise: {every} "
                f"{scale * largest:.2f} {unit} < 2 SE = "
                f"{scale * cell.floor:.2f} {unit})")
    if largest == 0:
        return f"undefined (damage did not change {headline.name}: gap 0)"
    return "n/a (no finite recovered value)"


def _steps(where, fraction, clean, headline) -> list[float]:
    """Each model's steps to ``fraction`` of clean (NaN: not reached), from
    the rows ``where`` of one damage kind, amount and recovery stage."""
    label = f"steps_to_{round(fraction * 100):d}"
    recorded = [r for r in where if r["metric"] == label]
    if recorded or any(r["metric"].startswith("steps_to_") for r in where):
        # One source for every level, so the levels cannot disagree.
        last = {}
        for r in recorded:  # one row per model (seed); the last if repeated
            last[r["seed"]] = r["value"]
        return [last[s] for s in sorted(last)]
    # Not recorded: the first evaluated step of each model's curve.
    curve = [r for r in where if r["metric"] == headline.name]
    out = []
    for (_,), points in sorted(_group(curve, ["seed"]).items()):
        points = sorted(points, key=lambda r: r["step"])
        if headline.higher_is_better:
            reached = [r["step"] for r in points
                       if r["value"] >= fraction * clean]
        else:
            reached = [r["step"] for r in points
                       if r["value"] <= clean / fraction]
        out.append(float(reached[0]) if reached else math.nan)
    return out


def _show_steps(values: list[float]) -> str:
    if not values:
        return "n/a"
    median = stats.censored_median(values)
    shown = f"{median.median:.0f}" if median.is_reached else "not reached"
    return f"{shown} (median of {median.n}; {median.reached} reached)"


def recovery_table(curves, headline: Headline = ACCURACY, *,
                   examples: int | None = None) -> list[str]:
    """Markdown lines: recovery ratio and steps to 95 / 99 % of clean.

    One line per damage kind, amount and strategy. The recovery ratio
    ``(after - damaged) / (clean - damaged)`` is computed per model (seed)
    from the ``headline`` rows (the clean value, each model's damaged value
    and its final recovered value), undefined where the gap is within the
    clean model's test noise (:func:`recovjax.stats.recovery_ratio`, for an
    accuracy with a known ``examples``; otherwise only where the gap is 0),
    then aggregated as the mean over the models where it is defined, with
    its bootstrap interval and ``k/n defined``. Steps to X % of clean come
    from the ``steps_to_95`` / ``steps_to_99`` rows (or the curve rows) and
    aggregate as :func:`recovjax.stats.censored_median`.

    Args:
        curves: all results rows (every step of the recovery curves).
        headline: the metric of the ratio.
        examples: the test-set size (accuracy only).

    Returns:
        The table's lines, or ``[]`` without recovered rows or clean value.
    """
    rows = final_rows(curves)
    clean = _clean_value(rows, headline)
    strategies = _strategies(rows)
    if clean is None or not math.isfinite(clean) or not strategies:
        return []
    if headline.name != "accuracy":
        examples = None
    by_point = _group(curves, ["damage", "ratio", "stage"])
    lines = ["| damage | amount | strategy | recovery ratio | steps to 95 % "
             "of clean | steps to 99 % of clean |",
             "|---|---|---|---|---|---|"]
    for kind in _kinds(rows):
        damaged_by_ratio = _group(_select(rows, damage=kind, stage="damaged",
                                          metric=headline.name), ["ratio"])
        for (ratio,), group in sorted(damaged_by_ratio.items()):
            damaged = {r["seed"]: r["value"] for r in group}
            for strategy in strategies:
                stage = RECOVERED + strategy
                after = _by_seed(rows, damage=kind, ratio=ratio, stage=stage,
                                 metric=headline.name)
                seeds = sorted(set(damaged) & set(after))
                if not seeds:
                    continue
                cell = recovery_ratio_cell(
                    clean, [damaged[s] for s in seeds],
                    [after[s] for s in seeds], examples=examples)
                cells = [kind, f"{ratio:g}", strategy,
                         _show_ratio(cell, headline)]
                for fraction in (0.95, 0.99):
                    cells.append(_show_steps(_steps(
                        by_point.get((kind, ratio, stage), []), fraction,
                        clean, headline)))
                lines.append("| " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def _recovery_note(headline: Headline, clean: float | None,
                   examples: int | None) -> list[str]:
    """The words above the Recovery table: how its cells are computed."""
    text = ("Recovery ratio (after − damaged) / (clean − damaged), computed "
            f"per model (seed) from the {headline.name} rows, then the mean "
            "over the models where it is defined, with its 95 % bootstrap "
            "interval and how many models are defined. ")
    if headline.name != "accuracy":
        text += (f"{headline.title} has no binomial noise model: the ratio "
                 "is undefined only where the gap clean − damaged is 0. ")
    elif examples is None:
        text += ("The noise floor is unknown (the results record no "
                 "test-set size, test_examples): the ratio is computed "
                 "wherever the gap clean − damaged is nonzero. ")
    else:
        floor = (math.nan if clean is None or not 0 <= clean <= 1
                 else stats.noise_floor(clean, examples))
        text += ("Undefined where the damage is within the clean model's "
                 "test-set noise: |clean − damaged| below 2 binomial "
                 "standard errors 2·sqrt(p(1 − p)/n) = "
                 f"{100 * floor:.2f} pp of the clean accuracy p over the "
                 f"n = {examples} test examples. ")
    text += ("Steps to X % of clean: per model, the first evaluated step "
             "reaching X % of the clean value; the median is over all "
             "models, those that never reach it counted as +∞, so it is "
             "\"not reached\" when fewer than half reach it.")
    return [text]


def _cost_table(costs: dict) -> list[str]:
    if not costs:
        return []
    lines = ["| damage | strategy | models | wall time (s) | GFLOP per step "
             "| bytes read from checkpoint | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for record in costs.get("recovery", []):
        flops = record.get("flops_per_step")
        lines.append(
            f"| {record.get('damage', '')} | {record.get('strategy', '')} | "
            f"{record.get('models', '')} | {record.get('seconds', math.nan):.2f}"
            f" | {'' if flops is None else f'{flops / 1e9:.3f}'} | "
            f"{record.get('bytes_read', 0)} | "
            f"{record.get('peak_rss_mb', math.nan):.0f} |")
    return lines


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
    ``strategies.png``. When rows have a ``layer`` (a sensitivity map), the
    section "Sensitivity (layer x amount)" holds their table
    (:func:`sensitivity_table`) and ``sensitivity.png``
    (:func:`plot_sensitivity`); every other section shows the whole-model
    rows only (and the whole-model summaries are left out when only the
    clean model has such rows).

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
    costs_file = run_dir / "costs.json"
    costs = {}
    if costs_file.is_file():
        _, costs = read_json_file(costs_file)
        if not isinstance(costs, dict) or not isinstance(
                costs.get("recovery", []), list) or not all(
                isinstance(record, dict) for record in costs.get("recovery",
                                                                 [])):
            raise ValueError(f"{costs_file}: not a recovjax costs document "
                             '({"recovery": [{...}, ...]})')
    curves, rows = rows, final_rows(rows)
    plots = [(f"{headline.title} vs damage amount", plot_metric_vs_ratio(
                 rows, run_dir / headline.ratio_plot, headline,
                 examples=test_examples)),
             ("Recovery curves", plot_recovery_curves(
                 curves, run_dir / "recovery_curves.png", headline)),
             ("Damage amount x recovery steps", plot_heatmap(
                 curves, run_dir / "recovery_heatmap.png", headline)),
             ("Strategies at equal compute", plot_strategies(
                 rows, run_dir / "strategies.png", headline))]
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
                 "many seeds favour each side. ✓: the difference holds across seeds (every seed favours the best and the "
                 "interval excludes 0).", ""] + paired + [""]
    measures = recovery_table(curves, headline, examples=test_examples)
    if measures:
        text += ["## Recovery", ""] + _recovery_note(
            headline, clean, test_examples) + [""] + measures + [""]
    cost_lines = _cost_table(costs)
    if cost_lines:
        text += ["## Cost of recovery", ""] + cost_lines + [""]
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
