"""Whole-flow runs under a temporary Prefect API: what lands in MLflow, TensorBoard and the artifact store."""

import hashlib
import json
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipelines.cli import main
from pipelines.config import load_config
from tasks.errors import DataError, TrainingError
from tests.conftest import train_argv

pytestmark = pytest.mark.usefixtures("prefect_harness")


def csv_config(path, *extra):
    return load_config(
        "csv", overrides=[f"data.path={path}", "data.target=label", "data.drop=[id]", "train.epochs=10", *extra]
    )


def tb_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_csv_flow_lands_everywhere(toy_csv, state_home, tmp_path, monkeypatch):
    from pipelines.flow import train_flow

    cfg = csv_config(toy_csv)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # started from another folder than the state folder
    summary = train_flow(cfg)
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert summary["tracking_uri"] == f"sqlite:///{state_home / 'mlflow.db'}"
    # params: the flattened config, plus what ingest inferred
    params = run.data.params
    assert params["data.target"] == "label" and params["model.name"] == "mlp" and params["train.epochs"] == "10"
    assert params["dataset.task"] == "classification"
    # per-epoch metrics and the test metrics
    for key in ("train/loss", "val/loss", "val/accuracy", "lr"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == list(range(1, 11)), key
    assert run.data.metrics["test/accuracy"] == pytest.approx(summary["test_metrics"]["test/accuracy"])
    from tasks.evaluate import metric_keys  # what the config's champion_metric is checked against before training

    assert sorted(summary["test_metrics"]) == sorted(
        metric_keys(json.loads(Path(summary["dataset"]["path"], "schema.json").read_text()))
    )
    assert summary["test_metrics"]["test/accuracy"] > 0.9
    # tags: where the run came from
    tags = run.data.tags
    assert tags["data.hash"] == summary["dataset"]["content_hash"]
    assert tags["prefect.flow_run_id"]
    assert tags["version.torch"].startswith("2.")
    # how it trained: the epochs planned and run, the batch size the preset's auto chose
    assert (tags["train.epochs_planned"], tags["train.epochs_run"]) == ("10", "10")
    assert int(tags["train.batch_size_used"]) in (32, 64, 128, 256) and "train.stopped_early" not in tags
    # the training data as the run's MLflow dataset input: source, content hash, columns, rows per split
    (data_input,) = run.inputs.dataset_inputs
    data = data_input.dataset
    assert data.name == Path(toy_csv).name and data.source_type == "local"
    assert json.loads(data.source) == {"uri": str(toy_csv)}
    assert data.digest == summary["dataset"]["content_hash"][:32]
    input_tags = {t.key: t.value for t in data_input.tags}
    assert input_tags == {"mlflow.data.context": "training", "trainyard.data.sha256": tags["data.hash"]}
    columns = {c["name"]: c["type"] for c in json.loads(data.schema)["mlflow_colspec"]}
    assert columns["label"] == "string" and "id" not in columns and set(columns) > {"label"}
    data_profile = json.loads(data.profile)
    assert data_profile["splits"] == summary["dataset"]["split_sizes"]
    assert data_profile["num_rows"] == sum(data_profile["splits"].values()) + data_profile["rows_dropped"]
    # artifacts in MLflow
    assert run.info.artifact_uri == (state_home / "mlruns" / "trainyard" / run.info.run_id / "artifacts").as_uri()
    assert not any(workdir.iterdir())  # nothing of the run lands where it was started from
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "schema.json", "evaluation", "plots"} <= names
    assert "config.txt" not in names  # MLflow has the config as params and config.yaml; the text view is TensorBoard's
    evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/confusion_matrix.csv",
        "evaluation/classification_report.txt",
        "evaluation/metrics.json",
    } <= evaluation
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/confusion_matrix.png"]
    # the registered model takes the CSV's raw rows and answers in the label's own classes
    import mlflow.pyfunc

    from tasks.tracking import fluent_uris

    with fluent_uris(summary["tracking_uri"]):  # a reader points MLflow at the run's store, as a user would
        model = mlflow.pyfunc.load_model(summary["mlflow_model_uri"])
    raw = pd.read_csv(toy_csv).head(3)
    predicted = model.predict(raw.drop(columns=["label"]))
    assert list(predicted.columns) == ["prediction", "probability_no", "probability_yes"]
    assert set(predicted["prediction"]) <= {"yes", "no"} and len(predicted) == 3
    # TensorBoard: same scalars, the learning rate and the confusion matrix image
    acc = tb_events(Path(summary["tensorboard_dir"]))
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "val/loss", "val/accuracy", "lr", "test/accuracy"} <= set(scalars)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 11))
    assert "test/confusion_matrix" in acc.Tags()["images"]
    assert "config/text_summary" in acc.Tags()["tensors"]
    # the artifact store: weights, schema and metrics, each with its sha256
    assert set(summary["artifacts"]) == {"model_state.pt", "schema.json", "metrics.json"}
    for name, uri in summary["artifacts"].items():
        path = Path(urlparse(uri).path)
        assert f"/trainyard/{run.info.run_id}/" in uri
        assert hashlib.sha256(path.read_bytes()).hexdigest() == summary["artifact_sha256"][name]
    import torch

    state = torch.load(Path(urlparse(summary["artifacts"]["model_state.pt"]).path), weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


def test_mnist_flow_on_small_idx_files(tmp_path, state_home):
    from pipelines.flow import train_flow
    from tests.conftest import write_mnist

    mnist_root = write_mnist(tmp_path / "mnist", n_train=1500, n_test=200)

    cfg = load_config(
        "mnist",
        overrides=[
            f"data.root={mnist_root}",
            "train.epochs=4",
            "train.batch_size=32",
            "model.channels=[8, 16]",
            "model.hidden=[32]",
        ],
    )
    summary = train_flow(cfg)
    run = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "cnn"
    (data_input,) = run.inputs.dataset_inputs
    assert data_input.dataset.digest == summary["dataset"]["content_hash"][:32]
    images = json.loads(json.loads(data_input.dataset.schema)["mlflow_tensorspec"]["features"])
    assert images[0]["tensor-spec"]["shape"] == [-1, 1, 28, 28]
    assert summary["test_metrics"]["test/accuracy"] > 0.9  # the synthetic digits are easy
    cm = Path(state_home / "runs" / summary["mlflow_run_id"] / "eval" / "confusion_matrix.csv").read_text().splitlines()
    assert cm[0].split(",")[1:] == [str(i) for i in range(10)]
    # a second run (forced: nothing changed) reuses the prepared dataset
    again = train_flow(cfg, force=True)
    assert again["dataset"]["reused"] and again["dataset"]["key"] == summary["dataset"]["key"]


def runs_of(state_home, experiment="trainyard"):
    client = MlflowClient(f"sqlite:///{state_home / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id])


def test_bad_data_marks_the_run_failed_and_publishes_nothing(tmp_path, state_home):
    from pipelines.flow import train_flow

    path = tmp_path / "one.csv"
    pd.DataFrame({"a": np.arange(40.0), "id": np.arange(40), "label": ["x"] * 40}).to_csv(path, index=False)
    with pytest.raises(DataError, match="only one class"):
        train_flow(csv_config(path))
    (run,) = runs_of(state_home)
    assert run.info.status == "FAILED"
    assert not (state_home / "artifacts" / "trainyard" / run.info.run_id).exists()


def test_diverging_training_marks_the_run_failed(tmp_path, state_home):
    from pipelines.flow import train_flow

    path = tmp_path / "reg.csv"
    x = np.linspace(0, 1, 200)
    pd.DataFrame({"a": x, "id": 0, "label": x**2 * 1e3}).to_csv(path, index=False)
    cfg = csv_config(path, "optim.name=sgd", "optim.lr=100", "schedule.name=none", "train.epochs=30")
    with pytest.raises(TrainingError, match="loss became (nan|inf) in epoch"):
        train_flow(cfg)
    (run,) = runs_of(state_home)
    assert run.info.status == "FAILED"
    assert not (state_home / "artifacts" / "trainyard").exists()


SUMMARY_KEYS = {
    "mlflow_run_id",
    "run_name",
    "experiment",
    "tracking_uri",
    "task",
    "test_metrics",
    "best_epoch",
    "device",
    "train_seconds",
    "dataset",
    "artifacts_uri",
    "artifacts",
    "artifact_sha256",
    "mlflow_model_uri",
    "champion",
    "tensorboard_dir",
}


def test_cli_json_prints_one_object(toy_csv, capsys, state_home):
    code = main(
        train_argv(f"data.path={toy_csv}", "data.target=label", "train.epochs=2", json=True, python=False)
    )  # log_model on: registration prints notes
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out)
    assert set(summary) == SUMMARY_KEYS  # scripts read these: the same keys, no more, no fewer
    assert set(summary["dataset"]) == {"key", "content_hash", "reused", "path", "uri", "split_sizes"}
    assert set(summary["champion"]) >= {"promoted", "reason", "version", "metric"}
    assert summary["test_metrics"]["test/accuracy"] > 0.5


def test_cli_table_and_config_errors(toy_csv, capsys):
    code = main(
        train_argv(
            f"data.path={toy_csv}", "data.target=label", "train.epochs=1", "tracking.log_model=false", python=False
        )
    )
    out = capsys.readouterr().out
    assert code == 0 and "test/accuracy" in out and "MLflow run" in out
    assert main(train_argv("optim.name=adamm", python=False)) == 2
    err = capsys.readouterr().err
    assert "optim.name" in err and "'adam'" in err


def test_unchanged_run_is_skipped_unless_forced(toy_csv, state_home, monkeypatch):
    from pipelines.champion_gate import unchanged_since_champion
    from pipelines.flow import train_flow

    monkeypatch.setenv("TRAINYARD_GIT_SHA", "0123456789abcdef")  # a known, clean code version
    cfg = csv_config(toy_csv, "train.epochs=2", "tracking.log_model=true")
    first = train_flow(cfg)
    state = train_flow(cfg, return_state=True)
    assert state.name == "Skipped" and state.message.startswith("skipped: nothing changed")
    assert state.result()["skipped"] and len(runs_of(state_home)) == 1
    assert train_flow(cfg, force=True)["mlflow_run_id"] != first["mlflow_run_id"]
    # a change of code or config trains again
    uri = f"sqlite:///{state_home / 'mlflow.db'}"
    assert unchanged_since_champion(cfg, state_home, uri).startswith("data ")
    monkeypatch.setenv("TRAINYARD_GIT_SHA", "fedcba9876543210")
    assert unchanged_since_champion(cfg, state_home, uri) == ""
    monkeypatch.setenv("TRAINYARD_GIT_SHA", "0123456789abcdef")
    assert "mlflow_run_id" in train_flow(csv_config(toy_csv, "train.epochs=3"))


def test_a_run_leaves_no_mlflow_uri_behind_in_the_process(toy_csv, state_home, monkeypatch):
    """Logging the model uses MLflow's process-wide URIs; they are put back afterwards, so a later run
    in the same process (or a subprocess) does not track into this run's store."""
    import os

    import mlflow

    from pipelines.flow import train_flow

    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    train_flow(csv_config(toy_csv, "train.epochs=1", "tracking.log_model=true"))
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before


def test_a_champion_metric_the_dataset_cannot_report_fails_before_training(toy_csv, state_home):
    from pipelines.config import ConfigError
    from pipelines.flow import train_flow

    with pytest.raises(
        ConfigError,
        match=r"tracking.champion_metric 'test/recall/maybe' is not among the test metrics .*test/recall/yes",
    ):
        train_flow(csv_config(toy_csv, "tracking.champion_metric=test/recall/maybe"))
    client = MlflowClient(f"sqlite:///{state_home / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("trainyard").experiment_id])
    assert run.info.status == "FAILED" and "train/loss" not in run.data.metrics  # nothing was trained


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        ("DataError", False),
        ("ConfigError", False),
        ("ModelError", False),
        ("StorageError", True),
        ("OSError", True),
    ],
)
def test_io_failures_are_retried_and_bad_input_is_not(error, retried):
    """The retry rule of the ingest and scoring tasks: bad data, config or model fail alike every time."""
    from prefect.states import Failed

    from pipelines.flow import _not_bad_input
    from tasks import errors

    exc = getattr(errors, error, None) or OSError
    assert _not_bad_input(None, None, Failed(data=exc("boom"))) is retried
