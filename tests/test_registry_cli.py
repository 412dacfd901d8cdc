"""`trainyard runs`, `champion` and `promote`: read-only on a missing store, quick on a dead server,
the champion marked per registered model."""

from __future__ import annotations

import os

import pytest
from mlflow.tracking import MlflowClient

from pipelines.cli import main
from pipelines.inspect_runs import latest_runs
from tasks import champion, tracking
from tests.services import free_port


@pytest.mark.parametrize("command", [["runs"], ["champion"], ["promote", "1"]])
def test_reading_a_state_folder_without_runs_creates_nothing(command, state_home, capsys):
    assert main(command) == 1
    assert f"no tracking database at {state_home / 'mlflow.db'}" in capsys.readouterr().err
    assert not state_home.exists()


def test_runs_limit_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["runs", "-n", "0"])
    assert exit_.value.code == 2 and "expected a whole number >= 1, got 0" in capsys.readouterr().err


def test_an_unreachable_server_fails_with_bounded_retries(monkeypatch, capsys):
    for name in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
    ):
        monkeypatch.delenv(name, raising=False)
    assert main(["runs", "--tracking-uri", f"http://127.0.0.1:{free_port()}"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("trainyard runs: ")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # MLflow's default retries for minutes


def test_runs_mark_the_champion_of_each_runs_registered_model(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.init_store(uri)
    client = MlflowClient(uri, registry_uri=uri)
    ids = {}
    for model in ("e", "other-name"):  # the experiment's default name, and a tracking.registered_model
        client.create_registered_model(model)
        run_id = tracking.start_run(uri, "e", model, {"data.key": "k"})
        version = client.create_model_version(model, source=f"runs:/{run_id}/model", run_id=run_id).version
        champion.decide(uri, model, version, run_id, "test/accuracy", True, 0.9, "k")
        ids[model] = run_id
    rows = {r["run_id"]: r["champion"] for r in latest_runs(uri, "e")}
    assert rows == {ids["e"]: True, ids["other-name"]: True}
