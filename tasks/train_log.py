"""What the train loop logs: how a run is set up (its epochs, steps and batch size, and which of them
the table decided), each epoch's figures, and why it stopped early."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tasks.keys import LR, TRAIN_LOSS, VAL_LOSS
from tasks.prepared import Prepared
from tasks.train_config import TrainSection

if TYPE_CHECKING:
    from tasks.train_setup import Run

log = logging.getLogger("trainyard.train")


def log_start(run: Run, prepared: Prepared, model_name: str, train_cfg: TrainSection) -> None:
    train_rows, val_rows = (prepared.tensors[f"y_{split}"].shape[0] for split in ("train", "val"))
    auto = " (train.batch_size=auto)" if train_cfg.batch_size == "auto" else ""
    more = f" (train.min_steps={train_cfg.min_steps})" if run.epochs > train_cfg.epochs else ""
    patience = train_cfg.early_stopping
    stops = f", stopping after {patience} epochs without improvement" if patience else ""
    procs = f" in {run.world.size} processes ({run.world.backend})" if run.world is not None else ""
    log.info(
        "training %s on %s (%s)%s for %d epochs%s of %d steps at batch %d%s%s: %d train / %d val rows",
        model_name,
        run.device,
        run.precision,
        procs,
        run.epochs,
        more,
        len(run.source.train),
        run.batch_size,
        auto,
        stops,
        train_rows,
        val_rows,
    )


def log_epoch(epoch: int, epochs: int, metrics: dict[str, float], name: str, mark: str) -> None:
    log.info(
        "epoch %d/%d  train/loss %.4f  val/loss %.4f  %s %.4f  lr %.3g%s",
        epoch,
        epochs,
        metrics[TRAIN_LOSS],
        metrics[VAL_LOSS],
        name,
        metrics[name],
        metrics[LR],
        mark,
    )


def log_stop(run: Run, epoch: int, reason: str) -> None:
    log.info("early stopping after epoch %d of %d: %s; keeping epoch %d", epoch, run.epochs, reason, run.best_epoch)
