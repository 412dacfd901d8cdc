"""Training as its own deployment on the `gpu` work pool.

The parent flow (on a CPU worker) ingests, then starts `trainyard-train-step` with
`run_deployment`, passing only the config, the prepared dataset's key, the MLflow run
id and the URIs. The step fetches the dataset from the shared artifact store, trains
(logging into the same MLflow run), and hands the best checkpoint, the result and its
TensorBoard files back through the store under `handoffs/<run-id>/`. The parent then
evaluates and publishes as usual. Both ends need a remote store (S3).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from prefect import flow
from prefect.deployments import run_deployment

from pipelines import training
from pipelines.config import TrainConfig, state_dir
from pipelines.context import RunContext, store_for
from pipelines.publish import tensorboard_files
from tasks import keys, tracking
from tasks.errors import RemoteTrainingError
from tasks.ingest import dataset_ref, fetch_prepared
from tasks.results import DatasetRef, TrainResult
from tasks.storage import ArtifactStore

TRAIN_STEP_FLOW = "trainyard-train-step"
log = logging.getLogger("trainyard.remote")


def handoff_uri(store: ArtifactStore, run_id: str) -> str:
    """Where a run's handoff is, as a URI (what the step returns and its log names)."""
    return f"{store.uri}/{handoff_prefix(run_id)}"


def handoff_prefix(run_id: str) -> str:
    """Where the step leaves its result in the store: `handoffs/<run-id>`."""
    return f"handoffs/{run_id}"


@flow(name=TRAIN_STEP_FLOW, validate_parameters=True)
def train_step_flow(
    cfg: TrainConfig,
    dataset_key: str,
    run_id: str,
    tracking_uri: str,
    storage_uri: str,
    trial: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one model for an existing MLflow run on this worker; hand the result back through the store.

    Args:
        cfg: the run's configuration.
        dataset_key: key of the prepared dataset in the artifact store (datasets/<key>/).
        run_id: the MLflow run to log into.
        tracking_uri: the MLflow tracking URI.
        storage_uri: the shared artifact store (s3://...).
        trial: a sweep's trial (study, storage, pruner, trial_id, monitor) to report each epoch to; a
            pruned trial leaves `pruned.json` as its handoff.
    """
    store = store_for(cfg, storage_uri)
    state = state_dir()
    folder = fetch_prepared(store, dataset_key, state)
    work = state / "runs" / run_id  # a rerun of this step on this worker resumes from work/checkpoints
    work.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(run_id, "", work, work / "tensorboard", tracking_uri, storage_uri, state)
    dataset = dataset_ref(folder, dataset_key, reused=True)
    if trial:
        from pipelines.sweep_study import pruned_handoff, reporter

        with pruned_handoff(store, handoff_prefix(run_id), work) as handed:
            result = training.train(cfg, ctx, dataset, observe=reporter(**trial))
        if handed.pruned:
            return {"handoff": handoff_uri(store, run_id), "pruned": True}
    else:
        result = training.train(cfg, ctx, dataset)
    return {"handoff": publish_handoff(store, ctx, result), "best_epoch": result.best_epoch}


def publish_handoff(store: ArtifactStore, ctx: RunContext, result: TrainResult) -> str:
    """Leave the step's best checkpoint, result and TensorBoard files at `handoffs/<run-id>` (one unit)
    for the parent run to take; the handoff's URI."""
    path = ctx.run_dir / "result.json"
    path.write_text(json.dumps(result.to_dict()), encoding="utf-8")
    files = {"best.pt": result.checkpoint, "result.json": str(path), **tensorboard_files(ctx.tb_dir)}
    store.publish(handoff_prefix(ctx.run_id), files)
    return handoff_uri(store, ctx.run_id)


def wait_for_step(flow_run_id, deployment: str, start_timeout: float, poll: float = 2.0):
    """The step's flow run once it is final. A run no worker has started within `start_timeout`
    seconds (still Scheduled, Late or Pending) is an error; once started it may take as long as
    training takes."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    waiting = (StateType.SCHEDULED, StateType.PENDING)
    deadline = time.monotonic() + start_timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state
            if state is not None and state.is_final():
                return run
            if (state is None or state.type in waiting) and time.monotonic() > deadline:
                pool = deployment.split("/", 1)[-1]
                raise RemoteTrainingError(
                    f"no worker started train step {deployment!r} (flow run {flow_run_id}) "
                    f"within {start_timeout:.0f} s: "
                    f"it stayed {state.name if state else 'unscheduled'}; start a worker on its work pool "
                    f"(e.g. `prefect worker start --pool {pool}`), or run without train_deployment"
                )
            time.sleep(poll)


def cancel_quietly(flow_run_id) -> None:
    """Cancel the step's flow run (a running one is told to stop: Cancelling); best effort."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return
            stop = Cancelling if run.state is not None and run.state.is_running() else Cancelled
            state = stop(message="the parent flow run stopped waiting for it")
            client.set_flow_run_state(flow_run_id, state, force=True)
    except Exception as exc:  # the API may be what failed
        log.warning("could not cancel train step flow run %s: %s", flow_run_id, exc)


def step_job_variables(cfg: TrainConfig) -> dict[str, Any] | None:
    """The step's job variables: `gpu_count` (the gpu pool's nvidia.com/gpu limit on Kubernetes, its device
    request on Docker) for a numeric train.distributed.nproc_per_node above 1; none otherwise (auto: the
    pool's default count, all of which the step's processes use)."""
    nproc = cfg.train.distributed.nproc_per_node
    return {"gpu_count": nproc} if isinstance(nproc, int) and nproc > 1 else None


def _run_step(
    deployment: str, cfg: TrainConfig, ctx: RunContext, dataset: DatasetRef, start_timeout: float, trial: dict | None
):
    """Start the step's flow run and wait until it is final; cancel it when the wait fails or is stopped."""
    parameters = {
        "cfg": cfg.model_dump(mode="json"),
        "dataset_key": dataset.key,
        "run_id": ctx.run_id,
        "tracking_uri": ctx.tracking_uri,
        "storage_uri": ctx.storage_uri,
    }
    if trial:
        parameters["trial"] = trial
    # timeout=0: returns once the step's flow run exists; waited for below
    flow_run = run_deployment(deployment, parameters=parameters, timeout=0, job_variables=step_job_variables(cfg))
    try:
        flow_run = wait_for_step(flow_run.id, deployment, start_timeout)
    except BaseException:  # no worker took it, or this run was stopped: the step must not train on alone
        cancel_quietly(flow_run.id)
        raise
    if not flow_run.state or not flow_run.state.is_completed():
        state = flow_run.state.name if flow_run.state else "unknown"
        message = flow_run.state.message if flow_run.state else ""
        raise RemoteTrainingError(f"train step {deployment!r} (flow run {flow_run.id}) ended {state}: {message}")
    return flow_run


def _take_handoff(store: ArtifactStore, deployment: str, ctx: RunContext) -> TrainResult:
    """Bring the step's best checkpoint, result and TensorBoard files into this run's folders."""
    prefix = handoff_prefix(ctx.run_id)
    manifest = store.read_manifest(prefix)
    if manifest is None:
        raise RemoteTrainingError(f"train step {deployment!r} completed but left no handoff at {store.uri}/{prefix}")
    checkpoint = ctx.checkpoint_dir / "best.pt"
    store.fetch(f"{prefix}/best.pt", checkpoint)
    for name in manifest:
        if name.startswith("tensorboard/"):
            store.fetch(f"{prefix}/{name}", ctx.tb_dir / name.split("/", 1)[1])
    fetched = store.fetch(f"{prefix}/result.json", ctx.run_dir / "train-result.json")
    result = TrainResult.from_dict(json.loads(fetched.read_text(encoding="utf-8")))
    return dataclasses.replace(result, checkpoint=str(checkpoint))


def train_remotely(
    deployment: str,
    cfg: TrainConfig,
    ctx: RunContext,
    dataset: DatasetRef,
    start_timeout: float = 600.0,
    trial: dict[str, Any] | None = None,
) -> TrainResult:
    """Run the train step as `deployment` (e.g. 'trainyard-train-step/gpu') and bring its output here;
    fail (and cancel the step) when no worker starts it within `start_timeout` seconds. With a sweep's
    `trial` the step reports each epoch to its study; a step that the study pruned raises TrialPruned."""
    store = store_for(cfg, ctx.storage_uri)
    if not store.remote:
        raise RemoteTrainingError(
            f"training on deployment {deployment!r} needs a shared artifact store (storage.uri=s3://...), "
            f"not {store.uri}"
        )
    flow_run = _run_step(deployment, cfg, ctx, dataset, start_timeout, trial)
    tags = {keys.TRAIN_DEPLOYMENT: deployment, keys.TRAIN_FLOW_RUN_ID: str(flow_run.id)}
    tracking.set_tags(ctx.tracking_uri, ctx.run_id, tags)
    if trial:
        from pipelines.sweep_study import raise_if_pruned

        raise_if_pruned(store, handoff_prefix(ctx.run_id))
    return _take_handoff(store, deployment, ctx)
