"""`trainyard train` as a user runs it: an error a user can act on ends in one line, Ctrl-C ends the
run as KILLED with one line and the shell's status 130, and no traceback reaches the console."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, cli_env, train_argv

pytestmark = pytest.mark.usefixtures("prefect_harness")


def only_run(home: Path):
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("trainyard").experiment_id])
    return run


def test_a_cnn_on_a_table_is_one_line_without_a_traceback(tmp_path):
    path = tmp_path / "table.csv"
    rng = np.random.default_rng(0)
    pd.DataFrame({"a": rng.normal(size=60), "b": rng.normal(size=60), "y": ["p", "q"] * 30}).to_csv(path, index=False)
    home = tmp_path / "home"
    cmd = train_argv(f"data.path={path}", "data.target=y", "model.name=cnn", "train.epochs=1")
    env = cli_env(home, harness_api=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("trainyard: training failed: ModelError: model 'cnn' needs image inputs"), last
    assert "(use 'mlp' or 'linear' for tables)" in last
    assert only_run(home).info.status == "FAILED"


def test_ctrl_c_ends_the_run_killed_with_one_line(tmp_path):
    path = tmp_path / "long.csv"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 2))
    pd.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "y": np.where(x[:, 0] > x[:, 1], "p", "q")}).to_csv(path, index=False)
    home = tmp_path / "home"
    cmd = train_argv(
        f"data.path={path}",
        "data.target=y",
        "train.epochs=500",
        "train.batch_size=8",
        "tracking.log_model=false",
        "train.device=cpu",
    )
    env = cli_env(home, harness_api=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not list(home.glob("runs/*/checkpoints/last.pt")):
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground process
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == "trainyard: training stopped by Ctrl-C (SIGINT)"
    run = only_run(home)
    assert run.info.status == "KILLED" and "train/loss" in run.data.metrics  # stopped while training
