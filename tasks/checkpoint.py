"""Checkpoints: what `best.pt` and `last.pt` hold, how they are written and read back, and how a
run's checkpoints travel through a shared artifact store so that it can resume on another worker.

`best.pt` holds the kept weights; `last.pt` everything a resumed run needs to continue as if it
had never stopped (model, optimizer, scheduler, GradScaler, RNG states, the batch generators'
states) and the fingerprint of the data and settings that wrote it. Both load with
`weights_only=True`: plain types and tensors only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.config import ModelConfig
from tasks.errors import TrainingError
from tasks.graphstep import place_step_counters
from tasks.optim_config import OptimConfig, ScheduleConfig
from tasks.storage import ArtifactStore
from tasks.train_config import TrainSection

# Settings that change how a run executes, not what it computes: a resume may change them.
_EXECUTION_ONLY = {"progress", "device", "num_workers"}


# ---- files -------------------------------------------------------------------------------------


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


def fingerprint(
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    sched_cfg: ScheduleConfig,
    train_cfg: TrainSection,
    dataset_key: str,
    processes: int = 1,
) -> str:
    """What a checkpoint must match to be resumed: the data and every setting that shapes training
    (`processes`: how many train, which counts only where it sets the global batch)."""
    parts = {
        "data": dataset_key,
        "model": model_cfg.model_dump(mode="json"),
        "optim": optim_cfg.model_dump(mode="json"),
        "schedule": sched_cfg.model_dump(mode="json"),
        "train": train_cfg.model_dump(mode="json", exclude=_EXECUTION_ONLY | {"distributed"}),
    }
    # With a global batch, how many processes train and where they meet may change on a resume: the
    # optimiser sees the same batches. With a per-process batch the number of processes sets the global
    # batch and the learning rate, so it counts.
    if train_cfg.distributed.batch != "global":
        parts["distributed"] = {
            **train_cfg.distributed.model_dump(mode="json", include={"batch", "lr_scaling"}),
            "processes": processes,
        }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ---- random generators -------------------------------------------------------------------------


def rng_states(device: torch.device) -> dict[str, Any]:
    """Every random generator a resumed run must continue from (plain types: weights_only loads them)."""
    mt, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [mt, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
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


# ---- the two payloads ----------------------------------------------------------------------------


def best_payload(
    model: nn.Module, *, epoch: int, monitor: str, metric: float, dataset_key: str, model_cfg: ModelConfig
) -> dict[str, Any]:
    """`best.pt`: the kept weights, the epoch and metric that kept them, and the model section."""
    return {
        "model_state": model.state_dict(),
        "epoch": epoch,
        "monitor": monitor,
        "metric": metric,
        "dataset_key": dataset_key,
        "model": model_cfg.model_dump(),
    }


def resume_payload(
    *,
    fingerprint: str,
    dataset_key: str,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    best: float,
    best_epoch: int,
    history: list[dict[str, float]],
    device: torch.device,
    batch_rng: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """`last.pt`: everything a run resumed after `epoch` needs (`scheduler` None: no schedule)."""
    return {
        "kind": "resume",
        "fingerprint": fingerprint,
        "dataset_key": dataset_key,
        "epoch": epoch,
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict() if scheduler is not None else {},
        "scaler_state": scaler.state_dict(),
        "best": best,
        "best_epoch": best_epoch,
        "history": history,
        "rng": rng_states(device),
        "batch_rng": batch_rng,
    }


def load_resume_checkpoint(path: str | os.PathLike, expected: str) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete it to start over"
        ) from None
    if ck.get("kind") != "resume":
        raise TrainingError(f"checkpoint {path} is not a resume checkpoint (no optimizer or RNG state)")
    if ck.get("fingerprint") != expected:
        raise TrainingError(
            f"checkpoint {path} was written by a run with other data or settings "
            f"(dataset {str(ck.get('dataset_key', ''))[:12]}, fingerprint {str(ck.get('fingerprint', ''))[:12]}; "
            f"this run: fingerprint {expected[:12]}); refusing to resume from it"
        )
    return ck


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a saved optimizer state, keeping how this machine runs the step: the fused, foreach and
    capturable flags stay those the optimizer was built with here (a checkpoint written on the CPU
    would otherwise turn the fused CUDA kernels off), and the step counters move where they need."""
    flags = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags, strict=True):
        group.update(kept)
    place_step_counters(optimizer)


def restore_resume_state(
    ck: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    device: torch.device,
) -> None:
    """The mirror of `resume_payload`: model, optimizer, scheduler, GradScaler and RNG states back in
    place (the batch generators' states, `ck["batch_rng"]`, belong to the batch source)."""
    model.load_state_dict(ck["model_state"])
    load_optimizer_state(optimizer, ck["optimizer_state"])
    if scheduler is not None:
        scheduler.load_state_dict(ck["scheduler_state"])
    scaler.load_state_dict(ck["scaler_state"])
    set_rng_states(ck["rng"], device)


# ---- through a shared store ----------------------------------------------------------------------


def checkpoint_prefix(run_id: str) -> str:
    return f"checkpoints/{run_id}"


def publish_checkpoint(store: ArtifactStore, run_id: str, files: dict[str, Path]) -> None:
    """Upload a run's checkpoints (role -> file: `last`, to resume, and `best`, the weights kept so
    far) to a shared store as one unit, without ever losing the previous unit.

    An S3 upload replaces the object at its key, so each upload goes under new names and the
    unit's manifest, written last, switches to them; only then are the previous objects
    deleted. An upload or manifest that fails leaves the previous unit whole.
    """
    prefix = checkpoint_prefix(run_id)
    previous = store.read_manifest(prefix) or {}
    token = uuid.uuid4().hex[:12]
    named = {f"{role}-{token}.pt": str(path) for role, path in files.items() if Path(path).is_file()}
    store.publish(prefix, named)
    store.discard(prefix, [old for old in previous if old not in named])


def fetch_checkpoint(store: ArtifactStore, run_id: str, folder: Path) -> bool:
    """Copy the run's shared checkpoints (the ones its manifest names) into `folder` as
    `last.pt` and `best.pt`; False when the store holds none."""
    prefix = checkpoint_prefix(run_id)
    manifest = store.read_manifest(prefix)
    if not manifest:
        return False
    for name in manifest:
        role = name.split("-", 1)[0].removesuffix(".pt")
        store.fetch(f"{prefix}/{name}", folder / f"{role}.pt")
    return True
