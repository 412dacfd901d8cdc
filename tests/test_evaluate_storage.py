import csv
import json

import pytest
import torch

from tasks.errors import DataError
from tasks.evaluate import (
    classification_metrics,
    confusion_figure,
    metric_key_part,
    regression_metrics,
    write_confusion_csv,
)
from tasks.storage import LocalStore, StorageError, check_key, open_store


def test_classification_metrics_on_known_predictions():
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 2, 0])
    out = classification_metrics(preds, targets, ["a", "b", "c"])
    m = out["metrics"]
    assert m["test/accuracy"] == pytest.approx(4 / 6)
    assert out["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["test/precision/b"] == pytest.approx(2 / 3) and m["test/recall/b"] == pytest.approx(1.0)
    assert m["test/recall_macro"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert out["per_class"]["c"]["support"] == 2


def test_regression_metrics():
    m = regression_metrics(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 5.0]))["metrics"]
    assert m["test/mse"] == pytest.approx(4 / 3) and m["test/mae"] == pytest.approx(2 / 3)
    assert m["test/r2"] == pytest.approx(1 - 4 / (78 / 9))  # SS_res 4, SS_tot 78/9


def test_confusion_csv_and_png(tmp_path):
    cm = [[3, 1], [0, 4]]
    write_confusion_csv(tmp_path / "cm.csv", cm, ["cat", "dog"])
    with open(tmp_path / "cm.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["true \\ predicted", "cat", "dog"], ["cat", "3", "1"], ["dog", "0", "4"]]
    fig = confusion_figure(cm, ["cat", "dog"])
    fig.savefig(tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["cat", "dog"]


def test_metric_keys_are_made_safe():
    assert metric_key_part("a/b:c") == "a_b_c" and metric_key_part("") == "_"


def test_class_names_that_make_the_same_key_stay_apart():
    import torch

    from tasks.evaluate import metric_key_parts, metric_keys

    labels = ["<=50K", ">50K"]
    assert metric_key_parts(labels) == ["_50K.0", "_50K.1"]
    assert metric_key_parts(["a", "a/b", "a:b", "a_b.1"]) == ["a", "a_b.1", "a_b.2", "a_b.1.3"]  # always unique
    preds, targets = torch.tensor([0, 0, 1, 1, 0]), torch.tensor([0, 1, 1, 1, 0])
    metrics = classification_metrics(preds, targets, labels)["metrics"]
    assert metrics["test/recall/_50K.0"] == 1.0 and metrics["test/recall/_50K.1"] == pytest.approx(2 / 3)
    keys = metric_keys({"task": "classification", "label_names": labels})
    assert len(keys) == len(set(keys)) and set(keys) == {*metrics, "test/loss"}


def test_local_store_publishes_a_whole_unit(tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights")
    store = LocalStore(tmp_path / "store")
    manifest = store.publish("exp/run1", {"model.pt": str(src), "sub/m.json": str(src)})
    assert json.loads((tmp_path / "store/exp/run1/manifest.json").read_text()) == manifest
    import hashlib

    assert manifest["model.pt"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert store.fetch("exp/run1/model.pt", tmp_path / "back.bin").read_bytes() == b"weights"
    with pytest.raises(StorageError, match="refusing to overwrite"):
        store.publish("exp/run1", {"model.pt": str(src)})
    assert not [p for p in (tmp_path / "store/exp").iterdir() if p.name.startswith(".")]


def test_failed_publish_leaves_nothing(tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"x")
    store = LocalStore(tmp_path / "store")
    with pytest.raises(FileNotFoundError):
        store.publish("exp/run2", {"a.pt": str(src), "b.pt": str(tmp_path / "missing")})
    assert not (tmp_path / "store/exp/run2").exists()
    assert list((tmp_path / "store/exp").iterdir()) == []


def test_corrupted_object_is_refused(tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights")
    store = LocalStore(tmp_path / "store")
    store.publish("e/r", {"m.pt": str(src)})
    (tmp_path / "store/e/r/m.pt").write_bytes(b"tampered")
    with pytest.raises(StorageError, match="does not match the manifest"):
        store.fetch("e/r/m.pt", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("key", ["../x", "a/../../b", "/abs", "a//b", "a/./b", ""])
def test_keys_cannot_escape_the_store(key):
    with pytest.raises(StorageError, match="not allowed"):
        check_key(key)


def test_open_store_by_uri(tmp_path):
    assert isinstance(open_store((tmp_path / "s").as_uri()), LocalStore)
    assert open_store(str(tmp_path / "s")).root == tmp_path / "s"
    with pytest.raises(DataError, match="unsupported scheme gs://"):
        open_store("gs://bucket/x")


def test_the_gpu_train_step_does_not_import_the_evaluations_torchmetrics():
    """torchmetrics (2 to 3 s of imports: torchvision, torch._dynamo, scipy.signal) is loaded where
    metrics are computed; the train-step flow a GPU worker runs never computes them."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, pipelines.remote; print(sorted(m for m in ('torchmetrics', 'scipy.signal') if m in sys.modules))"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip().splitlines()[-1] == "[]"
