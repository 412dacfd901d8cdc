"""The Optuna study behind a sweep: where it lives, its sampler and pruner, and picking it up again
after the sweep was killed.

The study is stored in an RDB: `sweep.storage` when given (a database of its own on the PostgreSQL
server MLflow uses, say); else TRAINYARD_SWEEP_STORAGE; else `optuna.db` in the state folder. A sweep started again
with the same name loads it: finished trials stay, a trial left RUNNING by a killed sweep is marked
FAIL and enqueued once more with its params.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tasks.sweep_config import SweepConfig

log = logging.getLogger("trainyard.sweep")
RETRY_OF = "retry_of"  # a trial's user attribute: the number of the trial it runs again
RUN_ID = "mlflow_run_id"  # a trial's user attribute: its MLflow child run


def storage_url(sweep: SweepConfig, state: Path, env: dict[str, str] | None = None) -> str:
    """Where the study lives: sweep.storage, else TRAINYARD_SWEEP_STORAGE, else optuna.db in the state folder.
    Not MLflow's own database: both keep their schema version in an `alembic_version` table."""
    env = os.environ if env is None else env
    return sweep.storage or env.get("TRAINYARD_SWEEP_STORAGE", "") or f"sqlite:///{Path(state) / 'optuna.db'}"


def redacted(url: str) -> str:
    """A storage URL without its password, for tags and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _sampler(sweep: SweepConfig):
    import optuna

    from pipelines.sweep_space import grid

    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=sweep.seed)
    if sweep.sampler == "grid":
        return optuna.samplers.GridSampler(grid(sweep.space), seed=sweep.seed)
    return optuna.samplers.TPESampler(seed=sweep.seed)


def pruner(name: str):
    """sweep.pruner as an Optuna pruner (the flow's study and every worker's copy of it judge alike)."""
    import optuna

    if name == "none":
        return optuna.pruners.NopPruner()
    # a trial is judged from its second epoch on, once three trials have finished
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)


def open_study(sweep: SweepConfig, name: str, url: str, maximize: bool):
    """(the sweep's study, created or loaded by name; the MLflow runs of the trials a killed sweep left
    RUNNING, which are failed in the study and enqueued again, once)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=url,
        study_name=name,
        direction="maximize" if maximize else "minimize",
        sampler=_sampler(sweep),
        pruner=pruner(sweep.pruner),
        load_if_exists=True,
    )
    return study, _recover(study)


def _recover(study) -> list[str]:
    from optuna.trial import TrialState

    retried = {t.user_attrs.get(RETRY_OF) for t in study.get_trials(deepcopy=False)}
    stale = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        stale += [trial.user_attrs[RUN_ID]] if RUN_ID in trial.user_attrs else []
        study.tell(trial.number, state=TrialState.FAIL)
        log.info("sweep %s: trial %d was left running; marked failed", study.study_name, trial.number)
        if trial.user_attrs.get(RETRY_OF) is None and trial.number not in retried:
            study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number}, skip_if_exists=False)
    return stale


def trials_left(study, wanted: int) -> int:
    """How many trials to ask for so that the study holds `wanted` finished ones (a failed trial that is
    enqueued again counts once, through its retry)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF) for t in trials} - {None}
    done = sum(1 for t in trials if t.state.is_finished() and t.number not in retried)
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    return max(wanted - done - waiting, 0) + waiting


# ---- a trial trained by the gpu pool's train-step deployment -------------------------------------------

PRUNED_FILE = "pruned.json"


def trial_of(study: str, storage: str, pruner_name: str, trial_id: int):
    """A trial the flow asked for, in the process that trains it (another process, or another machine's,
    which needs the storage), with the sweep's pruner to judge its reports."""
    import optuna

    loaded = optuna.load_study(study_name=study, storage=storage, pruner=pruner(pruner_name))
    return optuna.trial.Trial(loaded, trial_id)


def reporter(study: str, storage: str, pruner_name: str, trial_id: int, monitor: str):
    """`pruning` of the trial named by the train-step deployment's `trial` parameter."""
    return pruning(trial_of(study, storage, pruner_name, trial_id), monitor)


def pruning(trial, monitor: str):
    """An epoch callback that reports `monitor` to the trial and raises TrialPruned when the study prunes it."""
    import optuna

    def observe(epoch: int, metrics: dict[str, float]) -> None:
        trial.report(metrics[monitor], epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"{monitor} {metrics[monitor]:.4g} after epoch {epoch} trails the median")

    return observe


class _Handed:
    pruned = False


@contextlib.contextmanager
def pruned_handoff(store, prefix: str, work: Path):
    """Around a remote trial's training: a TrialPruned leaves `pruned.json` as the step's handoff (the
    step completes; the parent tells a pruned trial from a failed one by it)."""
    import optuna

    handed = _Handed()
    try:
        yield handed
    except optuna.TrialPruned as exc:
        path = work / PRUNED_FILE
        path.write_text(json.dumps({"message": str(exc)}), encoding="utf-8")
        store.publish(prefix, {PRUNED_FILE: str(path)})
        handed.pruned = True


def raise_if_pruned(store, prefix: str) -> None:
    """Raise TrialPruned when the remote step's handoff says its trial was pruned."""
    import optuna

    manifest = store.read_manifest(prefix) or {}
    if PRUNED_FILE in manifest:
        raise optuna.TrialPruned("pruned by the study while training on the train-step deployment")
