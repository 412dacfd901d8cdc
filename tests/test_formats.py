"""Table formats: CSV delimiters (set or sniffed), text encodings, and Parquet read into the same columns.

A file in another dialect or format must give what the plain comma-separated UTF-8 CSV of the
same table gives: the same tensors and schema, and refusals naming the same rows and lines.
"""

from __future__ import annotations

import datetime
import gzip

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.config import DataConfig
from tasks import csv_read, parquet_read
from tasks.csv_file import Dialect, dialect_of, row_position
from tasks.csv_read import read_columns
from tasks.errors import DataError
from tasks.ingest import ingest
from tasks.ingest_csv import build_csv
from tasks.prepared import load_prepared

NOT_COMPARED = ("file", "content_hash", "key")


def cfg(path, **kw) -> DataConfig:
    return DataConfig(source="csv", path=str(path), target=kw.pop("target", "label"), **kw)


def table(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """Integers, floats, text, booleans, dates and a text label, with a few values missing."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "count": rng.integers(0, 50, n),
            "size": rng.normal(size=n).round(3),
            "colour": rng.choice(["red", "green", "blue"], n),
            "flag": rng.choice([True, False], n),
            "day": pd.Timestamp("2021-01-01") + pd.to_timedelta(rng.integers(0, 700, n), unit="D"),
            "label": rng.choice(["no", "yes"], n),
        }
    )
    df.loc[[3, 40], "size"] = np.nan
    df.loc[[7, 90], "colour"] = None
    return df


def same_dataset(a, b) -> None:
    """Equal tensors (bit for bit) and equal schemas apart from the file's name and content hash."""
    assert list(a.tensors) == list(b.tensors)
    for name, tensor in a.tensors.items():
        assert tensor.dtype == b.tensors[name].dtype and torch.equal(tensor, b.tensors[name]), name
    drop = lambda s: {k: v for k, v in s.items() if k not in NOT_COMPARED}  # noqa: E731
    assert drop(a.schema) == drop(b.schema)


def built(path, **kw):
    return build_csv(cfg(path, **kw), path, "hash")


def refused(path, *fragments, **kw) -> str:
    with pytest.raises(DataError) as err:
        built(path, **kw)
    msg = str(err.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ---- delimiters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"], ids=["comma", "semicolon", "tab", "pipe"])
def test_the_delimiter_is_sniffed_from_the_header(tmp_path, delimiter):
    df = table()
    plain = tmp_path / "plain.csv"
    df.to_csv(plain, index=False)
    other = tmp_path / "other.csv"
    df.to_csv(other, index=False, sep=delimiter)
    assert dialect_of(other, "auto", "utf-8") == Dialect(delimiter, "utf-8")
    same_dataset(built(plain), built(other))
    same_dataset(built(plain), built(other, delimiter="tab" if delimiter == "\t" else delimiter))


def test_a_quoted_header_is_sniffed_by_its_fields_not_its_characters(tmp_path):
    # with ; each name is one quoted field; the commas inside the quotes do not split it
    text = '"x, first";"y, second";"label"\n' + "".join(f"{i % 5};{i % 7};{'ab'[i % 2]}\n" for i in range(40))
    path = tmp_path / "quoted.csv"
    path.write_text(text)
    assert dialect_of(path, "auto", "utf-8").delimiter == ";"
    names = [f["name"] for f in built(path).schema["features"]]
    assert names == ["x, first", "y, second"]


def test_a_tie_goes_to_the_comma(tmp_path):
    path = tmp_path / "tie.csv"
    path.write_text("a;b,label\n" + "".join(f"{i};{i},{'ab'[i % 2]}\n" for i in range(40)))
    assert dialect_of(path, "auto", "utf-8").delimiter == ","


@pytest.mark.parametrize(
    "written, setting, words",
    [
        (";", ",", "with data.delimiter=',' the header is one column holding ';'; set data.delimiter=';'"),
        ("\t", ";", "with data.delimiter=';' the header is one column holding tabs; set data.delimiter=tab"),
        (",", "|", "with data.delimiter='|' the header is one column holding ','; set data.delimiter=','"),
    ],
    ids=["semicolon-read-as-comma", "tab-read-as-semicolon", "comma-read-as-pipe"],
)
def test_an_explicit_delimiter_that_leaves_one_column_is_refused(tmp_path, written, setting, words):
    path = tmp_path / "data.csv"
    table().to_csv(path, index=False, sep=written)
    refused(path, "data.csv", words, delimiter=setting)


def test_a_one_column_file_is_not_refused_for_its_delimiter(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("label\n" + "a\nb\n" * 20)
    assert dialect_of(path, ";", "utf-8") == Dialect(";", "utf-8")


def test_a_compressed_csv_with_semicolons(tmp_path):
    df = table()
    plain = tmp_path / "plain.csv"
    df.to_csv(plain, index=False)
    packed = tmp_path / "data.csv.gz"
    packed.write_bytes(gzip.compress(df.to_csv(index=False, sep=";").encode()))
    same_dataset(built(plain), built(packed))
    text = "x;label\n" + "".join("abc;1\n" if i == 12 else f"{i};{i % 2}\n" for i in range(40))
    packed.write_bytes(gzip.compress(text.encode()))
    refused(packed, "column 'x' holds numbers but row 13 (line 14) has 'abc'")


def test_a_large_semicolon_file_read_in_pieces_gives_one_reads_result(tmp_path, monkeypatch):
    path = tmp_path / "data.csv"
    table(400).to_csv(path, index=False, sep=";")
    whole = built(path)
    monkeypatch.setattr(csv_read, "PIECE_BYTES", 512)
    monkeypatch.setattr(csv_read, "_read_whole", lambda *a: pytest.fail("read whole"))
    same_dataset(whole, built(path))


# ---- encodings ----------------------------------------------------------------------------------


def latin1_text(bad_row: int | None = None) -> str:
    rows = [f"{i};{'café' if i % 3 else 'thé'};{'ab'[i % 2]}\n" for i in range(60)]
    rows[2] = '2;"crème\nbrûlée";a\n'  # one row on two lines
    if bad_row is not None:
        rows[bad_row] = f"abc;thé;{'ab'[bad_row % 2]}\n"
    return "x;drink;label\n" + "".join(rows)


def test_a_latin1_file_is_read_with_its_encoding(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(latin1_text().encode("latin-1"))
    utf8 = tmp_path / "utf8.csv"
    utf8.write_text(latin1_text(), encoding="utf-8")
    read = built(path, encoding="latin-1")
    assert [f["vocabulary"] for f in read.schema["features"] if f["name"] == "drink"] == [
        ["café", "crème\nbrûlée", "thé"]
    ]
    same_dataset(built(utf8), read)


def test_a_latin1_file_read_as_utf8_is_refused_with_the_encoding_to_set(tmp_path):
    text = latin1_text()
    path = tmp_path / "latin1.csv"
    path.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index("é".encode("latin-1"))  # in the first row, 'thé'
    refused(
        path,
        "latin1.csv is not valid UTF-8 text",
        f"byte 0xe9 at byte offset {offset}, line 2",
        "set data.encoding=latin-1 if that is its encoding, or save it as UTF-8",
    )


def test_windows_quotes_suggest_cp1252(tmp_path):
    path = tmp_path / "windows.csv"
    rows = "".join(f"{i % 5},{'it’s' if i % 3 else 'don’t'},{'ab'[i % 2]}\n" for i in range(40))
    data = b"x,note,label\n" + rows.encode("cp1252")
    path.write_bytes(data)
    offset = data.index("’".encode("cp1252"))  # the first row's 'don’t'
    refused(path, f"byte 0x92 at byte offset {offset}, line 2", "set data.encoding=cp1252")
    features = built(path, encoding="cp1252").schema["features"]
    assert [f["vocabulary"] for f in features if f["name"] == "note"] == [["don’t", "it’s"]]


def test_an_encoding_that_cannot_decode_the_file_names_the_byte_and_line(tmp_path):
    data = b"x,note,label\n" + b"".join(b"%d,%s,%d\n" % (i, b"\x81" if i == 25 else b"ok", i % 2) for i in range(40))
    path = tmp_path / "cp.csv"
    path.write_bytes(data)
    offset = data.index(b"\x81")
    refused(
        path,
        "cp.csv is not valid cp1252 text",
        f"byte 0x81 at byte offset {offset}, line 27",
        "set data.encoding to the file's encoding",
        encoding="cp1252",
    )


def test_a_bad_row_is_placed_right_with_semicolons_and_latin1(tmp_path):
    path = tmp_path / "late.csv"
    path.write_bytes(latin1_text(bad_row=30).encode("latin-1"))
    # row 31: after the header, 30 rows before it and one of them on two lines
    refused(path, "late.csv", "column 'x' holds numbers but row 31 (line 33) has 'abc'", encoding="latin-1")
    assert row_position(path, 30, Dialect(";", "latin-1")) == "row 31 (line 33)"


def test_the_columns_know_their_rows_and_values_as_written(tmp_path):
    path = tmp_path / "big.csv"
    path.write_bytes("id;café;label\n18446744073709551621;1;a\n7;2;b\n".encode("latin-1"))
    columns = read_columns(path, cfg(path, encoding="latin-1", features=["id"]))
    assert columns.written("id").tolist() == ["18446744073709551621", "7"]
    assert columns.position(1) == "row 2 (line 3)"


# ---- Parquet ------------------------------------------------------------------------------------


def test_parquet_and_csv_of_one_table_give_equal_datasets(tmp_path, state_home):
    df = table()
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    a = load_prepared(ingest(cfg(tmp_path / "t.csv"), state_home).path)
    b = load_prepared(ingest(cfg(tmp_path / "t.parquet"), state_home).path)
    same_dataset(a, b)


def test_parquet_types_are_read_as_the_csv_reader_types_their_text(tmp_path, monkeypatch):
    """Narrow, unsigned, dictionary-encoded, large and zoned columns in several row groups."""
    df = table(200)
    stamps = pd.Timestamp("2022-03-01 10:00:00", tz="UTC") + pd.to_timedelta(np.arange(200) * 3601, unit="s")
    df["seen"] = stamps.strftime("%Y-%m-%dT%H:%M:%SZ")  # ISO with a zone: pyarrow's CSV reader reads UTC
    csv_path = tmp_path / "t.csv"
    df.to_csv(csv_path, index=False)
    arrow = pa.table(
        {
            "count": pa.array(df["count"], pa.uint8()),
            "size": pa.array(df["size"]),
            "colour": pa.array(df["colour"], pa.large_string()).dictionary_encode(),
            "flag": pa.array(df["flag"]),
            "day": pa.array([d.date() for d in df["day"]], pa.date32()),
            "label": pa.array(df["label"]).dictionary_encode(),
            "seen": pa.array(stamps.tz_convert("Europe/Paris"), pa.timestamp("ms", "Europe/Paris")),
        }
    )
    path = tmp_path / "t.pq"
    pq.write_table(arrow, path, row_group_size=30)
    monkeypatch.setattr(parquet_read, "ROWS_PER_READ", 50)
    columns = read_columns(path, cfg(path))
    assert columns.types[columns.index("seen")] == pa.timestamp("s", "UTC")
    assert columns.types == read_columns(csv_path, cfg(csv_path)).types
    same_dataset(built(csv_path), built(path))


def test_only_the_columns_needed_are_read(tmp_path):
    df = table()
    arrow = pa.Table.from_pandas(df, preserve_index=False).append_column("tags", pa.array([[1, 2]] * len(df)))
    path = tmp_path / "t.parquet"
    pq.write_table(arrow, path)
    df.to_csv(tmp_path / "t.csv", index=False)
    same_dataset(built(tmp_path / "t.csv"), built(path, drop=["tags"]))


def test_a_pandas_index_is_not_a_column(tmp_path):
    df = table().set_index(pd.Index(np.arange(120) * 10, name="row_id"))
    df.to_parquet(tmp_path / "t.parquet")
    df.to_csv(tmp_path / "t.csv", index=False)
    same_dataset(built(tmp_path / "t.csv"), built(tmp_path / "t.parquet"))


def parquet_with(tmp_path, column: pa.Array, name="t.parquet"):
    n = len(column)
    arrow = pa.table({"x": pa.array(np.arange(n)), "odd": column, "label": pa.array(["a", "b"] * (n // 2))})
    pq.write_table(arrow, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    "column, type_name",
    [
        (pa.array([[1, 2], [3]] * 20), "list<element: int64>"),
        (pa.array([{"a": 1}, {"a": 2}] * 20), "struct<a: int64>"),
        (pa.array([[("k", 1)], [("k", 2)]] * 20, pa.map_(pa.string(), pa.int64())), "map<string, int64"),
        (pa.array([b"\x00\x01", b"\x02"] * 20), "binary"),
    ],
    ids=["list", "struct", "map", "binary"],
)
def test_a_parquet_column_of_a_type_the_ingest_cannot_use_is_refused(tmp_path, column, type_name):
    path = parquet_with(tmp_path, column)
    refused(path, "Parquet file", "t.parquet", "column 'odd' has type", type_name, "data.drop")


def test_unsigned_integers_beyond_int64_are_refused(tmp_path):
    path = parquet_with(tmp_path, pa.array([2**64 - 1, 3] * 20, pa.uint64()))
    refused(path, "t.parquet", "column 'odd' holds integers beyond the 64-bit range (up to 18446744073709551615)")


def test_a_file_named_parquet_that_is_not_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_text("x,label\n1,a\n2,b\n")
    refused(path, "Parquet file", "t.parquet is not a Parquet file (", "magic bytes")


def test_an_empty_parquet_file(tmp_path):
    path = tmp_path / "t.parquet"
    refused(path, "Parquet file not found: ", "t.parquet")
    path.write_bytes(b"")
    refused(path, "Parquet file", "t.parquet is empty (0 bytes)")
    pq.write_table(pa.table({"x": pa.array([], pa.int64()), "label": pa.array([], pa.string())}), path)
    refused(path, "t.parquet has columns but no rows (columns: x, label)")


def test_a_parquet_file_read_as_csv_is_refused(tmp_path):
    path = parquet_with(tmp_path, pa.array([1, 2] * 20), name="table.dat")
    refused(path, "table.dat is a Parquet file", "set data.format=parquet", format="csv")
    assert built(path, format="parquet").schema["split_sizes"]["train"] > 0


def test_a_bad_parquet_value_is_placed_by_its_row(tmp_path):
    path = parquet_with(tmp_path, pa.array([f"{i}.5" if i != 2 else "x" for i in range(40)]))
    msg = refused(path, "t.parquet", "column 'odd' holds numbers but row 3 has 'x'")
    assert msg.startswith(f"Parquet file {path}: ")  # the column checks after the reader name the format too
    assert read_columns(path, cfg(path)).written("odd") is None


def test_parquet_midnights_are_dates_and_other_times_stay_timestamps(tmp_path):
    days = pa.array([datetime.datetime(2021, 5, 1 + i % 20) for i in range(40)], pa.timestamp("us"))
    columns = read_columns(parquet_with(tmp_path, days), cfg(tmp_path / "t.parquet"))
    assert columns.type("odd") == pa.date32()
    moments = pa.array(
        [datetime.datetime(2021, 5, 1, 0, 0, 0, 500_000 * (i % 2)) for i in range(40)], pa.timestamp("us")
    )
    columns = read_columns(parquet_with(tmp_path, moments, "m.parquet"), cfg(tmp_path / "m.parquet"))
    assert columns.type("odd") == pa.timestamp("ns")


def test_duplicate_parquet_column_names_are_refused(tmp_path):
    arrays = [pa.array(np.arange(40)), pa.array(np.arange(40)), pa.array(["a", "b"] * 20)]
    pq.write_table(pa.Table.from_arrays(arrays, names=["x", "x", "label"]), tmp_path / "t.parquet")
    refused(tmp_path / "t.parquet", "t.parquet: duplicate column names ['x']; each column needs a unique name")


def test_messages_name_the_file_as_given(tmp_path):
    """A local copy of a remote table is named by its URI; Parquet is told by that name, too."""
    path = tmp_path / "copy"
    parquet_with(tmp_path, pa.array([[1]] * 40), name="copy")
    uri = "s3://bucket/tables/t.parquet"
    with pytest.raises(DataError, match=r"^Parquet file s3://bucket/tables/t.parquet: column 'odd' has type list"):
        read_columns(path, cfg(tmp_path / "t.csv"), where=uri)
    path.write_bytes(b"x;label\n1;a\n")
    with pytest.raises(DataError, match=r"^CSV file s3://bucket/t.csv: with data.delimiter=','"):
        read_columns(path, cfg(tmp_path / "t.csv", delimiter=","), where="s3://bucket/t.csv")


def test_an_integer_beyond_64_bits_is_refused_in_a_semicolon_latin1_file(tmp_path):
    """The 64-bit check reads the column's text again with the file's own delimiter and encoding."""
    rows = "".join(f"{i * 7 % 13};caf\xe9;{'a' if i % 2 else 'b'}\n" for i in range(30))
    rows += "99999999999999999999;caf\xe9;a\n"
    path = tmp_path / "big.csv"
    path.write_bytes(("n;word;label\n" + rows).encode("latin-1"))
    refused(path, "column 'n' has the integer 99999999999999999999 at row 31 (line 32)", encoding="latin-1")


def test_large_parquet_doubles_are_numbers_not_overflowing_integers(tmp_path):
    """A Parquet double is typed as written: 1e19 is a number, with no CSV text to read again."""
    values = pa.array([1e19 * (1 + i % 5) for i in range(40)])
    prepared = built(parquet_with(tmp_path, values))
    (odd,) = [f for f in prepared.schema["features"] if f["name"] == "odd"]
    assert odd["kind"] == "numeric" and 1e19 <= odd["mean"] <= 5e19  # the training split's mean
