"""The train and evaluate steps, run in this process (pipelines/remote.py runs training elsewhere).

Training resumes from the run's last checkpoint when there is one, here or in a shared store;
with a shared (S3) store every resume checkpoint is uploaded under checkpoints/<run-id>/, so the
run can resume on another worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import yaml

from pipelines.config import TrainConfig
from pipelines.context import RunContext, store_for, trackers
from tasks import keys, tracking
from tasks.checkpoint import fetch_checkpoint, load_weights, publish_checkpoint
from tasks.evaluate import evaluate_model
from tasks.prepared import load_prepared
from tasks.results import DatasetRef, Evaluation, TrainResult
from tasks.storage import ArtifactStore
from tasks.train import train_model

log = logging.getLogger("trainyard.flow")


def _shared_store(cfg: TrainConfig, ctx: RunContext) -> ArtifactStore | None:
    """The run's artifact store when other workers can read it (S3); else None."""
    store = store_for(cfg, ctx.storage_uri) if ctx.storage_uri else None
    return store if store is not None and store.remote else None


def _resume_point(ctx: RunContext, shared: ArtifactStore | None) -> Path | None:
    """The run's `last.pt` to resume from: here, else the one another worker left in the shared store."""
    last = ctx.checkpoint_dir / "last.pt"
    if not last.is_file() and shared is not None:
        fetch_checkpoint(shared, ctx.run_id, ctx.checkpoint_dir)
    if not last.is_file():
        return None
    epoch = int(load_weights(last)["epoch"])
    tracking.set_tags(ctx.tracking_uri, ctx.run_id, {keys.RESUMED_FROM_EPOCH: str(epoch)})
    log.info("run %s resumes after epoch %d from %s", ctx.run_id, epoch, last)
    return last


def _uploader(ctx: RunContext, shared: ArtifactStore | None) -> Callable[[Path], None] | None:
    """What to do with each new `last.pt`: with a shared store, publish it beside `best.pt`."""
    if shared is None:
        return None

    def upload(path: Path) -> None:
        publish_checkpoint(shared, ctx.run_id, {"last": path, "best": path.with_name("best.pt")})

    return upload


def train(cfg: TrainConfig, ctx: RunContext, dataset: DatasetRef) -> TrainResult:
    """Train on the prepared dataset, logging each epoch to MLflow and TensorBoard."""
    prepared = load_prepared(dataset.path)
    shared = _shared_store(cfg, ctx)
    resume_from = _resume_point(ctx, shared)
    with trackers(cfg, ctx) as tracker:
        if resume_from is None:  # TensorBoard shows the config beside the curves; MLflow has it as params
            tracker.log_text("config", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        result = train_model(
            prepared,
            cfg.model,
            cfg.optim,
            cfg.schedule,
            cfg.train,
            ctx.checkpoint_dir,
            on_epoch=lambda epoch, metrics: tracker.log_metrics(metrics, epoch),
            resume_from=resume_from,
            on_checkpoint=_uploader(ctx, shared),
        )
    tags = {
        keys.TRAIN_DEVICE: result.device,
        keys.TRAIN_PRECISION: result.precision,
        keys.TRAIN_EPOCHS_PLANNED: result.epochs,
        keys.TRAIN_EPOCHS_RUN: int(result.history[-1]["epoch"]) if result.history else 0,
        keys.TRAIN_BATCH_SIZE: result.batch_size,
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
