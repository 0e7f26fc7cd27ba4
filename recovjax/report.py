"""Plots and a markdown report, made from saved results without recomputing.

The report reads the tidy table (``results.csv``, with its metadata sidecar
``results.meta.json``) and the cost records (``costs.json``) of a run
directory; a damaged file is refused with an error naming it and the line,
never drawn. Stage names follow the pipeline:
``clean``, ``damaged`` and ``recovered/<strategy>``; a recovered stage has
rows at every evaluated ``step`` of its recovery curve, and its final rows
(largest ``step``) are the result after recovery.
"""

from __future__ import annotations

import collections
import math
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np

from recovjax._io import atomic_write, read_json_file
from recovjax.results import t_quantile

RECOVERED = "recovered/"

def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, std, half-width of the 95 % CI)``; NaN-aware for the mean."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(np.mean(array))
    if array.size == 1:
        return mean, 0.0, math.nan
    std = float(np.std(array, ddof=1))
    half = t_quantile(0.975, array.size - 1) * std / math.sqrt(array.size)
    return mean, std, half


def _group(rows: Iterable[dict], keys: Sequence[str]) -> dict[tuple, list]:
    groups: dict[tuple, list] = collections.defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    return groups


def _select(rows, **where) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def final_rows(rows) -> list[dict]:
    """Rows of the last step of every (damage, ratio, seed, stage, metric)."""
    last: dict[tuple, int] = {}
    for r in rows:
        key = (r["damage"], r["ratio"], r["seed"], r["stage"])
        last[key] = max(last.get(key, r["step"]), r["step"])
    return [r for r in rows
            if r["step"] == last[(r["damage"], r["ratio"], r["seed"],
                                  r["stage"])]]


def _percent(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else (
        f"{100 * value:.2f}")


def _strategies(rows) -> list[str]:
    return sorted({r["stage"][len(RECOVERED):] for r in rows
                   if r["stage"].startswith(RECOVERED)})


def _kinds(rows) -> list[str]:
    seen = []
    for r in rows:
        if r["stage"] == "damaged" and r["damage"] not in seen:
            seen.append(r["damage"])
    return seen


def _clean_accuracy(rows) -> float | None:
    clean = _select(rows, stage="clean", metric="accuracy")
    return clean[0]["value"] if clean else None


def _curve_by_ratio(rows, kind, strategy):
    """``{ratio: (steps, mean accuracy)}`` of a recovery curve."""
    points = _select(rows, damage=kind, stage=RECOVERED + strategy,
                     metric="accuracy")
    out = {}
    for (ratio,), group in sorted(_group(points, ["ratio"]).items()):
        by_step = _group(group, ["step"])
        steps = sorted(step for (step,) in by_step)
        out[ratio] = (np.asarray(steps), np.asarray(
            [np.mean([r["value"] for r in by_step[(s,)]]) for s in steps]))
    return out


def plot_accuracy_vs_ratio(rows, path: pathlib.Path) -> pathlib.Path | None:
    """Accuracy against damage amount, one panel per damage kind, 95 % bands."""
    import matplotlib.pyplot as plt
    kinds = _kinds(rows)
    if not kinds:
        return None
    clean = _clean_accuracy(rows)
    columns = min(3, len(kinds))
    lines = math.ceil(len(kinds) / columns)
    figure, axes = plt.subplots(lines, columns, squeeze=False,
                                figsize=(4.6 * columns, 3.6 * lines))
    stages = ["damaged"] + [RECOVERED + s for s in _strategies(rows)]
    for axis, kind in zip(axes.flat, kinds):
        for stage in stages:
            points = _select(rows, damage=kind, stage=stage, metric="accuracy")
            if not points:
                continue
            groups = sorted(_group(points, ["ratio"]).items())
            ratios = np.asarray([ratio for (ratio,), _ in groups])
            stats = np.asarray([mean_ci([r["value"] for r in group])
                                for _, group in groups])
            label = "damaged" if stage == "damaged" else stage[len(RECOVERED):]
            axis.plot(ratios, 100 * stats[:, 0], marker="o", ms=3, label=label)
            half = np.nan_to_num(stats[:, 2])
            axis.fill_between(ratios, 100 * (stats[:, 0] - half),
                              100 * (stats[:, 0] + half), alpha=0.2)
        if clean is not None:
            axis.axhline(100 * clean, color="grey", ls="--", lw=1,
                         label="clean")
        axis.set_title(kind)
        axis.set_xlabel("damage amount (ratio / rate / scale)")
        axis.set_ylabel("test accuracy (%)")
        axis.set_ylim(0, 100)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(kinds):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    figure.suptitle("Accuracy vs damage (mean over seeds, 95 % CI band)")
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


def plot_recovery_curves(rows, path: pathlib.Path) -> pathlib.Path | None:
    """Accuracy against fine-tuning steps, one line per damage amount."""
    import matplotlib.pyplot as plt
    strategies = _training_strategies(rows)
    kinds = [k for k in _kinds(rows)
             if any(_curve_by_ratio(rows, k, s) for s in strategies)]
    if not kinds:
        return None
    strategy = strategies[0]
    clean = _clean_accuracy(rows)
    columns = min(3, len(kinds))
    lines = math.ceil(len(kinds) / columns)
    figure, axes = plt.subplots(lines, columns, squeeze=False,
                                figsize=(4.6 * columns, 3.6 * lines))
    for axis, kind in zip(axes.flat, kinds):
        curves = _curve_by_ratio(rows, kind, strategy)
        colours = plt.cm.viridis(np.linspace(0, 0.9, max(len(curves), 1)))
        for colour, (ratio, (steps, accuracy)) in zip(colours, curves.items()):
            axis.plot(steps, 100 * accuracy, color=colour, label=f"{ratio:g}")
        if clean is not None:
            axis.axhline(100 * clean, color="grey", ls="--", lw=1)
        axis.set_title(f"{kind} ({strategy})")
        axis.set_xlabel("fine-tuning steps")
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(title="amount", fontsize=7)
    for axis in list(axes.flat)[len(kinds):]:
        axis.axis("off")
    figure.suptitle("Recovery curves (mean over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_heatmap(rows, path: pathlib.Path) -> pathlib.Path | None:
    """Damage amount x recovery steps, coloured by mean accuracy."""
    import matplotlib.pyplot as plt
    strategies = _training_strategies(rows)
    panels = [(k, s) for k in _kinds(rows) for s in strategies[:1]
              if len(_curve_by_ratio(rows, k, s)) > 0]
    if not panels:
        return None
    columns = min(3, len(panels))
    lines = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(lines, columns, squeeze=False,
                                figsize=(4.8 * columns, 3.6 * lines))
    for axis, (kind, strategy) in zip(axes.flat, panels):
        curves = _curve_by_ratio(rows, kind, strategy)
        ratios = sorted(curves)
        steps = curves[ratios[0]][0]
        grid = np.stack([curves[r][1] for r in ratios])
        image = axis.imshow(100 * grid, aspect="auto", origin="lower",
                            cmap="magma", vmin=0, vmax=100,
                            extent=(steps[0], steps[-1], -0.5,
                                    len(ratios) - 0.5))
        axis.set_yticks(range(len(ratios)), [f"{r:g}" for r in ratios])
        axis.set_xlabel("fine-tuning steps")
        axis.set_ylabel("damage amount")
        axis.set_title(f"{kind} ({strategy})")
        figure.colorbar(image, ax=axis, label="test accuracy (%)")
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_strategies(rows, path: pathlib.Path) -> pathlib.Path | None:
    """Recovered accuracy per strategy and damage kind (equal step budget)."""
    import matplotlib.pyplot as plt
    strategies = _strategies(rows)
    kinds = _kinds(rows)
    if not strategies or not kinds:
        return None
    figure, axis = plt.subplots(figsize=(max(5.0, 1.2 * len(kinds) *
                                            (len(strategies) + 1)), 3.8))
    width = 0.8 / (len(strategies) + 1)
    x = np.arange(len(kinds))
    damaged = [mean_ci([r["value"] for r in _select(
        rows, damage=k, stage="damaged", metric="accuracy")]) for k in kinds]
    axis.bar(x, [100 * d[0] for d in damaged], width, label="damaged",
             color="lightgrey", yerr=[100 * np.nan_to_num(d[2])
                                      for d in damaged])
    for index, strategy in enumerate(strategies, start=1):
        stats = [mean_ci([r["value"] for r in _select(
            rows, damage=k, stage=RECOVERED + strategy, metric="accuracy")])
            for k in kinds]
        axis.bar(x + index * width, [100 * s[0] for s in stats], width,
                 label=strategy, yerr=[100 * np.nan_to_num(s[2])
                                       for s in stats])
    axis.set_xticks(x + width * len(strategies) / 2, kinds)
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title("Strategies at equal compute (mean over amounts and seeds)")
    axis.legend(fontsize=7, ncol=2)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _summary_table(rows) -> list[str]:
    strategies = _strategies(rows)
    header = ["damage", "amount", "n", "damaged acc. (%)"] + [
        f"{s} (%)" for s in strategies]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for kind in _kinds(rows):
        damaged = _select(rows, damage=kind, stage="damaged",
                          metric="accuracy")
        for (ratio,), group in sorted(_group(damaged, ["ratio"]).items()):
            mean, _, half = mean_ci([r["value"] for r in group])
            cells = [kind, f"{ratio:g}", str(len(group)),
                     f"{_percent(mean)} ± {_percent(half)}"]
            for strategy in strategies:
                got = [r["value"] for r in _select(
                    rows, damage=kind, ratio=ratio,
                    stage=RECOVERED + strategy, metric="accuracy")]
                m, _, h = mean_ci(got)
                cells.append(f"{_percent(m)} ± {_percent(h)}" if got else "")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _curve_summary(rows, threshold: float) -> list[str]:
    lines = ["| damage | area under accuracy-vs-amount (mean acc.) | "
             f"amount where accuracy < {threshold:g} |", "|---|---|---|"]
    for kind in _kinds(rows):
        damaged = _select(rows, damage=kind, stage="damaged",
                          metric="accuracy")
        groups = sorted(_group(damaged, ["ratio"]).items())
        ratios = np.asarray([r for (r,), _ in groups], dtype=np.float64)
        means = np.asarray([np.mean([x["value"] for x in g])
                            for _, g in groups])
        if len(ratios) > 1 and ratios[-1] > ratios[0]:
            area = float(np.trapezoid(means, ratios) / (ratios[-1] - ratios[0]))
        else:
            area = float(means[0]) if len(means) else math.nan
        below = np.flatnonzero(means < threshold)
        crossing = "not reached"
        if below.size:
            i = below[0]
            if i == 0:
                crossing = f"{ratios[0]:g}"
            else:
                r0, r1, a0, a1 = ratios[i - 1], ratios[i], means[i - 1], means[i]
                crossing = f"{r0 + (a0 - threshold) / (a0 - a1) * (r1 - r0):.3g}"
        lines.append(f"| {kind} | {_percent(area)} % | {crossing} |")
    return lines


def _recovery_measures(rows) -> list[str]:
    metrics = ("recovery_ratio", "steps_to_95", "steps_to_99")
    found = [r for r in rows if r["stage"].startswith(RECOVERED)
             and r["metric"] in metrics]
    if not found:
        return []
    lines = ["| damage | strategy | recovery ratio | steps to 95 % of clean | "
             "steps to 99 % of clean |", "|---|---|---|---|---|"]
    for (kind, stage), group in _group(found, ["damage", "stage"]).items():
        cells = [kind, stage[len(RECOVERED):]]
        for metric in metrics:
            values = [r["value"] for r in group if r["metric"] == metric]
            finite = [v for v in values if math.isfinite(v)]
            if metric == "recovery_ratio":
                cells.append(f"{np.mean(finite):.3f}" if finite else "n/a")
            else:
                cells.append(
                    f"{np.median(finite):.0f} (median; {len(finite)}/"
                    f"{len(values)} reached)" if finite else "not reached")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
                 *, threshold: float = 0.5, title: str | None = None
                 ) -> pathlib.Path:
    """Write the PNG plots and ``report.md`` of a run directory.

    Args:
        run_dir: a run directory holding ``results.csv`` (and optionally
            ``costs.json`` and ``config.yaml``).
        rows: the results rows; read from ``results.csv`` when omitted.
        threshold: accuracy threshold for the ratio-at-threshold column.
        title: report title (default: the directory name).

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError: if ``run_dir`` has no ``results.csv`` and no rows
            are given.
        ValueError: if ``results.csv`` (see :func:`recovjax.results.read_csv`)
            or ``costs.json`` cannot be read; the message names the file and
            the line.
    """
    import matplotlib
    matplotlib.use("Agg")
    from recovjax.results import read_rows
    run_dir = pathlib.Path(run_dir)
    if rows is None:
        results = run_dir / "results.csv"
        if not results.is_file():
            raise FileNotFoundError(f"{results}: no results to report on")
        rows = read_rows(results)
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
    plots = [("Accuracy vs damage amount", plot_accuracy_vs_ratio(
                 rows, run_dir / "accuracy_vs_ratio.png")),
             ("Recovery curves", plot_recovery_curves(
                 curves, run_dir / "recovery_curves.png")),
             ("Damage amount x recovery steps", plot_heatmap(
                 curves, run_dir / "recovery_heatmap.png")),
             ("Strategies at equal compute", plot_strategies(
                 rows, run_dir / "strategies.png"))]
    clean = _clean_accuracy(rows)
    text = [f"# {title or run_dir.name}", ""]
    if clean is not None:
        text += [f"Clean (pretrained) test accuracy: **{_percent(clean)} %**.",
                 ""]
    text += ["## Accuracy (mean ± 95 % CI over seeds)", ""]
    text += _summary_table(rows) + [""]
    text += ["## Robustness curve summary", ""] + _curve_summary(
        rows, threshold) + [""]
    measures = _recovery_measures(rows)
    if measures:
        text += ["## Recovery", ""] + measures + [""]
    cost_lines = _cost_table(costs)
    if cost_lines:
        text += ["## Cost of recovery", ""] + cost_lines + [""]
    for caption, plot in plots:
        if plot is not None:
            text += [f"## {caption}", "", f"![{caption}]({plot.name})", ""]
    report = run_dir / "report.md"
    atomic_write(report, "\n".join(text))
    return report
