"""One process of a DDP training: what `tasks.launch.launch` (or `torchrun`, through
pipelines/train_worker.py) runs in each training process.

It joins the process group, loads the prepared dataset, resumes from the run's `last.pt` when rank 0
finds one (after a restart of the group, or one fetched from a shared store), and trains. Rank 0's
hooks (tracking, checkpoint uploads) come from the launching code as a picklable factory, so this
module needs neither prefect nor mlflow.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from models.config import ModelConfig
from tasks.distributed import World
from tasks.optim_config import OptimConfig, ScheduleConfig
from tasks.prepared import Prepared, load_prepared
from tasks.results import TrainResult
from tasks.runtime import pick_device
from tasks.train import EpochCallback, ModelCallback, StartCallback, train_model
from tasks.train_config import TrainSection

log = logging.getLogger("trainyard.train")


@dataclass
class RankHooks:
    """What rank 0 does besides training: report each epoch, and hand each new `last.pt` on; show the model
    once at the start (its graph) and at the end of epochs (its weights and gradients)."""

    on_epoch: EpochCallback | None = None
    on_checkpoint: Callable[[Path], None] | None = None
    on_start: StartCallback | None = None
    on_epoch_model: ModelCallback | None = None


# Rank 0's hooks: called with the checkpoint it resumes from (None: a new run); entered for the training.
HooksFactory = Callable[[Path | None], AbstractContextManager[RankHooks]]


@dataclass(frozen=True)
class RankJob:
    """Everything a training process needs, picklable: the data's folder, the config sections, where
    checkpoints go, and rank 0's hooks."""

    prepared_path: str
    model: ModelConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    train: TrainSection
    out_dir: str
    hooks: HooksFactory | None = None


def _no_hooks(resume_from: Path | None) -> AbstractContextManager[RankHooks]:
    return contextlib.nullcontext(RankHooks())


def run_job(
    job: RankJob, prepared: Prepared, hooks: RankHooks, resume_from: Path | None, world: World | None = None
) -> TrainResult:
    """`train_model` as the job says, reporting through `hooks`: one process's, or one rank's of several."""
    return train_model(
        prepared,
        job.model,
        job.optim,
        job.schedule,
        job.train,
        job.out_dir,
        on_epoch=hooks.on_epoch,
        resume_from=resume_from,
        on_checkpoint=hooks.on_checkpoint,
        world=world,
        on_start=hooks.on_start,
        on_epoch_model=hooks.on_epoch_model,
    )


def train_rank(job: RankJob) -> TrainResult | None:
    """Train as one process of the group; rank 0's result (None on the other ranks)."""
    section = job.train.distributed
    world = World.join(section.backend, pick_device(job.train.device), section.timeout)
    try:
        prepared = load_prepared(job.prepared_path)
        last = Path(job.out_dir) / "last.pt"
        resume_from = last if world.main and last.is_file() else None
        hooks = (job.hooks or _no_hooks) if world.main else _no_hooks
        with hooks(resume_from) as rank_hooks:
            result = run_job(job, prepared, rank_hooks, resume_from, world)
        return result if world.main else None
    finally:
        world.leave()
