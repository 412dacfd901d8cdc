"""The forward pass as training and evaluation both use it: one batch's loss, a split's outputs, predictions
and the validation metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tasks.keys import VAL_ACCURACY, VAL_LOSS
from tasks.runtime import autocast_ctx


def shape_output(out: torch.Tensor, schema: dict[str, Any]) -> torch.Tensor:
    # Binary and regression heads have one output; their losses want shape [N].
    return out.squeeze(-1) if schema["output_size"] == 1 else out


def fit_loss(loss_fn: nn.Module, out: torch.Tensor, y: torch.Tensor, schema: dict[str, Any]) -> torch.Tensor:
    """The training loss of a batch's outputs, in float32. A model that imitates an ensemble returns
    [batch, members, outputs] in training (models/tabular.py): every member is fitted to the target, and
    the loss is the members' mean, so that they stay diverse rather than only their average fitting."""
    if out.dim() == 3:
        members = out.shape[1]
        out, y = out.flatten(0, 1), y.repeat_interleave(members)
    return loss_fn(shape_output(out, schema).float(), y)


def batch_loss(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: nn.Module,
    schema: dict[str, Any],
    device: torch.device,
    precision: str,
    x: torch.Tensor,
    y: torch.Tensor,
    cache: bool = True,
) -> torch.Tensor:
    """One batch's training loss: the forward pass under autocast, the loss in float32 (`cache=False`
    for a step recorded into a CUDA graph)."""
    with autocast_ctx(device, precision, cache=cache):
        out = forward(x)
    return fit_loss(loss_fn, out, y, schema)


@dataclass
class EvalOutput:
    loss: float
    outputs: torch.Tensor  # float32 on the CPU
    targets: torch.Tensor


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: nn.Module,
    schema: dict[str, Any],
    device: torch.device,
    precision: str,
    channels_last: bool = False,
) -> EvalOutput:
    """Loss, outputs and targets over a split: model.eval() and no_grad(), read once at the end."""
    model.eval()
    total = torch.zeros((), device=device)
    outs, targets = [], []
    n = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_ctx(device, precision):
            out = shape_output(model(x), schema)
        out = out.float()
        total += loss_fn(out, y) * y.shape[0]
        n += y.shape[0]
        outs.append(out)
        targets.append(y)
    return EvalOutput(
        loss=float(total.item() / max(n, 1)),
        outputs=torch.cat(outs).cpu() if outs else torch.empty(0),
        targets=torch.cat(targets).cpu() if targets else torch.empty(0),
    )


def predictions(outputs: torch.Tensor, schema: dict[str, Any]) -> torch.Tensor:
    if schema.get("binary"):
        return (outputs > 0).long()
    return outputs.argmax(dim=-1)


def val_metric(ev: EvalOutput, schema: dict[str, Any]) -> tuple[str, float]:
    """The metric that picks the best epoch: accuracy for classification, the loss for regression."""
    if schema["task"] == "classification":
        correct = (predictions(ev.outputs, schema) == ev.targets.long()).float().mean()
        return VAL_ACCURACY, float(correct)
    return VAL_LOSS, ev.loss
