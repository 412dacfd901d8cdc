"""Build models by name from the catalogue in models/config.py. Input and output sizes come
from the dataset's schema; the model section's keys from the config.

Nothing here moves a model to a device: the train stage decides device and precision
(tasks/runtime.py `place_model`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from typing import Any

from torch import nn

from models.config import ACTIVATIONS, MODELS, ModelConfig
from tasks.errors import ModelError

log = logging.getLogger("trainyard.train")


def available() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, schema: dict[str, Any], cfg: ModelConfig) -> nn.Module:
    """`schema` supplies input_shape and output_size; `cfg` is the model config section. A builder
    that takes a `schema` argument gets the schema too (which tensor columns are numeric)."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; valid models: {', '.join(available())}")
    module, _, function = MODELS[name].builder.partition(":")
    builder = getattr(importlib.import_module(module), function)
    if cfg.hidden == "auto":
        cfg = cfg.model_copy(update={"hidden": auto_hidden(list(schema["input_shape"]))})
        log.info("model.hidden=auto: %s for %d input columns", cfg.hidden, flat_size(schema["input_shape"]))
    extra = {"schema": schema} if "schema" in inspect.signature(builder).parameters else {}
    return builder(list(schema["input_shape"]), int(schema["output_size"]), cfg, **extra)


def auto_hidden(input_shape: list[int]) -> list[int]:
    """model.hidden=auto: two layers, the power of two at or above twice the input columns, within
    128..512. It reads the schema alone, so training, evaluation and the served model build the same net."""
    width = 2 ** math.ceil(math.log2(max(2 * flat_size(input_shape), 1)))
    return [min(512, max(128, width))] * 2


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
