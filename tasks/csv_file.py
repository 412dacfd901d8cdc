"""The CSV file as text: opened as pandas opens it, its header as written, where a data row sits.

Also the refusals for a file that cannot be read at all (not UTF-8, ragged rows, a parse
error), worded as what pandas would have raised, with the line or byte offset. Positions
count in the decompressed text of a compressed file. Row numbers count data rows from 1;
the file line is one more (the header is line 1).
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tasks.errors import DataError

UTF8_CHUNK = 1 << 20  # bytes decoded at a time when looking for the first byte that is not UTF-8


def check_file(path: Path) -> None:
    """Refuse a path that is not there or is a folder."""
    if not path.exists():
        raise DataError(f"CSV file not found: {path}")
    if path.is_dir():
        raise DataError(f"CSV path {path} is a folder, expected a file")


@contextlib.contextmanager
def decompressed(path: Path, text: bool = False) -> Iterator[IO]:
    """The file's bytes (or its text, undecodable bytes replaced) as the reader sees them: a
    compressed file (.gz, .bz2, .zip, .xz, .zst) decompressed, so the checks report names,
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


def utf8_error(path: Path, detail: str = "") -> DataError:
    """Where the first byte that is not UTF-8 sits (offset and line), found by decoding the file in chunks."""
    offset, line, pending = 0, 1, b""
    with decompressed(path) as f:
        while True:
            chunk = f.read(UTF8_CHUNK)
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


def header_names(path: Path) -> list[str]:
    """The header's column names as written (pandas renames duplicates to `a.1`, so they are read here)."""
    with decompressed(path, text=True) as f:
        names = next(csv.reader(f), [])
    if names and names[0].startswith("\ufeff"):
        names[0] = names[0][1:]
    return names


def _ragged_line(path: Path, n_fields: int) -> tuple[int, int] | None:
    """(line, fields) of the first record whose field count differs from the header's."""
    with decompressed(path, text=True) as f:
        reader = csv.reader(f)
        next(reader, None)
        for record in reader:
            if record and len(record) != n_fields:
                return reader.line_num, len(record)
    return None


def read_error(path: Path, exc: Exception) -> DataError:
    """The refusal for an exception from pyarrow's CSV reader (what pandas would have raised, in words)."""
    if isinstance(exc, UnicodeDecodeError):  # bytes that are not UTF-8 in the header
        return utf8_error(path, f"{exc.reason} at byte {exc.start}")
    text = str(exc)
    if "Empty CSV file" in text:  # pandas: EmptyDataError
        return DataError(f"CSV file {path} has no columns; expected a header line and data rows")
    if "utf8" in text.lower() or "utf-8" in text.lower():
        return utf8_error(path, text)
    ragged = re.search(r"Expected (\d+) columns, got (\d+)", text)  # pyarrow reports ragged rows as ArrowInvalid
    where = _ragged_line(path, int(ragged.group(1))) if ragged else None
    if where:
        return DataError(
            f"CSV file {path} could not be parsed: line {where[0]} has {where[1]} fields, "
            f"expected {ragged.group(1)} like the header ({text})"
        )
    return DataError(f"CSV file {path} could not be parsed: {exc}")


def row_position(path: Path, i: int) -> str:
    """Data row i (0-based) and the file line it starts on: found by reading the file as CSV, so
    blank lines (skipped by the reader) and quoted values spanning lines are counted right."""
    line = i + 2
    with decompressed(path, text=True) as f:
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
