"""The MLflow run's life around the steps: the preflight check, opening the run, and its end.

A run ends FINISHED; a run stopped by Ctrl-C or SIGTERM ends KILLED; any other failure ends it
FAILED. A run that did not finish withdraws its artifact unit from the store.
"""

from __future__ import annotations

import logging
import shutil

from pipelines.config import TrainConfig
from pipelines.context import RunContext, store_for
from pipelines.provenance import run_tags
from tasks import keys, tracking

log = logging.getLogger("trainyard.flow")


def preflight(cfg: TrainConfig, tracking_uri: str, storage_uri: str) -> None:
    """Fail at once, before any data is read or a model trained, when a service is unusable."""
    tracking.check_reachable(tracking_uri)
    tracking.init_store(tracking_uri)
    store_for(cfg, storage_uri).preflight()


def start(cfg: TrainConfig, tracking_uri: str, flow_run_id: str = "") -> str:
    """Open the MLflow run: the flattened config as params; flow run, code and package versions as tags."""
    run_id = tracking.start_run(
        tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name, run_tags(cfg, flow_run_id)
    )
    tracking.log_params(tracking_uri, run_id, cfg.flat())
    return run_id


def interrupted(exc: BaseException) -> bool:
    """Whether `exc` is a stop asked for from outside (Ctrl-C, SIGTERM), not a failure of the run."""
    from prefect.exceptions import TerminationSignal

    return isinstance(exc, (KeyboardInterrupt, TerminationSignal))


def finish(ctx: RunContext) -> None:
    """Mark the run FINISHED; its checkpoints go (the stored unit holds the best one now)."""
    tracking.end_run(ctx.tracking_uri, ctx.run_id, keys.FINISHED)
    shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)


def fail(cfg: TrainConfig, ctx: RunContext, exc: BaseException, stored: bool) -> None:
    """Mark the run KILLED (stopped from outside) or FAILED, and withdraw its unit when one was stored.

    Best effort: the tracking server or the store may be what failed, and the error that ended
    the run is the one to report.
    """
    from pipelines.publish import withdraw_artifacts

    status = keys.KILLED if interrupted(exc) else keys.FAILED
    try:
        tracking.end_run(ctx.tracking_uri, ctx.run_id, status)
    except Exception as err:
        log.error("could not mark MLflow run %s %s: %s", ctx.run_id, status, err)
    if stored:
        try:
            withdraw_artifacts(cfg, ctx)
        except Exception as err:  # its unit then has no manifest anyway
            log.warning("could not withdraw the artifacts of failed run %s: %s", ctx.run_id, err)
