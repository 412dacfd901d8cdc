"""Train stage: one readable loop, with device and precision decided once at the top.

`train_model` is a plain function of a prepared dataset and the config sections it
needs; the Prefect task in pipelines/ only wires it. The best checkpoint (by the
validation metric; or the last one with train.keep=last) is written atomically and its
path returned.

The hot path: batches come from tasks/batching.py (device-resident tensors when they fit,
the DataLoader otherwise), bf16 autocast on CUDA, channels_last for conv nets, fused
Adam/AdamW/SGD on CUDA, torch.compile or the whole step as one CUDA graph (tasks/graphstep.py)
when asked. Nothing in the step loop reads a value
back to the host: the loss is summed on the device and read once per epoch, which is
also when the NaN check runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from models import build_model
from tasks.batching import make_batches
from tasks.errors import TrainingError
from tasks.lr_lambda import compile_lr_lambda
from tasks.prepared import Prepared

log = logging.getLogger("trainyard.train")

OPTIMIZER_CLASSES = {
    "sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "adadelta": "Adadelta", "adagrad": "Adagrad",
    "adamax": "Adamax", "asgd": "ASGD", "lbfgs": "LBFGS", "nadam": "NAdam", "radam": "RAdam",
    "rmsprop": "RMSprop", "rprop": "Rprop",
}  # fmt: skip
EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    checkpoint: str
    best_epoch: int
    best_metric: float
    monitor: str
    device: str
    precision: str
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- device and precision: decided once ---------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TrainingError("train.device is 'mps' but MPS is not available; use 'auto' or 'cpu'")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name in ("bf16", "fp16") and device.type != "cuda":
        log.warning("train.precision=%s needs CUDA; training in fp32 on %s", name, device.type)
        return "fp32"
    return name


def autocast_ctx(device: torch.device, precision: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast, or nothing for fp32; `cache=False` for steps recorded into a CUDA graph."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- loss, optimizer, scheduler ---------------------------------------------------------------


class SmoothedBCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """BCEWithLogits against targets pulled towards 1/2 by `label_smoothing`, as CrossEntropyLoss's
    label_smoothing does for two classes: 1 -> 1 - s/2, 0 -> s/2."""

    def __init__(self, label_smoothing: float):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(input, target * (1 - self.label_smoothing) + 0.5 * self.label_smoothing)


def loss_for(schema: dict[str, Any], label_smoothing: float = 0.0) -> nn.Module:
    """CrossEntropy for multi-class, BCEWithLogits for binary, MSE for regression (label smoothing
    applies to both classification losses)."""
    if schema["task"] == "regression":
        return nn.MSELoss()
    if schema.get("binary"):
        return SmoothedBCEWithLogitsLoss(label_smoothing) if label_smoothing else nn.BCEWithLogitsLoss()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


FUSED_OPTIMIZERS = ("adam", "adamw", "sgd")


def build_optimizer(params: Iterable[nn.Parameter], optim_cfg, device: torch.device | None = None) -> torch.optim.Optimizer:
    """The configured optimizer; on CUDA, Adam/AdamW/SGD use their fused kernels unless kwargs say otherwise."""
    if optim_cfg.name not in OPTIMIZER_CLASSES:
        raise TrainingError(f"unknown optimizer {optim_cfg.name!r}; valid: {', '.join(sorted(OPTIMIZER_CLASSES))}")
    cls = getattr(torch.optim, OPTIMIZER_CLASSES[optim_cfg.name])
    kwargs: dict[str, Any] = {"lr": optim_cfg.lr}
    if optim_cfg.weight_decay and optim_cfg.name not in ("lbfgs", "rprop"):
        kwargs["weight_decay"] = optim_cfg.weight_decay
    if optim_cfg.momentum and optim_cfg.name in ("sgd", "rmsprop"):
        kwargs["momentum"] = optim_cfg.momentum
    extra = {k: tuple(v) if isinstance(v, list) else v for k, v in optim_cfg.kwargs.items()}
    kwargs.update(extra)
    if (
        device is not None and device.type == "cuda" and optim_cfg.name in FUSED_OPTIMIZERS
        and not {"fused", "foreach", "differentiable"} & set(kwargs)
    ):  # fmt: skip
        kwargs["fused"] = True
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"optimizer {optim_cfg.name!r} refused its arguments {kwargs}: {exc}") from None


@dataclass
class Schedule:
    scheduler: Any
    when: str  # "epoch", "batch", "plateau" or "none"

    def step_batch(self) -> None:
        if self.when == "batch":
            self.scheduler.step()

    def step_epoch(self, val_metric: float) -> None:
        if self.when == "epoch":
            self.scheduler.step()
        elif self.when == "plateau":
            self.scheduler.step(val_metric)


def build_scheduler(optimizer, sched_cfg, optim_cfg, epochs: int, steps_per_epoch: int, maximize: bool) -> Schedule:
    S = torch.optim.lr_scheduler
    name = sched_cfg.name
    if name == "none":
        return Schedule(None, "none")
    if name == "lambda":
        return Schedule(S.LambdaLR(optimizer, compile_lr_lambda(sched_cfg.lr_lambda)), "epoch")
    if name == "step":
        return Schedule(S.StepLR(optimizer, step_size=sched_cfg.step_size, gamma=sched_cfg.gamma), "epoch")
    if name == "multistep":
        return Schedule(S.MultiStepLR(optimizer, milestones=list(sched_cfg.milestones), gamma=sched_cfg.gamma), "epoch")
    if name == "exponential":
        return Schedule(S.ExponentialLR(optimizer, gamma=sched_cfg.gamma), "epoch")
    if name == "cosine":
        t_max = sched_cfg.t_max or epochs
        return Schedule(S.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=sched_cfg.eta_min), "epoch")
    if name == "plateau":
        mode = "max" if maximize else "min"
        sched = S.ReduceLROnPlateau(optimizer, mode=mode, factor=sched_cfg.factor, patience=sched_cfg.patience)
        return Schedule(sched, "plateau")
    if name == "onecycle":
        max_lr = sched_cfg.max_lr or optim_cfg.lr
        total = epochs * steps_per_epoch
        if total < 4:
            raise TrainingError(
                f"schedule onecycle needs at least 4 optimizer steps, this run has {total} "
                f"({epochs} epochs x {steps_per_epoch} batches); use more epochs, a smaller batch or another schedule"
            )
        # Each phase needs two steps or OneCycleLR divides by zero; only matters for very short runs.
        pct_start = min(max(sched_cfg.pct_start, 2 / total), 1 - 2 / total)
        # The momentum (or Adam's beta1) is cycled against the learning rate where the optimizer has
        # one and the config asks for it (PyTorch's default); Adagrad, Adadelta, ASGD, Rprop and LBFGS
        # have none, and cycle the learning rate only.
        has_momentum = "momentum" in optimizer.defaults or "betas" in optimizer.defaults
        cycle = getattr(sched_cfg, "cycle_momentum", True) and has_momentum
        base_m, max_m = getattr(sched_cfg, "base_momentum", 0.85), getattr(sched_cfg, "max_momentum", 0.95)
        if cycle:
            log.info(
                "onecycle: momentum (beta1) cycles between %g and %g in place of the optimizer's own "
                "(schedule.cycle_momentum=false keeps it)", base_m, max_m,
            )  # fmt: skip
        sched = S.OneCycleLR(
            optimizer, max_lr=max_lr, epochs=epochs, steps_per_epoch=steps_per_epoch, pct_start=pct_start,
            cycle_momentum=cycle, base_momentum=base_m, max_momentum=max_m,
        )  # fmt: skip
        return Schedule(sched, "batch")
    raise TrainingError(
        f"unknown scheduler {name!r}; valid: none, lambda, step, multistep, exponential, cosine, plateau, onecycle"
    )


# ---- forward helpers ------------------------------------------------------------------------


def _shape_output(out: torch.Tensor, schema: dict[str, Any]) -> torch.Tensor:
    # Binary and regression heads have one output; their losses want shape [N].
    return out.squeeze(-1) if schema["output_size"] == 1 else out


def batch_loss(forward, loss_fn, schema, device, precision, x: torch.Tensor, y: torch.Tensor, cache: bool = True) -> torch.Tensor:
    """One batch's training loss: the forward pass under autocast, the loss in float32 (`cache=False`
    for a step recorded into a CUDA graph)."""
    with autocast_ctx(device, precision, cache=cache):
        out = _shape_output(forward(x), schema)
    return loss_fn(out.float(), y)


def is_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


@dataclass
class EvalOutput:
    loss: float
    outputs: torch.Tensor  # float32 on the CPU
    targets: torch.Tensor


@torch.no_grad()
def evaluate_split(model, loader, loss_fn, schema, device, precision, channels_last: bool = False) -> EvalOutput:
    """Loss, outputs and targets over a split: model.eval() and no_grad(), read once at the end."""
    model.eval()
    total = torch.zeros((), device=device)
    outs, targets = [], []
    n = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_ctx(device, precision):
            out = _shape_output(model(x), schema)
        out = out.float()
        total += loss_fn(out, y) * y.shape[0]
        n += y.shape[0]
        outs.append(out)
        targets.append(y)
    return EvalOutput(
        loss=float(total.item() / max(n, 1)),
        outputs=torch.cat(outs).cpu() if outs else torch.empty(0),
        targets=torch.cat(targets).cpu() if targets else torch.empty(0),
    )


def predictions(outputs: torch.Tensor, schema: dict[str, Any]) -> torch.Tensor:
    if schema.get("binary"):
        return (outputs > 0).long()
    return outputs.argmax(dim=-1)


def val_metric(ev: EvalOutput, schema: dict[str, Any]) -> tuple[str, float]:
    if schema["task"] == "classification":
        correct = (predictions(ev.outputs, schema) == ev.targets.long()).float().mean()
        return "val/accuracy", float(correct)
    return "val/loss", ev.loss


# ---- checkpoints ----------------------------------------------------------------------------


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary name in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_weights(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def fingerprint(model_cfg, optim_cfg, sched_cfg, train_cfg, dataset_key: str) -> str:
    """What a checkpoint must match to be resumed: the data and every setting that shapes training."""
    import hashlib
    import json

    parts = {
        "data": dataset_key,
        "model": model_cfg.model_dump(mode="json"),
        "optim": optim_cfg.model_dump(mode="json"),
        "schedule": sched_cfg.model_dump(mode="json"),
        "train": train_cfg.model_dump(mode="json", exclude={"progress", "device", "num_workers"}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def rng_states(device: torch.device) -> dict[str, Any]:
    """Every random generator a resumed run must continue from (plain types: weights_only loads them)."""
    mt, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [mt, keys.tolist(), pos, has_gauss, gauss],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    mt, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((mt, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a saved optimizer state, keeping how this machine runs the step: the fused, foreach and
    capturable flags stay those the optimizer was built with here (a checkpoint written on the CPU
    would otherwise turn the fused CUDA kernels off), and the step counters move where they need."""
    from tasks.graphstep import place_step_counters

    flags = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)
    place_step_counters(optimizer)


def load_resume_checkpoint(path: str | os.PathLike, expected: str) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete it to start over") from None
    if ck.get("kind") != "resume":
        raise TrainingError(f"checkpoint {path} is not a resume checkpoint (no optimizer or RNG state)")
    if ck.get("fingerprint") != expected:
        raise TrainingError(
            f"checkpoint {path} was written by a run with other data or settings "
            f"(dataset {str(ck.get('dataset_key', ''))[:12]}, fingerprint {str(ck.get('fingerprint', ''))[:12]}; "
            f"this run: fingerprint {expected[:12]}); refusing to resume from it"
        )
    return ck


# ---- the loop ---------------------------------------------------------------------------------


def _compiled(model: nn.Module, train_cfg) -> nn.Module:
    mode = getattr(train_cfg, "compile_mode", "default")
    log.info("compiling the model (torch.compile, mode %s); the first steps include compile time", mode)
    return torch.compile(model, mode=mode, dynamic=False)


def _cudagraph_step_marker(train_cfg, device: torch.device) -> Callable[[], None]:
    """With CUDA graphs (compile_mode reduce-overhead), each training step begins a new graph step."""
    if getattr(train_cfg, "compile", False) and device.type == "cuda" and train_cfg.compile_mode == "reduce-overhead":
        return torch.compiler.cudagraph_mark_step_begin
    return lambda: None


def _graphed_step(model, forward, loss_fn, optimizer, schema, device, precision, train_cfg):
    """The CUDA-graph step of train.cuda_graph, or None where it does not apply (not on CUDA)."""
    if not getattr(train_cfg, "cuda_graph", False):
        return None
    if device.type != "cuda":
        log.warning("train.cuda_graph needs CUDA; training eagerly on %s", device.type)
        return None
    import functools

    from tasks.graphstep import GraphedStep

    compute_loss = functools.partial(batch_loss, forward, loss_fn, schema, device, precision, cache=False)
    log.info("train.cuda_graph: the training step is recorded once as a CUDA graph and replayed per batch")
    return GraphedStep(model.parameters(), compute_loss, optimizer, device, train_cfg.batch_size, train_cfg.grad_clip)


def _progress(loader, epoch: int, epochs: int, mode: str):
    use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
    if not use_bar:
        return loader, None
    from tqdm.auto import tqdm

    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False, file=sys.stderr, unit="batch")
    return bar, bar


def train_model(
    prepared: Prepared,
    model_cfg,
    optim_cfg,
    sched_cfg,
    train_cfg,
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
    schema = prepared.schema
    out_dir = Path(out_dir)
    if getattr(train_cfg, "cuda_graph", False):  # refused on any device, before any work
        from tasks.train_config import cuda_graph_refusal

        reason = cuda_graph_refusal(optim_cfg, sched_cfg, train_cfg)
        if reason:
            raise TrainingError(reason)
    seed_everything(train_cfg.seed)
    device = pick_device(train_cfg.device)
    precision = pick_precision(getattr(train_cfg, "precision", "auto"), device)
    model = build_model(model_cfg.name, schema, model_cfg).to(device)
    channels_last = device.type == "cuda" and is_conv(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The compiled module shares the parameters; checkpoints and validation use `model` itself.
    forward = _compiled(model, train_cfg) if getattr(train_cfg, "compile", False) else model
    mark_step = _cudagraph_step_marker(train_cfg, device)

    source = make_batches(prepared, train_cfg, device, channels_last=channels_last)
    train_loader, val_loader = source.train, source.val
    train_rows, val_rows = prepared.tensors["y_train"].shape[0], prepared.tensors["y_val"].shape[0]

    loss_fn = loss_for(schema, train_cfg.label_smoothing if schema["task"] == "classification" else 0.0)
    eval_loss_fn = loss_for(schema)
    optimizer = build_optimizer(model.parameters(), optim_cfg, device)
    maximize = schema["task"] == "classification"
    schedule = build_scheduler(optimizer, sched_cfg, optim_cfg, train_cfg.epochs, len(train_loader), maximize)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    is_lbfgs = optim_cfg.name == "lbfgs"
    keep_last = getattr(train_cfg, "keep", "best") == "last"

    monitor = "val/accuracy" if maximize else "val/loss"
    best = -math.inf if maximize else math.inf
    best_epoch = 0
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    history: list[dict[str, float]] = []
    every = getattr(train_cfg, "checkpoint_every", 1)
    print_key = fingerprint(model_cfg, optim_cfg, sched_cfg, train_cfg, schema.get("key", ""))
    first_epoch = 1
    if resume_from is not None:
        ck = load_resume_checkpoint(resume_from, print_key)
        model.load_state_dict(ck["model_state"])
        load_optimizer_state(optimizer, ck["optimizer_state"])
        if schedule.scheduler is not None:
            schedule.scheduler.load_state_dict(ck["scheduler_state"])
        scaler.load_state_dict(ck["scaler_state"])
        best, best_epoch, history = ck["best"], ck["best_epoch"], list(ck["history"])
        set_rng_states(ck["rng"], device)
        source.set_rng_state(ck["batch_rng"])
        first_epoch = ck["epoch"] + 1
        log.info("resuming from %s after epoch %d", resume_from, ck["epoch"])
    graphed = _graphed_step(model, forward, loss_fn, optimizer, schema, device, precision, train_cfg)
    log.info(
        "training %s on %s (%s) for %d epochs: %d train / %d val rows",
        model_cfg.name, device, precision, train_cfg.epochs, train_rows, val_rows,
    )  # fmt: skip
    start = time.perf_counter()
    for epoch in range(first_epoch, train_cfg.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        lr = float(optimizer.param_groups[0]["lr"])  # a device tensor with train.cuda_graph
        total = torch.zeros((), device=device)  # summed on the device, read once per epoch
        first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step, likewise
        seen = 0
        step = 0
        batches, bar = _progress(train_loader, epoch, train_cfg.epochs, train_cfg.progress)
        if graphed is not None:
            graphed.begin_epoch()
        for x, y in batches:  # already on the device, normalised, in the model's memory format
            if graphed is not None:
                graphed(x, y)
                schedule.step_batch()
                continue
            mark_step()
            if is_lbfgs:

                def closure() -> torch.Tensor:
                    optimizer.zero_grad(set_to_none=True)
                    batch_loss = loss_fn(_shape_output(forward(x), schema).float(), y)
                    batch_loss.backward()
                    return batch_loss

                loss = optimizer.step(closure)
            else:
                optimizer.zero_grad(set_to_none=True)
                loss = batch_loss(forward, loss_fn, schema, device, precision, x, y)
                scaler.scale(loss).backward()
                if train_cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            schedule.step_batch()
            step += 1
            loss = loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            total += loss * y.shape[0]
            seen += y.shape[0]
        if bar is not None:
            bar.close()
        if graphed is not None:
            train_loss, bad_step, step = graphed.end_epoch()
        else:
            train_loss = float(total.item() / max(seen, 1))
            bad_step = int(first_bad.item())
        if bad_step > 0 or not math.isfinite(train_loss):
            raise TrainingError(
                f"training loss became {train_loss} in epoch {epoch} (first at step {bad_step} of {step}); "
                f"lower optim.lr (now {optim_cfg.lr}) or set train.grad_clip; no model is registered from this run"
            )
        ev = evaluate_split(model, val_loader, eval_loss_fn, schema, device, precision, channels_last)
        if not math.isfinite(ev.loss):
            raise TrainingError(f"validation loss became {ev.loss} in epoch {epoch}; lower optim.lr (now {optim_cfg.lr})")
        metrics = {"train/loss": train_loss, "val/loss": ev.loss, "lr": lr}
        name, value = val_metric(ev, schema)
        metrics[name] = value
        schedule.step_epoch(value)
        improved = value > best if maximize else value < best
        if keep_last:
            improved = epoch == train_cfg.epochs
        if improved:
            best, best_epoch = value, epoch
            atomic_save(
                {"model_state": model.state_dict(), "epoch": epoch, "monitor": monitor, "metric": value,
                 "dataset_key": schema.get("key", ""), "model": model_cfg.model_dump()},
                best_path,
            )  # fmt: skip
        if (every and epoch % every == 0) or epoch == train_cfg.epochs:
            atomic_save(
                {"kind": "resume", "fingerprint": print_key, "dataset_key": schema.get("key", ""), "epoch": epoch,
                 "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                 "scheduler_state": schedule.scheduler.state_dict() if schedule.scheduler is not None else {},
                 "scaler_state": scaler.state_dict(), "best": best, "best_epoch": best_epoch,
                 "history": history + [{"epoch": epoch, **metrics}], "rng": rng_states(device),
                 "batch_rng": source.rng_state()},
                last_path,
            )  # fmt: skip
            if on_checkpoint is not None:
                on_checkpoint(last_path)
        # wall time of the epoch (steps, validation, checkpoint); the reads above synchronised the device
        history.append({"epoch": epoch, **metrics, "seconds": time.perf_counter() - epoch_start})
        log.info(
            "epoch %d/%d  train/loss %.4f  val/loss %.4f  %s %.4f  lr %.3g%s",
            epoch, train_cfg.epochs, train_loss, ev.loss, name, value, lr,
            ("  (kept)" if keep_last else "  (best)") if improved else "",
        )  # fmt: skip
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    if graphed is not None:
        log.info("train.cuda_graph: %d steps replayed from the graph, %d eager", graphed.replays, graphed.eager_steps)
    return TrainResult(
        checkpoint=str(best_path),
        best_epoch=best_epoch,
        best_metric=best,
        monitor=monitor,
        device=str(device),
        precision=precision,
        seconds=time.perf_counter() - start,
        history=history,
    )
