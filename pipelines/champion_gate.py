"""The champion gate around a run: skip a run that would repeat the champion's, refuse a promotion
metric the data cannot report before anything trains, and register the model and decide after.

The rule itself (which metric, which direction, which runs compare) is tasks/champion.py's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipelines.config import ConfigError, TrainConfig
from pipelines.context import RunContext
from pipelines.provenance import code_version, config_hash
from tasks import champion, keys
from tasks.results import DatasetRef, Evaluation, Published, TrainResult

log = logging.getLogger("trainyard.flow")


def unchanged_since_champion(cfg: TrainConfig, state: Path, tracking_uri: str) -> str:
    """A reason to skip when data hash, config and code version all match the champion's run; else ''."""
    from mlflow.tracking import MlflowClient

    from tasks.ingest import identity

    model_name = cfg.tracking.model_name()
    champ = champion.current_champion(tracking_uri, model_name)
    code = code_version()
    if champ is None or not code or code.endswith("-dirty"):
        return ""
    tags = MlflowClient(tracking_uri).get_run(champ.run_id).data.tags
    _key, content_hash = identity(cfg.data, state, cfg.storage)  # a remote table: one HEAD when cached
    same = (
        tags.get(keys.DATA_HASH) == content_hash
        and tags.get(keys.CONFIG_HASH) == config_hash(cfg)
        and tags.get(keys.CODE_VERSION) == code
    )
    if not same:
        return ""
    return (
        f"data {content_hash[:12]}, config and code {code[:12]} match champion {model_name} v{champ.version} "
        f"(run {champ.run_id})"
    )


def check_champion_metric(cfg: TrainConfig, dataset: DatasetRef) -> None:
    """Before training, the one check of the promotion metric: it must be one the evaluation of this
    dataset reports (a per-class metric names one of its classes)."""
    from tasks.evaluate import metric_keys
    from tasks.prepared import load_schema

    if not cfg.tracking.log_model:
        return
    schema = load_schema(dataset.path)
    metric, _ = champion.champion_metric(dataset.task, cfg.tracking.champion_metric)
    reported = metric_keys(schema)
    if metric not in reported:
        raise ConfigError(
            f"tracking.champion_metric {metric!r} is not among the test metrics of this {dataset.task} dataset: "
            f"{', '.join(reported)}"
        )


def register(
    cfg: TrainConfig, ctx: RunContext, dataset: DatasetRef, result: TrainResult, evaluation: Evaluation
) -> Published:
    """Log the run's model (a pyfunc taking raw rows: pipelines/model_logging.py), register a version, and let
    the champion gate decide."""
    from pipelines import model_logging

    model_name = cfg.tracking.model_name()
    info = model_logging.log_model(cfg, ctx, dataset, result)
    metric, higher = champion.champion_metric(evaluation.task, cfg.tracking.champion_metric)
    decision = champion.decide(
        ctx.tracking_uri,
        model_name,
        info["version"],
        ctx.run_id,
        metric,
        higher,
        evaluation.metrics[metric],
        dataset.key,
    )
    outcome = "promoted to champion" if decision.promoted else "stays challenger"
    log.info("registry: %s v%s %s (%s)", model_name, decision.version, outcome, decision.reason)
    return Published(mlflow_model=info["model_uri"], champion=decision.to_dict())
