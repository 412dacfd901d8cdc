"""The registered model as its users load it: an MLflow pyfunc taking raw rows (or images), encoding them with
the training run's own fitted encoding, and answering with labels and probabilities; it loads with MLflow alone."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch

from pipelines import model_logging
from pipelines.config import load_config
from tasks import rowcodec
from tasks.ingest import ingest
from tasks.prepared import load_prepared
from tasks.tracking import fluent_uris

pytestmark = pytest.mark.usefixtures("prefect_harness")


def mixed_frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Every kind of column: numbers (a missing one), integers, text with a missing value, a code mixing numbers
    and words, yes/no text, booleans, ISO dates, timestamps, and integer grades listed as categorical."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    colour = rng.choice(["red", "green", "blue"], size=n).astype(object)
    frame = pd.DataFrame(
        {
            "x": x,
            "count": rng.integers(0, 50, size=n),
            "colour": colour,
            "doors": rng.choice(["2", "3", "4", "5more"], size=n),
            "flag": rng.choice(["yes", "no"], size=n),
            "ok": rng.choice([True, False], size=n),
            "day": pd.date_range("2021-01-01", periods=n, freq="D").strftime("%Y-%m-%d"),
            "stamp": pd.date_range("2021-01-01 08:00", periods=n, freq="7h").strftime("%Y-%m-%d %H:%M:%S"),
            "grade": rng.integers(1, 5, size=n),
            "label": np.where(x + (colour == "red") > 0.3, "high", np.where(x < -0.5, "low", "mid")),
        }
    )
    frame.loc[3, "x"] = np.nan
    frame.loc[5, "colour"] = None
    return frame


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_harness):
    """One csv-preset run on the mixed table, its model registered as champion."""
    from pipelines.flow import train_flow

    root = tmp_path_factory.mktemp("pyfunc")
    path = root / "mixed.csv"
    mixed_frame().to_csv(path, index=False)
    overrides = [
        f"data.path={path}",
        "data.target=label",
        "data.categorical=[grade]",
        "train.epochs=3",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRAINYARD_HOME", str(root / "state"))
        cfg = load_config("csv", overrides=overrides, env={})
        summary = train_flow(cfg)
    with fluent_uris(summary["tracking_uri"]):
        local = mlflow.artifacts.download_artifacts(summary["mlflow_model_uri"], dst_path=str(root / "model"))
    return {"cfg": cfg, "summary": summary, "path": path, "model_dir": Path(local), "root": root}


def test_the_codec_redoes_the_ingest_encoding_bit_for_bit(trained):
    """The rows the model encodes from the raw file are exactly the prepared dataset's rows, for every kind."""
    prepared = load_prepared(trained["summary"]["dataset"]["path"])
    x_all = torch.cat([prepared.tensors[f"x_{s}"] for s in ("train", "val", "test")]).numpy()
    codec = rowcodec.RowCodec(prepared.schema)
    kinds = {f["name"]: f["kind"] for f in prepared.schema["features"]}
    assert {"numeric", "categorical", "boolean", "date"} <= set(kinds.values()) and kinds["grade"] == "categorical"
    for engine in ("c", "pyarrow"):  # text as pandas reads it by default, and dates already parsed
        encoded, report = codec.encode(pd.read_csv(trained["path"], engine=engine))
        assert encoded.dtype == np.float32 and encoded.shape == x_all.shape
        assert sorted(map(bytes, encoded)) == sorted(map(bytes, x_all)), engine
        assert report.missing == {"x": 1, "colour": 1} and report.rows_missing == 2 and report.rows_unseen == 0


def test_the_signature_names_the_raw_columns_and_the_outputs(trained):
    model = mlflow.pyfunc.load_model(str(trained["model_dir"]))
    inputs = {c.name: c.type for c in model.metadata.get_input_schema().inputs}
    types = {name: getattr(t, "name", str(t)) for name, t in inputs.items()}
    assert list(types) == ["x", "count", "colour", "doors", "flag", "ok", "day", "stamp", "grade"]
    assert types["x"] == "double" and types["count"] == "long" and types["colour"] == "string"
    assert types["ok"] == "boolean" and types["grade"] == "long" and "any" in str(inputs["day"]).lower()
    outputs = [c.name for c in model.metadata.get_output_schema().inputs]
    assert outputs == ["prediction", "probability_high", "probability_low", "probability_mid"]
    example = json.loads((trained["model_dir"] / "input_example.json").read_text())
    raw = mixed_frame()
    assert example["columns"] == list(types) and len(example["data"]) == 5
    assert all(pd.isna(row[2]) or row[2] in set(raw["colour"]) for row in example["data"])  # raw rows, not encoded


def test_predict_takes_raw_rows_and_answers_in_the_label_classes(trained):
    model = mlflow.pyfunc.load_model(str(trained["model_dir"]))
    raw = pd.read_csv(trained["path"])
    out = model.predict(raw.drop(columns=["label"]))
    assert len(out) == len(raw) and set(out["prediction"]) <= {"high", "low", "mid"}
    probabilities = out[["probability_high", "probability_low", "probability_mid"]].to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    best = np.array(["high", "low", "mid"])[probabilities.argmax(axis=1)]
    assert (best == out["prediction"].to_numpy()).all()
    assert (out["prediction"] == raw["label"]).mean() > 0.6  # it learned something of the table
    # the same rows as JSON gives them (dates as text, a missing value as None) score the same
    records = json.loads(raw.drop(columns=["label"]).head(20).to_json(orient="records"))
    again = model.predict(pd.DataFrame(records))
    assert again["prediction"].tolist() == out["prediction"].head(20).tolist()


def test_unseen_categories_and_missing_values_encode_as_in_training(trained):
    model = mlflow.pyfunc.load_model(str(trained["model_dir"]))
    raw = pd.read_csv(trained["path"]).drop(columns=["label"]).head(4)
    raw.loc[0, "colour"] = "violet"  # not in the training vocabulary: all zeros, counted
    raw["x"] = raw["x"].astype("float64")
    raw.loc[1, "x"] = np.nan  # imputed with the training median, counted (row 3 of the file misses it too)
    out, report = model.unwrap_python_model().score(raw)
    assert len(out) == 4
    assert report["unseen"] == {"colour": 1} and report["rows_unseen"] == 1
    assert report["missing"] == {"x": 2} and report["rows_missing"] == 2


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("x", "abc", "column 'x' row 3: expected a number, got 'abc'"),
        ("flag", "maybe", "column 'flag' row 3: expected a boolean (yes/no), got 'maybe'"),
        ("day", "someday", "column 'day' row 3: expected an ISO 8601 date"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_with_its_column_and_row(trained, column, value, expected):
    codec = rowcodec.RowCodec(load_prepared(trained["summary"]["dataset"]["path"]).schema)
    raw = pd.read_csv(trained["path"]).head(5).astype({column: object})
    raw.loc[2, column] = value
    with pytest.raises(rowcodec.InputError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")) as info:
        codec.encode(raw)
    assert info.value.column == column and info.value.row == 2 and "\n" not in str(info.value)


def test_a_missing_feature_column_is_named_with_the_expected_ones(trained):
    codec = rowcodec.RowCodec(load_prepared(trained["summary"]["dataset"]["path"]).schema)
    raw = pd.read_csv(trained["path"]).drop(columns=["doors", "grade"])
    with pytest.raises(rowcodec.InputError) as info:
        codec.encode(raw)
    expected = "x, count, colour, doors, flag, ok, day, stamp, grade"
    assert str(info.value) == f"missing feature columns 'doors', 'grade'; the model expects {expected}"


BLOCK_TRAINYARD = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tasks", "pipelines", "models", "benchmarks", "tests"):
            raise ModuleNotFoundError(f"no module named {name!r} (Trainyard is not installed here)")
sys.meta_path.insert(0, Block())
for name in ("tasks", "pipelines", "models"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"{name} imported")
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
frame = pd.read_csv(sys.argv[2]).drop(columns=[sys.argv[3]])
print(json.dumps(model.predict(frame).to_dict(orient="list")))
"""


def test_the_model_scores_in_a_process_without_trainyard(trained, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_TRAINYARD, str(trained["model_dir"]), str(trained["path"]), "label"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = json.loads(proc.stdout.strip().splitlines()[-1])
    here = mlflow.pyfunc.load_model(str(trained["model_dir"])).predict(
        pd.read_csv(trained["path"]).drop(columns="label")
    )
    assert elsewhere["prediction"] == here["prediction"].tolist()
    assert np.allclose(elsewhere["probability_mid"], here["probability_mid"])


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level
    }
    return names


def test_the_requirements_are_pinned_and_cover_every_import_of_the_model_code(trained):
    requirements = (trained["model_dir"] / "requirements.txt").read_text().split()
    pinned = dict(r.split("==") for r in requirements)
    assert all(v and v[0].isdigit() for v in pinned.values()), requirements
    shipped = [trained["model_dir"] / "pyfunc_model.py", *(trained["model_dir"] / "code").glob("*.py")]
    assert {p.name for p in shipped} == {"pyfunc_model.py", "rowcodec.py"}
    third_party = set().union(*map(_imports, shipped)) - set(sys.stdlib_module_names) - {"rowcodec", "tasks"}
    assert third_party <= set(pinned), third_party - set(pinned)
    assert pinned["torch"] == torch.__version__.split("+")[0]


def test_an_integer_target_is_predicted_as_integers_and_a_regression_in_its_unit(tmp_path):
    schema = {
        "task": "classification",
        "binary": True,
        "label_names": ["0", "1"],
        "input_shape": [1],
        "features": [],
        "target": {"name": "y", "dtype": "int64"},
    }
    out = rowcodec.RowCodec(schema).decode(np.array([[-2.0], [3.0]]))
    assert out["prediction"].tolist() == [0, 1] and out["prediction"].dtype.kind == "i"
    assert np.allclose(out["probability_1"], 1 / (1 + np.exp([2.0, -3.0])))
    schema = {**schema, "task": "regression", "target": {"name": "y", "mean": 10.0, "std": 4.0}}
    assert rowcodec.RowCodec(schema).decode(np.array([[0.0], [1.5]]))["prediction"].tolist() == [10.0, 16.0]


def test_mnist_model_takes_images_as_users_have_them(tmp_path, mnist_root, state_home):
    from pipelines.flow import train_flow
    from tests.conftest import make_digits

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"data.root={mnist_root}", "data.download=false", "train.epochs=2", f"tracking.uri={uri}"]
    summary = train_flow(load_config("mnist", overrides=overrides, env={}))
    with fluent_uris(uri):
        model = mlflow.pyfunc.load_model(summary["mlflow_model_uri"])
    images, labels = make_digits(40, 2)
    out = model.predict(images)  # uint8 0-255, (N, 28, 28)
    assert list(out.columns) == ["prediction", *(f"probability_{d}" for d in range(10))]
    assert (out["prediction"].to_numpy() == labels).mean() > 0.5
    floats = model.predict((images / 255.0).astype(np.float32)[:, None])  # floats 0-1 with the channel axis
    assert floats["prediction"].tolist() == out["prediction"].tolist()
    assert model.predict(images[0])["prediction"].tolist() == out["prediction"].tolist()[:1]  # one image
    with pytest.raises(Exception, match="expected float pixel values 0-1"):
        model.predict(images.astype(np.float32))  # floats 0-255
    with pytest.raises(Exception, match=r"expected 28x28 images.*got shape \(3, 27, 27\)"):
        model.predict(np.zeros((3, 27, 27), dtype=np.uint8))
    # the prepared test split through the model gives the evaluation's accuracy
    prepared = load_prepared(summary["dataset"]["path"])
    x, y = prepared.split("test")
    scored = model.predict(x.numpy())
    accuracy = float((scored["prediction"].to_numpy() == y.numpy()).mean())
    assert accuracy == pytest.approx(summary["test_metrics"]["test/accuracy"], abs=1e-6)


def test_ingest_and_model_agree_on_a_parquet_table(tmp_path):
    """A Parquet table's dates and integers arrive typed; the codec redoes its encoding too."""
    path = tmp_path / "mixed.parquet"
    mixed_frame(200, 1).to_parquet(path, index=False)
    data_cfg = load_config("csv", overrides=[f"data.path={path}", "data.target=label"], env={}).data
    ref = ingest(data_cfg, tmp_path / "state")
    prepared = load_prepared(ref.path)
    x_all = torch.cat([prepared.tensors[f"x_{s}"] for s in ("train", "val", "test")]).numpy()
    encoded, _ = rowcodec.RowCodec(prepared.schema).encode(pd.read_parquet(path))
    assert sorted(map(bytes, encoded)) == sorted(map(bytes, x_all))
    assert model_logging.signature(prepared.schema).inputs.input_names()[0] == "x"
