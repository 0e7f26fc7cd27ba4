"""Tests for recovjax.results: the tidy table, its files and the summaries."""

from __future__ import annotations

import json
import math
import pathlib
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recovjax.evaluate import Metrics
from recovjax.results import (COLUMNS, ResultsTable, area_under_curve,
                              make_row, metrics_rows, ratio_at_threshold,
                              read_csv, read_json, read_rows, read_table,
                              summarize, t_quantile)


def _table(values=(0.5, 0.7, 0.9), **metadata) -> ResultsTable:
    rows = []
    for seed, value in enumerate(values):
        rows.append(make_row(damage="zero", ratio=0.1, seed=seed,
                             stage="damaged", metric="accuracy", value=value))
    defaults = dict(config={"ratios": (0.1,), "model": "lenet5"},
                    root_seed=7, versions={"jax": "0.10.2"},
                    device_kind="cpu x1")
    defaults.update(metadata)
    return ResultsTable(rows=rows, **defaults)


SPECIALS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324,
            1.7976931348623157e308, float(np.float32(0.1)), 0.1, 1 / 3]


def _special_table() -> ResultsTable:
    rows = [make_row(damage="bit_flip", ratio=r, seed=s, stage="damaged",
                     metric="loss", value=v)
            for s, v in enumerate(SPECIALS) for r in (0.0, 0.05)]
    rows.append(make_row(damage="none", ratio=0.0, seed=0, stage="clean",
                         metric="accuracy", value=0.95))
    rows.append(make_row(damage="zero", ratio=0.5, seed=0,
                         stage="recovered/finetune", step=200,
                         metric="accuracy", value=0.9))
    return ResultsTable(rows=rows, config={"grid": [0.0, 0.05],
                                           "nested": {"a": (1, 2)}},
                        root_seed=3, versions={"jax": "x"},
                        device_kind="cpu x4")


def test_csv_round_trip_is_exact_with_specials(tmp_path):
    table = _special_table()
    path = table.to_csv(tmp_path / "results.csv")
    back = read_csv(path)
    assert back == table
    assert back.metadata() == table.metadata()
    by_seed = {row["seed"]: row["value"] for row in back.rows
               if row["damage"] == "bit_flip" and row["ratio"] == 0.0}
    for seed, value in enumerate(SPECIALS):
        got = by_seed[seed]
        assert (math.isnan(got) if math.isnan(value) else got == value)
        assert math.copysign(1, got) == math.copysign(1, value)


def test_json_round_trip_is_exact_and_strict(tmp_path):
    table = _special_table()
    path = table.to_json(tmp_path / "results.json")
    # Strict JSON: no NaN/Infinity tokens.
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c))
    back = read_json(path)
    assert back == table
    assert back.rows[0].keys() == set(COLUMNS)
    assert read_table(path) == table
    csv_path = table.to_csv(tmp_path / "r.csv")
    assert ResultsTable(rows=read_rows(csv_path), **table.metadata()) == table


def test_files_are_byte_identical_whatever_the_row_order(tmp_path):
    table = _special_table()
    shuffled = ResultsTable(rows=list(reversed(table.rows)),
                            config=table.config, root_seed=3,
                            versions=table.versions, device_kind="cpu x4")
    assert table.to_csv_text() == shuffled.to_csv_text()
    table.to_csv(tmp_path / "a.csv")
    shuffled.to_csv(tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv"
                                                 ).read_bytes()
    assert table.to_json_text() == shuffled.to_json_text()


def test_rows_sort_naturally():
    metrics = Metrics(accuracy=np.float32(0.5), loss=np.float32(1.0),
                      per_class_accuracy=np.arange(12, dtype=np.float32),
                      count=np.int32(10), custom=np.float32(2.0))
    rows = metrics_rows(metrics, damage="zero", ratio=0.1, seed=0,
                        stage="damaged")
    table = ResultsTable(rows=list(reversed(rows)))
    names = [row["metric"] for row in table.rows]
    assert names[:2] == ["accuracy", "loss"]
    assert names.index("class_accuracy/9") < names.index("class_accuracy/10")
    assert "custom" in names
    dict_rows = metrics_rows(metrics._replace(custom={"b": 1.0, "a": 2.0}),
                             damage="zero", ratio=0.1, seed=0,
                             stage="damaged", custom_name="r")
    assert [r["metric"] for r in dict_rows[-2:]] == ["r/a", "r/b"]


def test_atomic_write_leaves_no_temporaries_and_replaces(tmp_path):
    path = tmp_path / "sub" / "results.csv"
    _table().to_csv(path)
    _table(values=(0.1, 0.2)).to_csv(path)
    assert [p.name for p in path.parent.iterdir()] == ["results.csv"]
    assert len(read_csv(path)) == 2


def test_csv_without_metadata_line_reads(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text(",".join(COLUMNS) + "\nzero,0.5,1,damaged,0,loss,nan\n")
    table = read_csv(path)
    assert table.root_seed is None and table.config == {}
    assert math.isnan(table.rows[0]["value"])


def test_read_errors(tmp_path):
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header must be"):
        read_csv(bad_header)
    bad_row = tmp_path / "row.csv"
    bad_row.write_text(",".join(COLUMNS) + "\nzero,x,1,damaged,0,loss,1\n")
    with pytest.raises(ValueError, match="row.csv:2"):
        read_csv(bad_row)
    short = tmp_path / "short.csv"
    short.write_text(",".join(COLUMNS) + "\nzero,0.5\n")
    with pytest.raises(ValueError, match="expected 7 fields"):
        read_csv(short)
    other = tmp_path / "other.json"
    other.write_text('{"rows": []}')
    with pytest.raises(ValueError, match="not a recovjax-results"):
        read_json(other)
    with pytest.raises(FileNotFoundError):
        read_csv(tmp_path / "missing.csv")


def test_make_row_and_select_errors():
    with pytest.raises(TypeError, match="seed must be an int"):
        make_row(damage="zero", ratio=0.1, seed=1.5, stage="damaged",
                 metric="loss", value=1.0)
    with pytest.raises(TypeError, match="damage must be a non-empty str"):
        make_row(damage="", ratio=0.1, seed=1, stage="damaged",
                 metric="loss", value=1.0)
    with pytest.raises(KeyError, match="unknown column"):
        _table().select(colour="red")


def test_summarize_mean_std_and_t_interval():
    (summary,) = summarize(_table(), "accuracy")
    assert summary.n == 3
    assert summary.mean == pytest.approx(0.7, abs=1e-15)
    assert summary.std == pytest.approx(0.2, abs=1e-15)
    half = 4.302652729749464 * 0.2 / math.sqrt(3)
    assert summary.ci95_low == pytest.approx(0.7 - half, abs=1e-9)
    assert summary.ci95_high == pytest.approx(0.7 + half, abs=1e-9)
    (single,) = summarize(_table(values=(0.4,)))
    assert single.mean == 0.4 and single.n == 1
    assert math.isnan(single.std) and math.isnan(single.ci95_low)
    assert summarize(_table(), "loss") == []


@pytest.mark.parametrize("dof, expected", [
    (1, 12.706204736174698), (2, 4.302652729749464), (3, 3.182446305284263),
    (4, 2.7764451051977934), (10, 2.2281388519862744),
    (30, 2.0422724563012373), (1000, 1.9623390808264078)])
def test_t_quantile_known_values(dof, expected):
    assert t_quantile(0.975, dof) == pytest.approx(expected, rel=1e-9)
    assert t_quantile(0.025, dof) == pytest.approx(-expected, rel=1e-9)


def test_t_quantile_matches_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    for dof in list(range(1, 40)) + [57, 99, 250]:
        for p in (0.6, 0.9, 0.975, 0.995):
            assert t_quantile(p, dof) == pytest.approx(
                stats.t.ppf(p, dof), rel=1e-9, abs=1e-12)


def test_t_quantile_errors():
    with pytest.raises(ValueError, match="probability"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="dof"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match="dof"):
        t_quantile(0.975, 2.5)


def _curve(points, kind="zero"):
    rows = []
    for ratio, values in points:
        for seed, value in enumerate(values):
            rows.append(make_row(damage=kind, ratio=ratio, seed=seed,
                                 stage="damaged", metric="accuracy",
                                 value=value))
    return rows


def test_area_under_curve_is_normalised_trapezoid():
    flat = _curve([(0.0, [0.8]), (0.3, [0.8]), (0.9, [0.8])])
    assert area_under_curve(flat) == {"zero": pytest.approx(0.8)}
    line = _curve([(0.0, [1.0, 1.0]), (0.25, [0.7, 0.8]), (1.0, [0.0, 0.0])])
    # Means 1.0, 0.75, 0.0: (0.25 * 1.75 / 2 + 0.75 * 0.75 / 2) / 1.0.
    assert area_under_curve(line)["zero"] == pytest.approx(
        0.25 * 1.75 / 2 + 0.75 * 0.75 / 2)
    both = flat + _curve([(0.0, [1.0]), (1.0, [0.0])], kind="noise")
    assert area_under_curve(both, damage="noise") == {
        "noise": pytest.approx(0.5)}
    assert math.isnan(area_under_curve(_curve([(0.2, [0.5])]))["zero"])
    with pytest.raises(ValueError, match="no 'damaged' rows"):
        area_under_curve(flat, damage="absent")


def test_ratio_at_threshold_interpolates():
    rows = _curve([(0.0, [1.0]), (0.5, [0.6]), (1.0, [0.2])])
    assert ratio_at_threshold(rows, 0.5)["zero"] == pytest.approx(0.625)
    assert ratio_at_threshold(rows, 0.1) == {"zero": None}
    assert ratio_at_threshold(rows, 1.5) == {"zero": 0.0}
    # Exactly at the threshold is not below it.
    assert ratio_at_threshold(rows, 0.6)["zero"] == pytest.approx(
        0.5 + 0.0 * 0.5)
    table = ResultsTable(rows=rows)
    assert ratio_at_threshold(table, 0.5, damage="zero") == {
        "zero": pytest.approx(0.625)}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1,
                max_size=8),
       st.lists(st.floats(0, 1), min_size=1, max_size=3, unique=True))
def test_round_trip_property(values, grid):
    rows = [make_row(damage="k", ratio=r, seed=s, stage="damaged",
                     metric="loss", value=v)
            for s, v in enumerate(values) for r in grid]
    table = ResultsTable(rows=rows, root_seed=1)
    with tempfile.TemporaryDirectory() as directory:
        csv_path = table.to_csv(pathlib.Path(directory) / "t.csv")
        json_path = table.to_json(pathlib.Path(directory) / "t.json")
        assert read_csv(csv_path) == table
        assert read_json(json_path) == table
