"""The training flow: preflight -> ingest -> train -> evaluate -> store -> publish.

One MLflow run per flow run. Only wiring lives here; the work is in pipelines/steps.py
and tasks/. Retries are on I/O (opening the run, storing artifacts), never on training.
A failed run is marked FAILED in MLflow and its artifacts are withdrawn from the store.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed, State

from pipelines import steps
from pipelines.remote import train_remotely
from pipelines.config import TrainConfig, resolve_storage_uri, resolve_tracking_uri, state_dir
from tasks import tracking

log = logging.getLogger("trainyard.flow")
IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 5, 15]}

# Our own cache is the content-hash keyed dataset folder; Prefect's input hashing is not needed.
preflight_task = task(steps.preflight, name="preflight", cache_policy=NO_CACHE)
unchanged_task = task(steps.unchanged_since_champion, name="check-unchanged", cache_policy=NO_CACHE)
resumable_task = task(steps.find_resumable, name="find-resumable", cache_policy=NO_CACHE)
start_task = task(steps.start, name="start-run", cache_policy=NO_CACHE, **IO_RETRIES)
def _not_bad_input(task, task_run, state) -> bool:
    """Retry I/O failures (an S3 blip), not bad data: that fails the same way every time."""
    from tasks.errors import DataError

    try:
        state.result()
    except DataError:
        return False
    except Exception:
        return True
    return False


ingest_task = task(steps.ingest_data, name="ingest", cache_policy=NO_CACHE, retry_condition_fn=_not_bad_input, **IO_RETRIES)
train_task = task(steps.train, name="train", cache_policy=NO_CACHE)
evaluate_task = task(steps.evaluate, name="evaluate", cache_policy=NO_CACHE)
store_task = task(steps.store_artifacts, name="store-artifacts", cache_policy=NO_CACHE, **IO_RETRIES)
publish_task = task(steps.publish, name="publish", cache_policy=NO_CACHE)
train_remote_task = task(train_remotely, name="train-remote", cache_policy=NO_CACHE)


SKIPPED = "Skipped"


@flow(name="trainyard-train", validate_parameters=True)
def train_flow(
    cfg: TrainConfig = TrainConfig(),
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
    state = state_dir()
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
    storage_uri = resolve_storage_uri(cfg)
    tracking.configure_mlflow_client()
    preflight_task(cfg, tracking_uri, storage_uri)
    flow_run_id = str(flow_run.id or "")
    run_id = resumable_task(cfg, tracking_uri, resume, flow_run_id)
    if run_id:
        steps.reopen(tracking_uri, run_id, flow_run_id)
        log.info("continuing MLflow run %s", run_id)
    else:
        if not force:
            reason = unchanged_task(cfg, state, tracking_uri)
            if reason:
                log.info("skipped: nothing changed (%s)", reason)
                return Completed(name=SKIPPED, message=f"skipped: nothing changed; {reason}", data={"skipped": True, "reason": reason})
        run_id = start_task(cfg, tracking_uri, flow_run_id)
    run_name = tracking.run_name_of(tracking_uri, run_id)
    run_dir = state / "runs" / run_id
    tb_dir = state / "tensorboard" / tracking.safe_name(cfg.tracking.experiment) / f"{tracking.safe_name(run_name)}-{run_id[:8]}"
    log.info("MLflow run %s (%s) at %s", run_id, run_name, tracking_uri)
    stored = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        dataset = ingest_task(cfg, state, tracking_uri, run_id, storage_uri)
        steps.check_champion_metric(cfg, dataset["path"])
        if train_deployment:
            result = train_remote_task(
                train_deployment, cfg, dataset["key"], run_id, tracking_uri, storage_uri, str(run_dir), str(tb_dir),
                train_start_timeout,
            )  # fmt: skip
        else:
            result = train_task(cfg, dataset["path"], tracking_uri, run_id, str(run_dir), str(tb_dir), storage_uri)
        evaluation = evaluate_task(cfg, dataset["path"], result["checkpoint"], str(run_dir))
        stored = store_task(cfg, dataset["path"], result["checkpoint"], evaluation, run_id, storage_uri, str(run_dir), str(tb_dir))
        published = publish_task(
            cfg, dataset["path"], result["checkpoint"], evaluation, stored, tracking_uri, run_id, str(run_dir), str(tb_dir),
            dataset["key"],
        )  # fmt: skip
    except BaseException:
        try:
            tracking.end_run(tracking_uri, run_id, "FAILED")
        except Exception as exc:  # the tracking server may be what failed
            log.error("could not mark MLflow run %s FAILED: %s", run_id, exc)
        if stored is not None:
            try:
                steps.withdraw_artifacts(cfg, storage_uri, run_id)
            except Exception as exc:  # the store may be what failed; its unit then has no manifest anyway
                log.warning("could not withdraw the artifacts of failed run %s: %s", run_id, exc)
        raise
    tracking.end_run(tracking_uri, run_id, "FINISHED")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the stored unit holds the best checkpoint now
    return {
        "mlflow_run_id": run_id,
        "run_name": run_name,
        "experiment": cfg.tracking.experiment,
        "tracking_uri": tracking_uri,
        "task": evaluation["task"],
        "test_metrics": evaluation["metrics"],
        "best_epoch": result["best_epoch"],
        "device": result["device"],
        "train_seconds": round(result["seconds"], 3),
        "dataset": {"key": dataset["key"], "content_hash": dataset["content_hash"], "reused": dataset["reused"], "path": dataset["path"]},
        "artifacts_uri": stored["uri"],
        "artifacts": {k: v["uri"] for k, v in stored["files"].items() if not k.startswith(("tensorboard/", "checkpoints/"))},
        "artifact_sha256": {k: v["sha256"] for k, v in stored["files"].items()},
        "mlflow_model_uri": published["mlflow_model"],
        "champion": published["champion"],
        "tensorboard_dir": str(tb_dir),
    }


# What deployments run: the same flow, retried twice; a retry continues the same MLflow run
# from its last checkpoint (see steps.find_resumable), it does not start over.
retrying_train_flow = train_flow.with_options(retries=2, retry_delay_seconds=60)
