"""The metric a report shows, how its values and intervals are shown,
and the selections of results rows every table and plot makes."""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterable, Sequence


from recovjax import stats

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


