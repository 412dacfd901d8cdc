"""The target's values per kept row: class codes in the order of the sorted labels, or the numbers to regress.

Integer labels are counted and numeric ones coded without a Python object per row; text
labels are sorted (by their text when they do not compare). Classification needs two classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.csv_inferred import Rows, Target
from tasks.errors import DataError
from tasks.splits import distinct_integers


@dataclass
class Labels:
    """One target value per kept row: class codes (int64) or the numbers to regress (float64)."""

    names: list[str]  # the classes' names, by code; empty for regression
    values: np.ndarray


def encode_labels(path: Path, target: Target, rows: Rows) -> Labels:
    """The kept rows' target values: class codes in the order of the sorted labels, or the numbers."""
    if target.task != "classification":
        return Labels([], target.numeric[rows.kept].astype(np.float64))
    if target.ints is not None:
        return _integer_classes(path, target, rows)
    if target.numeric is not None:
        return _number_classes(path, target, rows)
    return _text_classes(path, target, rows)


def _label_names(path: Path, target: Target, uniques: list) -> list[str]:
    """The labels' names, once there are at least two."""
    names = [_label_name(v) for v in uniques]
    if len(names) < 2:
        shown = names[0] if names else "none"
        raise DataError(
            f"CSV file {path}: target {target.name!r} has only one class ({shown!r}); classification needs at least 2"
        )
    return names


def _label_name(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _integer_classes(path: Path, target: Target, rows: Rows) -> Labels:
    """Integer labels, from counts: their names as float64 labels would have them."""
    raw = target.ints if rows.all else target.ints[rows.kept]
    distinct = distinct_integers(raw)
    names = _label_names(path, target, [np.float64(v) for v in distinct])
    lo = int(distinct[0])
    code = np.zeros(int(distinct[-1]) - lo + 1, dtype=np.int64)
    code[distinct - lo] = np.arange(distinct.size)
    return Labels(names, code[raw - lo])


def _number_classes(path: Path, target: Target, rows: Rows) -> Labels:
    """Numeric labels, coded without a Python object per row."""
    raw = target.numeric if rows.all else target.numeric[rows.kept]
    uniques = sorted(pd.unique(raw))
    names = _label_names(path, target, uniques)
    return Labels(names, np.searchsorted(np.asarray(uniques, dtype=np.float64), raw).astype(np.int64))


def _text_classes(path: Path, target: Target, rows: Rows) -> Labels:
    """Text (or boolean, or mixed) labels, sorted (by their text when they do not compare)."""
    raw_labels = target.column.iloc[rows.kept]
    uniques = pd.unique(raw_labels)
    try:
        uniques = sorted(uniques)
    except TypeError:
        uniques = sorted(uniques, key=str)
    names = _label_names(path, target, uniques)
    codes = pd.Index(uniques, dtype=object).get_indexer(raw_labels.astype(object)).astype(np.int64)
    if (codes < 0).any():  # values the index could not match (e.g. equal but differently typed): map one by one
        index = {v: i for i, v in enumerate(uniques)}
        codes = np.fromiter((index[v] for v in raw_labels), dtype=np.int64, count=rows.kept.size)
    return Labels(names, codes)
