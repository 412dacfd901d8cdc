"""Training as its own deployment on the `gpu` work pool.

The parent flow (on a CPU worker) ingests, then starts `trainyard-train-step` with
`run_deployment`, passing only the config, the prepared dataset's key, the MLflow run
id and the URIs. The step fetches the dataset from the shared artifact store, trains
(logging into the same MLflow run), and hands the best checkpoint, the result and its
TensorBoard files back through the store under `handoffs/<run-id>/`. The parent then
evaluates and publishes as usual. Both ends need a remote store (S3).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.deployments import run_deployment

from pipelines import steps
from pipelines.config import TrainConfig, state_dir
from tasks import tracking
from tasks.errors import RemoteTrainingError
from tasks.ingest import fetch_prepared

TRAIN_STEP_FLOW = "trainyard-train-step"
log = logging.getLogger("trainyard.remote")


def handoff_prefix(run_id: str) -> str:
    return f"handoffs/{run_id}"


@flow(name=TRAIN_STEP_FLOW, validate_parameters=True)
def train_step_flow(cfg: TrainConfig, dataset_key: str, run_id: str, tracking_uri: str, storage_uri: str) -> dict[str, Any]:
    """Train one model for an existing MLflow run on this worker; hand the result back through the store.

    Args:
        cfg: the run's configuration.
        dataset_key: key of the prepared dataset in the artifact store (datasets/<key>/).
        run_id: the MLflow run to log into.
        tracking_uri: the MLflow tracking URI.
        storage_uri: the shared artifact store (s3://...).
    """
    store = steps.store_for(cfg, storage_uri)
    state = state_dir()
    folder = fetch_prepared(store, dataset_key, state)
    work = state / "runs" / run_id  # a rerun of this step on this worker resumes from work/checkpoints
    work.mkdir(parents=True, exist_ok=True)
    tb_dir = work / "tensorboard"
    result = steps.train(cfg, str(folder), tracking_uri, run_id, str(work), str(tb_dir), storage_uri)
    (work / "result.json").write_text(json.dumps(result), encoding="utf-8")
    files = {"best.pt": result["checkpoint"], "result.json": str(work / "result.json")}
    if tb_dir.is_dir():
        files.update({f"tensorboard/{p.relative_to(tb_dir).as_posix()}": str(p) for p in tb_dir.rglob("*") if p.is_file()})
    store.publish(handoff_prefix(run_id), files)
    return {"handoff": f"{store.uri}/{handoff_prefix(run_id)}", "best_epoch": result["best_epoch"]}


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
                    f"no worker started train step {deployment!r} (flow run {flow_run_id}) within {start_timeout:.0f} s: "
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
            client.set_flow_run_state(flow_run_id, stop(message="the parent flow run stopped waiting for it"), force=True)
    except Exception as exc:  # the API may be what failed
        log.warning("could not cancel train step flow run %s: %s", flow_run_id, exc)


def train_remotely(
    deployment: str, cfg: TrainConfig, dataset_key: str, run_id: str, tracking_uri: str, storage_uri: str,
    run_dir: str, tb_dir: str, start_timeout: float = 600.0,
) -> dict[str, Any]:
    """Run the train step as `deployment` (e.g. 'trainyard-train-step/gpu') and bring its output here;
    fail (and cancel the step) when no worker starts it within `start_timeout` seconds."""
    store = steps.store_for(cfg, storage_uri)
    if not store.remote:
        raise RemoteTrainingError(
            f"training on deployment {deployment!r} needs a shared artifact store (storage.uri=s3://...), not {store.uri}"
        )
    flow_run = run_deployment(
        deployment,
        parameters={"cfg": cfg.model_dump(mode="json"), "dataset_key": dataset_key, "run_id": run_id,
                    "tracking_uri": tracking_uri, "storage_uri": storage_uri},
        timeout=0,  # returns once the step's flow run exists; waited for below
    )  # fmt: skip
    try:
        flow_run = wait_for_step(flow_run.id, deployment, start_timeout)
    except BaseException:  # no worker took it, or this run was stopped: the step must not train on alone
        cancel_quietly(flow_run.id)
        raise
    if not flow_run.state or not flow_run.state.is_completed():
        state = flow_run.state.name if flow_run.state else "unknown"
        raise RemoteTrainingError(f"train step {deployment!r} (flow run {flow_run.id}) ended {state}: {flow_run.state.message if flow_run.state else ''}")
    prefix = handoff_prefix(run_id)
    manifest = store.read_manifest(prefix)
    if manifest is None:
        raise RemoteTrainingError(f"train step {deployment!r} completed but left no handoff at {store.uri}/{prefix}")
    checkpoint = Path(run_dir) / "checkpoints" / "best.pt"
    store.fetch(f"{prefix}/best.pt", checkpoint)
    for name in manifest:
        if name.startswith("tensorboard/"):
            store.fetch(f"{prefix}/{name}", Path(tb_dir) / name.split("/", 1)[1])
    fetched = store.fetch(f"{prefix}/result.json", Path(run_dir) / "train-result.json")
    result = json.loads(fetched.read_text(encoding="utf-8"))
    result["checkpoint"] = str(checkpoint)
    tracking.set_tags(tracking_uri, run_id, {"train.deployment": deployment, "train.flow_run_id": str(flow_run.id)})
    return result
