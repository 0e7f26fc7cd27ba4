"""Recovery set against its cost: the Pareto frontier of the strategies.

Each recovered point of a run records its cost in ``costs.json``: FLOPs of
one model's recovery (XLA's count, loop bodies per iteration), wall time
per model, labelled and unlabelled samples read, trainable parameters,
bytes read from the checkpoint and peak memory. Here every strategy (and
budget: a strategy configured several times under its own labels) at
every damage kind and amount becomes one point, *(cost, metric after
recovery)*, next to the damaged model itself (no recovery, no cost). A
point is *dominated* when another costs no more and recovers at least as
well (better in one of the two); the others form the frontier, the
strategies worth choosing at some budget. Means over seeds decide
dominance; :func:`best_under_budget` adds the paired difference to the
runner-up, so that a choice between two close strategies shows whether
it holds across seeds.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import NamedTuple, Sequence

from recovjax import stats
from recovjax._io import read_json_file
from recovjax.report.headline import (ACCURACY, RECOVERED, Headline, _group,
                                      _kinds, _select, show_interval,
                                      value_interval)

NO_RECOVERY = "(no recovery)"
"""The name of the damaged model's own point (cost 0)."""


def read_costs(run_dir: os.PathLike[str] | str) -> dict:
    """A run directory's ``costs.json`` document (``{}`` when it has none).

    Raises:
        ValueError: a file that is not a costs document (named).
    """
    path = pathlib.Path(run_dir) / "costs.json"
    if not path.is_file():
        return {}
    _, costs = read_json_file(path)
    if not isinstance(costs, dict) or not isinstance(
            costs.get("recovery", []), list) or not all(
            isinstance(record, dict) for record in costs.get("recovery", [])):
        raise ValueError(f"{path}: not a recovjax costs document "
                         '({"recovery": [{...}, ...]})')
    return costs


class CostAxis(NamedTuple):
    """One way to measure what a recovery costs.

    Attributes:
        name: the name ``compare --cost`` takes.
        label: the axis label.
        scale: shown value per recorded value.
        unit: what follows a shown budget (``"GFLOP per model"``).
    """

    name: str
    label: str
    scale: float
    unit: str


COSTS: dict[str, CostAxis] = {axis.name: axis for axis in (
    CostAxis("flops", "GFLOP per model", 1e-9, "GFLOP per model"),
    CostAxis("seconds", "wall time per model (s)", 1.0,
             "s of wall time per model"),
    CostAxis("samples", "samples read per model", 1.0,
             "samples read per model"),
    CostAxis("labelled", "labelled samples per model", 1.0,
             "labelled samples per model"),
    CostAxis("params", "trainable parameters", 1.0, "trainable parameters"),
    CostAxis("bytes", "bytes read from the checkpoint", 1.0,
             "bytes read from the checkpoint"),
)}
"""The cost measures, by name."""


class Cost(NamedTuple):
    """What one strategy's recovery of one damage kind cost, per model.

    Attributes:
        flops: FLOPs (``None``: not counted).
        seconds: wall time, compilation included, per model.
        labelled: labelled samples read (``None``: not counted).
        unlabelled: unlabelled samples read (``None``: not counted).
        params: trainable parameters.
        bytes: bytes read from the checkpoint.
        peak_mb: peak host memory of the process (MiB).
    """

    flops: float | None
    seconds: float
    labelled: int | None
    unlabelled: int | None
    params: int
    bytes: int
    peak_mb: float

    def of(self, axis: str) -> float:
        """The cost on one axis of :data:`COSTS` (NaN when not counted)."""
        if axis not in COSTS:
            raise ValueError(f"cost must be one of {', '.join(COSTS)}, got "
                             f"{axis!r}")
        if axis == "samples":
            if self.labelled is None or self.unlabelled is None:
                return math.nan
            return float(self.labelled + self.unlabelled)
        value = getattr(self, axis)
        return math.nan if value is None else float(value)


def costs_by_strategy(costs: dict) -> dict[tuple[str, str], Cost]:
    """``{(damage, strategy): Cost}`` from a run's ``costs.json`` document.

    Groups of one damage kind and strategy are combined: wall time summed
    and divided by their models; counts are per model and equal across
    groups (the largest is kept).
    """
    merged: dict[tuple[str, str], list[dict]] = {}
    for record in costs.get("recovery", []):
        key = (str(record.get("damage", "")), str(record.get("strategy", "")))
        merged.setdefault(key, []).append(record)
    out = {}
    for key, records in merged.items():
        models = sum(int(r.get("models", 0)) for r in records)
        seconds = sum(float(r.get("seconds", math.nan)) for r in records)

        def largest(name):
            found = [r.get(name) for r in records if r.get(name) is not None]
            return max(found) if found else None

        out[key] = Cost(
            flops=largest("flops_per_model"),
            seconds=seconds / models if models else math.nan,
            labelled=largest("labelled_samples"),
            unlabelled=largest("unlabelled_samples"),
            params=int(largest("trainable_params") or 0),
            bytes=int(largest("bytes_read") or 0),
            peak_mb=float(largest("peak_rss_mb") or math.nan))
    return out


class FrontierPoint(NamedTuple):
    """One strategy at one damage kind and amount.

    Attributes:
        damage: the damage kind (its label).
        ratio: the damage amount.
        strategy: the strategy's label, or :data:`NO_RECOVERY`.
        cost: its cost on the chosen axis (0 for no recovery).
        value: the mean metric after recovery over seeds.
        interval: the interval of that mean (:func:`value_interval`).
        seeds: ``{seed: value}`` of the models.
        dominated_by: the strategy that dominates it, or ``None`` on the
            frontier.
    """

    damage: str
    ratio: float
    strategy: str
    cost: float
    value: float
    interval: stats.Interval
    seeds: dict[int, float]
    dominated_by: str | None

    @property
    def on_frontier(self) -> bool:
        return self.dominated_by is None


def _better(headline: Headline, a: float, b: float) -> bool:
    return a > b if headline.higher_is_better else a < b


def _at_least(headline: Headline, a: float, b: float) -> bool:
    return a >= b if headline.higher_is_better else a <= b


def frontier(rows: Sequence[dict], costs: dict, headline: Headline = ACCURACY,
             *, cost: str = "flops", examples: int | None = None
             ) -> list[FrontierPoint]:
    """Every strategy's point at every damage kind and amount, dominance
    marked.

    Args:
        rows: the final results rows (:func:`~recovjax.report.final_rows`).
        costs: the run's ``costs.json`` document.
        headline: the metric.
        cost: the cost axis (a name of :data:`COSTS`).
        examples: test examples per model (a one-seed interval).

    Returns:
        The points, by damage kind (in the rows' order), amount, then
        cost; strategies whose cost on this axis was not counted are left
        out.

    Raises:
        ValueError: for an unknown cost axis.
    """
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)}, got "
                         f"{cost!r}")
    recorded = costs_by_strategy(costs)
    points = []
    for kind in _kinds(rows):
        damaged = _select(rows, damage=kind, stage="damaged",
                          metric=headline.name)
        for (ratio,), group in sorted(_group(damaged, ["ratio"]).items()):
            candidates = [(NO_RECOVERY, 0.0, {r["seed"]: r["value"]
                                              for r in group})]
            for stage in sorted({r["stage"] for r in rows
                                 if r["stage"].startswith(RECOVERED)}):
                strategy = stage[len(RECOVERED):]
                found = recorded.get((kind, strategy))
                if found is None or not math.isfinite(found.of(cost)):
                    continue
                seeds = {r["seed"]: r["value"] for r in _select(
                    rows, damage=kind, ratio=ratio, stage=stage,
                    metric=headline.name)}
                if seeds:
                    candidates.append((strategy, found.of(cost), seeds))
            located = []
            for strategy, price, seeds in candidates:
                values = [seeds[s] for s in sorted(seeds)]
                interval = value_interval(headline, values, examples)
                located.append((strategy, price, interval.estimate, interval,
                                seeds))
            for strategy, price, value, interval, seeds in located:
                dominated_by = None
                for other, other_price, other_value, _, _ in located:
                    if other == strategy or not math.isfinite(other_value):
                        continue
                    cheaper = other_price <= price
                    no_worse = _at_least(headline, other_value, value) or (
                        not math.isfinite(value))
                    strictly = other_price < price or _better(
                        headline, other_value, value) or not math.isfinite(
                            value)
                    if cheaper and no_worse and strictly:
                        dominated_by = other
                        break
                points.append(FrontierPoint(kind, ratio, strategy, price,
                                            value, interval, seeds,
                                            dominated_by))
    order = {kind: index for index, kind in enumerate(_kinds(rows))}
    return sorted(points, key=lambda p: (order[p.damage], p.ratio, p.cost,
                                         p.strategy))


class Choice(NamedTuple):
    """The best strategy under a budget at one damage kind and amount.

    Attributes:
        damage, ratio: the point.
        best: the best point within the budget (``None``: nothing fits,
            not even no recovery).
        runner_up: the next best within the budget, or ``None``.
        difference: best minus runner-up, paired by seed, or ``None``.
    """

    damage: str
    ratio: float
    best: FrontierPoint | None
    runner_up: FrontierPoint | None
    difference: stats.PairedDifference | None


def best_under_budget(points: Sequence[FrontierPoint], budget: float,
                      headline: Headline = ACCURACY) -> list[Choice]:
    """The best strategy costing at most ``budget``, per kind and amount.

    Args:
        points: from :func:`frontier`.
        budget: the largest cost allowed, on the frontier's axis
            (``math.inf``: any).
        headline: the metric.

    Returns:
        One :class:`Choice` per damage kind and amount.

    Raises:
        ValueError: for a negative or NaN budget.
    """
    if not budget >= 0:
        raise ValueError(f"budget must be a non-negative number, got "
                         f"{budget!r}")
    choices = []
    groups: dict[tuple, list[FrontierPoint]] = {}
    for point in points:
        groups.setdefault((point.damage, point.ratio), []).append(point)
    for (kind, ratio), group in groups.items():
        within = [p for p in group if p.cost <= budget
                  and math.isfinite(p.value)]
        sign = -1.0 if headline.higher_is_better else 1.0
        within.sort(key=lambda p: (sign * p.value, p.cost, p.strategy))
        best = within[0] if within else None
        runner = within[1] if len(within) > 1 else None
        difference = None
        if best is not None and runner is not None:
            common = sorted(set(best.seeds) & set(runner.seeds))
            if common:
                a = [best.seeds[s] for s in common]
                b = [runner.seeds[s] for s in common]
                if not headline.higher_is_better:
                    a, b = b, a
                difference = stats.paired_difference(a, b)
        choices.append(Choice(kind, ratio, best, runner, difference))
    return choices


def show_cost(axis: CostAxis, value: float) -> str:
    """A cost in the axis's unit (``"10.3"`` GFLOP, ``"4,000"`` samples)."""
    shown = axis.scale * value
    if shown == 0:
        return "0"
    if axis.name in ("samples", "labelled", "params", "bytes"):
        return f"{shown:,.0f}"
    return f"{shown:.3g}"


def frontier_table(points: Sequence[FrontierPoint], headline: Headline,
                   cost: str = "flops") -> list[str]:
    """Markdown rows: each point's cost, metric and place on the frontier."""
    if not points:
        return []
    axis = COSTS[cost]
    lines = [f"| damage | amount | strategy | {axis.label} | "
             f"{headline.short}{headline.suffix} | frontier |",
             "|---|---|---|---|---|---|"]
    for point in points:
        place = ("✓" if point.on_frontier
                 else f"dominated by {point.dominated_by}")
        lines.append(f"| {point.damage} | {point.ratio:g} | {point.strategy} "
                     f"| {show_cost(axis, point.cost)} | "
                     f"{show_interval(headline, point.interval)} | {place} |")
    return lines


def plot_frontier(points: Sequence[FrontierPoint], path: pathlib.Path,
                  headline: Headline = ACCURACY, cost: str = "flops"
                  ) -> pathlib.Path | None:
    """Metric after recovery against cost, one panel per damage kind.

    One colour per amount; filled markers on the frontier (joined by a
    step line), hollow ones dominated; every point named. Costs of 0 (no
    recovery, a restore's FLOPs) sit at the left edge of the log axis.

    Returns:
        ``path``, or ``None`` (nothing written) without points.
    """
    if not points:
        return None
    import matplotlib.pyplot as plt
    axis_info = COSTS[cost]
    kinds = list(dict.fromkeys(p.damage for p in points))
    columns = min(3, len(kinds))
    rows_count = -(-len(kinds) // columns)
    figure, axes = plt.subplots(rows_count, columns, squeeze=False,
                                figsize=(5.2 * columns, 4.2 * rows_count))
    positive = [axis_info.scale * p.cost for p in points if p.cost > 0]
    floor = (min(positive) / 10.0) if positive else 1.0
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, kind in zip(axes.flat, kinds):
        ratios = sorted({p.ratio for p in points if p.damage == kind})
        for index, ratio in enumerate(ratios):
            colour = colours[index % len(colours)]
            group = [p for p in points if p.damage == kind
                     and p.ratio == ratio and math.isfinite(p.value)]
            x = [max(axis_info.scale * p.cost, floor) for p in group]
            y = [headline.scale * p.value for p in group]
            for point, px, py in zip(group, x, y):
                axis.scatter([px], [py], s=30, color=colour,
                             facecolors=colour if point.on_frontier
                             else "none", zorder=3)
                axis.annotate(point.strategy, (px, py), fontsize=6,
                              xytext=(3, 3), textcoords="offset points")
            edge = sorted((px, py) for point, px, py in zip(group, x, y)
                          if point.on_frontier)
            if edge:
                axis.step([e[0] for e in edge], [e[1] for e in edge],
                          where="post", color=colour, lw=1,
                          label=f"amount {ratio:g}")
        axis.set_xscale("log")
        axis.set_xlabel(axis_info.label + (" (0 at the left edge)"
                                           if positive else ""))
        axis.set_ylabel(headline.label)
        if headline.log_axis:
            axis.set_yscale("log")
        axis.set_title(kind)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right" if headline.higher_is_better
                    else "upper right")
    for axis in list(axes.flat)[len(kinds):]:
        axis.axis("off")
    figure.suptitle(f"{headline.title} after recovery against its cost "
                    "(filled: the frontier; hollow: dominated)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def describe_choices(choices: Sequence[Choice], headline: Headline,
                     axis: CostAxis, budget: float) -> list[str]:
    """Plain-text lines of :func:`best_under_budget`'s answer."""
    within = ("any cost" if math.isinf(budget)
              else f"at most {show_cost(axis, budget)} {axis.unit}")
    lines = [f"best strategy under a budget of {within}:"]
    unit = "pp" if headline.unit == "%" else headline.unit or "units"
    for choice in choices:
        head = f"  {choice.damage} {choice.ratio:g}: "
        if choice.best is None:
            lines.append(head + "nothing fits the budget")
            continue
        best = choice.best
        unit_text = f" {headline.unit}" if headline.unit else ""
        text = (f"{best.strategy} {show_interval(headline, best.interval)}"
                f"{unit_text}, cost {show_cost(axis, best.cost)}")
        if choice.runner_up is not None and choice.difference is not None:
            diff = choice.difference
            scale = headline.scale
            held = "holds across seeds" if diff.holds else (
                "does not hold across seeds")
            text += (f"; ahead of {choice.runner_up.strategy} by "
                     f"{scale * diff.interval.estimate:.2f} "
                     f"[{scale * diff.interval.low:.2f}, "
                     f"{scale * diff.interval.high:.2f}] {unit} ({held})")
        lines.append(head + text)
    return lines


def compare_run(run_dir: os.PathLike[str] | str, *, cost: str = "flops",
                budget: float | None = None, metric: str | None = None,
                higher_is_better: bool | None = None
                ) -> tuple[Headline, list[FrontierPoint], list[Choice]]:
    """The frontier of a saved run and its best strategies under a budget.

    Args:
        run_dir: a run directory written by ``recovjax recover`` or
            ``demo`` (``results.csv`` and ``costs.json``).
        cost: the cost axis (:data:`COSTS`).
        budget: the largest cost allowed, in the axis's shown unit (GFLOP
            for ``flops``); ``None``: any cost.
        metric, higher_is_better: the headline metric (see
            :func:`~recovjax.report.headline_metric`).

    Returns:
        ``(headline, points, choices)``.

    Raises:
        FileNotFoundError: no results in ``run_dir``.
        ValueError: no recovery costs recorded, an unknown cost axis, a
            negative budget, or a damaged results or costs file (named).
    """
    from recovjax.report.headline import final_rows, headline_metric
    from recovjax.results import read_csv
    run_dir = pathlib.Path(run_dir)
    results = run_dir / "results.csv"
    if not results.is_file():
        raise FileNotFoundError(f"{results}: no results to compare")
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)}, got "
                         f"{cost!r}")
    if budget is not None and not budget >= 0:
        raise ValueError(f"budget must be a non-negative number, got "
                         f"{budget!r}")
    table = read_csv(results)
    costs = read_costs(run_dir)
    if not costs.get("recovery"):
        raise ValueError(f"{run_dir}: no recovery costs recorded (a run of "
                         "'recovjax sweep' has no strategies to compare)")
    headline = headline_metric(table.rows, metric, higher_is_better)
    rows = final_rows([r for r in table.rows if not r.get("layer")])
    points = frontier(rows, costs, headline, cost=cost,
                      examples=table.test_examples)
    limit = math.inf if budget is None else budget / COSTS[cost].scale
    return headline, points, best_under_budget(points, limit, headline)


__all__ = ["COSTS", "NO_RECOVERY", "Choice", "Cost", "CostAxis",
           "FrontierPoint", "best_under_budget", "compare_run",
           "costs_by_strategy", "describe_choices", "frontier", "show_cost",
           "frontier_table", "plot_frontier", "read_costs"]

