"""Statistics over seeds and test examples: intervals, paired differences,
recovery ratios and censored step counts.

Every summary a report, a results summary or the CLI prints comes from
here, so one method is used everywhere and stated in words
(:func:`describe_method`).

- Across seeds, the interval of a mean is the bootstrap percentile interval
  (:func:`bootstrap_mean`): resampling with a fixed NumPy generator seed and
  a fixed number of resamples, so the same values give the same interval,
  bit for bit, run after run. A percentile interval of the mean never leaves
  ``[min, max]`` of the values, so an accuracy interval stays in ``[0, 1]``
  however bimodal the seeds.
- For one model's accuracy-type fraction over ``n`` test examples, the
  Wilson score interval (:func:`wilson_interval`), which also stays in
  ``[0, 1]``.
- Two strategies applied to the same damaged models compare by their
  per-model differences (:func:`paired_difference`).
- The recovery ratio ``(after - damaged) / (clean - damaged)`` is undefined
  where the damage is within the clean model's own test-set noise
  (:func:`noise_floor`, :func:`recovery_ratio`).
- Steps to reach a level are censored ("not reached"); their median counts
  the censored models (:func:`censored_median`).

The module needs only NumPy and the standard library (no JAX).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

CONFIDENCE: float = 0.95
"""The default two-sided confidence level."""

RESAMPLES: int = 10_000
"""The default number of bootstrap resamples."""

SEED: int = 0
"""The seed of the bootstrap's NumPy generator (fixed: reproducible)."""

NOISE_STANDARD_ERRORS: float = 2.0
"""A gap smaller than this many binomial standard errors is test noise."""

BOOTSTRAP = "bootstrap"
WILSON = "wilson"
NONE = "none"


class Interval(NamedTuple):
    """An estimate with its two-sided confidence interval.

    Attributes:
        estimate: the point estimate (the mean over seeds, or one model's
            fraction); NaN without values, NaN or infinite when a value is.
        low: the lower bound; NaN when there is no interval.
        high: the upper bound; NaN when there is no interval.
        method: :data:`BOOTSTRAP` (percentile bootstrap of the mean over
            seeds), :data:`WILSON` (score interval over test examples) or
            :data:`NONE` (no interval: one value without a test-set size,
            or a non-finite value).
        n: the number of values (seeds), or of test examples for
            :data:`WILSON`.
    """

    estimate: float
    low: float
    high: float
    method: str
    n: int


class PairedDifference(NamedTuple):
    """The paired comparison of two strategies on the same damaged models.

    Attributes:
        differences: ``a[i] - b[i]`` for every model ``i``.
        interval: the bootstrap interval of their mean (:class:`Interval`).
        a_better: models where ``a`` is larger.
        b_better: models where ``b`` is larger.
        ties: models where they are equal.
        holds: whether the difference holds across seeds: every difference
            has the same (nonzero) sign and the interval excludes 0.
    """

    differences: tuple[float, ...]
    interval: Interval
    a_better: int
    b_better: int
    ties: int
    holds: bool


class CensoredMedian(NamedTuple):
    """The median of a censored count (e.g. steps to reach a level).

    Attributes:
        median: the lower median with "not reached" sorted as ``+inf``;
            ``inf`` when fewer than half the models reached the level.
        n: the number of models.
        reached: how many reached it.
    """

    median: float
    n: int
    reached: int

    @property
    def is_reached(self) -> bool:
        """Whether the median is a number (at least half reached)."""
        return math.isfinite(self.median)


def _check_confidence(confidence: Any) -> float:
    if isinstance(confidence, bool) or not isinstance(
            confidence, (int, float, np.floating)):
        raise TypeError(f"confidence must be a number in (0, 1), got "
                        f"{confidence!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(confidence)


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _values(values: Iterable[float], name: str) -> np.ndarray:
    try:
        array = np.asarray(list(values), dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape "
                         f"{array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: no values to summarise")
    return array


def normal_quantile(probability: float) -> float:
    """The standard normal quantile (``1.959964`` for ``0.975``).

    Args:
        probability: in ``(0, 1)``.

    Returns:
        ``z`` with ``P(Z <= z) = probability``.

    Raises:
        ValueError: for a probability outside ``(0, 1)``.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability!r}")
    return statistics.NormalDist().inv_cdf(probability)


def bootstrap_mean(values: Iterable[float], *,
                   confidence: float = CONFIDENCE,
                   resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """The percentile bootstrap interval of the mean of ``values``.

    ``resamples`` resamples of the values (with replacement, from
    ``numpy.random.default_rng(seed)``) give as many means; the interval is
    their ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles.
    The same values give the same interval, bit for bit, and it never leaves
    ``[min(values), max(values)]``. With one value, or any non-finite one,
    there is no interval (``low = high = NaN``, method :data:`NONE`); the
    estimate is the plain mean (NaN or infinite).

    Args:
        values: one value per seed.
        confidence: the two-sided level, in ``(0, 1)``.
        resamples: the number of bootstrap resamples.
        seed: the seed of the resampling generator.

    Returns:
        The :class:`Interval` (method :data:`BOOTSTRAP`, ``n`` the number of
        values).

    Raises:
        ValueError: if ``values`` is empty, ``confidence`` is outside
            ``(0, 1)`` or ``resamples`` is not positive.
        TypeError: if ``values`` are not numbers, or ``confidence``,
            ``resamples`` or ``seed`` have the wrong type.

    Example::

        bootstrap_mean([0.1, 0.97, 0.97])   # Interval(0.68, 0.1, 0.97, ...)
    """
    array = _values(values, "values")
    confidence = _check_confidence(confidence)
    resamples = _check_count(resamples, "resamples")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    with np.errstate(invalid="ignore"):  # inf - inf
        mean = float(np.mean(array))
    if array.size == 1 or not np.all(np.isfinite(array)):
        return Interval(mean, math.nan, math.nan, NONE, int(array.size))
    if np.all(array == array[0]):
        return Interval(mean, float(array[0]), float(array[0]), BOOTSTRAP,
                        int(array.size))
    generator = np.random.default_rng(seed)
    picks = generator.integers(0, array.size, size=(resamples, array.size))
    means = array[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    # Rounding of a mean of equal values must not step outside the data.
    low = float(np.clip(low, array.min(), array.max()))
    high = float(np.clip(high, array.min(), array.max()))
    return Interval(mean, low, high, BOOTSTRAP, int(array.size))


def wilson_interval(fraction: float, examples: int, *,
                    confidence: float = CONFIDENCE) -> Interval:
    """The Wilson score interval of a fraction measured on ``examples``.

    For ``p`` observed over ``n`` examples and ``z`` the normal quantile of
    ``(1 + confidence) / 2``: centre ``(p + z^2 / 2n) / (1 + z^2 / n)``,
    half-width ``z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)``. The
    bounds stay in ``[0, 1]``, also at ``p = 0`` and ``p = 1``.

    Args:
        fraction: the observed fraction (e.g. an accuracy), in ``[0, 1]``;
            NaN gives a NaN interval.
        examples: the number of test examples ``n``.
        confidence: the two-sided level, in ``(0, 1)``.

    Returns:
        The :class:`Interval` (estimate ``fraction``, method
        :data:`WILSON`, ``n = examples``).

    Raises:
        ValueError: if ``fraction`` is outside ``[0, 1]``, ``examples`` is
            not positive or ``confidence`` is outside ``(0, 1)``.
        TypeError: if ``examples`` is not an int or ``fraction`` not a
            number.
    """
    confidence = _check_confidence(confidence)
    examples = _check_count(examples, "examples")
    if isinstance(fraction, bool) or not isinstance(
            fraction, (int, float, np.floating, np.integer)):
        raise TypeError(f"fraction must be a number in [0, 1], got "
                        f"{fraction!r}")
    p = float(fraction)
    if math.isnan(p):
        return Interval(p, math.nan, math.nan, WILSON, examples)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    z = normal_quantile((1.0 + confidence) / 2.0)
    n = float(examples)
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / (
        denominator)
    # Exact at the ends: 0 of n has low 0, n of n has high 1 (no rounding).
    low = 0.0 if p == 0.0 else min(p, max(0.0, centre - half))
    high = 1.0 if p == 1.0 else max(p, min(1.0, centre + half))
    return Interval(p, low, high, WILSON, examples)


def mean_interval(values: Iterable[float], *, examples: int | None = None,
                  confidence: float = CONFIDENCE,
                  resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """The interval a report shows for one metric over seeds.

    Two or more values: :func:`bootstrap_mean`. One value with a known
    test-set size (``examples``; give it only for a fraction such as an
    accuracy): :func:`wilson_interval` over the test examples. One value
    otherwise: no interval (method :data:`NONE`).

    Args:
        values: one value per seed.
        examples: the test-set size behind one fraction, or ``None``.
        confidence: the two-sided level, in ``(0, 1)``.
        resamples: bootstrap resamples.
        seed: the seed of the bootstrap generator.

    Returns:
        The :class:`Interval`.

    Raises:
        ValueError, TypeError: as :func:`bootstrap_mean` and
            :func:`wilson_interval`.
    """
    array = _values(values, "values")
    if examples is not None:
        examples = _check_count(examples, "examples")
    if array.size == 1 and examples is not None and (
            math.isnan(array[0]) or 0.0 <= array[0] <= 1.0):
        return wilson_interval(float(array[0]), examples,
                               confidence=confidence)
    return bootstrap_mean(array, confidence=confidence, resamples=resamples,
                          seed=seed)


def thousands(count: int) -> str:
    """``count`` with a space between thousands (``"10 000"``)."""
    return f"{int(count):,}".replace(",", " ")


def describe_method(methods: Iterable[str], *,
                    examples: int | None = None,
                    confidence: float = CONFIDENCE,
                    resamples: int = RESAMPLES) -> str:
    """In words, the intervals of a table whose cells used ``methods``.

    Args:
        methods: the :attr:`Interval.method` of every cell.
        examples: the test-set size (named for Wilson intervals).
        confidence: the level the intervals were computed at.
        resamples: the number of bootstrap resamples.

    Returns:
        e.g. ``"intervals: 95 % bootstrap percentile over seeds (10 000
        resamples)"``; ``"intervals: none (one seed per cell and no
        test-set size)"`` when no cell has one.
    """
    methods = set(methods)
    level = f"{100 * confidence:g} %"
    parts = []
    if BOOTSTRAP in methods:
        parts.append(f"{level} bootstrap percentile interval of the mean "
                     f"over seeds ({thousands(resamples)} resamples)")
    if WILSON in methods:
        count = "the" if examples is None else f"the {examples}"
        parts.append(f"{level} Wilson score interval over {count} test "
                     "examples (cells with one seed)")
    if NONE in methods:
        parts.append("no interval where a cell has one seed and no test-set "
                     "size, or a non-finite value")
    if not parts:
        return "intervals: none"
    return "intervals: " + "; ".join(parts)


def paired_difference(a: Sequence[float], b: Sequence[float], *,
                      confidence: float = CONFIDENCE,
                      resamples: int = RESAMPLES,
                      seed: int = SEED) -> PairedDifference:
    """Compare two strategies applied to the same damaged models.

    ``a[i]`` and ``b[i]`` are the two strategies' results on model ``i``
    (the same damage, amount and seed). The comparison is on the per-model
    differences ``a[i] - b[i]``: their mean with its bootstrap interval
    (:func:`bootstrap_mean`), and how many models favour each side.

    Args:
        a: one value per model.
        b: one value per model, in the same order.
        confidence: the two-sided level, in ``(0, 1)``.
        resamples: bootstrap resamples.
        seed: the seed of the bootstrap generator.

    Returns:
        The :class:`PairedDifference`; ``holds`` when every difference has
        the same nonzero sign and the interval excludes 0 (with one model,
        or a non-finite difference, it never holds).

    Raises:
        ValueError: if ``a`` or ``b`` is empty or their lengths differ, or
            for a bad ``confidence`` / ``resamples``.
        TypeError: if the values are not numbers.
    """
    first = _values(a, "a")
    second = _values(b, "b")
    if first.size != second.size:
        raise ValueError(f"a and b must be paired (the same models): a has "
                         f"{first.size} values, b has {second.size}")
    with np.errstate(invalid="ignore"):
        differences = first - second
    interval = bootstrap_mean(differences, confidence=confidence,
                              resamples=resamples, seed=seed)
    a_better = int(np.sum(differences > 0))
    b_better = int(np.sum(differences < 0))
    ties = int(np.sum(differences == 0))
    same_sign = a_better == differences.size or b_better == differences.size
    excludes_zero = (interval.method == BOOTSTRAP
                     and (interval.low > 0 or interval.high < 0))
    return PairedDifference(tuple(float(d) for d in differences), interval,
                            a_better, b_better, ties,
                            bool(same_sign and excludes_zero))


def noise_floor(clean: float, examples: int,
                standard_errors: float = NOISE_STANDARD_ERRORS) -> float:
    """The test-set noise of a fraction: ``k * sqrt(p (1 - p) / n)``.

    Args:
        clean: the clean model's fraction ``p`` (e.g. its accuracy), in
            ``[0, 1]``.
        examples: the number of test examples ``n``.
        standard_errors: ``k``, the number of binomial standard errors.

    Returns:
        The smallest gap to the clean fraction that is not test noise.

    Raises:
        ValueError: if ``clean`` is outside ``[0, 1]`` or ``examples`` is not
            positive.
        TypeError: if ``examples`` is not an int.
    """
    examples = _check_count(examples, "examples")
    p = float(clean)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"clean must be a fraction in [0, 1], got {clean!r}")
    return float(standard_errors) * math.sqrt(p * (1.0 - p) / examples)


def recovery_ratio(clean: Any, damaged: Any, after: Any, *,
                   examples: int | None = None) -> Any:
    """``(after - damaged) / (clean - damaged)``, elementwise.

    1 means full recovery, 0 none, negative a further loss. The ratio is
    undefined (NaN) where the damage did not measurably change the metric:
    ``clean == damaged``, or, given the test-set size ``examples`` of a
    fraction such as accuracy, ``|clean - damaged|`` below
    :func:`noise_floor` (2 binomial standard errors of ``clean``), where the
    denominator is noise and the ratio any number.

    Args:
        clean: metric of the undamaged model (scalar or array).
        damaged: metric right after damage.
        after: metric after recovery.
        examples: the number of test examples the fractions were measured
            on; ``None``: only a zero gap is undefined.

    Returns:
        A float, or a float array of the broadcast shape.

    Raises:
        ValueError, TypeError: for a bad ``examples`` (see
            :func:`noise_floor`).
    """
    clean, damaged, after = (np.asarray(x, np.float64)
                             for x in (clean, damaged, after))
    gap = clean - damaged
    if examples is None:
        floor = np.zeros_like(clean)
        defined = gap != 0
    else:
        examples = _check_count(examples, "examples")
        p = np.clip(clean, 0.0, 1.0)
        floor = NOISE_STANDARD_ERRORS * np.sqrt(p * (1.0 - p) / examples)
        defined = (gap != 0) & (np.abs(gap) >= floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(defined, (after - damaged) / np.where(
            defined, gap, 1.0), np.nan)
    return float(ratio) if ratio.ndim == 0 else ratio


def censored_median(values: Iterable[float]) -> CensoredMedian:
    """The median of a count where NaN (or ``inf``) means "not reached".

    The values are sorted with "not reached" as ``+inf`` and the lower
    median is taken (the ``ceil(n / 2)``-th smallest), so the median is
    "not reached" (``inf``) exactly when fewer than half the models reached
    the level. Since a model reaching 99 % of clean has reached 95 % no
    later, the median of steps to 95 % never exceeds that of steps to 99 %.

    Args:
        values: one count per model; NaN or ``inf`` for not reached.

    Returns:
        The :class:`CensoredMedian`.

    Raises:
        ValueError: if ``values`` is empty or has a negative count.
        TypeError: if the values are not numbers.
    """
    array = _values(values, "values")
    if np.any(array < 0):
        raise ValueError(f"values must be non-negative counts (NaN for not "
                         f"reached), got {array[array < 0][0]!r}")
    censored = np.where(np.isnan(array), np.inf, array)
    ordered = np.sort(censored)
    median = float(ordered[(array.size + 1) // 2 - 1])
    return CensoredMedian(median, int(array.size),
                          int(np.sum(np.isfinite(censored))))


__all__ = ["BOOTSTRAP", "CONFIDENCE", "CensoredMedian", "Interval",
           "NOISE_STANDARD_ERRORS", "NONE", "PairedDifference", "RESAMPLES",
           "SEED", "WILSON", "bootstrap_mean", "censored_median",
           "describe_method", "mean_interval", "noise_floor",
           "normal_quantile", "paired_difference", "recovery_ratio",
           "thousands", "wilson_interval"]
