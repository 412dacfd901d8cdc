import gzip
import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.config import DataConfig
from tasks import csv_read, csv_standardise, ingest_csv
from tasks.errors import DataError
from tasks.ingest import ingest
from tasks.prepared import load_prepared
from tasks.splits import split_indices
from tests.conftest import separable_frame


def cfg(path, **kw) -> DataConfig:
    return DataConfig(source="csv", path=str(path), target=kw.pop("target", "label"), **kw)


def write(tmp_path, df, name="data.csv"):
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def test_prepares_standardised_tensors_and_schema(tmp_path, toy_csv, state_home):
    ref = ingest(cfg(toy_csv, drop=["id"]), state_home)
    prepared = load_prepared(ref.path)
    s = prepared.schema
    assert s["task"] == "classification" and s["binary"] and s["label_names"] == ["no", "yes"]
    assert s["output_size"] == 1
    names = [f["name"] for f in s["features"]]
    assert names == ["x1", "x2", "colour"]  # id dropped, target excluded
    colour = s["features"][2]
    assert set(colour["vocabulary"]) - {"<missing>"} == {"blue", "green", "red"}
    assert colour["vocabulary"] == sorted(colour["vocabulary"])
    assert s["input_shape"] == [2 + len(colour["vocabulary"])]
    assert s["missing_counts"]["x1"] == 1 and s["missing_counts"]["colour"] == 1
    x_train = prepared.tensors["x_train"]
    assert x_train.dtype == torch.float32
    # statistics come from the training split: train columns have mean 0 and std 1
    assert torch.allclose(x_train[:, :2].mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(x_train[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-4)
    sizes = s["split_sizes"]
    assert sizes == {"train": 280, "val": 40, "test": 80}
    assert sum(t.shape[0] for k, t in prepared.tensors.items() if k.startswith("y_")) == 400
    # one-hot rows sum to 1 on the training split
    assert torch.all(x_train[:, 2:].sum(1) == 1)


def test_stratified_split_keeps_class_shares(tmp_path, state_home):
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"a": rng.normal(size=500), "label": np.where(np.arange(500) < 100, "rare", "common")})
    prepared = load_prepared(ingest(cfg(write(tmp_path, df)), state_home).path)
    for split in ("train", "val", "test"):
        y = prepared.tensors[f"y_{split}"]
        share = float((y == 1).float().mean())  # label 1 is 'rare' (sorted: common, rare)
        assert abs(share - 0.2) < 0.02, (split, share)


def test_cache_is_reused_and_keyed_by_content_and_config(tmp_path, toy_csv, state_home):
    first = ingest(cfg(toy_csv), state_home)
    again = ingest(cfg(toy_csv), state_home)
    assert not first.reused and again.reused and again.key == first.key
    other_seed = ingest(cfg(toy_csv, split_seed=1), state_home)
    assert other_seed.key != first.key and other_seed.content_hash == first.content_hash
    df = pd.read_csv(toy_csv)
    df.loc[0, "x2"] = 99.0
    df.to_csv(toy_csv, index=False)
    changed = ingest(cfg(toy_csv), state_home)
    assert changed.content_hash != first.content_hash and not changed.reused


def test_file_uri_and_multiclass_string_labels(tmp_path, state_home):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=90), "label": ["cat", "dog", "emu"] * 30})
    path = write(tmp_path, df)
    prepared = load_prepared(ingest(cfg(path.as_uri()), state_home).path)
    assert prepared.schema["label_names"] == ["cat", "dog", "emu"]
    assert prepared.schema["output_size"] == 3 and not prepared.schema["binary"]
    assert prepared.tensors["y_train"].dtype == torch.int64


def test_regression_inferred_and_target_standardised(tmp_path, state_home):
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    df = pd.DataFrame({"x": x, "price": 3.0 * x + 10.5 + rng.normal(scale=0.1, size=200)})
    prepared = load_prepared(ingest(cfg(write(tmp_path, df), target="price"), state_home).path)
    s = prepared.schema
    assert s["task"] == "regression" and s["output_size"] == 1
    assert abs(s["target"]["mean"] - 10.5) < 0.5
    assert abs(float(prepared.tensors["y_train"].mean())) < 1e-4


def test_integer_target_with_few_values_is_classification(tmp_path, state_home):
    df = pd.DataFrame({"x": np.arange(60.0), "grade": [1, 2, 3] * 20})
    s = load_prepared(ingest(cfg(write(tmp_path, df), target="grade"), state_home).path).schema
    assert s["task"] == "classification" and s["label_names"] == ["1", "2", "3"]
    forced = load_prepared(ingest(cfg(write(tmp_path, df), target="grade", task="regression"), state_home).path).schema
    assert forced["task"] == "regression"


def test_missing_policy_drop(tmp_path, state_home):
    df = separable_frame()
    s = load_prepared(ingest(cfg(write(tmp_path, df), missing="drop"), state_home).path).schema
    assert s["rows_dropped"] == 2 and sum(s["split_sizes"].values()) == 398


def test_unseen_category_outside_train_is_all_zeros(tmp_path, state_home):
    df = separable_frame(n=300)
    codes = df["label"].map({"no": 0, "yes": 1}).to_numpy()
    _train, _val, test = split_indices(len(df), 0.1, 0.2, 0, stratify=codes)  # the ingest's own split
    df.loc[int(test[0]), "colour"] = "violet"  # a value only a test row has
    prepared = load_prepared(ingest(cfg(write(tmp_path, df)), state_home).path)
    colour = prepared.schema["features"][2]
    assert "violet" not in colour["vocabulary"] and colour["unseen_outside_train"] == 1
    width = len(colour["vocabulary"])  # columns: x1, x2, then colour's one-hot block, then id
    x_all = torch.cat([prepared.tensors[f"x_{s}"] for s in ("val", "test")])
    assert int((x_all[:, 2 : 2 + width].sum(1) == 0).sum()) == 1
    assert torch.all(prepared.tensors["x_test"][0, 2 : 2 + width] == 0)  # the violet row, first of the test split


# ---- bad input: each message names the file, the column and the row --------------------------


def expect(tmp_path, state_home, data_cfg, *fragments):
    with pytest.raises(DataError) as err:
        ingest(data_cfg, state_home)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    assert not (state_home / "datasets").exists() or not any((state_home / "datasets").iterdir())


def test_missing_file(tmp_path, state_home):
    expect(tmp_path, state_home, cfg(tmp_path / "nope.csv"), "CSV file not found", "nope.csv")


def test_empty_file(tmp_path, state_home):
    path = tmp_path / "empty.csv"
    path.write_text("")
    expect(tmp_path, state_home, cfg(path), "empty.csv", "is empty")


def test_header_only(tmp_path, state_home):
    path = tmp_path / "header.csv"
    path.write_text("a,b,label\n")
    expect(tmp_path, state_home, cfg(path), "header.csv", "header but no data rows", "a, b, label")


def test_target_missing_names_columns(tmp_path, toy_csv, state_home):
    expect(tmp_path, state_home, cfg(toy_csv, target="y"), "target column 'y' not found", "x1, x2, colour, id, label")


def test_non_numeric_value_in_numeric_column(tmp_path, state_home):
    df = separable_frame().astype({"x2": object})
    df.loc[12, "x2"] = "abc"
    expect(
        tmp_path, state_home, cfg(write(tmp_path, df)), "column 'x2'", "row 13 (line 14)", "'abc'", "expected a number"
    )


def test_missing_value_under_error_policy(tmp_path, state_home):
    expect(
        tmp_path,
        state_home,
        cfg(write(tmp_path, separable_frame()), missing="error"),
        "column 'x1'",
        "row 6 (line 7)",
        "data.missing is 'error'",
    )


def test_one_class(tmp_path, state_home):
    df = pd.DataFrame({"a": np.arange(50.0), "label": ["only"] * 50})
    expect(tmp_path, state_home, cfg(write(tmp_path, df)), "only one class ('only')", "at least 2")


def test_too_few_rows(tmp_path, state_home):
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "label": ["a", "b", "a", "b"]})
    expect(tmp_path, state_home, cfg(write(tmp_path, df)), "4 usable rows", "needs at least")


def test_unknown_feature_and_all_missing_column(tmp_path, state_home):
    df = separable_frame()
    path = write(tmp_path, df)
    expect(tmp_path, state_home, cfg(path, features=["x1", "nope"]), "data.features", "['nope']")
    df["empty"] = np.nan
    expect(tmp_path, state_home, cfg(write(tmp_path, df, "e.csv")), "column 'empty' has no values")


def test_ragged_rows(tmp_path, state_home):
    path = tmp_path / "ragged.csv"
    path.write_text("a,b,label\n1,2,x\n3,4,y,5\n")
    expect(tmp_path, state_home, cfg(path), "ragged.csv", "could not be parsed")


def test_schema_json_is_readable(tmp_path, toy_csv, state_home):
    ref = ingest(cfg(toy_csv), state_home)
    schema = json.loads((state_home / "datasets" / ref.key / "schema.json").read_text())
    assert schema["key"] == ref.key and schema["content_hash"] == ref.content_hash


# ---- the reader: pyarrow with pandas' options, in pieces for a large file -------------------------


def mixed_frame(n: int = 3000, seed: int = 1) -> pd.DataFrame:
    """Every kind of column the ingest handles, with missing values in most of them."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "flag": rng.integers(0, 2, n),
            "small": rng.integers(-3, 40, n),
            "wide": rng.integers(-(10**9), 10**9, n),
            "f": rng.normal(size=n) * 50,
            "gaps": pd.array(rng.integers(0, 500, n), dtype="Int64"),
            "colour": rng.choice(["red", "green", "blue", "teal"], n),
            "code": rng.integers(100, 105, n),
            "label": rng.choice(["a", "b", "c"], n),
        }
    )
    df.loc[rng.random(n) < 0.05, "f"] = np.nan
    df.loc[rng.random(n) < 0.05, "gaps"] = pd.NA
    df.loc[rng.random(n) < 0.03, "colour"] = None
    df.loc[[17, 2500], "label"] = None
    return df


def expected_tensors(path, categorical=("code",), seed=0):
    """What the ingest must produce, computed independently: pandas' own read, then numpy in float64."""
    df = pd.read_csv(path, engine="pyarrow")
    df = df[df["label"].notna()].reset_index(drop=True)  # missing labels are dropped, missing features imputed
    names = sorted(df["label"].unique())
    codes = df["label"].map({v: i for i, v in enumerate(names)}).to_numpy(dtype=np.int64)
    splits = dict(zip(("train", "val", "test"), split_indices(len(df), 0.1, 0.2, seed, stratify=codes), strict=True))
    train = splits["train"]
    blocks, stats = [], {}
    for name in [c for c in df.columns if c != "label"]:
        col = df[name]
        if name in categorical or not pd.api.types.is_numeric_dtype(col):
            values = col.astype("string").fillna("<missing>").to_numpy(dtype=object)
            vocab = sorted(set(values[train].tolist()))
            blocks.append(np.stack([values == v for v in vocab], axis=1).astype(np.float32))
            continue
        values = col.to_numpy(dtype="float64", na_value=np.nan)
        median = float(np.nanmedian(values[train]))
        values = np.where(np.isnan(values), median, values)
        mean, std = float(values[train].mean()), float(values[train].std())
        stats[name] = {"median": median, "mean": mean, "std": std}
        blocks.append(((values - mean) / std).astype(np.float32)[:, None])
    x = np.concatenate(blocks, axis=1)
    return {s: (x[idx], codes[idx]) for s, idx in splits.items()}, stats


@pytest.mark.parametrize("piece_bytes", [None, 4096], ids=["one-read", "in-pieces"])
def test_tensors_equal_an_independent_pandas_computation(tmp_path, monkeypatch, piece_bytes):
    path = write(tmp_path, mixed_frame())
    if piece_bytes:  # a file larger than a piece is read in pieces; here it must not fall back to one read
        monkeypatch.setattr(csv_read, "PIECE_BYTES", piece_bytes)
        monkeypatch.setattr(csv_read, "_read_whole", lambda path: pytest.fail("read whole"))
    prepared = ingest_csv.build_csv(cfg(path, categorical=["code"]), path, "hash")
    expected, stats = expected_tensors(path)
    for split, (x, y) in expected.items():
        assert prepared.tensors[f"x_{split}"].dtype == torch.float32
        assert torch.equal(prepared.tensors[f"x_{split}"], torch.from_numpy(x)), split
        assert torch.equal(prepared.tensors[f"y_{split}"], torch.from_numpy(y)), split
    numeric = {f["name"]: f for f in prepared.schema["features"] if f["kind"] == "numeric"}
    assert list(numeric) == list(stats)
    for name, values in stats.items():  # the same float64 numbers, not merely close ones
        assert {k: numeric[name][k] for k in values} == values, name
    assert prepared.schema["rows_dropped"] == 2 and prepared.schema["label_names"] == ["a", "b", "c"]


def rows_text(n: int, x=lambda i: i % 5, label=lambda i: "ab"[i % 2]) -> str:
    return "x,y,label\n" + "".join(f"{x(i)},{i % 7},{label(i)}\n" for i in range(n))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(rows_text(400), id="ints"),
        pytest.param(rows_text(400, x=lambda i: 2.5 if i == 380 else i % 5), id="late-float"),
        pytest.param(rows_text(400, x=lambda i: i % 2 if i < 300 else i * 331), id="flag-then-wider-ints"),
        pytest.param(rows_text(400, x=lambda i: "" if 200 <= i < 260 else i % 5), id="piece-without-values"),
        pytest.param(rows_text(400, x=lambda i: i + 0.5 if i < 100 else i), id="floats-then-ints"),
        pytest.param(
            rows_text(400, x=lambda i: i % 2 if i < 300 else ("True" if i % 2 else "False")), id="0-1-then-booleans"
        ),
        pytest.param(rows_text(400, label=lambda i: "a" if i < 300 else "b"), id="late-label"),
        pytest.param(rows_text(400, x=lambda i: '"3"' if i == 350 else i % 5), id="quoted-value"),
        pytest.param(rows_text(400).replace("\n", "\r\n"), id="crlf"),
        pytest.param(rows_text(400).rstrip("\n"), id="no-final-newline"),
        pytest.param(rows_text(400).replace("5,5,b\n", "5,5,b\n\n\n"), id="blank-lines"),
        pytest.param("\ufeff" + rows_text(400), id="byte-order-mark"),
    ],
)
def test_a_file_read_in_pieces_gives_what_one_read_gives(tmp_path, monkeypatch, text):
    """Each piece is parsed on its own; where that could differ from one read of the file, it is read whole."""
    path = tmp_path / "data.csv"
    path.write_text(text, encoding="utf-8", newline="")
    whole = ingest_csv.build_csv(cfg(path), path, "hash")
    monkeypatch.setattr(csv_read, "PIECE_BYTES", 300)
    pieces = ingest_csv.build_csv(cfg(path), path, "hash")
    assert json.dumps(pieces.schema, sort_keys=True) == json.dumps(whole.schema, sort_keys=True)
    assert list(pieces.tensors) == list(whole.tensors)
    for name, tensor in whole.tensors.items():
        assert tensor.dtype == pieces.tensors[name].dtype and torch.equal(tensor, pieces.tensors[name]), name


def test_compressed_csv_is_read_like_pandas_reads_it(tmp_path, state_home):
    plain = write(tmp_path, separable_frame())
    packed = tmp_path / "data.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    a = ingest_csv.build_csv(cfg(plain), plain, "hash")
    b = ingest_csv.build_csv(cfg(packed), packed, "hash")
    for name, tensor in a.tensors.items():
        assert torch.equal(tensor, b.tensors[name]), name


def test_missing_value_strings_are_pandas_defaults():
    from pandas._libs.parsers import STR_NA_VALUES

    assert sorted(csv_read.NA_VALUES) == sorted(STR_NA_VALUES)


def test_median_and_mean_equal_numpys():
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 2, 1001).astype(np.int8),
        rng.integers(0, 2, 1000).astype(np.int8),
        rng.integers(-3, 1, 999).astype(np.int8),
        rng.integers(-2000, 7000, 1000).astype(np.int16),
        rng.integers(10**6, 10**6 + 5, 10).astype(np.int32),
        rng.integers(-(2**62), 2**62, 1000),  # too wide to count, and sums not exact in float64
        rng.integers(2**53, 2**53 + 10, 1000),
        np.array([7], dtype=np.int8),
        rng.normal(size=1001) * 1e3,
    ]
    for values in arrays:
        as_float = values.astype(np.float64)
        assert csv_standardise._median_and_mean(values) == (float(np.median(as_float)), float(as_float.mean())), (
            values.dtype
        )


def test_split_indices_are_unchanged():
    """The rows each split gets for a seed (pinned: a change would silently re-split every dataset)."""
    labels = np.array([0, 1, 2, 0, 1, 0, 0, 2, 1, 0, 0, 1, 2, 0, 1, 0, 2, 0, 1, 0])
    stratified = split_indices(20, 0.2, 0.25, 7, stratify=labels)
    assert [s.tolist() for s in stratified] == [
        [1, 4, 5, 6, 7, 9, 10, 12, 13, 14, 19],
        [0, 11, 16, 17],
        [2, 3, 8, 15, 18],
    ]
    plain = split_indices(20, 0.2, 0.25, 7)
    assert [s.tolist() for s in plain] == [[0, 2, 4, 5, 6, 7, 9, 11, 17, 18, 19], [3, 8, 12, 13], [1, 10, 14, 15, 16]]
    assert all(s.dtype == np.int64 for s in (*stratified, *plain))


def mixed_labels(n: int = 60) -> pd.DataFrame:
    """Class labels that are mostly numbers, with one word among them."""
    labels = [str(i % 3) for i in range(n)]
    labels[5] = "other"
    return pd.DataFrame({"x": np.random.default_rng(0).normal(size=n), "label": labels})


@pytest.mark.parametrize("setting", [{"task": "classification"}, {"categorical": ["label"]}])
def test_class_labels_mixing_numbers_and_words_are_text_when_the_config_says_classes(tmp_path, state_home, setting):
    prepared = load_prepared(ingest(cfg(write(tmp_path, mixed_labels()), **setting), state_home).path)
    assert prepared.schema["task"] == "classification"
    assert prepared.schema["label_names"] == ["0", "1", "2", "other"]


def test_a_word_among_numeric_targets_is_an_error_otherwise(tmp_path, state_home):
    expect(
        tmp_path,
        state_home,
        cfg(write(tmp_path, mixed_labels())),
        "column 'label' holds numbers but row 6 (line 7) has 'other'",
        "data.categorical",
    )


def test_a_float_target_listed_as_categorical_is_classes(tmp_path, state_home):
    df = pd.DataFrame({"x": np.arange(40.0), "label": [0.5, 1.5] * 20})
    prepared = load_prepared(ingest(cfg(write(tmp_path, df), categorical=["label"]), state_home).path)
    assert prepared.schema["task"] == "classification" and prepared.schema["label_names"] == ["0.5", "1.5"]


def test_regression_on_booleans_or_on_a_categorical_target_is_refused(tmp_path, state_home):
    df = pd.DataFrame({"x": np.arange(40.0), "label": [True, False] * 20})
    expect(
        tmp_path,
        state_home,
        cfg(write(tmp_path, df), task="regression"),
        "target 'label' holds booleans",
        "regression needs numbers",
    )
    df = pd.DataFrame({"x": np.arange(40.0), "label": np.arange(40.0)})
    expect(
        tmp_path,
        state_home,
        cfg(write(tmp_path, df, "cat.csv"), task="regression", categorical=["label"]),
        "listed in data.categorical but data.task is regression",
    )


def test_quoted_newlines_in_a_file_larger_than_a_parser_block(tmp_path, state_home):
    """Values spanning lines inside quotes (valid CSV) in a file of several of pyarrow's 1 MiB blocks."""
    n = 60_000
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "x": rng.normal(size=n),
            "note": [f"line one\nline two {i % 5}" for i in range(n)],
            "label": rng.integers(0, 2, n),
        }
    )
    path = write(tmp_path, df)
    assert path.stat().st_size > 2 * (1 << 20)
    prepared = load_prepared(ingest(cfg(path), state_home).path)
    note = prepared.schema["features"][1]
    assert note["name"] == "note" and note["vocabulary"] == [f"line one\nline two {k}" for k in range(5)]
    assert sum(t.shape[0] for name, t in prepared.tensors.items() if name.startswith("y_")) == n


@pytest.mark.parametrize(
    "text, fragments",
    [
        (
            b"x,x,label\n" + b"".join(b"%d,%d,%d\n" % (i, i, i % 2) for i in range(40)),
            ["duplicate column names ['x'] in the header (line 1)"],
        ),
        (
            b"x,label\n" + b"".join(b"5\n" if i == 20 else b"%d,%d\n" % (i, i % 2) for i in range(40)),
            ["line 22 has 1 fields, expected 2"],
        ),
        (
            b"x,label\n" + b"".join(b"caf\xe9,1\n" if i == 12 else b"%d,%d\n" % (i, i % 2) for i in range(40)),
            ["byte 0xe9 at byte offset", "line 14"],
        ),
    ],
    ids=["duplicate-header", "ragged-row", "not-utf8"],
)
def test_a_gzipped_csv_gets_the_checks_and_positions_of_a_plain_one(tmp_path, state_home, text, fragments):
    import bz2
    import lzma

    for suffix, compress in ((".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)):
        path = tmp_path / f"data.csv{suffix}"
        path.write_bytes(compress(text))
        expect(tmp_path, state_home, cfg(path), *fragments)
    (tmp_path / "plain.csv").write_bytes(text)  # the same messages as for the file uncompressed
    expect(tmp_path, state_home, cfg(tmp_path / "plain.csv"), *fragments)


def test_line_numbers_count_blank_lines_and_quoted_values_spanning_lines(tmp_path, state_home):
    rows = [f"{i},n,{i % 2}\n" for i in range(40)]
    rows[2] = '2,"a\nb\nc",0\n'  # one row on three lines
    rows[6] = "abc,n,0\n"  # row 7, on line 1 (header) + 2 blank + 6 rows before it, 2 of them extra lines: line 12
    path = tmp_path / "data.csv"
    path.write_text("x,note,label\n\n\n" + "".join(rows))
    expect(tmp_path, state_home, cfg(path), "column 'x' holds numbers but row 7 (line 12) has 'abc'")
