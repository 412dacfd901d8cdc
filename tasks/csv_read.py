"""Reading a CSV file into the columns an ingest needs, as pandas.read_csv(engine="pyarrow") would hold them.

The file is read with pyarrow and the options pandas passes it (with data.delimiter and
data.encoding), so every column gets the type and values it would have in that DataFrame,
but no DataFrame of the whole file is built: a large plain UTF-8 file is read in pieces of
whole lines, and each piece is boiled down to the columns the ingest needs (numbers as
compact numpy arrays) before the next one is read. When the pieces could differ from one
read of the file, it is read whole instead. A Parquet file (data.format) is read by
tasks/parquet_read.py into the same Columns, with the types a CSV of the table would get.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from tasks.csv_file import (
    NA_VALUES,
    Dialect,
    check_file,
    decompressed,
    dialect_of,
    format_by_name,
    header_names,
    looks_like_parquet,
    read_error,
    row_position,
)
from tasks.data_config import DataConfig
from tasks.errors import DataError
from tasks.parquet_read import read_parquet

PIECE_BYTES = 8 << 20  # a plain file larger than this is read in pieces of about this size

_ARROW_INTS = {np.dtype(t): pa.from_numpy_dtype(t) for t in (np.int8, np.int16, np.int32, np.int64)}


def selected_features(data_cfg: DataConfig, columns: list[str]) -> list[str]:
    """The feature columns in file order: data.features (or every column but the target), less data.drop."""
    features = list(data_cfg.features) or [c for c in columns if c != data_cfg.target and c not in data_cfg.drop]
    return [c for c in features if c not in data_cfg.drop]


def _convert_options() -> pacsv.ConvertOptions:
    """pandas.read_csv(engine="pyarrow")'s options: its missing-value strings, empty strings
    (quoted or not) as missing, and otherwise pyarrow's defaults (true/false values, type inference)."""
    return pacsv.ConvertOptions(null_values=list(NA_VALUES), strings_can_be_null=True)


def _read_options(dialect: Dialect) -> pacsv.ReadOptions | None:
    """pyarrow transcodes any encoding but UTF-8 to UTF-8 as it reads (text it cannot decode raises)."""
    return None if dialect.utf8 else pacsv.ReadOptions(encoding=dialect.encoding)


def _read_whole(path: Path, dialect: Dialect, where: object = None) -> pa.Table:
    """The whole file in one read, opened as pandas opens it (a compressed file is decompressed)."""

    def read(newlines_in_values: bool = False) -> pa.Table:
        parse = pacsv.ParseOptions(delimiter=dialect.delimiter, newlines_in_values=newlines_in_values)
        with decompressed(path) as f:
            table = pacsv.read_csv(
                f, read_options=_read_options(dialect), parse_options=parse, convert_options=_convert_options()
            )
        table.column_names  # noqa: B018 - a header that is not UTF-8 fails here
        return table

    try:
        try:
            return read()
        except pa.ArrowInvalid:
            # A quoted value spanning lines (valid CSV) across one of pyarrow's 1 MiB blocks fails
            # a plain read: read again with quote-aware block cuts (slower, so only after a failure;
            # a file that is really broken fails again, with the same message).
            return read(newlines_in_values=True)
    except Exception as exc:  # noqa: BLE001 - whatever the reader or decompressor raises is the file's fault
        raise read_error(path, exc, dialect, where) from None


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


class Columns:
    """The columns an ingest needs, gathered from Arrow tables of consecutive rows of one file.

    Integer and float columns that may become numeric features are kept as numpy arrays (see
    _numpy_part); the target, the columns listed in data.categorical and columns of any other
    type keep their Arrow chunks and become a pandas Series when asked for, the Series
    pandas.read_csv(engine="pyarrow") would have held. Columns nobody needs are not kept.
    The file's path, its name in messages (`where`) and, for a CSV file, its dialect come along,
    so checks downstream can name rows and read values as written.
    """

    def __init__(self, data_cfg: DataConfig, path: Path, where: object = None, dialect: Dialect | None = None) -> None:
        self.cfg = data_cfg
        self.path, self.where, self.dialect = path, where or path, dialect
        self.reset()

    def reset(self) -> None:
        self.raw_names: list[str] | None = None
        self.names: list[str] = []
        self.types: list[pa.DataType] | None = None
        self.n_rows = 0
        self.parts: dict[int, list] = {}
        self.as_numpy: set[int] = set()
        self.widest: dict[int, np.dtype] = {}  # integer columns so far without a missing value: their widest dtype

    def plan(self, raw_names: list[str]) -> list[int]:
        """Name the columns from the header (or schema) and pick the ones to keep: their positions."""
        self.raw_names = list(raw_names)
        self.names = _pandas_names(self.raw_names)
        needed = {*selected_features(self.cfg, self.names), self.cfg.target}
        self.parts = {i: [] for i, name in enumerate(self.names) if name in needed}
        return list(self.parts)

    def _first_types(self, types: list[pa.DataType]) -> None:
        """The first piece's types: they decide which columns are kept as numpy arrays."""
        self.types = types
        self.as_numpy = {
            i
            for i in self.parts
            if self.names[i] != self.cfg.target
            and self.names[i] not in self.cfg.categorical
            and (pa.types.is_integer(types[i]) or pa.types.is_float64(types[i]))
        }

    def add(self, table: pa.Table) -> None:
        if self.raw_names is None:
            self.plan(table.column_names)
        if table.num_rows == 0:  # nothing to keep (and every type of an empty piece is null)
            return
        types = table.schema.types
        if self.types is None:
            self._first_types(types)
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

    def recast(self, i: int, type_: pa.DataType) -> None:
        """Give a kept Arrow column another type once every piece is in (see tasks/parquet_read.py)."""
        self.parts[i] = pa.chunked_array(self.parts[i], type=self.types[i]).cast(type_).chunks
        self.types[i] = type_

    def index(self, name: str) -> int:
        return self.names.index(name)

    def position(self, i: int) -> str:
        """Data row i (0-based) in words: with its file line in a CSV file, alone in a Parquet file."""
        return row_position(self.path, i, self.dialect) if self.dialect else f"row {i + 1}"

    def written(self, name: str) -> pd.Series | None:
        """A CSV column's values as written, as text (missing-value strings as missing), read again with
        the file's dialect: for checks the parsed numbers cannot answer (an integer beyond 64 bits).
        None for a Parquet file, whose values are typed as they were written."""
        if self.dialect is None:
            return None
        raw = self.raw_names[self.index(name)]
        convert = _convert_options()
        convert.include_columns, convert.column_types = [raw], {raw: pa.string()}
        parse = pacsv.ParseOptions(delimiter=self.dialect.delimiter, newlines_in_values=True)
        with decompressed(self.path) as f:
            table = pacsv.read_csv(
                f, read_options=_read_options(self.dialect), parse_options=parse, convert_options=convert
            )
        return table.column(0).to_pandas()

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

    def __init__(self, f: IO[bytes], delimiter: str = ",") -> None:
        self.f = f
        self.parse = pacsv.ParseOptions(delimiter=delimiter)
        self.buf = bytearray(PIECE_BYTES)
        self.view = memoryview(self.buf)
        self.held = 0  # bytes of an unfinished line, at the start of buf
        self.options: pacsv.ReadOptions | None = None  # with the column names, after the first piece

    def next(self, types: dict[str, pa.DataType] | None = None) -> pa.Table | None:
        buf = self.buf
        n = self.f.readinto(self.view[self.held :])
        end = self.held + n
        if end == 0:
            return None
        cut = end if n == 0 else buf.rfind(b"\n", 0, end) + 1  # a last line without a newline ends the file
        if cut == 0:
            raise _Mismatch  # a line longer than a piece
        start = buf.find(b"\n", 0, cut) + 1 if self.options is None else 0  # the header may be quoted
        if buf.find(b'"', start, cut) >= 0:
            raise _Mismatch
        table = self._parse(cut, types)
        if self.options is None:
            self.options = pacsv.ReadOptions(column_names=table.column_names)
        self.held = end - cut
        buf[: self.held] = buf[cut:end]
        return table

    def _parse(self, cut: int, types: dict[str, pa.DataType] | None) -> pa.Table:
        """The first `cut` bytes of the buffer as a table: with `types` asked for, else (or then) inferred."""
        for column_types in [types, None] if types else [None]:
            convert = _convert_options()
            if column_types:
                convert.column_types = column_types
            try:
                table = pacsv.read_csv(
                    pa.py_buffer(self.view[:cut]),
                    read_options=self.options,
                    parse_options=self.parse,
                    convert_options=convert,
                )
                table.column_names  # noqa: B018 - a header that is not UTF-8 fails here
                return table
            except Exception:  # noqa: BLE001 - parsed again, or left to the whole read, which reports it
                pass
        raise _Mismatch


def _read_pieces(path: Path, columns: Columns, dialect: Dialect) -> bool:
    """Read a plain UTF-8 file piece by piece into `columns`; False when it has to be read whole.

    The next piece is parsed (by pyarrow, without the GIL) while the last one is boiled down.
    """
    with open(path, "rb") as f, ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-csv-read") as reader:
        pieces = _Pieces(f, dialect.delimiter)
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


def table_format(path: Path, data_cfg: DataConfig, where: object = None) -> str:
    """data.format, or for `auto` Parquet for a name ending .parquet or .pq (the name shown, when given:
    a downloaded copy's own name may not tell), CSV otherwise."""
    return format_by_name(where or path, data_cfg.format)


def read_columns(path: Path, data_cfg: DataConfig, where: object = None) -> Columns:
    """The columns `data_cfg` needs from the table at `path` (CSV or Parquet, by data.format).

    `where` is how messages name the file (the URI a local copy was made from); the path by default.
    """
    if table_format(path, data_cfg, where) == "parquet":
        check_file(path, "Parquet file")
        columns = read_parquet(path, Columns(data_cfg, path, where), where or path)
    else:
        columns = _read_csv(path, data_cfg, where or path)
    pa.default_memory_pool().release_unused()  # the reader's buffers: give them back before the tensors are made
    return columns


def _read_csv(path: Path, data_cfg: DataConfig, where: object) -> Columns:
    """A CSV file's columns, read in pieces where the file allows it."""
    from pandas.io.common import infer_compression

    check_file(path)
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"CSV file {where} is empty (0 bytes); expected a header line and data rows")
    if looks_like_parquet(path):
        raise DataError(f"CSV file {where} is a Parquet file (it starts and ends with PAR1); set data.format=parquet")
    dialect = dialect_of(path, data_cfg.delimiter, data_cfg.encoding, where)
    columns = Columns(data_cfg, path, where, dialect)
    pieces = size > PIECE_BYTES and dialect.utf8 and infer_compression(str(path), "infer") is None
    if not (pieces and _read_pieces(path, columns, dialect)):
        columns.reset()
        columns.add(_read_whole(path, dialect, where))
    if not columns.names:
        raise DataError(f"CSV file {where} has no columns; expected a header line and data rows")
    header = header_names(path, dialect)
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise DataError(
            f"CSV file {where}: duplicate column names {dupes} in the header (line 1); each column needs a unique name"
        )
    if columns.n_rows == 0:
        raise DataError(f"CSV file {where} has a header but no data rows (columns: {', '.join(columns.names)})")
    return columns
