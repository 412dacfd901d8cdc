"""Setting a training run up: the model on its device (wrapped for DDP with several processes), the
batches, the loss, optimizer and schedule, and the state of a resumed run, as one `Run`.

tasks/train.py steps it; `setup` decides device and precision once, at the top.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.config import ModelConfig
from tasks.batching import Batches, make_batches
from tasks.budget import batch_size_for, epochs_for, process_batch
from tasks.checkpoint import fingerprint, load_resume_checkpoint, restore_resume_state, set_rng_states
from tasks.distributed import World, rank_seed
from tasks.errors import TrainingError
from tasks.forward import batch_loss
from tasks.graphstep import GraphedStep
from tasks.keys import VAL_ACCURACY, VAL_LOSS
from tasks.optim_config import OptimConfig, ScheduleConfig
from tasks.optimisation import Schedule, build_optimizer, build_scheduler, loss_for, scaled_lr
from tasks.prepared import Prepared
from tasks.runtime import pick_device, pick_precision, place_model, seed_everything
from tasks.train_config import TrainSection, cuda_graph_refusal, maximizes

log = logging.getLogger("trainyard.train")


@dataclass
class Run:
    """One training run's live objects and its progress so far; `setup` builds it."""

    schema: dict[str, Any]
    device: torch.device
    precision: str
    model: nn.Module  # checkpoints and validation use it; `forward` may be its compiled twin
    forward: Callable[[torch.Tensor], torch.Tensor]
    channels_last: bool
    source: Batches
    loss_fn: nn.Module
    eval_loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    fingerprint: str
    maximize: bool  # the monitored metric: accuracy (classification, train.monitor=auto) or the loss
    mark_step: Callable[[], None] = lambda: None
    graphed: GraphedStep | None = None
    best: float = field(init=False)  # the monitored metric's best value so far
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    first_epoch: int = 1
    epochs: int = 1  # train.epochs, or more for train.min_steps
    batch_size: int = 1  # train.batch_size, or the one auto chose: the global batch with several processes
    world: World | None = None  # None: one process, the plain path
    val_rows: int = 0  # the whole validation split's rows (each process holds its stride of them)

    def __post_init__(self) -> None:
        self.best = -math.inf if self.maximize else math.inf

    @property
    def monitor(self) -> str:
        return VAL_ACCURACY if self.maximize else VAL_LOSS

    @property
    def main(self) -> bool:
        """Whether this process writes: the only one, or rank 0 of several."""
        return self.world is None or self.world.main

    @property
    def dataset_key(self) -> str:
        return self.schema.get("key", "")

    def improves(self, value: float) -> bool:
        return value > self.best if self.maximize else value < self.best


def _compiled(model: nn.Module, train_cfg: TrainSection) -> nn.Module:
    mode = train_cfg.compile_mode
    log.info("compiling the model (torch.compile, mode %s); the first steps include compile time", mode)
    return torch.compile(model, mode=mode, dynamic=False)


def _cudagraph_step_marker(train_cfg: TrainSection, device: torch.device) -> Callable[[], None]:
    """With CUDA graphs (compile_mode reduce-overhead), each training step begins a new graph step."""
    if train_cfg.compile and device.type == "cuda" and train_cfg.compile_mode == "reduce-overhead":
        return torch.compiler.cudagraph_mark_step_begin
    return lambda: None


def _graphed_step(run: Run, train_cfg: TrainSection) -> GraphedStep | None:  # train_cfg with the batch size
    """The CUDA-graph step of train.cuda_graph, or None where it does not apply (not on CUDA)."""
    if not train_cfg.cuda_graph:
        return None
    if run.device.type != "cuda":
        log.warning("train.cuda_graph needs CUDA; training eagerly on %s", run.device.type)
        return None
    compute_loss = functools.partial(
        batch_loss, run.forward, run.loss_fn, run.schema, run.device, run.precision, cache=False
    )
    log.info("train.cuda_graph: the training step is recorded once as a CUDA graph and replayed per batch")
    params = run.model.parameters()
    return GraphedStep(params, compute_loss, run.optimizer, run.device, run.batch_size, train_cfg.grad_clip)


def _resume(run: Run, path: str | os.PathLike | None) -> None:
    """Continue `run` after the epoch the resume checkpoint at `path` recorded. With several processes
    rank 0 alone reads it (the other nodes may not have the file) and hands it to the others."""
    if run.world is None:
        ck = load_resume_checkpoint(path, run.fingerprint)
    else:
        ck = run.world.share(load_resume_checkpoint(path, run.fingerprint) if run.main and path else None)
        if ck is None:
            return
    run.best, run.best_epoch, run.history = ck["best"], ck["best_epoch"], list(ck["history"])
    scheduler = run.schedule.scheduler
    restore_resume_state(
        ck, model=run.model, optimizer=run.optimizer, scheduler=scheduler, scaler=run.scaler, device=run.device
    )
    try:
        run.source.set_rng_state(ck["batch_rng"])
    except ValueError as exc:  # e.g. written by one process (a sampler's generator), resumed by several
        raise TrainingError(
            f"checkpoint {path or 'of rank 0'} does not fit this run's batches ({exc}); resume with the "
            "train.distributed.nproc_per_node and nodes it was written with"
        ) from None
    if run.world is not None and len(ck.get("rank_rng", [])) == run.world.size:  # each rank's own draws
        own = ck["rank_rng"][run.world.rank]
        set_rng_states(own["rng"], run.device)
        run.source.set_rng_state(own["batch_rng"])
    run.first_epoch = ck["epoch"] + 1
    log.info("resuming from %s after epoch %d", path, ck["epoch"])


def _placed(
    model_cfg: ModelConfig, schema: dict[str, Any], train_cfg: TrainSection, device: torch.device, world: World | None
) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], bool]:
    """(the model on its device, what the training step calls: compiled and/or DDP-wrapped, channels_last);
    with a `world`, ranks above 0 reseed their own random draws once the weights are built."""
    model, channels_last = place_model(model_cfg, schema, device)
    forward = _compiled(model, train_cfg) if train_cfg.compile else model
    if world is not None:  # after the move to the device; gradients are averaged over the processes
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if world.rank:  # the same initial weights as rank 0, then draws of its own (dropout)
            seed_everything(rank_seed(train_cfg.seed, world))
    return model, forward, channels_last


def _process_batch_size(train_cfg: TrainSection, train_rows: int, processes: int) -> int:
    """This process's batch: train.batch_size (or auto's), shared out when it is the global batch."""
    batch_size = batch_size_for(train_cfg, train_rows)
    per_process = train_cfg.distributed.batch == "per_process"
    return process_batch(batch_size, processes, per_process, train_cfg.batch_size != "auto")


def setup(
    prepared: Prepared,
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    sched_cfg: ScheduleConfig,
    train_cfg: TrainSection,
    resume_from: str | os.PathLike | None = None,
    world: World | None = None,
) -> Run:
    """Seed, pick device and precision, build everything the loop steps; resume when asked.

    With a `world` (one of several processes) the model is wrapped in DistributedDataParallel once it is
    on its device, each process takes its share of every batch and its stride of the validation split,
    and rank 0 alone writes. Every process seeds alike: the same initial weights (DDP also broadcasts
    rank 0's) and the same epoch order (of which each keeps its stride); then each rank draws its own
    dropout masks and shifts (tasks/distributed.py rank_seed), whose states every checkpoint keeps.
    """
    if train_cfg.cuda_graph and (reason := cuda_graph_refusal(optim_cfg, sched_cfg, train_cfg)):
        raise TrainingError(reason)  # on any device, before any work
    schema = prepared.schema
    seed_everything(train_cfg.seed)
    device = world.device if world is not None else pick_device(train_cfg.device)
    precision = pick_precision(train_cfg.precision, device)
    model, forward, channels_last = _placed(model_cfg, schema, train_cfg, device, world)
    size = world.size if world is not None else 1
    batch_size = _process_batch_size(train_cfg, int(prepared.tensors["y_train"].shape[0]), size)
    sized = train_cfg.model_copy(update={"batch_size": batch_size})  # what the batches and a CUDA graph read
    source = make_batches(prepared, sized, device, channels_last=channels_last, world=world)
    epochs = epochs_for(train_cfg, len(source.train))
    classification = schema["task"] == "classification"
    maximize = maximizes(schema["task"], train_cfg.monitor)  # accuracy; else the loss, minimised
    run_fingerprint = fingerprint(model_cfg, optim_cfg, sched_cfg, train_cfg, schema.get("key", ""), size)
    optim_cfg, sched_cfg = scaled_lr(optim_cfg, sched_cfg, train_cfg.distributed.lr_factor(size))
    optimizer = build_optimizer(model.parameters(), optim_cfg, device)
    run = Run(
        schema=schema,
        device=device,
        precision=precision,
        model=model,
        forward=forward,
        channels_last=channels_last,
        source=source,
        loss_fn=loss_for(schema, train_cfg.label_smoothing if classification else 0.0),
        eval_loss_fn=loss_for(schema),
        optimizer=optimizer,
        schedule=build_scheduler(optimizer, sched_cfg, optim_cfg, epochs, len(source.train), maximize),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        fingerprint=run_fingerprint,
        maximize=maximize,
        mark_step=_cudagraph_step_marker(train_cfg, device),
        epochs=epochs,
        batch_size=batch_size * size,  # the global batch
        world=world,
        val_rows=int(prepared.tensors["y_val"].shape[0]),
    )
    if resume_from is not None or world is not None:  # every process takes part in handing it over
        _resume(run, resume_from)
    run.graphed = _graphed_step(run, sized)  # after the resume: it moves the loaded learning rates
    return run
