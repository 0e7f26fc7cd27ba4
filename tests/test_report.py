"""The report's headline metric: accuracy for classifiers, perplexity for LMs.

Rows are built by hand (no training); the expected texts of the accuracy
reports were written by ``write_report`` before it learned other metrics.
"""

from __future__ import annotations

import json
import math

import pytest

from recovjax.report import (ACCURACY, PERPLEXITY, best_strategies,
                             headline_metric, plot_sensitivity,
                             sensitivity_table, write_report)
from recovjax.results import make_row

PLOTS = ("recovery_curves.png", "recovery_heatmap.png")


def _lm_rows() -> list[dict]:
    """A tiny language-model run: perplexity, token accuracy and loss rows.

    Clean perplexity 10; damaged ``zero`` at 0.25 (12, 14: mean 13) and 0.5
    (30, 34: mean 32) over two seeds; ``finetune`` curves at steps 0, 10, 20
    ending at 10.3 and 12.2; ``distill`` (one point) one below damaged, with
    the better token accuracy.
    """
    rows = []

    def add(perplexity, accuracy, **where):
        rows.append(make_row(metric="perplexity", value=perplexity, **where))
        rows.append(make_row(metric="accuracy", value=accuracy, **where))
        rows.append(make_row(metric="loss", value=math.log(perplexity),
                             **where))

    add(10.0, 0.40, damage="none", ratio=0.0, seed=0, stage="clean")
    for ratio, values in {0.25: (12.0, 14.0), 0.5: (30.0, 34.0)}.items():
        for seed, value in enumerate(values):
            add(value, 0.3 - ratio / 2, damage="zero", ratio=ratio, seed=seed,
                stage="damaged")
            for step, left in ((0, 1.0), (10, 0.5), (20, 0.1)):
                add(10.0 + left * (value - 10.0), 0.35, damage="zero",
                    ratio=ratio, seed=seed, stage="recovered/finetune",
                    step=step)
            add(value - 1.0, 0.45, damage="zero", ratio=ratio, seed=seed,
                stage="recovered/distill")
    return rows


def _accuracy_rows() -> list[dict]:
    """A classifier run: two damage kinds, curves, one-shot restore, measures."""
    rows = [make_row(damage="none", ratio=0.0, seed=0, stage="clean",
                     metric="accuracy", value=0.969),
            make_row(damage="none", ratio=0.0, seed=0, stage="clean",
                     metric="loss", value=0.1)]
    damaged = {("zero", 0.25): (0.81, 0.79), ("zero", 0.5): (0.42, 0.38),
               ("noise", 0.1): (0.9, 0.88), ("noise", 0.2): (0.6, 0.64)}
    for (kind, ratio), values in damaged.items():
        for seed, value in enumerate(values):
            where = dict(damage=kind, ratio=ratio, seed=seed)
            rows.append(make_row(stage="damaged", metric="accuracy",
                                 value=value, **where))
            for step, gain in ((0, 0.0), (10, 0.05), (20, 0.08)):
                rows.append(make_row(stage="recovered/finetune",
                                     metric="accuracy", value=value + gain,
                                     step=step, **where))
            rows.append(make_row(stage="recovered/restore_entries",
                                 metric="accuracy", value=0.969, **where))
            rows.append(make_row(stage="recovered/finetune", step=20,
                                 metric="recovery_ratio",
                                 value=0.5 + seed / 10, **where))
            rows.append(make_row(stage="recovered/finetune", step=20,
                                 metric="steps_to_95",
                                 value=math.nan if seed else 10.0, **where))
    return rows


COSTS = {"recovery": [
    {"damage": "zero", "strategy": "finetune", "models": 4, "seconds": 1.5,
     "flops_per_model": 4e10, "labelled_samples": 2000,
     "unlabelled_samples": 0, "trainable_params": 44426, "bytes_read": 0,
     "peak_rss_mb": 300},
    {"damage": "zero", "strategy": "restore_entries", "models": 4,
     "seconds": 0.5, "flops_per_model": 0, "labelled_samples": 0,
     "unlabelled_samples": 0, "trainable_params": 0, "bytes_read": 174546,
     "peak_rss_mb": 310},
    {"damage": "noise", "strategy": "finetune", "models": 4, "seconds": 1.0,
     "flops_per_model": 4e10, "labelled_samples": 2000,
     "unlabelled_samples": 0, "trainable_params": 44426, "bytes_read": 0,
     "peak_rss_mb": 300}]}

# write_report(run, _accuracy_rows(), title="baseline") with COSTS: intervals
# from recovjax.stats, checked by hand (two seeds: the bootstrap interval of
# the mean is [min, max]; restore_entries ties at 96.90 on every seed).
ACCURACY_REPORT = """\
# baseline

Clean (pretrained) test accuracy: **96.90 %**.

## Accuracy (mean over seeds [95 % interval])

intervals: 95 % bootstrap percentile interval of the mean over seeds (10 000 resamples).

| damage | amount | n | damaged acc. (%) | finetune (%) | restore_entries (%) |
|---|---|---|---|---|---|
| zero | 0.25 | 2 | 80.00 [79.00, 81.00] | 88.00 [87.00, 89.00] | 96.90 [96.90, 96.90] |
| zero | 0.5 | 2 | 40.00 [38.00, 42.00] | 48.00 [46.00, 50.00] | 96.90 [96.90, 96.90] |
| noise | 0.1 | 2 | 89.00 [88.00, 90.00] | 97.00 [96.00, 98.00] | 96.90 [96.90, 96.90] |
| noise | 0.2 | 2 | 62.00 [60.00, 64.00] | 70.00 [68.00, 72.00] | 96.90 [96.90, 96.90] |

## Robustness curve summary

| damage | area under accuracy-vs-amount (mean acc.) | amount where accuracy < 0.5 |
|---|---|---|
| zero | 60.00 % | 0.438 |
| noise | 75.50 % | not reached |

## Paired comparisons

For each damage kind and amount, the best strategy (best mean accuracy) against each other strategy on the same damaged models (same seed): the mean of the per-model differences in pp (positive: the best is better) with its 95 % bootstrap percentile interval (10 000 resamples), and how many seeds favour each side. ✓: the difference holds across seeds (every seed favours the best and the interval excludes 0).

| damage | amount | best | compared with | advantage of best (pp) | seeds: best better / other better / tied | holds across seeds |
|---|---|---|---|---|---|---|
| zero | 0.25 | restore_entries | finetune | 8.90 [7.90, 9.90] | 2 / 0 / 0 | ✓ |
| zero | 0.5 | restore_entries | finetune | 48.90 [46.90, 50.90] | 2 / 0 / 0 | ✓ |
| noise | 0.1 | finetune | restore_entries | 0.10 [-0.90, 1.10] | 1 / 1 / 0 |  |
| noise | 0.2 | restore_entries | finetune | 26.90 [24.90, 28.90] | 2 / 0 / 0 | ✓ |

## Recovery

Recovery ratio (after − damaged) / (clean − damaged), computed per model (seed) from the accuracy rows, then the mean over the models where it is defined, with its 95 % bootstrap interval and how many models are defined. The noise floor is unknown (the results record no test-set size, test_examples): the ratio is computed wherever the gap clean − damaged is nonzero. Steps to X % of clean: per model, the first evaluated step reaching X % of the clean value; the median is over all models, those that never reach it counted as +∞, so it is "not reached" when fewer than half reach it.

| damage | amount | strategy | recovery ratio | steps to 95 % of clean | steps to 99 % of clean |
|---|---|---|---|---|---|
| zero | 0.25 | finetune | 0.475 [0.447, 0.503] (2/2 defined) | 10 (median of 2; 1 reached) | n/a |
| zero | 0.25 | restore_entries | 1.000 [1.000, 1.000] (2/2 defined) | 0 (median of 2; 2 reached) | 0 (median of 2; 2 reached) |
| zero | 0.5 | finetune | 0.141 [0.136, 0.146] (2/2 defined) | 10 (median of 2; 1 reached) | n/a |
| zero | 0.5 | restore_entries | 1.000 [1.000, 1.000] (2/2 defined) | 0 (median of 2; 2 reached) | 0 (median of 2; 2 reached) |
| noise | 0.1 | finetune | 1.029 [0.899, 1.159] (2/2 defined) | 10 (median of 2; 1 reached) | n/a |
| noise | 0.1 | restore_entries | 1.000 [1.000, 1.000] (2/2 defined) | 0 (median of 2; 2 reached) | 0 (median of 2; 2 reached) |
| noise | 0.2 | finetune | 0.230 [0.217, 0.243] (2/2 defined) | 10 (median of 2; 1 reached) | n/a |
| noise | 0.2 | restore_entries | 1.000 [1.000, 1.000] (2/2 defined) | 0 (median of 2; 2 reached) | 0 (median of 2; 2 reached) |

## Cost of recovery

Per model: wall time (compilation included), FLOPs of the recovery itself (XLA's cost analysis of the lowered program that ran, every loop body counted per iteration, the damage and the curve evaluations left out), samples read with and without labels, trainable parameters, bytes read from the checkpoint; peak memory of the process.

| damage | strategy | models | wall time per model (s) | GFLOP per model | labelled / unlabelled samples | trainable parameters | bytes read from checkpoint | peak RSS (MiB) |
|---|---|---|---|---|---|---|---|---|
| zero | finetune | 4 | 0.375 | 40.000 | 2,000 / 0 | 44,426 | 0 | 300 |
| zero | restore_entries | 4 | 0.125 | 0.000 | 0 / 0 | 0 | 174,546 | 310 |
| noise | finetune | 4 | 0.250 | 40.000 | 2,000 / 0 | 44,426 | 0 | 300 |

## Cost and recovery (Pareto frontier)

Every strategy (and budget) at every damage kind and amount, its accuracy after recovery against its cost (GFLOP per model), next to the damaged model itself, with no recovery at no cost (`(no recovery)`). A strategy is dominated when another costs no more and recovers at least as well on the mean over seeds (better in one of the two); `recovjax compare RUN_DIR --budget X` names the best one under a budget, with its paired difference to the runner-up.

| damage | amount | strategy | GFLOP per model | acc. (%) | frontier |
|---|---|---|---|---|---|
| zero | 0.25 | (no recovery) | 0 | 80.00 [79.00, 81.00] | dominated by restore_entries |
| zero | 0.25 | restore_entries | 0 | 96.90 [96.90, 96.90] | ✓ |
| zero | 0.25 | finetune | 40 | 88.00 [87.00, 89.00] | dominated by restore_entries |
| zero | 0.5 | (no recovery) | 0 | 40.00 [38.00, 42.00] | dominated by restore_entries |
| zero | 0.5 | restore_entries | 0 | 96.90 [96.90, 96.90] | ✓ |
| zero | 0.5 | finetune | 40 | 48.00 [46.00, 50.00] | dominated by restore_entries |
| noise | 0.1 | (no recovery) | 0 | 89.00 [88.00, 90.00] | ✓ |
| noise | 0.1 | finetune | 40 | 97.00 [96.00, 98.00] | ✓ |
| noise | 0.2 | (no recovery) | 0 | 62.00 [60.00, 64.00] | ✓ |
| noise | 0.2 | finetune | 40 | 70.00 [68.00, 72.00] | ✓ |

![Cost and recovery](frontier.png)

## Accuracy vs damage amount

![Accuracy vs damage amount](accuracy_vs_ratio.png)

## Recovery curves

![Recovery curves](recovery_curves.png)

## Damage amount x recovery steps

![Damage amount x recovery steps](recovery_heatmap.png)
"""

# write_report(run, _lm_rows(), title="lm", metric="accuracy"): the
# token-accuracy report (no test-set size: the noise floor is unknown).
LM_ACCURACY_REPORT = """\
# lm

Clean (pretrained) test accuracy: **40.00 %**.

## Accuracy (mean over seeds [95 % interval])

intervals: 95 % bootstrap percentile interval of the mean over seeds (10 000 resamples).

| damage | amount | n | damaged acc. (%) | distill (%) | finetune (%) |
|---|---|---|---|---|---|
| zero | 0.25 | 2 | 17.50 [17.50, 17.50] | 45.00 [45.00, 45.00] | 35.00 [35.00, 35.00] |
| zero | 0.5 | 2 | 5.00 [5.00, 5.00] | 45.00 [45.00, 45.00] | 35.00 [35.00, 35.00] |

## Robustness curve summary

| damage | area under accuracy-vs-amount (mean acc.) | amount where accuracy < 0.5 |
|---|---|---|
| zero | 11.25 % | 0.25 |

## Paired comparisons

For each damage kind and amount, the best strategy (best mean accuracy) against each other strategy on the same damaged models (same seed): the mean of the per-model differences in pp (positive: the best is better) with its 95 % bootstrap percentile interval (10 000 resamples), and how many seeds favour each side. ✓: the difference holds across seeds (every seed favours the best and the interval excludes 0).

| damage | amount | best | compared with | advantage of best (pp) | seeds: best better / other better / tied | holds across seeds |
|---|---|---|---|---|---|---|
| zero | 0.25 | distill | finetune | 10.00 [10.00, 10.00] | 2 / 0 / 0 | ✓ |
| zero | 0.5 | distill | finetune | 10.00 [10.00, 10.00] | 2 / 0 / 0 | ✓ |

## Recovery

Recovery ratio (after − damaged) / (clean − damaged), computed per model (seed) from the accuracy rows, then the mean over the models where it is defined, with its 95 % bootstrap interval and how many models are defined. The noise floor is unknown (the results record no test-set size, test_examples): the ratio is computed wherever the gap clean − damaged is nonzero. Steps to X % of clean: per model, the first evaluated step reaching X % of the clean value; the median is over all models, those that never reach it counted as +∞, so it is "not reached" when fewer than half reach it.

| damage | amount | strategy | recovery ratio | steps to 95 % of clean | steps to 99 % of clean |
|---|---|---|---|---|---|
| zero | 0.25 | distill | 1.222 [1.222, 1.222] (2/2 defined) | 0 (median of 2; 2 reached) | 0 (median of 2; 2 reached) |
| zero | 0.25 | finetune | 0.778 [0.778, 0.778] (2/2 defined) | not reached (median of 2; 0 reached) | not reached (median of 2; 0 reached) |
| zero | 0.5 | distill | 1.143 [1.143, 1.143] (2/2 defined) | 0 (median of 2; 2 reached) | 0 (median of 2; 2 reached) |
| zero | 0.5 | finetune | 0.857 [0.857, 0.857] (2/2 defined) | not reached (median of 2; 0 reached) | not reached (median of 2; 0 reached) |

## Accuracy vs damage amount

![Accuracy vs damage amount](accuracy_vs_ratio.png)

## Recovery curves

![Recovery curves](recovery_curves.png)

## Damage amount x recovery steps

![Damage amount x recovery steps](recovery_heatmap.png)
"""


def _lines(report) -> list[str]:
    return report.read_text().splitlines()


def _line(report, start: str) -> str:
    found = [line for line in _lines(report) if line.startswith(start)]
    assert len(found) == 1, (start, found)
    return found[0]


def _summary_line(report, start: str) -> str:
    """The line of the metric table (the first section) starting so."""
    lines = _lines(report)
    first = next(i for i, line in enumerate(lines)
                 if line.startswith("| damage | amount | n |"))
    end = lines.index("", first)
    found = [line for line in lines[first:end] if line.startswith(start)]
    assert len(found) == 1, (start, found)
    return found[0]


def _crossings(report) -> dict[str, str]:
    """``{damage: amount-at-threshold cell}`` of the curve summary."""
    lines = _lines(report)
    start = lines.index("## Robustness curve summary") + 4
    out = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        out[cells[0]] = cells[2]
    return out


def test_accuracy_report_text(tmp_path):
    (tmp_path / "costs.json").write_text(json.dumps(COSTS))
    report = write_report(tmp_path, _accuracy_rows(), title="baseline")
    assert report.read_text() == ACCURACY_REPORT
    for name in ("accuracy_vs_ratio.png",) + PLOTS:
        assert (tmp_path / name).is_file(), name


def test_accuracy_is_inferred_without_perplexity_rows():
    assert headline_metric(_accuracy_rows()) == ACCURACY
    assert headline_metric([]) == ACCURACY


def test_language_model_run_reports_perplexity(tmp_path):
    rows = _lm_rows()
    assert headline_metric(rows) == PERPLEXITY
    report = write_report(tmp_path, rows, title="lm")
    headline = _line(report, "Clean (pretrained)")
    assert headline == "Clean (pretrained) test perplexity: **10.00**."
    assert "%" not in headline
    assert "## Perplexity (mean over seeds [95 % interval])" in _lines(report)
    assert _line(report, "| damage | amount | n |") == (
        "| damage | amount | n | damaged perplexity | distill | finetune |")
    # Means of the final rows: 13 [12, 14] (two seeds: [min, max]), and
    # 10 + 0.1 * (value - 10) at step 20.
    assert _summary_line(report, "| zero | 0.25 |") == (
        "| zero | 0.25 | 2 | 13.00 [12.00, 14.00] | 12.00 [11.00, 13.00] | "
        "10.30 [10.20, 10.40] |")
    assert _summary_line(report, "| zero | 0.5 |") == (
        "| zero | 0.5 | 2 | 32.00 [30.00, 34.00] | 31.00 [29.00, 33.00] | "
        "12.20 [12.00, 12.40] |")
    # No binomial noise model for perplexity, and the report says so.
    assert any("Perplexity has no binomial noise model" in line
               for line in _lines(report))
    # Trapezoid of (13, 32) over [0.25, 0.5], divided by the width.
    assert _line(report, "| zero | 22.50 |")
    assert "![Perplexity vs damage amount](perplexity_vs_ratio.png)" in (
        _lines(report))
    assert (tmp_path / "perplexity_vs_ratio.png").is_file()
    assert not (tmp_path / "accuracy_vs_ratio.png").exists()
    for name in PLOTS:
        assert (tmp_path / name).is_file(), name
        assert f"({name})" in report.read_text()


@pytest.mark.parametrize("threshold, expected", [
    # clean / 0.5 = 20 lies between the means 13 (0.25) and 32 (0.5):
    # 0.25 + (20 - 13) / (32 - 13) * 0.25 = 0.3421...
    (0.5, "0.342"),
    # clean / 0.9 = 11.1: already exceeded at the first amount.
    (0.9, "0.25"),
    # clean / 0.1 = 100: never exceeded.
    (0.1, "not reached"),
])
def test_lower_is_better_threshold_is_a_fraction_of_clean(tmp_path, threshold,
                                                          expected):
    report = write_report(tmp_path, _lm_rows(), threshold=threshold)
    assert _line(report, "| damage | area under") == (
        "| damage | area under perplexity-vs-amount (mean perplexity) | "
        f"amount where perplexity > clean / {threshold:g} |")
    assert _crossings(report) == {"zero": expected}


def test_higher_is_better_threshold_stays_absolute(tmp_path):
    # Means 0.8 and 0.4 at 0.25 and 0.5: 0.6 is crossed at 0.375; for the
    # lower-is-better rule (0.969 / 0.6 > 1) it would never be.
    report = write_report(tmp_path, _accuracy_rows(), threshold=0.6)
    assert _line(report, "| damage | area under").endswith(
        "| amount where accuracy < 0.6 |")
    assert _crossings(report)["zero"] == "0.375"


def test_best_strategy_follows_the_direction():
    rows = _lm_rows()
    # Final perplexities: finetune 11.25, distill 21.5; token accuracies:
    # finetune 0.35, distill 0.45.
    assert best_strategies(rows, PERPLEXITY) == {"zero": "finetune"}
    assert best_strategies(rows, ACCURACY) == {"zero": "distill"}
    assert best_strategies(rows, headline_metric(rows)) == {"zero": "finetune"}
    assert PERPLEXITY.best({"a": 3.0, "b": 2.0, "c": math.inf}) == "b"
    assert ACCURACY.best({"a": 0.3, "b": 0.2, "c": math.nan}) == "a"
    assert PERPLEXITY.best({"a": math.inf}) is None


def test_explicit_accuracy_on_a_language_model_run(tmp_path):
    rows = _lm_rows()
    report = write_report(tmp_path, rows, title="lm", metric="accuracy")
    assert report.read_text() == LM_ACCURACY_REPORT
    assert (tmp_path / "accuracy_vs_ratio.png").is_file()
    assert not (tmp_path / "perplexity_vs_ratio.png").exists()


def test_other_metric_with_its_direction(tmp_path):
    report = write_report(tmp_path, _lm_rows(), metric="loss")
    assert _line(report, "Clean (pretrained)") == (
        f"Clean (pretrained) test loss: **{math.log(10):.4g}**.")
    assert (tmp_path / "loss_vs_ratio.png").is_file()
    assert _line(report, "| damage | area under").endswith(
        "| amount where loss > clean / 0.5 |")
    # Said explicitly, the direction wins: a larger loss "better".
    upward = headline_metric(_lm_rows(), "loss", higher_is_better=True)
    assert upward.higher_is_better and upward.name == "loss"


def test_diverged_perplexity_is_shown_as_inf(tmp_path):
    rows = _lm_rows()
    for row in rows:
        if (row["stage"], row["ratio"], row["metric"]) == (
                "damaged", 0.25, "perplexity"):
            row["value"] = math.inf
    report = write_report(tmp_path, rows)
    assert _summary_line(report, "| zero | 0.25 |").startswith(
        "| zero | 0.25 | 2 | inf |")
    assert _crossings(report) == {"zero": "0.25"}
    assert (tmp_path / "perplexity_vs_ratio.png").is_file()


def test_unknown_metric_is_refused_with_the_metrics_present(tmp_path):
    with pytest.raises(ValueError, match=r"^metric: .*'bleu'.*their metrics: "
                       "accuracy, loss, perplexity$"):
        write_report(tmp_path, _lm_rows(), metric="bleu",
                     higher_is_better=True)
    with pytest.raises(ValueError, match=r"^metric: .*'perplexity'.*their "
                       "metrics: accuracy, loss$"):
        write_report(tmp_path, _accuracy_rows(), metric="perplexity")
    with pytest.raises(ValueError, match="their metrics: none"):
        write_report(tmp_path, [], metric="accuracy")
    assert not (tmp_path / "report.md").exists()


def test_unknown_direction_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^higher_is_better: .*'bleu'.*say "
                       "whether a larger bleu is better$"):
        write_report(tmp_path, _lm_rows(), metric="bleu")
    with pytest.raises(TypeError, match="higher_is_better must be a bool"):
        write_report(tmp_path, _lm_rows(), higher_is_better="no")
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("threshold", [0.0, -0.5, math.inf, math.nan])
def test_lower_is_better_threshold_must_be_positive(tmp_path, threshold):
    with pytest.raises(ValueError, match=r"^threshold: .*perplexity"):
        write_report(tmp_path, _lm_rows(), threshold=threshold)
    assert not (tmp_path / "report.md").exists()


SENSITIVITY = "## Sensitivity (layer x amount)"


def _sensitivity_rows() -> list[dict]:
    """A sensitivity map: 2 layers x 2 amounts x 2 seeds and the clean model.

    Means over the seeds: Dense_10 at 0.5: 0.9, at 1.0: 0.7; Dense_2 at 0.5:
    0.6, at 1.0: 0.25. Listed ``Dense_10`` first: the table sorts naturally.
    """
    rows = [make_row(damage="none", ratio=0.0, seed=0, stage="clean",
                     metric="accuracy", value=0.95)]
    values = {("Dense_10", 0.5): (0.92, 0.88), ("Dense_10", 1.0): (0.8, 0.6),
              ("Dense_2", 0.5): (0.65, 0.55), ("Dense_2", 1.0): (0.3, 0.2)}
    for (layer, amount), pair in values.items():
        for seed, value in enumerate(pair):
            rows.append(make_row(damage="gaussian_noise", layer=layer,
                                 ratio=amount, seed=seed, stage="damaged",
                                 metric="accuracy", value=value))
    return rows


def _section(report) -> list[str]:
    lines = _lines(report)
    start = lines.index(SENSITIVITY)
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def test_sensitivity_map_gets_its_own_section(tmp_path):
    rows = _sensitivity_rows()
    report = write_report(tmp_path, rows, title="map")
    section = _section(report)
    assert section[:3] == [SENSITIVITY, "", (
        "Mean test accuracy (%) over seeds with one layer damaged at a time "
        "(a line per layer, a column per damage amount).")]
    table = [line for line in section if line.startswith("|")]
    assert table == ["| damage | layer | 0.5 | 1 |", "|---|---|---|---|",
                     "| gaussian_noise | Dense_2 | 60.00 | 25.00 |",
                     "| gaussian_noise | Dense_10 | 90.00 | 70.00 |"]
    assert "![Sensitivity (layer x amount)](sensitivity.png)" in section
    assert (tmp_path / "sensitivity.png").stat().st_size > 0
    assert table[2:] == sensitivity_table(rows, ACCURACY)[2:]
    # The clean model is reported; no whole-model damage, so no summaries
    # of it and no whole-model plots.
    text = report.read_text()
    assert "Clean (pretrained) test accuracy: **95.00 %**." in text
    assert "## Accuracy (mean" not in text
    assert "## Robustness curve summary" not in text
    assert not (tmp_path / "accuracy_vs_ratio.png").exists()


def test_per_layer_rows_stay_out_of_the_whole_model_sections(tmp_path):
    (tmp_path / "costs.json").write_text(json.dumps(COSTS))
    # The same damage kinds and amounts, one layer at a time: the
    # whole-model tables must not change.
    layered = [make_row(damage=kind, layer="Conv_0", ratio=ratio, seed=seed,
                        stage="damaged", metric="accuracy", value=0.0)
               for kind, ratio in (("zero", 0.25), ("noise", 0.1))
               for seed in range(2)]
    report = write_report(tmp_path, _accuracy_rows() + layered,
                          title="baseline")
    text = report.read_text()
    before, _, after = text.partition(SENSITIVITY + "\n")
    whole = ACCURACY_REPORT.split("## Accuracy vs damage amount")
    assert before == whole[0]
    assert after.endswith("## Accuracy vs damage amount" + whole[1])
    # One table per damage kind, in the order the kinds appear.
    tables = [
        "| damage | layer | 0.25 |", "|---|---|---|",
        "| zero | Conv_0 | 0.00 |", "",
        "| damage | layer | 0.1 |", "|---|---|---|",
        "| noise | Conv_0 | 0.00 |"]
    assert sensitivity_table(layered, ACCURACY) == tables
    assert _section(report)[4:] == tables + [
        "", "![Sensitivity (layer x amount)](sensitivity.png)", ""]


def test_no_layer_rows_no_sensitivity_section(tmp_path):
    report = write_report(tmp_path, _accuracy_rows(), title="baseline")
    assert SENSITIVITY not in _lines(report)
    assert not (tmp_path / "sensitivity.png").exists()
    assert sensitivity_table(_accuracy_rows(), ACCURACY) == []
    assert plot_sensitivity(_accuracy_rows(), tmp_path / "s.png",
                            ACCURACY) is None
    assert not (tmp_path / "s.png").exists()
    # Rows without a layer key at all (built by hand) are whole-model rows.
    bare = [{k: v for k, v in row.items() if k != "layer"}
            for row in _accuracy_rows()]
    (tmp_path / "costs.json").write_text(json.dumps(COSTS))
    assert write_report(tmp_path, bare, title="baseline").read_text() == (
        ACCURACY_REPORT)


def test_sensitivity_of_a_lower_is_better_metric(tmp_path):
    rows = [make_row(damage="none", ratio=0.0, seed=0, stage="clean",
                     metric="perplexity", value=10.0)]
    for layer, values in (("block_0", (12.0, 14.0)),
                          ("block_1", (math.inf, 30.0))):
        for seed, value in enumerate(values):
            rows.append(make_row(damage="zero", layer=layer, ratio=0.5,
                                 seed=seed, stage="damaged",
                                 metric="perplexity", value=value))
    report = write_report(tmp_path, rows)
    table = [line for line in _section(report) if line.startswith("|")]
    assert table[2:] == ["| zero | block_0 | 13.00 |",
                         "| zero | block_1 | inf |"]
    assert (tmp_path / "sensitivity.png").is_file()


# Intervals, paired comparisons, recovery ratios and steps (recovjax.stats).

def _demo_like_rows() -> list[dict]:
    """Three seeds of a LeNet-like run on 1000 test examples.

    ``bit_flip`` at 1e-6 barely moves accuracy (within test noise of the
    clean 97 %); at 1e-5 one seed collapses to 10 % (bimodal seeds) and at
    3e-5 every seed is hit. ``finetune`` recovers, ``restore`` restores the
    clean value; the steps to 95 / 99 % are those where the old report
    contradicted itself (95 %: median over the 6 that reached it; 99 %: the
    one that did).
    """
    clean = 0.97
    rows = [make_row(damage="none", ratio=0.0, seed=0, stage="clean",
                     metric="accuracy", value=clean)]
    damaged = {1e-6: (0.968, 0.969, 0.971), 1e-5: (0.10, 0.96, 0.965),
               3e-5: (0.30, 0.40, 0.35)}
    for ratio, values in damaged.items():
        for seed, value in enumerate(values):
            where = dict(damage="bit_flip", ratio=ratio, seed=seed)
            rows.append(make_row(stage="damaged", metric="accuracy",
                                 value=value, **where))
            for step, share in ((0, 0.0), (10, 0.5), (20, 0.9)):
                rows.append(make_row(
                    stage="recovered/finetune", metric="accuracy", step=step,
                    value=value + share * (clean - value), **where))
            rows.append(make_row(stage="recovered/restore", metric="accuracy",
                                 value=clean - 0.001 * seed, **where))
    return rows


def _part(report, heading: str) -> list[str]:
    lines = _lines(report)
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def _numbers_in_brackets(line: str) -> list[tuple[float, float, float]]:
    import re
    return [(float(m), float(lo), float(hi)) for m, lo, hi in re.findall(
        r"(-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]", line)]


def test_intervals_stay_in_range_and_the_method_is_stated(tmp_path):
    report = write_report(tmp_path, _demo_like_rows(), title="demo",
                          test_examples=1000)
    table = _part(report, "## Accuracy (mean over seeds [95 % interval])")
    assert table[2] == ("intervals: 95 % bootstrap percentile interval of "
                        "the mean over seeds (10 000 resamples).")
    assert not any("±" in line for line in _lines(report))
    cells = [cell for line in table if line.startswith("| bit_flip")
             for cell in _numbers_in_brackets(line)]
    assert len(cells) == 9
    for mean, low, high in cells:
        assert 0.0 <= low <= mean <= high <= 100.0
    # The bimodal seeds (10, 96, 96.5): inside [10, 96.5], never past 100.
    assert _summary_line(report, "| bit_flip | 1e-05 |").startswith(
        "| bit_flip | 1e-05 | 3 | 67.50 [10.00, 96.50] |")


def test_one_seed_with_the_test_set_size_gets_a_wilson_interval(tmp_path):
    rows = [r for r in _demo_like_rows() if r["seed"] == 0]
    report = write_report(tmp_path, rows, title="one", test_examples=1000)
    method = _part(report, "## Accuracy (mean over seeds [95 % interval])"
                      )[2]
    assert method.startswith("intervals: 95 % Wilson score interval over "
                             "the 1000 test examples")
    from recovjax.stats import wilson_interval
    low, high = wilson_interval(0.1, 1000)[1:3]
    assert _summary_line(report, "| bit_flip | 1e-05 |").startswith(
        f"| bit_flip | 1e-05 | 1 | 10.00 [{100 * low:.2f}, {100 * high:.2f}]")


def test_recovery_ratio_is_undefined_within_test_noise(tmp_path):
    report = write_report(tmp_path, _demo_like_rows(), title="demo",
                          test_examples=1000)
    section = _part(report, "## Recovery")
    assert "2·sqrt(p(1 − p)/n) = 1.08 pp" in section[2]
    lines = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line
             for line in section if line.startswith("| bit_flip")}
    # 1e-6: every gap (at most 0.2 pp) is below 2 SE of 97 % on 1000.
    assert ("undefined (damage within test noise: every gap ≤ 0.20 pp < 2 "
            "SE = 1.08 pp)") in lines[("bit_flip", "1e-06", "finetune")]
    # 1e-5: the seed at 10 % is defined (0.9), the two near clean are not.
    assert "| 0.900 (1/3 defined) |" in lines[
        ("bit_flip", "1e-05", "finetune")]
    assert "| 0.900 [0.900, 0.900] (3/3 defined) |" in lines[
        ("bit_flip", "3e-05", "finetune")]
    assert not any("-15" in line for line in section)
    # Without the test-set size the floor is unknown, and the report says so.
    other = tmp_path / "unknown"
    other.mkdir()
    report = write_report(other, _demo_like_rows(), title="demo")
    section = _part(report, "## Recovery")
    assert "The noise floor is unknown" in section[2]
    assert "(3/3 defined)" in [line for line in section if line.startswith(
        "| bit_flip | 1e-06 | finetune")][0]


def test_test_examples_come_from_the_sidecar(tmp_path):
    from recovjax.results import ResultsTable
    ResultsTable(rows=_demo_like_rows(), test_examples=1000).to_csv(
        tmp_path / "results.csv")
    report = write_report(tmp_path, title="demo")
    assert any("over the n = 1000 test examples" in line
               for line in _lines(report))
    with pytest.raises(ValueError, match="test_examples"):
        write_report(tmp_path, test_examples=0)


def test_steps_medians_count_the_models_that_did_not_reach(tmp_path):
    clean = 0.97
    rows = [make_row(damage="none", ratio=0.0, seed=0, stage="clean",
                     metric="accuracy", value=clean)]
    steps_95 = [0, 10, 12, 14, 16, 18, math.nan, math.nan, math.nan]
    steps_99 = [0] + [math.nan] * 8
    for seed in range(9):
        where = dict(damage="zero", ratio=0.5, seed=seed)
        rows.append(make_row(stage="damaged", metric="accuracy", value=0.5,
                             **where))
        rows.append(make_row(stage="recovered/finetune", metric="accuracy",
                             value=0.9, step=20, **where))
        for name, values in (("steps_to_95", steps_95),
                             ("steps_to_99", steps_99)):
            rows.append(make_row(stage="recovered/finetune", metric=name,
                                 value=values[seed], step=20, **where))
    report = write_report(tmp_path, rows, title="steps", test_examples=1000)
    (line,) = [line for line in _part(report, "## Recovery")
               if line.startswith("| zero | 0.5 | finetune")]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    # The old report: "13 (median; 6/9 reached)" and "0 (median; 1/9
    # reached)", i.e. 99 % of clean reached before 95 %.
    assert cells[4] == "16 (median of 9; 6 reached)"
    assert cells[5] == "not reached (median of 9; 1 reached)"


def test_paired_comparisons_mark_differences_that_hold(tmp_path):
    report = write_report(tmp_path, _demo_like_rows(), title="demo",
                          test_examples=1000)
    section = _part(report, "## Paired comparisons")
    assert section[4].startswith("| damage | amount | best | compared with "
                                 "| advantage of best (pp) |")
    rows = {line.split("|")[2].strip(): line for line in section
            if line.startswith("| bit_flip")}
    # 3e-5: restore beats finetune on every seed (97 - 0.1 s vs 90.x).
    assert rows["3e-05"].startswith("| bit_flip | 3e-05 | restore | "
                                    "finetune |")
    assert rows["3e-05"].endswith("| 3 / 0 / 0 | ✓ |")
    # 1e-6: finetune sits within 0.3 pp of restore, seeds disagree or tie.
    assert not rows["1e-06"].endswith("✓ |")
    for _, low, high in _numbers_in_brackets(rows["3e-05"]):
        assert 0 < low <= high


def test_metric_plot_draws_seeds_and_a_log_axis_for_rates(tmp_path,
                                                          monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.figure
    from recovjax.report import final_rows, log_amounts, plot_metric_vs_ratio
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda figure, *args, **kwargs: saved.append(figure))
    rows = final_rows(_demo_like_rows())
    plot_metric_vs_ratio(rows, tmp_path / "a.png", ACCURACY)
    (axis, *_) = saved[0].axes
    assert axis.get_xscale() == "log"
    # One strip per stage: damaged, finetune, restore, 9 points each.
    strips = [c for c in axis.collections
              if len(c.get_offsets()) == 9]
    assert len(strips) == 3
    assert log_amounts([1e-6, 1e-5, 3e-5]) and log_amounts([0.1, 1.0])
    assert not log_amounts([0.1, 0.3, 0.5]) and not log_amounts([0.5, 2.0])
    assert not log_amounts([0.0, 1e-6, 1e-4]) and not log_amounts([])
    saved.clear()
    plot_metric_vs_ratio(final_rows(_accuracy_rows()), tmp_path / "b.png",
                         ACCURACY)
    assert saved[0].axes[0].get_xscale() == "linear"
