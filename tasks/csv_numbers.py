"""The checks every column of numbers passes, a feature's or the target's: finite, integers within 64 bits,
and (for the target) no word among its numbers unless the config says it holds classes."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.csv_file import row_position
from tasks.errors import DataError


def first_true(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def numeric_or_error(
    path: Path, name: str, col: pd.Series, written: Callable[[], pd.Series | None]
) -> np.ndarray | None:
    """Numbers from a column: None when it is text; an error when it is numbers with a few bad values.
    `written()` gives the column's values as written (see no_integers_beyond_int64)."""
    if pd.api.types.is_bool_dtype(col):
        return col.astype("float64").to_numpy()
    if pd.api.types.is_numeric_dtype(col):
        values = col.to_numpy(dtype="float64", na_value=np.nan)
        finite_or_error(path, name, values)
        if pd.api.types.is_float_dtype(col):
            no_integers_beyond_int64(path, name, values, written)
        return values
    present = col.notna().to_numpy()
    coerced = pd.to_numeric(col, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    bad = present & np.isnan(coerced)
    n_present = int(present.sum())
    if n_present and bad.sum() <= n_present // 2 and bad.any():
        i = first_true(bad)
        raise DataError(
            f"CSV file {path}: column {name!r} holds numbers but {row_position(path, i)} has {col.iloc[i]!r}; "
            f"expected a number (or list the column in data.categorical)"
        )
    return None if bad.any() else coerced


def finite_or_error(path: Path, name: str, values: np.ndarray) -> None:
    bad = np.isinf(values)
    if bad.any():
        i = first_true(bad)
        raise DataError(
            f"CSV file {path}: column {name!r} has an infinite value (or one beyond float64's range) at "
            f"{row_position(path, i)}; expected a finite number"
        )


def no_integers_beyond_int64(
    path: Path, name: str, values: np.ndarray, written: Callable[[], pd.Series | None]
) -> None:
    """pyarrow reads integers beyond 64 bits in a CSV file as doubles, silently rounding them (ids, labels);
    refuse those. `written()` gives the column's text as written, read with the file's delimiter and
    encoding (tasks/csv_read.py Columns.written), or None for a Parquet file, whose doubles were written as
    doubles."""
    with np.errstate(invalid="ignore"):
        big = np.abs(values) >= 2.0**63
    if not big.any():
        return
    text = written()
    if text is None:
        return
    integer = re.compile(r"\s*[+-]?\d+\s*")
    for i in np.flatnonzero(big):
        token = text.iloc[i]
        if isinstance(token, str) and integer.fullmatch(token):
            raise DataError(
                f"CSV file {path}: column {name!r} has the integer {token.strip()} at {row_position(path, i)}, "
                f"beyond the 64-bit range; expected integers between -2**63 and 2**63-1 (drop the column with "
                f"data.drop if it is an id)"
            )
