"""A network for tables, after TabM (Gorishniy et al., ICLR 2025) and RealMLP (Holzmueller et al., 2024).

Three ideas those papers found to close most of the gap to boosted trees with default settings:
- numeric columns are clipped smoothly (x / sqrt(1 + (x/3)^2): an outlier cannot dominate a unit) and
  given periodic embeddings (cos and sin of learned frequencies, then a per-column linear map and a
  ReLU: the PLR embedding), so one column can bend the prediction where a plain MLP needs many units;
  the clipped value itself goes in beside its embedding (a linear effect stays easy to learn), and
  one-hot columns pass as they are;
- one MLP imitates an ensemble of `members` (TabM-mini): each member scales the input by its own
  vector (random signs at the start) and has its own output head, the layers between are shared;
  in training every member is fitted to the target (the model returns [batch, members, outputs] and
  the loss averages over the members, tasks/forward.py), in evaluation their outputs are averaged;
- dropout and the budget of epochs with the best epoch kept come from the config and the train loop.

The inputs arrive standardised and one-hot (tasks/csv_encode.py); schema["features"] says which tensor
columns are numeric. Pure torch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from models.config import ModelConfig
from models.registry import activation, flat_size

FREQUENCIES = 16  # per numeric column; the papers' defaults are 8 to 48


def numeric_columns(schema: dict[str, Any] | None, width: int) -> list[int]:
    """The tensor columns of the numeric features (every column when the schema does not say)."""
    if not schema or not schema.get("features"):
        return list(range(width))
    columns, col = [], 0
    for feature in schema["features"]:
        if feature["kind"] == "categorical":  # one-hot columns pass through
            col += len(feature["vocabulary"])
            continue
        # a number or a boolean is one standardised column, a date one per part (year, month, ...)
        n = len(feature["parts"]) if feature["kind"] == "date" else 1
        columns.extend(range(col, col + n))
        col += n
    return columns


def smooth_clip(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(1 + (x / 3) ** 2)


class PeriodicEmbedding(nn.Module):
    """Each of `n` columns -> ReLU(linear([cos(2 pi f x), sin(2 pi f x)])) of size `dim` (PLR)."""

    def __init__(self, n: int, dim: int, scale: float):
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(n, FREQUENCIES) * scale)
        bound = 1 / math.sqrt(2 * FREQUENCIES)
        self.weight = nn.Parameter(torch.empty(n, 2 * FREQUENCIES, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = 2 * math.pi * x.unsqueeze(-1) * self.frequencies  # [batch, n, FREQUENCIES]
        periodic = torch.cat([torch.cos(v), torch.sin(v)], dim=-1)
        return torch.relu(torch.einsum("bnf,nfd->bnd", periodic, self.weight) + self.bias).flatten(1)


class TabularNet(nn.Module):
    def __init__(self, width: int, numeric: list[int], output_size: int, cfg: ModelConfig):
        super().__init__()
        other = sorted(set(range(width)) - set(numeric))
        self.register_buffer("numeric", torch.tensor(numeric, dtype=torch.long), persistent=False)
        self.register_buffer("other", torch.tensor(other, dtype=torch.long), persistent=False)
        dim = cfg.embedding_dim
        self.embed = PeriodicEmbedding(len(numeric), dim, cfg.frequency_scale) if dim and numeric else None
        in_features = len(numeric) * (1 + (dim if self.embed is not None else 0)) + len(other)
        k = cfg.members
        # the members' input scalings, random signs as TabM initialises them
        self.scale = nn.Parameter(torch.randint(0, 2, (k, in_features)).float() * 2 - 1)
        layers: list[nn.Module] = []
        for size in cfg.hidden:
            layers += [nn.Linear(in_features, size), activation(cfg.activation)]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            in_features = size
        self.body = nn.Sequential(*layers)
        bound = 1 / math.sqrt(in_features)
        self.head_weight = nn.Parameter(torch.empty(k, in_features, output_size).uniform_(-bound, bound))
        self.head_bias = nn.Parameter(torch.empty(k, output_size).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        num = smooth_clip(x.index_select(1, self.numeric))
        parts = [num, *([self.embed(num)] if self.embed is not None else []), x.index_select(1, self.other)]
        h = self.body(torch.cat(parts, dim=1).unsqueeze(1) * self.scale)  # [batch, members, width]
        out = torch.einsum("bkw,kwo->bko", h, self.head_weight) + self.head_bias
        return out if self.training else out.mean(dim=1)


def build_tabular(input_shape: list[int], output_size: int, cfg: ModelConfig, schema: dict | None = None) -> nn.Module:
    width = flat_size(input_shape)
    return TabularNet(width, numeric_columns(schema, width), output_size, cfg)
