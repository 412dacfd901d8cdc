"""A linear model (logistic / softmax / linear regression, by the loss the task picks)."""

from torch import nn

from models.config import ModelConfig
from models.registry import flat_size


def build_linear(input_shape: list[int], output_size: int, cfg: ModelConfig) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(flat_size(input_shape), output_size))
