"""What training minimises and how it steps: the loss for the task, the optimizer and the LR schedule.

The choice lists are the catalogues in tasks/optim_config.py; this module turns a choice into
torch objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

from tasks.errors import TrainingError
from tasks.lr_lambda import compile_lr_lambda
from tasks.optim_config import OPTIMIZERS, SCHEDULERS, OptimConfig, ScheduleConfig

log = logging.getLogger("trainyard.train")

# Kwargs that choose the optimizer's implementation: when the config names one, it is not overridden.
_IMPLEMENTATION_KWARGS = {"fused", "foreach", "differentiable"}


class SmoothedBCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """BCEWithLogits against targets pulled towards 1/2 by `label_smoothing`, as CrossEntropyLoss's
    label_smoothing does for two classes: 1 -> 1 - s/2, 0 -> s/2."""

    def __init__(self, label_smoothing: float):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(input, target * (1 - self.label_smoothing) + 0.5 * self.label_smoothing)


def loss_for(schema: dict[str, Any], label_smoothing: float = 0.0) -> nn.Module:
    """CrossEntropy for multi-class, BCEWithLogits for binary, MSE for regression (label smoothing
    applies to both classification losses)."""
    if schema["task"] == "regression":
        return nn.MSELoss()
    if schema.get("binary"):
        return SmoothedBCEWithLogitsLoss(label_smoothing) if label_smoothing else nn.BCEWithLogitsLoss()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def build_optimizer(
    params: Iterable[nn.Parameter], optim_cfg: OptimConfig, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """The configured optimizer; on CUDA, those with a fused kernel use it unless kwargs say otherwise."""
    spec = OPTIMIZERS.get(optim_cfg.name)
    if spec is None:
        raise TrainingError(f"unknown optimizer {optim_cfg.name!r}; valid: {', '.join(sorted(OPTIMIZERS))}")
    kwargs: dict[str, Any] = {"lr": optim_cfg.lr}
    if optim_cfg.weight_decay and spec.weight_decay:
        kwargs["weight_decay"] = optim_cfg.weight_decay
    if optim_cfg.momentum and spec.momentum:
        kwargs["momentum"] = optim_cfg.momentum
    kwargs.update({k: tuple(v) if isinstance(v, list) else v for k, v in optim_cfg.kwargs.items()})
    on_cuda = device is not None and device.type == "cuda"
    if on_cuda and spec.fused and not _IMPLEMENTATION_KWARGS & set(kwargs):
        kwargs["fused"] = True
    try:
        return getattr(torch.optim, spec.cls)(params, **kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"optimizer {optim_cfg.name!r} refused its arguments {kwargs}: {exc}") from None


@dataclass
class Schedule:
    scheduler: Any
    when: str  # "epoch", "batch", "plateau" or "none"

    def step_batch(self) -> None:
        if self.when == "batch":
            self.scheduler.step()

    def step_epoch(self, val_metric: float) -> None:
        if self.when == "epoch":
            self.scheduler.step()
        elif self.when == "plateau":
            self.scheduler.step(val_metric)


@dataclass(frozen=True)
class _Run:
    """What a scheduler may need to know about the run besides its own section."""

    lr: float
    epochs: int
    steps_per_epoch: int
    maximize: bool


def _plateau(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, run: _Run) -> Schedule:
    mode = "max" if run.maximize else "min"
    sched = lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=cfg.factor, patience=cfg.patience)
    return Schedule(sched, "plateau")


def _onecycle(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, run: _Run) -> Schedule:
    total = run.epochs * run.steps_per_epoch
    if total < 4:
        raise TrainingError(
            f"schedule onecycle needs at least 4 optimizer steps, this run has {total} "
            f"({run.epochs} epochs x {run.steps_per_epoch} batches); "
            "use more epochs, a smaller batch or another schedule"
        )
    # Each phase needs two steps or OneCycleLR divides by zero; only matters for very short runs.
    pct_start = min(max(cfg.pct_start, 2 / total), 1 - 2 / total)
    # The momentum (or Adam's beta1) is cycled against the learning rate where the optimizer has
    # one and the config asks for it (PyTorch's default); Adagrad, Adadelta, ASGD, Rprop and LBFGS
    # have none, and cycle the learning rate only.
    has_momentum = "momentum" in optimizer.defaults or "betas" in optimizer.defaults
    cycle = cfg.cycle_momentum and has_momentum
    if cycle:
        log.info(
            "onecycle: momentum (beta1) cycles between %g and %g in place of the optimizer's own "
            "(schedule.cycle_momentum=false keeps it)",
            cfg.base_momentum,
            cfg.max_momentum,
        )
    sched = lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.max_lr or run.lr,
        epochs=run.epochs,
        steps_per_epoch=run.steps_per_epoch,
        pct_start=pct_start,
        cycle_momentum=cycle,
        base_momentum=cfg.base_momentum,
        max_momentum=cfg.max_momentum,
    )
    return Schedule(sched, "batch")


_Builder = Callable[[torch.optim.Optimizer, ScheduleConfig, _Run], Schedule]
_BUILDERS: dict[str, _Builder] = {
    "none": lambda opt, cfg, run: Schedule(None, "none"),
    "lambda": lambda opt, cfg, run: Schedule(lr_scheduler.LambdaLR(opt, compile_lr_lambda(cfg.lr_lambda)), "epoch"),
    "step": lambda opt, cfg, run: Schedule(lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma), "epoch"),
    "multistep": lambda opt, cfg, run: Schedule(
        lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma), "epoch"
    ),
    "exponential": lambda opt, cfg, run: Schedule(lr_scheduler.ExponentialLR(opt, gamma=cfg.gamma), "epoch"),
    "cosine": lambda opt, cfg, run: Schedule(
        lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.t_max or run.epochs, eta_min=cfg.eta_min), "epoch"
    ),
    "plateau": _plateau,
    "onecycle": _onecycle,
}
assert tuple(_BUILDERS) == tuple(SCHEDULERS), "tasks/optim_config.py SCHEDULERS and the builders here differ"


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    sched_cfg: ScheduleConfig,
    optim_cfg: OptimConfig,
    epochs: int,
    steps_per_epoch: int,
    maximize: bool,
) -> Schedule:
    """The configured LR schedule and when the train loop steps it (per batch, per epoch, on the metric)."""
    builder = _BUILDERS.get(sched_cfg.name)
    if builder is None:
        raise TrainingError(f"unknown scheduler {sched_cfg.name!r}; valid: {', '.join(SCHEDULERS)}")
    return builder(optimizer, sched_cfg, _Run(optim_cfg.lr, epochs, steps_per_epoch, maximize))


def scaled_lr(optim_cfg: OptimConfig, sched_cfg: ScheduleConfig, factor: float) -> tuple[OptimConfig, ScheduleConfig]:
    """optim.lr and schedule.max_lr times `factor` (train.distributed.lr_scaling with batch=per_process)."""
    if factor == 1.0:
        return optim_cfg, sched_cfg
    log.info("train.distributed.lr_scaling: optim.lr %g -> %g", optim_cfg.lr, optim_cfg.lr * factor)
    scaled = sched_cfg.model_copy(update={"max_lr": sched_cfg.max_lr * factor}) if sched_cfg.max_lr else sched_cfg
    return optim_cfg.model_copy(update={"lr": optim_cfg.lr * factor}), scaled
