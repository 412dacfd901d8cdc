"""The deployments Trainyard registers: scheduled retrains, the daily batch scoring and a sweep
(run from the UI) on the `cpu` pool, the training step on the `gpu` pool. `trainyard deploy` applies
them to a Prefect server.

Every deployment enforces its parameter schema, so a bad value typed into the Prefect
UI's form is refused before a run starts. The form comes from `TrainConfig`: titles,
descriptions, dropdowns for the choices and bounds for the numbers (`PredictConfig` for the scoring).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.client.schemas.schedules import CronSchedule

from pipelines.config import load_config
from tasks.predict_config import PredictConfig
from tasks.sweep_config import SweepConfig

TIMEZONE = "Europe/Berlin"
CPU_POOL, GPU_POOL = "cpu", "gpu"
# The table csv-retrain trains on: an object in the stack's bucket, where operators upload a new version
# (deploy/README.md). The compose stack names it in TRAINYARD_RETRAIN_CSV, from its MINIO_BUCKET.
RETRAIN_CSV_ENV, RETRAIN_CSV = "TRAINYARD_RETRAIN_CSV", "s3://trainyard/data/retrain.csv"
# csv-retrain registers its models apart from nightly-mnist's (both track into the experiment `trainyard`):
# sharing one registered model, the first of them to finish would stay the champion of both, and the table
# scoring would find an image model there.
RETRAIN_CSV_MODEL = "trainyard-csv"
# The table batch-predict scores with csv-retrain's champion, and where its predictions go: objects in the
# same bucket, named by the compose stack in TRAINYARD_PREDICT_INPUT and TRAINYARD_PREDICT_OUTPUT.
PREDICT_INPUT_ENV, PREDICT_INPUT = "TRAINYARD_PREDICT_INPUT", "s3://trainyard/data/score.csv"
PREDICT_OUTPUT_ENV, PREDICT_OUTPUT = "TRAINYARD_PREDICT_OUTPUT", "s3://trainyard/predictions/score.parquet"
PREDICT_CRON = "0 5 * * *"  # daily, after the nightly (02:00) and weekly (Monday 03:30) retrains

# The sweep deployment's default form: a learning-rate range and two widths, 20 trials.
SWEEP_EXAMPLE = SweepConfig(
    space={
        "optim.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
        "model.hidden": {"type": "categorical", "choices": ["auto", [64, 64], [256, 256]]},
    },
    trials=20,
)


@dataclass
class Plan:
    """One deployment to apply: its flow, work pool, schedule and parameters."""

    name: str
    flow: str  # "train", "train-step", "predict" or "sweep"
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


def predict_objects(predict_input: str = "", predict_output: str = "") -> tuple[str, str]:
    """The input and output of batch-predict: as given, else TRAINYARD_PREDICT_INPUT and
    TRAINYARD_PREDICT_OUTPUT, else the stack's default objects."""
    return (
        predict_input or os.environ.get(PREDICT_INPUT_ENV) or PREDICT_INPUT,
        predict_output or os.environ.get(PREDICT_OUTPUT_ENV) or PREDICT_OUTPUT,
    )


def _batch_predict(model_name: str, predict_input: str, predict_output: str, timezone: str) -> Plan:
    """The daily scoring of `predict_input` with the champion of `model_name` into `predict_output`."""
    predict_input, predict_output = predict_objects(predict_input, predict_output)
    cfg = PredictConfig(model=f"models:/{model_name}@champion", input=predict_input, output=predict_output)
    return Plan(
        "batch-predict",
        "predict",
        CPU_POOL,
        f"Score {predict_input} with the champion of {model_name} every day at 05:00 into {predict_output}.",
        cron=PREDICT_CRON,
        timezone=timezone,
        parameters={"cfg": cfg.model_dump(mode="json")},
        tags=["scheduled", "predict"],
    )


def plans(
    csv_path: str = "",
    csv_target: str = "label",
    timezone: str = TIMEZONE,
    gpu_slots: int = 1,
    predict_input: str = "",
    predict_output: str = "",
) -> list[Plan]:
    """Every deployment: three retrains of the whole flow and the batch scoring on the cpu pool, the
    training step on the gpu pool.

    csv-retrain reads `csv_path` (see retrain_csv) when it runs: a run whose object has not changed since
    the champion was trained skips, one after an upload trains on the new version. batch-predict scores
    `predict_input` with csv-retrain's champion into `predict_output` (see predict_objects).
    """
    csv_path = retrain_csv(csv_path)
    mnist = load_config("mnist", env={}).model_dump(mode="json")
    csv_overrides = [
        f"data.path={csv_path}",
        f"data.target={csv_target}",
        f"tracking.registered_model={RETRAIN_CSV_MODEL}",
    ]
    csv_cfg = load_config("csv", overrides=csv_overrides, env={})
    csv = csv_cfg.model_dump(mode="json")
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
    scoring = _batch_predict(csv_cfg.tracking.model_name(), predict_input, predict_output, timezone)
    sweep = Plan(
        "sweep",
        "sweep",
        CPU_POOL,
        f"Search csv-retrain's config with Optuna ({SWEEP_EXAMPLE.trials} trials by default); set the space in "
        "the form. The best trial goes through the champion gate.",
        parameters={"cfg": csv, "sweep": SWEEP_EXAMPLE.model_dump(mode="json")},
        tags=["manual", "sweep"],
    )
    return [nightly, weekly, on_demand, gpu, scoring, sweep]


def _flow(kind: str):
    """The flow a plan deploys, imported when deploying."""
    if kind == "train":
        from pipelines.flow import train_flow

        return train_flow
    if kind == "predict":
        from pipelines.predict_flow import batch_predict_flow

        return batch_predict_flow
    if kind == "sweep":
        from pipelines.sweep import sweep_flow

        return sweep_flow
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
    # Workers load the train flow with retries (a retry resumes from the last checkpoint). All are
    # relative to work_dir, wherever `trainyard deploy` itself runs.
    "train": "pipelines/flow.py:retrying_train_flow",
    "train-step": "pipelines/remote.py:train_step_flow",
    # Scoring has no flow retries: its one task retries I/O; bad input fails the same way every time.
    "predict": "pipelines/predict_flow.py:batch_predict_flow",
    # A sweep has no flow retries either: started again with its name, it continues its study.
    "sweep": "pipelines/sweep.py:sweep_flow",
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
