"""The sweep flow: one Optuna study over the config, its trials as Prefect task runs, MLflow parent and
child runs, and the best trial through the champion gate.

    preflight -> check the space -> parent run -> ingest (once) -> study
      -> trials, `sweep.parallel` at a time: child run, train (pruned by the per-epoch validation
         metric), evaluate, store, report
      -> the best trial's model registered (challenger) and judged by the champion gate

A trial is a training run like any other (the same params, metrics, tags and artifact unit), nested
under the parent with `mlflow.parentRunId`. The objective is the run's monitored validation metric
(val/accuracy, or val/loss with train.monitor=loss and for regression), never a test metric.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from pipelines import champion_gate, lifecycle, prepare, publish, training
from pipelines.config import TrainConfig, resolve_storage_uri, resolve_tracking_uri, state_dir
from pipelines.context import RunContext, run_context
from pipelines.provenance import config_hash, run_tags
from pipelines.sweep_space import check_space, decoded, suggest, with_params
from pipelines.sweep_study import RUN_ID, open_study, redacted, storage_url, trials_left
from tasks import keys, tracking
from tasks.errors import TrainyardError
from tasks.results import DatasetRef, TrainResult
from tasks.sweep_config import SweepConfig

log = logging.getLogger("trainyard.sweep")
DEFAULT_CONFIG = TrainConfig()
DEFAULT_SWEEP = SweepConfig()


def sweep_name(cfg: TrainConfig, sweep: SweepConfig) -> str:
    """sweep.name, else one derived from the config and the space: the same command continues the same study."""
    if sweep.name:
        return sweep.name
    space = json.dumps({k: v.model_dump() for k, v in sweep.space.items()}, sort_keys=True)
    return f"sweep-{hashlib.sha256((config_hash(cfg) + space).encode()).hexdigest()[:10]}"


def _parent(cfg: TrainConfig, sweep: SweepConfig, name: str, tracking_uri: str, url: str) -> str:
    """The sweep's parent run: the one a killed sweep of this name left, else a new one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        query = f"tags.`{keys.SWEEP_NAME}` = '{name}' and tags.`{keys.RUN_KIND}` = '{keys.SWEEP}'"
        for run in client.search_runs([experiment.experiment_id], query, max_results=1):
            client.update_run(run.info.run_id, status=keys.RUNNING)
            log.info("sweep %s continues in MLflow run %s", name, run.info.run_id)
            return run.info.run_id
    tags = {**run_tags(cfg), keys.RUN_KIND: keys.SWEEP, keys.SWEEP_NAME: name, keys.SWEEP_STORAGE: redacted(url)}
    run_id = tracking.start_run(tracking_uri, cfg.tracking.experiment, name, tags)
    settings = sweep.model_dump(mode="json", exclude={"space", "storage", "name"})
    params = {**cfg.flat(), **{f"sweep.{k}": v for k, v in settings.items()}}
    params["sweep.space"] = json.dumps({k: v.model_dump(exclude_none=True) for k, v in sweep.space.items()})
    tracking.log_params(tracking_uri, run_id, params)
    return run_id


def _child(cfg: TrainConfig, parent: RunContext, name: str, number: int, direction: str) -> RunContext:
    """A trial's MLflow run, nested under the sweep's; its context."""
    tags = {**run_tags(cfg), keys.PARENT_RUN_ID: parent.run_id, keys.SWEEP_NAME: name, keys.SWEEP_TRIAL: str(number)}
    tags[keys.SWEEP_DIRECTION] = direction
    run_id = tracking.start_run(parent.tracking_uri, cfg.tracking.experiment, f"{name}-trial-{number}", tags)
    tracking.log_params(parent.tracking_uri, run_id, cfg.flat())
    return run_context(cfg, parent.state, parent.tracking_uri, parent.storage_uri, run_id)


def _pruning(trial, monitor: str):
    def observe(epoch: int, metrics: dict[str, float]) -> None:
        import optuna

        trial.report(metrics[monitor], epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"{monitor} {metrics[monitor]:.4g} after epoch {epoch} trails the median")

    return observe


def _end(ctx: RunContext, status: str, state: str) -> None:
    tracking.set_tags(ctx.tracking_uri, ctx.run_id, {keys.SWEEP_TRIAL_STATE: state})
    tracking.end_run(ctx.tracking_uri, ctx.run_id, status)


def run_trial(study, cfg: TrainConfig, sweep: SweepConfig, parent: RunContext, dataset: DatasetRef) -> dict[str, Any]:
    """Ask the study for a point, train it as a child run, and tell the study how it went."""
    import optuna
    from optuna.trial import TrialState

    trial = study.ask()
    trial_cfg = with_params(cfg, suggest(trial, sweep.space))
    ctx = _child(trial_cfg, parent, study.study_name, trial.number, study.direction.name.lower())
    trial.set_user_attr(RUN_ID, ctx.run_id)
    try:
        result = training.train(trial_cfg, ctx, dataset, observe=_pruning(trial, _monitor(trial_cfg, dataset)))
        evaluation = training.evaluate(trial_cfg, ctx, dataset, result)
        stored = publish.store_artifacts(trial_cfg, ctx, dataset, result, evaluation)
        publish.log_reports(trial_cfg, ctx, dataset, evaluation, stored, int(result.history[-1]["epoch"]))
    except optuna.TrialPruned as exc:
        log.info("sweep %s: trial %d pruned: %s", study.study_name, trial.number, exc)
        _end(ctx, keys.KILLED, "PRUNED")
        study.tell(trial, state=TrialState.PRUNED)
        return {"number": trial.number, "state": "PRUNED", "run_id": ctx.run_id}
    except BaseException as exc:
        _end(ctx, keys.KILLED if lifecycle.interrupted(exc) else keys.FAILED, "FAIL")
        study.tell(trial, state=TrialState.FAIL)
        if not isinstance(exc, TrainyardError):  # a trial that cannot train (NaN, say) does not end the sweep
            raise
        log.warning("sweep %s: trial %d failed: %s", study.study_name, trial.number, exc)
        return {"number": trial.number, "state": "FAIL", "run_id": ctx.run_id, "error": str(exc)}
    (ctx.run_dir / "train-result.json").write_text(json.dumps(result.to_dict()), encoding="utf-8")
    from mlflow.tracking import MlflowClient

    MlflowClient(ctx.tracking_uri).log_metric(ctx.run_id, keys.SWEEP_OBJECTIVE, float(result.best_metric))
    _end(ctx, keys.FINISHED, "COMPLETE")
    study.tell(trial, result.best_metric)
    return {"number": trial.number, "state": "COMPLETE", "run_id": ctx.run_id, "value": result.best_metric}


def _monitor(cfg: TrainConfig, dataset: DatasetRef) -> str:
    classification = dataset.task == "classification"
    return keys.VAL_ACCURACY if classification and cfg.train.monitor == "auto" else keys.VAL_LOSS


trial_task = task(run_trial, name="trial", cache_policy=NO_CACHE)


def _run_trials(study, cfg: TrainConfig, sweep: SweepConfig, parent: RunContext, dataset: DatasetRef) -> list:
    """The trials still wanted, `sweep.parallel` at a time, each a task run."""
    outcomes, left = [], trials_left(study, sweep.trials)
    while left > 0:
        batch = min(left, sweep.parallel)
        futures = [trial_task.submit(study, cfg, sweep, parent, dataset) for _ in range(batch)]
        wait(futures)
        outcomes += [f.result() for f in futures]
        left -= batch
    return outcomes


def _best(study, cfg: TrainConfig, sweep: SweepConfig, parent: RunContext, dataset: DatasetRef) -> dict[str, Any]:
    """The best trial on the parent run; its model registered and judged by the champion gate."""
    best = study.best_trial
    params = decoded(best.params, sweep.space)
    best_cfg = with_params(cfg, params)
    run_id = best.user_attrs[RUN_ID]
    tracking.log_params(parent.tracking_uri, parent.run_id, {f"best.{k}": v for k, v in params.items()})
    tracking.set_tags(parent.tracking_uri, parent.run_id, {keys.SWEEP_BEST_RUN: run_id})
    from mlflow.tracking import MlflowClient

    MlflowClient(parent.tracking_uri).log_metric(parent.run_id, keys.SWEEP_BEST_VALUE, float(best.value))
    summary = {"best_trial": best.number, "best_run_id": run_id, "best_value": best.value, "best_params": params}
    if not cfg.tracking.log_model:
        return summary
    ctx = run_context(best_cfg, parent.state, parent.tracking_uri, parent.storage_uri, run_id)
    result = TrainResult.from_dict(json.loads((ctx.run_dir / "train-result.json").read_text(encoding="utf-8")))
    evaluation = training.evaluate(best_cfg, ctx, dataset, result)
    published = champion_gate.register(best_cfg, ctx, dataset, result, evaluation)
    return {**summary, "mlflow_model_uri": published.mlflow_model, "champion": published.champion}


@flow(name="trainyard-sweep", validate_parameters=True)
def sweep_flow(cfg: TrainConfig = DEFAULT_CONFIG, sweep: SweepConfig = DEFAULT_SWEEP) -> dict[str, Any]:
    """Search the config space with Optuna; each trial is a child run; the best goes through the champion gate.

    Args:
        cfg: the base configuration every trial starts from.
        sweep: the search space, the number of trials, how many run at once, the sampler and the pruner.
    """
    state, tracking_uri, storage_uri = state_dir(), resolve_tracking_uri(cfg.tracking.uri), resolve_storage_uri(cfg)
    tracking.configure_mlflow_client()
    lifecycle.preflight(cfg, tracking_uri, storage_uri)
    check_space(cfg, sweep)
    name, url = sweep_name(cfg, sweep), storage_url(sweep, state)
    parent = run_context(cfg, state, tracking_uri, storage_uri, _parent(cfg, sweep, name, tracking_uri, url))
    try:
        dataset = prepare.ingest_data(cfg, parent)
        maximize = dataset.task == "classification" and cfg.train.monitor == "auto"
        study = open_study(sweep, name, url, maximize)
        outcomes = _run_trials(study, cfg, sweep, parent, dataset)
        summary = _best(study, cfg, sweep, parent, dataset)
    except BaseException as exc:
        tracking.end_run(tracking_uri, parent.run_id, keys.KILLED if lifecycle.interrupted(exc) else keys.FAILED)
        raise
    tracking.end_run(tracking_uri, parent.run_id, keys.FINISHED)
    for outcome in outcomes:  # the trials' checkpoints: their units in the store hold the best weights
        shutil.rmtree(state / "runs" / outcome["run_id"] / "checkpoints", ignore_errors=True)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    counts = {s: states.count(s) for s in sorted(set(states))}
    return {"sweep": name, "parent_run_id": parent.run_id, "tracking_uri": tracking_uri, "trials": counts, **summary}
