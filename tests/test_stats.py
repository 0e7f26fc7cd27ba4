"""The statistics module: intervals, paired differences, ratios, medians."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys

import numpy as np
import pytest

from recovjax import stats
from recovjax.stats import (CensoredMedian, Interval, bootstrap_mean,
                            censored_median, describe_method, mean_interval,
                            noise_floor, paired_difference, recovery_ratio,
                            wilson_interval)


def _wilson_by_formula(successes: int, n: int, confidence: float):
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n
                                           + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("successes", [0, 5, 10])
def test_wilson_matches_the_formula_and_stays_in_the_unit_interval(successes):
    interval = wilson_interval(successes / 10, 10)
    low, high = _wilson_by_formula(successes, 10, 0.95)
    assert interval.low == pytest.approx(max(low, 0.0), abs=1e-12)
    assert interval.high == pytest.approx(min(high, 1.0), abs=1e-12)
    assert 0.0 <= interval.low <= interval.estimate <= interval.high <= 1.0
    assert interval.method == stats.WILSON and interval.n == 10


def test_wilson_known_values():
    # 0 of 10 and 10 of 10 at 95 %: [0, 0.2775] and [0.7225, 1];
    # 5 of 10: 0.5 -+ 0.2366.
    assert wilson_interval(0.0, 10).low == 0.0
    assert wilson_interval(0.0, 10).high == pytest.approx(0.27753, abs=1e-5)
    assert wilson_interval(1.0, 10).low == pytest.approx(0.72247, abs=1e-5)
    assert wilson_interval(1.0, 10).high == 1.0
    five = wilson_interval(0.5, 10)
    assert five.low == pytest.approx(0.23659, abs=1e-5)
    assert five.high == pytest.approx(0.76341, abs=1e-5)
    # A higher level is wider.
    assert wilson_interval(0.5, 10, confidence=0.99).low < five.low


def test_bootstrap_is_deterministic_and_inside_the_data():
    values = [0.91, 0.95, 0.88, 0.97, 0.93]
    first = bootstrap_mean(values)
    assert first == bootstrap_mean(list(values))  # exact, bit for bit
    assert first.method == stats.BOOTSTRAP and first.n == 5
    assert min(values) <= first.low < first.estimate < first.high <= max(
        values)
    assert first.estimate == pytest.approx(np.mean(values), abs=1e-15)
    # The generator seed is what fixes it: another one moves the bounds.
    many = np.random.default_rng(3).random(40).tolist()
    assert bootstrap_mean(many, seed=1) != bootstrap_mean(many)
    assert bootstrap_mean(many) == bootstrap_mean(many)


def test_bimodal_seeds_give_an_interval_inside_the_unit_interval():
    interval = bootstrap_mean([0.1, 0.97, 0.97])
    assert 0.0 <= interval.low <= interval.high <= 1.0
    assert interval.low >= 0.1 and interval.high <= 0.97
    # The t-interval this replaces: 0.68 +- 1.2456, i.e. [-0.57, 1.93].
    half = 4.302652729749464 * np.std([0.1, 0.97, 0.97], ddof=1) / math.sqrt(3)
    assert 0.68 - half < 0 and 0.68 + half > 1


def test_bootstrap_edge_cases():
    assert bootstrap_mean([0.5, 0.5]) == Interval(0.5, 0.5, 0.5,
                                                  stats.BOOTSTRAP, 2)
    single = bootstrap_mean([0.4])
    assert single.estimate == 0.4 and math.isnan(single.low)
    assert single.method == stats.NONE
    diverged = bootstrap_mean([1.0, math.inf])
    assert diverged.estimate == math.inf and math.isnan(diverged.high)
    assert math.isnan(bootstrap_mean([1.0, math.nan]).estimate)


def test_mean_interval_chooses_the_method():
    assert mean_interval([0.9, 0.8]).method == stats.BOOTSTRAP
    assert mean_interval([0.9, 0.8], examples=100).method == stats.BOOTSTRAP
    assert mean_interval([0.9], examples=100) == wilson_interval(0.9, 100)
    assert mean_interval([0.9]).method == stats.NONE
    # A value that is no fraction gets no Wilson interval.
    assert mean_interval([12.0], examples=100).method == stats.NONE


def test_describe_method_says_which_interval():
    text = describe_method([stats.BOOTSTRAP])
    assert text == ("intervals: 95 % bootstrap percentile interval of the "
                    "mean over seeds (10 000 resamples)")
    assert "Wilson score interval over the 500 test examples" in (
        describe_method([stats.WILSON], examples=500))
    assert describe_method([]) == "intervals: none"


def test_paired_difference_signs_and_holds():
    a = [0.90, 0.92, 0.95]
    b = [0.80, 0.85, 0.90]
    result = paired_difference(a, b)
    assert result.differences == pytest.approx((0.1, 0.07, 0.05))
    assert result.interval.estimate == pytest.approx(0.22 / 3)
    assert (result.a_better, result.b_better, result.ties) == (3, 0, 0)
    assert result.holds and result.interval.low > 0
    reverse = paired_difference(b, a)
    assert reverse.holds and reverse.b_better == 3 and reverse.interval.high < 0
    mixed = paired_difference([0.9, 0.8, 0.95], [0.85, 0.85, 0.9])
    assert (mixed.a_better, mixed.b_better) == (2, 1)
    assert not mixed.holds
    tied = paired_difference([0.5, 0.6], [0.5, 0.6])
    assert tied.ties == 2 and not tied.holds
    assert not paired_difference([0.9], [0.1]).holds  # one model: no interval


def test_noise_floor_and_recovery_ratio_within_noise():
    floor = noise_floor(0.97, 1000)
    assert floor == pytest.approx(2 * math.sqrt(0.97 * 0.03 / 1000))
    # A gap of 0.3 pp is below 2 SE (1.08 pp) on 1000 examples: undefined.
    assert math.isnan(recovery_ratio(0.97, 0.967, 0.95, examples=1000))
    # Without the test-set size only a zero gap is undefined.
    assert recovery_ratio(0.97, 0.967, 0.968) == pytest.approx(1 / 3)
    assert math.isnan(recovery_ratio(0.97, 0.97, 0.95))
    # Outside the noise it is defined, also for a gap right at the floor.
    assert recovery_ratio(0.97, 0.5, 0.735, examples=1000) == pytest.approx(
        0.5)
    at_floor = 0.97 - floor
    assert recovery_ratio(0.97, at_floor, 0.97, examples=1000) == (
        pytest.approx(1.0))
    ratios = recovery_ratio(0.97, np.asarray([0.969, 0.5]),
                            np.asarray([0.9, 0.97]), examples=1000)
    assert math.isnan(ratios[0]) and ratios[1] == pytest.approx(1.0)


def test_censored_median_counts_the_models_that_did_not_reach():
    assert censored_median([10, 20, math.nan]) == CensoredMedian(20.0, 3, 2)
    not_reached = censored_median([0, math.nan, math.nan])
    assert not not_reached.is_reached and not_reached.reached == 1
    # Exactly half reached (even n): the lower median is a number.
    assert censored_median([10, 30, math.nan, math.inf]).median == 30.0
    assert censored_median([5.0]).median == 5.0


def test_censored_medians_of_95_never_exceed_99():
    # The old report took medians over the models that reached each level:
    # 95 %: median of (0, 10, 12, 14, 16, 18) = 13; 99 %: median of (0,) = 0.
    steps_95 = [0, 10, 12, 14, 16, 18, math.nan, math.nan, math.nan]
    steps_99 = [0] + [math.nan] * 8
    old_95 = np.median([v for v in steps_95 if not math.isnan(v)])
    old_99 = np.median([v for v in steps_99 if not math.isnan(v)])
    assert old_95 > old_99  # the contradiction
    m95, m99 = censored_median(steps_95), censored_median(steps_99)
    assert m95 == CensoredMedian(16.0, 9, 6)
    assert m99.median == math.inf and m99.reached == 1
    assert m95.median <= m99.median
    # Monotone whenever each model reaches 95 % no later than 99 %.
    generator = np.random.default_rng(0)
    for _ in range(200):
        first = generator.integers(0, 50, size=7).astype(float)
        later = first + generator.integers(0, 20, size=7)
        first[generator.random(7) < 0.2] = math.nan
        later[np.isnan(first) | (generator.random(7) < 0.4)] = math.nan
        assert (censored_median(first).median
                <= censored_median(later).median)


@pytest.mark.parametrize("call, error, name", [
    (lambda: bootstrap_mean([]), ValueError, "values"),
    (lambda: bootstrap_mean([1.0], confidence=1.5), ValueError, "confidence"),
    (lambda: bootstrap_mean([1.0], confidence="95"), TypeError, "confidence"),
    (lambda: bootstrap_mean([1.0, 2.0], resamples=0), ValueError,
     "resamples"),
    (lambda: bootstrap_mean(["a"]), TypeError, "values"),
    (lambda: bootstrap_mean([[1.0, 2.0]]), ValueError, "values"),
    (lambda: wilson_interval(0.5, 0), ValueError, "examples"),
    (lambda: wilson_interval(0.5, -3), ValueError, "examples"),
    (lambda: wilson_interval(0.5, 10.0), TypeError, "examples"),
    (lambda: wilson_interval(1.5, 10), ValueError, "fraction"),
    (lambda: wilson_interval(0.5, 10, confidence=0.0), ValueError,
     "confidence"),
    (lambda: mean_interval([], examples=10), ValueError, "values"),
    (lambda: mean_interval([0.5], examples=0), ValueError, "examples"),
    (lambda: paired_difference([1.0, 2.0], [1.0]), ValueError, "a and b"),
    (lambda: paired_difference([], [1.0]), ValueError, "a is empty"),
    (lambda: paired_difference([1.0], [1.0], confidence=-1), ValueError,
     "confidence"),
    (lambda: noise_floor(0.9, 0), ValueError, "examples"),
    (lambda: noise_floor(1.9, 10), ValueError, "clean"),
    (lambda: recovery_ratio(0.9, 0.5, 0.8, examples=0), ValueError,
     "examples"),
    (lambda: censored_median([]), ValueError, "values"),
    (lambda: censored_median([-1.0]), ValueError, "values"),
    (lambda: stats.normal_quantile(1.0), ValueError, "probability"),
])
def test_bad_inputs_name_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_the_module_does_not_import_jax():
    # Importing the package imports jax; load the file on its own instead.
    code = ("import importlib.util, sys; spec = importlib.util."
            "spec_from_file_location('s', sys.argv[1]); module = importlib."
            "util.module_from_spec(spec); spec.loader.exec_module(module); "
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, stats.__file__],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
