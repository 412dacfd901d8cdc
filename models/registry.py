"""Build models by name from the catalogue in models/config.py. Input and output sizes come
from the dataset's schema; the model section's keys from the config.

Nothing here moves a model to a device: the train stage decides device and precision
(tasks/runtime.py `place_model`).
"""

from __future__ import annotations

import importlib
import math
from typing import Any

from torch import nn

from models.config import ACTIVATIONS, MODELS, ModelConfig
from tasks.errors import ModelError


def available() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, schema: dict[str, Any], cfg: ModelConfig) -> nn.Module:
    """`schema` supplies input_shape and output_size; `cfg` is the model config section."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; valid models: {', '.join(available())}")
    module, _, function = MODELS[name].builder.partition(":")
    builder = getattr(importlib.import_module(module), function)
    return builder(list(schema["input_shape"]), int(schema["output_size"]), cfg)


_ACTIVATION_CLASSES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
}
assert tuple(_ACTIVATION_CLASSES) == ACTIVATIONS, "models/config.py ACTIVATIONS and the classes here differ"


def activation(name: str) -> nn.Module:
    if name not in _ACTIVATION_CLASSES:
        raise ModelError(f"unknown activation {name!r}; valid: {', '.join(sorted(_ACTIVATION_CLASSES))}")
    return _ACTIVATION_CLASSES[name]()


def flat_size(shape: list[int]) -> int:
    return math.prod(shape)
