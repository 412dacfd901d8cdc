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
import os
import shutil
from dataclasses import dataclass
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipelines import champion_gate, lifecycle, prepare, publish, training
from pipelines.config import TrainConfig, resolve_storage_uri, resolve_tracking_uri, state_dir
from pipelines.context import RunContext, run_context, store_for
from pipelines.provenance import config_hash, run_tags
from pipelines.sweep_space import check_space, decoded, suggest, with_params
from pipelines.sweep_study import RUN_ID, open_study, pruning, redacted, storage_url, trial_of, trials_left
from tasks import keys, tracking
from tasks.errors import ConfigError, TrainyardError
from tasks.results import DatasetRef, TrainResult
from tasks.sweep_config import SweepConfig
from tasks.train_config import maximizes

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


def _end(tracking_uri: str, run_id: str, status: str, state: str) -> None:
    """A trial's child run ended: its MLflow status and its state in the study (COMPLETE, PRUNED, FAIL)."""
    tracking.set_tags(tracking_uri, run_id, {keys.SWEEP_TRIAL_STATE: state})
    tracking.end_run(tracking_uri, run_id, status)


@dataclass(frozen=True)
class TrialSpec:
    """One trial, as the flow hands it to a worker: its config (the point applied), where its study lives,
    the parent run and the prepared dataset. Picklable: with sweep.parallel above 1 it crosses processes."""

    cfg: TrainConfig
    study: str
    storage: str
    pruner: str
    trial_id: int
    number: int
    direction: str
    parent: RunContext
    dataset: DatasetRef
    threads: int = 0  # torch's threads in a worker process: the cores shared out among the parallel trials
    deployment: str = ""  # train on this deployment (the gpu pool's train step) instead of in this process
    start_timeout: float = 600.0


def run_trial(spec: TrialSpec) -> dict[str, Any]:
    """Train one trial as a child run, reporting each epoch's validation metric to its study (which may
    prune it); the outcome, which the flow tells the study."""
    import optuna

    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    trial = trial_of(spec.study, spec.storage, spec.pruner, spec.trial_id)
    ctx = _child(spec.cfg, spec.parent, spec.study, spec.number, spec.direction)
    trial.set_user_attr(RUN_ID, ctx.run_id)
    outcome: dict[str, Any] = {"number": spec.number, "run_id": ctx.run_id}
    cfg, dataset = spec.cfg, spec.dataset
    try:
        result = _train(spec, trial, ctx)
        evaluation = training.evaluate(cfg, ctx, dataset, result)
        stored = publish.store_artifacts(cfg, ctx, dataset, result, evaluation)
        publish.log_reports(cfg, ctx, dataset, evaluation, stored, int(result.history[-1]["epoch"]))
    except optuna.TrialPruned as exc:
        log.info("sweep %s: trial %d pruned: %s", spec.study, spec.number, exc)
        _end(ctx.tracking_uri, ctx.run_id, keys.KILLED, "PRUNED")
        return {**outcome, "state": "PRUNED"}
    except BaseException as exc:
        _end(ctx.tracking_uri, ctx.run_id, keys.KILLED if lifecycle.interrupted(exc) else keys.FAILED, "FAIL")
        if not isinstance(exc, TrainyardError):  # a trial that cannot train (NaN, say) does not end the sweep
            raise
        log.warning("sweep %s: trial %d failed: %s", spec.study, spec.number, exc)
        return {**outcome, "state": "FAIL", "error": str(exc)}
    (ctx.run_dir / "train-result.json").write_text(json.dumps(result.to_dict()), encoding="utf-8")
    from mlflow.tracking import MlflowClient

    MlflowClient(ctx.tracking_uri).log_metric(ctx.run_id, keys.SWEEP_OBJECTIVE, float(result.best_metric))
    _end(ctx.tracking_uri, ctx.run_id, keys.FINISHED, "COMPLETE")
    return {**outcome, "state": "COMPLETE", "value": result.best_metric}


def _train(spec: TrialSpec, trial, ctx: RunContext) -> TrainResult:
    """Train the trial here (pruned through its epoch callback), or as a run of the train-step deployment,
    which reports to the study itself."""
    monitor = _monitor(spec.cfg, spec.dataset)
    if not spec.deployment:
        return training.train(spec.cfg, ctx, spec.dataset, observe=pruning(trial, monitor))
    from pipelines.remote import train_remotely

    report = {"study": spec.study, "storage": spec.storage, "pruner_name": spec.pruner, "trial_id": spec.trial_id}
    report["monitor"] = monitor
    return train_remotely(spec.deployment, spec.cfg, ctx, spec.dataset, spec.start_timeout, trial=report)


def _monitor(cfg: TrainConfig, dataset: DatasetRef) -> str:
    return keys.VAL_ACCURACY if maximizes(dataset.task, cfg.train.monitor) else keys.VAL_LOSS


trial_task = task(run_trial, name="trial", cache_policy=NO_CACHE)


def _ask(study, cfg: TrainConfig, sweep: SweepConfig, url: str, parent: RunContext, dataset: DatasetRef) -> TrialSpec:
    """The study's next point (its one sampler, in the flow's process), as a trial for a worker."""
    trial = study.ask()
    trial_cfg = with_params(cfg, suggest(trial, sweep.space))
    direction = study.direction.name.lower()
    # the trial's storage id: a worker reports to it through optuna.trial.Trial(study, id)
    spec = (study.study_name, url, sweep.pruner, trial._trial_id, trial.number, direction, parent, dataset)
    threads = max(1, (os.cpu_count() or 1) // sweep.parallel) if sweep.parallel > 1 else 0
    remote = {"deployment": sweep.train_deployment, "start_timeout": sweep.train_start_timeout}
    return TrialSpec(trial_cfg, *spec, threads=0 if sweep.train_deployment else threads, **remote)


def _tell(study, spec: TrialSpec, future) -> dict[str, Any]:
    from optuna.trial import TrialState

    try:
        outcome = future.result()
    except BaseException:
        study.tell(spec.number, state=TrialState.FAIL)
        raise
    if outcome["state"] == "COMPLETE":
        study.tell(spec.number, outcome["value"])
    else:
        study.tell(spec.number, state=TrialState[outcome["state"]])
    return outcome


def _runner(sweep: SweepConfig):
    """Trials in worker processes of their own when several train here at once (each process's random
    generators are its own, so a trial trains as it would alone); one at a time in this process otherwise;
    threads that wait for the train-step deployment's runs when the trials train there."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if sweep.parallel > 1 and not sweep.train_deployment:
        return ProcessPoolTaskRunner(max_workers=sweep.parallel)
    return ThreadPoolTaskRunner(max_workers=sweep.parallel)


def _run_trials(study, cfg: TrainConfig, sweep: SweepConfig, url: str, parent: RunContext, dataset: DatasetRef) -> list:
    """The trials still wanted, `sweep.parallel` at a time (a new one as soon as one ends), each a task run."""
    from prefect.futures import as_completed

    outcomes, left, pending = [], trials_left(study, sweep.trials), {}
    with _runner(sweep) as runner:
        while left > 0 or pending:
            while left > 0 and len(pending) < sweep.parallel:
                spec = _ask(study, cfg, sweep, url, parent, dataset)
                pending[runner.submit(trial_task, parameters={"spec": spec})] = spec
                left -= 1
            done = next(iter(as_completed(list(pending))))
            outcomes.append(_tell(study, pending.pop(done), done))
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
    if sweep.train_deployment and not store_for(cfg, storage_uri).remote:
        raise ConfigError(
            f"sweep.train_deployment={sweep.train_deployment!r} hands each trial to another worker through the "
            "artifact store: set storage.uri to an s3:// store"
        )
    name, url = sweep_name(cfg, sweep), storage_url(sweep, state)
    parent = run_context(cfg, state, tracking_uri, storage_uri, _parent(cfg, sweep, name, tracking_uri, url))
    try:
        dataset = prepare.ingest_data(cfg, parent)
        study, stale = open_study(sweep, name, url, maximizes(dataset.task, cfg.train.monitor))
        for run_id in stale:  # the child runs of trials a killed sweep left running
            _end(tracking_uri, run_id, keys.FAILED, "FAIL")
        outcomes = _run_trials(study, cfg, sweep, url, parent, dataset)
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
