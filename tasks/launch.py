"""Starting the training processes of one node with PyTorch's elastic launcher (the engine behind
`torchrun`): `elastic_launch`, a c10d rendezvous (standalone on a free local port for one node, at
train.distributed.rdzv_endpoint for several), restarts within train.distributed.max_restarts.

Nothing else forks training processes. Each process runs `entry(job)` under `_rank_main`, which sets
its logging up and, when it fails, leaves its error in a file so that the launching process can raise
the same one-line error; the launcher ends the other processes as soon as one fails.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tasks import errors
from tasks.distributed_config import DistributedSection
from tasks.errors import TrainingError

log = logging.getLogger("trainyard.train")


def processes_per_node(section: DistributedSection, device: str) -> int:
    """train.distributed.nproc_per_node as a number: auto is the visible GPUs on CUDA, else one process."""
    if section.nproc_per_node != "auto":
        return int(section.nproc_per_node)
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    return max(torch.cuda.device_count(), 1) if cuda else 1


@dataclass(frozen=True)
class LaunchPlan:
    """What the launcher starts on this node, and how the processes find each other."""

    nproc: int
    nodes: int
    rdzv_id: str
    endpoint: str = ""  # host:port; "" on one node: a standalone rendezvous on a free local port
    max_restarts: int = 0
    log_dir: str = ""  # the launcher's per-attempt folders (and the processes' error files)

    @classmethod
    def of(cls, section: DistributedSection, device: str, rdzv_id: str, log_dir: str | os.PathLike) -> LaunchPlan:
        nproc = processes_per_node(section, device)
        rdzv = section.rdzv_id or rdzv_id
        return cls(nproc, section.nodes, rdzv, section.rdzv_endpoint, section.max_restarts, str(log_dir))

    @property
    def world_size(self) -> int:
        return self.nproc * self.nodes


def _error_file(folder: str | os.PathLike, rank: int) -> Path:
    return Path(folder) / f"rank-{rank}-error.json"


def configure_rank_logging(rank: int) -> None:
    # A spawned process starts with logging unset: rank 0 reports as the one process would; the others warn.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("trainyard").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _rank_main(entry: Callable[[Any], Any], job: Any, error_dir: str) -> Any:
    """One training process: `entry(job)`; its error (kind and message) left in `error_dir` when it fails."""
    rank = int(os.environ.get("RANK", "0"))
    configure_rank_logging(rank)
    try:
        return entry(job)
    except BaseException as exc:
        record = {"kind": type(exc).__name__, "message": str(exc), "time": time.time()}
        path = _error_file(error_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record), encoding="utf-8")
        raise


def _first_error(error_dir: str, ranks: list[int]) -> tuple[int, dict[str, Any]] | None:
    """The earliest error a process left (the cause; the others' often follow from it)."""
    found = []
    for rank in ranks:
        path = _error_file(error_dir, rank)
        if path.is_file():
            found.append((json.loads(path.read_text(encoding="utf-8")), rank))
    if not found:
        return None
    record, rank = min(found, key=lambda item: item[0]["time"])
    return rank, record


def _error_kind(name: str) -> type[errors.TrainyardError]:
    kind = getattr(errors, name, None)
    return kind if isinstance(kind, type) and issubclass(kind, errors.TrainyardError) else TrainingError


def _failure(plan: LaunchPlan, error_dir: str, failures: dict[int, Any]) -> errors.TrainyardError:
    """One error for a failed group: the failing process's own error, or how it died."""
    where = f"training process rank {{rank}} of {plan.world_size}"
    first = _first_error(error_dir, sorted(failures))
    if first is not None:
        rank, record = first
        kind = _error_kind(record["kind"])
        if kind is not TrainingError or record["kind"] == "TrainingError":
            return kind(f"{record['message']} ({where.format(rank=rank)})")
        return TrainingError(f"{where.format(rank=rank)} failed: {record['kind']}: {record['message']}")
    rank = min(failures, key=lambda r: failures[r].timestamp)
    code = failures[rank].exitcode
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    restarts = f"after {plan.max_restarts} restarts (train.distributed.max_restarts)" if plan.max_restarts else ""
    return TrainingError(f"{where.format(rank=rank)} {how} {restarts}".rstrip())


def launch(plan: LaunchPlan, entry: Callable[[Any], Any], job: Any) -> Any:
    """Run `entry(job)` in `plan.nproc` processes on this node (of `plan.nodes`); rank 0's return value,
    or None when rank 0 runs on another node. A failure that outlasts the restarts raises one error;
    Ctrl-C or SIGTERM stops every process and raises KeyboardInterrupt."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    error_dir = str(Path(plan.log_dir) / "errors")
    shutil.rmtree(error_dir, ignore_errors=True)
    config = LaunchConfig(
        min_nodes=plan.nodes,
        max_nodes=plan.nodes,
        nproc_per_node=plan.nproc,
        run_id=plan.rdzv_id,
        role="trainer",
        rdzv_backend="c10d",
        rdzv_endpoint=plan.endpoint or "127.0.0.1:0",
        max_restarts=plan.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(Path(plan.log_dir) / "launcher")),
    )
    log.info("starting %d training processes on this node (%d in all)", plan.nproc, plan.world_size)
    try:
        results = elastic_launch(config, _rank_main)(entry, job, error_dir)
    except ChildFailedError as exc:
        raise _failure(plan, error_dir, exc.failures) from None
    except SignalException as exc:
        raise KeyboardInterrupt(f"training processes stopped by {exc.sigval.name}") from None
    return results.get(0)
