"""A sweep's settings: the search space over config keys, how many trials, the sampler and pruner, and
where the Optuna study lives (read by tasks/sweep_space.py and pipelines/sweep.py).

A space names config keys as `section.key` (e.g. `optim.lr`), each a float or int range (uniform or
log) or a list of choices. Only pydantic and the standard library are imported here.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class ParamSpec(BaseModel):
    """One searched key: `float`/`int` between low and high (log: on a log scale), or `categorical` choices."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter takes a non-empty `choices` list and no low/high")
            return self
        if self.choices is not None or self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter takes `low` and `high` and no choices")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ValueError(f"expected low <= high, got low={self.low} and high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError("a log-scale range takes no step")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"an int range takes whole numbers, got low={self.low} and high={self.high}")
        return self


class SweepConfig(BaseModel):
    """`trainyard sweep`'s settings besides the base config; the sweep flow's second parameter."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field("", title="Sweep name", description="The study's name; a sweep started again with it continues.")
    space: dict[str, ParamSpec] = Field(
        default_factory=dict, title="Search space", description="config key -> range or choices (see README)."
    )
    trials: int = Field(20, ge=1, le=10_000, title="Trials", description="Trials the study should hold in all.")
    parallel: int = Field(1, ge=1, le=64, title="Parallel trials", description="Trials trained at once.")
    sampler: Literal["tpe", "random", "grid"] = Field(
        "tpe", title="Sampler", description="tpe (Optuna's default), random, or grid (categorical spaces only)."
    )
    pruner: Literal["median", "none"] = Field(
        "median", title="Pruner", description="median: stop a trial whose validation metric trails the median."
    )
    seed: int = Field(0, ge=0, title="Sampler seed", description="Seed of the sampler's draws.")
    train_deployment: str = Field(
        "",
        title="Train on deployment",
        description="Train each trial as a run of this deployment (e.g. trainyard-train-step/gpu, one trial per "
        "free GPU slot of its pool) instead of here; needs an s3:// storage.uri and a study storage the workers "
        "reach (PostgreSQL).",
    )
    train_start_timeout: float = Field(
        600.0,
        gt=0,
        le=86_400,
        title="Step start timeout",
        description="With train_deployment: seconds a trial's step may wait for a worker to start it.",
    )
    storage: str = Field(
        "",
        title="Study storage",
        description="Optuna RDB URL (postgresql://..., sqlite:///...), a database of its own (not MLflow's); "
        "empty: TRAINYARD_SWEEP_STORAGE, else optuna.db in the state folder.",
    )

    @model_validator(mode="after")
    def _checks(self) -> SweepConfig:
        if self.name and not _NAME.match(self.name):
            raise ValueError(f"sweep name: expected letters, digits, '.', '_' or '-' (at most 100), got {self.name!r}")
        for key in self.space:
            if key.count(".") < 1:
                raise ValueError(f"space key {key!r}: expected section.key (e.g. optim.lr)")
        if self.sampler == "grid" and any(p.type != "categorical" for p in self.space.values()):
            raise ValueError("sampler grid needs categorical parameters only (a grid of choices)")
        return self
