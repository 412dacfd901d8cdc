"""A multi-layer perceptron: hidden sizes, activation and dropout from the config."""

from torch import nn

from models.config import ModelConfig
from models.registry import activation, flat_size


def mlp_layers(in_features: int, hidden: list[int], output_size: int, act: str, dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), activation(act)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, output_size))
    return layers


def build_mlp(input_shape: list[int], output_size: int, cfg: ModelConfig) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), *mlp_layers(flat_size(input_shape), list(cfg.hidden), output_size, cfg.activation, cfg.dropout)
    )
