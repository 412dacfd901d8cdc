"""One training process's place among the others: its rank, the world size, and the few collectives
the training loop needs (summing an epoch's loss, gathering validation outputs, sharing a checkpoint).

A run of one process has no `World` (None): the loop calls none of this. A DDP run's every process
builds one from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK) with `World.join`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tasks.forward import EvalOutput

log = logging.getLogger("trainyard.train")


def launched() -> bool:
    """Whether this process was started by torch's launcher (torchrun, elastic_launch) as one of a group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def pick_backend(name: str, device: torch.device) -> str:
    """train.distributed.backend: auto is nccl on CUDA and gloo elsewhere."""
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return name


def _attempt_store(timeout: timedelta) -> dist.Store:
    """The launcher's store (env://), its keys prefixed by the restart: the launcher keeps one store
    across the restarts of a group, and a restarted process must not read the addresses its dead
    predecessors left there (it would try to connect to them and fail)."""
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    return dist.PrefixStore(f"trainyard/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


@dataclass(frozen=True)
class World:
    """This process's rank among `size`, its rank on its node, the backend, and where collectives run."""

    rank: int
    size: int
    local_rank: int
    backend: str
    device: torch.device  # the training device: cuda:<local_rank> with nccl

    @classmethod
    def join(cls, backend: str, device: torch.device, timeout: float) -> World:
        """Join the process group the launcher's environment describes (once per process)."""
        rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        backend = pick_backend(backend, device)
        if not dist.is_initialized():
            kwargs = {"device_id": device} if backend == "nccl" else {}
            wait = timedelta(seconds=timeout)
            store = _attempt_store(wait)
            dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=wait, **kwargs)
        return cls(rank, size, local, backend, device)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that checkpoints, logs and publishes."""
        return self.rank == 0

    @property
    def _comm(self) -> torch.device:
        # nccl moves CUDA tensors only; gloo, CPU tensors
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def sum(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Each value summed over all processes (scalars, in float64), on this process's device."""
        stacked = torch.stack([v.detach().to(self._comm, torch.float64).reshape(()) for v in values])
        dist.all_reduce(stacked)
        return [t.to(values[0].device) for t in stacked.unbind()]

    def max(self, value: torch.Tensor) -> torch.Tensor:
        out = value.detach().to(self._comm, torch.float64).reshape(1)
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out[0].to(value.device)

    def gather_strided(self, part: torch.Tensor, total: int) -> torch.Tensor:
        """The whole of a split of `total` rows from each rank's part, where rank r holds rows r, r+size, ...
        (`stride_rows`): every row once, in the split's order, on the CPU."""
        longest = -(-total // self.size)
        padded = torch.zeros((longest, *part.shape[1:]), dtype=part.dtype, device=self._comm)
        padded[: part.shape[0]] = part.to(self._comm)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        whole = torch.empty((total, *part.shape[1:]), dtype=part.dtype)
        for rank, got in enumerate(parts):
            rows = len(range(rank, total, self.size))
            whole[rank :: self.size] = got[:rows].cpu()
        return whole

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (each process's random generator states, say)."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a checkpoint read by rank 0 alone, say)."""
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, device=self._comm)
        return box[0]

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_seed(seed: int, world: World | None) -> int:
    """The seed of a rank's own random draws (dropout, augmentation): rank 0 keeps `seed`, as one process
    would; the others draw their own, so that their masks and shifts differ."""
    return seed if world is None else seed + 7919 * world.rank


def stride_rows(n: int, world: World | None) -> slice:
    """The rows of an n-row split that one rank takes: r, r+size, ... (all of them without a world)."""
    return slice(None) if world is None else slice(world.rank, n, world.size)


def padded_order(order: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's stride of an epoch's order, padded first (with its own head, as DistributedSampler
    does) so that every rank takes the same number of rows and steps."""
    n = order.shape[0]
    total = -(-n // world.size) * world.size
    if total > n:
        order = order.repeat(-(-total // n))[:total]
    return order[world.rank :: world.size]


def whole_split(ev: EvalOutput, world: World, rows: int) -> EvalOutput:
    """The whole validation split's loss, outputs and targets from each process's stride of it: every
    row once, in order, as one process would have them."""
    part = torch.tensor(float(ev.targets.shape[0]))
    total, count = world.sum(torch.tensor(ev.loss) * part, part)
    outputs, targets = world.gather_strided(ev.outputs, rows), world.gather_strided(ev.targets, rows)
    return EvalOutput(loss=float(total / max(count.item(), 1.0)), outputs=outputs, targets=targets)
