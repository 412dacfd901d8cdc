"""The training step as one process of a `torchrun` group: what each process of a Kubeflow Trainer
TrainJob, or of a hand-started multi-node training, runs.

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29400 \\
        --rdzv-id <run-id> -m pipelines.train_worker --config-json '{...}' --run-id <run-id> \\
        --tracking-uri http://mlflow:5000 --storage-uri s3://bucket/trainyard --dataset-key <key>

Every process fetches the prepared dataset from the store (or reads `--dataset`), joins the group and
trains its shard (tasks/train_rank.py). Rank 0 logs into the MLflow run, writes the checkpoints (a
restarted group resumes from them) and leaves the best checkpoint and the result at
`handoffs/<run-id>` in the store, where the flow's train step takes them (pipelines/remote.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from pydantic import ValidationError

from pipelines.config import TrainConfig, _format_validation_error, state_dir
from pipelines.context import RunContext, store_for
from pipelines.remote import _take_handoff, handoff_uri, publish_handoff
from pipelines.training import rank_job, resume_point, shared_store
from tasks.errors import ConfigError, TrainyardError
from tasks.ingest import fetch_prepared
from tasks.launch import LaunchPlan, configure_rank_logging, launch
from tasks.results import DatasetRef, TrainResult
from tasks.train_rank import train_rank

log = logging.getLogger("trainyard.train")


def train_and_hand_off(cfg: TrainConfig, ctx: RunContext, dataset_path: str) -> TrainResult | None:
    """One process of a group of several nodes: train; rank 0 leaves the handoff in the store."""
    result = train_rank(rank_job(cfg, ctx, dataset_path))
    if result is not None:
        publish_handoff(store_for(cfg, ctx.storage_uri), ctx, result)
    return result


def node_command(plan: LaunchPlan, cfg: TrainConfig, ctx: RunContext, dataset: DatasetRef) -> list[str]:
    """What each other node runs to join this node's group at the rendezvous endpoint."""
    launcher = ["torchrun", "--nnodes", str(plan.nodes), "--nproc-per-node", str(plan.nproc)]
    launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", plan.endpoint, "--rdzv-id", plan.rdzv_id]
    launcher += ["--max-restarts", str(plan.max_restarts), "-m", "pipelines.train_worker"]
    args = ["--config-json", cfg.model_dump_json(), "--run-id", ctx.run_id, "--tracking-uri", ctx.tracking_uri]
    return launcher + args + ["--storage-uri", ctx.storage_uri, "--dataset-key", dataset.key]


def join_nodes(plan: LaunchPlan, cfg: TrainConfig, ctx: RunContext, dataset: DatasetRef) -> TrainResult:
    """Start this node's processes of a group of `plan.nodes` nodes meeting at `plan.endpoint`, wait for the
    whole group, and take rank 0's handoff from the shared store (rank 0 may be on another node)."""
    store = store_for(cfg, ctx.storage_uri)
    if not store.remote:
        raise ConfigError(
            f"train.distributed.nodes={plan.nodes} shares the dataset and the result through the artifact store: "
            f"set storage.uri to an s3:// store every node reaches, not {store.uri}"
        )
    command = shlex.join(node_command(plan, cfg, ctx, dataset))
    log.info("waiting at %s for the other nodes; start each with: %s", plan.endpoint, command)
    launch(plan, functools.partial(train_and_hand_off, cfg, ctx), dataset.path)
    return _take_handoff(store, f"rendezvous {plan.endpoint}", ctx)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.train_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-json", required=True, help="the run's TrainConfig as JSON")
    parser.add_argument("--run-id", required=True, help="the MLflow run to log into")
    parser.add_argument("--tracking-uri", required=True, help="MLflow tracking URI")
    parser.add_argument("--storage-uri", required=True, help="the artifact store (s3://... across nodes)")
    parser.add_argument("--dataset-key", default="", help="the prepared dataset's key in the store")
    parser.add_argument("--dataset", default="", help="a local prepared dataset folder instead of --dataset-key")
    return parser


def _context(args) -> RunContext:
    state = state_dir()
    work = state / "runs" / args.run_id  # a restarted process resumes from work/checkpoints
    work.mkdir(parents=True, exist_ok=True)
    return RunContext(args.run_id, "", work, work / "tensorboard", args.tracking_uri, args.storage_uri, state)


def main(argv: list[str] | None = None) -> int:
    """Train as the process the launcher's environment (RANK, WORLD_SIZE, ...) says; the exit status."""
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    configure_rank_logging(rank)
    try:
        cfg = TrainConfig.model_validate_json(args.config_json)
    except ValidationError as exc:
        print(f"trainyard train worker: {_format_validation_error(exc, '--config-json')}", file=sys.stderr)
        return 2
    try:
        ctx = _context(args)
        store = store_for(cfg, ctx.storage_uri)
        folder = Path(args.dataset) if args.dataset else fetch_prepared(store, args.dataset_key, ctx.state)
        if rank == 0:  # a group restarted on another machine resumes from the checkpoints in the store
            resume_point(ctx, shared_store(cfg, ctx))
        result = train_and_hand_off(cfg, ctx, str(folder))
        if result is not None:
            print(json.dumps({"handoff": handoff_uri(store, ctx.run_id), "best_epoch": result.best_epoch}))
    except TrainyardError as exc:  # one line; the launcher reports the failed process and ends the others
        print(f"trainyard train worker (rank {rank}): {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
