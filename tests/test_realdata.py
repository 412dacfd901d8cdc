"""Real MNIST: the first 8,000 t10k images train, the last 2,000 test (skipped when the files are absent)."""

import pytest

from tests.conftest import REAL_MNIST

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(
        not (REAL_MNIST / "t10k-images-idx3-ubyte.gz").exists(), reason=f"real MNIST files not in {REAL_MNIST}"
    ),
]


def test_mnist_preset_reaches_97_percent_on_real_digits(prefect_harness, state_home):
    from mlflow.tracking import MlflowClient

    from pipelines.config import load_config
    from pipelines.flow import train_flow

    cfg = load_config(
        "mnist", overrides=[f"data.root={REAL_MNIST}", "data.split=t10k", "data.n_train=8000", "train.device=cpu"]
    )
    summary = train_flow(cfg)
    assert summary["dataset"]["content_hash"]
    sizes = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"]).data.params
    assert sizes["dataset.n_test"] == "2000"
    assert int(sizes["dataset.n_train"]) + int(sizes["dataset.n_val"]) == 8000
    assert summary["test_metrics"]["test/accuracy"] >= 0.97, summary["test_metrics"]
