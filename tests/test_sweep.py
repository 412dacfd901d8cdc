"""Sweeps: an Optuna study over the config, trials as nested MLflow runs, pruning, resume after SIGKILL,
the best trial through the champion gate."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.config import load_config
from pipelines.sweep_space import with_params
from tasks.errors import ConfigError
from tasks.sweep_config import SweepConfig
from tests.conftest import cli_env, train_argv

pytestmark = pytest.mark.usefixtures("prefect_harness")
SETTINGS = ["data.target=label", "data.drop=[id]", "train.epochs=5", "train.min_steps=0", "train.early_stopping=0"]
# a range whose low end cannot learn in five epochs: those trials trail the median and are pruned
SPACE = {
    "optim.lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    "model.hidden": {"type": "categorical", "choices": [[16], [32, 32]]},
}


def base(toy_csv, *extra):
    return load_config("csv", overrides=[f"data.path={toy_csv}", *SETTINGS, *extra])


def study(state: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{state / 'optuna.db'}")


def trial_states(db: Path) -> tuple[list[int], list[int]]:
    """(the finished trials' numbers, the running trials that have their MLflow run), read without writing
    (Optuna's own loading may create tables, which would take the database's write lock from the sweep)."""
    if not db.exists():
        return [], []
    finished = "SELECT number FROM trials WHERE state IN ('COMPLETE', 'PRUNED', 'FAIL')"
    running = (
        "SELECT t.number FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
        "WHERE t.state = 'RUNNING' AND a.key = 'mlflow_run_id'"
    )
    with (
        contextlib.suppress(sqlite3.Error),
        contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as c,
    ):
        return [n for (n,) in c.execute(finished).fetchall()], [n for (n,) in c.execute(running).fetchall()]
    return [], []


def children(client: MlflowClient, parent_id: str) -> list:
    experiment = client.get_experiment_by_name("trainyard").experiment_id
    return client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_a_sweep_nests_its_trials_prunes_and_registers_the_best(toy_csv, state_home):
    from optuna.trial import TrialState

    from pipelines.flow import train_flow
    from pipelines.sweep import sweep_flow

    cfg = base(toy_csv)
    summary = sweep_flow(cfg, SweepConfig(name="small", space=SPACE, trials=6, seed=0))
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["trainyard.run_kind"] == "sweep"
    trials = study(state_home, "small").get_trials()
    assert len(trials) == 6 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    runs = {r.data.tags["trainyard.sweep.trial"]: r for r in children(client, parent.info.run_id)}
    assert sorted(runs) == [str(t.number) for t in trials]  # one child run per trial, nested under the parent
    for trial in trials:
        run = runs[str(trial.number)]
        assert run.data.tags["trainyard.sweep.trial_state"] == trial.state.name
        assert run.info.status == ("KILLED" if trial.state == TrialState.PRUNED else "FINISHED")
        assert float(run.data.params["optim.lr"]) == pytest.approx(trial.params["optim.lr"])
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "no trial was pruned"
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert summary["best_trial"] == best.number and parent.data.params["best.optim.lr"] == str(best.params["optim.lr"])
    assert parent.data.metrics["sweep/best_value"] == pytest.approx(best.value)
    # only the best trial's model is registered; the gate judged it
    (version,) = client.search_model_versions("name='trainyard'")
    assert version.run_id == summary["best_run_id"] == runs[str(best.number)].info.run_id
    # the best trial rerun alone with its config gives its metrics again (CPU)
    again = train_flow(with_params(cfg, summary["best_params"]), force=True)
    assert again["test_metrics"] == pytest.approx(
        {k: v for k, v in runs[str(best.number)].data.metrics.items() if k in again["test_metrics"]}
    )


@pytest.mark.parametrize(
    "space, message",
    [
        ({"optim.nope": {"type": "float", "low": 0.1, "high": 1}}, "optim.nope: unknown key"),
        ({"optim.lr": {"type": "float", "low": 1, "high": 0.1}}, "expected low <= high"),
        ({"optim.name": {"type": "categorical", "choices": ["adam", "adamx"]}}, "optim.name"),
        ({"nosection.lr": {"type": "float", "low": 0.1, "high": 1}}, "nosection"),
    ],
)
def test_a_bad_space_is_refused_before_any_trial(toy_csv, state_home, space, message):
    from pydantic import ValidationError

    from pipelines.sweep import sweep_flow

    with pytest.raises((ConfigError, ValidationError), match=message):
        sweep_flow(base(toy_csv), SweepConfig(name="bad", space=space, trials=2))
    assert not (state_home / "optuna.db").exists()  # no study, so no trial


def test_a_killed_sweep_continues_without_redoing_finished_trials(toy_csv, tmp_path):
    from optuna.trial import TrialState

    home = tmp_path / "home"
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"optim.lr": SPACE["optim.lr"]}), encoding="utf-8")
    argv = train_argv(f"data.path={toy_csv}", *SETTINGS, "train.epochs=40")
    argv[argv.index("train")] = "sweep"
    argv += ["--space", str(tmp_path / "space.yaml"), "--trials", "4", "--name", "resumed", "--pruner", "none"]
    env = cli_env(home, harness_api=True)
    log = (tmp_path / "first.log").open("w")  # noqa: SIM115 (the child writes to it until it is killed)
    proc = subprocess.Popen(argv, env=env, stderr=log, start_new_session=True)
    deadline, finished = time.monotonic() + 240, []
    running: list[int] = []
    while time.monotonic() < deadline and proc.poll() is None and (len(finished) < 2 or not running):
        time.sleep(0.5)
        finished, running = trial_states(home / "optuna.db")
    assert proc.poll() is None and len(finished) >= 2 and running, (tmp_path / "first.log").read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    log.close()
    before = {t.number: t.datetime_complete for t in study(home, "resumed").get_trials() if t.state.is_finished()}
    again = subprocess.run([*argv, "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = study(home, "resumed").get_trials()
    assert {t.number: t.datetime_complete for t in trials if t.number in before} == before  # not redone
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    retried = [t for t in trials if "retry_of" in t.user_attrs]
    assert [t.number for t in failed] == running and len(retried) == 1  # the trial that was running, run again
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    for trial in failed:  # and its child run, left running by the kill, is marked so
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["trainyard.sweep.trial_state"] == "FAIL"
    assert len(done) == 4 and json.loads(again.stdout)["sweep"] == "resumed"


def test_parallel_trials_train_in_processes_of_their_own_as_they_would_alone(toy_csv, state_home):
    from pipelines.flow import train_flow
    from pipelines.sweep import sweep_flow

    cfg = base(toy_csv, "train.epochs=3")
    sweep = SweepConfig(name="pair", space=SPACE, trials=3, parallel=2, pruner="none", seed=1)
    summary = sweep_flow(cfg, sweep)
    assert summary["trials"] == {"COMPLETE": 3}
    client = MlflowClient(summary["tracking_uri"])
    trials = children(client, summary["parent_run_id"])
    assert len({r.data.tags["trainyard.sweep.trial"] for r in trials}) == 3
    # dropout draws from the process's generator: a trial trained beside another must not share it
    trial = min(trials, key=lambda r: r.data.tags["trainyard.sweep.trial"])
    params = {
        k: json.loads(trial.data.params[k]) if k == "model.hidden" else float(trial.data.params[k]) for k in SPACE
    }
    again = train_flow(with_params(cfg, params), force=True)
    expected = {k: v for k, v in trial.data.metrics.items() if k in again["test_metrics"]}
    assert again["test_metrics"] == pytest.approx(expected)


def test_a_study_on_postgresql(toy_csv, state_home):
    """The stack keeps studies in a PostgreSQL database of their own (TRAINYARD_SWEEP_STORAGE)."""
    import optuna

    from pipelines.sweep import sweep_flow
    from tests.services import postgres_database

    with postgres_database("trainyard_optuna") as (url, _name):
        storage = url.replace("postgresql://", "postgresql+psycopg://")
        sweep = SweepConfig(name="on-pg", space=SPACE, trials=2, pruner="none", storage=storage)
        summary = sweep_flow(base(toy_csv, "train.epochs=2", "tracking.log_model=false"), sweep)
        trials = optuna.load_study(study_name="on-pg", storage=storage).get_trials()
        assert summary["trials"] == {"COMPLETE": 2} and len(trials) == 2
        optuna.delete_study(study_name="on-pg", storage=storage)  # the engine lets go before the drop
    assert not (state_home / "optuna.db").exists()
    tags = MlflowClient(summary["tracking_uri"]).get_run(summary["parent_run_id"]).data.tags
    assert tags["trainyard.sweep.storage"].startswith("postgresql+psycopg://postgres@127.0.0.1:5432/")


def test_the_summary_table_names_the_best_trial_and_the_gate(capsys):
    from pipelines.sweep_cli import print_sweep

    gate = {"model_name": "trainyard", "version": "3", "promoted": False, "reason": "test/accuracy 0.9 < 0.95"}
    summary = {"sweep": "s", "parent_run_id": "p1", "trials": {"COMPLETE": 2}, "best_trial": 1, "best_run_id": "r1"}
    print_sweep({**summary, "best_value": 0.9, "best_params": {"model.hidden": [64, 64]}, "champion": gate})
    out = capsys.readouterr().out
    assert "best model.hidden  [64, 64]" in out
    assert "champion gate      trainyard v3 stays challenger (test/accuracy 0.9 < 0.95)" in out


def test_a_trial_pruned_on_another_worker_is_told_apart_from_a_failed_one(tmp_path):
    import optuna

    from pipelines.sweep_study import pruned_handoff, raise_if_pruned
    from tasks.storage import open_store

    store = open_store((tmp_path / "store").as_uri())
    with pruned_handoff(store, "handoffs/run-1", tmp_path) as handed:
        raise optuna.TrialPruned("val/accuracy 0.5 after epoch 2 trails the median")
    assert handed.pruned
    with pytest.raises(optuna.TrialPruned):
        raise_if_pruned(store, "handoffs/run-1")
    raise_if_pruned(store, "handoffs/run-2")  # a step that trained to the end left no such file
    with pytest.raises(RuntimeError), pruned_handoff(store, "handoffs/run-3", tmp_path):
        raise RuntimeError("not a pruning: it goes on up")


def test_the_command_line_refuses_a_bad_space_file_in_one_line(tmp_path, capsys):
    from pipelines.cli import main
    from pipelines.sweep_cli import sweep_config

    (tmp_path / "space.yaml").write_text("optim.lr: {type: float, low: 1, high: 0.1}\n", encoding="utf-8")
    argv = ["sweep", "--preset", "csv", "--set", "data.path=x.csv", "--set", "data.target=y"]
    assert main([*argv, "--space", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip().startswith("trainyard sweep: --space ")
    assert main([*argv, "--space", str(tmp_path / "space.yaml")]) == 2
    assert "expected low <= high, got low=1.0 and high=0.1" in capsys.readouterr().err
    (tmp_path / "space.yaml").write_text("optim.lr: {type: float, low: 0.001, high: 0.1}\n", encoding="utf-8")
    import argparse

    args = argparse.Namespace(space=str(tmp_path / "space.yaml"), name="", trials=4, parallel=2, sampler="random")
    args.__dict__.update(pruner="none", seed=0, storage="", train_deployment="trainyard-train-step/gpu")
    assert sweep_config(args).train_deployment == "trainyard-train-step/gpu"
