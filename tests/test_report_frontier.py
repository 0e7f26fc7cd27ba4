"""The cost frontier of recovery strategies and ``recovjax compare``."""

from __future__ import annotations

import json
import math

import pytest

from recovjax import cli
from recovjax.report import ACCURACY, PERPLEXITY
from recovjax.report import frontier as fr
from recovjax.results import ResultsTable, make_row


def _rows(values: dict[str, tuple[float, float]], damaged=(0.40, 0.50)):
    """One damage kind at one amount, two seeds, clean 0.97."""
    rows = [make_row(damage="none", ratio=0.0, seed=0, stage="clean",
                     metric="accuracy", value=0.97)]
    where = dict(damage="zero", ratio=0.5)
    for seed, value in enumerate(damaged):
        rows.append(make_row(stage="damaged", seed=seed, metric="accuracy",
                             value=value, **where))
    for strategy, per_seed in values.items():
        for seed, value in enumerate(per_seed):
            rows.append(make_row(stage=f"recovered/{strategy}", seed=seed,
                                 metric="accuracy", value=value, step=40,
                                 **where))
    return rows


def _record(strategy, flops, seconds=1.0, samples=0):
    return {"damage": "zero", "strategy": strategy, "models": 2,
            "seconds": 2 * seconds, "flops_per_model": flops,
            "labelled_samples": samples, "unlabelled_samples": 0,
            "trainable_params": 10, "bytes_read": 0, "peak_rss_mb": 100}


ROWS = _rows({"cheap": (0.80, 0.82), "dear": (0.95, 0.96),
              "wasteful": (0.79, 0.81), "free": (0.60, 0.62)})
COSTS = {"recovery": [_record("cheap", 1e9, samples=100),
                      _record("dear", 5e9, samples=4000),
                      _record("wasteful", 8e9, samples=8000),
                      _record("free", 0, samples=0)]}


def test_dominated_strategies_are_marked_by_who_dominates_them():
    points = {p.strategy: p for p in fr.frontier(ROWS, COSTS)}
    assert points["wasteful"].dominated_by in ("cheap", "dear")
    assert points[fr.NO_RECOVERY].dominated_by == "free"  # same cost, better
    assert {name for name, p in points.items() if p.on_frontier} == {
        "free", "cheap", "dear"}
    assert points["cheap"].cost == 1e9
    assert points["cheap"].value == pytest.approx(0.81)
    assert points["cheap"].interval.low >= 0.80
    assert points["cheap"].interval.high <= 0.82


def test_lower_is_better_metrics_dominate_the_other_way():
    rows = [dict(r, metric="perplexity") for r in ROWS]
    points = {p.strategy: p for p in fr.frontier(rows, COSTS, PERPLEXITY)}
    # The highest perplexity is now the worst: "dear" is dominated by
    # "cheap" (cheaper with a lower perplexity).
    assert points["dear"].dominated_by is not None
    assert points[fr.NO_RECOVERY].on_frontier


def test_best_under_budget_and_the_paired_runner_up():
    points = fr.frontier(ROWS, COSTS)
    (choice,) = fr.best_under_budget(points, 2e9)
    assert choice.best.strategy == "cheap"
    assert choice.runner_up.strategy == "wasteful" or (
        choice.runner_up.strategy == "free")
    (choice,) = fr.best_under_budget(points, math.inf)
    assert (choice.best.strategy, choice.runner_up.strategy) == ("dear",
                                                                 "cheap")
    assert choice.difference.interval.estimate == pytest.approx(0.145)
    assert choice.difference.holds  # both seeds favour "dear"
    (choice,) = fr.best_under_budget(points, 0)
    assert choice.best.strategy == "free"
    with pytest.raises(ValueError, match="budget must be a non-negative"):
        fr.best_under_budget(points, -1.0)


def test_other_cost_axes_and_costs_not_counted():
    points = {p.strategy: p for p in fr.frontier(ROWS, COSTS, cost="samples")}
    assert points["dear"].cost == 4000
    counted = {"recovery": [dict(_record("cheap", None), labelled_samples=None)]}
    names = {p.strategy for p in fr.frontier(ROWS, counted)}
    assert names == {fr.NO_RECOVERY}  # cheap's FLOPs were not counted
    with pytest.raises(ValueError, match="cost must be one of"):
        fr.frontier(ROWS, COSTS, cost="euros")


def _run_dir(tmp_path, rows=ROWS, costs=COSTS):
    ResultsTable(rows=rows, test_examples=1000).to_csv(
        tmp_path / "results.csv")
    if costs is not None:
        (tmp_path / "costs.json").write_text(json.dumps(costs))
    return tmp_path


def test_compare_prints_the_frontier_and_the_choice(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert cli.main(["compare", str(run), "--budget", "2"]) == 0
    out = capsys.readouterr().out
    assert "frontier (cheapest first):" in out
    assert "zero 0.5: free 61.00 % at 0, cheap 81.00 % at 1" in out
    assert "best strategy under a budget of at most 2 GFLOP per model" in out
    assert "zero 0.5: cheap 81.00 [80.00, 82.00] %, cost 1" in out
    assert cli.main(["compare", str(run), "--cost", "samples"]) == 0
    assert "dear 95.50 [95.00, 96.00] %, cost 4,000" in (
        capsys.readouterr().out)


def test_compare_errors_name_the_problem(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    run = _run_dir(tmp_path, costs=None)
    assert cli.main(["compare", str(run)]) == 2
    assert "no recovery costs recorded" in capsys.readouterr().err
    (run / "costs.json").write_text("[1, 2]")
    assert cli.main(["compare", str(run)]) == 2
    assert "not a recovjax costs document" in capsys.readouterr().err
    _run_dir(tmp_path)
    assert cli.main(["compare", str(run), "--budget", "-3"]) == 2
    assert "budget must be a non-negative" in capsys.readouterr().err


def test_the_frontier_plot_is_drawn(tmp_path):
    path = fr.plot_frontier(fr.frontier(ROWS, COSTS), tmp_path / "f.png",
                            ACCURACY)
    assert path.is_file() and path.stat().st_size > 1000
    assert fr.plot_frontier([], tmp_path / "none.png") is None
