"""Batch scoring's input: the table to score, found (a remote one downloaded once into the source cache),
hashed and read in chunks of whole rows with the types the model reads.

Only the columns scoring needs are read. A CSV file streams through pyarrow's reader (its dialect as
ingest finds it, pandas' missing-value strings), a Parquet file through its row groups; either way each
chunk holds exactly `chunk_rows` rows (the last one fewer), so memory stays bounded by the chunk. A
value the model's type cannot hold is refused with its column and data row (counted from 1).
"""

from __future__ import annotations

import contextlib
import csv
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
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
from tasks.errors import DataError
from tasks.hashing import sha256_file
from tasks.storage_config import StorageConfig
from tasks.uris import file_path, is_remote, scheme, supported_schemes

MIN_BLOCK, MAX_BLOCK = 1 << 20, 64 << 20  # pyarrow's CSV block size: its default at least, bounded above
SAMPLE_BYTES = 1 << 16  # text read to estimate the bytes of a row
# The model's raw column types (MLflow type names) as the Arrow types its columns are read with: integers
# as floats, so a missing value is NaN in every chunk rather than turning one chunk's column into floats.
ARROW_TYPES = {
    "long": pa.float64(),
    "double": pa.float64(),
    "string": pa.string(),
    "boolean": pa.bool_(),
    "datetime": pa.timestamp("ns"),
}
EXPECTED = {pa.float64(): "a number", pa.bool_(): "true or false", pa.timestamp("ns"): "a date or timestamp"}
_CONVERSION = re.compile(r"In CSV column #(\d+): CSV conversion error to [^:]+: invalid value '(.*)'$", re.S)


@dataclass(frozen=True)
class Source:
    """The table to score: how the user named it, its local file, the sha256 of its bytes, its format."""

    uri: str
    path: Path
    sha256: str
    format: str
    dialect: Dialect | None = None  # a CSV file's

    @property
    def kind(self) -> str:
        return "Parquet file" if self.format == "parquet" else "CSV file"

    @property
    def where(self) -> str:
        return f"{self.kind} {self.uri}"


def arrow_type(mlflow_type: str | None) -> pa.DataType | None:
    """The Arrow type a column of this MLflow type is read as; None: as the file has it."""
    return ARROW_TYPES.get(str(mlflow_type or ""))


def open_input(
    uri: str, fmt: str, state_root: Path, storage: StorageConfig | None, delimiter: str, encoding: str
) -> Source:
    """The input table, local (a remote object downloaded once into the source cache) and hashed."""
    if is_remote(uri):
        from tasks.sources import fetch_source  # fsspec only when a remote input is read

        path, sha = fetch_source(uri, state_root, storage)
    else:
        if scheme(uri) not in ("", "file"):
            raise DataError(f"input {uri}: scheme {scheme(uri)}:// is not supported; expected {supported_schemes()}")
        path = file_path(uri)
        check_file(path, "Parquet file" if format_by_name(uri, fmt) == "parquet" else "CSV file")
        sha = sha256_file(path)
    return local_source(uri, path, sha, fmt, delimiter, encoding)


def local_source(uri: str, path: Path, sha: str, fmt: str, delimiter: str, encoding: str) -> Source:
    """The table at local `path` (named `uri`, its bytes' sha256 known): its format and, for a CSV file, its
    dialect; an empty file, or a Parquet file taken for CSV, refused."""
    if fmt == "auto":
        fmt = "parquet" if format_by_name(uri) == "parquet" or looks_like_parquet(path) else "csv"
    if path.stat().st_size == 0:
        kind = "Parquet file" if fmt == "parquet" else "CSV file"
        raise DataError(f"{kind} {uri} is empty (0 bytes); expected a header line and data rows")
    if fmt == "csv":
        if looks_like_parquet(path):
            raise DataError(f"CSV file {uri} is a Parquet file (it starts and ends with PAR1); set format=parquet")
        return Source(uri, path, sha, fmt, dialect_of(path, delimiter, encoding, uri))
    return Source(uri, path, sha, fmt)


def _parquet_file(src: Source):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(src.path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"Parquet file {src.uri} is not a Parquet file ({exc})") from None


def input_columns(src: Source) -> list[str]:
    """The table's column names (a Parquet file's pandas index columns left out)."""
    if src.format == "csv":
        return header_names(src.path, src.dialect)
    schema = _parquet_file(src).schema_arrow
    index = {c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
    return [name for name in schema.names if name not in index]


def input_size(src: Source) -> tuple[int, str]:
    """The progress bar's total and unit: a Parquet file's rows, a CSV file's bytes."""
    if src.format == "parquet":
        return _parquet_file(src).metadata.num_rows, "rows"
    return src.path.stat().st_size, "B"


def _rechunk(batches: Iterator[pa.RecordBatch], chunk_rows: int) -> Iterator[pa.Table]:
    """The batches' rows as tables of exactly chunk_rows rows (the last one fewer)."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += batch.num_rows
        while held >= chunk_rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, chunk_rows).combine_chunks()
            pending, held = table.slice(chunk_rows).to_batches(), held - chunk_rows
    if held:
        yield pa.Table.from_batches(pending).combine_chunks()


def read_chunks(
    src: Source, types: dict[str, pa.DataType | None], chunk_rows: int, progress: Callable[[int], None]
) -> Iterator[pa.Table]:
    """The columns `types` names (each with its type, None: the file's), chunk_rows rows at a time;
    `progress` is told the bytes (CSV) or rows (Parquet) read since it was last told."""
    if src.format == "parquet":
        yield from _parquet_chunks(src, types, chunk_rows, progress)
    else:
        yield from _csv_chunks(src, types, chunk_rows, progress)


def _block_size(src: Source, chunk_rows: int) -> int:
    """pyarrow's block: about an eighth of chunk_rows rows of the file, by the length of its first lines."""
    with decompressed(src.path) as f:
        sample = f.read(SAMPLE_BYTES)
    per_row = len(sample) / max(sample.count(b"\n"), 1)
    # An eighth of a chunk: pyarrow's reader holds several blocks, decoded, ahead of the one handed over, so
    # smaller blocks keep the memory down (of the covtype-shaped table, 231 MB of Arrow memory live at once with
    # 10 MB blocks, 95 MB with 1 MB ones) and read no slower (benchmarks/predict.py).
    return int(min(max(per_row * chunk_rows / 8, MIN_BLOCK), MAX_BLOCK))


def _csv_reader(src: Source, f, types: dict[str, pa.DataType | None], block: int) -> pacsv.CSVStreamingReader:
    assert src.dialect is not None
    read = pacsv.ReadOptions(block_size=block, encoding=src.dialect.encoding)
    parse = pacsv.ParseOptions(delimiter=src.dialect.delimiter, newlines_in_values=True)
    convert = pacsv.ConvertOptions(
        column_types={name: t for name, t in types.items() if t is not None},
        include_columns=list(types),
        null_values=list(NA_VALUES),
        strings_can_be_null=True,
    )
    return pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert)


def _csv_chunks(
    src: Source, types: dict[str, pa.DataType | None], chunk_rows: int, progress: Callable[[int], None]
) -> Iterator[pa.Table]:
    from pandas.io.common import get_handle, infer_compression

    block = _block_size(src, chunk_rows)
    with open(src.path, "rb") as raw:
        compression = infer_compression(str(src.path), "infer")
        with get_handle(raw, "rb", compression=compression, is_text=False) as handles:

            def batches() -> Iterator[pa.RecordBatch]:
                seen = 0
                with _csv_refusals(src, types):
                    for batch in _csv_reader(src, handles.handle, types, block):
                        progress(raw.tell() - seen)
                        seen = raw.tell()
                        yield batch

            yield from _rechunk(batches(), chunk_rows)


@contextlib.contextmanager
def _csv_refusals(src: Source, types: dict[str, pa.DataType | None]) -> Iterator[None]:
    """A reader's error as one line: a value the model's type cannot hold with its column and row."""
    try:
        yield
    except pa.ArrowInvalid as exc:
        found = _CONVERSION.search(str(exc))
        if not found:
            raise read_error(src.path, exc, src.dialect, src.uri) from None
        names = header_names(src.path, src.dialect)
        name, value = names[int(found.group(1))], found.group(2)
        raise DataError(_bad_value(src, name, value, types[name], _csv_row(src, int(found.group(1)), value))) from None
    except Exception as exc:  # noqa: BLE001 - whatever the reader or decompressor raises is the file's fault
        if isinstance(exc, DataError):
            raise
        raise read_error(src.path, exc, src.dialect, src.uri) from None


def _csv_row(src: Source, column: int, value: str) -> str:
    """Where the first data row holding `value` in the column sits ('row N (line L)'; '' when not found)."""
    assert src.dialect is not None
    with decompressed(src.path, text=True, encoding=src.dialect.encoding) as f:
        reader = csv.reader(f, delimiter=src.dialect.delimiter)
        next(reader, None)
        rows = (record for record in reader if record)  # a blank line is no row
        for i, record in enumerate(rows):
            if column < len(record) and record[column] == value:
                return row_position(src.path, i, src.dialect)
    return ""


def _bad_value(src: Source, name: str, value: object, type_: pa.DataType | None, at: str) -> str:
    where = f", {at}" if at else ""
    if type_ is None:
        return f"{src.where}: column {name!r}{where}: {value!r} does not fit the type its first rows have"
    expected = EXPECTED.get(type_, type_)
    return f"{src.where}: column {name!r}{where}: expected {expected} (the model's type), got {value!r}"


def _parquet_chunks(
    src: Source, types: dict[str, pa.DataType | None], chunk_rows: int, progress: Callable[[int], None]
) -> Iterator[pa.Table]:
    pf = _parquet_file(src)
    offset = 0
    try:
        batches = pf.iter_batches(batch_size=chunk_rows, columns=list(types))
        for table in _rechunk(batches, chunk_rows):
            yield _cast_chunk(src, table, types, offset)
            offset += table.num_rows
            progress(table.num_rows)
    except pa.ArrowException as exc:
        raise DataError(f"{src.where} could not be read: {exc}") from None


def _cast_chunk(src: Source, table: pa.Table, types: dict[str, pa.DataType | None], offset: int) -> pa.Table:
    """A Parquet chunk's columns as the model's types; a column or value that cannot be refused by name."""
    columns = []
    for name in table.column_names:
        column, wanted = table.column(name), types[name]
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        if wanted is not None and column.type != wanted:
            column = _cast_column(src, name, column, wanted, offset)
        columns.append(column)
    return pa.table(columns, names=table.column_names)


def _castable(source: pa.DataType, wanted: pa.DataType) -> bool:
    """Whether a Parquet column of type `source` holds values of the model's type: numbers for numbers,
    booleans for booleans, dates or timestamps for datetimes (text and empty columns: by their values)."""
    if pa.types.is_string(source) or pa.types.is_large_string(source) or pa.types.is_null(source):
        return True
    if wanted == pa.float64():
        return pa.types.is_integer(source) or pa.types.is_floating(source) or pa.types.is_decimal(source)
    if wanted == pa.bool_():
        return pa.types.is_boolean(source)
    if pa.types.is_timestamp(wanted):
        return pa.types.is_date(source) or pa.types.is_timestamp(source)
    return wanted == pa.string()


def _cast_column(src: Source, name: str, column: pa.ChunkedArray, wanted: pa.DataType, offset: int):
    """The column as `wanted`; a column of another kind, or the first value that does not convert, refused."""
    if pa.types.is_timestamp(column.type) and column.type.tz:  # a zoned timestamp: its UTC time
        column = column.cast(pa.timestamp(column.type.unit))
    try:
        if not _castable(column.type, wanted):
            raise pa.ArrowNotImplementedError
        numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
        return pc.cast(column, wanted, safe=not (numeric and wanted == pa.float64()))
    except pa.ArrowNotImplementedError:
        raise DataError(
            f"{src.where}: column {name!r} has type {column.type}; the model reads it as {EXPECTED.get(wanted, wanted)}"
        ) from None
    except pa.ArrowInvalid:
        for i, value in enumerate(column.to_pylist()):
            try:
                pc.cast(pa.array([value], column.type), wanted)
            except pa.ArrowInvalid:
                raise DataError(_bad_value(src, name, value, wanted, f"row {offset + i + 1}")) from None
        raise
