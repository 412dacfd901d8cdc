"""`mlflow models serve` of the champion, as a user starts it: raw rows in over HTTP, labels and probabilities out."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import mlflow.pyfunc
import pandas as pd
import pytest

from pipelines.config import load_config
from tasks.tracking import fluent_uris
from tests.services import model_server

pytestmark = [pytest.mark.service, pytest.mark.usefixtures("prefect_harness")]


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + "/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, prefect_harness):
    """A champion trained on the toy table, served by a real `mlflow models serve` process."""
    from pipelines.flow import train_flow
    from tests.conftest import separable_frame

    root = tmp_path_factory.mktemp("serve")
    path = root / "toy.csv"
    separable_frame().to_csv(path, index=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    overrides = [f"data.path={path}", "data.target=label", "data.drop=[id]", "train.epochs=3", f"tracking.uri={uri}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRAINYARD_HOME", str(root / "state"))
        summary = train_flow(load_config("csv", overrides=overrides, env={}))
    with fluent_uris(uri):
        expected = mlflow.pyfunc.load_model("models:/trainyard@champion").predict(pd.read_csv(path))
    with model_server("models:/trainyard@champion", uri, root / "serve.log") as url:
        yield {"url": url, "path": path, "expected": expected, "summary": summary}


def test_dataframe_split_of_raw_rows(served):
    raw = pd.read_csv(served["path"]).drop(columns=["label", "id"]).head(25)
    payload = {"dataframe_split": json.loads(raw.to_json(orient="split", index=False))}
    status, body = post(served["url"], payload)
    assert status == 200, body
    answer = pd.DataFrame(body["predictions"])
    assert list(answer.columns) == ["prediction", "probability_no", "probability_yes"]
    assert answer["prediction"].tolist() == served["expected"]["prediction"].head(25).tolist()
    assert (
        answer["probability_yes"].round(6).tolist() == served["expected"]["probability_yes"].head(25).round(6).tolist()
    )


def test_dataframe_records_with_a_missing_value_and_an_unseen_colour(served):
    records = [
        {"x1": 1.5, "x2": -0.5, "colour": "red"},
        {"x1": None, "x2": 0.2, "colour": "violet"},  # imputed, and all zeros for the unseen colour
    ]
    status, body = post(served["url"], {"dataframe_records": records})
    assert status == 200, body
    assert [row["prediction"] for row in body["predictions"]] in (["yes", "yes"], ["yes", "no"])
    assert all(abs(row["probability_no"] + row["probability_yes"] - 1) < 1e-9 for row in body["predictions"])


def test_a_missing_column_is_answered_with_its_name(served):
    status, body = post(served["url"], {"dataframe_records": [{"x1": 1.0, "colour": "red"}]})
    assert status == 400 and "x2" in body["message"]


def test_an_mnist_model_serves_images_as_json_arrays(tmp_path, mnist_root):
    """An image model has no input schema (it takes uint8 or float images): `inputs` of 0-255 integers work."""
    from pipelines.flow import train_flow
    from tests.conftest import make_digits

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"data.root={mnist_root}", "data.download=false", "train.epochs=1", f"tracking.uri={uri}"]
    train_flow(load_config("mnist", overrides=overrides, env={}))
    images, _ = make_digits(8, 3)
    with fluent_uris(uri):
        expected = mlflow.pyfunc.load_model("models:/trainyard@champion").predict(images)
    with model_server("models:/trainyard@champion", uri, tmp_path / "serve.log") as url:
        status, body = post(url, {"inputs": images.tolist()})
        float_status, floats = post(url, {"inputs": (images / 255.0)[:, None].tolist()})  # 0-1, channel axis
    assert status == 200 and float_status == 200, (body, floats)
    answer = pd.DataFrame(body["predictions"])
    assert answer["prediction"].tolist() == expected["prediction"].tolist()
    assert [row["prediction"] for row in floats["predictions"]] == expected["prediction"].tolist()
