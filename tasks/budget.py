"""How long a run trains and in what batches: the batch size and epoch count a table asks for, and when
early stopping ends a run.

A fixed epoch count gives a 150-row table a few dozen optimizer steps and a 20,000-row one thousands:
with train.min_steps the small table trains for more epochs until it has had enough updates, and with
train.batch_size=auto its batches shrink so that each epoch is several steps rather than one. Both are
decided once, at set-up, from the prepared dataset; an explicit batch size is used as given.
"""

from __future__ import annotations

import math

from tasks.errors import ConfigError
from tasks.train_config import MAX_EPOCHS, TrainSection

# train.batch_size=auto: about 1/32 of the training rows a batch, a power of two between these.
AUTO_BATCH_MIN, AUTO_BATCH_MAX, AUTO_BATCHES_PER_EPOCH = 32, 256, 32


def batch_size_for(train_cfg: TrainSection, n_train: int) -> int:
    """train.batch_size, or with `auto` the power of two nearest n_train / 32, within 32..256 (small
    tables get several steps an epoch; large ones batches big enough to keep a step efficient)."""
    if train_cfg.batch_size != "auto":
        return int(train_cfg.batch_size)
    rows_per_batch = max(n_train / AUTO_BATCHES_PER_EPOCH, 1.0)
    return int(min(AUTO_BATCH_MAX, max(AUTO_BATCH_MIN, 2 ** round(math.log2(rows_per_batch)))))


def epochs_for(train_cfg: TrainSection, steps_per_epoch: int) -> int:
    """train.epochs, raised to as many whole epochs as reach train.min_steps optimizer steps."""
    needed = math.ceil(train_cfg.min_steps / max(steps_per_epoch, 1))
    return min(MAX_EPOCHS, max(train_cfg.epochs, needed))


def stop_reason(epoch: int, best_epoch: int, patience: int, monitor: str) -> str:
    """Why the run stops after `epoch` (train.early_stopping), or "" to go on. It reads only the epoch and
    the best epoch, which a resume checkpoint holds: a resumed run stops where an uninterrupted one would."""
    if not patience or epoch - best_epoch < patience:
        return ""
    return f"{monitor} has not improved for {epoch - best_epoch} epochs (train.early_stopping={patience})"


def process_batch(batch_size: int, world_size: int, per_process: bool, explicit: bool) -> int:
    """The batch one of `world_size` processes takes: all of `batch_size` with one process or with
    train.distributed.batch=per_process; else its share of the global batch, which an explicit
    train.batch_size must divide into (auto's size is rounded up to a multiple)."""
    if world_size == 1 or per_process:
        return batch_size
    if batch_size % world_size and explicit:
        raise ConfigError(
            f"train.batch_size={batch_size} is the global batch (train.distributed.batch=global) and does not "
            f"divide among {world_size} processes; pick a multiple of {world_size} or set batch=per_process"
        )
    return math.ceil(batch_size / world_size)
