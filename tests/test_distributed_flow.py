"""DDP through the whole flow and under plain `torchrun`: one MLflow run written by rank 0, metrics
logged once per epoch, test rows counted once; two "nodes" on loopback meeting by c10d rendezvous."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import TrainConfig, load_config
from tasks.prepared import save_prepared
from tests.services import free_port
from tests.test_train import blobs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.usefixtures("prefect_harness")
def test_two_processes_through_the_flow_make_one_run(toy_csv, state_home):
    from pipelines.flow import train_flow

    settings = ["data.target=label", "data.drop=[id]", "train.epochs=6", "train.min_steps=0", "train.early_stopping=0"]
    cfg = load_config("csv", overrides=[f"data.path={toy_csv}", *settings, "train.distributed.nproc_per_node=2"])
    summary = train_flow(cfg)
    client = MlflowClient(summary["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("trainyard").experiment_id])  # not one per rank
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["train.processes"] == "2"
    for key in ("train/loss", "val/loss", "val/accuracy"):  # rank 0 alone logs, once per epoch
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, 7)), key
    assert summary["test_metrics"]["test/accuracy"] > 0.9  # the band of one process (tests/test_flow.py)
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "evaluation/metrics.json")).read_text())
    assert sum(map(sum, report["confusion_matrix"])) == summary["dataset"]["split_sizes"]["test"]
    from tests.test_flow import tb_events

    assert [e.step for e in tb_events(Path(summary["tensorboard_dir"])).Scalars("train/loss")] == list(range(1, 7))


def test_two_nodes_on_loopback_meet_by_c10d_rendezvous(tmp_path):
    """Two launcher processes (`torchrun --nnodes 2`), one training process each, as two machines would."""
    folder = save_prepared(tmp_path / "data", blobs(n=1000))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("loopback")).info.run_id
    store_uri = (tmp_path / "store").as_uri()
    cfg = TrainConfig.model_validate(
        {
            "model": {"name": "mlp", "hidden": [16]},
            "optim": {"name": "adam", "lr": 0.01},
            "train": {"epochs": 3, "batch_size": 64, "distributed": {"nodes": 2, "timeout": 60}},
        }
    )
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id[:12]]
    worker = ["-m", "pipelines.train_worker", "--config-json", cfg.model_dump_json(), "--run-id", run_id]
    worker += ["--tracking-uri", tracking_uri, "--storage-uri", store_uri, "--dataset", str(folder)]
    nodes = []
    for node in ("a", "b"):  # each "machine" has its own state folder
        env = {**os.environ, "TRAINYARD_HOME": str(tmp_path / node), "PYTHONPATH": str(ROOT)}
        nodes.append(subprocess.Popen(launcher + worker, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=240)[0] for proc in nodes]
    assert [proc.returncode for proc in nodes] == [0, 0]
    handoffs = [json.loads(line) for out in outputs for line in out.splitlines() if line.startswith("{")]
    assert len(handoffs) == 1 and handoffs[0]["handoff"] == f"{store_uri}/handoffs/{run_id}"  # rank 0's only
    result = json.loads((tmp_path / "store" / "handoffs" / run_id / "result.json").read_text())
    assert result["processes"] == 2 and result["best_metric"] >= 0.95
    assert [m.step for m in client.get_metric_history(run_id, "val/accuracy")] == [1, 2, 3]


def test_the_train_step_joins_a_group_of_nodes_at_the_rendezvous_endpoint(tmp_path):
    """With train.distributed.rdzv_endpoint the step's node waits there; another node joins with the command
    it logs (here: `torchrun` on loopback, its own state folder); rank 0's result comes back through S3."""
    from pipelines.context import RunContext, store_for
    from pipelines.train_worker import node_command
    from pipelines.training import train
    from tasks.launch import LaunchPlan
    from tasks.prepared import SCHEMA_FILE, TENSORS_FILE
    from tasks.results import DatasetRef
    from tests.services import s3_endpoint

    with s3_endpoint("shared") as s3:
        folder = save_prepared(tmp_path / "a" / "datasets" / "blobs", blobs(n=1000))
        tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        client = MlflowClient(tracking_uri)
        run_id = client.create_run(client.create_experiment("nodes")).info.run_id
        distributed = {"nodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}", "timeout": 60}
        cfg = TrainConfig.model_validate(
            {
                "model": {"name": "mlp", "hidden": [16]},
                "optim": {"name": "adam", "lr": 0.01},
                "train": {"epochs": 3, "batch_size": 64, "distributed": distributed},
                "storage": {"uri": "s3://shared/trainyard", "endpoint_url": s3.url},
                "tracking": {"tensorboard": False},
            }
        )
        ctx = RunContext(
            run_id,
            "nodes",
            tmp_path / "a" / "run",
            tmp_path / "a" / "tb",
            tracking_uri,
            cfg.storage.uri,
            tmp_path / "a",
        )
        store = store_for(cfg, ctx.storage_uri)
        store.publish("datasets/blobs", {name: str(folder / name) for name in (TENSORS_FILE, SCHEMA_FILE)})
        dataset = DatasetRef("blobs", str(folder), "", "tensors", "classification", {}, reused=True)
        plan = LaunchPlan.of(cfg.train.distributed, "cpu", run_id, tmp_path)
        other = [sys.executable, "-m", "torch.distributed.run", *node_command(plan, cfg, ctx, dataset)[1:]]
        env = {**os.environ, "TRAINYARD_HOME": str(tmp_path / "b"), "PYTHONPATH": str(ROOT)}
        node_b = subprocess.Popen(other, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        try:
            result = train(cfg, ctx, dataset)
        finally:
            out = node_b.communicate(timeout=240)[0]
    assert node_b.returncode == 0
    assert result.processes == 2 and result.best_metric >= 0.95 and Path(result.checkpoint).is_file()
    assert client.get_run(run_id).data.tags["train.processes"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "val/accuracy")] == [1, 2, 3]
    assert len([line for line in out.splitlines() if line.startswith("{")]) <= 1


def _processes_with(home: Path) -> list[int]:
    """The processes whose environment names `home` as TRAINYARD_HOME (a run's launcher and its workers)."""
    marker = f"TRAINYARD_HOME={home}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours
            continue
    return found


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_of_the_launching_process_ends_every_training_process(toy_csv, tmp_path, sig):
    from tests.conftest import cli_env, train_argv

    home = tmp_path / "home"
    settings = [f"data.path={toy_csv}", "data.target=label", "data.drop=[id]", "train.epochs=500"]
    args = train_argv(*settings, "train.early_stopping=0", "train.distributed.nproc_per_node=2")
    proc = subprocess.Popen(args, env=cli_env(home, harness_api=True), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # rank 0's epochs: both processes are training
        if "[rank 0]: epoch 2/" in line:
            break
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(sig)
    proc.stderr.read()
    assert proc.wait(timeout=120) == 130
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("trainyard").experiment_id])
    assert run.info.status == "KILLED"
    assert _processes_with(home) == []  # no training process left behind
