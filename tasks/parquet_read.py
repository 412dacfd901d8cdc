"""Reading a Parquet file into the columns an ingest needs, typed as a CSV file of the same table would be.

pyarrow.parquet reads only the columns the ingest needs, a few row groups at a time, into the
Columns that tasks/csv_read.py fills from a CSV file. Each Parquet type becomes the Arrow type
pyarrow's CSV reader (as pandas calls it) infers for the same values written as text, so the
rest of the ingest sees the same types and values from either file: integers int64, floats and
decimals float64, booleans, text as strings (large, view and dictionary-encoded text decoded to
its values), dates date32, timestamps timestamp[s] when every value is whole seconds (else
nanoseconds; zoned ones in UTC; midnights without a zone, as pandas keeps dates, date32), times
of day in whole seconds time32[s]. A type the ingest cannot use (lists, structs, maps, binary)
is refused for the columns it needs; other columns are never read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from tasks.errors import DataError

if TYPE_CHECKING:
    import pyarrow.parquet as pq

    from tasks.csv_read import Columns

ROWS_PER_READ = 1 << 20  # consecutive row groups are read together up to about this many rows
INT64_MAX = 2**63 - 1


def _csv_type(type_: pa.DataType) -> pa.DataType | None:
    """The type a CSV reading of this Parquet type's values would give; None for one the ingest cannot use.
    Timestamps and times keep their unit here: _settle_units picks the CSV's once every row is in."""
    if pa.types.is_dictionary(type_):
        return _csv_type(type_.value_type)
    if pa.types.is_integer(type_):
        return pa.int64()
    if pa.types.is_floating(type_) or pa.types.is_decimal(type_):
        return pa.float64()
    if pa.types.is_boolean(type_) or pa.types.is_null(type_) or pa.types.is_time(type_):
        return type_
    if pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_):
        return pa.string()
    if pa.types.is_date(type_):
        return pa.date32()
    if pa.types.is_timestamp(type_):
        return pa.timestamp(type_.unit, "UTC" if type_.tz else None)
    return None


def _open(path: Path, where: object) -> pq.ParquetFile:
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise DataError(f"Parquet file {where} is empty (0 bytes); expected a table with columns and rows")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"Parquet file {where} is not a Parquet file ({exc})") from None


def _names(pf: pq.ParquetFile, where: object) -> list[str]:
    """The table's column names, less the index columns pandas.DataFrame.to_parquet adds (pandas reads
    them back as the index, not as columns)."""
    schema = pf.schema_arrow
    index = {c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
    names = [name for name in schema.names if name not in index]
    if not names:
        raise DataError(f"Parquet file {where} has no columns; expected a table with columns and rows")
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise DataError(f"Parquet file {where}: duplicate column names {dupes}; each column needs a unique name")
    return names


def _target_types(pf: pq.ParquetFile, names: list[str], kept: list[int], where: object) -> dict[int, pa.DataType]:
    """The CSV type of each kept column; a column of a type the ingest cannot use is refused by name."""
    types, schema = {}, pf.schema_arrow  # built anew by each access
    for i in kept:
        type_ = schema.field(names[i]).type
        types[i] = _csv_type(type_)
        if types[i] is None:
            raise DataError(
                f"Parquet file {where}: column {names[i]!r} has type {type_}, which the ingest cannot use; "
                f"expected numbers, booleans, text, dates or timestamps (or drop the column with data.drop)"
            )
    return types


def _row_group_runs(metadata: pq.FileMetaData) -> Iterator[list[int]]:
    """Consecutive row groups of about ROWS_PER_READ rows in all (small groups are read together)."""
    run, rows = [], 0
    for i in range(metadata.num_row_groups):
        run.append(i)
        rows += metadata.row_group(i).num_rows
        if rows >= ROWS_PER_READ:
            yield run
            run, rows = [], 0
    if run:
        yield run


def _as_csv(column: pa.ChunkedArray, type_: pa.DataType, name: str, where: object) -> pa.ChunkedArray:
    """A column of a piece in its CSV type (unsigned integers beyond int64 refused: CSV would round them)."""
    if pa.types.is_uint64(column.type) and (pc.max(column).as_py() or 0) > INT64_MAX:
        raise DataError(
            f"Parquet file {where}: column {name!r} holds integers beyond the 64-bit range (up to "
            f"{pc.max(column).as_py()}); expected integers between -2**63 and 2**63-1 (drop the column with "
            f"data.drop if it is an id)"
        )
    if column.type == type_:
        return column
    return column.cast(type_, safe=not pa.types.is_decimal(column.type))  # a decimal rounds to float64


def _midnights(columns: Columns, i: int) -> bool:
    """Whether every value of a timestamp column without a zone is at midnight: a date column (pandas has
    no date type; its CSV writes such a column as ISO dates, which the CSV reader reads as date32)."""
    column = pa.chunked_array(columns.parts[i], type=columns.types[i])
    return columns.types[i].tz is None and pc.all(pc.equal(pc.floor_temporal(column, 1, "day"), column)).as_py()


def _settle_units(columns: Columns) -> None:
    """Timestamps and times in the type the CSV reader infers from their text: dates when every value is
    a midnight without a zone, seconds when every value is whole seconds, else nanoseconds for timestamps
    (a time of day with fractions keeps its own unit)."""
    for i in columns.parts:
        type_ = columns.types[i]
        if pa.types.is_timestamp(type_):
            units = [pa.timestamp("s", type_.tz), pa.timestamp("ns", type_.tz)]
            if _midnights(columns, i):
                units.insert(0, pa.date32())
        elif pa.types.is_time(type_):
            units = [pa.time32("s")]
        else:
            continue
        for unit in units:
            if unit == type_:
                break
            try:
                columns.recast(i, unit)
                break
            except pa.ArrowInvalid:  # the cast would lose precision (or overflow): try the next unit
                continue


def read_parquet(path: Path, columns: Columns, where: object) -> Columns:
    """The columns `columns` is planned to keep, read from the Parquet file at `path` into it."""
    with _open(path, where) as pf:
        names = _names(pf, where)
        kept = columns.plan(names)
        types = _target_types(pf, names, kept, where)
        if pf.metadata.num_rows == 0:
            raise DataError(f"Parquet file {where} has columns but no rows (columns: {', '.join(names)})")
        for run in _row_group_runs(pf.metadata):
            try:
                table = pf.read_row_groups(run, columns=[names[i] for i in kept], use_threads=True)
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"Parquet file {where} could not be read (row groups {run}): {exc}") from None
            empty = pa.chunked_array([pa.nulls(table.num_rows)])  # a column nobody needs: no memory
            arrays = [empty] * len(names)
            for i in kept:
                arrays[i] = _as_csv(table.column(names[i]), types[i], names[i], where)
            columns.add(pa.Table.from_arrays(arrays, names=names))
            del table, arrays
    if columns.types is not None:
        _settle_units(columns)
    return columns
