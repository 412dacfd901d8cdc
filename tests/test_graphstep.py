"""train.cuda_graph: the whole training step recorded once as a CUDA graph and replayed.

On the CPU, `RecordedStep` stands in for the two CUDA-only parts (the warm-up side stream and
the graph itself) so that the rest of GraphedStep runs: which steps are warm-up, capture,
replay or eager, the tensor learning rate the scheduler fills, the loss bookkeeping on the
device, gradients kept across eager steps, a resume from a saved optimizer. Tests named
test_gpu_* record real CUDA graphs and are skipped without CUDA (benchmarks/gpu_check.sh runs
this file on a GPU). No timing assertions here.
"""

import contextlib
import logging
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.config import ConfigError, ModelConfig, OptimConfig, ScheduleConfig, TrainSection, load_config
from tasks.checkpoint import load_weights
from tasks.errors import TrainingError
from tasks.graphstep import WARMUP_STEPS, GraphedStep
from tasks.train import train_model
from tests.test_fastpath import digits
from tests.test_train import blobs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class RecordedStep(GraphedStep):
    """GraphedStep with CPU stand-ins for its CUDA parts. The warm-up runs on the current stream;
    the 'graph' replays the recorded step and, as a CUDA graph's replay does, overwrites the
    gradient tensors its capture allocated (here: zeroed in place, then accumulated into)."""

    def _side_stream(self):
        return contextlib.nullcontext()

    def _record(self, step):
        def replay():
            for p in self.params:
                if p.grad is not None:
                    p.grad.zero_()
            step()

        return replay


def _net(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(prepared, batch_size, epoch):
    x, y = prepared.tensors["x_train"], prepared.tensors["y_train"]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
    return [(x[order[i : i + batch_size]], y[order[i : i + batch_size]]) for i in range(0, len(y), batch_size)]


def _optim(model):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-2, total_steps=14, cycle_momentum=False)
    return optimizer, sched


def _eager_epochs(prepared, epochs=2, batch_size=64, clip=1.0):
    model = _net()
    optimizer, sched = _optim(model)
    losses = []
    for epoch in range(epochs):
        total, seen = 0.0, 0
        for x, y in _batches(prepared, batch_size, epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            sched.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        losses.append(total / seen)
    return model, losses


def _graphed(model, optimizer, batch_size=64, clip=1.0):
    return RecordedStep(
        model.parameters(), lambda x, y: F.cross_entropy(model(x), y), optimizer, torch.device("cpu"), batch_size, clip
    )


def test_recorded_steps_train_as_the_eager_loop_does():
    prepared = blobs()  # 420 training rows: six batches of 64 and one of 36 per epoch
    eager, eager_losses = _eager_epochs(prepared)
    model = _net()
    optimizer, sched = _optim(model)
    step = _graphed(model, optimizer)
    losses, grads_after_capture = [], None
    for epoch in range(2):
        step.begin_epoch()
        for x, y in _batches(prepared, 64, epoch):
            step(x, y)
            sched.step()
            if step.replays == 1 and grads_after_capture is None:
                grads_after_capture = [p.grad for p in model.parameters()]
        loss, bad, n = step.end_epoch()
        assert (bad, n) == (-1, 7)
        losses.append(loss)
    for a, b in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the tensor lr is float32, the eager one a float
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    # epoch 1: 3 warm-up steps, then the capture's replay and 2 more; the 36-row batches run eagerly
    assert step.replays == (6 - WARMUP_STEPS) + 6 and step.eager_steps == WARMUP_STEPS + 2
    # the eager steps after the capture zeroed the graph's gradient tensors in place, never replaced them
    assert all(p.grad is g for p, g in zip(model.parameters(), grads_after_capture, strict=True))
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == pytest.approx(float(sched.get_last_lr()[0]), rel=1e-6)


class FailingCapture(RecordedStep):
    def _record(self, step):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def test_a_failed_capture_trains_on_eagerly_with_a_warning(caplog):
    prepared = blobs()
    eager, eager_losses = _eager_epochs(prepared)
    model = _net()
    optimizer, sched = _optim(model)
    step = FailingCapture(
        model.parameters(), lambda x, y: F.cross_entropy(model(x), y), optimizer, torch.device("cpu"), 64, 1.0
    )
    losses = []
    with caplog.at_level(logging.WARNING, logger="trainyard.train"):
        for epoch in range(2):
            step.begin_epoch()
            for x, y in _batches(prepared, 64, epoch):
                step(x, y)
                sched.step()
            losses.append(step.end_epoch()[0])
    assert (
        "the step could not be recorded (RuntimeError: operation not permitted when stream is capturing); "
        "training eagerly" in caplog.text
    )
    assert caplog.text.count("could not be recorded") == 1  # tried once, not at every step
    assert step.replays == 0 and step.eager_steps == 14
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for a, b in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_summary_line_parser_reads_the_counts():
    line = "INFO trainyard.train: train.cuda_graph: 15 steps replayed from the graph, 6 eager"
    assert _captured_counts(line) == (15, 6)


def test_a_loaded_optimizer_state_keeps_the_fused_step_of_this_machine():
    from tasks.checkpoint import load_optimizer_state

    model = _net()
    plain = torch.optim.Adam(model.parameters(), lr=1e-2)  # as built on a machine without fused kernels
    model(torch.randn(8, 4)).sum().backward()
    plain.step()
    saved = plain.state_dict()
    assert saved["param_groups"][0]["fused"] is None
    fused = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)  # as build_optimizer does on CUDA
    load_optimizer_state(fused, saved)
    assert fused.param_groups[0]["fused"] is True
    assert all(s["step"].dtype == torch.float32 and float(s["step"]) == 1.0 for s in fused.state.values())
    fused.step()  # the fused kernel accepts the loaded state
    assert all(float(s["step"]) == 2.0 for s in fused.state.values())


def test_recorded_steps_name_the_first_non_finite_step():
    prepared = blobs()
    model = _net()
    optimizer, _ = _optim(model)
    step = _graphed(model, optimizer, clip=0.0)
    step.begin_epoch()
    for i, (x, y) in enumerate(_batches(prepared, 64, 0), start=1):
        if i == 5:  # a replayed step
            x = x.clone()
            x[0, 0] = float("nan")
        step(x, y)
    loss, bad, n = step.end_epoch()
    assert bad == 5 and n == 7 and step.replays >= 1


def test_a_resumed_optimizer_with_a_tensor_lr_continues_the_same_way(tmp_path):
    prepared = blobs()
    straight = _net()
    opt, sched = _optim(straight)
    step = _graphed(straight, opt)
    for epoch in range(2):
        for x, y in _batches(prepared, 64, epoch):
            step(x, y)
            sched.step()

    first = _net()
    opt1, sched1 = _optim(first)
    step1 = _graphed(first, opt1)
    for x, y in _batches(prepared, 64, 0):
        step1(x, y)
        sched1.step()
    saved = {"model": first.state_dict(), "optim": opt1.state_dict(), "sched": sched1.state_dict()}
    torch.save(saved, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", map_location="cpu", weights_only=True)
    resumed = _net(seed=1)
    opt2, sched2 = _optim(resumed)
    resumed.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["optim"])
    sched2.load_state_dict(ck["sched"])
    step2 = _graphed(resumed, opt2)  # the loaded lr (a tensor) becomes a fresh one on the device
    for x, y in _batches(prepared, 64, 1):
        step2(x, y)
        sched2.step()
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_on_the_cpu_the_setting_trains_eagerly_with_a_warning(tmp_path, caplog):
    sched = ScheduleConfig(name="onecycle", cycle_momentum=False)
    common = dict(epochs=2, batch_size=32, device="cpu")
    with caplog.at_level(logging.WARNING, logger="trainyard.train"):
        graphed = train_model(
            blobs(),
            ModelConfig(name="mlp", hidden=[8]),
            OptimConfig(),
            sched,
            TrainSection(cuda_graph=True, **common),
            tmp_path / "g",
        )
    assert "train.cuda_graph needs CUDA; training eagerly on cpu" in caplog.text
    plain = train_model(
        blobs(), ModelConfig(name="mlp", hidden=[8]), OptimConfig(), sched, TrainSection(**common), tmp_path / "p"
    )
    assert [h["train/loss"] for h in graphed.history] == [h["train/loss"] for h in plain.history]


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("optim", "name", "rmsprop", "train.cuda_graph needs optim.name adam, adamw or sgd"),
        ("train", "precision", "fp16", "train.precision=fp16"),
        ("train", "compile", True, "train.cuda_graph and train.compile exclude each other"),
        ("schedule", "cycle_momentum", True, "set schedule.cycle_momentum=false"),
    ],
)
def test_settings_a_graph_cannot_hold_are_refused(section, key, value, message, tmp_path):
    base = ["train.cuda_graph=true", "schedule.cycle_momentum=false"]
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("mnist-fast", overrides=base + [f"{section}.{key}={str(value).lower()}"])
    # train_model refuses them too when called with the sections alone, before it trains
    cfg = load_config("mnist-fast", overrides=base + ["train.device=cpu"])
    parts = {"optim": cfg.optim, "schedule": cfg.schedule, "train": cfg.train}
    parts[section] = parts[section].model_copy(update={key: value, **({"kwargs": {}} if key == "name" else {})})
    with pytest.raises(TrainingError, match=message.replace(".", r"\.")):
        train_model(digits(200), cfg.model, parts["optim"], parts["schedule"], parts["train"], tmp_path)


@pytest.mark.parametrize("kwargs", ["{foreach: true}", "{fused: false}", "{differentiable: true}"])
def test_sgd_without_its_fused_step_is_refused(kwargs, tmp_path):
    sets = ["train.cuda_graph=true", "optim.name=sgd", "optim.momentum=0.9", f"optim.kwargs={kwargs}"]
    with pytest.raises(
        ConfigError,
        match=r"train\.cuda_graph (with optim\.name=sgd needs its fused step"
        r"|does not work with optim\.kwargs differentiable)",
    ):
        load_config("mnist", overrides=sets)
    cfg = load_config(
        "mnist", overrides=["train.cuda_graph=true", "optim.name=sgd", "optim.momentum=0.9", "train.device=cpu"]
    )
    optim = cfg.optim.model_copy(update={"kwargs": {"foreach": True}})
    with pytest.raises(TrainingError, match=r"needs its fused step"):
        train_model(digits(200), cfg.model, optim, cfg.schedule, cfg.train, tmp_path)
    assert load_config("mnist", overrides=sets[:3]).train.cuda_graph  # sgd's own fused step is fine


def test_mnist_fast_with_the_graph_loads():
    cfg = load_config("mnist-fast", overrides=["train.cuda_graph=true", "schedule.cycle_momentum=false"])
    assert cfg.train.cuda_graph and not cfg.schedule.cycle_momentum


# ---- on a CUDA device -------------------------------------------------------------------------


def _captured_counts(text: str) -> tuple[int, int]:
    found = re.search(r"train\.cuda_graph: (\d+) steps replayed from the graph, (\d+) eager", text)
    assert found, "no summary line of the graphed steps in the log"
    return int(found[1]), int(found[2])


@needs_cuda
def test_gpu_graph_matches_the_eager_step(tmp_path, caplog):
    prepared = blobs()
    common = dict(epochs=3, batch_size=64, device="cuda", precision="fp32", gpu_resident="on", grad_clip=1.0)
    sched = ScheduleConfig(name="onecycle", cycle_momentum=False, max_lr=3e-2)
    runs = {}
    for graph in (False, True):
        with caplog.at_level(logging.INFO, logger="trainyard.train"):
            runs[graph] = train_model(
                prepared,
                ModelConfig(name="mlp", hidden=[16]),
                OptimConfig(lr=1e-2),
                sched,
                TrainSection(cuda_graph=graph, **common),
                tmp_path / str(graph),
            )
    replayed, eager = _captured_counts(caplog.text)
    assert replayed == 3 * 6 - WARMUP_STEPS and eager == WARMUP_STEPS + 3
    weights = {g: load_weights(tmp_path / str(g) / "best.pt")["model_state"] for g in runs}
    for k in weights[False]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-4, atol=1e-5)
    for h_graph, h_eager in zip(runs[True].history, runs[False].history, strict=True):
        assert h_graph["train/loss"] == pytest.approx(h_eager["train/loss"], rel=1e-4)
        assert h_graph["lr"] == pytest.approx(h_eager["lr"], rel=1e-5)


@needs_cuda
def test_gpu_mnist_fast_with_the_graph_learns(tmp_path, caplog):
    cfg = load_config(
        "mnist-fast", overrides=["train.epochs=2", "train.cuda_graph=true", "schedule.cycle_momentum=false"]
    )
    with caplog.at_level(logging.INFO, logger="trainyard.train"):
        result = train_model(digits(1200), cfg.model, cfg.optim, cfg.schedule, cfg.train, tmp_path)
    assert result.precision == "bf16"
    replayed, _ = _captured_counts(caplog.text)
    assert replayed > 0
    # 2 epochs on 1,200 synthetic digits: well above chance (0.1), as the eager preset's test asks
    assert result.history[-1]["val/accuracy"] > 0.5
