import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.config import DataConfig
from tasks.errors import DataError
from tasks.ingest import ingest
from tasks.prepared import load_prepared
from tests.conftest import separable_frame


def cfg(path, **kw) -> DataConfig:
    return DataConfig(source="csv", path=str(path), target=kw.pop("target", "label"), **kw)


def write(tmp_path, df, name="data.csv"):
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def test_prepares_standardised_tensors_and_schema(tmp_path, toy_csv, state_home):
    ref = ingest(cfg(toy_csv, drop=["id"]), state_home)
    prepared = load_prepared(ref["path"])
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
    prepared = load_prepared(ingest(cfg(write(tmp_path, df)), state_home)["path"])
    for split in ("train", "val", "test"):
        y = prepared.tensors[f"y_{split}"]
        share = float((y == 1).float().mean())  # label 1 is 'rare' (sorted: common, rare)
        assert abs(share - 0.2) < 0.02, (split, share)


def test_cache_is_reused_and_keyed_by_content_and_config(tmp_path, toy_csv, state_home):
    first = ingest(cfg(toy_csv), state_home)
    again = ingest(cfg(toy_csv), state_home)
    assert not first["reused"] and again["reused"] and again["key"] == first["key"]
    other_seed = ingest(cfg(toy_csv, split_seed=1), state_home)
    assert other_seed["key"] != first["key"] and other_seed["content_hash"] == first["content_hash"]
    df = pd.read_csv(toy_csv)
    df.loc[0, "x2"] = 99.0
    df.to_csv(toy_csv, index=False)
    changed = ingest(cfg(toy_csv), state_home)
    assert changed["content_hash"] != first["content_hash"] and not changed["reused"]


def test_file_uri_and_multiclass_string_labels(tmp_path, state_home):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=90), "label": ["cat", "dog", "emu"] * 30})
    path = write(tmp_path, df)
    prepared = load_prepared(ingest(cfg(path.as_uri()), state_home)["path"])
    assert prepared.schema["label_names"] == ["cat", "dog", "emu"]
    assert prepared.schema["output_size"] == 3 and not prepared.schema["binary"]
    assert prepared.tensors["y_train"].dtype == torch.int64


def test_regression_inferred_and_target_standardised(tmp_path, state_home):
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    df = pd.DataFrame({"x": x, "price": 3.0 * x + 10.5 + rng.normal(scale=0.1, size=200)})
    prepared = load_prepared(ingest(cfg(write(tmp_path, df), target="price"), state_home)["path"])
    s = prepared.schema
    assert s["task"] == "regression" and s["output_size"] == 1
    assert abs(s["target"]["mean"] - 10.5) < 0.5
    assert abs(float(prepared.tensors["y_train"].mean())) < 1e-4


def test_integer_target_with_few_values_is_classification(tmp_path, state_home):
    df = pd.DataFrame({"x": np.arange(60.0), "grade": [1, 2, 3] * 20})
    s = load_prepared(ingest(cfg(write(tmp_path, df), target="grade"), state_home)["path"]).schema
    assert s["task"] == "classification" and s["label_names"] == ["1", "2", "3"]
    forced = load_prepared(ingest(cfg(write(tmp_path, df), target="grade", task="regression"), state_home)["path"]).schema
    assert forced["task"] == "regression"


def test_missing_policy_drop(tmp_path, state_home):
    df = separable_frame()
    s = load_prepared(ingest(cfg(write(tmp_path, df), missing="drop"), state_home)["path"]).schema
    assert s["rows_dropped"] == 2 and sum(s["split_sizes"].values()) == 398


def test_unseen_category_outside_train_is_all_zeros(tmp_path, state_home):
    df = separable_frame(n=300)
    df.loc[299, "colour"] = "violet"  # likely not in train; if it is, it is in the vocabulary
    prepared = load_prepared(ingest(cfg(write(tmp_path, df)), state_home)["path"])
    colour = prepared.schema["features"][2]
    if "violet" not in colour["vocabulary"]:
        assert colour["unseen_outside_train"] == 1
        width = len(colour["vocabulary"])
        x_all = torch.cat([prepared.tensors[f"x_{s}"] for s in ("val", "test")])
        assert int((x_all[:, -width:].sum(1) == 0).sum()) == 1


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
    expect(tmp_path, state_home, cfg(write(tmp_path, df)), "column 'x2'", "row 13 (line 14)", "'abc'", "expected a number")


def test_missing_value_under_error_policy(tmp_path, state_home):
    expect(tmp_path, state_home, cfg(write(tmp_path, separable_frame()), missing="error"),
           "column 'x1'", "row 6 (line 7)", "data.missing is 'error'")  # fmt: skip


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
    schema = json.loads((state_home / "datasets" / ref["key"] / "schema.json").read_text())
    assert schema["key"] == ref["key"] and schema["content_hash"] == ref["content_hash"]
