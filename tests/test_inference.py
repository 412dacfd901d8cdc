"""How columns are read: code-like vs measurement, identifiers, dates, yes/no, their schema records and overrides.

Each rule is tested on both sides of its line; the real tables in ../shared/data/tables are
ingested with what their README says (skipped when the folder is absent).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import csv_identifiers
from tasks.csv_dates import ISO_DATE
from tasks.data_config import DataConfig
from tasks.errors import DataError
from tasks.ingest_csv import build_csv
from tests.conftest import REPO

TABLES = REPO.parent / "shared" / "data" / "tables"


def build(tmp_path: Path, df: pd.DataFrame, **kw):
    path = tmp_path / "data.csv"
    df.to_csv(path, index=False)
    cfg = DataConfig(source="csv", path=str(path), target=kw.pop("target", "label"), **kw)
    return build_csv(cfg, path, "hash")


def entry(schema: dict, name: str) -> dict:
    (found,) = [f for f in schema["features"] if f["name"] == name]
    return found


def frame(n: int = 120, seed: int = 0, **columns) -> pd.DataFrame:
    """A measurement and a label, plus the columns under test."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"m": rng.normal(size=n), **columns, "label": np.where(np.arange(n) % 3, "a", "b")})


def original(x: np.ndarray, stats: dict) -> np.ndarray:
    """A standardised tensor column back in its own units."""
    return x.astype(np.float64) * stats["std"] + stats["mean"]


# ---- 1. code-like vs measurement-like ---------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        ["3", "4", "5", "6", "8", "rotary"],  # cars93's Cylinders
        ["2", "3", "4", "5more"],  # car evaluation's doors
        ["2", "4", "more"],  # and persons
    ],
    ids=["cylinders", "doors", "persons"],
)
def test_few_values_mixing_numbers_and_words_are_categorical(tmp_path, values):
    n = 93
    codes = [values[i % (len(values) - 1)] for i in range(n)]
    codes[56] = values[-1]  # the one word, as cars93 has it
    prepared = build(tmp_path, frame(n, code=codes))
    code = entry(prepared.schema, "code")
    assert code["kind"] == "categorical" and code["encoding"] == "onehot"
    assert code["reason"] == f"code-like: {len(values)} distinct values mixing numbers and words"
    assert set(code["vocabulary"]) <= set(values) and len(code["vocabulary"]) >= len(values) - 1
    assert values[-1] in code["vocabulary"] or code["unseen_outside_train"] == 1  # the word's row may not train
    assert f"code={values[0]}" in prepared.schema["feature_names"]


def test_a_word_among_many_distinct_numbers_is_refused_as_a_measurement(tmp_path):
    values = [f"{v:.6f}" for v in np.random.default_rng(1).normal(size=300)]
    values[41] = "oops"
    with pytest.raises(DataError) as err:
        build(tmp_path, frame(300, reading=values))
    msg = str(err.value)
    assert "column 'reading' holds numbers but row 42 (line 43) has 'oops'" in msg, msg
    assert "with 300 distinct values (a code column has at most 20) it reads as a measurement" in msg, msg
    assert "data.categorical" in msg


@pytest.mark.parametrize(
    "present, why",
    [
        (["1.5", "2.5", "3.5", "x"] * 15, "numbers that are not whole"),
        (["1", "2", "3", "4", "5", "6", "7", "x", "1", "2", "3", "4", "5", "6"], "8 distinct values in 14 rows"),
    ],
    ids=["not-whole", "too-few-repeats"],
)
def test_a_code_needs_whole_numbers_that_repeat(tmp_path, present, why):
    column = present + [None] * (60 - len(present))  # a word among numbers, each value too seldom a code
    with pytest.raises(DataError, match=re.escape(why)):
        build(tmp_path, frame(60, seed=2, c=column))


def test_a_code_listed_in_data_categorical_or_mostly_words_is_categorical(tmp_path):
    mostly_words = ["low", "high", "mid", "7"] * 30  # three words to a number: text, as before
    prepared = build(tmp_path, frame(120, w=mostly_words))
    assert entry(prepared.schema, "w")["kind"] == "categorical"
    values = [f"{v:.3f}" for v in np.random.default_rng(1).normal(size=120)]
    values[3] = "oops"
    prepared = build(tmp_path, frame(120, reading=values), categorical=["reading"])
    assert entry(prepared.schema, "reading")["reason"] == "listed in data.categorical"


# ---- 2. identifiers ---------------------------------------------------------------------------


def test_text_distinct_on_nearly_every_row_is_left_out_but_distinct_floats_are_kept(tmp_path, caplog):
    n = 100
    names = [f"passenger {i:03d}" for i in range(n)]
    names[5] = names[4]  # 99 distinct of 100: still an identifier
    with caplog.at_level(logging.INFO, logger="trainyard.ingest"):
        schema = build(tmp_path, frame(n, name=names)).schema
    assert schema["left_out"] == [
        {"name": "name", "reason": "an identifier: text with 99 distinct values in 100 rows (at least 90% distinct)"}
    ]
    assert "left out column 'name'" in caplog.text and "data.features" in caplog.text
    assert [f["name"] for f in schema["features"]] == ["m"]  # m: a float distinct on every row, a measurement
    assert entry(schema, "m")["kind"] == "numeric"


def test_text_below_the_identifier_share_is_categorical(tmp_path):
    n = 100
    names = [f"group {i % 85}" for i in range(n)]  # 85 distinct of 100
    schema = build(tmp_path, frame(n, name=names)).schema
    assert schema["left_out"] == [] and entry(schema, "name")["kind"] == "categorical"
    assert csv_identifiers.text_identifier(19, 19) is None  # too few rows to tell
    assert csv_identifiers.text_identifier(18, 20) is not None


@pytest.mark.parametrize(
    "values, reason",
    [
        (np.arange(1, 121), "a row counter: integers from 1 to 120, increasing by one on every row"),
        (np.arange(120) * 3 + 1000, "a row index or id: integers strictly increasing on every row, from 1000 to 1357"),
    ],
    ids=["by-one", "increasing-ids"],
)
def test_a_row_counter_is_left_out(tmp_path, values, reason):
    schema = build(tmp_path, frame(120, id=values)).schema
    assert schema["left_out"] == [{"name": "id", "reason": reason}]
    assert "id" not in schema["feature_names"]


@pytest.mark.parametrize(
    "values",
    [
        np.sort(np.random.default_rng(0).integers(0, 60, 120)),  # sorted, but repeats
        np.arange(120)[::-1],  # decreasing
        np.r_[np.arange(60), np.arange(60)],  # counts twice
        np.arange(120) + 0.5,  # floats: a measurement
    ],
    ids=["sorted-with-repeats", "decreasing", "restarts", "floats"],
)
def test_integer_features_and_floats_that_are_no_counter_are_kept(tmp_path, values):
    schema = build(tmp_path, frame(120, k=values)).schema
    assert schema["left_out"] == [] and entry(schema, "k")["kind"] == "numeric"
    assert entry(schema, "k")["reason"] == "numbers"


def test_the_counter_line_in_rows_and_across_pieces():
    assert csv_identifiers.row_counter([np.arange(19)]) is None  # too few rows to tell
    assert csv_identifiers.row_counter([np.arange(20)]) is not None
    pieces = [np.arange(0, 50, dtype=np.int8), np.arange(50, 300, dtype=np.int16)]
    assert "increasing by one" in csv_identifiers.row_counter(pieces)
    assert csv_identifiers.row_counter([np.arange(0, 50), np.arange(49, 300)]) is None  # a repeat between pieces


@pytest.mark.parametrize("name", ["rownames", "Unnamed: 0"])
def test_row_names_are_left_out_unless_they_repeat(tmp_path, name):
    shuffled = np.random.default_rng(0).permutation(120) + 1  # distinct, but in no order
    schema = build(tmp_path, frame(120, **{name: shuffled})).schema
    assert [c["name"] for c in schema["left_out"]] == [name]
    assert "a distinct value on every row" in schema["left_out"][0]["reason"]
    repeats = build(tmp_path, frame(120, **{name: shuffled % 7})).schema
    assert repeats["left_out"] == [] and entry(repeats, name)["kind"] == "numeric"


def test_an_identifier_listed_in_data_features_is_kept(tmp_path):
    n = 100
    df = frame(n, id=np.arange(n), name=[f"row {i}" for i in range(n)])
    schema = build(tmp_path, df, features=["m", "id", "name"]).schema
    assert schema["left_out"] == []
    assert entry(schema, "id")["kind"] == "numeric" and entry(schema, "name")["kind"] == "categorical"
    dropped = build(tmp_path, df, drop=["id"]).schema  # dropped by the config: not among the left out
    assert [c["name"] for c in dropped["left_out"]] == ["name"]


def test_a_table_of_identifiers_only_is_refused(tmp_path):
    df = pd.DataFrame({"id": np.arange(60), "label": ["a", "b"] * 30})
    with pytest.raises(DataError, match="no feature columns left: id look like identifiers.*data.features"):
        build(tmp_path, df)


# ---- 3. dates and times -----------------------------------------------------------------------


def test_iso_dates_become_standardised_parts(tmp_path):
    n = 120
    days = pd.date_range("2019-12-20", periods=n, freq="5D")
    df = frame(n, when=days.strftime("%Y-%m-%d"))
    df.loc[3, "when"] = None
    prepared = build(tmp_path, df, split_seed=1)
    when = entry(prepared.schema, "when")
    assert when["kind"] == "date" and when["source"] == "date32[day]" and when["missing"] == 1
    assert [p["part"] for p in when["parts"]] == ["year", "month", "day_of_week", "day_of_year"]
    names = prepared.schema["feature_names"]
    assert names[1:5] == ["when.year", "when.month", "when.day_of_week", "when.day_of_year"]
    x = np.concatenate([prepared.tensors[f"x_{s}"].numpy() for s in ("train", "val", "test")])
    recovered = {p["part"]: np.round(original(x[:, 1 + k], p)) for k, p in enumerate(when["parts"])}
    expected = {  # the rows of the splits, in split order, are found back by their measurement m
        "year": days.year,
        "month": days.month,
        "day_of_week": days.dayofweek,
        "day_of_year": days.dayofyear,
    }
    m = original(x[:, 0], entry(prepared.schema, "m"))
    row = np.array([int(np.argmin(np.abs(df["m"].to_numpy() - v))) for v in m])
    present = row != 3
    for part, values in expected.items():
        assert np.array_equal(recovered[part][present], np.asarray(values)[row[present]]), part
    assert recovered["year"][~present] == entry(prepared.schema, "when")["parts"][0]["median"]  # imputed


def test_timestamps_and_iso_text_with_times_get_the_hour(tmp_path):
    n = 60
    stamps = pd.date_range("2024-03-01 00:30", periods=n, freq="7h")
    text = [s.strftime("%Y-%m-%dT%H:%M:%S") + ("+02:00" if i % 2 else "Z") for i, s in enumerate(stamps)]
    schema = build(tmp_path, frame(n, at=stamps.strftime("%Y-%m-%d %H:%M:%S"), text=text)).schema
    at, txt = entry(schema, "at"), entry(schema, "text")
    assert at["kind"] == "date" and at["source"].startswith("timestamp") and at["parts"][-1]["part"] == "hour"
    assert txt["kind"] == "date" and txt["parts"][-1]["name"] == "text.hour" and txt["timezone"] == "UTC"
    assert {f["kind"] for f in schema["features"]} == {"numeric", "date"}


def test_iso_text_dates_are_parsed_and_text_that_is_not_dates_is_categorical(tmp_path):
    n = 60
    # dates, some with a time and an offset: pyarrow leaves such a mix as text
    iso = [f"2021-{1 + i % 12:02d}-{1 + i % 4:02d}" + ("T10:00+02:00" if i % 2 else "") for i in range(n)]
    slashes = [d.replace("-", "/") for d in iso]
    impossible = list(iso)
    impossible[9] = "2021-02-30"  # the shape of a date, but no such day
    schema = build(tmp_path, frame(n, iso=iso, slashes=slashes, impossible=impossible)).schema
    assert entry(schema, "iso")["kind"] == "date" and entry(schema, "iso")["source"] == "text"
    assert entry(schema, "iso")["reason"] == "text: every value an ISO 8601 date"
    assert entry(schema, "iso")["timezone"] == "UTC" and entry(schema, "iso")["parts"][-1]["part"] == "hour"
    assert entry(schema, "slashes")["kind"] == "categorical" and entry(schema, "impossible")["kind"] == "categorical"
    assert ISO_DATE.fullmatch("2021-02-01T10:00:00.25+01:00") and not ISO_DATE.fullmatch("21-02-01")


def test_a_date_part_named_like_another_column_is_refused(tmp_path):
    n = 60
    df = frame(n, when=[f"2021-01-{1 + i % 5:02d}" for i in range(n)], **{"when.year": np.arange(n) % 4})
    with pytest.raises(DataError, match=r"column 'when' holds dates, whose part 'when.year' has the name of another"):
        build(tmp_path, df)
    assert entry(build(tmp_path, df, drop=["when.year"]).schema, "when")["kind"] == "date"


# ---- 4. yes/no ----------------------------------------------------------------------------------


def test_yes_no_text_in_any_case_is_a_boolean(tmp_path):
    n = 90
    answers = [["Yes", "no", "YES"][i % 3] for i in range(n)]
    answers[4] = None
    prepared = build(tmp_path, frame(n, ok=answers, flag=[bool(i % 2) for i in range(n)]))
    ok = entry(prepared.schema, "ok")
    assert ok["kind"] == "boolean" and ok["reason"] == "yes/no text: two values"
    assert ok["true"] == ["YES", "Yes"] and ok["false"] == ["no"] and ok["missing"] == 1
    assert entry(prepared.schema, "flag")["kind"] == "boolean"
    x = prepared.tensors["x_train"].numpy()
    col = prepared.schema["feature_names"].index("ok")
    assert sorted(set(np.round(original(x[:, col], ok), 6))) == [0.0, 1.0]  # the imputed median is one of them
    assert prepared.schema["input_shape"] == [3]


@pytest.mark.parametrize(
    "values", [["yes", "no", "maybe"], ["y", "yes", "n"], ["yes"]], ids=["three-words", "two-pairs", "one-word"]
)
def test_text_that_is_not_one_yes_no_pair_is_categorical(tmp_path, values):
    schema = build(tmp_path, frame(90, ok=[values[i % len(values)] for i in range(90)])).schema
    assert entry(schema, "ok")["kind"] == "categorical"


def test_a_yes_no_target_keeps_its_labels(tmp_path):
    df = frame(90)
    df["label"] = np.where(df["m"] > 0, "Yes", "No")
    schema = build(tmp_path, df).schema
    assert schema["task"] == "classification" and schema["label_names"] == ["No", "Yes"]


# ---- overrides ----------------------------------------------------------------------------------


def test_data_categorical_overrides_dates_and_booleans(tmp_path):
    n = 60
    df = frame(n, when=[f"2021-01-{1 + i % 5:02d}" for i in range(n)], ok=["yes", "no"] * (n // 2))
    schema = build(tmp_path, df, categorical=["when", "ok"]).schema
    for name in ("when", "ok"):
        assert entry(schema, name)["kind"] == "categorical"
        assert entry(schema, name)["reason"] == "listed in data.categorical"
    assert "when=2021-01-01" in schema["feature_names"] and "ok=yes" in schema["feature_names"]


# ---- the real tables ------------------------------------------------------------------------------


def readme_tables() -> list[tuple[str, str, list[str]]]:
    """(file, target, drop) of each row of the tables' README."""
    rows = []
    for line in (TABLES / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 4 and cells[0].endswith(".csv"):
            rows.append((cells[0], cells[2], [] if cells[4] == "-" else [c.strip() for c in cells[4].split(",")]))
    return rows


IDENTIFIER_REASONS = ("row names", "an unnamed first column", "a row counter", "a row index or id", "an identifier")


@pytest.mark.skipif(not (TABLES / "README.md").exists(), reason=f"no tables in {TABLES}")
def test_every_real_table_ingests_with_its_readme_target_and_drop():
    tables = readme_tables()
    assert len(tables) == len(list(TABLES.glob("*.csv")))
    for file, target, drop in tables:
        path = TABLES / file
        for listed in (drop, []):  # as the README says, and with nothing dropped
            cfg = DataConfig(source="csv", path=str(path), target=target, drop=listed)
            schema = build_csv(cfg, path, "hash").schema
            used = [f["name"] for f in schema["features"]]
            assert used and not set(used) & set(listed), file
            for column in schema["left_out"]:  # what the rules leave out is an identifier, for a stated reason
                assert column["name"] not in listed and column["reason"].startswith(IDENTIFIER_REASONS), column
            if "rownames" in pd.read_csv(path, nrows=0).columns and not listed:
                assert "rownames" in [c["name"] for c in schema["left_out"]], file
