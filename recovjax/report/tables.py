"""The report's markdown tables."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from recovjax import stats
from recovjax.results import _natural as _natural_key
from recovjax.report.headline import (ACCURACY, Headline, RECOVERED,
                                      final_rows, show_interval,
                                      value_interval, _clean_value, _group,
                                      _kinds, _layer, _select, _strategies)



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
    its bootstrap interval and ``k/n defined`` (and ``k/n diverged`` when
    a model's training loss went non-finite). Steps to X % of clean come
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
                shown = _show_ratio(cell, headline)
                diverged = {r["seed"] for r in by_point.get(
                    (kind, ratio, stage), [])
                    if r["metric"] == "diverged" and r["value"] > 0}
                count = len(diverged & set(seeds))
                if count:
                    # A training loss went non-finite: the model's ratio is
                    # a collapse, not a recovery.
                    shown += f"; {count}/{len(seeds)} diverged"
                cells = [kind, f"{ratio:g}", strategy, shown]
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
    lines = ["| damage | strategy | models | wall time per model (s) | "
             "GFLOP per model | labelled / unlabelled samples | trainable "
             "parameters | bytes read from checkpoint | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def count(value):
        return "not counted" if value is None else f"{value:,}"

    for record in costs.get("recovery", []):
        flops = record.get("flops_per_model")
        models = record.get("models") or 0
        seconds = record.get("seconds", math.nan)
        lines.append(
            f"| {record.get('damage', '')} | {record.get('strategy', '')} | "
            f"{models} | {seconds / models if models else math.nan:.3f} | "
            f"{'not counted' if flops is None else f'{flops / 1e9:.3f}'} | "
            f"{count(record.get('labelled_samples'))} / "
            f"{count(record.get('unlabelled_samples'))} | "
            f"{count(record.get('trainable_params'))} | "
            f"{record.get('bytes_read', 0):,} | "
            f"{record.get('peak_rss_mb', math.nan):.0f} |")
    return lines


