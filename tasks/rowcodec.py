"""Raw rows in, the network's inputs out, and its outputs back as labels and probabilities.

The registered model (tasks/pyfunc_model.py) carries this file and the training run's
schema.json: the fitted encoding as data (each feature's kind, its training mean, standard
deviation and median, a categorical column's vocabulary, a date's parts), so a raw row is
encoded with the very numbers the ingest used (tasks/csv_encode.py, tasks/csv_standardise.py):
(value - mean) / std in float64, a missing number imputed with the training median, a category
one-hot with the training vocabulary and an unseen one all zeros. A table's outputs decode to the
label in the target's own classes with one probability per class, or to the prediction in the
target's unit; an image model's to the digit and its probabilities.

It needs numpy and pandas only: it runs inside the model wherever MLflow loads it, without
Trainyard installed. The ingest takes a date's parts (`date_part`) and the missing category's
marker from here, so those are one code; its standardisation is its own faster route to the same
numbers, which tests/test_pyfunc.py checks bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

MISSING = "<missing>"  # a missing categorical value, as the vocabulary holds it (tasks/csv_encode.py)
PREDICTION = "prediction"
PROBABILITY = "probability_"  # + the class's name: one column per class
# A date's parts, as pandas' datetime accessor names them; the ingest takes them with date_part too.
DATE_PART_FIELDS = {
    "year": "year",
    "month": "month",
    "day_of_week": "dayofweek",
    "day_of_year": "dayofyear",
    "hour": "hour",
}


class InputError(ValueError):
    """Rows the model cannot score: a missing column or a value of the wrong type (one line)."""

    def __init__(self, message: str, column: str | None = None, row: int | None = None):
        super().__init__(message)
        self.column, self.row = column, row  # row: the 0-based position in the frame scored


@dataclass
class Report:
    """What the encoding met: per column, the rows with a missing value and the rows with an unseen category."""

    rows: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    unseen: dict[str, int] = field(default_factory=dict)
    rows_missing: int = 0  # rows with at least one missing value
    rows_unseen: int = 0  # rows with at least one category the training split did not have

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "rows_missing": self.rows_missing,
            "rows_unseen": self.rows_unseen,
            "missing": self.missing,
            "unseen": self.unseen,
        }


def mlflow_type(raw_type: str | None, kind: str, missing: int = 0) -> str:
    """The MLflow column type of a feature read as `raw_type` (pyarrow's name), or by its kind when unknown.
    Integers with a missing value are doubles, as pandas holds them (NaN)."""
    t = (raw_type or "").lower()
    if t.startswith(("int", "uint")):
        return "double" if missing else "long"
    if t.startswith(("double", "float", "halffloat", "decimal", "null")):
        return "double"
    if t == "bool":
        return "boolean"
    if t.startswith("date") or (t.startswith("timestamp") and "tz=" not in t):
        return "datetime"
    if t:
        return "string"
    return {"numeric": "double", "date": "datetime"}.get(kind, "string")


class RowCodec:
    """A table model's encoding of raw rows (`encode`) and decoding of its outputs (`decode`), from schema.json."""

    def __init__(self, schema: dict[str, Any]):
        self.schema = schema
        self.features: list[dict[str, Any]] = schema["features"]
        self.columns = [f["name"] for f in self.features]
        self.column_types = {f["name"]: mlflow_type(f.get("raw_type"), f["kind"], f["missing"]) for f in self.features}
        self.width = int(schema["input_shape"][0])
        self.task = schema["task"]
        self.labels = _labels(schema) if self.task == "classification" else []
        if self.task == "classification":
            self.output_columns = [PREDICTION, *(f"{PROBABILITY}{name}" for name in schema["label_names"])]
        else:
            self.output_columns = [PREDICTION]

    # ---- raw rows -> the network's inputs -----------------------------------------------------

    def check_columns(self, frame: pd.DataFrame) -> None:
        """Every feature column present, or one line naming the missing ones and the expected ones."""
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise InputError(
                f"missing feature column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                f"the model expects {', '.join(self.columns)}",
                column=missing[0],
            )

    def encode(self, frame: pd.DataFrame) -> tuple[np.ndarray, Report]:
        """The float32 matrix the network takes, one row per row of `frame`, and what the encoding met."""
        self.check_columns(frame)
        n = len(frame)
        x = np.empty((n, self.width), dtype=np.float32)
        report = Report(rows=n)
        any_missing, any_unseen = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        col_i = 0
        for feature in self.features:
            name, kind = feature["name"], feature["kind"]
            column = frame[name].reset_index(drop=True)
            if kind == "categorical":
                missing, unseen = self._one_hot(feature, column, x, col_i)
                col_i += len(feature["vocabulary"])
                _count(report.unseen, name, unseen, any_unseen)
            elif kind == "date":
                missing = self._date(feature, column, x, col_i)
                col_i += len(feature["parts"])
            else:
                values = _booleans(feature, column) if kind == "boolean" else _numbers(feature, column)
                missing = np.isnan(values)
                x[:, col_i] = _standardised(values, missing, feature)
                col_i += 1
            _count(report.missing, name, missing, any_missing)
        report.rows_missing, report.rows_unseen = int(any_missing.sum()), int(any_unseen.sum())
        return x, report

    def _one_hot(self, feature: dict, column: pd.Series, x: np.ndarray, col_i: int) -> tuple[np.ndarray, np.ndarray]:
        """A categorical column one-hot into x[:, col_i:], as the ingest's _one_hot; (missing, unseen) rows."""
        vocab = feature["vocabulary"]
        texts = _as_training_text(feature, column)
        missing = (texts == MISSING).to_numpy()
        codes = pd.Index(vocab).get_indexer(texts.to_numpy(dtype=object))
        block = x[:, col_i : col_i + len(vocab)]
        block[:] = 0.0
        seen = codes >= 0
        block[np.flatnonzero(seen), codes[seen]] = 1.0
        return missing, ~seen & ~missing  # a missing value is counted as missing, not as an unseen category

    def _date(self, feature: dict, column: pd.Series, x: np.ndarray, col_i: int) -> np.ndarray:
        """A date column's parts into x[:, col_i:], each standardised; the rows with no date."""
        stamps = _datetimes(feature, column)
        missing = stamps.isna().to_numpy()
        for j, part in enumerate(feature["parts"]):
            x[:, col_i + j] = _standardised(date_part(stamps, part["part"]), missing, part)
        return missing

    # ---- the network's outputs -> predictions -------------------------------------------------

    def decode(self, outputs: np.ndarray) -> pd.DataFrame:
        """The prediction (a label, or a number in the target's unit) and, for classes, one probability each."""
        outputs = np.asarray(outputs, dtype=np.float64)
        if self.task != "classification":
            target = self.schema["target"]
            return pd.DataFrame({PREDICTION: outputs.reshape(-1) * target["std"] + target["mean"]})
        if self.schema.get("binary"):
            p1 = 1.0 / (1.0 + np.exp(-outputs.reshape(-1)))
            probabilities = np.stack([1.0 - p1, p1], axis=1)
            codes = (outputs.reshape(-1) > 0).astype(np.int64)  # as evaluation decides (tasks/forward.py)
        else:
            probabilities, codes = softmax(outputs), outputs.argmax(axis=1)
        frame = pd.DataFrame({PREDICTION: pd.Series(self.labels).iloc[codes].to_numpy()})
        for k, name in enumerate(self.output_columns[1:]):
            frame[name] = probabilities[:, k]
        return frame


def softmax(outputs: np.ndarray) -> np.ndarray:
    """Each row's class probabilities from the network's outputs (logits)."""
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def date_part(stamps: pd.Series, part: str) -> np.ndarray:
    """One part of datetimes (year, month, day_of_week 0 = Monday, day_of_year, hour) as float64, NaN where
    there is no date."""
    return getattr(stamps.dt, DATE_PART_FIELDS[part]).to_numpy(dtype="float64", na_value=np.nan)


def _labels(schema: dict[str, Any]) -> list[Any]:
    """The classes' names as values of the target's own type: numbers stay numbers, booleans booleans."""
    names = schema["label_names"]
    dtype = str(schema["target"].get("dtype", "object"))
    if dtype == "bool":
        return [name == "True" for name in names]
    if dtype.startswith(("int", "uint", "float")):
        try:
            return [int(name) for name in names]
        except ValueError:
            return [float(name) for name in names]
    return list(names)


def _count(counts: dict[str, int], name: str, rows: np.ndarray, any_rows: np.ndarray) -> None:
    n = int(rows.sum())
    if n:
        counts[name] = n
        any_rows |= rows


def _first_bad(name: str, column: pd.Series, bad: np.ndarray, expected: str) -> InputError:
    """The refusal of a column's first value of the wrong type, with its row."""
    row = int(np.flatnonzero(bad)[0])
    return InputError(f"column {name!r} row {row + 1}: expected {expected}, got {column.iloc[row]!r}", name, row)


def _numbers(feature: dict, column: pd.Series) -> np.ndarray:
    """A numeric column as float64, NaN where a value is missing; a value that is not a number is refused."""
    if pd.api.types.is_bool_dtype(column.dtype):
        raise _first_bad(feature["name"], column, np.ones(len(column), dtype=bool), "a number")
    if pd.api.types.is_numeric_dtype(column.dtype):
        return column.to_numpy(dtype="float64", na_value=np.nan)
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    bad = np.isnan(values) & column.notna().to_numpy() & (column.astype("string").str.strip() != "").to_numpy()
    if bad.any():
        raise _first_bad(feature["name"], column, bad, "a number")
    return values


def _booleans(feature: dict, column: pd.Series) -> np.ndarray:
    """A boolean column as 1.0/0.0 (NaN where missing): booleans, or the yes/no words the training data spelled."""
    if pd.api.types.is_bool_dtype(column.dtype):
        return column.to_numpy(dtype="float64")
    words = {"true": 1.0, "false": 0.0, "1": 1.0, "0": 0.0}
    if feature.get("source") == "text":
        yes, no = feature["words"]
        words.update({yes: 1.0, no: 0.0})
    present = column.notna().to_numpy()
    texts = column.astype("string").str.strip().str.lower()
    values = texts.map(words).to_numpy(dtype="float64", na_value=np.nan)
    bad = present & np.isnan(values)
    if bad.any():
        spelled = "/".join(feature["words"]) if feature.get("source") == "text" else "true/false"
        raise _first_bad(feature["name"], column, bad, f"a boolean ({spelled})")
    return values


def _datetimes(feature: dict, column: pd.Series) -> pd.Series:
    """A date column as datetimes (NaT where missing), in UTC when the training data's were."""
    utc = feature.get("timezone") == "UTC"
    if pd.api.types.is_datetime64_any_dtype(column.dtype):
        stamps = column
    else:
        present = column.notna().to_numpy()
        text = column.astype("string")
        stamps = pd.to_datetime(text, format="ISO8601", errors="coerce", utc=utc)
        bad = present & stamps.isna().to_numpy() & (text.str.strip() != "").to_numpy()
        if bad.any():
            raise _first_bad(feature["name"], column, bad, "an ISO 8601 date (YYYY-MM-DD, optionally with a time)")
    if getattr(stamps.dt, "tz", None) is not None:
        stamps = stamps.dt.tz_convert("UTC")
        if not utc:
            stamps = stamps.dt.tz_localize(None)
    return stamps


def _as_training_text(feature: dict, column: pd.Series) -> pd.Series:
    """A categorical column's values as the text the vocabulary holds (pandas' astype("string") of the column as
    read at training), MISSING where a value is missing."""
    raw = mlflow_type(feature.get("raw_type"), "categorical", feature["missing"])
    if raw in ("long", "double") and not pd.api.types.is_numeric_dtype(column.dtype):
        column = pd.to_numeric(column, errors="coerce")
    if raw == "long":
        column = column.astype("Int64")  # a whole number as the training column's integers spelled it
    elif raw == "double":
        column = column.astype("float64")
    return column.astype("string").fillna(MISSING)


def _standardised(values: np.ndarray, missing: np.ndarray, stats: dict) -> np.ndarray:
    """(value - mean) / std in float64, a missing value imputed with the training median; as float32."""
    if missing.any():
        values = np.where(missing, stats["median"], values)
    return np.divide(np.subtract(values, stats["mean"], dtype=np.float64), stats["std"]).astype(np.float32)
