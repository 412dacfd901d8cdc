"""The champion rule: which metric, which direction, and which runs are comparable at all."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tasks import champion, tracking


@pytest.mark.parametrize(
    "task, configured, expected",
    [
        ("classification", "auto", ("test/accuracy", True)),
        ("regression", "auto", ("test/mse", False)),
        ("regression", "test/r2", ("test/r2", True)),
        ("classification", "test/f1_macro", ("test/f1_macro", True)),
        ("classification", "test/recall/yes", ("test/recall/yes", True)),  # per class: the class name is no metric
        ("classification", "test/f1/mse", ("test/f1/mse", True)),
        ("regression", "test/mae", ("test/mae", False)),
    ],
)
def test_metric_and_direction(task, configured, expected):
    assert champion.champion_metric(task, configured) == expected


@pytest.fixture
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.init_store(uri)
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("m")

    def version(data_key: str, value: float, metric: str = "test/accuracy"):
        run_id = tracking.start_run(uri, "e", "", {"data.key": data_key})
        client.log_metric(run_id, metric, value)
        v = client.create_model_version("m", source=f"runs:/{run_id}/model", run_id=run_id).version
        higher = champion.champion_metric("classification", metric)[1]
        return champion.decide(uri, "m", v, run_id, metric, higher, value, data_key)

    return version


def test_only_runs_on_the_same_prepared_dataset_are_compared(registry):
    first = registry("key-target-label", 0.70)
    assert first.promoted and first.reason == "no champion yet"
    # a better score predicting another column (another dataset key): not comparable, stays challenger
    other = registry("key-target-easy", 0.96)
    assert not other.promoted and "measured on another dataset" in other.reason and "target" in other.reason
    assert registry("key-target-label", 0.65).promoted is False
    better = registry("key-target-label", 0.80)
    assert better.promoted and better.champion_version == first.version


def test_a_per_class_metric_promotes_the_higher_value(registry):
    assert registry("k", 0.75, "test/recall/yes").promoted
    worse = registry("k", 0.65, "test/recall/yes")
    assert not worse.promoted and "does not beat" in worse.reason
    assert registry("k", 0.85, "test/recall/yes").promoted
