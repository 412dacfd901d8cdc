"""Resume at the flow level: a run killed with SIGKILL mid-epoch and started again with the same run
name continues in the same MLflow run and ends with the weights of an uninterrupted run; a Prefect
flow retry resumes instead of starting over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.config import load_config
from tests.conftest import cli_env, crash_training_once, train_argv

pytestmark = pytest.mark.usefixtures("prefect_harness")
SETTINGS = [
    "data.target=label",
    "data.drop=[id]",
    "train.epochs=30",
    "train.batch_size=2",
    "train.keep=last",
    "train.seed=3",
    "model.dropout=0.2",
    "tracking.log_model=false",
    "train.device=cpu",
]


def final_weights(summary) -> dict[str, torch.Tensor]:
    return torch.load(Path(urlparse(summary["artifacts"]["model_state.pt"]).path), weights_only=True)


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli(toy_csv, *extra: str) -> list[str]:
    return train_argv(f"data.path={toy_csv}", *SETTINGS, *extra, json=True)


def test_sigkill_mid_epoch_then_same_run_name_resumes(toy_csv, tmp_path):
    home = tmp_path / "home"
    args, env = cli(toy_csv, "tracking.run_name=nightly-7"), cli_env(home, harness_api=True)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    killed_after = None
    while time.monotonic() < deadline and proc.poll() is None:
        for last in home.glob("runs/*/checkpoints/last.pt"):
            try:
                epoch = torch.load(last, weights_only=True)["epoch"]
            except Exception:  # replaced while we read it
                continue
            if epoch >= 3:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_after = epoch
                break
        if killed_after:
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert killed_after is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("trainyard").experiment_id])
    assert run.info.status == "RUNNING"  # killed: nobody marked it

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert summary["mlflow_run_id"] == run.info.run_id  # the same MLflow run
    done = client.get_run(run.info.run_id)
    assert done.info.status == "FINISHED"
    assert int(done.data.tags["train.resumed_from_epoch"]) >= killed_after
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")][-1] == 30

    ref_home = tmp_path / "reference"
    ref_env = cli_env(ref_home, harness_api=True)
    ref = subprocess.run(cli(toy_csv), env=ref_env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert same(final_weights(summary), final_weights(json.loads(ref.stdout)))


def test_a_prefect_flow_retry_resumes_from_the_checkpoint(toy_csv, state_home, monkeypatch, tmp_path):
    import tasks.train_rank as training
    from pipelines.flow import train_flow

    cfg = load_config("csv", overrides=[f"data.path={toy_csv}", *SETTINGS, "train.epochs=6", "train.batch_size=16"])
    real = training.train_model
    calls = crash_training_once(monkeypatch, at_epoch=2)
    summary = train_flow.with_options(retries=1, retry_delay_seconds=0)(cfg)
    assert calls[0] is None and calls[1] is not None and Path(calls[1]).name == "last.pt"
    client = MlflowClient(summary["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("trainyard").experiment_id])
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["train.resumed_from_epoch"] == "2"

    monkeypatch.setattr(training, "train_model", real)
    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "reference"))
    assert same(final_weights(summary), final_weights(train_flow(cfg)))


def test_resume_of_a_finished_or_unknown_run_is_refused(toy_csv, state_home):
    from pipelines.flow import train_flow

    cfg = load_config("csv", overrides=[f"data.path={toy_csv}", *SETTINGS, "train.epochs=1", "train.batch_size=64"])
    done = train_flow(cfg)
    with pytest.raises(ValueError, match="already finished; nothing to resume"):
        train_flow(cfg, resume=done["mlflow_run_id"])
    with pytest.raises(ValueError, match="no such MLflow run"):
        train_flow(cfg, resume="0123456789abcdef0123456789abcdef")


def test_a_run_is_continued_only_with_the_config_it_was_started_with(toy_csv, state_home):
    from pipelines.config import ConfigError
    from pipelines.flow import train_flow
    from tasks.errors import DataError

    base = [f"data.path={toy_csv}", *SETTINGS, "train.epochs=1", "train.batch_size=64", "tracking.run_name=nightly"]
    with pytest.raises(DataError, match="target column 'labl' not found"):
        train_flow(load_config("csv", overrides=[*base, "data.target=labl"]))
    client = MlflowClient(f"sqlite:///{state_home / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("trainyard").experiment_id
    (failed,) = client.search_runs([exp_id])
    assert failed.info.status == "FAILED"
    # the same run name with a corrected config: a new run, whose params are this config's
    fixed = train_flow(load_config("csv", overrides=[*base, "optim.lr=0.01"]))
    assert fixed["mlflow_run_id"] != failed.info.run_id and fixed["run_name"] == "nightly"
    params = client.get_run(fixed["mlflow_run_id"]).data.params
    assert params["data.target"] == "label" and params["optim.lr"] == "0.01"
    # --resume of the failed run under another config is refused by name
    with pytest.raises(
        ConfigError, match="that run was started with another config .*resume it with the config it was started with"
    ):
        train_flow(load_config("csv", overrides=[*base, "optim.lr=0.01"]), resume=failed.info.run_id)
