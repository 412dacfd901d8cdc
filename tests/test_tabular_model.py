"""The tabular model (models/tabular.py): it builds from a table's schema, treats numeric and one-hot
columns apart, trains on a tiny table through the train loop, has one output per ensemble member in
training and their mean in evaluation, reports regression in the target's unit, and its keys are
refused for the other models."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from models.registry import auto_hidden
from models.tabular import numeric_columns, smooth_clip
from pipelines.config import ConfigError, ModelConfig, OptimConfig, ScheduleConfig, TrainSection, load_config
from tasks.evaluate import evaluate_model
from tasks.prepared import Prepared
from tasks.train import train_model

CFG = ModelConfig(name="tabular", hidden=[32, 32], members=4, embedding_dim=4)
# two numeric columns around a three-value categorical one: tensor columns 0, 4 numeric, 1..3 one-hot
FEATURES = [
    {"name": "a", "kind": "numeric"},
    {"name": "c", "kind": "categorical", "vocabulary": ["x", "y", "z"]},
    {"name": "b", "kind": "numeric"},
]


def table(task: str, n: int = 240, seed: int = 0) -> Prepared:
    """A tiny table with a learnable target: a bend in numeric column a, a shift from the category."""
    g = torch.Generator().manual_seed(seed)
    num = torch.randn(n, 2, generator=g)
    cat = torch.nn.functional.one_hot(torch.randint(0, 3, (n,), generator=g), 3).float()
    x = torch.cat([num[:, :1], cat, num[:, 1:]], dim=1)
    signal = torch.sin(2 * num[:, 0]) + cat @ torch.tensor([0.0, 1.0, -1.0]) + 0.1 * torch.randn(n, generator=g)
    schema = {"task": task, "input_shape": [5], "features": FEATURES, "normalize": None, "key": f"tiny-{task}"}
    if task == "regression":
        y = signal / signal.std()
        schema.update(output_size=1, binary=False, target={"name": "t", "mean": 1000.0, "std": 10.0})
    elif task == "binary":
        y = (signal > signal.median()).float()
        schema.update(task="classification", output_size=1, binary=True, n_classes=2, label_names=["no", "yes"])
    else:
        y = torch.bucketize(signal, signal.quantile(torch.tensor([1 / 3, 2 / 3])))
        schema.update(task="classification", output_size=3, binary=False, n_classes=3, label_names=["l", "m", "h"])
    a, b = int(n * 0.7), int(n * 0.85)
    tensors = {"x_train": x[:a], "y_train": y[:a], "x_val": x[a:b], "y_val": y[a:b], "x_test": x[b:], "y_test": y[b:]}
    return Prepared(tensors, schema)


def test_numeric_columns_come_from_the_schema():
    assert numeric_columns({"features": FEATURES}, 5) == [0, 4]
    assert numeric_columns(None, 3) == [0, 1, 2]  # no schema (an image, a bare tensor): every column


def test_smooth_clip_keeps_small_values_and_bounds_outliers():
    x = torch.tensor([0.0, 0.5, -1.0, 50.0, -1e6])
    out = smooth_clip(x)
    assert torch.allclose(out[:3], x[:3], atol=0.06) and out.abs().max() <= 3 and out[3] > 2.9


@pytest.mark.parametrize("task, outputs", [("binary", 1), ("multiclass", 3), ("regression", 1)])
def test_trains_on_a_tiny_table_with_the_right_output_shape(tmp_path, task, outputs):
    prepared = table(task)
    model = build_model("tabular", prepared.schema, CFG)
    x = prepared.tensors["x_test"]
    model.train()
    assert model(x).shape == (x.shape[0], CFG.members, outputs)  # one output per member while training
    model.eval()
    assert model(x).shape == (x.shape[0], outputs)  # their mean in evaluation
    train = TrainSection(epochs=2, batch_size=32, min_steps=60, device="cpu")
    result = train_model(prepared, CFG, OptimConfig(name="adamw", lr=3e-3), ScheduleConfig(), train, tmp_path / "run")
    assert len(result.history) == 10  # 60 steps at 6 batches an epoch (168 training rows)
    losses = [h["train/loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0]
    ev = evaluate_model(prepared, CFG, result.checkpoint, tmp_path / "eval", device="cpu")
    if task == "regression":  # in the target's unit: mean 1000, std 10, and most of the variance explained
        assert ev.metrics["test/r2"] > 0.6 and ev.metrics["test/mae"] < 6
    else:
        assert ev.metrics["test/accuracy"] > (0.75 if task == "binary" else 0.6)


def test_without_embeddings_or_members_it_is_a_plain_clipped_mlp():
    cfg = ModelConfig(name="tabular", hidden=[8], members=1, embedding_dim=0)
    model = build_model("tabular", table("binary").schema, cfg)
    assert model.embed is None and model.scale.shape == (1, 5)


def test_auto_width_follows_the_columns_and_is_the_same_wherever_built():
    assert auto_hidden([5]) == [128, 128] and auto_hidden([100]) == [256, 256] and auto_hidden([900]) == [512, 512]
    schema = table("binary").schema
    a = build_model("tabular", schema, CFG.model_copy(update={"hidden": "auto"}))
    assert [m.out_features for m in a.body if isinstance(m, torch.nn.Linear)] == [128, 128]


@pytest.mark.parametrize("key", ["members=4", "embedding_dim=4", "frequency_scale=0.5"])
def test_its_keys_are_refused_for_other_models(key):
    base = ["data.path=t.csv", "data.target=y", "model.name=mlp"]
    with pytest.raises(ConfigError, match=rf"model.{key.split('=')[0]}=.*not used by model.name=mlp"):
        load_config("csv", overrides=[*base, f"model.{key}"], env={})
    cfg = load_config("csv", overrides=["data.path=t.csv", "data.target=y", "model.name=tabular", f"model.{key}"])
    name, value = key.split("=")
    assert str(cfg.model.model_dump()[name]) == value


def test_cnn_keys_are_refused_for_it():
    with pytest.raises(ConfigError, match=r"model.channels=\[8\]: not used by model.name=tabular"):
        load_config("csv", overrides=["data.path=t.csv", "data.target=y", "model.name=tabular", "model.channels=[8]"])


def test_numeric_columns_of_a_table_with_booleans_dates_and_text(tmp_path):
    """Booleans and the parts of a date are standardised numbers too; one-hot columns are not."""
    import numpy as np
    import pandas as pd

    from pipelines.config import DataConfig
    from tasks.ingest_csv import build_csv

    rng = np.random.default_rng(0)
    n = 120
    frame = pd.DataFrame(
        {
            "colour": rng.choice(["red", "blue"], n),
            "size": rng.normal(size=n),
            "member": rng.choice(["yes", "no"], n),
            "day": pd.Timestamp("2021-01-01") + pd.to_timedelta(rng.integers(0, 700, n), unit="D"),
            "label": rng.choice(["a", "b"], n),
        }
    )
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    prepared = build_csv(DataConfig(source="csv", path=str(path), target="label"), path, "hash")
    names = prepared.schema["feature_names"]
    expected = [i for i, name in enumerate(names) if not name.startswith("colour=")]
    assert [f["kind"] for f in prepared.schema["features"]] == ["categorical", "numeric", "boolean", "date"]
    assert numeric_columns(prepared.schema, len(names)) == expected and len(expected) == 2 + 4
    model = build_model("tabular", prepared.schema, CFG)
    model.eval()
    assert model(prepared.tensors["x_test"]).shape == (prepared.tensors["x_test"].shape[0], 1)
