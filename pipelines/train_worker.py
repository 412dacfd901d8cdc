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
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from pipelines.config import TrainConfig, _format_validation_error, state_dir
from pipelines.context import RunContext, store_for
from pipelines.remote import publish_handoff
from pipelines.training import rank_job, resume_point, shared_store
from tasks.errors import TrainyardError
from tasks.ingest import fetch_prepared
from tasks.launch import configure_rank_logging
from tasks.train_rank import train_rank


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
        result = train_rank(rank_job(cfg, ctx, str(folder)))
        if result is not None:
            print(json.dumps({"handoff": publish_handoff(store, ctx, result), "best_epoch": result.best_epoch}))
    except TrainyardError as exc:  # one line; the launcher reports the failed process and ends the others
        print(f"trainyard train worker (rank {rank}): {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
