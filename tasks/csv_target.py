"""The target column: its values as numbers where they are numbers, and the task type.

Labels are text when the column holds text (or booleans: a yes/no target is classification with
its labels as written), and also when it mixes numbers with a few words and the config says it
is a class column (data.task classification, or the target listed in data.categorical);
otherwise a word among numbers is an error in a numeric target. The task is data.task, or for
auto: classification for text, booleans, a target listed in data.categorical and integers with
at most MAX_CLASSES_INFERRED distinct values; regression otherwise.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.csv_file import row_position
from tasks.csv_inferred import Target
from tasks.csv_numbers import first_true, numeric_or_error
from tasks.csv_read import Columns
from tasks.data_config import DataConfig
from tasks.errors import DataError
from tasks.splits import distinct_integers

log = logging.getLogger("trainyard.ingest")
MAX_CLASSES_INFERRED = 20


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
    classes = data_cfg.task == "classification" or name in data_cfg.categorical
    text_labels = pd.api.types.is_bool_dtype(y_col) or (classes and not pd.api.types.is_numeric_dtype(y_col))
    y_numeric = None if text_labels else numeric_or_error(path, name, y_col, functools.partial(data.written, name))
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
        i = first_true(bad)
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
