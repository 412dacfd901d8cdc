"""CSV ingest: a CSV file -> standardised float32 tensors, encoded labels and a schema.

Statistics (means, standard deviations, medians, vocabularies) come from the training
split only. Every refusal names the file, the column and, where there is one, the row.
Row numbers count data rows from 1; the file line is one more (the header is line 1).

The file is read with pyarrow and the options pandas.read_csv(engine="pyarrow") passes
it, so every column gets the type and values it would have in that DataFrame, but no
DataFrame of the whole file is built: a large plain file is read in pieces of whole
lines, each piece is boiled down to the columns the ingest needs (numbers as compact
numpy arrays) before the next one is read, and the numeric features are standardised
a few columns at a time straight into the split tensors. The peak memory stays a small
multiple of the tensors' size.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import torch

from tasks.errors import DataError
from tasks.hashing import sha256_file
from tasks.prepared import Prepared, cache_key
from tasks.splits import distinct_integers, split_indices

log = logging.getLogger("trainyard.ingest")
MISSING = "<missing>"
MAX_CLASSES_INFERRED = 20

# pandas' default missing-value strings (pandas._libs.parsers.STR_NA_VALUES), which
# pandas.read_csv(engine="pyarrow") passes to pyarrow as null_values; the test suite
# checks that they still match the installed pandas.
NA_VALUES = (
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
)  # fmt: skip
PIECE_BYTES = 8 << 20  # a plain file larger than this is read in pieces of about this size
GROUP = 16  # numeric feature columns standardised side by side, then copied into the tensors at once
COPY_ROWS = 1 << 16  # rows copied into a tensor per task


def local_path(path_or_uri: str) -> Path:
    """A local path from a plain path or a file:// URI."""
    if path_or_uri.startswith("file://"):
        parsed = urlparse(path_or_uri)
        return Path(unquote(parsed.path))
    if "://" in path_or_uri:
        scheme = path_or_uri.split("://", 1)[0]
        raise DataError(f"data.path {path_or_uri!r}: scheme {scheme}:// is not supported; use a local path or file://")
    return Path(path_or_uri)


@contextlib.contextmanager
def _decompressed(path: Path, text: bool = False):
    """The file's bytes (or its text, undecodable bytes replaced) as the reader sees them: a
    compressed file (.gz, .bz2, .zip, .xz, .zst) decompressed, so the checks below report names,
    lines and byte offsets of the CSV itself."""
    from pandas.io.common import get_handle

    with get_handle(str(path), "rb", compression="infer", is_text=False) as handles:
        if not text:
            yield handles.handle
            return
        wrapper = io.TextIOWrapper(handles.handle, encoding="utf-8", errors="replace", newline="")
        try:
            yield wrapper
        finally:
            wrapper.detach()


def _utf8_error(path: Path, detail: str = "") -> DataError:
    """Where the first byte that is not UTF-8 sits (offset and line), found by decoding the file in chunks."""
    offset, line, pending = 0, 1, b""
    with _decompressed(path) as f:
        while True:
            chunk = f.read(1 << 20)
            data = pending + chunk
            if not data:
                break
            try:
                data.decode("utf-8")
                bad = None
            except UnicodeDecodeError as exc:
                bad = exc
            if bad is None or (chunk and bad.reason == "unexpected end of data"):  # a character cut by the chunk
                cut = len(data) if bad is None else bad.start
                line += data[:cut].count(b"\n")
                offset, pending = offset + cut, data[cut:]
                continue
            line += data[: bad.start].count(b"\n")
            return DataError(
                f"CSV file {path} is not valid UTF-8 text (byte 0x{data[bad.start]:02x} at byte offset "
                f"{offset + bad.start}, line {line}); save it as UTF-8"
            )
    return DataError(f"CSV file {path} is not valid UTF-8 text ({detail}); save it as UTF-8")


def _header(path: Path) -> list[str]:
    """The header's column names as written (pandas renames duplicates to `a.1`, so they are read here)."""
    with _decompressed(path, text=True) as f:
        names = next(csv.reader(f), [])
    if names and names[0].startswith("\ufeff"):
        names[0] = names[0][1:]
    return names


def _ragged_line(path: Path, n_fields: int) -> tuple[int, int] | None:
    """(line, fields) of the first record whose field count differs from the header's."""
    with _decompressed(path, text=True) as f:
        reader = csv.reader(f)
        next(reader, None)
        for record in reader:
            if record and len(record) != n_fields:
                return reader.line_num, len(record)
    return None


# ---- reading ------------------------------------------------------------------------------------


def _convert_options() -> pacsv.ConvertOptions:
    """pandas.read_csv(engine="pyarrow")'s options: its missing-value strings, empty strings
    (quoted or not) as missing, and otherwise pyarrow's defaults (true/false values, type inference)."""
    return pacsv.ConvertOptions(null_values=list(NA_VALUES), strings_can_be_null=True)


def _read_error(path: Path, exc: Exception) -> DataError:
    """The refusal for an exception from pyarrow's CSV reader (what pandas would have raised, in words)."""
    if isinstance(exc, UnicodeDecodeError):  # bytes that are not UTF-8 in the header
        return _utf8_error(path, f"{exc.reason} at byte {exc.start}")
    text = str(exc)
    if "Empty CSV file" in text:  # pandas: EmptyDataError
        return DataError(f"CSV file {path} has no columns; expected a header line and data rows")
    if "utf8" in text.lower() or "utf-8" in text.lower():
        return _utf8_error(path, text)
    ragged = re.search(r"Expected (\d+) columns, got (\d+)", text)  # pyarrow reports ragged rows as ArrowInvalid
    where = _ragged_line(path, int(ragged.group(1))) if ragged else None
    if where:
        return DataError(
            f"CSV file {path} could not be parsed: line {where[0]} has {where[1]} fields, "
            f"expected {ragged.group(1)} like the header ({text})"
        )
    return DataError(f"CSV file {path} could not be parsed: {exc}")


def _read_whole(path: Path) -> pa.Table:
    """The whole file in one read, opened as pandas opens it (a compressed file is decompressed)."""

    def read(parse: pacsv.ParseOptions | None = None) -> pa.Table:
        with _decompressed(path) as f:
            table = pacsv.read_csv(f, parse_options=parse, convert_options=_convert_options())
        table.column_names  # noqa: B018 - a header that is not UTF-8 fails here
        return table

    try:
        try:
            return read()
        except pa.ArrowInvalid:
            # A quoted value spanning lines (valid CSV) across one of pyarrow's 1 MiB blocks fails
            # a plain read: read again with quote-aware block cuts (slower, so only after a failure;
            # a file that is really broken fails again, with the same message).
            return read(pacsv.ParseOptions(newlines_in_values=True))
    except Exception as exc:  # noqa: BLE001 - whatever the reader or decompressor raises is the file's fault
        raise _read_error(path, exc) from None


class _Mismatch(Exception):
    """A piece of the file got other column types than the first piece: read the file whole instead."""


def _numpy_part(column: pa.ChunkedArray) -> np.ndarray:
    """An integer or float Arrow column as numpy, with the values pandas would give it.

    Integers without missing values come in the narrowest integer type that holds them (exact,
    and a 0/1 flag takes one byte); anything else as float64 with NaN where a value is missing
    (pandas turns an integer column with missing values into float64 the same way).
    """
    if pa.types.is_null(column.type):
        return np.full(len(column), np.nan)
    if pa.types.is_integer(column.type) and column.null_count == 0:
        values = column.to_numpy()
        if values.size and values.dtype == np.int64:
            lo, hi = values.min(), values.max()
            for dtype in (np.int8, np.int16, np.int32):
                info = np.iinfo(dtype)
                if info.min <= lo and hi <= info.max:
                    return values.astype(dtype)
        return values
    return np.asarray(column.to_numpy(), dtype=np.float64)


def _numeric_kind(type_: pa.DataType) -> bool:
    """Whether a piece of an integer or float column may have this type and still be read as one read of the
    file would: integers (also the narrower ones asked for, see _Pieces), floats or nothing but missing values.
    A column with integers in one piece and floats in another is float64 in one read (pyarrow tries every
    candidate type in turn: none between int64 and float64 takes both), with the same values; one with
    integers and booleans would be boolean, hence no booleans here."""
    return pa.types.is_integer(type_) or pa.types.is_float64(type_) or pa.types.is_null(type_)


_ARROW_INTS = {np.dtype(t): pa.from_numpy_dtype(t) for t in (np.int8, np.int16, np.int32, np.int64)}


class _Columns:
    """The columns an ingest needs, gathered from Arrow tables of consecutive rows of one file.

    Integer and float columns that may become numeric features are kept as numpy arrays (see
    _numpy_part); the target, the columns listed in data.categorical and columns of any other
    type keep their Arrow chunks and become a pandas Series when asked for, the Series
    pandas.read_csv(engine="pyarrow") would have held. Columns nobody needs are not kept.
    """

    def __init__(self, data_cfg) -> None:
        self.cfg = data_cfg
        self.reset()

    def reset(self) -> None:
        self.raw_names: list[str] | None = None
        self.names: list[str] = []
        self.types: list[pa.DataType] | None = None
        self.n_rows = 0
        self.parts: dict[int, list] = {}
        self.as_numpy: set[int] = set()
        self.widest: dict[int, np.dtype] = {}  # integer columns so far without a missing value: their widest dtype

    def _plan(self, table: pa.Table) -> None:
        self.raw_names = table.column_names
        self.names = _pandas_names(self.raw_names)
        cfg = self.cfg
        features = list(cfg.features) or [c for c in self.names if c != cfg.target and c not in cfg.drop]
        needed = {c for c in features if c not in cfg.drop} | {cfg.target}
        for i, name in enumerate(self.names):
            if name in needed:
                self.parts[i] = []

    def add(self, table: pa.Table) -> None:
        if self.raw_names is None:
            self._plan(table)
        if table.num_rows == 0:  # nothing to keep (and every type of an empty piece is null)
            return
        types = table.schema.types
        if self.types is None:
            self.types = types
            self.as_numpy = {
                i
                for i in self.parts
                if self.names[i] != self.cfg.target
                and self.names[i] not in self.cfg.categorical
                and (pa.types.is_integer(types[i]) or pa.types.is_float64(types[i]))
            }
        else:
            for i in self.parts:
                if types[i] != self.types[i] and not (i in self.as_numpy and _numeric_kind(types[i])):
                    raise _Mismatch
        for i, parts in self.parts.items():
            column = table.column(i)
            if i in self.as_numpy:
                part = _numpy_part(column)
                parts.append(part)
                if part.dtype.kind != "i":
                    self.widest.pop(i, None)
                elif len(parts) == 1 or i in self.widest:
                    self.widest[i] = max(self.widest.get(i, part.dtype), part.dtype, key=lambda d: d.itemsize)
            else:
                parts.extend(column.chunks)
        self.n_rows += table.num_rows

    def piece_types(self) -> dict[str, pa.DataType]:
        """Column types to parse the next piece with: integer features as the narrowest type that held them
        so far (pyarrow then writes them compactly, and refuses a value that does not fit: see _Pieces)."""
        if self.raw_names is None or len(set(self.raw_names)) < len(self.raw_names):
            return {}
        return {self.raw_names[i]: _ARROW_INTS[dtype] for i, dtype in self.widest.items()}

    def index(self, name: str) -> int:
        return self.names.index(name)

    def forget(self, name: str) -> None:
        """Let go of a column once its values have been taken."""
        self.parts[self.index(name)] = []

    def is_numpy(self, name: str) -> bool:
        return self.index(name) in self.as_numpy

    def type(self, name: str) -> pa.DataType:
        return self.types[self.index(name)]

    def parts_of(self, name: str) -> list[np.ndarray]:
        """An integer or float column's values (see _numpy_part), piece by piece."""
        return self.parts[self.index(name)]

    def series(self, name: str) -> pd.Series:
        """The column as pandas.read_csv(engine="pyarrow") would have it."""
        i = self.index(name)
        column = pa.chunked_array(self.parts[i], type=self.types[i])
        if pa.types.is_null(column.type):  # pandas reads a column with no values at all as float64 NaN
            column = column.cast(pa.float64())
        return column.to_pandas()


def _pandas_names(raw: list[str]) -> list[str]:
    """Column names as pandas gives them: no byte-order mark, `Unnamed: i` for an empty name."""
    names = [str(c) for c in raw]
    if names and names[0].startswith("\ufeff"):  # a UTF-8 byte-order mark is not part of the name
        names[0] = names[0][1:]
    unnamed = [i for i, c in enumerate(names) if c == ""]
    for i in unnamed:
        names[i] = f"Unnamed: {i}"
    if len(set(names)) < len(names):  # duplicates are refused later; name them as pandas would meanwhile
        from pandas.io.common import mangle_dupe_names

        names = [str(c) for c in mangle_dupe_names(names, unnamed)]
    return names


class _Pieces:
    """A plain file's consecutive pieces of whole lines, each parsed by pyarrow on its own.

    The first piece is parsed with the header, the others with its column names. Put together,
    they make the table one read of the file would when every piece ends up with the same column
    types (pyarrow infers a column's type as the first of its candidate types that converts every
    value) and no value is quoted: pyarrow, as pandas calls it, cuts its own blocks at newlines
    regardless of quotes, so a quoted newline is read whole only when no block boundary falls
    inside it, and a piece boundary could. A piece may be parsed with some integer columns as a
    narrower integer type; when a value does not fit (or anything else fails), the piece is
    parsed again with inferred types. next() returns None at the end of the file, and raises
    _Mismatch when the file has to be read whole (including when pyarrow raised an error: the
    whole read reports it with pandas' messages).
    """

    def __init__(self, f) -> None:
        self.f = f
        self.buf = bytearray(PIECE_BYTES)
        self.view = memoryview(self.buf)
        self.held = 0  # bytes of an unfinished line, at the start of buf
        self.options: pacsv.ReadOptions | None = None  # with the column names, after the first piece

    def next(self, types: dict[str, pa.DataType] | None = None) -> pa.Table | None:
        buf, view = self.buf, self.view
        n = self.f.readinto(view[self.held :])
        end = self.held + n
        if end == 0:
            return None
        cut = end if n == 0 else buf.rfind(b"\n", 0, end) + 1  # a last line without a newline ends the file
        if cut == 0:
            raise _Mismatch  # a line longer than a piece
        start = buf.find(b"\n", 0, cut) + 1 if self.options is None else 0  # the header may be quoted
        if buf.find(b'"', start, cut) >= 0:
            raise _Mismatch
        table = None
        for column_types in [types, None] if types else [None]:
            convert = _convert_options()
            if column_types:
                convert.column_types = column_types
            try:
                table = pacsv.read_csv(pa.py_buffer(view[:cut]), read_options=self.options, convert_options=convert)
                names = table.column_names  # a header that is not UTF-8 fails here
                break
            except Exception:  # noqa: BLE001 - parsed again, or left to the whole read, which reports it
                table = None
        if table is None:
            raise _Mismatch
        if self.options is None:
            self.options = pacsv.ReadOptions(column_names=names)
        self.held = end - cut
        buf[: self.held] = buf[cut:end]
        return table


def _read_pieces(path: Path, columns: _Columns) -> bool:
    """Read a plain file piece by piece into `columns`; False when it has to be read whole.

    The next piece is parsed (by pyarrow, without the GIL) while the last one is boiled down.
    """
    with open(path, "rb") as f, ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-csv-read") as reader:
        pieces = _Pieces(f)
        try:
            table = pieces.next()
            if table is None:
                return True
            columns.add(table)  # the first piece: its integer columns' types are asked for from the others
            coming = reader.submit(pieces.next, columns.piece_types())
            while (table := coming.result()) is not None:
                coming = reader.submit(pieces.next, columns.piece_types())
                columns.add(table)
                del table
        except _Mismatch:
            return False
    return True


def _read(path: Path, data_cfg) -> _Columns:
    if not path.exists():
        raise DataError(f"CSV file not found: {path}")
    if path.is_dir():
        raise DataError(f"CSV path {path} is a folder, expected a file")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"CSV file {path} is empty (0 bytes); expected a header line and data rows")
    from pandas.io.common import infer_compression

    columns = _Columns(data_cfg)
    pieces = size > PIECE_BYTES and infer_compression(str(path), "infer") is None
    if not (pieces and _read_pieces(path, columns)):
        columns.reset()
        columns.add(_read_whole(path))
    pa.default_memory_pool().release_unused()  # the parser's buffers: give them back before the tensors are made
    if not columns.names:
        raise DataError(f"CSV file {path} has no columns; expected a header line and data rows")
    header = _header(path)
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise DataError(
            f"CSV file {path}: duplicate column names {dupes} in the header (line 1); each column needs a unique name"
        )
    if columns.n_rows == 0:
        raise DataError(f"CSV file {path} has a header but no data rows (columns: {', '.join(columns.names)})")
    return columns


# ---- checks ---------------------------------------------------------------------------------------


def _row(path: Path, i: int) -> str:
    """Data row i (0-based) and the file line it starts on: found by reading the file as CSV, so
    blank lines (skipped by the reader) and quoted values spanning lines are counted right."""
    line = i + 2
    with _decompressed(path, text=True) as f:
        reader = csv.reader(f)
        next(reader, None)  # the header
        row = -1
        while row < i:
            start = reader.line_num + 1
            record = next(reader, None)
            if record is None:
                break
            if record:  # a blank line is no row
                row += 1
                line = start
    return f"row {i + 1} (line {line})"


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
            f"CSV file {path}: column {name!r} holds numbers but {_row(path, i)} has {col.iloc[i]!r}; "
            f"expected a number (or list the column in data.categorical)"
        )
    return None if bad.any() else coerced


def _finite_or_error(path: Path, name: str, values: np.ndarray) -> None:
    bad = np.isinf(values)
    if bad.any():
        i = _first_true(bad)
        raise DataError(f"CSV file {path}: column {name!r} has an infinite value (or one beyond float64's range) at {_row(path, i)}; expected a finite number")


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
                f"CSV file {path}: column {name!r} has the integer {token.strip()} at {_row(path, i)}, beyond the 64-bit "
                f"range; expected integers between -2**63 and 2**63-1 (drop the column with data.drop if it is an id)"
            )


def _missing_error(path: Path, name: str, mask: np.ndarray) -> DataError:
    i = _first_true(mask)
    return DataError(
        f"CSV file {path}: column {name!r} has a missing value at {_row(path, i)} and data.missing is 'error'; "
        f"fill it in, or set data.missing to impute or drop"
    )


def _label_name(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _countable_integers(col: pd.Series) -> np.ndarray | None:
    """An int64 column's values (so none missing) when they are exact as float64 and span a small range."""
    if col.dtype != np.int64 or not len(col):
        return None
    values = col.to_numpy()
    lo, hi = int(values.min()), int(values.max())
    return values if -(2**53) < lo and hi < 2**53 and hi - lo <= 1 << 20 else None


def _median_and_mean(values: np.ndarray) -> tuple[float, float]:
    """np.median and ndarray.mean of values as float64, without the median's sort when they are integers
    in a small range: the middle values and the sum are read off a count of each value (the sum is exact,
    as numpy's float64 sum of such integers is, whatever the order)."""
    if values.dtype.kind == "i" and values.size:
        lo, hi = int(values.min()), int(values.max())
        if hi - lo <= max(1 << 16, 4 * values.size):
            if hi - lo < 4:  # flags and the like: count each value (bincount would first copy them to int64)
                shift = lo
                if lo == 0 and hi == 1 and values.itemsize == 1:
                    ones = np.count_nonzero(values.view(np.bool_))
                    counts = np.array([values.size - ones, ones])
                else:
                    counts = np.array([np.count_nonzero(values == v) for v in range(lo, hi + 1)])
            else:
                shift = lo if lo < 0 or hi - lo < lo else 0  # bincount needs values >= 0
                counts = np.bincount(values if shift == 0 else values.astype(np.int64) - shift)
            below = np.cumsum(counts)
            m = values.size
            middle = [(m - 1) // 2, m // 2] if m % 2 == 0 else [m // 2]
            picked = np.searchsorted(below, middle, side="right") + shift
            median = float(np.mean(picked.astype(np.float64)))  # np.median averages the two middle values alike
            if max(-lo, hi) * m < 2**53:  # every partial sum exact in float64: the order of summation cannot matter
                total = int(np.dot(counts.astype(np.int64), np.arange(shift, shift + counts.size, dtype=np.int64)))
                return median, float(total) / m
            return median, float(values.astype(np.float64).mean())
    values = np.asarray(values, dtype=np.float64)
    return float(np.median(values)), float(values.mean())


# ---- the ingest -------------------------------------------------------------------------------------


def ingest_csv(data_cfg, state_root: Path) -> tuple[str, dict[str, Any], Any]:
    """Return (cache key, params hashed into it, a builder that makes the Prepared dataset).

    The builder is only run when the key is not already in the cache.
    """
    path = local_path(data_cfg.path)
    if not path.exists():
        raise DataError(f"CSV file not found: {path}")
    if path.is_dir():
        raise DataError(f"CSV path {path} is a folder, expected a file")
    content_hash = sha256_file(path)
    params = data_cfg.model_dump(exclude={"path", "root", "download", "split", "n_train", "limit", "source"})
    params["source"] = "csv"
    key = cache_key(content_hash, params)
    return key, content_hash, lambda: build_csv(data_cfg, path, content_hash)


def build_csv(data_cfg, path: Path, content_hash: str) -> Prepared:
    data = _read(path, data_cfg)
    columns = data.names
    target = data_cfg.target
    if target not in columns:
        raise DataError(f"CSV file {path}: target column {target!r} not found; columns in the file: {', '.join(columns)}")
    for label, listed in (("data.features", data_cfg.features), ("data.drop", data_cfg.drop), ("data.categorical", data_cfg.categorical)):
        unknown = [c for c in listed if c not in columns]
        if unknown:
            raise DataError(f"CSV file {path}: {label} names columns not in the file: {unknown}; columns: {', '.join(columns)}")
    if target in data_cfg.features or target in data_cfg.drop:
        raise DataError(f"CSV file {path}: the target column {target!r} cannot also be a feature or dropped")
    features = list(data_cfg.features) or [c for c in columns if c != target and c not in data_cfg.drop]
    features = [c for c in features if c not in data_cfg.drop]
    if not features:
        raise DataError(f"CSV file {path}: no feature columns left after dropping {data_cfg.drop}")
    for name in [*features, target]:  # pyarrow keeps text that is not UTF-8 as raw bytes
        if pa.types.is_binary(data.type(name)) or pa.types.is_large_binary(data.type(name)):
            raise _utf8_error(path, f"column {name!r}")

    # ---- column kinds ----
    numeric: dict[str, Any] = {}  # float64 with NaN for missing values, or integers (compact; in pieces)
    categorical: dict[str, pd.Series] = {}
    feature_missing: dict[str, np.ndarray] = {}  # only columns with a missing value
    for name in features:
        if data.is_numpy(name):  # an integer or float column, as pandas would hold it
            parts = data.parts_of(name)
            if all(part.dtype.kind == "i" for part in parts):  # no missing values: joined later, in a worker
                numeric[name] = parts
                data.forget(name)
                continue
            values = np.concatenate(parts)
            if values.dtype.kind == "f":
                _finite_or_error(path, name, values)
                _no_integers_beyond_int64(path, name, values)
                missing = np.isnan(values)
                if missing.all():
                    raise DataError(f"CSV file {path}: column {name!r} has no values at all (every row is missing); drop it")
                if missing.any():
                    feature_missing[name] = missing
            numeric[name] = values
            data.forget(name)
            continue
        col = data.series(name)
        data.forget(name)
        values = None if name in data_cfg.categorical else _numeric_or_error(path, name, col)
        if values is None:
            categorical[name] = col
            missing = col.isna().to_numpy()
        else:
            numeric[name] = values
            missing = np.isnan(values)
        if missing.all():
            raise DataError(f"CSV file {path}: column {name!r} has no values at all (every row is missing); drop it")
        if missing.any():
            feature_missing[name] = missing

    # ---- target and task type ----
    y_col = data.series(target)
    data.forget(target)
    y_missing = y_col.isna().to_numpy()
    if y_missing.all():
        raise DataError(f"CSV file {path}: target column {target!r} has no values at all (every row is missing); expected the values to predict")
    # Labels are text when the column holds text (or booleans), and also when it mixes numbers with a
    # few words and the config says it is a class column (data.task classification, or the target
    # listed in data.categorical); otherwise a word among numbers is an error in a numeric target.
    text_labels = pd.api.types.is_bool_dtype(y_col) or (
        (data_cfg.task == "classification" or target in data_cfg.categorical) and not pd.api.types.is_numeric_dtype(y_col)
    )
    y_numeric = None if text_labels else _numeric_or_error(path, target, y_col)
    y_ints = _countable_integers(y_col)  # integer labels are counted, not hashed or sorted
    task = data_cfg.task
    if task == "auto":
        if target in data_cfg.categorical:
            task, reason = "classification", "the target is listed in data.categorical"
        elif y_numeric is None:
            task, reason = "classification", "the target holds text or booleans"
        else:
            if y_ints is not None:
                present, n_unique, integral = y_ints, distinct_integers(y_ints).size, True
            else:
                present = y_numeric[~np.isnan(y_numeric)]
                n_unique = len(pd.unique(present))
                integral = np.all(present == np.round(present))
            if present.size and integral and n_unique <= MAX_CLASSES_INFERRED:
                task, reason = "classification", f"the target holds {n_unique} distinct integers"
            else:
                task, reason = "regression", "the target holds real numbers"
    else:
        reason = "set in data.task"
    if task == "regression" and target in data_cfg.categorical:
        raise DataError(f"CSV file {path}: target {target!r} is listed in data.categorical but data.task is regression; expected one or the other")
    if task == "regression" and pd.api.types.is_bool_dtype(y_col):
        raise DataError(
            f"CSV file {path}: target {target!r} holds booleans (true/false); regression needs numbers "
            "(set data.task to classification or auto)"
        )
    if task == "regression" and y_numeric is None:
        bad = y_col.notna().to_numpy() & pd.to_numeric(y_col, errors="coerce").isna().to_numpy()
        i = _first_true(bad)
        raise DataError(f"CSV file {path}: target {target!r} has {y_col.iloc[i]!r} at {_row(path, i)}; regression needs numbers")
    log.info("task type: %s (%s)", task, reason)

    # ---- missing values ----
    n_rows_read = data.n_rows
    if data_cfg.missing == "error":
        for name in features:
            if name in feature_missing:
                raise _missing_error(path, name, feature_missing[name])
        if y_missing.any():
            raise _missing_error(path, target, y_missing)
        keep = np.ones(n_rows_read, dtype=bool)
    elif data_cfg.missing == "drop":
        keep = ~y_missing
        for name in features:
            if name in feature_missing:
                keep &= ~feature_missing[name]
    else:
        keep = ~y_missing
    rows = np.flatnonzero(keep)
    dropped = n_rows_read - rows.size
    if dropped:
        log.info("dropped %d of %d rows with missing values (policy %s)", dropped, n_rows_read, data_cfg.missing)
    all_rows = rows.size == n_rows_read  # nothing dropped: no need to copy every column

    # ---- labels ----
    if task == "classification":
        if y_ints is not None:  # the labels and codes below, from counts; the labels as float64, like y_numeric's
            raw = y_ints if all_rows else y_ints[rows]
            distinct = distinct_integers(raw)
            uniques = [np.float64(v) for v in distinct]
        elif y_numeric is not None:  # numbers: the labels and codes below, without a Python object per row
            raw = y_numeric if all_rows else y_numeric[rows]
            uniques = sorted(pd.unique(raw))
        else:
            raw_labels = y_col.iloc[rows]
            uniques = pd.unique(raw_labels)
            try:
                uniques = sorted(uniques)
            except TypeError:
                uniques = sorted(uniques, key=str)
        label_names = [_label_name(v) for v in uniques]
        if len(label_names) < 2:
            shown = label_names[0] if label_names else "none"
            raise DataError(
                f"CSV file {path}: target {target!r} has only one class ({shown!r}); classification needs at least 2"
            )
        if y_ints is not None:
            lo = int(distinct[0])
            code = np.zeros(int(distinct[-1]) - lo + 1, dtype=np.int64)
            code[distinct - lo] = np.arange(distinct.size)
            y_all = code[raw - lo]
        elif y_numeric is not None:
            y_all = np.searchsorted(np.asarray(uniques, dtype=np.float64), raw).astype(np.int64)
        else:
            y_all = pd.Index(uniques, dtype=object).get_indexer(raw_labels.astype(object)).astype(np.int64)
            if (y_all < 0).any():  # values the index could not match (e.g. equal but differently typed): map one by one
                index = {v: i for i, v in enumerate(uniques)}
                y_all = np.fromiter((index[v] for v in raw_labels), dtype=np.int64, count=rows.size)
    else:
        label_names = []
        y_all = y_numeric[rows].astype(np.float64)

    # ---- split ----
    train_idx, val_idx, test_idx = split_indices(
        rows.size,
        data_cfg.val_fraction,
        data_cfg.test_fraction,
        data_cfg.split_seed,
        stratify=y_all if task == "classification" else None,
        source=str(path),
    )
    splits = {"train": train_idx, "val": val_idx, "test": test_idx}
    # the splits' rows in the file (the index of every column read)
    file_rows = splits if all_rows else {s: rows[idx] for s, idx in splits.items()}

    # ---- features: statistics from the training split only ----
    feature_schema: list[dict[str, Any]] = []
    width = len(numeric)
    vocabularies: dict[str, list[str]] = {}
    texts: dict[str, np.ndarray] = {}
    for name, col in categorical.items():
        values = col.astype("string").fillna(MISSING).to_numpy(dtype=object)
        vocab = sorted(set(values[file_rows["train"]].tolist()))
        if len(vocab) > data_cfg.max_categories:
            raise DataError(
                f"CSV file {path}: column {name!r} has {len(vocab)} distinct values in the training split, "
                f"more than data.max_categories={data_cfg.max_categories}; drop it or raise the limit"
            )
        vocabularies[name] = vocab
        texts[name] = values
        width += len(vocab)
    tensors = {f"x_{s}": torch.from_numpy(_pool_array((idx.size, width))) for s, idx in splits.items()}
    layout: list[tuple[list[str], int]] = []  # runs of numeric features (GROUP at most) or a categorical one, first column
    col_i = 0
    for name in features:
        if name in numeric and layout and layout[-1][0][-1] in numeric and len(layout[-1][0]) < GROUP:
            layout[-1][0].append(name)
        else:
            layout.append(([name], col_i))
        col_i += 1 if name in numeric else len(vocabularies[name])
    numeric_schema: dict[str, dict[str, Any]] = {}
    categorical_schema: dict[str, dict[str, Any]] = {}
    # Numeric features are standardised GROUP at a time, side by side in a thread pool, into column-major
    # buffers (a row per feature), which are then copied, transposed, into the row-major tensors a block
    # of rows per task: writing a column straight into a row-major tensor would touch every cache line
    # of it once per column.
    buffers = {s: _pool_array((min(GROUP, len(numeric)), idx.size)) for s, idx in splits.items()}
    with _pool() as pool:
        for names, col_i in layout:
            if names[0] in numeric:
                jobs = [
                    pool.submit(
                        _standardise, path, name, numeric.pop(name), feature_missing.get(name), rows, all_rows,
                        splits, file_rows, {s: buffer[j] for s, buffer in buffers.items()},
                    )
                    for j, name in enumerate(names)
                ]  # fmt: skip
                for name, job in zip(names, jobs):  # in feature order: the first refusal is the first column's
                    numeric_schema[name] = {"name": name, "kind": "numeric", **job.result()}
                copies = [
                    pool.submit(_copy_rows, tensors[f"x_{s}"].numpy(), r, col_i, buffer[: len(names)])
                    for s, buffer in buffers.items()
                    for r in range(0, buffer.shape[1], COPY_ROWS)
                ]
                for copy in copies:
                    copy.result()
                continue
            name = names[0]
            vocab = vocabularies[name]
            values = texts.pop(name)
            values = values if all_rows else values[rows]
            n_missing = int((values == MISSING).sum())
            lookup = {v: k for k, v in enumerate(vocab)}
            codes = np.fromiter((lookup.get(v, -1) for v in values), dtype=np.int64, count=values.size)
            for split, idx in splits.items():
                block = tensors[f"x_{split}"].numpy()[:, col_i : col_i + len(vocab)]
                block[:] = 0.0
                split_codes = codes[idx]
                seen = split_codes >= 0
                block[np.flatnonzero(seen), split_codes[seen]] = 1.0
            categorical_schema[name] = {
                "name": name,
                "kind": "categorical",
                "encoding": "onehot",
                "vocabulary": vocab,
                "missing": n_missing,
                "unseen_outside_train": int((codes < 0).sum()),
            }
    del buffers
    pa.default_memory_pool().release_unused()  # the buffers' memory: back to the system
    feature_names: list[str] = []
    for name in features:
        if name in numeric_schema:
            feature_schema.append(numeric_schema[name])
            feature_names.append(name)
        else:
            feature_schema.append(categorical_schema[name])
            feature_names.extend(f"{name}={v}" for v in vocabularies[name])
    missing_counts = {f["name"]: f["missing"] for f in feature_schema if f["missing"]}
    if missing_counts and data_cfg.missing == "impute":
        log.info("imputed missing values: %s", missing_counts)

    # ---- target tensors ----
    target_schema: dict[str, Any] = {"name": target}
    if task == "classification":
        n_classes = len(label_names)
        y_tensor = torch.from_numpy(y_all)
        if n_classes == 2:
            y_tensor = y_tensor.to(torch.float32)
        output_size = 1 if n_classes == 2 else n_classes
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            y_mean = float(y_all[train_idx].mean())
            y_std = float(y_all[train_idx].std()) or 1.0
        if not np.isfinite(y_mean) or not np.isfinite(y_std):
            raise DataError(
                f"CSV file {path}: target {target!r} has values too large to standardise (mean {y_mean}, std {y_std}); "
                f"expected numbers whose spread fits in float64 (below about 1e154), rescale the column"
            )
        target_schema.update(mean=y_mean, std=y_std)
        y_tensor = torch.from_numpy(((y_all - y_mean) / y_std).astype(np.float32))
        output_size = 1
        n_classes = 0
    for split, idx in splits.items():
        tensors[f"y_{split}"] = y_tensor.index_select(0, torch.from_numpy(idx))
    tensors = {f"{xy}_{s}": tensors[f"{xy}_{s}"] for s in splits for xy in ("x", "y")}

    schema = {
        "source": "csv",
        "file": str(path),
        "content_hash": content_hash,
        "task": task,
        "task_reason": reason,
        "binary": task == "classification" and n_classes == 2,
        "n_classes": n_classes,
        "label_names": label_names,
        "input_shape": [width],
        "output_size": output_size,
        "features": feature_schema,
        "feature_names": feature_names,
        "target": target_schema,
        "missing_policy": data_cfg.missing,
        "missing_counts": missing_counts,
        "rows_read": n_rows_read,
        "rows_dropped": dropped,
        "split_sizes": {"train": int(train_idx.size), "val": int(val_idx.size), "test": int(test_idx.size)},
        "normalize": None,
    }
    return Prepared(tensors=tensors, schema=schema)


def _pool_array(shape: tuple[int, int]) -> np.ndarray:
    """An uninitialised float32 array in memory from Arrow's pool, which still holds (and has already
    paged in) what the CSV parser used and gave back: fresh pages from the OS cost about as much to
    fault in as the standardisation costs to compute."""
    buffer = pa.allocate_buffer(shape[0] * shape[1] * 4)
    return np.frombuffer(buffer, dtype=np.float32).reshape(shape)


def _copy_rows(out: np.ndarray, row: int, col_i: int, columns: np.ndarray) -> None:
    """Rows row.. of column-major `columns` into out[rows, col_i:], transposed."""
    rows = slice(row, row + COPY_ROWS)
    out[rows, col_i : col_i + columns.shape[0]] = columns[:, rows].T


def _pool() -> ThreadPoolExecutor:
    """Threads for the column work: numpy lets go of the GIL while it gathers, converts and sums."""
    return ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="ingest-csv")


def _standardise(
    path: Path,
    name: str,
    source: Any,
    missing: np.ndarray | None,
    rows: np.ndarray,
    all_rows: bool,
    splits: dict[str, np.ndarray],
    file_rows: dict[str, np.ndarray],
    out: dict[str, np.ndarray],
) -> dict[str, Any]:
    """One numeric feature: its training statistics, and its standardised values written into `out` (per split).

    The numbers are exactly those of (values - mean) / std computed in float64 over the kept rows
    with the training split's np.median, ndarray.mean and ndarray.std, but with fewer passes over
    the data: integers are summed as integers (exact, as numpy's float64 sum of them is), and the
    deviations from the mean are computed once for the standard deviation and the training values.
    """
    if missing is not None and not all_rows:
        missing = missing[rows]
    n_missing = 0 if missing is None else int(missing.sum())
    if n_missing:  # impute with the training median: work on a float64 copy of the kept rows
        values = source.astype(np.float64) if all_rows else source[rows].astype(np.float64)
        train_values = values[splits["train"]]
        train_missing = np.isnan(train_values)
        if train_missing.all():
            raise DataError(f"CSV file {path}: column {name!r} has no values in the training split")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, with the column
            median = float(np.nanmedian(train_values) if train_missing.any() else np.median(train_values))
            values = np.where(missing, median, values)
            train_values = values[splits["train"]]
        source, index = values, splits
    else:
        if isinstance(source, list):
            source = np.concatenate(source)
        train_values = source[file_rows["train"]]
        index = file_rows
    with np.errstate(over="ignore", invalid="ignore"):
        if n_missing:
            mean = float(train_values.mean())
        else:
            median, mean = _median_and_mean(train_values)
        deviations = np.subtract(train_values, mean, dtype=np.float64)  # as ndarray.std computes them
        std = float(np.sqrt(np.add.reduce(np.square(deviations)) / deviations.size))
    if not np.isfinite(mean) or not np.isfinite(std):
        raise DataError(
            f"CSV file {path}: column {name!r} has values too large to standardise (mean {mean}, std {std}); "
            f"expected numbers whose spread fits in float64 (below about 1e154), rescale the column"
        )
    scale = std if std > 0 else 1.0
    for split, column in out.items():
        if split != "train":
            deviations = np.subtract(source[index[split]], mean, dtype=np.float64)
        np.divide(deviations, scale, out=column, casting="same_kind")
    return {"mean": mean, "std": scale, "median": median, "missing": n_missing}


