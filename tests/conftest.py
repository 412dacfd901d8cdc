"""Shared fixtures: a private state folder per test, tiny CSV and IDX files written by the tests."""

from __future__ import annotations

import gzip
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
# The real MNIST t10k files: ../shared/data/mnist beside the project, or TRAINYARD_REAL_MNIST.
REAL_MNIST = Path(os.environ.get("TRAINYARD_REAL_MNIST") or REPO.parent / "shared" / "data" / "mnist")
if str(REPO) not in sys.path:  # `from tests.conftest import ...` and `benchmarks._common` under a bare `pytest` too
    sys.path.insert(0, str(REPO))


@pytest.fixture(autouse=True)
def root_logging():
    """Tests that call the CLI's main() configure logging (handlers on stderr, which pytest swaps
    per test): each test leaves the root logger as it found it."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def state_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own TRAINYARD_HOME, and no MLFLOW_TRACKING_URI from the outside."""
    home = tmp_path / "state"
    monkeypatch.setenv("TRAINYARD_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TRAINYARD_STORAGE_URI", raising=False)
    return home


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write an IDX file of unsigned bytes (the MNIST format)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic 28x28 'digits': each class lights up its own horizontal band, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row = 2 + int(label) * 2
        images[i, row : row + 2, 2 + label : 18 + label] = 230  # bands do not overlap
    return images, labels


def write_mnist(root: Path, n_train: int = 300, n_test: int = 100, gz: bool = True, raw_layout: bool = False) -> Path:
    folder = root / "MNIST" / "raw" if raw_layout else root
    suffix = ".gz" if gz else ""
    x, y = make_digits(n_train, 1)
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", x, gz)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", y, gz)
    x, y = make_digits(n_test, 2)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", x, gz)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", y, gz)
    return root


def prepared_digits(n: int, seed: int):
    """make_digits(n, seed) as a prepared MNIST-shaped dataset (uint8 N x 1 x 28 x 28, int64 labels),
    cut 70 / 15 / 15 into train, val and test."""
    import torch

    from benchmarks._common import digits_schema, split_tensors
    from tasks.prepared import Prepared

    images, labels = make_digits(n, seed)
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return Prepared(split_tensors(x, y, int(n * 0.7), int(n * 0.85)), digits_schema("digits"))


@pytest.fixture
def mnist_root(tmp_path) -> Path:
    return write_mnist(tmp_path / "mnist")


def separable_frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Two clear classes from two numbers and a colour; a little missing data."""
    rng = np.random.default_rng(seed)
    colour = rng.choice(["red", "green", "blue"], size=n)
    x1 = rng.normal(size=n)
    x2 = rng.normal(size=n)
    score = 2.0 * x1 - x2 + np.where(colour == "red", 2.0, -0.5)
    label = np.where(score > 0, "yes", "no")
    df = pd.DataFrame({"x1": x1, "x2": x2, "colour": colour, "id": np.arange(n), "label": label})
    df.loc[5, "x1"] = np.nan
    df.loc[7, "colour"] = None
    return df


@pytest.fixture
def toy_csv(tmp_path) -> Path:
    path = tmp_path / "toy.csv"
    separable_frame().to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for all flow tests."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from tests
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def train_argv(*settings: str, preset: str = "csv", json: bool = False, python: bool = True) -> list[str]:
    """`trainyard train --preset PRESET [--json]` with `--set S` for each setting: the command line of a
    child process (`python -m pipelines.cli ...`), or with python=False the argv for main()."""
    argv = ["train", "--preset", preset, *(["--json"] if json else [])]
    for item in settings:
        argv += ["--set", item]
    return [sys.executable, "-m", "pipelines.cli", *argv] if python else argv


def cli_env(home: Path, *, harness_api: bool = False, **extra: str) -> dict[str, str]:
    """The environment of a `trainyard` child process: this one's, with `home` as TRAINYARD_HOME, no
    Prefect telemetry, and `extra`. PREFECT_API_URL: with harness_api the prefect_harness fixture's API
    (no embedded server to wait for), else none (the child starts the embedded server; give it a
    PREFECT_HOME in `extra`) unless `extra` names one."""
    env = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    if harness_api:
        from prefect.settings import PREFECT_API_URL

        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    env.update(TRAINYARD_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def crash_training_once(monkeypatch, at_epoch: int, lose=None) -> list:
    """Make the flow's first training attempt fail after epoch `at_epoch` (its checkpoint written),
    as a lost worker would; `lose()` runs first (e.g. to delete that worker's files). Returns the
    `resume_from` of every attempt, in order."""
    import tasks.train_rank as training  # the train step's call of train_model (run_job), one process or several

    real, calls = training.train_model, []

    def crash_once(*args, **kwargs):
        calls.append(kwargs.get("resume_from"))
        if len(calls) == 1:
            inner = kwargs["on_epoch"]

            def on_epoch(epoch, metrics):
                inner(epoch, metrics)
                if epoch == at_epoch:
                    if lose is not None:
                        lose()
                    raise RuntimeError("worker lost")

            kwargs["on_epoch"] = on_epoch
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_model", crash_once)
    return calls
