"""Train stage: one readable loop over epochs, with device and precision decided once at the top.

`train_model` is a plain function of a prepared dataset and the config sections it needs; the
Prefect task in pipelines/ only wires it. It sets a run up (`setup`: model, batches, loss,
optimizer, schedule, and the state of a resumed run), then per epoch trains (`train_epoch`),
validates (`validate`) and saves. The best checkpoint (by the validation metric; or the last
one with train.keep=last) is written atomically and its path returned.

The hot path: batches come from tasks/batching.py (device-resident tensors when they fit, the
DataLoader otherwise), bf16 autocast on CUDA, channels_last for conv nets, fused optimizers on
CUDA, torch.compile or the whole step as one CUDA graph (tasks/graphstep.py) when asked. Nothing
in the step loop reads a value back to the host: the loss is summed on the device and read once
per epoch, which is also when the NaN check runs.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.config import ModelConfig
from tasks.batching import Batches, make_batches
from tasks.budget import batch_size_for, epochs_for, stop_reason
from tasks.checkpoint import (
    atomic_save,
    best_payload,
    fingerprint,
    load_resume_checkpoint,
    restore_resume_state,
    resume_payload,
)
from tasks.errors import TrainingError
from tasks.forward import batch_loss, evaluate_split, fit_loss, val_metric
from tasks.graphstep import GraphedStep
from tasks.keys import LR, TRAIN_LOSS, VAL_ACCURACY, VAL_LOSS
from tasks.optim_config import OptimConfig, ScheduleConfig
from tasks.optimisation import Schedule, build_optimizer, build_scheduler, loss_for
from tasks.prepared import Prepared
from tasks.results import TrainResult
from tasks.runtime import pick_device, pick_precision, place_model, seed_everything
from tasks.train_config import TrainSection, cuda_graph_refusal
from tasks.train_log import log_epoch, log_start, log_stop

# TrainResult is re-exported: callers of train_model find its result type beside it.
__all__ = ["EpochCallback", "Run", "TrainResult", "setup", "train_epoch", "train_model", "validate"]

log = logging.getLogger("trainyard.train")

EpochCallback = Callable[[int, dict[str, float]], None]


# ---- setup ----------------------------------------------------------------------------------------


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
    batch_size: int = 1  # train.batch_size, or the one auto chose

    def __post_init__(self) -> None:
        self.best = -math.inf if self.maximize else math.inf

    @property
    def monitor(self) -> str:
        return VAL_ACCURACY if self.maximize else VAL_LOSS

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


def _resume(run: Run, path: str | os.PathLike) -> None:
    """Continue `run` after the epoch the resume checkpoint at `path` recorded."""
    ck = load_resume_checkpoint(path, run.fingerprint)
    run.best, run.best_epoch, run.history = ck["best"], ck["best_epoch"], list(ck["history"])
    scheduler = run.schedule.scheduler
    restore_resume_state(
        ck, model=run.model, optimizer=run.optimizer, scheduler=scheduler, scaler=run.scaler, device=run.device
    )
    run.source.set_rng_state(ck["batch_rng"])
    run.first_epoch = ck["epoch"] + 1
    log.info("resuming from %s after epoch %d", path, ck["epoch"])


def setup(
    prepared: Prepared,
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    sched_cfg: ScheduleConfig,
    train_cfg: TrainSection,
    resume_from: str | os.PathLike | None = None,
) -> Run:
    """Seed, pick device and precision, build everything the loop steps; resume when asked."""
    if train_cfg.cuda_graph and (reason := cuda_graph_refusal(optim_cfg, sched_cfg, train_cfg)):
        raise TrainingError(reason)  # on any device, before any work
    schema = prepared.schema
    seed_everything(train_cfg.seed)
    device = pick_device(train_cfg.device)
    precision = pick_precision(train_cfg.precision, device)
    model, channels_last = place_model(model_cfg, schema, device)
    forward = _compiled(model, train_cfg) if train_cfg.compile else model
    batch_size = batch_size_for(train_cfg, int(prepared.tensors["y_train"].shape[0]))
    sized = train_cfg.model_copy(update={"batch_size": batch_size})  # what the batches and a CUDA graph read
    source = make_batches(prepared, sized, device, channels_last=channels_last)
    epochs = epochs_for(train_cfg, len(source.train))
    classification = schema["task"] == "classification"
    maximize = classification and train_cfg.monitor == "auto"  # accuracy; else the loss, minimised
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
        fingerprint=fingerprint(model_cfg, optim_cfg, sched_cfg, train_cfg, schema.get("key", "")),
        maximize=maximize,
        mark_step=_cudagraph_step_marker(train_cfg, device),
        epochs=epochs,
        batch_size=batch_size,
    )
    if resume_from is not None:
        _resume(run, resume_from)
    run.graphed = _graphed_step(run, sized)  # after the resume: it moves the loaded learning rates
    return run


# ---- one epoch --------------------------------------------------------------------------------------


def _progress(loader, epoch: int, epochs: int, mode: str):
    use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
    if not use_bar:
        return loader, None
    from tqdm.auto import tqdm

    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False, file=sys.stderr, unit="batch")
    return bar, bar


def _eager_step(run: Run, x: torch.Tensor, y: torch.Tensor, grad_clip: float) -> torch.Tensor:
    if isinstance(run.optimizer, torch.optim.LBFGS):  # steps by re-evaluating a closure, in fp32

        def closure() -> torch.Tensor:
            run.optimizer.zero_grad(set_to_none=True)
            loss = fit_loss(run.loss_fn, run.forward(x), y, run.schema)
            loss.backward()
            return loss

        return run.optimizer.step(closure)
    run.optimizer.zero_grad(set_to_none=True)
    loss = batch_loss(run.forward, run.loss_fn, run.schema, run.device, run.precision, x, y)
    run.scaler.scale(loss).backward()
    if grad_clip:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss


def _eager_epoch(run: Run, batches, grad_clip: float) -> tuple[float, int, int]:
    total = torch.zeros((), device=run.device)  # summed on the device, read once per epoch
    first_bad = torch.full((), -1, dtype=torch.long, device=run.device)  # first non-finite step, likewise
    seen = step = 0
    for x, y in batches:  # already on the device, normalised, in the model's memory format
        run.mark_step()
        loss = _eager_step(run, x, y, grad_clip).detach()
        run.schedule.step_batch()
        step += 1
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        total += loss * y.shape[0]
        seen += y.shape[0]
    return float(total.item() / max(seen, 1)), int(first_bad.item()), step


def _graphed_epoch(graphed: GraphedStep, batches, schedule: Schedule) -> tuple[float, int, int]:
    graphed.begin_epoch()
    for x, y in batches:
        graphed(x, y)
        schedule.step_batch()
    return graphed.end_epoch()


def train_epoch(run: Run, epoch: int, train_cfg: TrainSection, lr_setting: float) -> float:
    """One pass over the training batches; the mean training loss, refused when not finite."""
    run.model.train()
    batches, bar = _progress(run.source.train, epoch, run.epochs, train_cfg.progress)
    if run.graphed is not None:
        train_loss, bad_step, steps = _graphed_epoch(run.graphed, batches, run.schedule)
    else:
        train_loss, bad_step, steps = _eager_epoch(run, batches, train_cfg.grad_clip)
    if bar is not None:
        bar.close()
    if bad_step > 0 or not math.isfinite(train_loss):
        raise TrainingError(
            f"training loss became {train_loss} in epoch {epoch} (first at step {bad_step} of {steps}); "
            f"lower optim.lr (now {lr_setting}) or set train.grad_clip; no model is registered from this run"
        )
    return train_loss


def validate(run: Run, epoch: int, lr_setting: float) -> tuple[float, str, float]:
    """(validation loss, the monitored metric's name, its value), refused when the loss is not finite."""
    ev = evaluate_split(
        run.model, run.source.val, run.eval_loss_fn, run.schema, run.device, run.precision, run.channels_last
    )
    if not math.isfinite(ev.loss):
        raise TrainingError(f"validation loss became {ev.loss} in epoch {epoch}; lower optim.lr (now {lr_setting})")
    name, value = val_metric(ev, run.schema)
    return ev.loss, name, value


# ---- saving and reporting ---------------------------------------------------------------------------


def _keep(run: Run, epoch: int, value: float, model_cfg: ModelConfig, path: Path) -> None:
    run.best, run.best_epoch = value, epoch
    payload = best_payload(
        run.model, epoch=epoch, monitor=run.monitor, metric=value, dataset_key=run.dataset_key, model_cfg=model_cfg
    )
    atomic_save(payload, path)


def _save_resume(run: Run, epoch: int, metrics: dict[str, float], path: Path) -> None:
    payload = resume_payload(
        fingerprint=run.fingerprint,
        dataset_key=run.dataset_key,
        epoch=epoch,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.schedule.scheduler,
        scaler=run.scaler,
        best=run.best,
        best_epoch=run.best_epoch,
        history=[*run.history, {"epoch": epoch, **metrics}],
        device=run.device,
        batch_rng=run.source.rng_state(),
    )
    atomic_save(payload, path)


def _result(run: Run, best_path: Path, seconds: float, patience: int) -> TrainResult:
    if run.graphed is not None:
        replays, eager = run.graphed.replays, run.graphed.eager_steps
        log.info("train.cuda_graph: %d steps replayed from the graph, %d eager", replays, eager)
    return TrainResult(
        checkpoint=str(best_path),
        best_epoch=run.best_epoch,
        best_metric=run.best,
        monitor=run.monitor,
        device=str(run.device),
        precision=run.precision,
        seconds=seconds,
        history=run.history,
        epochs=run.epochs,
        batch_size=run.batch_size,
        stopped=_stopped(run, patience),
    )


def _stopped(run: Run, patience: int) -> str:
    """Why early stopping ended the run before its last planned epoch; "" when it ran them all."""
    last = int(run.history[-1]["epoch"]) if run.history else 0
    return stop_reason(last, run.best_epoch, patience, run.monitor) if last < run.epochs else ""


# ---- the loop -------------------------------------------------------------------------------------------


def train_model(
    prepared: Prepared,
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    sched_cfg: ScheduleConfig,
    train_cfg: TrainSection,
    out_dir: str | os.PathLike,
    on_epoch: EpochCallback | None = None,
    resume_from: str | os.PathLike | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Train as the config says; write `best.pt` (the kept weights) and `last.pt` (everything needed
    to resume: model, optimizer, scheduler, GradScaler, epoch, RNG states, data key) into `out_dir`.

    With `resume_from`, continue after the epoch that checkpoint recorded; on the CPU the end result
    equals an uninterrupted run's. `on_checkpoint(path)` is called after each `last.pt` write.
    """
    run = setup(prepared, model_cfg, optim_cfg, sched_cfg, train_cfg, resume_from)
    best_path, last_path = Path(out_dir) / "best.pt", Path(out_dir) / "last.pt"
    epochs, keep_last, every = run.epochs, train_cfg.keep == "last", train_cfg.checkpoint_every
    patience = train_cfg.early_stopping
    log_start(run, prepared, model_cfg.name, train_cfg)
    start = time.perf_counter()
    # a run resumed from the checkpoint of its early stop has nothing left to train
    done = stop_reason(run.first_epoch - 1, run.best_epoch, patience, run.monitor) if run.first_epoch > 1 else ""
    if done:
        log_stop(run, run.first_epoch - 1, done)
    for epoch in range(run.first_epoch, epochs + 1 if not done else run.first_epoch):
        epoch_start = time.perf_counter()
        lr = float(run.optimizer.param_groups[0]["lr"])  # a device tensor with train.cuda_graph
        train_loss = train_epoch(run, epoch, train_cfg, optim_cfg.lr)
        val_loss, name, value = validate(run, epoch, optim_cfg.lr)
        metrics = {TRAIN_LOSS: train_loss, VAL_LOSS: val_loss, LR: lr}
        metrics[name] = value  # regression monitors val/loss itself
        value = value if run.maximize else val_loss  # the monitored metric (train.monitor)
        run.schedule.step_epoch(value)
        improved = epoch == epochs if keep_last else run.improves(value)
        if improved:
            _keep(run, epoch, value, model_cfg, best_path)
        stop = stop_reason(epoch, run.best_epoch, patience, run.monitor)
        if (every and epoch % every == 0) or epoch == epochs or stop:
            _save_resume(run, epoch, metrics, last_path)
            if on_checkpoint is not None:
                on_checkpoint(last_path)
        # wall time of the epoch (steps, validation, checkpoint); the reads above synchronised the device
        run.history.append({"epoch": epoch, **metrics, "seconds": time.perf_counter() - epoch_start})
        log_epoch(epoch, epochs, metrics, name, ("  (kept)" if keep_last else "  (best)") if improved else "")
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if stop:
            log_stop(run, epoch, stop)
            break
    return _result(run, best_path, time.perf_counter() - start, patience)
