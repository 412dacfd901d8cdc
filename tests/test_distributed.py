"""DDP on the CPU with gloo: sharding, the launcher, one writer, failures of one process, restarts.

Processes are started by the real elastic launcher (tasks/launch.py) or by `torchrun`; faults are
injected into one rank through tests/ddp_entries.py.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from pipelines.config import ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, TrainSection, load_config
from tasks.batching import ResidentBatcher, make_batches
from tasks.budget import process_batch
from tasks.checkpoint import load_weights
from tasks.distributed import World, padded_order, stride_rows
from tasks.errors import ConfigError, TrainingError
from tasks.launch import LaunchPlan, launch, processes_per_node
from tasks.prepared import save_prepared
from tasks.train import train_model
from tasks.train_rank import RankJob, train_rank
from tests import ddp_entries
from tests.test_train import blobs

MODEL = ModelConfig(name="mlp", hidden=[16], dropout=0.2)
NO_DROPOUT = ModelConfig(name="mlp", hidden=[16])  # dropout draws per process: the masks differ from one's
OPTIM = OptimConfig(name="adam", lr=1e-2)


def fake_world(rank: int, size: int) -> World:
    """A rank's place without a process group: enough for what shards the data."""
    return World(rank, size, rank, "gloo", torch.device("cpu"))


def job(tmp_path: Path, name: str, prepared=None, model: ModelConfig = MODEL, **train) -> RankJob:
    prepared = prepared or blobs(n=1000)
    folder = tmp_path / "data"
    if not folder.exists():
        save_prepared(folder, prepared)
    train.setdefault("epochs", 4)
    train.setdefault("batch_size", 64)
    train.setdefault("distributed", {"nproc_per_node": 2, "timeout": 60})
    return RankJob(str(folder), model, OPTIM, ScheduleConfig(), TrainSection(**train), str(tmp_path / name))


def plan(tmp_path: Path, restarts: int = 0) -> LaunchPlan:
    return LaunchPlan(2, 1, f"test-{time.monotonic_ns()}", max_restarts=restarts, log_dir=str(tmp_path / "launch"))


# ---- sharding, without processes --------------------------------------------------------------------------


@pytest.mark.parametrize("n, size", [(10, 2), (11, 2), (10, 3), (2, 3)])
def test_ranks_take_disjoint_strides_of_one_padded_order(n, size):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    parts = [padded_order(order, fake_world(r, size)) for r in range(size)]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == math.ceil(n / size)
    together = torch.cat(parts)
    assert set(together.tolist()) == set(range(n))  # every row, and only padding repeats one
    assert len(together) - n == (-n) % size


def test_resident_batches_of_two_ranks_make_the_one_process_batches():
    x, y = torch.arange(40.0).view(20, 2), torch.arange(20)
    one = ResidentBatcher(x, y, 8, device="cpu", seed=3)
    ranks = [ResidentBatcher(x, y, 4, device="cpu", seed=3, world=fake_world(r, 2)) for r in (0, 1)]
    for _ in range(2):  # two epochs: each reshuffles alike
        whole = [set(b.tolist()) for _, b in one]
        split = [set(a.tolist()) | set(b.tolist()) for (_, a), (_, b) in zip(*ranks, strict=True)]
        assert split == whole and len(ranks[0]) == len(one) == 3


def test_loader_path_shards_with_a_distributed_sampler_per_epoch(tmp_path):
    prepared = blobs(n=200)
    cfg = TrainSection(batch_size=10, gpu_resident="off")
    seen = []
    for rank in (0, 1):
        batches = make_batches(prepared, cfg, torch.device("cpu"), world=fake_world(rank, 2))
        epochs = []
        for epoch in (1, 2):
            batches.set_epoch(epoch)
            epochs.append(torch.cat([b for _, b in batches.train.loader]).numel())
        seen.append((epochs, batches.val.loader.dataset.x.shape[0]))
        order = [torch.cat([xb for xb, _ in batches.train.loader])[:, 0] for _ in range(1)]
        assert order[0].numel() == 70  # 140 train rows, half each
    val_rows = prepared.tensors["y_val"].shape[0]
    assert [s[1] for s in seen] == [len(range(r, val_rows, 2)) for r in (0, 1)]


def test_process_batch_shares_the_global_batch():
    assert process_batch(64, 1, False, True) == 64
    assert process_batch(64, 4, False, True) == 16
    assert process_batch(64, 4, True, True) == 64
    assert process_batch(100, 3, False, False) == 34  # auto's size rounds up
    with pytest.raises(ConfigError, match="train.batch_size=100 is the global batch"):
        process_batch(100, 3, False, True)


def test_stride_rows_without_a_world_is_everything():
    assert stride_rows(5, None) == slice(None)
    assert list(range(7))[stride_rows(7, fake_world(1, 3))] == [1, 4]


# ---- the section ----------------------------------------------------------------------------------------


def test_distributed_settings_are_checked():
    ok = load_config("mnist", overrides=["train.distributed.nproc_per_node=2", "train.distributed.batch=per_process"])
    assert ok.train.distributed.lr_factor(4) == 4.0
    assert TrainSection().distributed.single and processes_per_node(TrainSection().distributed, "cpu") == 1
    for bad, match in [
        (["train.distributed.nproc_per_node=0"], "expected auto or a number of processes"),
        (["train.distributed.rdzv_endpoint=nohost"], "expected host:port"),
        (["train.distributed.lr_scaling=sqrt"], "applies with batch=per_process only"),
        (["train.distributed.nproc_per_node=2", "train.cuda_graph=true"], "train.cuda_graph=true does not work"),
        (["train.distributed.nodes=2", "train.compile=true"], "train.compile=true does not work"),
        (["train.distributed.nproc_per_node=2", "optim.name=lbfgs", "optim.lr=1"], "optim.name=lbfgs"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config("mnist", overrides=bad)


def test_where_the_processes_meet_does_not_change_what_a_checkpoint_resumes():
    from tasks.checkpoint import fingerprint

    plain = TrainConfig()

    def key(processes=1, **distributed):
        train = plain.train.model_copy(update={"distributed": plain.train.distributed.model_copy(update=distributed)})
        return fingerprint(plain.model, plain.optim, plain.schedule, train, "k", processes)

    assert key() == key(4, rdzv_id="x", nproc_per_node=4, max_restarts=2, timeout=60.0)  # the same global batch
    assert key(2, batch="per_process") != key(4, batch="per_process")  # a per-process batch: another global one
    assert key(2, batch="per_process") != key(2)


# ---- processes through the launcher ---------------------------------------------------------------------


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_weights(a)["model_state"], load_weights(b)["model_state"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path):
    """The resident path: two ranks' strides of one seeded order make the one process's batches."""
    prepared = blobs(n=1000)
    two = launch(plan(tmp_path), train_rank, job(tmp_path, "two", prepared, gpu_resident="on", model=NO_DROPOUT))
    one = train_model(
        prepared,
        NO_DROPOUT,
        OPTIM,
        ScheduleConfig(),
        TrainSection(epochs=4, batch_size=64, gpu_resident="on"),
        tmp_path / "one",
    )
    assert two.processes == 2 and two.batch_size == 64 and len(two.history) == 4
    for a, b in zip(two.history, one.history, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
        assert a["val/accuracy"] == b["val/accuracy"]  # the whole validation split, each row once
    assert two.best_metric >= 0.95
    # rank 0 alone wrote the checkpoints
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["best.pt", "last.pt"]


def test_a_worker_killed_mid_epoch_is_restarted_and_ends_with_the_same_weights(tmp_path):
    steps = 1000 * 7 // 10 // 64 + 1  # steps per epoch: 700 train rows at a global batch of 64
    whole = launch(plan(tmp_path), train_rank, job(tmp_path, "whole"))
    cut = launch(plan(tmp_path, restarts=1), ddp_entries.entry("killed_once", 2 * steps + 3), job(tmp_path, "cut"))
    attempts = {p.name for p in (tmp_path / "launch" / "launcher").glob("*/attempt_*")}
    assert attempts == {"attempt_0", "attempt_1"}, "the group was not restarted"
    assert load_weights(tmp_path / "cut" / "last.pt")["epoch"] == 4
    assert same_weights(tmp_path / "whole" / "last.pt", tmp_path / "cut" / "last.pt")
    ranks = load_weights(tmp_path / "whole" / "last.pt")["rank_rng"]  # each rank's own dropout draws, restored
    assert len(ranks) == 2 and not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])
    assert [h["train/loss"] for h in cut.history] == [h["train/loss"] for h in whole.history]


def test_an_exception_on_one_rank_ends_both_with_its_message(tmp_path):
    start = time.monotonic()
    with pytest.raises(TrainingError, match=r"rank 1 of 2 failed: ValueError: the disk of rank 1 is on fire"):
        launch(plan(tmp_path), ddp_entries.entry("fails_on_rank_1", 15), job(tmp_path, "fail"))
    assert time.monotonic() - start < 60, "rank 0 waited for the collective timeout instead of being stopped"


def test_a_nan_loss_on_one_rank_stops_every_rank_with_the_same_message(tmp_path):
    with pytest.raises(
        TrainingError, match=r"training loss became nan in epoch 2 .*\(training process rank [01] of 2\)"
    ):
        launch(plan(tmp_path), ddp_entries.entry("nan_on_rank_1", 13), job(tmp_path, "nan"))
    errors = sorted((tmp_path / "launch" / "errors").glob("rank-*-error.json"))
    messages = {json.loads(p.read_text())["message"] for p in errors}
    assert len(errors) == 2 and len(messages) == 1  # both ranks stopped, with one message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_process_through_the_launcher_with_nccl_trains_as_the_plain_path(tmp_path):
    prepared = blobs(n=1000)
    settings = {"epochs": 3, "batch_size": 64, "device": "cuda", "gpu_resident": "on", "precision": "fp32"}
    one_plan = LaunchPlan(1, 1, "cuda-test", log_dir=str(tmp_path / "launch"))
    launched = launch(
        one_plan, train_rank, job(tmp_path, "launched", prepared, distributed={"backend": "nccl"}, **settings)
    )
    plain = train_model(prepared, MODEL, OPTIM, ScheduleConfig(), TrainSection(**settings), tmp_path / "plain")
    assert launched.processes == 1 and launched.device.startswith("cuda")
    a, b = (
        load_weights(tmp_path / "launched" / "last.pt")["model_state"],
        load_weights(tmp_path / "plain" / "last.pt")["model_state"],
    )
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert [h["val/accuracy"] for h in launched.history] == [h["val/accuracy"] for h in plain.history]
