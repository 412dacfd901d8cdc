"""The model section and the catalogue of models: the one list of names the config offers and
the registry builds (models/registry.py). Torch-free, so the config loads without torch.

A new model is one module with a `build(input_shape, output_size, cfg)` function and one
entry in MODELS naming it and the keys of this section it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from tasks.sections import Section


@dataclass(frozen=True)
class ModelSpec:
    builder: str  # "module:function"
    uses: tuple[str, ...]  # the keys of the model section it reads


_HEAD = ("hidden", "activation", "dropout")
MODELS = {
    "linear": ModelSpec("models.linear:build_linear", ()),
    "mlp": ModelSpec("models.mlp:build_mlp", _HEAD),
    "cnn": ModelSpec(
        "models.cnn:build_cnn",
        (*_HEAD, "channels", "kernel_size", "batch_norm", "kernel_sizes", "padding", "pool", "conv_dropout"),
    ),
}
ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "leaky_relu", "silu", "elu")


class ModelConfig(Section):
    SECTION, CHOICE = "model", "name"

    name: Literal[tuple(MODELS)] = Field("mlp", title="Model", description="Architecture from the model registry.")
    hidden: list[int] = Field(
        default_factory=lambda: [128, 64],
        title="Hidden sizes",
        description="Hidden layer widths (mlp; the cnn's head).",
    )
    activation: Literal[ACTIVATIONS] = Field("relu", title="Activation", description="Activation between layers.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, title="Dropout", description="Dropout probability after hidden layers.")
    channels: list[int] = Field(
        default_factory=lambda: [32, 64], title="Conv channels", description="Output channels of each conv block (cnn)."
    )
    kernel_size: int = Field(3, ge=1, le=15, title="Kernel size", description="Conv kernel size (cnn).")
    batch_norm: bool = Field(False, title="Batch norm", description="BatchNorm after each conv (cnn).")
    kernel_sizes: list[int] = Field(
        default_factory=list,
        title="Kernel sizes",
        description="Kernel size of each conv block (cnn), e.g. [5, 3]; empty: kernel_size for every block.",
    )
    padding: Literal["same", "valid"] = Field(
        "same", title="Conv padding", description="same: keep the size (odd kernels); valid: no padding (cnn)."
    )
    pool: Literal["each", "last"] = Field(
        "each", title="Pooling", description="MaxPool2d after each conv block or only after the last one (cnn)."
    )
    conv_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, title="Conv dropout", description="Dropout after the conv stack, before the head (cnn)."
    )

    @field_validator("hidden", "channels", "kernel_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError(f"every size must be a positive integer, got {v}")
        return v

    @classmethod
    def uses(cls, choice: str) -> tuple[str, ...]:
        return MODELS[choice].uses
