"""The optimizer and LR-schedule sections, and the catalogues of both (read by tasks/optimisation.py).

Torch-free, so the config loads without torch. A new optimizer or scheduler is one entry
here (and, for a scheduler, its construction in tasks/optimisation.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.errors import LambdaExpressionError
from tasks.lr_lambda import compile_lr_lambda
from tasks.sections import Section


@dataclass(frozen=True)
class OptimizerSpec:
    cls: str  # the torch.optim class
    weight_decay: bool = True  # takes weight_decay
    momentum: bool = False  # takes momentum
    fused: bool = False  # has a fused CUDA kernel


# SparseAdam is left out: it needs sparse gradients, which none of the catalogue's models produce.
OPTIMIZERS = {
    "sgd": OptimizerSpec("SGD", momentum=True, fused=True),
    "adam": OptimizerSpec("Adam", fused=True),
    "adamw": OptimizerSpec("AdamW", fused=True),
    "adadelta": OptimizerSpec("Adadelta"),
    "adagrad": OptimizerSpec("Adagrad"),
    "adamax": OptimizerSpec("Adamax"),
    "asgd": OptimizerSpec("ASGD"),
    "lbfgs": OptimizerSpec("LBFGS", weight_decay=False),
    "nadam": OptimizerSpec("NAdam"),
    "radam": OptimizerSpec("RAdam"),
    "rmsprop": OptimizerSpec("RMSprop", momentum=True),
    "rprop": OptimizerSpec("Rprop", weight_decay=False),
}

# Each scheduler and the keys of the schedule section it reads.
SCHEDULERS = {
    "none": (),
    "lambda": ("lr_lambda",),
    "step": ("step_size", "gamma"),
    "multistep": ("milestones", "gamma"),
    "exponential": ("gamma",),
    "cosine": ("t_max", "eta_min"),
    "plateau": ("factor", "patience"),
    "onecycle": ("max_lr", "pct_start", "cycle_momentum", "base_momentum", "max_momentum"),
}


class OptimConfig(Section):
    SECTION, CHOICE = "optim", "name"

    name: Literal[tuple(OPTIMIZERS)] = Field(
        "adam", title="Optimizer", description="Any torch.optim optimizer, by name."
    )
    lr: float = Field(1e-3, gt=0.0, le=100.0, title="Learning rate", description="Initial learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, title="Weight decay", description="L2 penalty / decoupled decay.")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, title="Momentum", description="Momentum for sgd and rmsprop.")
    kwargs: dict[str, float | int | bool | str | list[float]] = Field(
        default_factory=dict,
        title="Extra arguments",
        description="More keyword arguments for the optimizer, e.g. {'betas': [0.9, 0.99]}, "
        "{'line_search_fn': 'strong_wolfe'}.",
    )

    @classmethod
    def uses(cls, choice: str) -> tuple[str, ...]:
        """lr, and weight_decay and momentum where the optimizer takes them; kwargs are its own
        (a preset's kwargs do not follow a change of optimizer)."""
        spec = OPTIMIZERS[choice]
        return ("lr", *(("weight_decay",) if spec.weight_decay else ()), *(("momentum",) if spec.momentum else ()))

    @model_validator(mode="after")
    def _applies(self) -> OptimConfig:  # replaces Section's check, with messages of its own
        # Values the chosen optimizer has no use for are refused, not dropped without a word.
        spec = OPTIMIZERS[self.name]
        if self.weight_decay and not spec.weight_decay:
            raise ValueError(f"optim.weight_decay={self.weight_decay}: {self.name} has no weight decay; set it to 0")
        if self.momentum and not spec.momentum:
            with_momentum = " and ".join(n for n, s in OPTIMIZERS.items() if s.momentum)
            raise ValueError(
                f"optim.momentum={self.momentum} applies to {with_momentum} only; for {self.name}, "
                "set it to 0 (Adam-style optimizers take betas in optim.kwargs)"
            )
        return self


class ScheduleConfig(Section):
    SECTION, CHOICE = "schedule", "name"

    name: Literal[tuple(SCHEDULERS)] = Field(
        "none", title="LR scheduler", description="torch.optim.lr_scheduler to use."
    )
    lr_lambda: str = Field(
        "0.95 ** epoch",
        title="LambdaLR expression",
        description="Multiplier of the initial LR as an arithmetic expression of `epoch` (lambda).",
    )
    step_size: int = Field(10, ge=1, title="Step size", description="Epochs between decays (step).")
    milestones: list[int] = Field(
        default_factory=lambda: [30, 80], title="Milestones", description="Epochs at which to decay (multistep)."
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0, title="Gamma", description="Decay factor (step, multistep, exponential).")
    t_max: int = Field(0, ge=0, title="T_max", description="Cosine period in epochs; 0 means the number of epochs.")
    eta_min: float = Field(0.0, ge=0.0, title="Minimum LR", description="Floor of the cosine schedule.")
    factor: float = Field(0.1, gt=0.0, lt=1.0, title="Plateau factor", description="LR multiplier on a plateau.")
    patience: int = Field(3, ge=0, title="Plateau patience", description="Epochs without improvement before decaying.")
    max_lr: float = Field(0.0, ge=0.0, title="OneCycle max LR", description="Peak LR (onecycle); 0 means optim.lr.")
    pct_start: float = Field(0.3, gt=0.0, lt=1.0, title="OneCycle warm-up share", description="Share of steps rising.")
    cycle_momentum: bool = Field(
        True,
        title="OneCycle momentum cycling",
        description="onecycle: cycle the momentum (Adam's beta1) inversely to the LR between max_momentum and "
        "base_momentum, replacing the optimizer's own value (PyTorch's default); false keeps the optimizer's.",
    )
    base_momentum: float = Field(
        0.85, ge=0.0, lt=1.0, title="OneCycle base momentum", description="Momentum at the LR peak."
    )
    max_momentum: float = Field(
        0.95, ge=0.0, lt=1.0, title="OneCycle max momentum", description="Momentum at the start and end."
    )

    @model_validator(mode="after")
    def _check_lambda(self) -> ScheduleConfig:
        if self.name == "lambda":
            try:
                compile_lr_lambda(self.lr_lambda)
            except LambdaExpressionError as exc:
                raise ValueError(f"schedule.lr_lambda: {exc}") from None
        if self.base_momentum > self.max_momentum:
            raise ValueError(
                f"schedule.base_momentum ({self.base_momentum}) must not exceed "
                f"schedule.max_momentum ({self.max_momentum})"
            )
        return self

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:], strict=False)) or any(m < 1 for m in v):
            raise ValueError(f"schedule.milestones must be strictly increasing positive epochs, got {v}")
        return v

    @classmethod
    def uses(cls, choice: str) -> tuple[str, ...]:
        return SCHEDULERS[choice]
