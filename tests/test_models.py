import pytest
import torch
from torch import nn

from models import ModelError, available, build_model
from pipelines.config import ModelConfig


@pytest.mark.parametrize("name", ["linear", "mlp", "cnn"])
@pytest.mark.parametrize("shape", [[1, 28, 28], [3, 32, 32], [2, 7, 5]])
def test_models_build_from_schema_shapes(name, shape):
    sizes = {"linear": {}, "mlp": {"hidden": [32]}, "cnn": {"channels": [8, 16], "hidden": [32]}}[name]
    model = build_model(name, {"input_shape": shape, "output_size": 4}, ModelConfig(name=name, **sizes))
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 4)


def test_cnn_is_sequential_conv_relu_pool():
    model = build_model(
        "cnn", {"input_shape": [1, 28, 28], "output_size": 10}, ModelConfig(name="cnn", channels=[8, 16])
    )
    assert isinstance(model, nn.Sequential)
    kinds = [type(m).__name__ for m in model[:6]]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d"]


def test_mlp_options_are_applied():
    cfg = ModelConfig(name="mlp", hidden=[16, 8], activation="gelu", dropout=0.3)
    model = build_model("mlp", {"input_shape": [5], "output_size": 1}, cfg)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5, 16), (16, 8), (8, 1)]
    assert sum(isinstance(m, nn.GELU) for m in model) == 2
    assert all(m.p == 0.3 for m in model if isinstance(m, nn.Dropout))


def test_unknown_model_lists_valid_ones():
    with pytest.raises(ModelError, match="unknown model 'resnet'; valid models: cnn, linear, mlp, tabular"):
        build_model("resnet", {"input_shape": [3], "output_size": 2}, ModelConfig())
    assert available() == ["cnn", "linear", "mlp", "tabular"]


def test_cnn_on_a_table_is_refused():
    with pytest.raises(ModelError, match=r"needs image inputs shaped CxHxW; this dataset's inputs are shaped \[12\]"):
        build_model("cnn", {"input_shape": [12], "output_size": 2}, ModelConfig(name="cnn"))


def test_a_key_the_chosen_model_does_not_read_is_refused():
    from pipelines.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model.channels=\[8\]: not used by model.name=mlp"):
        load_config("csv", overrides=["data.path=t.csv", "data.target=y", "model.channels=[8]"])
    # a preset's keys for the cnn do not follow a change of model; those both read do
    cfg = load_config("mnist", overrides=["model.name=mlp"])
    assert cfg.model.channels == ModelConfig().channels and cfg.model.hidden == [128] and cfg.model.dropout == 0.25


def test_the_catalogue_is_the_one_list_of_models():
    from models.config import MODELS

    assert available() == sorted(MODELS)
    assert list(ModelConfig.model_json_schema()["properties"]["name"]["enum"]) == list(MODELS)
