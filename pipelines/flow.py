"""The training flow: preflight -> ingest -> train -> evaluate -> store -> publish.

One MLflow run per flow run. Only wiring lives here; the steps are in the pipelines/ modules
named for them, the work in tasks/. Retries are on I/O (opening the run, storing artifacts),
never on training. A failed run is marked FAILED in MLflow (KILLED when it was stopped with
Ctrl-C or SIGTERM) and its artifacts are withdrawn from the store.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed, State

from pipelines import champion_gate, lifecycle, prepare, publish, training
from pipelines.config import TrainConfig, resolve_storage_uri, resolve_tracking_uri, state_dir
from pipelines.context import RunContext, run_context
from pipelines.remote import train_remotely
from pipelines.resume import find_resumable, reopen
from tasks import tracking
from tasks.results import DatasetRef, Evaluation, Published, StoredUnit, TrainResult

log = logging.getLogger("trainyard.flow")
IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 5, 15]}
SKIPPED = "Skipped"
DEFAULT_CONFIG = TrainConfig()  # the parameter form's defaults


def _not_bad_input(task, task_run, state) -> bool:
    """Retry I/O failures (an S3 blip), not bad input: bad data, a bad config, a model that does not resolve
    or cannot be used (the ValueError kinds of TrainyardError) fail the same way every time."""
    from tasks.errors import ConfigError, DataError, ModelError

    try:
        state.result()
    except (DataError, ConfigError, ModelError):
        return False
    except Exception:
        return True
    return False


# Our own cache is the content-hash keyed dataset folder; Prefect's input hashing is not needed.
preflight_task = task(lifecycle.preflight, name="preflight", cache_policy=NO_CACHE)
unchanged_task = task(champion_gate.unchanged_since_champion, name="check-unchanged", cache_policy=NO_CACHE)
resumable_task = task(find_resumable, name="find-resumable", cache_policy=NO_CACHE)
start_task = task(lifecycle.start, name="start-run", cache_policy=NO_CACHE, **IO_RETRIES)
ingest_task = task(
    prepare.ingest_data, name="ingest", cache_policy=NO_CACHE, retry_condition_fn=_not_bad_input, **IO_RETRIES
)
train_task = task(training.train, name="train", cache_policy=NO_CACHE)
evaluate_task = task(training.evaluate, name="evaluate", cache_policy=NO_CACHE)
store_task = task(publish.store_artifacts, name="store-artifacts", cache_policy=NO_CACHE, **IO_RETRIES)
publish_task = task(publish.publish, name="publish", cache_policy=NO_CACHE)
train_remote_task = task(train_remotely, name="train-remote", cache_policy=NO_CACHE)


def _open_run(cfg: TrainConfig, state: Path, tracking_uri: str, resume: str, force: bool) -> str | State:
    """The MLflow run to log into (continued or new), or the Skipped state when nothing changed."""
    flow_run_id = str(flow_run.id or "")
    run_id = resumable_task(cfg, tracking_uri, resume, flow_run_id)
    if run_id:
        reopen(tracking_uri, run_id, flow_run_id)
        log.info("continuing MLflow run %s", run_id)
        return run_id
    if not force:
        reason = unchanged_task(cfg, state, tracking_uri)
        if reason:
            log.info("skipped: nothing changed (%s)", reason)
            data = {"skipped": True, "reason": reason}
            return Completed(name=SKIPPED, message=f"skipped: nothing changed; {reason}", data=data)
    return start_task(cfg, tracking_uri, flow_run_id)


def _summary(
    cfg: TrainConfig,
    ctx: RunContext,
    dataset: DatasetRef,
    result: TrainResult,
    evaluation: Evaluation,
    stored: StoredUnit,
    published: Published,
) -> dict[str, Any]:
    """What `trainyard train` prints (a table, or JSON with --json); its keys are part of the interface."""
    return {
        "mlflow_run_id": ctx.run_id,
        "run_name": ctx.run_name,
        "experiment": cfg.tracking.experiment,
        "tracking_uri": ctx.tracking_uri,
        "task": evaluation.task,
        "test_metrics": evaluation.metrics,
        "best_epoch": result.best_epoch,
        "device": result.device,
        "train_seconds": round(result.seconds, 3),
        "dataset": {
            "key": dataset.key,
            "content_hash": dataset.content_hash,
            "reused": dataset.reused,
            "path": dataset.path,
            "uri": dataset.uri,
            "split_sizes": dataset.split_sizes,
        },
        "artifacts_uri": stored.uri,
        "artifacts": stored.artifact_uris(),
        "artifact_sha256": stored.sha256s(),
        "mlflow_model_uri": published.mlflow_model,
        "champion": published.champion,
        "tensorboard_dir": str(ctx.tb_dir),
    }


@flow(name="trainyard-train", validate_parameters=True)
def train_flow(
    cfg: TrainConfig = DEFAULT_CONFIG,
    force: bool = False,
    train_deployment: str = "",
    resume: str = "",
    train_start_timeout: float = 600.0,
) -> dict[str, Any] | State:
    """Train, evaluate and publish one model as the config says; return the run's summary.

    Args:
        cfg: the run's configuration, one section per stage.
        force: train even when data, config and code match the current champion's run.
        train_deployment: run the training step as this deployment (e.g. 'trainyard-train-step/gpu', on
            the gpu work pool) instead of in this process; needs an s3:// artifact store.
        train_start_timeout: with train_deployment, seconds to wait for a worker to start the step;
            after that the run fails and the step is cancelled.
        resume: an MLflow run id to continue from its last checkpoint. Without it, an unfinished run
            with the configured run name, or of this flow run (a retry), is continued.
    """
    state, tracking_uri, storage_uri = state_dir(), resolve_tracking_uri(cfg.tracking.uri), resolve_storage_uri(cfg)
    tracking.configure_mlflow_client()
    preflight_task(cfg, tracking_uri, storage_uri)
    run_id = _open_run(cfg, state, tracking_uri, resume, force)
    if isinstance(run_id, State):
        return run_id
    ctx = run_context(cfg, state, tracking_uri, storage_uri, run_id)
    log.info("MLflow run %s (%s) at %s", ctx.run_id, ctx.run_name, ctx.tracking_uri)
    stored = None
    try:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        dataset = ingest_task(cfg, ctx)
        champion_gate.check_champion_metric(cfg, dataset)
        if train_deployment:
            result = train_remote_task(train_deployment, cfg, ctx, dataset, train_start_timeout)
        else:
            result = train_task(cfg, ctx, dataset)
        evaluation = evaluate_task(cfg, ctx, dataset, result)
        stored = store_task(cfg, ctx, dataset, result, evaluation)
        published = publish_task(cfg, ctx, dataset, result, evaluation, stored)
    except BaseException as exc:
        lifecycle.fail(cfg, ctx, exc, stored=stored is not None)
        raise
    lifecycle.finish(ctx)
    return _summary(cfg, ctx, dataset, result, evaluation, stored, published)


# What deployments run: the same flow, retried twice; a retry continues the same MLflow run
# from its last checkpoint (see pipelines/resume.py), it does not start over.
retrying_train_flow = train_flow.with_options(retries=2, retry_delay_seconds=60)
