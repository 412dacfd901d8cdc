"""Identifier-like columns: left out of the features (with a logged note) unless data.features lists them.

An identifier tells rows apart and says nothing the model can learn from; kept, it is either
noise (a number per row) or a one-hot block as wide as the table. Three rules, each cheap:

- Row names: a column named `rownames` (R's write.csv) or `Unnamed: 0` (pandas' name for the
  empty header pandas' to_csv writes over its index) with a distinct value on every row.
- A row counter: an integer column without missing values, of at least ID_MIN_ROWS rows,
  strictly increasing from each row to the next (1, 2, 3, ... or any increasing ids). An
  integer column that ever repeats or goes down is a measurement; floats are never counters
  (a float column distinct on every row is a measurement). One vectorised pass, after a
  look at the first ROWS_LOOKED_AT values that rejects almost every real measurement.
- A text identifier: a text column (mostly words, see tasks/csv_kinds.py) of at least
  ID_MIN_ROWS rows with a distinct value on at least ID_DISTINCT_SHARE of the rows (names,
  ticket numbers, ids): one-hot, it would be a column per row.
"""

from __future__ import annotations

import numpy as np

ROW_NAME_COLUMNS = {
    "rownames": "row names (the column R's write.csv writes)",
    "Unnamed: 0": "an unnamed first column (where pandas' to_csv writes the row index)",
}
ID_MIN_ROWS = 20  # fewer rows cannot tell an id from a measurement
ID_DISTINCT_SHARE = 0.9  # a text column distinct on at least this share of the rows is an identifier
ROWS_LOOKED_AT = 64


def row_names(name: str, n_distinct: int, n_rows: int) -> str | None:
    """Why the column is row names, or None."""
    if name in ROW_NAME_COLUMNS and n_rows and n_distinct == n_rows:
        return f"{ROW_NAME_COLUMNS[name]}: a distinct value on every row"
    return None


def distinct_count(values: np.ndarray) -> int:
    """Distinct values of a numeric column (a missing value counts as none)."""
    if values.dtype.kind == "f":
        values = values[~np.isnan(values)]
    return int(np.unique(values).size)


def row_counter(parts: list[np.ndarray]) -> str | None:
    """Why an integer column without missing values (in pieces) is a row counter, or None."""
    parts = [p for p in parts if p.size]
    n = sum(p.size for p in parts)
    if n < ID_MIN_ROWS:
        return None
    head = parts[0][:ROWS_LOOKED_AT]
    if not (head[1:] > head[:-1]).all():  # the cheap look that rejects a measurement
        return None
    for i, part in enumerate(parts):
        if i and part[0] <= parts[i - 1][-1]:
            return None
        if not (part[1:] > part[:-1]).all():
            return None
    lo, hi = int(parts[0][0]), int(parts[-1][-1])
    if hi - lo == n - 1:  # strictly increasing over n rows by n - 1 in all: by one on every row
        return f"a row counter: integers from {lo} to {hi}, increasing by one on every row"
    return f"a row index or id: integers strictly increasing on every row, from {lo} to {hi}"


def text_identifier(n_distinct: int, n_rows: int) -> str | None:
    """Why a text column is an identifier, or None."""
    if n_rows >= ID_MIN_ROWS and n_distinct >= ID_DISTINCT_SHARE * n_rows:
        return (
            f"an identifier: text with {n_distinct} distinct values in {n_rows} rows "
            f"(at least {ID_DISTINCT_SHARE:.0%} distinct)"
        )
    return None
