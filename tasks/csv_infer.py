"""What the columns of a table are: feature kinds, the target and the task type, the rows kept.

Each feature column gets a kind and the rule that decided it (tasks/csv_kinds.py, whose
docstring lists the rules and their lines): numeric, boolean (booleans and yes/no text), date
(split into numeric parts, tasks/csv_dates.py) or categorical (text, and code-like columns
mixing a few numbers and words); identifier-like columns are left out with a logged note
(tasks/csv_identifiers.py). A column of numbers with a few words that is no code is refused,
naming the row. The task type is taken from data.task or inferred from the target
(tasks/csv_target.py), and the missing-value policy decides which rows are kept.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.csv_file import row_position, utf8_error
from tasks.csv_inferred import Features, Inferred, Rows, Target
from tasks.csv_kinds import column_kinds
from tasks.csv_numbers import first_true
from tasks.csv_read import Columns, selected_features
from tasks.csv_target import infer_target
from tasks.data_config import DataConfig
from tasks.errors import DataError

log = logging.getLogger("trainyard.ingest")


def infer(path: Path, data_cfg: DataConfig, data: Columns) -> Inferred:
    """Everything the encoding needs to know about the columns `data` holds."""
    features = column_kinds(path, data_cfg, data, check_selection(path, data_cfg, data))
    target = infer_target(path, data_cfg, data)
    return Inferred(features, target, kept_rows(path, data_cfg, features, target))


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
    i = first_true(mask)
    return DataError(
        f"CSV file {path}: column {name!r} has a missing value at {row_position(path, i)} and data.missing is "
        f"'error'; fill it in, or set data.missing to impute or drop"
    )
