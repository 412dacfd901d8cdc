"""Logging the model to MLflow: the pyfunc model and its registration, and the requirement check
MLflow runs on the pins we give it, without its scan of every installed distribution (start-up
tuning on), or with it and MLflow's public API only (TRAINYARD_STARTUP_TUNING=0)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow.utils import requirements_utils

from pipelines import startup
from tasks import tracking


@pytest.fixture
def run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.init_store(uri)
    run_id = tracking.start_run(uri, "logging", "", {})
    return uri, run_id


@pytest.fixture
def no_scan(monkeypatch):
    calls = []

    def scan():
        calls.append(1)
        raise AssertionError("every installed distribution scanned")

    monkeypatch.setattr(requirements_utils.importlib_metadata, "packages_distributions", scan)
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    return calls


def log_tiny(uri, run_id, tmp_path, reqs, name=""):
    """A pyfunc of the registered model's kind (tasks/pyfunc_model.py) around a 4-feature linear network."""
    from pipelines import model_logging

    torch.manual_seed(0)
    features = [
        {"name": f"f{i}", "kind": "numeric", "raw_type": "double", "mean": 0.0, "std": 1.0, "median": 0.0, "missing": 0}
        for i in range(4)
    ]
    schema = {
        "source": "csv",
        "task": "classification",
        "binary": False,
        "label_names": ["a", "b", "c"],
        "input_shape": [4],
        "output_size": 3,
        "features": features,
        "target": {"name": "y", "dtype": "object"},
    }
    schema_path = tmp_path / "schema.json"
    schema_path.write_text(json.dumps(schema))
    network = torch.export.export(
        torch.nn.Linear(4, 3).eval(), (torch.zeros(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    torch.export.save(network, str(tmp_path / "network.pt2"))
    example = pd.DataFrame(np.random.default_rng(0).normal(size=(2, 4)), columns=[f"f{i}" for i in range(4)])
    return model_logging.log_pyfunc_model(
        uri,
        run_id,
        python_model=model_logging.MODEL_CODE,
        artifacts={"network": tmp_path / "network.pt2", "schema": schema_path},
        code_paths=model_logging.CODE_PATHS,
        signature=model_logging.signature(schema),
        input_example=example,
        pip_requirements=reqs,
        registered_model_name=name,
        logging_context=startup.model_logging,
    )


def test_model_is_logged_and_registered_without_the_distribution_scan(run, no_scan, tmp_path):
    uri, run_id = run
    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    info = log_tiny(uri, run_id, tmp_path, reqs, name="logging-model")
    assert info["version"] == "1" and info["model_uri"].startswith("models:/")
    assert MlflowClient(uri).get_model_version("logging-model", "1").run_id == run_id
    assert no_scan == []
    assert requirements_utils._MODULES_TO_PACKAGES is None  # left unbuilt for later inference in this process


def test_a_requirement_that_is_not_installed_is_still_reported(run, no_scan, tmp_path):
    uri, run_id = run
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(requirements_utils.__name__)
    logger.addHandler(handler)
    try:
        reqs = ["no-such-package-trainyard==1.0"]
        log_tiny(uri, run_id, tmp_path, reqs)
    finally:
        logger.removeHandler(handler)
    messages = " ".join(r.getMessage() for r in records)
    assert "no-such-package-trainyard (current: uninstalled, required: no-such-package-trainyard==1.0)" in messages
    assert no_scan == []


def test_with_tuning_off_the_model_is_logged_through_the_public_api(run, monkeypatch, tmp_path):
    """TRAINYARD_STARTUP_TUNING=0: no private hook; MLflow scans as it does by itself, and its
    process-wide URIs are put back through the public setters."""
    import os

    import mlflow

    monkeypatch.setenv(startup.SWITCH, "0")
    hooks = []
    monkeypatch.setattr(startup, "_tuned_model_logging", lambda uri: hooks.append(uri))
    uri, run_id = run
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    info = log_tiny(uri, run_id, tmp_path, reqs, name="public-model")
    assert info["version"] == "1" and hooks == []
    assert MlflowClient(uri).get_model_version("public-model", "1").run_id == run_id
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before
