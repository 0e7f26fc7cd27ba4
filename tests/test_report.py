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

PLOTS = ("recovery_curves.png", "recovery_heatmap.png", "strategies.png")


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


COSTS = {"recovery": [{"damage": "zero", "strategy": "finetune", "models": 4,
                       "seconds": 1.5, "flops_per_step": 2e9, "bytes_read": 0,
                       "peak_rss_mb": 300}]}

# write_report(run, _accuracy_rows(), title="baseline") with COSTS, before
# the headline metric existed.
ACCURACY_REPORT = """\
# baseline

Clean (pretrained) test accuracy: **96.90 %**.

## Accuracy (mean ± 95 % CI over seeds)

| damage | amount | n | damaged acc. (%) | finetune (%) | restore_entries (%) |
|---|---|---|---|---|---|
| zero | 0.25 | 2 | 80.00 ± 12.71 | 88.00 ± 12.71 | 96.90 ± 0.00 |
| zero | 0.5 | 2 | 40.00 ± 25.41 | 48.00 ± 25.41 | 96.90 ± 0.00 |
| noise | 0.1 | 2 | 89.00 ± 12.71 | 97.00 ± 12.71 | 96.90 ± 0.00 |
| noise | 0.2 | 2 | 62.00 ± 25.41 | 70.00 ± 25.41 | 96.90 ± 0.00 |

## Robustness curve summary

| damage | area under accuracy-vs-amount (mean acc.) | amount where accuracy < 0.5 |
|---|---|---|
| zero | 60.00 % | 0.438 |
| noise | 75.50 % | not reached |

## Recovery

| damage | strategy | recovery ratio | steps to 95 % of clean | steps to 99 % of clean |
|---|---|---|---|---|
| zero | finetune | 0.550 | 10 (median; 2/4 reached) | not reached |
| noise | finetune | 0.550 | 10 (median; 2/4 reached) | not reached |

## Cost of recovery

| damage | strategy | models | wall time (s) | GFLOP per step | bytes read from checkpoint | peak RSS (MiB) |
|---|---|---|---|---|---|---|
| zero | finetune | 4 | 1.50 | 2.000 | 0 | 300 |

## Accuracy vs damage amount

![Accuracy vs damage amount](accuracy_vs_ratio.png)

## Recovery curves

![Recovery curves](recovery_curves.png)

## Damage amount x recovery steps

![Damage amount x recovery steps](recovery_heatmap.png)

## Strategies at equal compute

![Strategies at equal compute](strategies.png)
"""

# write_report(run, _lm_rows(), title="lm") before the headline metric
# existed: the token-accuracy report, which metric="accuracy" must still give.
LM_ACCURACY_REPORT = """\
# lm

Clean (pretrained) test accuracy: **40.00 %**.

## Accuracy (mean ± 95 % CI over seeds)

| damage | amount | n | damaged acc. (%) | distill (%) | finetune (%) |
|---|---|---|---|---|---|
| zero | 0.25 | 2 | 17.50 ± 0.00 | 45.00 ± 0.00 | 35.00 ± 0.00 |
| zero | 0.5 | 2 | 5.00 ± 0.00 | 45.00 ± 0.00 | 35.00 ± 0.00 |

## Robustness curve summary

| damage | area under accuracy-vs-amount (mean acc.) | amount where accuracy < 0.5 |
|---|---|---|
| zero | 11.25 % | 0.25 |

## Accuracy vs damage amount

![Accuracy vs damage amount](accuracy_vs_ratio.png)

## Recovery curves

![Recovery curves](recovery_curves.png)

## Damage amount x recovery steps

![Damage amount x recovery steps](recovery_heatmap.png)

## Strategies at equal compute

![Strategies at equal compute](strategies.png)
"""


def _lines(report) -> list[str]:
    return report.read_text().splitlines()


def _line(report, start: str) -> str:
    found = [line for line in _lines(report) if line.startswith(start)]
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


def test_accuracy_report_is_unchanged(tmp_path):
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
    assert "## Perplexity (mean ± 95 % CI over seeds)" in _lines(report)
    assert _line(report, "| damage | amount |") == (
        "| damage | amount | n | damaged perplexity | distill | finetune |")
    # Means of the final rows: 12 ± ..., 10 + 0.1 * (value - 10) at step 20.
    assert _line(report, "| zero | 0.25 |").startswith(
        "| zero | 0.25 | 2 | 13.00 ± 12.71 | 12.00 ± 12.71 | 10.30 ± ")
    assert _line(report, "| zero | 0.5 |").startswith(
        "| zero | 0.5 | 2 | 32.00 ± 25.41 | 31.00 ± 25.41 | 12.20 ± ")
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
    assert _line(report, "| zero | 0.25 |").startswith(
        "| zero | 0.25 | 2 | inf ± n/a |")
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
