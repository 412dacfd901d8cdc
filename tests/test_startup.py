"""Start-up: what the light commands import, and a whole run with start-up tuning switched off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, cli_env, train_argv

PROBE = """
import json, sys
from pipelines.cli import main
argv = json.loads(sys.argv[1])
try:
    code = main(argv)
except SystemExit as exit_:
    code = exit_.code
print(json.dumps({"code": code, "loaded": sorted(m for m in ("torch", "prefect", "mlflow") if m in sys.modules)}))
"""


def loaded_by(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Exit status of `trainyard <argv>` run through main() in a fresh interpreter, and which of
    torch, prefect and mlflow it imported."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env or dict(os.environ),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["code"], out["loaded"]


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["config", "--preset", "mnist"]])
def test_help_and_config_import_neither_torch_nor_prefect(argv):
    code, loaded = loaded_by(argv)
    assert code == 0 and loaded == []


def test_runs_imports_mlflow_but_not_torch(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    subprocess.run(
        [sys.executable, "-c", f"from tasks.tracking import init_store; init_store({uri!r})"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    code, loaded = loaded_by(["runs", "--tracking-uri", uri, "--experiment", "none-yet"])
    assert code == 1  # no such experiment: the table's lookup ran
    assert "mlflow" in loaded and "torch" not in loaded


def test_a_run_with_start_up_tuning_off(toy_csv, tmp_path):
    """TRAINYARD_STARTUP_TUNING=0: the embedded server is started and waited for first, MLflow is used
    through its public API only; the run is the same (tracked, stored, model registered)."""
    home = tmp_path / "home"
    env = cli_env(home, PREFECT_HOME=str(tmp_path / "prefect-home"), TRAINYARD_STARTUP_TUNING="0")
    cmd = train_argv(f"data.path={toy_csv}", "data.target=label", "train.epochs=1", json=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    client = MlflowClient(summary["tracking_uri"], registry_uri=summary["tracking_uri"])
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    assert summary["champion"]["promoted"] and summary["mlflow_model_uri"].startswith("models:/")
    assert client.get_model_version_by_alias("trainyard", "champion").run_id == summary["mlflow_run_id"]
