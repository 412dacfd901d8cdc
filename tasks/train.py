"""Train stage: one readable loop over epochs, with device and precision decided once at the top.

`train_model` is a plain function of a prepared dataset and the config sections it needs; the
Prefect task in pipelines/ only wires it. It sets a run up (`setup`: model, batches, loss,
optimizer, schedule, and the state of a resumed run), then per epoch trains (`train_epoch`),
validates (`validate`) and saves. The best checkpoint (by the validation metric; or the last
one with train.keep=last) is written atomically and its path returned.

Setting up (tasks/train_setup.py) builds the `Run`: with several processes (tasks/launch.py), one rank
of a DistributedDataParallel group, of which rank 0 alone writes checkpoints and reports epochs.

The hot path: batches come from tasks/batching.py (device-resident tensors when they fit, the
DataLoader otherwise), bf16 autocast on CUDA, channels_last for conv nets, fused optimizers on
CUDA, torch.compile or the whole step as one CUDA graph (tasks/graphstep.py) when asked. Nothing
in the step loop reads a value back to the host: the loss is summed on the device and read once
per epoch, which is also when the NaN check runs.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from models.config import ModelConfig
from tasks.budget import stop_reason
from tasks.checkpoint import atomic_save, best_payload, resume_payload, rng_states
from tasks.distributed import World, whole_split
from tasks.errors import TrainingError
from tasks.forward import batch_loss, evaluate_split, fit_loss, val_metric
from tasks.graphstep import GraphedStep
from tasks.keys import LR, TRAIN_LOSS, VAL_LOSS
from tasks.optim_config import OptimConfig, ScheduleConfig
from tasks.optimisation import Schedule
from tasks.prepared import Prepared
from tasks.results import TrainResult
from tasks.train_config import TrainSection
from tasks.train_log import log_epoch, log_start, log_stop
from tasks.train_setup import Run, setup

# TrainResult is re-exported: callers of train_model find its result type beside it.
__all__ = [
    "EpochCallback",
    "ModelCallback",
    "Run",
    "StartCallback",
    "TrainResult",
    "setup",
    "train_epoch",
    "train_model",
    "validate",
]

log = logging.getLogger("trainyard.train")

EpochCallback = Callable[[int, dict[str, float]], None]
StartCallback = Callable[[nn.Module, torch.Tensor], None]  # (the model, an example batch of its inputs)
ModelCallback = Callable[[int, nn.Module], None]  # (the epoch, the model as it ended the epoch)


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


def _epoch_figures(
    run: Run, total: torch.Tensor, seen: int, first_bad: torch.Tensor, steps: int
) -> tuple[float, int, int]:
    """(mean loss, first non-finite step or -1, steps): over all processes when there are several, so
    that every one of them sees a NaN on any and stops with the same message."""
    if run.world is None:
        return float(total.item() / max(seen, 1)), int(first_bad.item()), steps
    total, count = run.world.sum(total, torch.tensor(float(seen)))
    return float(total.item() / max(count.item(), 1.0)), int(run.world.max(first_bad).item()), steps


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
    return _epoch_figures(run, total, seen, first_bad, step)


def _graphed_epoch(graphed: GraphedStep, batches, schedule: Schedule) -> tuple[float, int, int]:
    graphed.begin_epoch()
    for x, y in batches:
        graphed(x, y)
        schedule.step_batch()
    return graphed.end_epoch()


def train_epoch(run: Run, epoch: int, train_cfg: TrainSection, lr_setting: float) -> float:
    """One pass over the training batches; the mean training loss, refused when not finite."""
    run.model.train()
    run.source.set_epoch(epoch)
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
    if run.world is not None:
        ev = whole_split(ev, run.world, run.val_rows)
    if not math.isfinite(ev.loss):
        raise TrainingError(f"validation loss became {ev.loss} in epoch {epoch}; lower optim.lr (now {lr_setting})")
    name, value = val_metric(ev, run.schema)
    return ev.loss, name, value


# ---- saving and reporting ---------------------------------------------------------------------------


def _keep(run: Run, epoch: int, value: float, model_cfg: ModelConfig, path: Path) -> None:
    run.best, run.best_epoch = value, epoch  # on every process: early stopping reads them
    if not run.main:
        return
    payload = best_payload(
        run.model, epoch=epoch, monitor=run.monitor, metric=value, dataset_key=run.dataset_key, model_cfg=model_cfg
    )
    atomic_save(payload, path)


def _save_resume(run: Run, epoch: int, metrics: dict[str, float], path: Path) -> bool:
    """Write `last.pt` (rank 0 alone, with every rank's generator states); whether this process wrote it."""
    ranks = None
    if run.world is not None:  # every rank takes part
        ranks = run.world.gather_objects({"rng": rng_states(run.device), "batch_rng": run.source.rng_state()})
    if not run.main:
        return False
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
    if ranks is not None:
        payload["rank_rng"] = ranks
    atomic_save(payload, path)
    return True


def _start(run: Run, prepared: Prepared, on_start: StartCallback | None) -> None:
    """`on_start(model, example)` on the writing process: the module itself (never its DDP or compiled twin)
    and two training rows prepared as the batches are, on the model's device; called in eval mode, without
    gradients and with the random states put back after it, so that it leaves the training as it was."""
    if on_start is None or not run.main:
        return
    prep = run.source.train.prep
    rows = prepared.split("train")[0][:2].to(run.device)
    example = prep(rows) if prep is not None else rows.float()  # not train=True: no random shifts drawn
    devices = [run.device.index or 0] if run.device.type == "cuda" else []
    was_training = run.model.training
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        run.model.eval()
        try:
            on_start(run.model, example)
        finally:
            run.model.train(was_training)


def _report(
    run: Run, epoch: int, metrics: dict[str, float], on_epoch: EpochCallback | None, on_model: ModelCallback | None
) -> None:
    """The writing process's hooks at the end of an epoch: its figures, then the model (the gradients of
    its last step still on the parameters)."""
    if not run.main:
        return
    if on_epoch is not None:
        on_epoch(epoch, metrics)
    if on_model is not None:
        on_model(epoch, run.model)


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
        processes=run.world.size if run.world is not None else 1,
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
    world: World | None = None,
    on_start: StartCallback | None = None,
    on_epoch_model: ModelCallback | None = None,
) -> TrainResult:
    """Train as the config says; write `best.pt` (the kept weights) and `last.pt` (everything needed
    to resume: model, optimizer, scheduler, GradScaler, epoch, RNG states, data key) into `out_dir`.

    With `resume_from`, continue after the epoch that checkpoint recorded; on the CPU the end result
    equals an uninterrupted run's. Hooks: `on_start(model, example)` once before the first epoch, then
    `on_checkpoint(path)` after each `last.pt` write, `on_epoch(epoch, metrics)`, `on_epoch_model(epoch, model)`.

    With a `world`, one of several processes (tasks/launch.py starts them): rank 0 alone writes and calls the hooks.
    """
    run = setup(prepared, model_cfg, optim_cfg, sched_cfg, train_cfg, resume_from, world)
    best_path, last_path = Path(out_dir) / "best.pt", Path(out_dir) / "last.pt"
    epochs, keep_last, every = run.epochs, train_cfg.keep == "last", train_cfg.checkpoint_every
    patience = train_cfg.early_stopping
    log_start(run, prepared, model_cfg.name, train_cfg)
    _start(run, prepared, on_start)
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
        saved = ((every and epoch % every == 0) or epoch == epochs or stop) and _save_resume(
            run, epoch, metrics, last_path
        )
        if saved and on_checkpoint is not None:
            on_checkpoint(last_path)
        # wall time of the epoch (steps, validation, checkpoint); the reads above synchronised the device
        run.history.append({"epoch": epoch, **metrics, "seconds": time.perf_counter() - epoch_start})
        log_epoch(epoch, epochs, metrics, name, ("  (kept)" if keep_last else "  (best)") if improved else "")
        _report(run, epoch, metrics, on_epoch, on_epoch_model)
        if stop:
            log_stop(run, epoch, stop)
            break
    return _result(run, best_path, time.perf_counter() - start, patience)
