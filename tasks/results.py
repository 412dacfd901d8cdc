"""What the stages hand each other: small typed records of URIs, paths, hashes and figures.

Never a live model, optimizer or loader (Prefect may hash or persist task inputs and results).
Torch-free, so the flow and the CLI can read them without importing the training code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class DatasetRef:
    """A prepared dataset: its cache key, its local folder and the identity of the data it came from."""

    key: str
    path: str
    content_hash: str
    source: str
    task: str
    split_sizes: dict[str, int]
    reused: bool
    uri: str = ""  # where the data was read from (data.path as given; a local path for MNIST)


@dataclass
class TrainResult:
    """The kept checkpoint and how training went."""

    checkpoint: str
    best_epoch: int
    best_metric: float
    monitor: str
    device: str
    precision: str
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    epochs: int = 0  # the epochs planned: train.epochs, or more for train.min_steps
    batch_size: int = 0  # train.batch_size, or the size `auto` chose
    stopped: str = ""  # why early stopping ended the run before `epochs`; "" when it did not
    processes: int = 1  # the training processes (DDP world size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Evaluation:
    """The test split's figures and the report files written beside them.

    `details` holds what metrics.json holds besides the metrics, the task and the checkpoint's
    epoch (classification: the confusion matrix and the per-class figures; regression: nothing);
    `files` names report files by role (metrics_json, confusion_matrix_csv, confusion_matrix_png,
    classification_report).
    """

    task: str
    metrics: dict[str, float]
    files: dict[str, str]
    checkpoint_epoch: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredUnit:
    """A run's artifacts as published: the unit's URI and name -> {uri, sha256}."""

    uri: str
    files: dict[str, dict[str, str]]

    def artifact_uris(self) -> dict[str, str]:
        """name -> URI of the files a user fetches (not the TensorBoard logs or the checkpoint)."""
        return {k: v["uri"] for k, v in self.files.items() if not k.startswith(("tensorboard/", "checkpoints/"))}

    def sha256s(self) -> dict[str, str]:
        """name -> sha256 of every file of the unit."""
        return {k: v["sha256"] for k, v in self.files.items()}


@dataclass(frozen=True)
class Published:
    """What the registry got: the logged model's URI ('' when not logged) and the champion decision."""

    mlflow_model: str = ""
    champion: dict[str, Any] | None = None
