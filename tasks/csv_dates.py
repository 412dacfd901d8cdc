"""Date and time columns as numbers: the year, the month, the day of the week, the day of the year, and the
hour for timestamps, each then standardised like any number.

A column is a date column when pyarrow read it as dates or timestamps (ISO dates and timestamps),
or when it is text whose every present value is an ISO 8601 date, YYYY-MM-DD, with or without a
time (T or a space, then HH:MM, optional seconds and fraction, and an optional Z or +HH:MM
offset). One-hot, a date would be a category per day; read as its parts it keeps the order of
time and the seasons. The parts: `year`; `month` 1-12; `day_of_week` 0 (Monday) to 6;
`day_of_year` 1-366; `hour` 0-23, for timestamps and for text with a time. Timestamps with an
offset or a time zone are read in UTC. The schema records the source, the time zone and the
parts, so the same numbers can be made from raw values later.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks.rowcodec import date_part

ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?")
_OFFSET = re.compile(r"(?:Z|[+-]\d{2}:?\d{2})$")
DATE_PARTS = ("year", "month", "day_of_week", "day_of_year")
TIME_PARTS = ("hour",)
WEEK = "day_of_week: 0 is Monday"


def is_date_type(type_: pa.DataType) -> bool:
    return pa.types.is_date(type_) or pa.types.is_timestamp(type_)


def arrow_dates(col: pd.Series, type_: pa.DataType) -> tuple[pd.Series, dict]:
    """A date or timestamp column as datetimes (NaT where missing), and what the schema records of it."""
    stamps = pd.to_datetime(col)
    timezone = str(type_.tz) if pa.types.is_timestamp(type_) and type_.tz else None
    if timezone:
        stamps = stamps.dt.tz_convert("UTC")
    parts = DATE_PARTS + (TIME_PARTS if pa.types.is_timestamp(type_) else ())
    return stamps, {"source": str(type_), "timezone": timezone and "UTC", "parts": list(parts), "week": WEEK}


def text_dates(texts: np.ndarray) -> tuple[pd.Series, dict] | None:
    """The distinct texts of a column as datetimes, and what the schema records, when every one is an ISO date."""
    if not texts.size or not ISO_DATE.fullmatch(str(texts[0])):  # the cheap look that rejects most text
        return None
    as_text = pd.Series(texts, dtype=object).astype(str)
    if not as_text.str.fullmatch(ISO_DATE.pattern).all():
        return None
    utc = bool(as_text.str.contains(_OFFSET.pattern).any())
    stamps = pd.to_datetime(as_text, format="ISO8601", errors="coerce", utc=utc)
    if stamps.isna().any():  # a date that does not exist, such as 2021-02-30
        return None
    with_time = bool((as_text.str.len() > 10).any())
    parts = DATE_PARTS + (TIME_PARTS if with_time else ())
    record = {"source": "text", "format": "ISO 8601", "timezone": "UTC" if utc else None}
    return stamps, {**record, "parts": list(parts), "week": WEEK}


def date_parts(stamps: pd.Series, parts: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each part's numbers (small integers when nothing is missing, else float64 with NaN), and the missing rows;
    taken as the registered model takes them from raw rows (tasks/rowcodec.py)."""
    missing = stamps.isna().to_numpy()
    out = {}
    for part in parts:
        values = date_part(stamps, part)
        out[part] = values if missing.any() else values.astype(np.int32)
    return out, missing
