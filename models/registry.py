"""Build models by name. Input and output sizes come from the dataset's schema.

Nothing here moves a model to a device: the train task decides device and precision.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

Builder = Callable[[list[int], int, Any], nn.Module]
_REGISTRY: dict[str, Builder] = {}


class ModelError(ValueError):
    pass


def register(name: str) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, schema: dict[str, Any], cfg: Any) -> nn.Module:
    """`schema` supplies input_shape and output_size; `cfg` is the model config section."""
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; valid models: {', '.join(available())}")
    return _REGISTRY[name](list(schema["input_shape"]), int(schema["output_size"]), cfg)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ModelError(f"unknown activation {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]()


def flat_size(shape: list[int]) -> int:
    return math.prod(shape)
