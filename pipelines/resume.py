"""Which MLflow run a flow run continues: `--resume RUN_ID`, else an unfinished run of the same
run name and config, else an unfinished run of this Prefect flow run (a flow retry). A prediction
run (`trainyard predict`) is never continued.

A run is continued only with the config it was started with (its `config.hash` tag): its params
and checkpoint belong to that config.
"""

from __future__ import annotations

import logging

from pipelines.config import ConfigError, TrainConfig
from pipelines.provenance import config_hash
from tasks import keys

log = logging.getLogger("trainyard.flow")


def _same_config(run, wanted: str) -> bool:
    """Whether `run` was started with the config hashing to `wanted` (runs from before the tag: yes)."""
    started_with = run.data.tags.get(keys.CONFIG_HASH, "")
    return not started_with or started_with == wanted


def _check_resume(client, cfg: TrainConfig, tracking_uri: str, resume: str, experiment_id: str | None) -> str:
    """`resume` when that run can be continued by this config; else a ConfigError saying why not."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(resume)
    except MlflowException:
        raise ConfigError(f"--resume {resume}: no such MLflow run at {tracking_uri}") from None
    if experiment_id is None or run.info.experiment_id != experiment_id:
        raise ConfigError(f"--resume {resume}: that run is not in experiment {cfg.tracking.experiment!r}")
    if not keys.is_training_run(run.data.tags):
        prediction = keys.is_prediction_run(run.data.tags)
        kind = "a prediction run (trainyard predict)" if prediction else "a sweep's parent run"
        raise ConfigError(f"--resume {resume}: that run is {kind}; nothing to resume")
    if run.info.status == keys.FINISHED:
        raise ConfigError(f"--resume {resume}: that run already finished; nothing to resume")
    wanted = config_hash(cfg)
    if not _same_config(run, wanted):
        raise ConfigError(
            f"--resume {resume}: that run was started with another config (config.hash "
            f"{run.data.tags[keys.CONFIG_HASH][:12]}, this one {wanted[:12]}); resume it with the config it "
            "was started with (its params in MLflow), or start a new run"
        )
    return resume


def _unfinished_run(client, cfg: TrainConfig, experiment_id: str, flow_run_id: str) -> str:
    """The newest unfinished run of the configured run name (or of this flow run) with this config; or ''."""
    if cfg.tracking.run_name:
        query = f"attributes.run_name = '{cfg.tracking.run_name}'"
    elif flow_run_id:
        query = f"tags.`{keys.FLOW_RUN_ID}` = '{flow_run_id}'"
    else:
        return ""
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=10)
    unfinished = [r for r in runs if r.info.status != keys.FINISHED and keys.is_training_run(r.data.tags)]
    wanted = config_hash(cfg)
    matching = [r for r in unfinished if _same_config(r, wanted)]
    if unfinished and not matching:
        log.info(
            "run name %r: the unfinished run %s was started with another config; starting a new run",
            cfg.tracking.run_name,
            unfinished[0].info.run_id,
        )
    return matching[0].info.run_id if matching else ""


def find_resumable(cfg: TrainConfig, tracking_uri: str, resume: str = "", flow_run_id: str = "") -> str:
    """The MLflow run this flow run continues, or '' for a new one (see the module's docstring)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = exp.experiment_id if exp is not None else None
    if resume:
        return _check_resume(client, cfg, tracking_uri, resume, experiment_id)
    if experiment_id is None:
        return ""
    return _unfinished_run(client, cfg, experiment_id, flow_run_id)


def reopen(tracking_uri: str, run_id: str, flow_run_id: str) -> None:
    """Mark a continued run RUNNING again, tagged with the flow run that continues it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    client.update_run(run_id, status=keys.RUNNING)
    if flow_run_id:
        client.set_tag(run_id, keys.FLOW_RUN_ID, flow_run_id)
