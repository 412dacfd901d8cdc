"""The train and evaluate steps, run in this process (pipelines/remote.py runs training elsewhere).

Training resumes from the run's last checkpoint when there is one, here or in a shared store;
with a shared (S3) store every resume checkpoint is uploaded under checkpoints/<run-id>/, so the
run can resume on another worker.

One training process is the plain path: `train_model` in this process. Several on this node
(train.distributed.nproc_per_node) are started by PyTorch's elastic launcher (tasks/launch.py); their
rank 0 logs to MLflow and TensorBoard and writes the checkpoints, through `rank0_hooks`. Several
nodes train as a Kubeflow Trainer TrainJob (pipelines/trainjob.py), or, with train.distributed.rdzv_endpoint,
as a group this node joins at that endpoint and the other nodes join with `torchrun` (pipelines/train_worker.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from pipelines.config import TrainConfig
from pipelines.context import RunContext, store_for, trackers
from tasks import keys, tracking
from tasks.budget import process_batch
from tasks.checkpoint import fetch_checkpoint, load_weights, publish_checkpoint
from tasks.errors import ConfigError
from tasks.evaluate import evaluate_model
from tasks.launch import LaunchPlan, launch, processes_per_node
from tasks.prepared import load_prepared
from tasks.results import DatasetRef, Evaluation, TrainResult
from tasks.storage import ArtifactStore
from tasks.train import EpochCallback, ModelCallback
from tasks.train_rank import RankHooks, RankJob, run_job, train_rank

log = logging.getLogger("trainyard.flow")


def shared_store(cfg: TrainConfig, ctx: RunContext) -> ArtifactStore | None:
    """The run's artifact store when other workers can read it (S3); else None."""
    store = store_for(cfg, ctx.storage_uri) if ctx.storage_uri else None
    return store if store is not None and store.remote else None


def resume_point(ctx: RunContext, shared: ArtifactStore | None) -> Path | None:
    """The run's `last.pt` to resume from: here, else the one another worker left in the shared store."""
    last = ctx.checkpoint_dir / "last.pt"
    if not last.is_file() and shared is not None:
        fetch_checkpoint(shared, ctx.run_id, ctx.checkpoint_dir)
    return last if last.is_file() else None


def _note_resume(ctx: RunContext, last: Path) -> None:
    epoch = int(load_weights(last)["epoch"])
    tracking.set_tags(ctx.tracking_uri, ctx.run_id, {keys.RESUMED_FROM_EPOCH: str(epoch)})
    log.info("run %s resumes after epoch %d from %s", ctx.run_id, epoch, last)


def _uploader(ctx: RunContext, shared: ArtifactStore | None) -> Callable[[Path], None] | None:
    """What to do with each new `last.pt`: with a shared store, publish it beside `best.pt`."""
    if shared is None:
        return None

    def upload(path: Path) -> None:
        publish_checkpoint(shared, ctx.run_id, {"last": path, "best": path.with_name("best.pt")})

    return upload


def _histograms(cfg: TrainConfig, tracker: tracking.Tracker) -> ModelCallback | None:
    """Weight and gradient histograms to TensorBoard every tracking.histogram_every epochs; None when 0."""
    every = cfg.tracking.histogram_every
    if not every:
        return None

    def histograms(epoch: int, model) -> None:
        if epoch % every == 0:
            tracker.log_histograms(model, epoch)

    return histograms


@contextlib.contextmanager
def rank0_hooks(cfg: TrainConfig, ctx: RunContext, resume_from: Path | None) -> Iterator[RankHooks]:
    """What the writing process does besides training: each epoch to MLflow and TensorBoard (the config and
    the model's graph too, on a new run; histograms as tracking.histogram_every says), each `last.pt` to the
    shared store; picklable as a partial, for a launched rank 0."""
    shared = shared_store(cfg, ctx)
    if resume_from is not None:
        _note_resume(ctx, resume_from)
    with trackers(cfg, ctx) as tracker:
        new = resume_from is None  # a resumed run's folder has the config and the graph already
        if new:  # TensorBoard shows the config beside the curves; MLflow has it as params
            tracker.log_text("config", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        yield RankHooks(
            lambda epoch, metrics: tracker.log_metrics(metrics, epoch),
            _uploader(ctx, shared),
            on_start=tracker.log_graph if new and cfg.tracking.tensorboard else None,
            on_epoch_model=_histograms(cfg, tracker),
        )


def rank_job(cfg: TrainConfig, ctx: RunContext, prepared_path: str) -> RankJob:
    """The job of every training process of this run; rank 0 reports through `rank0_hooks`."""
    hooks = functools.partial(rank0_hooks, cfg, ctx)
    return RankJob(prepared_path, cfg.model, cfg.optim, cfg.schedule, cfg.train, str(ctx.checkpoint_dir), hooks)


def _train_here(cfg: TrainConfig, ctx: RunContext, dataset: DatasetRef, observe: EpochCallback | None) -> TrainResult:
    """The plain path: one process, this one; `observe(epoch, metrics)` after each epoch's reports."""
    prepared = load_prepared(dataset.path)
    resume_from = resume_point(ctx, shared_store(cfg, ctx))
    with rank0_hooks(cfg, ctx, resume_from) as hooks:
        if observe is not None:
            hooks.on_epoch = _both(hooks.on_epoch, observe)
        return run_job(rank_job(cfg, ctx, dataset.path), prepared, hooks, resume_from)


def _both(first: EpochCallback | None, then: EpochCallback) -> EpochCallback:
    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if first is not None:
            first(epoch, metrics)
        then(epoch, metrics)

    return on_epoch


def _check_batch(cfg: TrainConfig, processes: int) -> None:
    """An explicit global batch must divide among the processes: refused here, before any starts."""
    if cfg.train.batch_size != "auto":
        process_batch(cfg.train.batch_size, processes, cfg.train.distributed.batch == "per_process", True)


def _train_launched(cfg: TrainConfig, ctx: RunContext, dataset: DatasetRef) -> TrainResult:
    """Several processes on this node, started by the elastic launcher; rank 0 resumes from a `last.pt`
    left here or in the shared store, after a restart of the group too. With several nodes meeting at
    train.distributed.rdzv_endpoint, rank 0 may run on another node: the result comes as its handoff."""
    plan = LaunchPlan.of(cfg.train.distributed, cfg.train.device, ctx.run_id, ctx.run_dir / "launch")
    _check_batch(cfg, plan.world_size)
    resume_point(ctx, shared_store(cfg, ctx))
    if plan.nodes == 1:
        return launch(plan, train_rank, rank_job(cfg, ctx, dataset.path))
    from pipelines import train_worker

    return train_worker.join_nodes(plan, cfg, ctx, dataset)


def train(cfg: TrainConfig, ctx: RunContext, dataset: DatasetRef, observe: EpochCallback | None = None) -> TrainResult:
    """Train on the prepared dataset, logging each epoch to MLflow and TensorBoard: in this process, in
    several started here (train.distributed.nproc_per_node), or on several nodes (train.distributed.nodes).
    `observe(epoch, metrics)` (one process only: a sweep's pruning) sees each epoch after its reports."""
    section = cfg.train.distributed
    if observe is not None and not section.single:
        raise ConfigError(
            "a run observed epoch by epoch (a sweep's trial) trains in one process: set "
            "train.distributed.nproc_per_node=1 and nodes=1"
        )
    if section.nodes > 1 and not section.rdzv_endpoint:
        from pipelines.trainjob import train_on_trainjob

        result = train_on_trainjob(cfg, ctx, dataset, os.environ.get("TRAINYARD_IMAGE", ""))
    elif section.nodes > 1 or processes_per_node(section, cfg.train.device) > 1:
        result = _train_launched(cfg, ctx, dataset)
    else:
        result = _train_here(cfg, ctx, dataset, observe)
    tags = {
        keys.TRAIN_DEVICE: result.device,
        keys.TRAIN_PRECISION: result.precision,
        keys.TRAIN_EPOCHS_PLANNED: result.epochs,
        keys.TRAIN_EPOCHS_RUN: int(result.history[-1]["epoch"]) if result.history else 0,
        keys.TRAIN_BATCH_SIZE: result.batch_size,
        keys.TRAIN_PROCESSES: result.processes,
    }
    if result.stopped:
        tags[keys.TRAIN_STOPPED_EARLY] = result.stopped
    tracking.set_tags(ctx.tracking_uri, ctx.run_id, tags)
    return result


def evaluate(cfg: TrainConfig, ctx: RunContext, dataset: DatasetRef, result: TrainResult) -> Evaluation:
    """The kept checkpoint on the test split; reports under the run folder's eval/."""
    return evaluate_model(
        load_prepared(dataset.path),
        cfg.model,
        result.checkpoint,
        ctx.run_dir / "eval",
        device=cfg.train.device,
        precision=cfg.train.precision,
        batch_size=cfg.train.eval_batch_size,
    )
