"""The training section: epochs, batches, device, precision, checkpoints (read by tasks/train.py,
tasks/runtime.py and tasks/batching.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from tasks.distributed_config import DistributedSection
from tasks.sections import Section

if TYPE_CHECKING:
    from tasks.optim_config import OptimConfig, ScheduleConfig


MAX_EPOCHS = 10_000


class TrainSection(Section):
    SECTION = "train"

    epochs: int = Field(
        5,
        ge=1,
        le=MAX_EPOCHS,
        title="Epochs",
        description="Passes over the training split (the least number when train.min_steps asks for more).",
    )
    min_steps: int = Field(
        0,
        ge=0,
        le=10_000_000,
        title="Least optimizer steps",
        description="The run trains for at least this many optimizer steps: when train.epochs times the batches "
        "per epoch falls short (a small table), it trains for as many more whole epochs as reach it. Schedules "
        "(cosine, onecycle, lambda) see that epoch count. 0: train.epochs as set. A preset's value does not "
        "follow a train.epochs you set.",
    )
    batch_size: int | Literal["auto"] = Field(
        64,
        title="Batch size",
        description="Training batch size; auto: sized from the training rows (about rows/32, a power of two "
        "from 32 to 256), decided when training starts and logged then.",
    )
    early_stopping: int = Field(
        0,
        ge=0,
        le=MAX_EPOCHS,
        title="Early stopping patience",
        description="Stop after this many epochs without improvement of the validation metric (val/accuracy, "
        "val/loss for regression); the best epoch's weights are kept. 0: off. Needs train.keep=best. A preset's "
        "value does not follow a train.epochs you set.",
    )
    eval_batch_size: int = Field(1024, ge=1, title="Eval batch size", description="Batch size for val/test.")
    num_workers: int = Field(0, ge=0, le=64, title="Loader workers", description="DataLoader worker processes.")
    shuffle: bool = Field(True, title="Shuffle", description="Shuffle the training split every epoch.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", title="Device", description="auto: cuda, then mps, then cpu."
    )
    seed: int = Field(0, ge=0, title="Seed", description="Seed of weights, shuffling and dropout.")
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        title="Label smoothing",
        description="Classification: targets pulled towards uniform (binary: 1 -> 1-s/2, 0 -> s/2).",
    )
    grad_clip: float = Field(0.0, ge=0.0, title="Gradient clipping", description="Max gradient norm; 0 disables.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", title="Precision", description="auto: bf16 autocast on CUDA, fp32 elsewhere; fp16 uses a GradScaler."
    )
    progress: Literal["auto", "bar", "log"] = Field(
        "auto", title="Progress", description="auto: a bar on a terminal, log lines otherwise."
    )
    gpu_resident: Literal["auto", "on", "off"] = Field(
        "auto",
        title="Device-resident data",
        description="auto: on CUDA, keep the train/val tensors on the device when they fit gpu_memory_share and "
        "cut batches there; on: the same on any device (cpu included); off: always the DataLoader.",
    )
    gpu_memory_share: float = Field(
        0.5, gt=0.0, le=1.0, title="Device memory share", description="Largest share of device memory the data may use."
    )
    augment: Literal["none", "shift"] = Field(
        "none", title="Augmentation", description="shift: random translations of image batches, done on the device."
    )
    shift_pixels: int = Field(2, ge=1, le=8, title="Shift pixels", description="Largest shift of augment=shift.")
    compile: bool = Field(False, title="torch.compile", description="Compile the model with torch.compile.")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", title="Compile mode", description="torch.compile mode; reduce-overhead uses CUDA graphs."
    )
    cuda_graph: bool = Field(
        False,
        title="CUDA graph step",
        description="CUDA: record the whole training step (forward, backward, optimizer) once as a CUDA graph "
        "and replay it for each full batch, for small models bound by kernel launches. Needs optim adam, adamw "
        "or sgd, precision auto/bf16/fp32, compile off, and with onecycle cycle_momentum=false. Ignored with a "
        "warning elsewhere.",
    )
    checkpoint_every: int = Field(
        1,
        ge=0,
        le=10_000,
        title="Checkpoint every",
        description="Epochs between resume checkpoints (model, optimizer, scheduler, RNG states); 0: only at the end.",
    )
    keep: Literal["best", "last"] = Field(
        "best",
        title="Checkpoint kept",
        description="best: the epoch with the best validation metric; last: the final epoch (e.g. with onecycle).",
    )
    monitor: Literal["auto", "loss"] = Field(
        "auto",
        title="Validation metric",
        description="What picks the best epoch, drives early stopping and the plateau schedule: auto: val/accuracy "
        "for classification, val/loss for regression; loss: val/loss for both (smoother than the accuracy of a "
        "small validation split).",
    )

    distributed: DistributedSection = Field(
        default_factory=DistributedSection,
        title="Distributed training",
        description="Several processes (GPUs) or nodes with DistributedDataParallel; one process by default.",
    )

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v: int | str) -> int | str:
        if v != "auto" and not 1 <= v <= 1_000_000:
            raise ValueError(f"expected auto or a batch size from 1 to 1,000,000, got {v}")
        return v

    @field_validator("gpu_resident", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        # YAML reads a bare on/off as a boolean: `--set train.gpu_resident=on` arrives as True.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _applies(self) -> TrainSection:
        # Keys that tune a switch left off are refused when set away from their default, as
        # Section._applies does for the keys a choice does not read.
        for key, on, needs in (
            ("compile_mode", self.compile, "train.compile=true"),
            ("shift_pixels", self.augment == "shift", "train.augment=shift"),
            ("gpu_memory_share", self.gpu_resident != "off", "train.gpu_resident auto or on"),
            ("early_stopping", self.keep == "best", "train.keep=best"),
        ):
            default = type(self).model_fields[key].default
            if not on and getattr(self, key) != default:
                raise ValueError(f"train.{key}={getattr(self, key)!r} applies with {needs} only; remove it or set that")
        if not self.distributed.single:
            for key in ("cuda_graph", "compile"):
                if getattr(self, key):
                    raise ValueError(
                        f"train.{key}=true does not work with several training processes "
                        "(train.distributed.nproc_per_node auto or above 1, or nodes above 1); set one of them back"
                    )
        return self


def maximizes(task: str, monitor: str) -> bool:
    """Whether a run's monitored validation metric is val/accuracy, maximised (classification with
    train.monitor=auto), rather than val/loss, minimised."""
    return task == "classification" and monitor == "auto"


def cuda_graph_refusal(optim_cfg: OptimConfig, sched_cfg: ScheduleConfig, train_cfg: TrainSection) -> str:
    """Why a run with these settings cannot record its step into a CUDA graph; "" when it can."""
    optim, kwargs, precision = optim_cfg.name, optim_cfg.kwargs, train_cfg.precision
    compile, schedule, cycle_momentum = train_cfg.compile, sched_cfg.name, sched_cfg.cycle_momentum
    if optim not in ("adam", "adamw", "sgd"):
        return f"train.cuda_graph needs optim.name adam, adamw or sgd (a capturable step); got {optim!r}"
    if kwargs.get("differentiable"):
        return "train.cuda_graph does not work with optim.kwargs differentiable=true; remove it"
    # SGD's only step that reads a tensor learning rate on the device is the fused one.
    if optim == "sgd" and (kwargs.get("foreach") or kwargs.get("fused") is False):
        return (
            "train.cuda_graph with optim.name=sgd needs its fused step: remove foreach/fused=false from optim.kwargs "
            "(the other SGD steps read the learning rate on the host)"
        )
    if precision == "fp16":
        return (
            "train.cuda_graph does not work with train.precision=fp16 (its GradScaler step is not recorded into "
            "a graph here); use bf16 or fp32"
        )
    if compile:
        return (
            "train.cuda_graph and train.compile exclude each other; for torch.compile's own CUDA graphs set "
            "train.compile_mode=reduce-overhead and train.cuda_graph=false"
        )
    if schedule == "onecycle" and cycle_momentum:
        return (
            "train.cuda_graph cannot cycle the momentum (Adam's beta1 and SGD's momentum are fixed inside the "
            "graph); set schedule.cycle_momentum=false"
        )
    return ""
