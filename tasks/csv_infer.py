"""What the columns of a CSV file are: feature kinds, the target and the task type, the rows kept.

A feature column holding numbers is numeric, one holding text (or listed in data.categorical)
is categorical; a numeric column with a few values that are not numbers is refused, naming
the row. The task type is taken from data.task or inferred from the target, and the
missing-value policy decides which rows are kept.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks.csv_file import row_position, utf8_error
from tasks.csv_read import Columns, selected_features
from tasks.data_config import DataConfig
from tasks.errors import DataError
from tasks.splits import distinct_integers

log = logging.getLogger("trainyard.ingest")
MAX_CLASSES_INFERRED = 20


@dataclass
class Features:
    """The feature columns by kind, and the rows where each one misses a value."""

    names: list[str]  # in the order of the tensors' columns
    # float64 with NaN for missing values, or integers (compact; in pieces, joined later in a worker)
    numeric: dict[str, Any] = field(default_factory=dict)
    categorical: dict[str, pd.Series] = field(default_factory=dict)
    missing: dict[str, np.ndarray] = field(default_factory=dict)  # only columns with a missing value


@dataclass
class Target:
    """The target column and what it says about the task."""

    name: str
    column: pd.Series
    missing: np.ndarray
    numeric: np.ndarray | None  # its numbers (NaN where missing); None when the labels are text
    ints: np.ndarray | None  # its int64 values when they can be counted (see _countable_integers)
    task: str
    reason: str


@dataclass
class Rows:
    """The file's rows that the missing-value policy keeps."""

    kept: np.ndarray
    n_read: int

    @property
    def all(self) -> bool:
        """Nothing dropped: no need to copy every column."""
        return self.kept.size == self.n_read

    @property
    def dropped(self) -> int:
        return self.n_read - self.kept.size


@dataclass
class Inferred:
    """What the encoding needs to know about the columns read."""

    features: Features
    target: Target
    rows: Rows


def infer(path: Path, data_cfg: DataConfig, data: Columns) -> Inferred:
    """Everything the encoding needs to know about the columns `data` holds."""
    features = column_kinds(path, data_cfg, data, check_selection(path, data_cfg, data))
    target = infer_target(path, data_cfg, data)
    return Inferred(features, target, kept_rows(path, data_cfg, features, target))


# ---- the columns asked for ------------------------------------------------------------------------


def check_selection(path: Path, data_cfg: DataConfig, data: Columns) -> list[str]:
    """The feature columns, once the target and the columns data.* names are known to be in the file."""
    columns, target = data.names, data_cfg.target
    if target not in columns:
        raise DataError(
            f"CSV file {path}: target column {target!r} not found; columns in the file: {', '.join(columns)}"
        )
    listed = (
        ("data.features", data_cfg.features),
        ("data.drop", data_cfg.drop),
        ("data.categorical", data_cfg.categorical),
    )
    for label, names in listed:
        unknown = [c for c in names if c not in columns]
        if unknown:
            raise DataError(
                f"CSV file {path}: {label} names columns not in the file: {unknown}; columns: {', '.join(columns)}"
            )
    if target in data_cfg.features or target in data_cfg.drop:
        raise DataError(f"CSV file {path}: the target column {target!r} cannot also be a feature or dropped")
    features = selected_features(data_cfg, columns)
    if not features:
        raise DataError(f"CSV file {path}: no feature columns left after dropping {data_cfg.drop}")
    for name in [*features, target]:  # pyarrow keeps text that is not UTF-8 as raw bytes
        if pa.types.is_binary(data.type(name)) or pa.types.is_large_binary(data.type(name)):
            raise utf8_error(path, f"column {name!r}")
    return features


# ---- feature kinds --------------------------------------------------------------------------------


def column_kinds(path: Path, data_cfg: DataConfig, data: Columns, names: list[str]) -> Features:
    """Each feature as numbers or as text, taken out of `data` one at a time."""
    features = Features(names=names)
    for name in names:
        taken = data.parts_of(name) if data.is_numpy(name) else data.series(name)
        data.forget(name)
        if isinstance(taken, list):  # an integer or float column, as pandas would hold it
            values, missing = _numpy_feature(path, name, taken)
        else:
            values, missing = _series_feature(path, data_cfg, name, taken)
        kind = features.categorical if isinstance(values, pd.Series) else features.numeric
        kind[name] = values
        if missing is None:
            continue
        if missing.all():
            raise DataError(f"CSV file {path}: column {name!r} has no values at all (every row is missing); drop it")
        if missing.any():
            features.missing[name] = missing
    return features


def _numpy_feature(path: Path, name: str, parts: list[np.ndarray]) -> tuple[Any, np.ndarray | None]:
    """A column read as numpy parts: its values and, for floats, where they are missing."""
    if all(part.dtype.kind == "i" for part in parts):  # no missing values: joined later, in a worker
        return parts, None
    values = np.concatenate(parts)
    if values.dtype.kind != "f":
        return values, None
    _finite_or_error(path, name, values)
    _no_integers_beyond_int64(path, name, values)
    return values, np.isnan(values)


def _series_feature(path: Path, data_cfg: DataConfig, name: str, col: pd.Series) -> tuple[Any, np.ndarray]:
    """A column read as a Series: its numbers, or the Series itself when it is categorical; and its missing rows."""
    values = None if name in data_cfg.categorical else _numeric_or_error(path, name, col)
    if values is None:
        return col, col.isna().to_numpy()
    return values, np.isnan(values)


def _first_true(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _numeric_or_error(path: Path, name: str, col: pd.Series) -> np.ndarray | None:
    """Numbers from a column: None when it is text; an error when it is numbers with a few bad values."""
    if pd.api.types.is_bool_dtype(col):
        return col.astype("float64").to_numpy()
    if pd.api.types.is_numeric_dtype(col):
        values = col.to_numpy(dtype="float64", na_value=np.nan)
        _finite_or_error(path, name, values)
        if pd.api.types.is_float_dtype(col):
            _no_integers_beyond_int64(path, name, values)
        return values
    present = col.notna().to_numpy()
    coerced = pd.to_numeric(col, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    bad = present & np.isnan(coerced)
    n_present = int(present.sum())
    if n_present and bad.sum() <= n_present // 2 and bad.any():
        i = _first_true(bad)
        raise DataError(
            f"CSV file {path}: column {name!r} holds numbers but {row_position(path, i)} has {col.iloc[i]!r}; "
            f"expected a number (or list the column in data.categorical)"
        )
    return None if bad.any() else coerced


def _finite_or_error(path: Path, name: str, values: np.ndarray) -> None:
    bad = np.isinf(values)
    if bad.any():
        i = _first_true(bad)
        raise DataError(
            f"CSV file {path}: column {name!r} has an infinite value (or one beyond float64's range) at "
            f"{row_position(path, i)}; expected a finite number"
        )


def _no_integers_beyond_int64(path: Path, name: str, values: np.ndarray) -> None:
    """pyarrow reads integers beyond 64 bits as doubles, silently rounding them (ids, labels); refuse those."""
    with np.errstate(invalid="ignore"):
        big = np.abs(values) >= 2.0**63
    if not big.any():
        return
    text = pd.read_csv(path, engine="pyarrow", usecols=[name], dtype={name: "string"})[name]
    integer = re.compile(r"\s*[+-]?\d+\s*")
    for i in np.flatnonzero(big):
        token = text.iloc[i]
        if isinstance(token, str) and integer.fullmatch(token):
            raise DataError(
                f"CSV file {path}: column {name!r} has the integer {token.strip()} at {row_position(path, i)}, "
                f"beyond the 64-bit range; expected integers between -2**63 and 2**63-1 (drop the column with "
                f"data.drop if it is an id)"
            )


# ---- the target and the task type -----------------------------------------------------------------


def infer_target(path: Path, data_cfg: DataConfig, data: Columns) -> Target:
    """The target column, its values as numbers where they are numbers, and the task type."""
    name = data_cfg.target
    y_col = data.series(name)
    data.forget(name)
    y_missing = y_col.isna().to_numpy()
    if y_missing.all():
        raise DataError(
            f"CSV file {path}: target column {name!r} has no values at all (every row is missing); "
            f"expected the values to predict"
        )
    # Labels are text when the column holds text (or booleans), and also when it mixes numbers with a
    # few words and the config says it is a class column (data.task classification, or the target
    # listed in data.categorical); otherwise a word among numbers is an error in a numeric target.
    classes = data_cfg.task == "classification" or name in data_cfg.categorical
    text_labels = pd.api.types.is_bool_dtype(y_col) or (classes and not pd.api.types.is_numeric_dtype(y_col))
    y_numeric = None if text_labels else _numeric_or_error(path, name, y_col)
    y_ints = _countable_integers(y_col)  # integer labels are counted, not hashed or sorted
    task, reason = _task_type(data_cfg, y_numeric, y_ints)
    if task == "regression":
        _check_regression(path, data_cfg, y_col, y_numeric)
    log.info("task type: %s (%s)", task, reason)
    return Target(name, y_col, y_missing, y_numeric, y_ints, task, reason)


def _task_type(data_cfg: DataConfig, y_numeric: np.ndarray | None, y_ints: np.ndarray | None) -> tuple[str, str]:
    """(task, why): data.task, or for auto what the target holds."""
    if data_cfg.task != "auto":
        return data_cfg.task, "set in data.task"
    if data_cfg.target in data_cfg.categorical:
        return "classification", "the target is listed in data.categorical"
    if y_numeric is None:
        return "classification", "the target holds text or booleans"
    if y_ints is not None:
        present, n_unique, integral = y_ints, distinct_integers(y_ints).size, True
    else:
        present = y_numeric[~np.isnan(y_numeric)]
        n_unique = len(pd.unique(present))
        integral = np.all(present == np.round(present))
    if present.size and integral and n_unique <= MAX_CLASSES_INFERRED:
        return "classification", f"the target holds {n_unique} distinct integers"
    return "regression", "the target holds real numbers"


def _check_regression(path: Path, data_cfg: DataConfig, y_col: pd.Series, y_numeric: np.ndarray | None) -> None:
    """Refuse a regression target that is not numbers."""
    target = data_cfg.target
    if target in data_cfg.categorical:
        raise DataError(
            f"CSV file {path}: target {target!r} is listed in data.categorical but data.task is regression; "
            f"expected one or the other"
        )
    if pd.api.types.is_bool_dtype(y_col):
        raise DataError(
            f"CSV file {path}: target {target!r} holds booleans (true/false); regression needs numbers "
            "(set data.task to classification or auto)"
        )
    if y_numeric is None:
        bad = y_col.notna().to_numpy() & pd.to_numeric(y_col, errors="coerce").isna().to_numpy()
        i = _first_true(bad)
        raise DataError(
            f"CSV file {path}: target {target!r} has {y_col.iloc[i]!r} at {row_position(path, i)}; "
            f"regression needs numbers"
        )


def _countable_integers(col: pd.Series) -> np.ndarray | None:
    """An int64 column's values (so none missing) when they are exact as float64 and span a small range."""
    if col.dtype != np.int64 or not len(col):
        return None
    values = col.to_numpy()
    lo, hi = int(values.min()), int(values.max())
    return values if lo > -(2**53) and hi < 2**53 and hi - lo <= 1 << 20 else None


# ---- missing values -------------------------------------------------------------------------------


def kept_rows(path: Path, data_cfg: DataConfig, features: Features, target: Target) -> Rows:
    """The rows data.missing keeps: a row without a target never; one missing a feature value unless 'drop'."""
    n_read = target.missing.size
    if data_cfg.missing == "error":
        for name in features.names:
            if name in features.missing:
                raise _missing_error(path, name, features.missing[name])
        if target.missing.any():
            raise _missing_error(path, target.name, target.missing)
        keep = np.ones(n_read, dtype=bool)
    elif data_cfg.missing == "drop":
        keep = ~target.missing
        for name in features.names:
            if name in features.missing:
                keep &= ~features.missing[name]
    else:
        keep = ~target.missing
    rows = Rows(np.flatnonzero(keep), n_read)
    if rows.dropped:
        log.info("dropped %d of %d rows with missing values (policy %s)", rows.dropped, n_read, data_cfg.missing)
    return rows


def _missing_error(path: Path, name: str, mask: np.ndarray) -> DataError:
    i = _first_true(mask)
    return DataError(
        f"CSV file {path}: column {name!r} has a missing value at {row_position(path, i)} and data.missing is "
        f"'error'; fill it in, or set data.missing to impute or drop"
    )
