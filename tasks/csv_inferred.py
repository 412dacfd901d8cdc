"""What inference found out about a table's columns: the records the encoding reads (tasks/csv_encode.py).

Kept apart from the rules that fill them (tasks/csv_kinds.py, tasks/csv_target.py) so that the
encoding, the labels and the standardisation depend on the records alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class Column:
    """One feature column once its kind is decided (or it is left out: kind 'left_out')."""

    kind: str  # numeric, boolean, date, categorical or left_out
    reason: str  # the rule that decided it, as the schema records it
    # numbers (float64 with NaN, an int array, or int parts), the Series of a categorical column, or a date's
    # parts (part -> numbers)
    values: Any = None
    missing: np.ndarray | None = None  # where a value is missing; None when none can be
    extra: dict[str, Any] = field(default_factory=dict)  # what else the schema records to redo the encoding


@dataclass
class Features:
    """The feature columns by kind, and the rows where each one misses a value."""

    names: list[str] = field(default_factory=list)  # the columns used, in the order of the tensors' columns
    # keyed by tensor column: float64 with NaN for missing values, or integers (compact; in pieces, joined
    # later in a worker); a date column's parts are keyed '<column>.<part>'
    numeric: dict[str, Any] = field(default_factory=dict)
    categorical: dict[str, pd.Series] = field(default_factory=dict)
    missing: dict[str, np.ndarray] = field(default_factory=dict)  # only columns (and parts) with a missing value
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)  # column -> kind, reason and what else to record
    parts: dict[str, list[str]] = field(default_factory=dict)  # a date column -> the numeric keys of its parts
    left_out: list[dict[str, str]] = field(default_factory=list)  # {"name", "reason"} of columns not used

    def add(self, name: str, column: Column) -> None:
        """Record a column that is used, under its kind."""
        self.names.append(name)
        self.kinds[name] = {"kind": column.kind, "reason": column.reason, **column.extra}
        missing = column.missing if column.missing is not None and column.missing.any() else None
        if column.kind == "categorical":
            self.categorical[name] = column.values
        elif column.kind == "date":
            self.parts[name] = []
            for part, values in column.values.items():
                key = f"{name}.{part}"
                self.parts[name].append(key)
                self.numeric[key] = values
                if missing is not None:
                    self.missing[key] = missing
        else:
            self.numeric[name] = column.values
        if missing is not None:
            self.missing[name] = missing


@dataclass
class Target:
    """The target column and what it says about the task."""

    name: str
    column: pd.Series
    missing: np.ndarray
    numeric: np.ndarray | None  # its numbers (NaN where missing); None when the labels are text
    ints: np.ndarray | None  # its int64 values when they can be counted (see tasks/csv_target.py)
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
