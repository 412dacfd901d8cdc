"""The deployments Trainyard registers: scheduled retrains on the `cpu` pool and the
training step on the `gpu` pool. `trainyard deploy` applies them to a Prefect server.

Every deployment enforces its parameter schema, so a bad value typed into the Prefect
UI's form is refused before a run starts. The form comes from `TrainConfig`: titles,
descriptions, dropdowns for the choices and bounds for the numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.client.schemas.schedules import CronSchedule

from pipelines.config import load_config

TIMEZONE = "Europe/Berlin"
CPU_POOL, GPU_POOL = "cpu", "gpu"
# The table csv-retrain trains on: an object in the stack's bucket, where operators upload a new version
# (deploy/README.md). The compose stack names it in TRAINYARD_RETRAIN_CSV, from its MINIO_BUCKET.
RETRAIN_CSV_ENV, RETRAIN_CSV = "TRAINYARD_RETRAIN_CSV", "s3://trainyard/data/retrain.csv"


@dataclass
class Plan:
    """One deployment to apply: its flow, work pool, schedule and parameters."""

    name: str
    flow: str  # "train" or "train-step"
    pool: str
    description: str
    cron: str = ""
    timezone: str = TIMEZONE
    parameters: dict[str, Any] = field(default_factory=dict)
    concurrency_limit: int | None = None
    tags: list[str] = field(default_factory=list)


def _scheduled(name: str, description: str, cron: str, timezone: str, cfg: dict[str, Any], tag: str) -> Plan:
    """A retrain of the whole flow on the cpu pool on a cron schedule."""
    return Plan(
        name,
        "train",
        CPU_POOL,
        description,
        cron=cron,
        timezone=timezone,
        parameters={"cfg": cfg},
        tags=["scheduled", tag],
    )


def retrain_csv(csv_path: str = "") -> str:
    """data.path of csv-retrain: as given, else TRAINYARD_RETRAIN_CSV, else the stack's default object."""
    return csv_path or os.environ.get(RETRAIN_CSV_ENV) or RETRAIN_CSV


def plans(csv_path: str = "", csv_target: str = "label", timezone: str = TIMEZONE, gpu_slots: int = 1) -> list[Plan]:
    """Every deployment: three retrains of the whole flow on the cpu pool, the training step on the gpu pool.

    csv-retrain reads `csv_path` (see retrain_csv) when it runs: a run whose object has not changed since
    the champion was trained skips, one after an upload trains on the new version.
    """
    csv_path = retrain_csv(csv_path)
    mnist = load_config("mnist", env={}).model_dump(mode="json")
    csv_overrides = [f"data.path={csv_path}", f"data.target={csv_target}"]
    csv = load_config("csv", overrides=csv_overrides, env={}).model_dump(mode="json")
    nightly_text, weekly_text = (
        "Retrain the MNIST preset every night at 02:00.",
        f"Retrain on {csv_path} every Monday at 03:30 (skipped while it is unchanged).",
    )
    nightly = _scheduled("nightly-mnist", nightly_text, "0 2 * * *", timezone, mnist, "mnist")
    weekly = _scheduled("csv-retrain", weekly_text, "30 3 * * 1", timezone, csv, "csv")
    on_demand = Plan(
        "on-demand",
        "train",
        CPU_POOL,
        "Train once, with the parameters given in the UI.",
        parameters={"cfg": mnist},
        tags=["manual"],
    )
    gpu = Plan(
        GPU_POOL,
        "train-step",
        GPU_POOL,
        "The training step alone, for parents with train_deployment set.",
        concurrency_limit=gpu_slots,
        tags=["gpu"],
    )
    return [nightly, weekly, on_demand, gpu]


def _flow(kind: str):
    """The flow a plan deploys, imported when deploying."""
    if kind == "train":
        from pipelines.flow import train_flow

        return train_flow
    from pipelines.remote import train_step_flow

    return train_step_flow


def ensure_pools(gpu_slots: int = 1) -> None:
    """Create the `cpu` and `gpu` process pools when missing; the gpu pool runs `gpu_slots` flows at a
    time (set again on a pool that exists, whatever its type: Kubernetes or Docker pools are kept)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        for name, limit in ((CPU_POOL, None), (GPU_POOL, gpu_slots)):
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process", concurrency_limit=limit))
            except ObjectAlreadyExists:
                if limit is not None:
                    client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit))


ENTRYPOINTS = {
    # Workers load the train flow with retries (a retry resumes from the last checkpoint). Both are
    # relative to work_dir, wherever `trainyard deploy` itself runs.
    "train": "pipelines/flow.py:retrying_train_flow",
    "train-step": "pipelines/remote.py:train_step_flow",
}


def deploy(work_dir: str | os.PathLike = ".", gpu_slots: int = 1, image: str = "", **plan_args: Any) -> dict[str, str]:
    """Apply every plan; return deployment name -> id. `work_dir` is where workers find the code;
    `image`, when given, is the container image of the flow runs (Kubernetes and Docker pools)."""
    work_dir = str(Path(work_dir).resolve())
    ensure_pools(gpu_slots)
    job_variables: dict[str, Any] = {"working_dir": work_dir}
    if image:
        job_variables["image"] = image
    ids: dict[str, str] = {}
    for plan in plans(gpu_slots=gpu_slots, **plan_args):
        flow = _flow(plan.flow)
        deployment = flow.to_deployment(
            name=plan.name,
            description=plan.description,
            schedules=[CronSchedule(cron=plan.cron, timezone=plan.timezone)] if plan.cron else None,
            parameters=plan.parameters,
            enforce_parameter_schema=True,
            work_pool_name=plan.pool,
            job_variables=job_variables,
            concurrency_limit=plan.concurrency_limit,
            tags=plan.tags,
        )
        deployment.entrypoint = ENTRYPOINTS[plan.flow]
        ids[f"{flow.name}/{plan.name}"] = str(deployment.apply(work_pool_name=plan.pool))
    return ids
