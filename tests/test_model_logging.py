"""Logging the model to MLflow: the pt2 model and its registration, and the requirement check
MLflow runs on the pins we give it, without its scan of every installed distribution (start-up
tuning on), or with it and MLflow's public API only (TRAINYARD_STARTUP_TUNING=0)."""

from __future__ import annotations

import logging

import numpy as np
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


def model_and_example():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3)), np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)


def test_model_is_logged_and_registered_without_the_distribution_scan(run, no_scan):
    uri, run_id = run
    model, example = model_and_example()
    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    info = tracking.log_torch_model(
        uri, run_id, model, example, reqs, registered_model_name="logging-model", logging_context=startup.model_logging
    )
    assert info["version"] == "1" and info["model_uri"].startswith("models:/")
    assert MlflowClient(uri).get_model_version("logging-model", "1").run_id == run_id
    assert no_scan == []
    assert requirements_utils._MODULES_TO_PACKAGES is None  # left unbuilt for later inference in this process


def test_a_requirement_that_is_not_installed_is_still_reported(run, no_scan):
    uri, run_id = run
    model, example = model_and_example()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(requirements_utils.__name__)
    logger.addHandler(handler)
    try:
        reqs = ["no-such-package-trainyard==1.0"]
        tracking.log_torch_model(uri, run_id, model, example, reqs, logging_context=startup.model_logging)
    finally:
        logger.removeHandler(handler)
    messages = " ".join(r.getMessage() for r in records)
    assert "no-such-package-trainyard (current: uninstalled, required: no-such-package-trainyard==1.0)" in messages
    assert no_scan == []


def test_with_tuning_off_the_model_is_logged_through_the_public_api(run, monkeypatch):
    """TRAINYARD_STARTUP_TUNING=0: no private hook; MLflow scans as it does by itself, and its
    process-wide URIs are put back through the public setters."""
    import os

    import mlflow

    monkeypatch.setenv(startup.SWITCH, "0")
    hooks = []
    monkeypatch.setattr(startup, "_tuned_model_logging", lambda uri: hooks.append(uri))
    uri, run_id = run
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    model, example = model_and_example()
    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    info = tracking.log_torch_model(
        uri, run_id, model, example, reqs, registered_model_name="public-model", logging_context=startup.model_logging
    )
    assert info["version"] == "1" and hooks == []
    assert MlflowClient(uri).get_model_version("public-model", "1").run_id == run_id
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before
