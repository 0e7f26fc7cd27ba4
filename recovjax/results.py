"""Results: a tidy long table, summaries over seeds, CSV and JSON files.

One row per (damage kind, layer, ratio, seed, stage, step, metric) with its
value::

    damage,layer,ratio,seed,stage,step,metric,value
    zero,,0.05,0,damaged,0,accuracy,0.9559999704360962
    gaussian_noise,Conv_0,0.5,0,damaged,0,accuracy,0.9120000004768372

``layer`` is empty for the whole model (every row but those of a
sensitivity map, which damages one layer at a time and names it).

``stage`` is ``clean`` (the undamaged model), ``damaged``, or a recovery
stage such as ``recovered/finetune`` (whose ``step`` counts recovery steps;
other stages use step 0). Metric names are ``accuracy``, ``loss``,
``class_accuracy/<c>`` and ``custom`` (or ``custom/<name>``) for a user
metric.

Alongside the rows a table records the run's ``config``, ``root_seed``, the
library ``versions`` and the ``device_kind``. ``results.csv`` holds only the
header and the rows, so any CSV reader takes it as it is
(``pandas.read_csv("results.csv")`` gives the eight columns with their
types, the whole model's empty ``layer`` as NaN; with
``keep_default_na=False, na_values=["nan"]`` it stays ``""``); the
metadata go into the sidecar ``results.meta.json`` next to it.
``results.json`` holds both. Files are written atomically and
deterministically: the same table gives byte-identical files (no
timestamps), and reading a file back gives the same table (floats are
written as the shortest ``repr`` that round-trips; NaN and infinities as
``nan``, ``inf``, ``-inf``).

Files of format version 1 (seven columns, no ``layer``) still read, every
row with ``layer=""``.

Reading checks every value, not only its type: accuracies outside
``[0, 1]``, negative losses, counts, steps or amounts are refused with an
error naming the file, the line and the column, so a damaged file never
turns into a report that shows 423 % accuracy.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import re
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from recovjax import stats
from recovjax._io import atomic_write, read_json_file, read_text

COLUMNS = ("damage", "layer", "ratio", "seed", "stage", "step", "metric",
           "value")
"""Columns of the tidy table, in file order."""

VERSION_1_COLUMNS = ("damage", "ratio", "seed", "stage", "step", "metric",
                     "value")
"""Columns of format version 1 files (no ``layer``; still read)."""

FORMAT = "recovjax-results"
FORMAT_VERSION = 2
_COLUMNS_OF_VERSION = {1: VERSION_1_COLUMNS, FORMAT_VERSION: COLUMNS}
METADATA_FORMAT = "recovjax-results-metadata"
"""``format`` of the CSV's sidecar (see :func:`metadata_path`)."""
_CSV_HEADER_PREFIX = "# " + FORMAT + " "
"""The metadata line that starts CSV files of earlier versions (still read)."""


class ResultsFileError(ValueError):
    """A results file that cannot be read back, with where it went wrong.

    Attributes:
        path: the file.
        line: the 1-based line, or ``None`` when unknown.
        column: the column name (one of :data:`COLUMNS`), or ``None``.
        columns: the columns of the file, in its order (:data:`COLUMNS`, or
            :data:`VERSION_1_COLUMNS` for a version 1 file); the message
            numbers ``column`` by its place among them.
        reason: the message without the location.
    """

    def __init__(self, path: os.PathLike[str] | str, message: str, *,
                 line: int | None = None, column: str | None = None,
                 where: str | None = None,
                 columns: Sequence[str] = COLUMNS):
        self.path = pathlib.Path(path)
        self.line = line
        self.column = column
        self.columns = tuple(columns)
        self.reason = message
        location = f"{self.path}:{line}" if line is not None else str(
            self.path)
        parts = [part for part in (
            where, None if column is None else
            f"column {self.columns.index(column) + 1} ({column})") if part]
        super().__init__(": ".join([location] + (
            [", ".join(parts)] if parts else []) + [message]))


def metadata_path(csv_path: os.PathLike[str] | str) -> pathlib.Path:
    """The CSV's metadata sidecar: ``x.csv`` -> ``x.meta.json`` next to it."""
    csv_path = pathlib.Path(csv_path)
    stem = csv_path.stem if csv_path.suffix == ".csv" else csv_path.name
    return csv_path.with_name(stem + ".meta.json")


# --------------------------------------------------------------------------
# Rows.
# --------------------------------------------------------------------------


def make_row(*, damage: str, ratio: float, seed: int, stage: str,
             metric: str, value: float, step: int = 0, layer: str = ""
             ) -> dict[str, Any]:
    """One row with the column types of the table.

    Args:
        damage: damage kind (``"none"`` for the clean model).
        ratio: damage amount.
        seed: seed index of the point.
        stage: ``clean``, ``damaged``, ``recovered/<strategy>``, ...
        metric: metric name.
        value: the value (any real; kept exactly as a Python float).
        step: recovery step (0 outside recovery).
        layer: the one layer damaged (a sensitivity map's row), or ``""``
            (the default) for the whole model.

    Returns:
        A dict with the keys of :data:`COLUMNS`.

    Raises:
        TypeError: if a field has the wrong type (e.g. a non-integer seed or
            a layer that is not a str).
    """
    for name, text in (("damage", damage), ("stage", stage),
                       ("metric", metric)):
        if not isinstance(text, str) or not text:
            raise TypeError(f"{name} must be a non-empty str, got {text!r}")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a str ('' for the whole model), got "
                        f"{layer!r}")
    for name, number in (("seed", seed), ("step", step)):
        if isinstance(number, bool) or not isinstance(number,
                                                      (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {number!r}")
    return {"damage": damage, "layer": layer, "ratio": float(ratio),
            "seed": int(seed), "stage": stage, "step": int(step),
            "metric": metric, "value": float(value)}


def _natural(text: str) -> tuple:
    # "class_accuracy/10" after "class_accuracy/9".
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.split(r"(\d+)", text))


_METRIC_ORDER = {"accuracy": 0, "loss": 1}


def _row_order(row: Mapping[str, Any]) -> tuple:
    metric = row["metric"]
    # The whole model ("") before its layers.
    return (row["damage"], _natural(row["layer"]), row["ratio"], row["seed"],
            _natural(row["stage"]), row["step"], _METRIC_ORDER.get(metric, 2),
            _natural(metric))


def _fractions(metrics) -> tuple[float, float, np.ndarray]:
    # Correctly rounded float32 quotients of the totals, computed on the
    # host (NumPy divides exactly), so that the same totals always give the
    # same bits whichever compiled program produced them.
    totals = (getattr(metrics, "correct", None),
              getattr(metrics, "class_correct", None),
              getattr(metrics, "class_count", None),
              getattr(metrics, "loss_sum", None))
    if any(total is None for total in totals):
        return (float(metrics.accuracy), float(metrics.loss),
                np.asarray(metrics.per_class_accuracy))
    correct, class_correct, class_count, loss_sum = (
        np.asarray(t) for t in totals)
    count = np.float32(class_count.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.float32(correct) / count
        loss = np.float32(loss_sum) / count
        per_class = (class_correct.astype(np.float32)
                     / class_count.astype(np.float32))
    return float(accuracy), float(loss), per_class


OUTCOMES = ("masked", "sdc", "due")
"""The outcome classes of :attr:`recovjax.evaluate.Metrics.outcomes`:
``outcome/<name>`` rows hold the fraction of the examples in each."""


def metrics_rows(metrics, *, damage: str, ratio: float, seed: int,
                 stage: str, step: int = 0, custom_name: str = "custom"
                 ) -> list[dict[str, Any]]:
    """Rows for one point's :class:`~recovjax.evaluate.Metrics` (scalars).

    Fractions are recomputed on the host from the integer totals when the
    metrics carry them, so they are correctly rounded float32 values.

    Args:
        metrics: metrics of one model (host or device arrays).
        damage: damage kind.
        ratio: damage amount.
        seed: seed index.
        stage: stage name.
        step: recovery step.
        custom_name: metric name of the user metric; a dict-valued user
            metric gives ``<custom_name>/<key>`` rows.

    Returns:
        Rows for ``accuracy``, ``loss``, ``class_accuracy/<c>``, the
        outcome fractions ``outcome/masked``, ``outcome/sdc`` and
        ``outcome/due`` (when the metrics count outcomes) and the user
        metric, if any.
    """
    where = dict(damage=damage, ratio=ratio, seed=seed, stage=stage,
                 step=step)
    accuracy, loss, per_class = _fractions(metrics)
    rows = [make_row(metric="accuracy", value=accuracy, **where),
            make_row(metric="loss", value=loss, **where)]
    for index, value in enumerate(per_class):
        rows.append(make_row(metric=f"class_accuracy/{index}",
                             value=float(value), **where))
    outcomes = getattr(metrics, "outcomes", None)
    if outcomes is not None:
        counts = np.asarray(outcomes)
        total = np.float32(counts.sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            for name, count in zip(OUTCOMES, counts):
                rows.append(make_row(metric=f"outcome/{name}",
                                     value=float(np.float32(count) / total),
                                     **where))
    custom = getattr(metrics, "custom", None)
    if custom is not None:
        if isinstance(custom, Mapping):
            for name in sorted(custom):
                rows.append(make_row(metric=f"{custom_name}/{name}",
                                     value=float(custom[name]), **where))
        else:
            rows.append(make_row(metric=custom_name, value=float(custom),
                                 **where))
    return rows


def task_rows(metrics: Mapping[str, Any], *, damage: str, ratio: float,
              seed: int, stage: str, step: int = 0) -> list[dict[str, Any]]:
    """Rows for one point's task metrics (a dict, see :mod:`recovjax.tasks`).

    Args:
        metrics: ``{name: value}`` of one model: scalars give one row each,
            vectors one row per entry (``name/<i>``).
        damage: damage kind.
        ratio: damage amount.
        seed: seed index.
        stage: stage name.
        step: recovery step.

    Returns:
        One row per value, in name order.
    """
    where = dict(damage=damage, ratio=ratio, seed=seed, stage=stage,
                 step=step)
    rows = []
    for name in sorted(metrics):
        value = np.asarray(metrics[name])
        if value.ndim == 0:
            rows.append(make_row(metric=name, value=value.item(), **where))
        else:
            for index, entry in enumerate(value.reshape(-1)):
                rows.append(make_row(metric=f"{name}/{index}",
                                     value=entry.item(), **where))
    return rows


# --------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-ready copy: tuples as lists, NumPy scalars as Python ones."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _encode_float(value: float) -> str:
    # repr is the shortest string that reads back as the same float; it
    # spells the specials nan, inf and -inf.
    return repr(float(value))


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else _encode_float(value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return _json_number(value)
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


@dataclasses.dataclass
class ResultsTable:
    """The tidy long table of a sweep (or of a recovery run).

    Attributes:
        rows: dicts with the keys of :data:`COLUMNS`, kept sorted (every
            row goes through :func:`make_row`, so a row without a ``layer``
            is a whole-model row, ``layer=""``).
        config: the run's configuration (JSON-ready; tuples become lists).
        root_seed: the integer seed of the root key, or ``None`` when the
            run was given a key.
        versions: library versions (``python``, ``jax``, ...).
        device_kind: the JAX device kind and count, e.g. ``"cpu x1"``.
        test_examples: the number of test examples each model was evaluated
            on, or ``None`` when unknown (files written before it was
            recorded, task metrics that are no per-example fractions). The
            report uses it for the test-set noise of accuracies (Wilson
            intervals, the floor below which a recovery ratio is undefined).
    """

    rows: list[dict[str, Any]]
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    root_seed: int | None = None
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    device_kind: str = ""
    test_examples: int | None = None

    def __post_init__(self):
        self.rows = sorted((make_row(**row) for row in self.rows),
                           key=_row_order)
        self.config = _plain(dict(self.config))
        self.versions = {str(k): str(v) for k, v in self.versions.items()}
        if self.root_seed is not None:
            self.root_seed = int(self.root_seed)
        self.device_kind = str(self.device_kind)
        if self.test_examples is not None:
            count = self.test_examples
            if isinstance(count, bool) or not isinstance(
                    count, (int, np.integer)) or count < 1:
                raise ValueError(f"test_examples must be a positive int or "
                                 f"None, got {count!r}")
            self.test_examples = int(count)

    def __len__(self) -> int:
        return len(self.rows)

    def __eq__(self, other) -> bool:
        # NaN-aware and exact: two tables are equal when their files are.
        if not isinstance(other, ResultsTable):
            return NotImplemented
        return self.to_json_text() == other.to_json_text()

    def metadata(self) -> dict[str, Any]:
        """``config``, ``root_seed``, ``versions`` and ``device_kind``, and
        ``test_examples`` when known (tables without it write the files
        they wrote before it was recorded)."""
        metadata = {"config": self.config, "root_seed": self.root_seed,
                    "versions": self.versions,
                    "device_kind": self.device_kind}
        if self.test_examples is not None:
            metadata["test_examples"] = self.test_examples
        return metadata

    def select(self, **where) -> list[dict[str, Any]]:
        """Rows whose columns equal the given values, e.g. ``metric="loss"``.

        Raises:
            KeyError: for a name that is not a column.
        """
        unknown = set(where) - set(COLUMNS)
        if unknown:
            raise KeyError(f"unknown column(s) {sorted(unknown)}; columns "
                           f"are {', '.join(COLUMNS)}")
        return [row for row in self.rows
                if all(row[k] == v for k, v in where.items())]

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> "ResultsTable":
        """A new table with ``rows`` added (same metadata)."""
        return dataclasses.replace(self, rows=self.rows + list(rows))

    # ---------------------------------------------------------------- text

    def to_csv_text(self) -> str:
        """The CSV file's text: header and rows (see :meth:`to_csv`)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in self.rows:
            writer.writerow([row["damage"], row["layer"],
                             _encode_float(row["ratio"]),
                             row["seed"], row["stage"], row["step"],
                             row["metric"], _encode_float(row["value"])])
        return out.getvalue()

    def to_metadata_text(self) -> str:
        """The CSV's sidecar text (see :meth:`to_csv`)."""
        document = {"format": METADATA_FORMAT, "version": FORMAT_VERSION,
                    **_json_safe(self.metadata()),
                    "columns": list(COLUMNS), "rows": len(self.rows)}
        return json.dumps(document, sort_keys=True, indent=1,
                          allow_nan=False) + "\n"

    def to_json_text(self) -> str:
        """The JSON file's text (see :meth:`to_json`)."""
        document = {
            "format": FORMAT, "version": FORMAT_VERSION,
            **_json_safe(self.metadata()),
            "columns": list(COLUMNS),
            "rows": [[row[c] if c not in ("ratio", "value")
                      else _json_number(row[c]) for c in COLUMNS]
                     for row in self.rows],
        }
        return json.dumps(document, sort_keys=True, indent=1,
                          allow_nan=False) + "\n"

    # --------------------------------------------------------------- files

    def to_csv(self, path: os.PathLike[str] | str) -> pathlib.Path:
        """Write the table as plain CSV, with its metadata in a sidecar.

        ``path`` gets the header and one line per row, nothing else, so
        ``pandas.read_csv(path)`` and spreadsheets read it as it is. The
        metadata (config, root seed, versions, device kind, the number of
        test examples when known, and the number of rows) go to
        :func:`metadata_path` (``results.meta.json`` next to
        ``results.csv``), written first; both writes are atomic. Reading
        checks that the two agree on the number of rows, so a CSV replaced
        or cut short without its sidecar is caught.

        Args:
            path: the CSV file to write (parent directories are created).

        Returns:
            The path of the CSV file.
        """
        atomic_write(metadata_path(path), self.to_metadata_text())
        return atomic_write(path, self.to_csv_text())

    def to_json(self, path: os.PathLike[str] | str) -> pathlib.Path:
        """Write the table and its metadata as strict JSON, atomically.

        Non-finite values are the strings ``"nan"``, ``"inf"``, ``"-inf"``.

        Args:
            path: the file to write.

        Returns:
            The path written.
        """
        return atomic_write(path, self.to_json_text())


def _count_or_nan(value: float) -> bool:
    # steps_to_95 and the like: a count, or NaN for "not reached".
    return math.isnan(value) or (math.isfinite(value) and value >= 0
                                 and value == int(value))


def _value_problem(metric: str, value: float) -> str | None:
    """Why ``value`` cannot be a ``metric`` the library writes, or ``None``."""
    if metric == "accuracy" or metric.startswith("class_accuracy/"):
        # NaN: a class without test examples, or a diverged model.
        if not (math.isnan(value) or 0.0 <= value <= 1.0):
            return f"{metric} must be in [0, 1] (or nan), got {value!r}"
    elif metric == "loss":
        if not (math.isnan(value) or value >= 0.0):
            return f"loss must be >= 0 (or nan), got {value!r}"
    elif metric.startswith(("steps_to_", "samples_to_")):
        if not _count_or_nan(value):
            return (f"{metric} must be a count >= 0 (or nan for not reached)"
                    f", got {value!r}")
    elif metric == "diverged":
        if value not in (0.0, 1.0):
            return f"diverged must be 0 or 1, got {value!r}"
    elif metric == "wall_seconds":
        if not (math.isnan(value) or value >= 0.0):
            return f"{metric} must be >= 0 (or nan), got {value!r}"
    return None


def check_row(row: Mapping[str, Any]) -> tuple[str, str] | None:
    """Whether a typed row holds values the library can have written.

    Damage amounts are finite and non-negative, seeds and steps
    non-negative (a ``diverged`` row's step is -1 when nothing diverged),
    accuracies in ``[0, 1]``, losses, counts and costs non-negative; NaN is
    accepted wherever the library writes it. Other metrics (user metrics,
    ``recovery_ratio``) may take any value.

    Args:
        row: a row as returned by :func:`make_row`.

    Returns:
        ``None`` when the row is plausible, else ``(column, problem)``.
    """
    if not (math.isfinite(row["ratio"]) and row["ratio"] >= 0.0):
        return "ratio", (f"damage amount must be finite and >= 0, got "
                         f"{row['ratio']!r}")
    if row["seed"] < 0:
        return "seed", f"seed must be >= 0, got {row['seed']}"
    lowest = -1 if row["metric"] == "diverged" else 0
    if row["step"] < lowest:
        return "step", f"step must be >= {lowest}, got {row['step']}"
    problem = _value_problem(row["metric"], row["value"])
    return None if problem is None else ("value", problem)


def _field(column: str, text: Any) -> Any:
    if column in ("ratio", "value"):
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise ValueError(f"expected a number, got {text!r}")
        try:
            return float(text)  # accepts "nan", "inf", "-inf" and numbers.
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if column in ("seed", "step"):
        if isinstance(text, bool) or isinstance(text, float) or not (
                isinstance(text, (str, int))):
            raise ValueError(f"expected an integer, got {text!r}")
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if column == "layer":
        # Empty: the whole model.
        if not isinstance(text, str):
            raise ValueError(f"expected a layer name ('' for the whole "
                             f"model), got {text!r}")
        return text
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected a non-empty name, got {text!r}")
    return text


def _typed(record: Sequence[Any], path: pathlib.Path, line: int | None,
           where: str | None = None, columns: Sequence[str] = COLUMNS
           ) -> dict[str, Any]:
    if not isinstance(record, (list, tuple)) or len(record) != len(columns):
        count = len(record) if isinstance(record, (list, tuple)) else "no"
        raise ResultsFileError(
            path, f"expected {len(columns)} fields ({', '.join(columns)}), "
            f"got {count}: {record!r}", line=line, where=where,
            columns=columns)
    fields = {}
    for column, text in zip(columns, record):
        try:
            fields[column] = _field(column, text)
        except ValueError as error:
            raise ResultsFileError(path, str(error), line=line,
                                   column=column, where=where,
                                   columns=columns) from None
    row = make_row(**fields)  # A version 1 record: layer "".
    problem = check_row(row)
    if problem is not None:
        column, message = problem
        raise ResultsFileError(path, message, line=line, column=column,
                               where=where, columns=columns)
    return row


def _version_columns(version: Any, path: pathlib.Path) -> tuple[str, ...]:
    """The columns of format ``version``; an error names ``path``."""
    if (not isinstance(version, int) or isinstance(version, bool)
            or version not in _COLUMNS_OF_VERSION):
        readable = " and ".join(str(v) for v in sorted(_COLUMNS_OF_VERSION))
        raise ResultsFileError(path, f"format version {version!r}; this "
                               f"recovjax reads versions {readable}")
    return _COLUMNS_OF_VERSION[version]


def _header_text(columns: Sequence[str]) -> str:
    return ",".join(columns)


def _from_metadata(rows, metadata: Mapping[str, Any], path: pathlib.Path
                   ) -> ResultsTable:
    try:
        return ResultsTable(rows=rows, config=metadata.get("config") or {},
                            root_seed=metadata.get("root_seed"),
                            versions=metadata.get("versions") or {},
                            device_kind=metadata.get("device_kind") or "",
                            test_examples=metadata.get("test_examples"))
    except (TypeError, ValueError, AttributeError) as error:
        raise ResultsFileError(path, f"bad metadata ({error})") from None


def _read_sidecar(path: pathlib.Path) -> dict[str, Any] | None:
    sidecar = metadata_path(path)
    if not sidecar.is_file():
        return None
    _, document = read_json_file(sidecar)
    if not isinstance(document, dict) or (
            document.get("format") != METADATA_FORMAT):
        raise ResultsFileError(sidecar, f"not a {METADATA_FORMAT} document")
    version = document.get("version")
    columns = _version_columns(version, sidecar)
    if tuple(document.get("columns", columns)) != columns:
        raise ResultsFileError(sidecar, f"columns must be {list(columns)} "
                               f"(format version {version})")
    return document


def read_csv(path: os.PathLike[str] | str) -> ResultsTable:
    """Read a table written by :meth:`ResultsTable.to_csv`.

    The metadata come from the sidecar :func:`metadata_path`
    (``results.meta.json``) when it exists; its row count must match the
    CSV's, and the header must be the columns of the sidecar's format
    version. A CSV without a sidecar (e.g. written by another tool with the
    same columns) reads with empty metadata (``config={}``,
    ``root_seed=None``, no versions), and its header may be either
    :data:`COLUMNS` or the version 1 :data:`VERSION_1_COLUMNS`. A CSV of an
    earlier version, whose first line is ``# recovjax-results {...}``, reads
    with the metadata of that line. Rows of version 1 files (no ``layer``
    column) read with ``layer=""``.

    Args:
        path: the CSV file.

    Returns:
        The :class:`ResultsTable`.

    Raises:
        FileNotFoundError: if the file does not exist.
        ResultsFileError: (a ``ValueError``) if the file is not UTF-8 text,
            the header is neither :data:`COLUMNS` nor
            :data:`VERSION_1_COLUMNS` (or not the columns of the sidecar's
            version), a field has the wrong type or an impossible value (see
            :func:`check_row`), or the sidecar disagrees; the message names
            the file, the line and the column (numbered as in the file),
            e.g. ``results.csv:5: column 8 (value): accuracy must be in
            [0, 1] (or nan), got 4.23``.
    """
    path = pathlib.Path(path)
    # Spreadsheets save UTF-8 CSV with a byte-order mark.
    text = read_text(path).removeprefix("\ufeff")
    metadata = _read_sidecar(path)
    sidecar = metadata is not None
    first = 1  # The line number of the header.
    if text.startswith(_CSV_HEADER_PREFIX):
        line, _, text = text.partition("\n")
        first = 2
        if metadata is None:
            try:
                metadata = json.loads(line[len(_CSV_HEADER_PREFIX):])
            except json.JSONDecodeError as error:
                raise ResultsFileError(path, f"bad metadata line ({error})",
                                       line=1) from None
            if not isinstance(metadata, dict):
                raise ResultsFileError(path, "bad metadata line", line=1)
    if sidecar:  # Its version was checked by _read_sidecar.
        layouts = [_COLUMNS_OF_VERSION[metadata["version"]]]
        wanted = (f"{_header_text(layouts[0])} (the columns of format "
                  f"version {metadata.get('version')}, as "
                  f"{metadata_path(path).name} records)")
    else:
        layouts = [COLUMNS, VERSION_1_COLUMNS]
        wanted = (f"{_header_text(COLUMNS)} (or, format version 1, "
                  f"{_header_text(VERSION_1_COLUMNS)})")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, header, start = [], None, first
    try:
        for record in reader:
            line = start
            start = first + reader.line_num  # where the next record begins
            if header is None:
                header = tuple(record)
                if header not in layouts:
                    raise ResultsFileError(
                        path, f"header must be {wanted}, got "
                        f"{','.join(header) or 'an empty line'}", line=line)
                continue
            if record:
                rows.append(_typed(record, path, line, columns=header))
    except csv.Error as error:
        raise ResultsFileError(path, f"not CSV ({error})",
                               line=first + reader.line_num - 1) from None
    if header is None:
        raise ResultsFileError(path, f"empty file; expected the header "
                               f"{wanted}", line=first)
    if metadata is not None and "rows" in metadata and (
            metadata["rows"] != len(rows)):
        raise ResultsFileError(
            path, f"holds {len(rows)} rows but {metadata_path(path).name} "
            f"records {metadata['rows']}: the CSV is cut short or was "
            "replaced without its sidecar")
    return _from_metadata(rows, metadata or {},
                          metadata_path(path) if sidecar else path)


def _row_lines(text: str, document: Mapping[str, Any]) -> list[int] | None:
    """The line on which each of ``document["rows"]`` starts, if findable."""
    decoder = json.JSONDecoder()
    rows = document["rows"]
    for match in reversed(list(re.finditer(r'"rows"\s*:\s*\[', text))):
        offset, lines = match.end(), []
        counted, line = 0, 1  # newlines counted up to ``counted``
        try:
            for row in rows:
                offset = _skip(text, offset, allow_comma=bool(lines))
                value, end = decoder.raw_decode(text, offset)
                if value != row and not _same_row(value, row):
                    break
                line += text.count("\n", counted, offset)
                counted = offset
                lines.append(line)
                offset = end
            else:
                if text[_skip(text, offset, allow_comma=False)] == "]":
                    return lines
        except (ValueError, IndexError):
            continue
    return None


def _same_row(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _skip(text: str, offset: int, *, allow_comma: bool) -> int:
    while text[offset] in " \t\r\n":
        offset += 1
    if allow_comma and text[offset] == ",":
        offset += 1
        while text[offset] in " \t\r\n":
            offset += 1
    return offset


def read_json(path: os.PathLike[str] | str) -> ResultsTable:
    """Read a table written by :meth:`ResultsTable.to_json`.

    Files of format version 1 (seven columns, no ``layer``) read with
    ``layer=""`` in every row.

    Args:
        path: the JSON file.

    Returns:
        The :class:`ResultsTable`.

    Raises:
        FileNotFoundError: if the file does not exist.
        ResultsFileError: (a ``ValueError``) if it is not UTF-8 JSON, not a
            recovjax results document, of a format version other than 1 and
            2, its ``columns`` are not those of its version, or a row has
            the wrong type or an impossible value (see :func:`check_row`);
            the message names the file, the row's line and index, and the
            column.
    """
    path = pathlib.Path(path)
    text, document = read_json_file(path)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ResultsFileError(path, f"not a {FORMAT} JSON document")
    version = document.get("version")
    columns = _version_columns(version, path)
    if tuple(document.get("columns", ())) != columns:
        raise ResultsFileError(path, f"columns must be {list(columns)} "
                               f"(format version {version})")
    records = document.get("rows", [])
    if not isinstance(records, list):
        raise ResultsFileError(path, "rows must be a list")
    lines = None
    rows = []
    for index, record in enumerate(records):
        try:
            rows.append(_typed(record, path, None, where=f"rows[{index}]",
                               columns=columns))
        except ResultsFileError as error:
            lines = _row_lines(text, document) if lines is None else lines
            if not lines:
                raise
            raise ResultsFileError(
                path, error.reason, line=lines[index], column=error.column,
                where=f"rows[{index}]", columns=columns) from None
    return _from_metadata(rows, document, path)


def read_table(path: os.PathLike[str] | str) -> ResultsTable:
    """Read a ``.json`` or ``.csv`` results file (by suffix)."""
    path = pathlib.Path(path)
    return read_json(path) if path.suffix == ".json" else read_csv(path)


def read_rows(path: os.PathLike[str] | str) -> list[dict[str, Any]]:
    """The rows of a ``.csv`` or ``.json`` results file, as dicts."""
    return read_table(path).rows


# --------------------------------------------------------------------------
# Summaries over seeds.
# --------------------------------------------------------------------------


class Summary(NamedTuple):
    """Mean over seeds of one metric at one (damage, ratio, stage, step).

    Attributes:
        damage, ratio, stage, step, metric: the group.
        mean: mean over seeds (NaN if any value is NaN).
        std: sample standard deviation (``ddof=1``; NaN for one seed).
        low, high: the two-sided confidence interval of the mean from
            :func:`recovjax.stats.mean_interval`: the bootstrap percentile
            interval over seeds, or, for one seed's accuracy with a known
            test-set size, the Wilson score interval over the test examples;
            NaN when there is none (one seed otherwise, a non-finite value).
            It never leaves the range of the values (or ``[0, 1]``).
        method: how ``low``/``high`` were computed (``"bootstrap"``,
            ``"wilson"`` or ``"none"``; see :mod:`recovjax.stats`).
        n: number of seeds.
    """

    damage: str
    ratio: float
    stage: str
    step: int
    metric: str
    mean: float
    std: float
    low: float
    high: float
    method: str
    n: int


def _rows_of(table: ResultsTable | Iterable[Mapping[str, Any]]
             ) -> list[Mapping[str, Any]]:
    return table.rows if isinstance(table, ResultsTable) else list(table)


def summarize(table: ResultsTable | Iterable[Mapping[str, Any]],
              metric: str = "accuracy", *, stage: str | None = None,
              layer: str = "", confidence: float = stats.CONFIDENCE,
              examples: int | None = None) -> list[Summary]:
    """Mean, standard deviation and confidence interval over seeds.

    The interval is :func:`recovjax.stats.mean_interval`'s: the bootstrap
    percentile interval of the mean over seeds (fixed resamples and
    generator seed, so the same table gives the same summaries), and for a
    group of one seed's ``accuracy`` with a known test-set size, the Wilson
    score interval over the test examples.

    Args:
        table: a :class:`ResultsTable` or its rows.
        metric: the metric to summarise.
        stage: only this stage (``None``: every stage).
        layer: only rows of this layer; the default ``""`` keeps the
            whole-model rows, so a sensitivity map's per-layer rows never
            mix into the whole model's means.
        confidence: the two-sided level of the interval, in ``(0, 1)``.
        examples: the test-set size behind an accuracy (for one-seed
            groups); ``None``: the table's ``test_examples`` when ``table``
            is a :class:`ResultsTable`.

    Returns:
        One :class:`Summary` per (damage, ratio, stage, step), sorted.

    Raises:
        ValueError: for a ``confidence`` outside ``(0, 1)`` or an
            ``examples`` that is not positive.

    Example::

        for s in summarize(table, "accuracy", stage="damaged"):
            print(s.damage, s.ratio, s.mean, s.low, s.high, s.method)
    """
    if examples is None and isinstance(table, ResultsTable):
        examples = table.test_examples
    if metric != "accuracy":
        examples = None  # Wilson only for a fraction of the test examples.
    groups: dict[tuple, list[float]] = {}
    for row in _rows_of(table):
        if row["metric"] != metric or (stage is not None and
                                       row["stage"] != stage) or (
                row.get("layer", "") != layer):
            continue
        key = (row["damage"], row["ratio"], row["stage"], row["step"])
        groups.setdefault(key, []).append(float(row["value"]))
    out = []
    for (damage, ratio, stage_name, step), values in sorted(
            groups.items(), key=lambda item: (item[0][0], item[0][1],
                                              _natural(item[0][2]),
                                              item[0][3])):
        array = np.asarray(values, np.float64)
        interval = stats.mean_interval(array, examples=examples,
                                       confidence=confidence)
        with np.errstate(invalid="ignore"):
            std = float(array.std(ddof=1)) if array.size > 1 else math.nan
        out.append(Summary(damage, ratio, stage_name, step, metric,
                           interval.estimate, std, interval.low,
                           interval.high, interval.method, int(array.size)))
    return out


def _curves(table, metric: str, stage: str, damage: str | None,
            layer: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    curves: dict[str, list[tuple[float, float]]] = {}
    for s in summarize(table, metric, stage=stage, layer=layer):
        if damage is None or s.damage == damage:
            curves.setdefault(s.damage, []).append((s.ratio, s.mean))
    if damage is not None and damage not in curves:
        where = f" of layer {layer!r}" if layer else ""
        raise ValueError(f"no {stage!r} rows of {metric!r} for damage "
                         f"{damage!r}{where}")
    return {kind: (np.asarray([r for r, _ in points]),
                   np.asarray([m for _, m in points]))
            for kind, points in curves.items()}


def area_under_curve(table: ResultsTable | Iterable[Mapping[str, Any]],
                     metric: str = "accuracy", *, stage: str = "damaged",
                     damage: str | None = None, layer: str = ""
                     ) -> dict[str, float]:
    """Normalised area under the mean-metric-vs-ratio curve of each kind.

    The trapezoid rule over the ratio grid of the mean over seeds, divided
    by the span ``max(ratio) - min(ratio)``: a model whose accuracy stays at
    ``a`` over the whole grid scores ``a``, so kinds swept over different
    ranges stay comparable (1 = no loss at all, for accuracy). A kind with a
    single ratio has no span and scores NaN.

    Args:
        table: a :class:`ResultsTable` or its rows.
        metric: the metric (default ``accuracy``).
        stage: the stage (default ``damaged``).
        damage: only this kind (``None``: every kind).
        layer: only rows of this layer (default ``""``: the whole model).

    Returns:
        ``{damage kind: area}``.

    Raises:
        ValueError: if ``damage`` has no matching rows.
    """
    out = {}
    for kind, (ratios, means) in _curves(table, metric, stage, damage,
                                         layer).items():
        span = float(ratios[-1] - ratios[0]) if ratios.size else 0.0
        if span <= 0:
            out[kind] = math.nan
            continue
        widths = np.diff(ratios)
        area = float(np.sum(widths * (means[1:] + means[:-1]) / 2.0))
        out[kind] = area / span
    return out


def ratio_at_threshold(table: ResultsTable | Iterable[Mapping[str, Any]],
                       threshold: float, metric: str = "accuracy", *,
                       stage: str = "damaged", damage: str | None = None,
                       layer: str = "") -> dict[str, float | None]:
    """The ratio at which the mean metric first falls below ``threshold``.

    Walking the ratio grid upwards, the first grid point whose mean over
    seeds is below ``threshold`` is found; the crossing is then placed by
    linear interpolation between it and the previous grid point. If the
    first grid point is already below, its ratio is returned.

    Args:
        table: a :class:`ResultsTable` or its rows.
        threshold: e.g. ``0.5`` for half accuracy.
        metric: the metric (default ``accuracy``).
        stage: the stage (default ``damaged``).
        damage: only this kind (``None``: every kind).
        layer: only rows of this layer (default ``""``: the whole model).

    Returns:
        ``{damage kind: ratio}``, with ``None`` for a kind that never falls
        below the threshold.

    Raises:
        ValueError: if ``damage`` has no matching rows.
    """
    out: dict[str, float | None] = {}
    for kind, (ratios, means) in _curves(table, metric, stage, damage,
                                         layer).items():
        out[kind] = None
        for index, (ratio, mean) in enumerate(zip(ratios, means)):
            if mean < threshold:
                if index == 0:
                    out[kind] = float(ratio)
                else:
                    r0, m0 = ratios[index - 1], means[index - 1]
                    fraction = (m0 - threshold) / (m0 - mean)
                    out[kind] = float(r0 + fraction * (ratio - r0))
                break
    return out
