"""The run context: where one training run tracks, stores and writes, handed to every step.

One value instead of a run id, two URIs and two folders passed separately (and as strings) to
each step. Steps read it; none changes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.config import TrainConfig
from tasks import tracking
from tasks.storage import ArtifactStore, open_store


@dataclass(frozen=True)
class RunContext:
    """The MLflow run a flow run logs into, and the places its files go.

    run_dir: the run's scratch folder (checkpoints until the run finishes, evaluation reports).
    tb_dir: its TensorBoard folder. state: the state folder (prepared datasets, the default stores).
    """

    run_id: str
    run_name: str
    run_dir: Path
    tb_dir: Path
    tracking_uri: str
    storage_uri: str
    state: Path

    @property
    def checkpoint_dir(self) -> Path:
        """Where training writes `last.pt` (to resume) and `best.pt` (the weights kept)."""
        return self.run_dir / "checkpoints"


def run_context(cfg: TrainConfig, state: Path, tracking_uri: str, storage_uri: str, run_id: str) -> RunContext:
    """The context of MLflow run `run_id`: its name from MLflow, its folders under the state folder."""
    run_name = tracking.run_name_of(tracking_uri, run_id)
    experiment = tracking.safe_name(cfg.tracking.experiment)
    tb_dir = state / "tensorboard" / experiment / f"{tracking.safe_name(run_name)}-{run_id[:8]}"
    return RunContext(run_id, run_name, state / "runs" / run_id, tb_dir, tracking_uri, storage_uri, state)


def store_for(cfg: TrainConfig, storage_uri: str) -> ArtifactStore:
    """The artifact store at `storage_uri`, with the config's endpoint and retry settings."""
    return open_store(storage_uri, endpoint_url=cfg.storage.endpoint_url, max_attempts=cfg.storage.max_attempts)


def trackers(cfg: TrainConfig, ctx: RunContext) -> tracking.Tracker:
    """The run's MLflow tracker, and TensorBoard's when the config has it on, behind one tracker."""
    tb = tracking.TensorBoardTracker(ctx.tb_dir) if cfg.tracking.tensorboard else None
    mlflow = tracking.MlflowTracker(ctx.tracking_uri, ctx.run_id, flush_timeout=cfg.tracking.flush_timeout)
    return tracking.MultiTracker(mlflow, tb)
