"""Tests for recovjax.results: the tidy table, its files and the summaries."""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recovjax.evaluate import Metrics
from recovjax.results import (COLUMNS, VERSION_1_COLUMNS, ResultsFileError,
                              ResultsTable, area_under_curve, make_row,
                              metadata_path, metrics_rows, ratio_at_threshold,
                              read_csv, read_json, read_rows, read_table,
                              summarize)
from recovjax.stats import bootstrap_mean, wilson_interval


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
    # "custom" (a user metric) may take any value; library metrics are
    # range-checked on reading.
    rows = [make_row(damage="bit_flip", ratio=r, seed=s, stage="damaged",
                     metric="custom", value=v)
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
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "results.csv", "results.meta.json"]
    assert len(read_csv(path)) == 2


def test_csv_without_metadata_line_reads(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text(",".join(COLUMNS) + "\nzero,,0.5,1,damaged,0,loss,nan\n")
    table = read_csv(path)
    assert table.root_seed is None and table.config == {}
    assert math.isnan(table.rows[0]["value"])
    assert table.rows[0]["layer"] == ""


def test_read_errors(tmp_path):
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header must be"):
        read_csv(bad_header)
    bad_row = tmp_path / "row.csv"
    bad_row.write_text(",".join(COLUMNS) + "\nzero,,x,1,damaged,0,loss,1\n")
    with pytest.raises(ValueError, match=r"row.csv:2: column 3 \(ratio\)"):
        read_csv(bad_row)
    short = tmp_path / "short.csv"
    short.write_text(",".join(COLUMNS) + "\nzero,,0.5\n")
    with pytest.raises(ValueError, match="expected 8 fields"):
        read_csv(short)
    short.write_text(",".join(VERSION_1_COLUMNS) + "\nzero,0.5\n")
    with pytest.raises(ValueError, match="expected 7 fields"):
        read_csv(short)
    other = tmp_path / "other.json"
    other.write_text('{"rows": []}')
    with pytest.raises(ValueError, match="not a recovjax-results"):
        read_json(other)
    with pytest.raises(FileNotFoundError):
        read_csv(tmp_path / "missing.csv")


def _lines(*rows: str) -> str:
    """A plain CSV of format version 1 (seven columns, no ``layer``)."""
    return (",".join(VERSION_1_COLUMNS) + "\n"
            + "".join(row + "\n" for row in rows))


def _layered(row: str, layer: str = "") -> str:
    """A version 1 row with a ``layer`` field after the damage kind."""
    damage, rest = row.split(",", 1)
    return f"{damage},{layer},{rest}"


GOOD = "zero,0.5,1,damaged,0,accuracy,0.5"


def test_csv_is_plain_and_pandas_reads_it(tmp_path):
    import pandas  # a test dependency only (the "test" extra)
    table = _special_table()
    path = table.to_csv(tmp_path / "results.csv")
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    frame = pandas.read_csv(path, keep_default_na=False, na_values=["nan"])
    assert tuple(frame.columns) == COLUMNS and len(frame) == len(table)
    for column in ("ratio", "value"):
        assert frame[column].dtype == np.float64, column
    for column in ("seed", "step"):
        assert frame[column].dtype == np.int64, column
    for column in ("damage", "layer", "stage", "metric"):
        assert pandas.api.types.is_string_dtype(frame[column]), column
    assert set(frame["layer"]) == {""}
    # The clean model's damage kind "none" stays a string, not a NaN.
    assert "none" in set(frame["damage"])
    for got, row in zip(frame.itertuples(index=False), table.rows):
        assert (got.damage, got.seed, got.stage, got.step, got.metric) == (
            row["damage"], row["seed"], row["stage"], row["step"],
            row["metric"])
        assert got.ratio == row["ratio"]
        assert (math.isnan(got.value) if math.isnan(row["value"])
                else got.value == row["value"])


def test_metadata_sidecar_is_deterministic_json(tmp_path):
    table = _special_table()
    table.to_csv(tmp_path / "a" / "results.csv")
    table.to_csv(tmp_path / "b" / "results.csv")
    sidecar = metadata_path(tmp_path / "a" / "results.csv")
    assert sidecar == tmp_path / "a" / "results.meta.json"
    assert sidecar.read_bytes() == (tmp_path / "b" / "results.meta.json"
                                    ).read_bytes()
    document = json.loads(sidecar.read_text())
    assert document["format"] == "recovjax-results-metadata"
    assert document["rows"] == len(table)
    assert document["root_seed"] == 3 and document["device_kind"] == "cpu x4"
    assert document["config"] == table.config
    assert metadata_path("out/t.csv") == pathlib.Path("out/t.meta.json")
    assert metadata_path("table") == pathlib.Path("table.meta.json")


def test_csv_cut_short_or_replaced_without_its_sidecar_is_refused(tmp_path):
    path = _table().to_csv(tmp_path / "results.csv")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    with pytest.raises(ResultsFileError) as error:
        read_csv(path)
    assert str(error.value) == (
        f"{path}: holds 2 rows but results.meta.json records 3: the CSV is "
        "cut short or was replaced without its sidecar")
    metadata_path(path).unlink()  # Without a sidecar: empty metadata.
    table = read_csv(path)
    assert len(table) == 2 and table.config == {} and table.root_seed is None


def test_damaged_sidecar_is_named(tmp_path):
    path = _table().to_csv(tmp_path / "results.csv")
    sidecar = metadata_path(path)
    sidecar.write_text(sidecar.read_text()[:30])
    with pytest.raises(ValueError, match=rf"^{sidecar}:\d+:\d+: not valid "
                       r"JSON \("):
        read_csv(path)
    sidecar.write_text('{"format": "recovjax-results-metadata", "version": 2,'
                       ' "root_seed": "seven", "rows": 3}')
    with pytest.raises(ResultsFileError, match=f"^{sidecar}: bad metadata"):
        read_csv(path)


def _version_1_csv_text(table: ResultsTable) -> str:
    """``table`` as version 1 wrote it: seven columns, no ``layer``."""
    lines = table.to_csv_text().splitlines()
    assert lines[0] == ",".join(COLUMNS)
    assert all(line.split(",")[1] == "" for line in lines[1:])
    return _lines(*(",".join(line.split(",")[:1] + line.split(",")[2:])
                    for line in lines[1:]))


def test_csv_of_the_earlier_format_still_reads(tmp_path):
    table = _table()
    path = tmp_path / "old.csv"
    header = "# recovjax-results " + json.dumps(
        {"version": 1, **table.metadata()}, sort_keys=True)
    path.write_text(header + "\n" + _version_1_csv_text(table))
    assert read_csv(path) == table
    path.write_text(header + "\n" + _lines(GOOD, "zero,0.5,2,damaged,0,"
                                           "accuracy,4.23"))
    with pytest.raises(ResultsFileError, match=rf"^{path}:4: column 7"):
        read_csv(path)


def test_csv_errors_name_the_right_line(tmp_path):
    path = tmp_path / "results.csv"
    # A blank line and a quoted field over two lines still count.
    path.write_text(_lines(GOOD, "", '"two\nlines",0.5,1,damaged,0,loss,1',
                           "zero,0.5,x,damaged,0,loss,1"))
    with pytest.raises(ResultsFileError) as error:
        read_csv(path)
    assert str(error.value) == (f"{path}:6: column 3 (seed): expected an "
                                "integer, got 'x'")
    assert (error.value.line, error.value.column) == (6, "seed")
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ResultsFileError, match=rf"^{path}:1: header must be"):
        read_csv(path)
    path.write_text("")
    with pytest.raises(ResultsFileError, match=rf"^{path}:1: empty file"):
        read_csv(path)
    path.write_text(_lines(GOOD, "zero,0.5,1," + "x" * 200_000 + ",0,loss,1"))
    with pytest.raises(ResultsFileError, match=rf"^{path}:3: not CSV "
                       r"\(field larger than field limit"):
        read_csv(path)


def test_binary_file_is_named_not_a_bare_decode_error(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    for name, reader in (("results.csv", read_csv),
                         ("results.json", read_json)):
        path = tmp_path / name
        path.write_bytes(png)
        with pytest.raises(ValueError) as error:
            reader(path)
        assert str(error.value) == (f"{path}:1: not UTF-8 text (byte 0x89 "
                                    "at offset 0); is it a binary file?")
    path.write_bytes(_lines(GOOD).encode() + b"zero,\xff\n")
    with pytest.raises(ValueError, match=rf"^{path}:3: not UTF-8 text "
                       r"\(byte 0xff at offset \d+\)"):
        read_csv(path)


@pytest.mark.parametrize("row, column, fragment", [
    ("zero,0.5,1,damaged,0,accuracy,4.23", "value",
     "accuracy must be in [0, 1] (or nan), got 4.23"),
    ("zero,0.5,1,damaged,0,accuracy,-0.01", "value", "got -0.01"),
    ("zero,0.5,1,damaged,0,class_accuracy/3,1.5", "value",
     "class_accuracy/3 must be in [0, 1]"),
    ("zero,0.5,1,damaged,0,accuracy,inf", "value", "got inf"),
    ("zero,0.5,1,damaged,0,loss,-1.0", "value", "loss must be >= 0"),
    ("zero,0.5,1,recovered/f,9,steps_to_95,2.5", "value",
     "steps_to_95 must be a count >= 0"),
    ("zero,0.5,1,recovered/f,9,samples_to_99,-100", "value",
     "samples_to_99 must be a count"),
    ("zero,0.5,1,recovered/f,-1,diverged,0.5", "value",
     "diverged must be 0 or 1"),
    ("zero,0.5,1,recovered/f,9,wall_seconds,-2", "value",
     "wall_seconds must be >= 0"),
    ("zero,0.5,-1,damaged,0,loss,1", "seed", "seed must be >= 0, got -1"),
    ("zero,0.5,1,recovered/f,-1,accuracy,0.5", "step",
     "step must be >= 0, got -1"),
    ("zero,0.5,1,recovered/f,-2,diverged,0", "step",
     "step must be >= -1, got -2"),
    ("zero,-0.5,1,damaged,0,loss,1", "ratio",
     "damage amount must be finite and >= 0, got -0.5"),
    ("zero,nan,1,damaged,0,loss,1", "ratio", "got nan"),
    ("zero,0.5,1,damaged,0,loss,x", "value", "expected a number, got 'x'"),
])
@pytest.mark.parametrize("version", [1, 2])
def test_impossible_values_are_refused_with_line_and_column(
        tmp_path, row, column, fragment, version):
    path = tmp_path / "results.csv"
    rows = (GOOD, GOOD.replace(",1,", ",2,"), row)
    columns = VERSION_1_COLUMNS
    text = _lines(*rows)
    if version == 2:  # The same rows of one layer; columns numbered anew.
        columns = COLUMNS
        text = ",".join(COLUMNS) + "\n" + "".join(
            _layered(r, "Conv_0") + "\n" for r in rows)
    path.write_text(text)
    with pytest.raises(ResultsFileError) as error:
        read_csv(path)
    message = str(error.value)
    assert message.startswith(
        f"{path}:4: column {columns.index(column) + 1} ({column}): ")
    assert fragment in message
    assert (error.value.path, error.value.line) == (path, 4)


def test_csv_saved_by_a_spreadsheet_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "results.csv"
    path.write_bytes(b"\xef\xbb\xbf" + _lines(GOOD).encode())
    assert read_csv(path).rows[0]["value"] == 0.5


def test_values_the_library_writes_are_accepted(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(_lines(
        "zero,0.5,1,damaged,0,accuracy,nan",        # diverged model
        "zero,0.5,1,damaged,0,class_accuracy/0,0.0",
        "zero,0.5,1,damaged,0,loss,inf",
        "zero,0.0,1,damaged,0,accuracy,1.0",
        "zero,0.5,1,recovered/f,-1,diverged,0.0",   # never diverged
        "zero,0.5,1,recovered/f,9,steps_to_95,nan",  # not reached
        "zero,0.5,1,recovered/f,9,steps_to_99,200.0",
        "zero,0.5,1,recovered/f,9,recovery_ratio,-3.5",
        "zero,0.5,1,damaged,0,custom,-1e300"))
    assert len(read_csv(path)) == 9


def test_json_errors_name_line_row_and_column(tmp_path):
    table = _table()
    path = table.to_json(tmp_path / "results.json")
    document = json.loads(path.read_text())
    document["rows"][2][7] = 4.23
    path.write_text(json.dumps(document, indent=1, sort_keys=True))
    line = next(number for number, text in enumerate(
        path.read_text().splitlines(), start=1) if "4.23" in text)
    with pytest.raises(ResultsFileError) as error:
        read_json(path)
    # indent=1 puts each field on a line: the row's "[" is 8 lines earlier.
    assert str(error.value) == (
        f"{path}:{line - 8}: rows[2], column 8 (value): accuracy must be in "
        "[0, 1] (or nan), got 4.23")
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ValueError, match=rf"^{path}:\d+:\d+: not valid JSON"):
        read_json(path)
    document["rows"][2] = ["zero", "", 0.1, 2, "damaged", 0, "accuracy"]
    path.write_text(json.dumps(document))  # one line: still the right one
    with pytest.raises(ResultsFileError, match=rf"^{path}:1: rows\[2\]: "
                       "expected 8 fields"):
        read_json(path)
    document["rows"][2] = ["zero", None, 0.1, 2, "damaged", 0, "accuracy",
                           0.5]
    path.write_text(json.dumps(document))
    with pytest.raises(ResultsFileError, match=rf"^{path}:1: rows\[2\], "
                       r"column 2 \(layer\): expected a layer name"):
        read_json(path)
    # A version 1 document numbers the columns without the layer.
    old = {**document, "version": 1, "columns": list(VERSION_1_COLUMNS),
           "rows": [row[:1] + row[2:] for row in document["rows"][:2]]
           + [["zero", 0.1, 2, "damaged", 0, "accuracy", 4.23]]}
    path.write_text(json.dumps(old))
    with pytest.raises(ResultsFileError, match=rf"^{path}:1: rows\[2\], "
                       r"column 7 \(value\): accuracy must be in"):
        read_json(path)


def test_report_refuses_damaged_results(tmp_path):
    from recovjax.report import write_report
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.csv").write_text(_lines(
        "none,0.0,0,clean,0,accuracy,0.9",
        "zero,0.5,0,damaged,0,accuracy,4.23"))
    with pytest.raises(ResultsFileError, match=rf"^{run / 'results.csv'}:3: "
                       r"column 7 \(value\): accuracy must be in \[0, 1\]"):
        write_report(run)
    assert not (run / "report.md").exists()
    (run / "results.csv").write_text(_lines("none,0.0,0,clean,0,accuracy,0.9"))
    (run / "costs.json").write_text('{"recovery": [\n{"damage": ')
    with pytest.raises(ValueError, match=rf"^{run / 'costs.json'}:2:\d+: not "
                       "valid JSON"):
        write_report(run)
    (run / "costs.json").write_text('[1, 2]')
    with pytest.raises(ValueError, match="not a recovjax costs document"):
        write_report(run)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_get_the_umask_mode_not_0600(tmp_path, umask):
    from recovjax._io import atomic_write
    previous = os.umask(umask)
    try:
        csv_path = _table().to_csv(tmp_path / "results.csv")
        json_path = _table().to_json(tmp_path / "results.json")
        other = atomic_write(tmp_path / "report.md", "text")
    finally:
        os.umask(previous)
    for path in (csv_path, metadata_path(csv_path), json_path, other):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_make_row_and_select_errors():
    with pytest.raises(TypeError, match="seed must be an int"):
        make_row(damage="zero", ratio=0.1, seed=1.5, stage="damaged",
                 metric="loss", value=1.0)
    with pytest.raises(TypeError, match="damage must be a non-empty str"):
        make_row(damage="", ratio=0.1, seed=1, stage="damaged",
                 metric="loss", value=1.0)
    with pytest.raises(KeyError, match="unknown column"):
        _table().select(colour="red")


def test_summarize_mean_std_and_bootstrap_interval():
    (summary,) = summarize(_table(), "accuracy")
    assert summary.n == 3
    assert summary.mean == pytest.approx(0.7, abs=1e-15)
    assert summary.std == pytest.approx(0.2, abs=1e-15)
    expected = bootstrap_mean([0.5, 0.7, 0.9])
    assert (summary.low, summary.high) == (expected.low, expected.high)
    assert summary.method == "bootstrap"
    assert 0.5 <= summary.low < summary.mean < summary.high <= 0.9
    assert summarize(_table(), "accuracy") == [summary]  # deterministic
    (single,) = summarize(_table(values=(0.4,)))
    assert single.mean == 0.4 and single.n == 1
    assert math.isnan(single.std) and math.isnan(single.low)
    assert single.method == "none"
    assert summarize(_table(), "loss") == []


def test_summarize_bimodal_seeds_stay_inside_the_unit_interval():
    (summary,) = summarize(_table(values=(0.1, 0.97, 0.97)))
    assert 0.1 <= summary.low <= summary.high <= 0.97


def test_summarize_one_seed_with_the_test_set_size_is_wilson():
    table = _table(values=(0.4,), test_examples=50)
    (single,) = summarize(table)
    expected = wilson_interval(0.4, 50)
    assert single.method == "wilson"
    assert (single.low, single.high) == (expected.low, expected.high)
    (given,) = summarize(_table(values=(0.4,)), examples=50)
    assert given == single
    with pytest.raises(ValueError, match="confidence"):
        summarize(table, confidence=95)


def test_test_examples_round_trip_and_older_files_read(tmp_path):
    table = _table(test_examples=500)
    path = table.to_csv(tmp_path / "results.csv")
    sidecar = json.loads(metadata_path(path).read_text())
    assert sidecar["test_examples"] == 500
    assert read_csv(path).test_examples == 500
    assert read_json(table.to_json(tmp_path / "r.json")).test_examples == 500
    # A sidecar written before the field existed reads with None.
    del sidecar["test_examples"]
    metadata_path(path).write_text(json.dumps(sidecar))
    assert read_csv(path).test_examples is None
    # A table without it writes the same files as before.
    assert "test_examples" not in _table().to_metadata_text()
    with pytest.raises(ValueError, match="test_examples"):
        _table(test_examples=0)
    sidecar["test_examples"] = "many"
    metadata_path(path).write_text(json.dumps(sidecar))
    with pytest.raises(ResultsFileError, match="test_examples"):
        read_csv(path)


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
                     metric="custom", value=v)
            for s, v in enumerate(values) for r in grid]
    table = ResultsTable(rows=rows, root_seed=1)
    with tempfile.TemporaryDirectory() as directory:
        csv_path = table.to_csv(pathlib.Path(directory) / "t.csv")
        json_path = table.to_json(pathlib.Path(directory) / "t.json")
        assert read_csv(csv_path) == table
        assert read_json(json_path) == table


# --------------------------------------------------------------------------
# The layer column (format version 2).
# --------------------------------------------------------------------------


def _layer_table() -> ResultsTable:
    """A sensitivity map's rows: two layers, the clean model, one NaN."""
    rows = [make_row(damage="none", ratio=0.0, seed=0, stage="clean",
                     metric="accuracy", value=0.95)]
    for layer in ("Dense_10", "Conv_0", "Dense_2"):
        for seed, value in enumerate((0.5, math.nan)):
            rows.append(make_row(damage="gaussian_noise", layer=layer,
                                 ratio=0.5, seed=seed, stage="damaged",
                                 metric="accuracy", value=value))
    rows.append(make_row(damage="gaussian_noise", ratio=0.5, seed=0,
                         stage="damaged", metric="accuracy", value=0.4))
    # A layer name that needs quoting in CSV.
    rows.append(make_row(damage="zero", layer='block "a",1', ratio=0.1,
                         seed=0, stage="damaged", metric="loss", value=2.0))
    return ResultsTable(rows=rows, config={"layers": ["Conv_0"]},
                        root_seed=5, versions={"jax": "x"},
                        device_kind="cpu x1")


def test_layer_column_round_trips_in_csv_and_json(tmp_path):
    table = _layer_table()
    csv_path = table.to_csv(tmp_path / "results.csv")
    json_path = table.to_json(tmp_path / "results.json")
    assert read_csv(csv_path) == table and read_json(json_path) == table
    assert csv_path.read_text().splitlines()[0] == (
        "damage,layer,ratio,seed,stage,step,metric,value")
    assert json.loads(json_path.read_text())["columns"] == list(COLUMNS)
    assert json.loads(metadata_path(csv_path).read_text())["version"] == 2
    back = read_csv(csv_path)
    assert {row["layer"] for row in back.rows} == {
        "", "Conv_0", "Dense_2", "Dense_10", 'block "a",1'}
    # The whole model first, then the layers in natural order.
    noise = [row["layer"] for row in back.rows
             if row["damage"] == "gaussian_noise" and row["seed"] == 0]
    assert noise == ["", "Conv_0", "Dense_2", "Dense_10"]
    shuffled = ResultsTable(rows=list(reversed(table.rows)),
                            **table.metadata())
    assert shuffled.to_csv_text() == table.to_csv_text()
    assert shuffled.to_json_text() == table.to_json_text()
    shuffled.to_csv(tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == csv_path.read_bytes()


def test_version_1_files_read_with_an_empty_layer(tmp_path):
    table = _table()
    # A version 1 CSV and its sidecar, as recovjax wrote them.
    path = tmp_path / "results.csv"
    path.write_text(_lines("zero,0.1,0,damaged,0,accuracy,0.5",
                           "zero,0.1,1,damaged,0,accuracy,0.7",
                           "zero,0.1,2,damaged,0,accuracy,0.9"))
    sidecar = json.loads(table.to_metadata_text())
    sidecar.update(version=1, columns=list(VERSION_1_COLUMNS))
    metadata_path(path).write_text(json.dumps(sidecar))
    back = read_csv(path)
    assert back == table and back.metadata() == table.metadata()
    assert all(row["layer"] == "" for row in back.rows)
    # A plain version 1 CSV without its sidecar.
    metadata_path(path).unlink()
    assert read_csv(path).rows == table.rows
    # A version 1 JSON document.
    document = json.loads(table.to_json_text())
    document.update(version=1, columns=list(VERSION_1_COLUMNS),
                    rows=[row[:1] + row[2:] for row in document["rows"]])
    json_path = tmp_path / "results.json"
    json_path.write_text(json.dumps(document))
    assert read_json(json_path) == table
    # Written again, it is a version 2 file.
    assert json.loads(read_json(json_path).to_json_text())["version"] == 2


def test_version_and_columns_must_agree(tmp_path):
    path = _table().to_csv(tmp_path / "results.csv")
    sidecar = metadata_path(path)
    document = json.loads(sidecar.read_text())
    # A version 1 sidecar next to an eight-column CSV: replaced without it.
    sidecar.write_text(json.dumps({**document, "version": 1,
                                   "columns": list(VERSION_1_COLUMNS)}))
    with pytest.raises(ResultsFileError, match=rf"^{path}:1: header must be "
                       r"damage,ratio,seed,stage,step,metric,value \(the "
                       r"columns of format version 1, as results.meta.json "
                       r"records\), got damage,layer,"):
        read_csv(path)
    sidecar.write_text(json.dumps({**document, "version": 1}))
    with pytest.raises(ResultsFileError, match=rf"^{sidecar}: columns must "
                       r"be .* \(format version 1\)"):
        read_csv(path)
    for version in (3, None, "2", True):
        sidecar.write_text(json.dumps({**document, "version": version}))
        with pytest.raises(ResultsFileError, match=rf"^{sidecar}: format "
                           rf"version {version!r}; this recovjax reads "
                           "versions 1 and 2$"):
            read_csv(path)
    json_path = _table().to_json(tmp_path / "results.json")
    document = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**document, "version": 1}))
    with pytest.raises(ResultsFileError, match=rf"^{json_path}: columns must "
                       r"be \['damage', 'ratio',"):
        read_json(json_path)
    json_path.write_text(json.dumps({**document, "version": 3}))
    with pytest.raises(ResultsFileError, match="format version 3"):
        read_json(json_path)
    # Without a sidecar the header is either layout, nothing else.
    sidecar.unlink()
    path.write_text("damage,layer,ratio,seed,stage,step,metric\n")
    with pytest.raises(ResultsFileError, match=rf"^{path}:1: header must be "
                       r"damage,layer,ratio,seed,stage,step,metric,value \(or"
                       r", format version 1, damage,ratio,"):
        read_csv(path)


def test_make_row_layer_and_select_by_layer():
    row = make_row(damage="zero", ratio=0.1, seed=0, stage="damaged",
                   metric="loss", value=1.0)
    assert row["layer"] == "" and tuple(row) == COLUMNS
    for bad in (None, 3, ("Conv_0",)):
        with pytest.raises(TypeError, match=r"layer must be a str \('' for "
                           "the whole model\\), got"):
            make_row(damage="zero", layer=bad, ratio=0.1, seed=0,
                     stage="damaged", metric="loss", value=1.0)
    table = _layer_table()
    conv = table.select(layer="Conv_0")
    assert [row["seed"] for row in conv] == [0, 1]
    assert all(row["layer"] == "Conv_0" for row in conv)
    whole = table.select(layer="", stage="damaged")
    assert [row["value"] for row in whole] == [0.4]
    assert table.select(layer="absent") == []


def test_rows_without_a_layer_key_are_whole_model_rows():
    from recovjax.recovery.finetune import Curve, FinetuneResult
    from recovjax.recovery.measure import recovery_records
    curve = Curve(steps=np.array([[0, 5]]), samples=np.array([[0.0, 500]]),
                  accuracy=np.array([[0.5, 0.9]]),
                  loss=np.array([[1.0, 0.4]]))
    result = FinetuneResult(params=None, curve=curve, losses=np.zeros((1, 5)),
                            diverged=np.array([False]),
                            diverged_step=np.array([-1]))
    records = recovery_records(result, damage="zero", ratios=[0.1],
                               seeds=[0], clean_accuracy=0.9)
    assert all("layer" not in record for record in records)
    table = ResultsTable(rows=records)
    assert len(table) == len(records)
    assert {row["layer"] for row in table.rows} == {""}
    assert len(table.select(layer="")) == len(records)


def test_summaries_keep_the_whole_model_apart_from_its_layers():
    table = _layer_table()
    (whole,) = summarize(table, "accuracy", stage="damaged")
    assert whole.mean == 0.4 and whole.n == 1
    (conv,) = summarize(table, "accuracy", stage="damaged", layer="Conv_0")
    assert conv.n == 2 and math.isnan(conv.mean)
    rows = _curve([(0.0, [1.0]), (1.0, [0.0])]) + [
        make_row(damage="zero", layer="Conv_0", ratio=r, seed=0,
                 stage="damaged", metric="accuracy", value=1.0)
        for r in (0.0, 1.0)]
    assert area_under_curve(rows) == {"zero": pytest.approx(0.5)}
    assert area_under_curve(rows, layer="Conv_0") == {"zero": 1.0}
    assert ratio_at_threshold(rows, 0.5, layer="Conv_0") == {"zero": None}
    with pytest.raises(ValueError, match="for damage 'zero' of layer 'x'"):
        area_under_curve(rows, damage="zero", layer="x")
