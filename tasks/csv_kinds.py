"""What each feature column is: numeric, boolean, date, categorical, or left out as an identifier.

The rules, in order (each recorded in the schema as the column's kind and reason; data.drop
removes a column, data.categorical makes it categorical whatever it holds, and data.features
keeps a column an identifier rule would leave out):

1. Identifiers are left out (tasks/csv_identifiers.py): row names, row counters, text distinct
   on nearly every row.
2. Integer and float columns are numeric.
3. Booleans, and text with exactly two values that are yes/no, true/false or y/n (in any case;
   missing values allowed), are boolean: 1 for yes, 0 for no, then standardised like numbers.
4. Dates and timestamps, and text whose every value is an ISO date, become numeric parts
   (tasks/csv_dates.py).
5. Text that mixes numbers and words is code-like, so categorical, when it has at most
   CODE_MAX_DISTINCT distinct values (and at most data.max_categories), each on two rows or
   more on average, and its numbers are whole (doors 2, 3, 4, 5more; cylinders 3, 4, 5, 6, 8,
   rotary). Otherwise, when at most half its values are words, it is a measurement with a few
   bad values and is refused, naming the first row (a word among 300 distinct floats). When most
   of its values are words it is text.
6. Text is categorical (one-hot of its values).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks import csv_dates, csv_identifiers
from tasks.csv_file import row_position
from tasks.csv_inferred import Column, Features
from tasks.csv_numbers import finite_or_error, first_true, no_integers_beyond_int64
from tasks.csv_read import Columns
from tasks.data_config import DataConfig
from tasks.errors import DataError

log = logging.getLogger("trainyard.ingest")
CODE_MAX_DISTINCT = 20  # a code column mixing numbers and words has at most this many distinct values
BOOLEAN_WORDS = ({"yes": 1, "no": 0}, {"true": 1, "false": 0}, {"y": 1, "n": 0})


def column_kinds(path: Path, data_cfg: DataConfig, data: Columns, names: list[str]) -> Features:
    """Each feature's kind, taken out of `data` one at a time; identifiers left out."""
    features = Features()
    for name in names:
        taken = data.parts_of(name) if data.is_numpy(name) else data.series(name)
        type_ = data.type(name)
        data.forget(name)
        # a column listed in data.features by name is used as what it holds, whatever the identifier rules say
        written = functools.partial(data.written, name)
        column = _column(path, data_cfg, name, type_, taken, written, identifiers=name not in data_cfg.features)
        if column.kind == "left_out":
            log.info("left out column %r: %s; list it in data.features to use it", name, column.reason)
            features.left_out.append({"name": name, "reason": column.reason})
            continue
        if column.missing is not None and column.missing.all():
            raise DataError(f"CSV file {path}: column {name!r} has no values at all (every row is missing); drop it")
        clash = [f"{name}.{part}" for part in column.extra.get("parts", ()) if f"{name}.{part}" in names]
        if column.kind == "date" and clash:
            raise DataError(
                f"CSV file {path}: column {name!r} holds dates, whose part {clash[0]!r} has the name of another "
                f"column; expected distinct names (rename one, or drop one with data.drop)"
            )
        column.extra["raw_type"] = _raw_type(type_, taken)  # the model's input type (tasks/rowcodec.py)
        features.add(name, column)
    if not features.names:
        raise DataError(
            f"CSV file {path}: no feature columns left: {', '.join(c['name'] for c in features.left_out)} look like "
            f"identifiers and were left out; list the ones to use in data.features"
        )
    return features


def _raw_type(type_: pa.DataType, taken: Any) -> str:
    """The column's type as one read of the whole file gives it: a column of numbers read in pieces is float
    when any piece is (an integer piece first, a float one later)."""
    if isinstance(taken, list):
        return "double" if any(part.dtype.kind == "f" for part in taken) else "int64"
    return str(type_)


def _column(
    path: Path,
    data_cfg: DataConfig,
    name: str,
    type_: pa.DataType,
    taken: Any,
    written: Callable[[], pd.Series | None],
    identifiers: bool,
) -> Column:
    """One column's kind and values (`written()`: its text as written, for the 64-bit check)."""
    if name in data_cfg.categorical:
        return Column("categorical", "listed in data.categorical", taken, taken.isna().to_numpy())
    if isinstance(taken, list):  # an integer or float column, as pandas would hold it
        return _numbers(path, name, taken, written, identifiers)
    if pa.types.is_boolean(type_):
        values = taken.astype("float64").to_numpy()
        missing = np.isnan(values)
        values = values if missing.any() else values.astype(np.int8)
        return Column("boolean", "booleans (true/false)", values, missing, {"source": "bool"})
    if csv_dates.is_date_type(type_):
        stamps, record = csv_dates.arrow_dates(taken, type_)
        values, missing = csv_dates.date_parts(stamps, record["parts"])
        return Column("date", f"dates, read as {type_}", values, missing, record)
    if pd.api.types.is_numeric_dtype(taken):  # a column with no values at all
        values = taken.to_numpy(dtype="float64", na_value=np.nan)
        return Column("numeric", "numbers", values, np.isnan(values))
    return _text(path, data_cfg, name, taken, identifiers)


def _numbers(
    path: Path, name: str, parts: list[np.ndarray], written: Callable[[], pd.Series | None], identifiers: bool
) -> Column:
    """A column read as numpy parts: numeric, unless it is row names or a row counter."""
    integers = all(part.dtype.kind == "i" for part in parts)
    if identifiers and name in csv_identifiers.ROW_NAME_COLUMNS:
        values = np.concatenate(parts)
        n_rows = values.size
        reason = csv_identifiers.row_names(name, csv_identifiers.distinct_count(values), n_rows)
        if reason and (integers or not np.isnan(values).any()):
            return Column("left_out", reason)
    if integers:  # no missing values: joined later, in a worker
        reason = csv_identifiers.row_counter(parts) if identifiers else None
        return Column("left_out", reason) if reason else Column("numeric", "numbers", parts)
    values = np.concatenate(parts)
    if values.dtype.kind != "f":
        return Column("numeric", "numbers", values)
    finite_or_error(path, name, values)
    no_integers_beyond_int64(path, name, values, written)
    return Column("numeric", "numbers", values, np.isnan(values))


def _text(path: Path, data_cfg: DataConfig, name: str, col: pd.Series, identifiers: bool) -> Column:
    """A text column: boolean, dates, numbers, code-like, text, an identifier, or refused."""
    codes, uniques = pd.factorize(col)  # every rule looks at the distinct values, then maps them to the rows
    texts = np.asarray(uniques, dtype=object)
    missing = codes < 0
    n_rows = codes.size
    row_names = identifiers and csv_identifiers.row_names(name, texts.size, n_rows)
    if row_names:
        return Column("left_out", row_names)
    booleans = _booleans(texts)
    if booleans is not None:
        truth, record = booleans
        values = np.where(missing, np.nan, truth[codes])
        values = values if missing.any() else values.astype(np.int8)
        return Column("boolean", f"{'/'.join(record['words'])} text: two values", values, missing, record)
    dates = csv_dates.text_dates(texts)
    if dates is not None:
        stamps, record = dates
        at_rows = pd.Series(stamps.to_numpy()[np.maximum(codes, 0)], dtype=stamps.dtype).mask(missing)
        values, missing = csv_dates.date_parts(at_rows, record["parts"])
        return Column("date", "text: every value an ISO 8601 date", values, missing, record)
    numbers = pd.to_numeric(pd.Series(texts, dtype=object), errors="coerce").to_numpy(dtype="float64")
    words = np.isnan(numbers)
    if texts.size and not words.any():  # text that is all numbers
        values = np.where(missing, np.nan, numbers[np.maximum(codes, 0)])
        finite_or_error(path, name, values)
        return Column("numeric", "text values that are all numbers", values, missing)
    if not words.all():  # code-like, refused, or (mostly words) text
        mixed = _mixed(path, data_cfg, name, col, codes, numbers)
        if mixed is not None:
            return mixed
    reason = identifiers and csv_identifiers.text_identifier(texts.size, n_rows)
    if reason:
        return Column("left_out", reason)
    return Column("categorical", f"text: {texts.size} distinct values", col, missing)


def _booleans(texts: np.ndarray) -> tuple[np.ndarray, dict] | None:
    """1/0 for each distinct text, and what the schema records, when they are exactly one yes/no pair."""
    if not 2 <= texts.size <= 8:  # two words, in a few spellings at most
        return None
    lowered = [str(t).lower() for t in texts]
    for words in BOOLEAN_WORDS:
        if set(lowered) == set(words):
            truth = np.array([words[w] for w in lowered], dtype=np.float64)
            spelled = {v: sorted(str(t) for t, w in zip(texts, lowered, strict=True) if words[w] == v) for v in (1, 0)}
            yes, no = (w for w, v in sorted(words.items(), key=lambda kv: -kv[1]))
            record = {"source": "text", "words": [yes, no], "true": spelled[1], "false": spelled[0]}
            return truth, {**record, "match": "case-insensitive"}
    return None


def _mixed(
    path: Path,
    data_cfg: DataConfig,
    name: str,
    col: pd.Series,
    codes: np.ndarray,
    numbers: np.ndarray,
) -> Column | None:
    """Text mixing numbers and words: code-like (categorical); refused when mostly numbers; else None (text)."""
    counts = np.bincount(codes[codes >= 0], minlength=numbers.size)
    n_distinct, n_present = numbers.size, int(counts.sum())
    limit = min(CODE_MAX_DISTINCT, data_cfg.max_categories)
    found = numbers[~np.isnan(numbers)]
    whole = bool(np.all(found == np.round(found)))
    if n_distinct <= limit and 2 * n_distinct <= n_present and whole:
        reason = f"code-like: {n_distinct} distinct values mixing numbers and words"
        return Column("categorical", reason, col, codes < 0)
    if int(counts[np.isnan(numbers)].sum()) > n_present // 2:
        return None
    if n_distinct > limit:
        why = f"{n_distinct} distinct values (a code column has at most {limit})"
    elif not whole:
        why = "numbers that are not whole (a code column's are)"
    else:
        why = f"{n_distinct} distinct values in {n_present} rows (a code column's repeat, twice a value on average)"
    i = first_true(np.isnan(numbers)[np.maximum(codes, 0)] & (codes >= 0))
    raise DataError(
        f"CSV file {path}: column {name!r} holds numbers but {row_position(path, i)} has {col.iloc[i]!r}; "
        f"expected a number: with {why} it reads as a measurement (list the column in data.categorical if it "
        f"is a code)"
    )
