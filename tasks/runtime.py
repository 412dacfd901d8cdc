"""Where and how a model runs: the device, the precision, autocast, seeding, and placing a model.

Training, evaluation and the benchmarks decide these the same way, once, at the top of a run.
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from models import build_model
from models.config import ModelConfig
from tasks.errors import TrainingError

log = logging.getLogger("trainyard.train")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "mps" and not _mps_available():
        raise TrainingError("train.device is 'mps' but MPS is not available; use 'auto' or 'cpu'")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name in ("bf16", "fp16") and device.type != "cuda":
        log.warning("train.precision=%s needs CUDA; training in fp32 on %s", name, device.type)
        return "fp32"
    return name


def autocast_ctx(device: torch.device, precision: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast, or nothing for fp32; `cache=False` for steps recorded into a CUDA graph."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def place_model(model_cfg: ModelConfig, schema: dict[str, Any], device: torch.device) -> tuple[nn.Module, bool]:
    """The configured model built for the dataset's schema and moved to `device`; the flag says whether
    it runs channels_last (conv nets on CUDA, where cuDNN's kernels prefer that layout), in which case
    its inputs must be given that layout too."""
    model = build_model(model_cfg.name, schema, model_cfg).to(device)
    channels_last = device.type == "cuda" and is_conv(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, channels_last
