"""TensorBoard's model graph, HParams and weight/gradient histograms, read back from the event files with
TensorBoard's own EventAccumulator: from `train_model`'s hooks, from two DDP processes and from whole flow runs."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pipelines.config import ModelConfig, OptimConfig, ScheduleConfig, TrainSection, load_config
from tasks.checkpoint import load_weights
from tasks.data import features
from tasks.errors import ConfigError
from tasks.launch import LaunchPlan, launch
from tasks.prepared import Prepared, save_prepared
from tasks.tracking import TensorBoardTracker
from tasks.train import train_model
from tasks.train_rank import RankHooks, RankJob, train_rank
from tests.test_train import blobs

MODEL = ModelConfig(name="mlp", hidden=[16], dropout=0.2)
OPTIM = OptimConfig(name="adam", lr=1e-2)
PARAMS = ["1.weight", "1.bias", "4.weight", "4.bias"]  # the MLP's Linear layers (Flatten, Linear, ReLU, Dropout, ...)


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def graph_events(folder: Path) -> int:
    """How many graph events the folder's event files hold (EventAccumulator keeps the last one only)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(folder.glob("events.out.tfevents.*"))
    return sum(event.HasField("graph_def") for f in files for event in EventFileLoader(str(f)).Load())


def hparams_of(acc) -> dict:
    """The run's HParams plugin data: {tag: HParamsPluginData}."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(data) for tag, data in content.items()}


def normalised(prepared: Prepared) -> Prepared:
    """The blobs with a normalisation in the schema, so that a raw row and a prepared one differ."""
    schema = {
        **prepared.schema,
        "normalize": {"scale": 1.0, "mean": [1.0, -2.0, 0.5, 3.0], "std": [2.0, 4.0, 1.0, 8.0]},
    }
    return Prepared(prepared.tensors, schema)


def train(prepared: Prepared, folder: Path, **hooks):
    cfg = TrainSection(epochs=3, batch_size=32, device="cpu", seed=5)
    return train_model(prepared, MODEL, OPTIM, ScheduleConfig(), cfg, folder, **hooks)


def same_weights(a: str, b: str) -> bool:
    wa, wb = load_weights(a)["model_state"], load_weights(b)["model_state"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---- train_model's hooks ---------------------------------------------------------------------------------


def test_the_graph_is_traced_once_from_prepared_rows_and_leaves_the_training_as_it_was(tmp_path):
    prepared = normalised(blobs(n=300))
    tb = TensorBoardTracker(tmp_path / "tb")
    seen = []

    def on_start(model, example):
        seen.append((model, example.clone(), model.training, torch.is_grad_enabled()))
        tb.log_graph(model, example)
        torch.rand(10)  # a hook that draws random numbers still leaves the training's draws alone

    with_graph = train(prepared, tmp_path / "graph", on_start=on_start)
    tb.close()
    plain = train(prepared, tmp_path / "plain")
    assert [h["train/loss"] for h in with_graph.history] == [h["train/loss"] for h in plain.history]
    assert same_weights(with_graph.checkpoint, plain.checkpoint)
    ((model, example, training, grad),) = seen  # once, before the first epoch
    assert isinstance(model, nn.Module) and not isinstance(model, nn.parallel.DistributedDataParallel)
    assert (training, grad) == (False, False)  # eval mode, no gradients: no dropout draws, nothing recorded
    assert example.dtype == torch.float32 and torch.allclose(example, features(prepared, "train")[:2])
    assert not torch.allclose(example, prepared.tensors["x_train"][:2])  # normalised as the batches are
    acc = events(tmp_path / "tb")
    assert acc.Tags()["graph"] and graph_events(tmp_path / "tb") == 1
    nodes = {n.name: n for n in acc.Graph().node}
    assert any(n.op == "aten::linear" for n in nodes.values())
    shape = nodes["input/input.1"].attr["_output_shapes"].list.shape[0]
    assert [d.size for d in shape.dim] == [2, 4]


def test_a_model_that_cannot_be_traced_trains_with_one_warning_line(tmp_path, monkeypatch, caplog, capsys):
    from torch.utils.tensorboard import SummaryWriter

    def refuse(self, model, *args, **kwargs):
        print("Error occurs, No graph saved")  # what torch's tracer prints before it raises
        raise RuntimeError("Tracer cannot infer type of output\nsecond line of the tracer's message")

    monkeypatch.setattr(SummaryWriter, "add_graph", refuse)
    tb = TensorBoardTracker(tmp_path / "tb")
    with caplog.at_level(logging.WARNING, logger="trainyard.tracking"):
        result = train(blobs(n=300), tmp_path / "run", on_start=tb.log_graph)
    tb.close()
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and Path(result.checkpoint).is_file()
    (record,) = [r for r in caplog.records if r.name == "trainyard.tracking"]
    assert record.getMessage() == (
        "TensorBoard: no model graph, the model could not be traced (RuntimeError: Tracer cannot infer type of output)"
    )
    assert "No graph saved" not in capsys.readouterr().out
    assert not events(tmp_path / "tb").Tags()["graph"]


def test_histograms_of_every_parameter_from_the_epoch_hook(tmp_path):
    tb = TensorBoardTracker(tmp_path / "tb")
    steps = []

    def on_epoch_model(epoch, model):
        steps.append(epoch)
        assert all(p.grad is not None for p in model.parameters())  # the last step's gradients
        tb.log_histograms(model, epoch)

    train(blobs(n=300), tmp_path / "run", on_epoch_model=on_epoch_model)
    tb.close()
    assert steps == [1, 2, 3]
    acc = events(tmp_path / "tb")
    expected = {f"weights/{p}" for p in PARAMS} | {f"gradients/{p}" for p in PARAMS}
    assert set(acc.Tags()["histograms"]) == expected
    for tag in expected:
        assert [e.step for e in acc.Histograms(tag)] == [1, 2, 3], tag
    weights = acc.Histograms("weights/1.weight")[-1].histogram_value
    assert weights.num == 16 * 4 and weights.min < 0 < weights.max


def test_hparams_land_in_the_runs_own_folder_beside_its_metrics(tmp_path):
    folder = tmp_path / "tb"
    with TensorBoardTracker(folder) as tb:
        tb.log_metrics({"test/accuracy": 0.75, "test/loss": 0.5}, step=3)
        tb.log_hparams({"optim.lr": 0.01, "model.name": "mlp", "train.epochs": 3}, {"test/accuracy": 0.75})
    assert [p for p in folder.iterdir() if p.is_dir()] == []  # not a sub-folder per call, as add_hparams makes
    data = hparams_of(events(folder))
    assert set(data) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    experiment = data["_hparams_/experiment"].experiment
    assert {h.name for h in experiment.hparam_infos} == {"optim.lr", "model.name", "train.epochs"}
    assert [m.name.tag for m in experiment.metric_infos] == ["test/accuracy"]
    values = data["_hparams_/session_start_info"].session_start_info.hparams
    assert values["optim.lr"].number_value == 0.01 and values["model.name"].string_value == "mlp"
    assert values["train.epochs"].number_value == 3
    assert events(folder).Scalars("test/accuracy")[0].value == 0.75


# ---- two DDP processes: rank 0 writes, with the module itself ------------------------------------------------


@contextlib.contextmanager
def tensorboard_hooks(folder: str, resume_from: Path | None):
    """Rank 0's hooks of the DDP test: the graph and every epoch's histograms (module level: picklable)."""
    with TensorBoardTracker(folder) as tb:
        yield RankHooks(on_start=tb.log_graph, on_epoch_model=lambda epoch, model: tb.log_histograms(model, epoch))


def test_rank_0_of_two_processes_writes_the_graph_and_histograms_of_the_unwrapped_module(tmp_path):
    save_prepared(tmp_path / "data", blobs(n=600))
    folder = tmp_path / "tb"
    train_cfg = TrainSection(epochs=2, batch_size=64, distributed={"nproc_per_node": 2, "timeout": 60})
    hooks = functools.partial(tensorboard_hooks, str(folder))
    job = RankJob(str(tmp_path / "data"), MODEL, OPTIM, ScheduleConfig(), train_cfg, str(tmp_path / "run"), hooks)
    result = launch(LaunchPlan(2, 1, f"tb-{time.monotonic_ns()}", log_dir=str(tmp_path / "launch")), train_rank, job)
    assert result.processes == 2
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1 and graph_events(folder) == 1  # rank 0 alone
    acc = events(folder)
    # the module's own parameter names: not the DDP wrapper's (module.1.weight, ...)
    expected = {f"weights/{p}" for p in PARAMS} | {f"gradients/{p}" for p in PARAMS}
    assert set(acc.Tags()["histograms"]) == expected
    assert [e.step for e in acc.Histograms("gradients/4.bias")] == [1, 2]


# ---- the config key ----------------------------------------------------------------------------------------


def test_histogram_every_is_checked_in_one_line(toy_csv):
    base = [f"data.path={toy_csv}", "data.target=label"]
    assert load_config("csv", overrides=base).tracking.histogram_every == 0  # off by default
    assert load_config("csv", overrides=[*base, "tracking.histogram_every=5"]).tracking.histogram_every == 5
    with pytest.raises(ConfigError, match="tracking.histogram_every: Input should be greater than or equal to 0"):
        load_config("csv", overrides=[*base, "tracking.histogram_every=-1"])
    with pytest.raises(ConfigError, match=r"histogram_every=2 writes TensorBoard histograms; set tracking.tensorboard"):
        load_config("csv", overrides=[*base, "tracking.histogram_every=2", "tracking.tensorboard=false"])


# ---- whole flow runs ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_a_flow_run_holds_its_graph_hparams_with_the_test_metrics_and_histograms(toy_csv, state_home):
    from pipelines.flow import train_flow
    from tests.test_flow import csv_config

    cfg = csv_config(toy_csv, "train.epochs=4", "tracking.histogram_every=2", "tracking.log_model=false")
    summary = train_flow(cfg)
    folder = Path(summary["tensorboard_dir"])
    assert [p for p in folder.iterdir() if p.is_dir()] == []  # everything in the run's own folder
    acc = events(folder)
    assert acc.Tags()["graph"] and graph_events(folder) == 1
    data = hparams_of(acc)
    assert data["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
    experiment = data["_hparams_/experiment"].experiment
    metrics = [m.name.tag for m in experiment.metric_infos]
    assert "test/accuracy" in metrics and sorted(metrics) == sorted(summary["test_metrics"])
    assert set(metrics) <= set(acc.Tags()["scalars"])  # the dashboard reads their values from the run's scalars
    values = data["_hparams_/session_start_info"].session_start_info.hparams
    flat = cfg.flat()
    assert set(values) == {k for k, v in flat.items() if v is not None}
    assert values["optim.lr"].number_value == pytest.approx(cfg.optim.lr)
    assert values["train.epochs"].number_value == 4 and values["tracking.histogram_every"].number_value == 2
    assert values["model.name"].string_value == "mlp" and values["data.target"].string_value == "label"
    assert values["data.drop"].string_value == '["id"]'  # a list, as the JSON MLflow's params hold too
    histograms = acc.Tags()["histograms"]
    assert {t.split("/")[0] for t in histograms} == {"weights", "gradients"}
    assert {t for t in histograms if t.startswith("weights/")} == {
        t.replace("gradients/", "weights/") for t in histograms if t.startswith("gradients/")
    }
    for tag in histograms:
        assert [e.step for e in acc.Histograms(tag)] == [2, 4], tag


@pytest.mark.usefixtures("prefect_harness")
def test_a_resumed_flow_run_keeps_one_graph_and_writes_no_histograms_by_default(toy_csv, state_home, monkeypatch):
    from pipelines.flow import train_flow
    from tests.conftest import crash_training_once
    from tests.test_flow import csv_config

    cfg = csv_config(toy_csv, "train.epochs=4", "train.batch_size=16", "tracking.log_model=false")
    calls = crash_training_once(monkeypatch, at_epoch=2)
    summary = train_flow.with_options(retries=1, retry_delay_seconds=0)(cfg)
    assert calls[0] is None and calls[1] is not None  # the retry resumed from epoch 2
    folder = Path(summary["tensorboard_dir"])
    acc = events(folder)
    assert graph_events(folder) == 1  # written by the first attempt; the resumed one leaves it
    assert acc.Tags()["histograms"] == []  # tracking.histogram_every=0
    assert "_hparams_/session_start_info" in hparams_of(acc)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
