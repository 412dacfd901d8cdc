"""The CSV file as text: opened as pandas opens it, its dialect, its header as written, where a data row sits.

The dialect is the character between fields (data.delimiter, or sniffed from the header) and
the text encoding (data.encoding); every reader of the text here uses the one the table was
read with, so header names, line numbers and refusals agree with pyarrow's reading. Also the
refusals for a file that cannot be read at all (text its encoding cannot decode, ragged rows,
a parse error), worded as what pandas would have raised, with the line or byte offset.
Positions count in the decompressed text of a compressed file. Row numbers count data rows
from 1; the file line is one more (the header is line 1).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tasks.errors import DataError

DECODE_CHUNK = 1 << 20  # bytes decoded at a time when looking for the first byte the encoding cannot decode
DELIMITERS = (",", ";", "\t", "|")  # sniffed in this order: a tie goes to the earlier one
SNIFF_CHARS = 1 << 16  # text read to find the header's record (a quoted header may span lines)
PARQUET_MAGIC = b"PAR1"  # a Parquet file starts and ends with it
# pandas' default missing-value strings (pandas._libs.parsers.STR_NA_VALUES), which
# pandas.read_csv(engine="pyarrow") passes to pyarrow as null_values; the test suite
# checks that they still match the installed pandas.
NA_VALUES = (
    "",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "-1.#IND",
    "-1.#QNAN",
    "-NaN",
    "-nan",
    "1.#IND",
    "1.#QNAN",
    "<NA>",
    "N/A",
    "NA",
    "NULL",
    "NaN",
    "None",
    "n/a",
    "nan",
    "null",
)


@dataclass(frozen=True)
class Dialect:
    """How the CSV text is written: the character between fields and the text encoding."""

    delimiter: str = ","
    encoding: str = "utf-8"

    @property
    def utf8(self) -> bool:
        """UTF-8 under any of its names: pyarrow reads it without transcoding."""
        return codecs.lookup(self.encoding).name == "utf-8"


PARQUET_SUFFIXES = (".parquet", ".pq")


def format_by_name(name: object, fmt: str = "auto") -> str:
    """A table's format: `fmt`, or for `auto` Parquet for a name ending .parquet or .pq, CSV otherwise."""
    if fmt != "auto":
        return fmt
    return "parquet" if str(name).lower().endswith(PARQUET_SUFFIXES) else "csv"


def check_file(path: Path, kind: str = "") -> None:
    """Refuse a path that is not there or is a folder (named a Parquet file by its name, else a CSV file)."""
    kind = kind or ("Parquet file" if format_by_name(path.name) == "parquet" else "CSV file")
    if not path.exists():
        raise DataError(f"{kind} not found: {path}")
    if path.is_dir():
        raise DataError(f"{kind.split()[0]} path {path} is a folder, expected a file")


@contextlib.contextmanager
def decompressed(path: Path, text: bool = False, encoding: str = "utf-8") -> Iterator[IO]:
    """The file's bytes (or its text, undecodable bytes replaced) as the reader sees them: a
    compressed file (.gz, .bz2, .zip, .xz, .zst) decompressed, so the checks report names,
    lines and byte offsets of the CSV itself."""
    from pandas.io.common import get_handle

    with get_handle(str(path), "rb", compression="infer", is_text=False) as handles:
        if not text:
            yield handles.handle
            return
        wrapper = io.TextIOWrapper(handles.handle, encoding=encoding, errors="replace", newline="")
        try:
            yield wrapper
        finally:
            wrapper.detach()


def _shown(delimiter: str, many: bool = False) -> str:
    """A delimiter as a config value can spell it (a tab is `tab`)."""
    if delimiter == "\t":
        return "tabs" if many else "tab"
    return repr(delimiter)


def _header_fields(path: Path, encoding: str, delimiters: tuple[str, ...]) -> dict[str, int]:
    """How many fields the header record has with each delimiter (quotes respected)."""
    with decompressed(path, text=True, encoding=encoding) as f:
        head = f.read(SNIFF_CHARS).removeprefix("\ufeff")
    return {d: len(next(csv.reader(io.StringIO(head, newline=""), delimiter=d), [])) for d in delimiters}


def dialect_of(path: Path, delimiter: str, encoding: str, where: object = None) -> Dialect:
    """The file's dialect: data.delimiter, or for `auto` the one of , ; tab | that splits the header
    into the most fields. An explicit delimiter that leaves the header one column where another
    splits it is refused, naming the one the header holds (a file saved with ; read with , )."""
    candidates = DELIMITERS if delimiter in (*DELIMITERS, "auto") else (*DELIMITERS, delimiter)
    fields = _header_fields(path, encoding, candidates)
    best = max(DELIMITERS, key=lambda d: fields[d])  # max keeps the first of equals
    if delimiter == "auto":
        return Dialect(best, encoding)
    if fields[delimiter] == 1 and fields[best] > 1:
        raise DataError(
            f"CSV file {where or path}: with data.delimiter={_shown(delimiter)} the header is one column holding "
            f"{_shown(best, many=True)}; set data.delimiter={_shown(best)}"
        )
    return Dialect(delimiter, encoding)


def looks_like_parquet(path: Path) -> bool:
    """Whether the file starts and ends with Parquet's magic bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(-4, 2)
            return head == PARQUET_MAGIC and f.read(4) == PARQUET_MAGIC
    except OSError:  # shorter than 8 bytes, or unreadable: not Parquet
        return False


def _guessed(path: Path) -> Dialect:
    """The dialect of a CSV file whose reader did not say: the delimiter sniffed, text positions as UTF-8
    (the same lines for any encoding that writes , ; | tab quotes and newlines as ASCII does)."""
    return dialect_of(path, "auto", "utf-8")


def _encoding_hint(byte: int) -> str:
    """The 8-bit encoding a byte that is not UTF-8 most likely comes from: Windows' where it is one of
    the characters cp1252 puts in 0x80-0x9f (curly quotes, the euro sign), else latin-1."""
    try:
        return "cp1252" if 0x80 <= byte <= 0x9F and bytes([byte]).decode("cp1252") else "latin-1"
    except UnicodeDecodeError:
        return "latin-1"


def _not_text(where: object, encoding: str, position: str, byte: int | None) -> DataError:
    if not Dialect(encoding=encoding).utf8:
        return DataError(
            f"CSV file {where} is not valid {encoding} text ({position}); set data.encoding to the file's "
            f"encoding, or save it as UTF-8"
        )
    hint = _encoding_hint(byte) if byte is not None else "latin-1"
    return DataError(
        f"CSV file {where} is not valid UTF-8 text ({position}); set data.encoding={hint} if that is its "
        f"encoding, or save it as UTF-8"
    )


def decode_error(path: Path, encoding: str = "utf-8", detail: str = "", where: object = None) -> DataError:
    """Where the first byte the encoding cannot decode sits (offset and line), found by decoding the file
    in chunks with the codec's incremental decoder (a character cut by a chunk is held over)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset, line = 0, 1
    with decompressed(path) as f:
        while True:
            chunk = f.read(DECODE_CHUNK)
            pending = decoder.getstate()[0]  # bytes of a character begun in the last chunk
            try:
                line += decoder.decode(chunk, final=not chunk).count("\n")
            except UnicodeDecodeError as exc:
                before = exc.object[: exc.start].decode(encoding, errors="replace").count("\n")
                at = offset - len(pending) + exc.start
                position = f"byte 0x{exc.object[exc.start]:02x} at byte offset {at}, line {line + before}"
                return _not_text(where or path, encoding, position, exc.object[exc.start])
            if not chunk:
                break
            offset += len(chunk)
    return _not_text(where or path, encoding, detail, None)


def utf8_error(path: Path, detail: str = "") -> DataError:
    """The refusal for bytes that are not UTF-8 in a file read as UTF-8 (see decode_error)."""
    return decode_error(path, "utf-8", detail)


def header_names(path: Path, dialect: Dialect | None = None) -> list[str]:
    """The header's column names as written (pandas renames duplicates to `a.1`, so they are read here)."""
    dialect = dialect or _guessed(path)
    with decompressed(path, text=True, encoding=dialect.encoding) as f:
        names = next(csv.reader(f, delimiter=dialect.delimiter), [])
    if names and names[0].startswith("\ufeff"):
        names[0] = names[0][1:]
    return names


def _ragged_line(path: Path, n_fields: int, dialect: Dialect) -> tuple[int, int] | None:
    """(line, fields) of the first record whose field count differs from the header's."""
    with decompressed(path, text=True, encoding=dialect.encoding) as f:
        reader = csv.reader(f, delimiter=dialect.delimiter)
        next(reader, None)
        for record in reader:
            if record and len(record) != n_fields:
                return reader.line_num, len(record)
    return None


def read_error(path: Path, exc: Exception, dialect: Dialect | None = None, where: object = None) -> DataError:
    """The refusal for an exception from pyarrow's CSV reader (what pandas would have raised, in words)."""
    dialect = dialect or Dialect()
    where = where or path
    if isinstance(exc, UnicodeDecodeError):  # bytes the encoding cannot decode (in the header, or transcoded)
        return decode_error(path, dialect.encoding, f"{exc.reason} at byte {exc.start}", where)
    text = str(exc)
    if "Empty CSV file" in text:  # pandas: EmptyDataError
        return DataError(f"CSV file {where} has no columns; expected a header line and data rows")
    if "utf8" in text.lower() or "utf-8" in text.lower():
        return decode_error(path, dialect.encoding, text, where)
    ragged = re.search(r"Expected (\d+) columns, got (\d+)", text)  # pyarrow reports ragged rows as ArrowInvalid
    found = _ragged_line(path, int(ragged.group(1)), dialect) if ragged else None
    if found:
        return DataError(
            f"CSV file {where} could not be parsed: line {found[0]} has {found[1]} fields, "
            f"expected {ragged.group(1)} like the header ({text})"
        )
    return DataError(f"CSV file {where} could not be parsed: {exc}")


def row_position(path: Path, i: int, dialect: Dialect | None = None) -> str:
    """Data row i (0-based) and the file line it starts on: found by reading the file as CSV, so
    blank lines (skipped by the reader) and quoted values spanning lines are counted right.
    A Parquet file has rows but no lines."""
    if dialect is None and looks_like_parquet(path):
        return f"row {i + 1}"
    dialect = dialect or _guessed(path)
    line = i + 2
    with decompressed(path, text=True, encoding=dialect.encoding) as f:
        reader = csv.reader(f, delimiter=dialect.delimiter)
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
