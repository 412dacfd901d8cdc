"""Early stopping, the step budget and the auto batch size: a run stops `patience` epochs after its best
one and keeps that epoch's weights, a resumed run stops where an uninterrupted one does, a tiny table
gets the steps promised, and an explicit batch size wins over auto."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import tasks.train as train_module
from pipelines.config import ConfigError, ModelConfig, OptimConfig, ScheduleConfig, TrainSection, load_config
from tasks.budget import batch_size_for
from tasks.checkpoint import load_weights
from tasks.train import setup, train_model
from tests.test_train import blobs

MODEL = ModelConfig(name="mlp", hidden=[8])
OPTIM = OptimConfig(name="adamw", lr=1e-2)
SCHEDULE = ScheduleConfig(name="plateau", patience=0)
# the validation accuracy each epoch reports: best at epoch 2, then three epochs without a better one
SCRIPT = [0.5, 0.7, 0.6, 0.7, 0.65, 0.9, 0.95, 0.99]


@pytest.fixture
def scripted(monkeypatch):
    """validate() reports SCRIPT's values (after computing the real one) and records each epoch's weights."""
    weights: dict[int, dict[str, torch.Tensor]] = {}
    real = train_module.validate

    def validate(run, epoch, lr_setting):
        loss, name, _ = real(run, epoch, lr_setting)
        weights[epoch] = {k: v.clone() for k, v in run.model.state_dict().items()}
        return loss, name, SCRIPT[epoch - 1]

    monkeypatch.setattr(train_module, "validate", validate)
    return weights


def train(tmp_path, folder, **kwargs):
    cfg = TrainSection(epochs=len(SCRIPT), batch_size=64, early_stopping=3, device="cpu", seed=1)
    return train_model(blobs(n=300), MODEL, OPTIM, SCHEDULE, cfg, tmp_path / folder, **kwargs)


def test_stops_after_patience_epochs_and_keeps_the_best_weights(tmp_path, scripted, caplog):
    with caplog.at_level(logging.INFO, logger="trainyard.train"):
        result = train(tmp_path, "run")
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]  # 3, 4, 5 did not beat epoch 2
    assert result.best_epoch == 2 and math.isclose(result.best_metric, 0.7)
    assert result.epochs == 8 and result.stopped.startswith("val/accuracy has not improved for 3 epochs")
    best = load_weights(result.checkpoint)
    assert best["epoch"] == 2
    assert all(torch.equal(best["model_state"][k], scripted[2][k]) for k in scripted[2])
    assert not all(torch.equal(best["model_state"][k], scripted[5][k]) for k in scripted[5])
    assert load_weights(tmp_path / "run" / "last.pt")["epoch"] == 5  # the resume checkpoint of the stop
    stop = [r.getMessage() for r in caplog.records if r.getMessage().startswith("early stopping")]
    assert stop == [
        "early stopping after epoch 5 of 8: val/accuracy has not improved for 3 epochs "
        "(train.early_stopping=3); keeping epoch 2"
    ]


def test_off_by_default_trains_every_epoch(tmp_path, scripted):
    cfg = TrainSection(epochs=len(SCRIPT), batch_size=64, device="cpu")
    result = train_model(blobs(n=300), MODEL, OPTIM, SCHEDULE, cfg, tmp_path / "run")
    assert len(result.history) == len(SCRIPT) and result.best_epoch == len(SCRIPT)
    assert result.stopped == "" and result.epochs == len(SCRIPT) and result.batch_size == 64


class Crash(Exception):
    pass


def test_a_resumed_run_stops_where_an_uninterrupted_one_does(tmp_path, scripted):
    whole = train(tmp_path, "whole")

    def crash(epoch, metrics):
        if epoch == 3:
            raise Crash

    with pytest.raises(Crash):
        train(tmp_path, "cut", on_epoch=crash)
    resumed = train(tmp_path, "cut", resume_from=tmp_path / "cut" / "last.pt")
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5]
    assert resumed.best_epoch == whole.best_epoch == 2
    a, b = (load_weights(tmp_path / f / "last.pt")["model_state"] for f in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resumed from the checkpoint of its stop, the run has nothing left to train
    again = train(tmp_path, "cut", resume_from=tmp_path / "cut" / "last.pt")
    assert [h["epoch"] for h in again.history] == [1, 2, 3, 4, 5] and again.best_epoch == 2


def test_early_stopping_with_keep_last_is_refused():
    with pytest.raises(ValueError, match=r"train.early_stopping=3 applies with train.keep=best only"):
        TrainSection(early_stopping=3, keep="last")


def test_the_step_budget_gives_a_tiny_table_the_promised_steps(tmp_path):
    prepared = blobs(n=60)  # 42 training rows: 2 batches of 32 an epoch
    cfg = TrainSection(epochs=2, batch_size=32, min_steps=25, device="cpu")
    result = train_model(prepared, MODEL, OPTIM, ScheduleConfig(), cfg, tmp_path / "run")
    assert len(result.history) == 13  # ceil(25 / 2) epochs: 26 steps, at least the 25 asked for
    # without a budget, train.epochs as set
    result = train_model(prepared, MODEL, OPTIM, ScheduleConfig(), cfg.model_copy(update={"min_steps": 0}), tmp_path)
    assert len(result.history) == 2


def test_a_per_step_schedule_sees_the_real_step_count(tmp_path):
    cfg = TrainSection(epochs=2, batch_size=32, min_steps=25, device="cpu")
    sched = ScheduleConfig(name="onecycle", max_lr=0.05)
    run = setup(blobs(n=60), MODEL, OPTIM, sched, cfg)
    assert run.epochs == 13 and run.schedule.scheduler.total_steps == 26
    cosine = setup(blobs(n=60), MODEL, OPTIM, ScheduleConfig(name="cosine"), cfg)
    assert cosine.schedule.scheduler.T_max == 13


@pytest.mark.parametrize("rows, expected", [(40, 32), (1_000, 32), (4_000, 128), (100_000, 256)])
def test_auto_batch_size_follows_the_training_rows(rows, expected):
    assert batch_size_for(TrainSection(batch_size="auto"), rows) == expected


def test_an_explicit_batch_size_wins_over_auto(tmp_path, caplog):
    prepared = blobs(n=600)  # 420 training rows
    with caplog.at_level(logging.INFO, logger="trainyard.train"):
        auto = setup(prepared, MODEL, OPTIM, ScheduleConfig(), TrainSection(batch_size="auto", device="cpu"))
        mine = setup(prepared, MODEL, OPTIM, ScheduleConfig(), TrainSection(batch_size=7, device="cpu"))
    assert (auto.batch_size, len(auto.source.train)) == (32, 14)
    assert (mine.batch_size, len(mine.source.train)) == (7, 60)
    cfg = load_config("csv", overrides=["data.path=x.csv", "data.target=y", "train.batch_size=7"], env={})
    assert cfg.train.batch_size == 7 and cfg.flat()["train.batch_size"] == 7  # what is logged to MLflow
    assert load_config("csv", overrides=["data.path=x.csv", "data.target=y"], env={}).train.batch_size == "auto"


def test_the_start_line_says_what_auto_chose(tmp_path, caplog):
    cfg = TrainSection(epochs=1, batch_size="auto", min_steps=30, early_stopping=4, device="cpu")
    with caplog.at_level(logging.INFO, logger="trainyard.train"):
        train_model(blobs(n=60), MODEL, OPTIM, ScheduleConfig(), cfg, tmp_path / "run")
    start = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("training mlp"))
    assert "for 15 epochs (train.min_steps=30) of 2 steps at batch 32 (train.batch_size=auto)" in start
    assert "stopping after 4 epochs without improvement" in start


@pytest.mark.parametrize("value", [0, -3, "big"])
def test_a_bad_batch_size_is_refused(value):
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config("mnist", overrides=[f"train.batch_size={value}"], env={})


def test_an_explicit_epoch_count_is_trained_as_given():
    data = ["data.path=x.csv", "data.target=y"]
    preset = load_config("csv", overrides=data, env={}).train
    assert preset.min_steps > 0 and preset.early_stopping > 0
    mine = load_config("csv", overrides=[*data, "train.epochs=3"], env={}).train
    assert (mine.epochs, mine.min_steps, mine.early_stopping) == (3, 0, 0)
    both = load_config("csv", overrides=[*data, "train.epochs=3", "train.early_stopping=2"], env={}).train
    assert (both.epochs, both.min_steps, both.early_stopping) == (3, 0, 2)


def test_monitor_loss_picks_the_epoch_of_the_lowest_validation_loss(tmp_path, monkeypatch):
    """train.monitor=loss: a classification run keeps the epoch of its lowest val/loss and stops after it,
    whatever the (still logged) accuracy says."""
    losses = [0.9, 0.5, 0.6, 0.4, 0.45, 0.5, 0.55, 0.3]  # lowest at epoch 4, then 3 epochs without a lower one
    real = train_module.validate

    def validate(run, epoch, lr_setting):
        _, name, _ = real(run, epoch, lr_setting)
        return losses[epoch - 1], name, SCRIPT[epoch - 1]  # accuracy would pick epoch 6 or later

    monkeypatch.setattr(train_module, "validate", validate)
    cfg = TrainSection(epochs=len(losses), batch_size=64, early_stopping=3, monitor="loss", device="cpu", seed=1)
    result = train_model(blobs(n=300), MODEL, OPTIM, SCHEDULE, cfg, tmp_path / "run")
    assert result.monitor == "val/loss" and result.best_epoch == 4 and math.isclose(result.best_metric, 0.4)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5, 6, 7]
    assert [h["val/accuracy"] for h in result.history] == SCRIPT[:7]  # the accuracy is still recorded
    auto = train_model(blobs(n=300), MODEL, OPTIM, SCHEDULE, cfg.model_copy(update={"monitor": "auto"}), tmp_path / "a")
    assert auto.monitor == "val/accuracy" and auto.best_epoch != 4
