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
    "tabular": ModelSpec("models.tabular:build_tabular", (*_HEAD, "members", "embedding_dim", "frequency_scale")),
}
ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "leaky_relu", "silu", "elu")


class ModelConfig(Section):
    SECTION, CHOICE = "model", "name"

    name: Literal[tuple(MODELS)] = Field("mlp", title="Model", description="Architecture from the model registry.")
    hidden: list[int] | Literal["auto"] = Field(
        default_factory=lambda: [128, 64],
        title="Hidden sizes",
        description="Hidden layer widths (mlp, tabular; the cnn's head); auto: two layers sized from the "
        "input columns (a power of two from 2x the columns, within 128..512), the same wherever the model is built.",
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
    members: int = Field(
        8,
        ge=1,
        le=64,
        title="Ensemble members",
        description="tabular: members of the one-network ensemble (TabM-mini): own input scaling and head each, "
        "shared layers; their outputs are averaged.",
    )
    embedding_dim: int = Field(
        8,
        ge=0,
        le=64,
        title="Numeric embedding size",
        description="tabular: size of each numeric column's periodic embedding; 0: the clipped value itself.",
    )
    frequency_scale: float = Field(
        0.1,
        gt=0.0,
        le=100.0,
        title="Embedding frequency scale",
        description="tabular: spread of the periodic embeddings' initial frequencies (cycles per standard "
        "deviation of the column).",
    )

    @field_validator("hidden", "channels", "kernel_sizes")
    @classmethod
    def _positive(cls, v: list[int] | str) -> list[int] | str:
        if v != "auto" and any(n < 1 for n in v):
            raise ValueError(f"every size must be a positive integer, got {v}")
        return v

    @classmethod
    def uses(cls, choice: str) -> tuple[str, ...]:
        return MODELS[choice].uses
