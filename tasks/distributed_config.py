"""The `train.distributed` section: how many processes train, on how many nodes, and how they meet
(read by tasks/launch.py, tasks/distributed.py and tasks/batching.py).

One process (the default) is the plain path: no launcher, no process group, no DDP wrapper.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.sections import Section

_ENDPOINT = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$")


class DistributedSection(Section):
    SECTION = "distributed"

    nproc_per_node: int | Literal["auto"] = Field(
        1,
        title="Processes per node",
        description="Training processes on each node, one per GPU on CUDA (auto: the visible GPUs; 1 without "
        "CUDA); on the CPU a number starts that many gloo processes. 1: one process, the plain path.",
    )
    nodes: int = Field(
        1,
        ge=1,
        le=1024,
        title="Nodes",
        description="Machines training together: more than one trains as a Kubeflow Trainer TrainJob on "
        "Kubernetes, or, with train.distributed.rdzv_endpoint, as a group the train step's node joins there and "
        "the other nodes join with torchrun (deploy/README.md). Needs an s3:// storage.uri.",
    )
    rdzv_endpoint: str = Field(
        "",
        title="Rendezvous endpoint",
        description="host:port where several nodes meet (c10d rendezvous): the train step's node waits there "
        "for the others, whose torchrun command it logs. Empty: one node meets on a free local port; several "
        "train as a TrainJob.",
    )
    rdzv_id: str = Field(
        "",
        title="Rendezvous id",
        description="The id the processes of one training meet under; empty: the MLflow run id.",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", title="Backend", description="Collective backend; auto: nccl on CUDA, gloo on the CPU."
    )
    max_restarts: int = Field(
        0,
        ge=0,
        le=100,
        title="Restarts",
        description="Times the launcher restarts all processes after one fails (e.g. killed); each restart "
        "resumes from the last checkpoint.",
    )
    timeout: float = Field(
        600.0,
        ge=10.0,
        le=86_400.0,
        title="Collective timeout",
        description="Seconds a collective (gradient all-reduce, metric gathering) may wait for the other "
        "processes before the run fails.",
    )
    batch: Literal["global", "per_process"] = Field(
        "global",
        title="Batch size is",
        description="global: train.batch_size is the batch of one optimizer step over all processes (each takes "
        "its share), so the learning rate needs no change; per_process: each process takes train.batch_size, "
        "the global batch grows with the processes and optim.lr follows train.distributed.lr_scaling.",
    )
    lr_scaling: Literal["linear", "sqrt", "none"] = Field(
        "linear",
        title="Learning-rate rule",
        description="With batch=per_process: optim.lr (and schedule.max_lr) times the number of processes "
        "(linear), its square root (sqrt), or unchanged (none).",
    )

    @field_validator("nproc_per_node")
    @classmethod
    def _nproc(cls, v: int | str) -> int | str:
        if v != "auto" and not 1 <= v <= 64:
            raise ValueError(f"expected auto or a number of processes from 1 to 64, got {v}")
        return v

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if v and not _ENDPOINT.match(v):
            raise ValueError(f"expected host:port (e.g. trainer-0:29400), got {v!r}")
        return v

    @model_validator(mode="after")
    def _lr_rule(self) -> DistributedSection:
        if self.batch == "global" and self.lr_scaling != "linear":
            raise ValueError(
                f"train.distributed.lr_scaling={self.lr_scaling!r} applies with batch=per_process only "
                "(a global batch keeps the learning rate); remove it or set that"
            )
        return self

    @property
    def single(self) -> bool:
        """The plain path: one process on one node, as the config says (auto may still find several GPUs)."""
        return self.nproc_per_node == 1 and self.nodes == 1

    def lr_factor(self, world_size: int) -> float:
        """What optim.lr is multiplied by at `world_size` processes."""
        if self.batch == "global" or self.lr_scaling == "none":
            return 1.0
        return float(world_size) if self.lr_scaling == "linear" else float(world_size) ** 0.5
