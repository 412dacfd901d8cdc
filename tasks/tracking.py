"""Tracking behind one small interface: MLflow, TensorBoard, both, or nothing.

The training loop only sees `Tracker.log_metrics(metrics, step)`. MLflow is imported
lazily, so the training code runs where mlflow is not installed.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("trainyard.tracking")
_PARAM_MAX = 6000


class Tracker:
    """The null tracker; subclasses override what they support."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_image(self, tag: str, png_path: str, step: int = 0) -> None: ...

    def log_text(self, tag: str, text: str) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MultiTracker(Tracker):
    def __init__(self, *trackers: Tracker):
        self.trackers = [t for t in trackers if t is not None]

    def log_params(self, params):
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics, step=None):
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_image(self, tag, png_path, step=0):
        for t in self.trackers:
            t.log_image(tag, png_path, step)

    def log_text(self, tag, text):
        for t in self.trackers:
            t.log_text(tag, text)

    def close(self):
        for t in self.trackers:
            t.close()


class TensorBoardTracker(Tracker):
    """SummaryWriter with buffered writes: events are flushed every 30 s and on close."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = str(log_dir)
        self.writer = SummaryWriter(log_dir=self.log_dir, max_queue=1000, flush_secs=30)

    def log_params(self, params):
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
        self.writer.add_text("config", "| key | value |\n| --- | --- |\n" + rows)

    def log_metrics(self, metrics, step=None):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_image(self, tag, png_path, step=0):
        import matplotlib.image as mpimg

        image = mpimg.imread(png_path)  # HxWxC floats in [0, 1]
        self.writer.add_image(tag, image[..., :3], global_step=step, dataformats="HWC")

    def log_text(self, tag, text):
        self.writer.add_text(tag, text)

    def close(self):
        self.writer.close()


class MlflowTracker(Tracker):
    """Logs into one existing MLflow run by id; one `log_batch` call per `log_metrics`."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics, step=None):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_image(self, tag, png_path, step=0):
        self.client.log_artifact(self.run_id, png_path, artifact_path="plots")

    def log_text(self, tag, text):
        self.client.log_text(self.run_id, text, f"{safe_name(tag)}.txt")


def _param_value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text[:_PARAM_MAX]


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str) -> str:
    """A user-given name made safe as one path component (no separators, no '..')."""
    cleaned = _UNSAFE.sub("_", name).strip("._")
    return cleaned[:80] or "run"


# ---- the MLflow run's life --------------------------------------------------------------------


def start_run(tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            experiment_id = client.create_experiment(experiment)
        except Exception:  # another run created it meanwhile
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            experiment_id = exp.experiment_id
    else:
        experiment_id = exp.experiment_id
    run = client.create_run(experiment_id, run_name=run_name or None, tags=tags)
    return run.info.run_id


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def run_name_of(tracking_uri: str, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).get_run(run_id).info.run_name


def log_artifacts(tracking_uri: str, run_id: str, files: dict[str, str], artifact_path: str | None = None) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for path in files.values():
        client.log_artifact(run_id, path, artifact_path=artifact_path)


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking server must answer /health now; a database URI is opened when first used."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status != 200:
                raise TrackingUnavailable(f"MLflow server {tracking_uri} answered /health with HTTP {resp.status}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(f"MLflow server {tracking_uri} is unreachable ({reason}); start it or fix tracking.uri") from None


class TrackingUnavailable(RuntimeError):
    pass


def log_torch_model(
    tracking_uri: str, run_id: str, model, input_example, pip_requirements: list[str], registered_model_name: str = ""
) -> dict[str, str]:
    """Log the model (torch.export `pt2` format, with a signature inferred from the example) and register it."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    with torch.no_grad():
        output = model(torch.from_numpy(input_example)).numpy()
    signature = infer_signature(input_example, output)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=input_example,
            pip_requirements=pip_requirements,
            serialization_format="pt2",
            registered_model_name=registered_model_name or None,
        )
    version = getattr(info, "registered_model_version", None)
    return {"model_uri": info.model_uri, "version": str(version) if version is not None else ""}
