import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks._common import split_tensors
from pipelines.config import DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainSection
from tasks.checkpoint import load_weights
from tasks.errors import TrainingError
from tasks.ingest import ingest
from tasks.optimisation import Schedule, build_optimizer, build_scheduler, loss_for
from tasks.prepared import Prepared, load_prepared
from tasks.train import train_model

OPTIMIZER_NAMES = list(OptimConfig.model_fields["name"].annotation.__args__)


def blobs(n=600, k=3, dim=4, seed=0) -> Prepared:
    """k well separated Gaussian blobs: a clearly separable problem."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=g) * 6
    y = torch.randint(0, k, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    cut1, cut2 = int(n * 0.7), int(n * 0.85)
    tensors = split_tensors(x, y, cut1, cut2)
    schema = {
        "task": "classification",
        "binary": False,
        "n_classes": k,
        "label_names": [str(i) for i in range(k)],
        "input_shape": [dim],
        "output_size": k,
        "normalize": None,
        "key": "blobs",
    }
    return Prepared(tensors, schema)


def run(prepared, tmp_path, model=None, optim=None, schedule=None, **train):
    train.setdefault("epochs", 3)
    train.setdefault("batch_size", 32)
    return train_model(
        prepared,
        model or ModelConfig(name="mlp", hidden=[16]),
        optim or OptimConfig(name="adam", lr=1e-2),
        schedule or ScheduleConfig(),
        TrainSection(**train),
        tmp_path / "ckpt",
    )


def test_learns_a_separable_problem_and_saves_best(tmp_path):
    from tasks.evaluate import evaluate_model

    prepared = blobs()
    result = run(prepared, tmp_path, epochs=5)
    assert result.monitor == "val/accuracy" and 1 <= result.best_epoch <= 5
    state = load_weights(result.checkpoint)
    assert state["epoch"] == result.best_epoch and math.isclose(state["metric"], result.best_metric)
    ev = evaluate_model(prepared, ModelConfig(name="mlp", hidden=[16]), result.checkpoint, tmp_path / "eval")
    assert ev.metrics["test/accuracy"] > 0.95
    report = json.loads(Path(ev.files["metrics_json"]).read_text())
    assert set(report) == {"metrics", "confusion_matrix", "per_class", "task", "checkpoint_epoch"}
    assert report["metrics"] == ev.metrics and report["checkpoint_epoch"] == ev.checkpoint_epoch == result.best_epoch
    assert (
        report["confusion_matrix"] == ev.details["confusion_matrix"] and ev.task == report["task"] == "classification"
    )


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_trains(name, tmp_path):
    lr = {"adadelta": 1.0, "lbfgs": 0.5, "sgd": 0.1, "asgd": 0.1, "rprop": 0.01}.get(name, 1e-2)
    result = run(blobs(n=300), tmp_path, optim=OptimConfig(name=name, lr=lr), epochs=2)
    assert len(result.history) == 2 and all(math.isfinite(h["train/loss"]) for h in result.history)
    # it learns: the loss falls (an optimizer whose step did nothing stays near 1.0x) and the
    # validation accuracy is well above chance (1/3); the slowest here, adadelta and radam, reach 0.5x and 0.64
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"] * 0.8
    assert result.history[-1]["val/accuracy"] > 0.5


def test_optimizer_kwargs_are_passed_and_checked():
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(params, OptimConfig(name="adam", kwargs={"betas": [0.8, 0.9], "amsgrad": True}))
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["amsgrad"] is True
    with pytest.raises(TrainingError, match="optimizer 'adam' refused its arguments"):
        build_optimizer(params, OptimConfig(name="adam", kwargs={"nesterov": True}))


def lrs(name, epochs=6, steps=4, **kw):
    """The LR at the start of each epoch (and per batch for onecycle) as the train loop steps it."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched: Schedule = build_scheduler(
        opt, ScheduleConfig(name=name, **kw), OptimConfig(name="sgd", lr=1.0), epochs, steps, True
    )
    seen = []
    for _ in range(epochs):
        seen.append(opt.param_groups[0]["lr"])
        for _ in range(steps):
            opt.step()
            sched.step_batch()
        sched.step_epoch(0.5)  # a flat validation metric: plateau must decay
    return seen, sched.when


def test_schedulers_step_at_the_right_moment():
    seen, when = lrs("step", step_size=2, gamma=0.5)
    assert when == "epoch" and seen == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    seen, _ = lrs("multistep", milestones=[1, 4], gamma=0.1)
    assert np.allclose(seen, [1.0, 0.1, 0.1, 0.1, 0.01, 0.01])
    seen, _ = lrs("exponential", gamma=0.5)
    assert np.allclose(seen, [0.5**i for i in range(6)])
    seen, _ = lrs("cosine", t_max=6)
    assert seen[0] == 1.0 and seen[3] == pytest.approx(0.5) and seen == sorted(seen, reverse=True)
    seen, _ = lrs("lambda", lr_lambda="1 / (1 + epoch)")
    assert np.allclose(seen, [1 / (1 + i) for i in range(6)])
    seen, when = lrs("plateau", patience=1, factor=0.5)
    assert when == "plateau" and seen[0] == 1.0 and seen[-1] < 1.0
    seen, when = lrs("onecycle", max_lr=1.0)
    assert when == "batch" and seen[0] < 0.1 and max(seen) > 0.5  # warms up within the first epochs
    seen, when = lrs("none")
    assert when == "none" and seen == [1.0] * 6


def test_onecycle_trains_to_the_end(tmp_path):
    result = run(blobs(), tmp_path, schedule=ScheduleConfig(name="onecycle", max_lr=0.05), epochs=3)
    assert result.history[-1]["lr"] < result.history[1]["lr"]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_onecycle_works_with_every_optimizer(name, tmp_path):
    """OneCycle cycles the momentum (or beta1) where the optimizer has one, the learning rate alone otherwise."""
    result = run(
        blobs(n=300),
        tmp_path,
        optim=OptimConfig(name=name, lr=0.01),
        schedule=ScheduleConfig(name="onecycle", max_lr=0.05),
        epochs=3,
    )
    assert len(result.history) == 3 and all(math.isfinite(h["train/loss"]) for h in result.history)
    assert result.history[-1]["lr"] < result.history[1]["lr"]


@pytest.mark.parametrize("cycle", [True, False])
def test_onecycle_cycles_the_momentum_only_when_asked(cycle):
    model = torch.nn.Linear(3, 2)
    adam = build_optimizer(model.parameters(), OptimConfig(name="adam", lr=0.01, kwargs={"betas": [0.7, 0.9]}))
    sched_cfg = ScheduleConfig(name="onecycle", max_lr=0.01, cycle_momentum=cycle, base_momentum=0.8, max_momentum=0.9)
    schedule = build_scheduler(
        adam, sched_cfg, OptimConfig(name="adam", lr=0.01), epochs=2, steps_per_epoch=10, maximize=True
    )
    seen = set()
    for _ in range(20):
        adam.step()
        schedule.step_batch()
        seen.add(round(adam.param_groups[0]["betas"][0], 6))
    assert adam.param_groups[0]["betas"][1] == 0.9
    if cycle:
        assert min(seen) >= 0.8 - 1e-9 and max(seen) <= 0.9 + 1e-9 and len(seen) > 5
    else:
        assert seen == {0.7}  # the configured beta1 is kept


def test_losses_follow_the_task():
    assert isinstance(loss_for({"task": "classification", "binary": False}), torch.nn.CrossEntropyLoss)
    assert isinstance(loss_for({"task": "classification", "binary": True}), torch.nn.BCEWithLogitsLoss)
    assert isinstance(loss_for({"task": "regression"}), torch.nn.MSELoss)


def test_binary_label_smoothing_matches_two_class_cross_entropy():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0])
    smoothed = loss_for({"task": "classification", "binary": True}, label_smoothing=0.2)(logits, targets)
    # the same model as two-class logits [0, z]: CrossEntropyLoss's own label smoothing gives the same loss
    two_class = torch.stack([torch.zeros_like(logits), logits], dim=1)
    expected = torch.nn.CrossEntropyLoss(label_smoothing=0.2)(two_class, targets.long())
    assert torch.allclose(smoothed, expected)
    assert not torch.allclose(smoothed, loss_for({"task": "classification", "binary": True})(logits, targets))


def test_same_seed_same_weights(tmp_path):
    a = load_weights(run(blobs(), tmp_path / "a", seed=7).checkpoint)["model_state"]
    b = load_weights(run(blobs(), tmp_path / "b", seed=7).checkpoint)["model_state"]
    c = load_weights(run(blobs(), tmp_path / "c", seed=8).checkpoint)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    prepared = blobs()
    prepared.tensors["x_train"][0, 0] = float("nan")
    with pytest.raises(TrainingError, match="training loss became nan in epoch 1"):
        run(prepared, tmp_path)


def test_train_mode_for_training_eval_and_no_grad_for_validation(tmp_path, monkeypatch):
    import tasks.runtime as R

    calls = []
    real_build = R.build_model

    def build_with_hook(*a, **kw):
        model = real_build(*a, **kw)
        model.register_forward_hook(lambda m, i, o: calls.append((m.training, torch.is_grad_enabled())))
        return model

    monkeypatch.setattr(R, "build_model", build_with_hook)
    run(blobs(n=300), tmp_path, model=ModelConfig(name="mlp", hidden=[8], dropout=0.5), epochs=2, batch_size=64)
    assert (True, True) in calls and (False, False) in calls
    assert set(calls) == {(True, True), (False, False)}  # never training without grad, never eval with grad


def test_binary_csv_and_regression_learn(tmp_path, toy_csv, state_home):
    from tasks.evaluate import evaluate_model

    prepared = load_prepared(ingest(DataConfig(source="csv", path=str(toy_csv), target="label"), state_home).path)
    model = ModelConfig(name="mlp", hidden=[16])
    result = run(prepared, tmp_path / "bin", model=model, epochs=15)
    ev = evaluate_model(prepared, model, result.checkpoint, tmp_path / "ev")
    assert ev.metrics["test/accuracy"] > 0.9

    import pandas as pd

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    df = pd.DataFrame(
        {"a": x[:, 0], "b": x[:, 1], "y": 4 * x[:, 0] - 2 * x[:, 1] + 100 + rng.normal(scale=0.1, size=400)}
    )
    path = tmp_path / "reg.csv"
    df.to_csv(path, index=False)
    reg = load_prepared(ingest(DataConfig(source="csv", path=str(path), target="y"), state_home).path)
    result = run(
        reg, tmp_path / "reg", model=ModelConfig(name="linear"), optim=OptimConfig(name="adam", lr=0.05), epochs=20
    )
    ev = evaluate_model(reg, ModelConfig(name="linear"), result.checkpoint, tmp_path / "ev2")
    assert result.monitor == "val/loss"
    assert ev.metrics["test/r2"] > 0.99 and ev.metrics["test/mae"] < 0.5
    report = json.loads(Path(ev.files["metrics_json"]).read_text())
    assert set(report) == {"metrics", "task", "checkpoint_epoch"} and ev.details == {}
