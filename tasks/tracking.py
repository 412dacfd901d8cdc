"""Tracking behind one small interface: MLflow, TensorBoard, both, or nothing.

The training loop only sees `Tracker.log_metrics(metrics, step)`. MLflow is imported
lazily, so the training code runs where mlflow is not installed. Public MLflow APIs only:
the start-up tuning (pipelines/startup.py) passes in its faster variants where it has them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.errors import TrackingUnavailable

log = logging.getLogger("trainyard.tracking")
_PARAM_MAX = 6000


class Tracker:
    """The null tracker; subclasses override what they support."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_image(self, tag: str, png_path: str, step: int = 0) -> None: ...

    def log_text(self, tag: str, text: str) -> None: ...

    def log_graph(self, model: Any, example: Any) -> None: ...

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None: ...

    def log_histograms(self, model: Any, step: int) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MultiTracker(Tracker):
    """Every call to each of its trackers (None ones left out)."""

    def __init__(self, *trackers: Tracker | None):
        self.trackers = [t for t in trackers if t is not None]

    def log_metrics(self, metrics, step=None):
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_image(self, tag, png_path, step=0):
        for t in self.trackers:
            t.log_image(tag, png_path, step)

    def log_text(self, tag, text):
        for t in self.trackers:
            t.log_text(tag, text)

    def log_graph(self, model, example):
        for t in self.trackers:
            t.log_graph(model, example)

    def log_hparams(self, hparams, metrics):
        for t in self.trackers:
            t.log_hparams(hparams, metrics)

    def log_histograms(self, model, step):
        for t in self.trackers:
            t.log_histograms(model, step)

    def close(self):
        errors = []
        for t in self.trackers:
            try:
                t.close()
            except Exception as exc:  # close the others (TensorBoard flushes its files) before reporting
                errors.append(exc)
        if errors:
            raise errors[0]


class TensorBoardTracker(Tracker):
    """SummaryWriter with buffered writes (flushed every 30 s and on close); the graph, HParams, histograms too."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = str(log_dir)
        self.writer = SummaryWriter(log_dir=self.log_dir, max_queue=1000, flush_secs=30)

    def log_metrics(self, metrics, step=None):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_image(self, tag, png_path, step=0):
        import matplotlib.image as mpimg

        image = mpimg.imread(png_path)  # HxWxC floats in [0, 1]
        self.writer.add_image(tag, image[..., :3], global_step=step, dataformats="HWC")

    def log_text(self, tag, text):
        self.writer.add_text(tag, text)

    def log_graph(self, model, example):
        """The model's graph, traced with `example`; a model the tracer cannot follow gets one warning line."""
        try:  # kept off the log: the tracer's warnings, and the error it prints before raising it
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(action="ignore"):
                self.writer.add_graph(model, example)
        except Exception as exc:
            why = (str(exc).strip().splitlines() or [""])[0][:200]
            log.warning("TensorBoard: no model graph, the model could not be traced (%s: %s)", type(exc).__name__, why)

    def log_hparams(self, hparams, metrics):
        """The HParams summary into this run's folder, beside the scalars of `metrics` (add_hparams: a sub-folder)."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        for summary in hparams_summaries(hparams, metrics):
            self.writer._get_file_writer().add_summary(summary)

    def log_histograms(self, model, step):
        for name, param in model.named_parameters():
            self.writer.add_histogram(f"weights/{name}", param.detach(), global_step=step)
            if param.grad is not None:
                self.writer.add_histogram(f"gradients/{name}", param.grad.detach(), global_step=step)

    def close(self):
        self.writer.close()


class MlflowTracker(Tracker):
    """Logs into one existing MLflow run by id; one `log_batch` call per `log_metrics`.

    When the server is unreachable, metrics are kept in a buffer and sent with the next
    call; `close()` waits at most `flush_timeout` seconds for the server to come back,
    then raises TrackingUnavailable naming the epochs that were not recorded.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_timeout: float = 120.0, retry_every: float = 2.0):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.flush_timeout = flush_timeout
        self.retry_every = retry_every
        self.pending: list[Any] = []

    def log_metrics(self, metrics, step=None):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step or 0) for k, v in metrics.items())
        try:
            self._flush()
        except Exception as exc:  # the server went away: keep the metrics, try again later
            if not _is_unreachable(exc):
                raise
            why, n = type(exc).__name__, len(self.pending)
            log.warning("MLflow server %s unreachable (%s); %d metric values buffered", self.tracking_uri, why, n)

    def _flush(self) -> None:
        while self.pending:
            batch = self.pending[:1000]
            self.client.log_batch(self.run_id, metrics=batch)
            del self.pending[: len(batch)]

    def close(self) -> None:
        deadline = time.monotonic() + self.flush_timeout
        while self.pending:
            try:
                self._flush()
                log.info("buffered metrics sent to MLflow")
            except Exception as exc:
                if not _is_unreachable(exc):
                    raise
                if time.monotonic() >= deadline:
                    steps = sorted({m.step for m in self.pending})
                    raise TrackingUnavailable(
                        f"MLflow server {self.tracking_uri} stayed unreachable for {self.flush_timeout:.0f} s; "
                        f"metrics of steps {steps} of run {self.run_id} were not recorded"
                    ) from None
                time.sleep(self.retry_every)

    def log_image(self, tag, png_path, step=0):
        self.client.log_artifact(self.run_id, png_path, artifact_path="plots")

    # No log_text: texts (the config as TensorBoard shows it) are TensorBoard's; MLflow has the
    # config as params and as the config.yaml artifact.


def _param_value(v: Any) -> str:
    """A param's text: lists and dicts as JSON, cut to what MLflow keeps."""
    text = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text[:_PARAM_MAX]


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str) -> str:
    """A user-given name made safe as one path component (no separators, no '..')."""
    cleaned = _UNSAFE.sub("_", name).strip("._")
    return cleaned[:80] or "run"


# ---- the MLflow run's life --------------------------------------------------------------------


def sqlite_path(tracking_uri: str) -> str:
    """The file of a sqlite:/// tracking URI; '' for any other URI."""
    return tracking_uri[len("sqlite:///") :] if tracking_uri.startswith("sqlite:///") else ""


def init_store(tracking_uri: str) -> None:
    """Create (migrate) a SQLite tracking database under a file lock (the flow's preflight calls it).

    Several runs starting at once on one state folder would otherwise race on MLflow's
    schema migrations. A server URI needs nothing here.
    """
    db = sqlite_path(tracking_uri)
    if not db:
        return
    import fcntl

    from mlflow.tracking import MlflowClient

    os.makedirs(os.path.dirname(db) or ".", exist_ok=True)
    with open(db + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment of a SQLite tracking file keeps its artifacts: `mlruns/<experiment>/`
    beside the file (its runs in `<run-id>/artifacts/`, its logged models in `models/`).

    MLflow's own default for a database store is `./mlruns` in the working directory of
    whichever process creates the experiment, so runs of one tracking file would scatter their
    artifacts over the folders they were started from. A server (or another database) decides
    for itself: None.
    """
    db = sqlite_path(tracking_uri)
    if not db:
        return None
    return (Path(db).resolve().parent / "mlruns" / safe_name(experiment)).as_uri()


def start_run(tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """Create a run (and its experiment when missing); return the run id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            experiment_id = client.create_experiment(
                experiment, artifact_location=artifact_location(tracking_uri, experiment)
            )
        except Exception:  # another run created it meanwhile
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            experiment_id = exp.experiment_id
    else:
        experiment_id = exp.experiment_id
    run = client.create_run(experiment_id, run_name=run_name or None, tags=tags)
    return run.info.run_id


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log params in batches of 100 (MLflow's limit per call); lists and dicts as JSON, cut to MLflow's length."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Set tags in one call."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Mark the run ended with `status` (FINISHED, FAILED or KILLED)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def run_name_of(tracking_uri: str, run_id: str) -> str:
    """The run's name (MLflow generates one when none was given)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).get_run(run_id).info.run_name


def log_artifacts(tracking_uri: str, run_id: str, files: dict[str, str], artifact_path: str | None = None) -> None:
    """Upload the files (role -> path) under `artifact_path` of the run's artifacts."""
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
        raise TrackingUnavailable(
            f"MLflow server {tracking_uri} is unreachable ({reason}); start it or fix tracking.uri"
        ) from None


def _is_unreachable(exc: BaseException) -> bool:
    """Connection failures and 5xx answers, however MLflow's REST client wraps them."""
    import requests

    if isinstance(
        exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)
    ):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(
        s in text
        for s in ("Max retries exceeded", "Connection refused", "ConnectionError", "status code 50", "timed out")
    )


def configure_mlflow_client(env: dict | None = None) -> None:
    """Bound MLflow's own HTTP retries (by default about two minutes per call), so buffering takes over; and
    keep MLflow's progress bars off the log."""
    env = os.environ if env is None else env
    env.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    env.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    env.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # no progress bars of MLflow's downloads (its model check loads the model it logs) among the run's log lines
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@contextlib.contextmanager
def fluent_uris(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at `uri`, then put back what was there before.

    `mlflow.set_tracking_uri`/`set_registry_uri` change process-wide state and export
    MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI to the environment; left behind, a later run in
    the same process (or a subprocess it starts) would track into this run's server. As the
    setters export what they set, the environment holds the whole state: afterwards both URIs
    are unset (None and '' are the setters' "unset") and the two variables put back.
    """
    import mlflow

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri("")
        _restore_environment(saved_env)


def _restore_environment(saved: dict[str, str | None]) -> None:
    """Put environment variables back as `saved` has them (None: unset)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
