"""Checkpoints and resume: an interrupted run continues from its last checkpoint and ends with the
same weights as an uninterrupted one (on the CPU); a checkpoint of other data or settings is refused;
a failed checkpoint write leaves the previous one intact."""

from __future__ import annotations

import errno

import pytest
import torch

from pipelines.config import ModelConfig, OptimConfig, ScheduleConfig, TrainSection
from tasks.checkpoint import load_weights
from tasks.errors import TrainingError
from tasks.train import train_model
from tests.conftest import prepared_digits


def digits(n=600):
    return prepared_digits(n, 3)


MODEL = ModelConfig(name="cnn", channels=[4, 8], hidden=[16], dropout=0.3)
OPTIM = OptimConfig(name="adamw", lr=3e-3)


class Crash(Exception):
    pass


def crash_after(epoch_to_crash: int):
    def on_epoch(epoch, metrics):
        if epoch == epoch_to_crash:
            raise Crash(f"killed after epoch {epoch}")

    return on_epoch


@pytest.mark.parametrize(
    "resident, workers", [("off", 0), ("off", 2), ("on", 0)], ids=["loader", "loader-2-workers", "resident"]
)
@pytest.mark.parametrize("schedule", ["onecycle", "plateau"])
def test_resumed_run_ends_with_the_same_weights(tmp_path, resident, workers, schedule):
    prepared = digits()
    sched = ScheduleConfig(name=schedule, **({"max_lr": 5e-3} if schedule == "onecycle" else {"patience": 0}))
    train = TrainSection(
        epochs=4, batch_size=32, seed=5, gpu_resident=resident, augment="shift", device="cpu", num_workers=workers
    )
    whole = train_model(prepared, MODEL, OPTIM, sched, train, tmp_path / "whole")
    with pytest.raises(Crash):
        train_model(prepared, MODEL, OPTIM, sched, train, tmp_path / "cut", on_epoch=crash_after(2))
    assert load_weights(tmp_path / "cut" / "last.pt")["epoch"] == 2
    resumed = train_model(
        prepared, MODEL, OPTIM, sched, train, tmp_path / "cut", resume_from=tmp_path / "cut" / "last.pt"
    )
    a = load_weights(tmp_path / "whole" / "last.pt")["model_state"]
    b = load_weights(tmp_path / "cut" / "last.pt")["model_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["train/loss"] for h in resumed.history] == [h["train/loss"] for h in whole.history]
    assert resumed.best_epoch == whole.best_epoch


def test_checkpoint_holds_everything_needed(tmp_path):
    train = TrainSection(epochs=2, batch_size=64, device="cpu", precision="fp32")
    train_model(digits(), MODEL, OPTIM, ScheduleConfig(name="step", step_size=1), train, tmp_path)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)  # loads without unpickling code
    assert {
        "model_state",
        "optimizer_state",
        "scheduler_state",
        "scaler_state",
        "epoch",
        "rng",
        "batch_rng",
        "dataset_key",
        "fingerprint",
    } <= set(ck)
    assert set(ck["rng"]) >= {"torch", "numpy", "python"} and ck["dataset_key"] == "digits"


def test_checkpoint_of_other_settings_or_data_is_refused(tmp_path):
    prepared = digits()
    train = TrainSection(epochs=2, batch_size=64, device="cpu")
    train_model(prepared, MODEL, OPTIM, ScheduleConfig(), train, tmp_path)
    other_lr = OptimConfig(name="adamw", lr=1e-2)
    with pytest.raises(TrainingError, match="written by a run with other data or settings.*refusing to resume"):
        train_model(
            prepared, MODEL, other_lr, ScheduleConfig(), train, tmp_path / "b", resume_from=tmp_path / "last.pt"
        )
    prepared.schema["key"] = "other-data"
    with pytest.raises(TrainingError, match="refusing to resume"):
        train_model(prepared, MODEL, OPTIM, ScheduleConfig(), train, tmp_path / "c", resume_from=tmp_path / "last.pt")
    with pytest.raises(TrainingError, match="not a resume checkpoint"):
        train_model(digits(), MODEL, OPTIM, ScheduleConfig(), train, tmp_path / "d", resume_from=tmp_path / "best.pt")


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import tasks.checkpoint as C

    train = TrainSection(epochs=3, batch_size=64, device="cpu")
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get("kind") == "resume":
            calls["n"] += 1
            if calls["n"] == 2:  # the second resume checkpoint: write half, then the disk is full
                with open(f, "wb") as fh:
                    fh.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(C.torch, "save", save)
    with pytest.raises(OSError, match="No space left"):
        train_model(digits(), MODEL, OPTIM, ScheduleConfig(), train, tmp_path)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["epoch"] == 1  # the previous checkpoint, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_resume_continues_on_cuda(tmp_path):
    """On CUDA (resident data, bf16, fused optimizer) a resumed run restores every state and finishes;
    bit-equality is only claimed on the CPU."""
    prepared = digits()
    train = TrainSection(epochs=3, batch_size=32, seed=5, device="cuda", augment="shift")
    with pytest.raises(Crash):
        train_model(prepared, MODEL, OPTIM, ScheduleConfig(name="onecycle"), train, tmp_path, on_epoch=crash_after(1))
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and "cuda" in ck["rng"]
    resumed = train_model(
        prepared, MODEL, OPTIM, ScheduleConfig(name="onecycle"), train, tmp_path, resume_from=tmp_path / "last.pt"
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3] and resumed.device.startswith("cuda")
