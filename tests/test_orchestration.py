"""A real Prefect server on PostgreSQL with process workers on the `cpu` and `gpu` pools:
deployments registered by `trainyard deploy`, runs triggered through the API as the UI
does, the parameter form's schema, the skip-when-unchanged path, the gpu train step and the
scheduled scoring with the champion."""

from __future__ import annotations

import os
import time
import uuid

import boto3
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tasks import keys
from tests.conftest import REPO
from tests.services import FAKE_KEYS, S3Endpoint, postgres_database, prefect_server, prefect_worker

pytestmark = pytest.mark.service
BUCKET = "orchestration"
# What the stack registers: the csv-retrain table and the batch-predict objects, as `trainyard deploy` passes them.
DEPLOY_ARGS = {
    "csv_path": "/data/retrain.csv",
    "csv_target": "label",
    "predict_input": "/data/score.csv",
    "predict_output": "/data/predictions/score.parquet",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Server, S3 endpoint, deployments and both workers; yields what tests need."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("orchestration")
    s3 = S3Endpoint()
    saved = {k: os.environ.get(k) for k in (*FAKE_KEYS, "AWS_DEFAULT_REGION")}
    os.environ.update(FAKE_KEYS, AWS_DEFAULT_REGION="us-east-1")
    s3.start()
    boto3.client("s3", endpoint_url=s3.url).create_bucket(Bucket=BUCKET)
    worker_env = {
        "TRAINYARD_HOME": str(root / "worker-state"),
        "TRAINYARD_GIT_SHA": "abc123def456",  # a clean, known code version for the skip check
        "AWS_DEFAULT_REGION": "us-east-1",
        **FAKE_KEYS,
    }
    try:
        with postgres_database("trainyard_prefect") as (url, _name):
            asyncpg_url = url.replace("postgresql://", "postgresql+asyncpg://")
            with prefect_server(asyncpg_url, root / "prefect-home", root / "server.log") as api:  # noqa: SIM117
                with temporary_settings(updates={PREFECT_API_URL: api}):  # the server's URL is known only now
                    from pipelines.deployments import deploy

                    ids = deploy(REPO, gpu_slots=1, **DEPLOY_ARGS)
                    with (
                        prefect_worker(api, "cpu", worker_env, root / "cpu-worker.log", limit=2),
                        prefect_worker(api, "gpu", worker_env, root / "gpu-worker.log", limit=1),
                    ):
                        yield {"api": api, "ids": ids, "root": root, "s3": s3}
    finally:
        s3.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def client_for(stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class Ctx:
        def __enter__(self):
            self.settings = temporary_settings(updates={PREFECT_API_URL: stack["api"]})
            self.settings.__enter__()
            self.client = get_client(sync_client=True)
            return self.client.__enter__()

        def __exit__(self, *exc):
            self.client.__exit__(*exc)
            self.settings.__exit__(*exc)

    return Ctx()


def wait_final(client, flow_run_id, timeout=420):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state and run.state.is_final():
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} did not finish in {timeout} s")


def csv_parameters(stack, toy_csv, experiment, **train):
    from pipelines.config import load_config

    overrides = [
        f"data.path={toy_csv}",
        "data.target=label",
        "data.drop=[id]",
        f"tracking.uri=sqlite:///{stack['root'] / 'mlflow.db'}",
        f"tracking.experiment={experiment}",
        *[f"train.{k}={v}" for k, v in train.items()],
    ]
    return {"cfg": load_config("csv", overrides=overrides, env={}).model_dump(mode="json")}


def test_schedules_and_pools_are_registered(stack):
    with client_for(stack) as client:
        nightly = client.read_deployment_by_name("trainyard-train/nightly-mnist")
        csv = client.read_deployment_by_name("trainyard-train/csv-retrain")
        gpu = client.read_deployment_by_name("trainyard-train-step/gpu")
        assert (
            nightly.schedules[0].schedule.cron == "0 2 * * *"
            and nightly.schedules[0].schedule.timezone == "Europe/Berlin"
        )
        assert csv.schedules[0].schedule.cron == "30 3 * * 1"
        assert nightly.work_pool_name == "cpu" and gpu.work_pool_name == "gpu"
        assert nightly.entrypoint == "pipelines/flow.py:retrying_train_flow"  # retries resume
        assert nightly.parameters["cfg"]["model"]["name"] == "cnn"
        assert csv.parameters["cfg"]["data"]["path"] == "/data/retrain.csv"
        assert client.read_work_pool("gpu").concurrency_limit == 1
        limit = gpu.global_concurrency_limit.limit if gpu.global_concurrency_limit else gpu.concurrency_limit
        assert limit == 1  # one training at a time on the gpu pool
        scoring = client.read_deployment_by_name("trainyard-predict/batch-predict")
        sweep = client.read_deployment_by_name("trainyard-sweep/sweep")
    assert sweep.entrypoint == "pipelines/sweep.py:sweep_flow" and sweep.enforce_parameter_schema
    assert sweep.work_pool_name == "cpu" and not sweep.schedules
    assert sweep.parameters["sweep"]["space"]["optim.lr"]["log"] is True and sweep.parameters["sweep"]["trials"] == 20
    (schedule,) = scoring.schedules
    assert schedule.schedule.cron == "0 5 * * *" and schedule.schedule.timezone == "Europe/Berlin"
    assert scoring.work_pool_name == "cpu" and scoring.enforce_parameter_schema
    assert scoring.entrypoint == "pipelines/predict_flow.py:batch_predict_flow"
    assert sorted(scoring.tags) == ["predict", "scheduled"]
    cfg = scoring.parameters["cfg"]
    assert csv.parameters["cfg"]["tracking"]["registered_model"] == "trainyard-csv"  # not nightly-mnist's
    assert cfg["model"] == "models:/trainyard-csv@champion"  # csv-retrain's champion
    assert (cfg["input"], cfg["output"]) == (DEPLOY_ARGS["predict_input"], DEPLOY_ARGS["predict_output"])


def test_the_ui_form_schema(stack):
    with client_for(stack) as client:
        dep = client.read_deployment_by_name("trainyard-train/on-demand")
    assert dep.enforce_parameter_schema
    schema = dep.parameter_openapi_schema
    defs = schema["definitions"]
    assert schema["properties"]["cfg"]["$ref"] == "#/definitions/TrainConfig"
    assert schema["properties"]["force"]["type"] == "boolean"
    for section in (
        "DataConfig",
        "ModelConfig",
        "OptimConfig",
        "ScheduleConfig",
        "TrainSection",
        "TrackingConfig",
        "StorageConfig",
    ):
        for name, prop in defs[section]["properties"].items():
            assert prop.get("title") and prop.get("description"), f"{section}.{name} lacks a title or description"
            # a nullable field renders as an Optional toggle; a choice of a value or `auto` (batch_size,
            # hidden) is a union without null
            nullable = any(branch.get("type") == "null" for branch in prop.get("anyOf", []))
            assert not nullable or name == "kwargs", f"{section}.{name} renders as an Optional toggle"
    assert defs["ModelConfig"]["properties"]["name"]["enum"] == ["linear", "mlp", "cnn", "tabular"]
    assert "adamw" in defs["OptimConfig"]["properties"]["name"]["enum"]
    assert "onecycle" in defs["ScheduleConfig"]["properties"]["name"]["enum"]
    assert defs["TrainSection"]["properties"]["device"]["enum"] == ["auto", "cpu", "cuda", "mps"]
    assert defs["DataConfig"]["properties"]["task"]["enum"] == ["auto", "classification", "regression"]
    epochs = defs["TrainSection"]["properties"]["epochs"]
    assert epochs["minimum"] == 1 and epochs["maximum"] == 10000
    assert defs["OptimConfig"]["properties"]["lr"]["exclusiveMinimum"] == 0.0


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train", "epochs", 0),
        ("model", "name", "resnet"),
        ("optim", "name", "adamm"),
        ("optim", "lr", -1.0),
        ("train", "device", "tpu"),
        ("train", "epoch", 5),
        ("train", "bogus", 1),
    ],
)
def test_bad_parameters_are_refused_before_a_run(stack, section, key, value):
    from prefect.exceptions import PrefectHTTPStatusError

    with client_for(stack) as client:
        dep = client.read_deployment_by_name("trainyard-train/on-demand")
        params = {"cfg": {**dep.parameters["cfg"], section: {**dep.parameters["cfg"][section], key: value}}}
        with pytest.raises(PrefectHTTPStatusError) as err:
            client.create_flow_run_from_deployment(dep.id, parameters=params)
        assert err.value.response.status_code in (409, 422)


def test_ui_triggered_run_then_skip_then_force(stack, toy_csv):
    experiment = f"orch-{uuid.uuid4().hex[:6]}"
    params = csv_parameters(stack, toy_csv, experiment, epochs=3)
    mlflow = MlflowClient(f"sqlite:///{stack['root'] / 'mlflow.db'}")
    with client_for(stack) as client:
        dep = client.read_deployment_by_name("trainyard-train/on-demand")
        run = wait_final(client, client.create_flow_run_from_deployment(dep.id, parameters=params).id)
        assert run.state.is_completed(), run.state
        exp = mlflow.get_experiment_by_name(experiment)
        (first,) = mlflow.search_runs([exp.experiment_id])
        assert first.info.status == "FINISHED" and first.data.params["train.epochs"] == "3"  # the changed parameter
        assert first.data.tags["prefect.flow_run_id"] == str(run.id)
        assert "test/accuracy" in first.data.metrics
        assert (
            stack["root"] / "worker-state" / "artifacts" / experiment / first.info.run_id / "manifest.json"
        ).is_file()
        # nothing changed: the scheduled-style rerun skips
        skipped = wait_final(client, client.create_flow_run_from_deployment(dep.id, parameters=params).id)
        assert skipped.state.name == "Skipped" and "skipped: nothing changed" in skipped.state.message
        assert len(mlflow.search_runs([exp.experiment_id])) == 1
        # force trains anyway
        forced = wait_final(
            client, client.create_flow_run_from_deployment(dep.id, parameters={**params, "force": True}).id
        )
        assert forced.state.is_completed() and forced.state.name == "Completed"
        assert len(mlflow.search_runs([exp.experiment_id])) == 2


def predict_parameters(dep, **cfg):
    """batch-predict's parameters with some values of the config replaced, as the UI's form sends them."""
    return {"cfg": {**dep.parameters["cfg"], **cfg}}


def test_scheduled_scoring_with_the_champion_trained_on_demand(stack, toy_csv):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    experiment = f"orch-predict-{uuid.uuid4().hex[:6]}"
    tracking_uri = f"sqlite:///{stack['root'] / 'mlflow.db'}"
    output = stack["root"] / f"{experiment}.parquet"
    with client_for(stack) as client:
        train = client.read_deployment_by_name("trainyard-train/on-demand")
        params = csv_parameters(stack, toy_csv, experiment, epochs=3)
        trained = wait_final(client, client.create_flow_run_from_deployment(train.id, parameters=params).id)
        assert trained.state.is_completed() and trained.state.name == "Completed", trained.state
        dep = client.read_deployment_by_name("trainyard-predict/batch-predict")
        cfg = {"model": f"models:/{experiment}@champion", "tracking_uri": tracking_uri, "experiment": experiment}
        params = predict_parameters(dep, **cfg, input=str(toy_csv), output=str(output), keep=["id"])
        run = wait_final(client, client.create_flow_run_from_deployment(dep.id, parameters=params).id)
        assert run.state.is_completed(), run.state
        # a table that is not there fails at once: bad input is not retried
        missing = predict_parameters(
            dep, **cfg, input=str(stack["root"] / "no-such.csv"), output=str(output.with_suffix(".csv"))
        )
        failed = wait_final(client, client.create_flow_run_from_deployment(dep.id, parameters=missing).id)
        assert failed.state.is_failed(), failed.state
        (step,) = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[failed.id])))
        assert step.name.startswith("predict") and step.run_count == 1
    source, scored = pd.read_csv(toy_csv), pd.read_parquet(output)
    assert list(scored.columns)[:2] == ["id", "prediction"]  # the kept column, then the model's answer
    # one row per input row, in order (a kept CSV column is copied as its text)
    assert scored["id"].astype(str).tolist() == source["id"].astype(str).tolist()
    assert set(scored["prediction"]) == {"yes", "no"}
    assert (scored["prediction"] == source["label"]).mean() > 0.8  # the trained champion, not a constant
    mlflow = MlflowClient(tracking_uri)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name(experiment).experiment_id])
    (training,) = [r for r in runs if not keys.is_prediction_run(r.data.tags)]
    scoring = {r.info.status: r for r in runs if r.data.tags.get("trainyard.run_kind") == "prediction"}
    assert sorted(scoring) == ["FAILED", "FINISHED"]  # the scoring above, and the one of the missing table
    done = scoring["FINISHED"]
    assert done.data.tags[keys.PREDICT_MODEL_RUN_ID] == training.info.run_id  # the champion trained above
    assert done.data.metrics[keys.PREDICT_ROWS] == len(source)


@pytest.mark.parametrize("key, value", [("chunk_rows", 0), ("output_format", "xlsx"), ("chunks", 10)])
def test_bad_scoring_parameters_are_refused_before_a_run(stack, key, value):
    from prefect.exceptions import PrefectHTTPStatusError

    with client_for(stack) as client:
        dep = client.read_deployment_by_name("trainyard-predict/batch-predict")
        with pytest.raises(PrefectHTTPStatusError) as err:
            client.create_flow_run_from_deployment(dep.id, parameters=predict_parameters(dep, **{key: value}))
        assert err.value.response.status_code in (409, 422)


def test_batch_predict_objects_come_from_the_deploy_options_else_the_environment(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines import deployments as d
    from pipelines.cli import main

    def objects(**kwargs) -> tuple[str, str]:
        (plan,) = [p for p in d.plans(**kwargs) if p.name == "batch-predict"]
        return plan.parameters["cfg"]["input"], plan.parameters["cfg"]["output"]

    monkeypatch.delenv(d.PREDICT_INPUT_ENV, raising=False)
    monkeypatch.delenv(d.PREDICT_OUTPUT_ENV, raising=False)
    assert objects() == (d.PREDICT_INPUT, d.PREDICT_OUTPUT)
    monkeypatch.setenv(d.PREDICT_INPUT_ENV, "s3://ml-data/data/score.csv")
    monkeypatch.setenv(d.PREDICT_OUTPUT_ENV, "s3://ml-data/out/score.csv")
    assert objects() == ("s3://ml-data/data/score.csv", "s3://ml-data/out/score.csv")
    assert objects(predict_input="/in.parquet", predict_output="/out.csv") == ("/in.parquet", "/out.csv")
    seen = {}
    monkeypatch.setattr(d, "deploy", lambda *args, **kwargs: seen.update(kwargs) or {})
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert main(["deploy", "--predict-input", "/in.csv", "--predict-output", "s3://b/out.parquet"]) == 0
    assert (seen["predict_input"], seen["predict_output"]) == ("/in.csv", "s3://b/out.parquet")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert main(["deploy"]) == 0  # not given: "" (deployments.py falls back to the environment)
    assert (seen["csv_path"], seen["predict_input"], seen["predict_output"]) == ("", "", "")


def test_training_step_runs_on_the_gpu_pool(stack, toy_csv):
    experiment = f"orch-gpu-{uuid.uuid4().hex[:6]}"
    params = csv_parameters(stack, toy_csv, experiment, epochs=3)
    params["cfg"]["storage"].update(uri=f"s3://{BUCKET}/runs", endpoint_url=stack["s3"].url)
    params["train_deployment"] = "trainyard-train-step/gpu"
    mlflow = MlflowClient(f"sqlite:///{stack['root'] / 'mlflow.db'}")
    with client_for(stack) as client:
        dep = client.read_deployment_by_name("trainyard-train/on-demand")
        run = wait_final(client, client.create_flow_run_from_deployment(dep.id, parameters=params).id)
        assert run.state.is_completed(), run.state
        (mrun,) = mlflow.search_runs([mlflow.get_experiment_by_name(experiment).experiment_id])
        assert mrun.info.status == "FINISHED" and mrun.data.tags["train.deployment"] == "trainyard-train-step/gpu"
        step = client.read_flow_run(mrun.data.tags["train.flow_run_id"])
        assert step.state.is_completed()
        gpu = client.read_deployment_by_name("trainyard-train-step/gpu")
        assert step.deployment_id == gpu.id
        assert [m.step for m in mlflow.get_metric_history(mrun.info.run_id, "train/loss")] == [1, 2, 3]
    keys = {
        o["Key"] for o in boto3.client("s3", endpoint_url=stack["s3"].url).list_objects_v2(Bucket=BUCKET)["Contents"]
    }
    assert f"runs/handoffs/{mrun.info.run_id}/best.pt" in keys
    assert f"runs/{experiment}/{mrun.info.run_id}/manifest.json" in keys


def test_sweep_trials_train_on_the_gpu_pool(stack, toy_csv):
    from pipelines.config import TrainConfig
    from pipelines.sweep import sweep_flow
    from tasks.sweep_config import SweepConfig

    experiment = f"orch-sweep-{uuid.uuid4().hex[:6]}"
    params = csv_parameters(stack, toy_csv, experiment, epochs=2, min_steps=0, early_stopping=0)
    params["cfg"]["storage"].update(uri=f"s3://{BUCKET}/runs", endpoint_url=stack["s3"].url)
    space = {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    sweep = SweepConfig(
        name=experiment,
        space=space,
        trials=2,
        pruner="median",
        storage=f"sqlite:///{stack['root'] / 'optuna.db'}",  # the gpu pool's worker runs on this machine
        train_deployment="trainyard-train-step/gpu",
    )
    with client_for(stack) as client:
        summary = sweep_flow(TrainConfig.model_validate(params["cfg"]), sweep)
        assert summary["trials"] == {"COMPLETE": 2}
        mlflow = MlflowClient(f"sqlite:///{stack['root'] / 'mlflow.db'}")
        query = f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'"
        trials = mlflow.search_runs([mlflow.get_experiment_by_name(experiment).experiment_id], query)
        assert len(trials) == 2
        gpu = client.read_deployment_by_name("trainyard-train-step/gpu")
        for trial in trials:  # each trained by a run of the gpu pool's train step, which reported to the study
            assert trial.data.tags["train.deployment"] == "trainyard-train-step/gpu"
            assert client.read_flow_run(trial.data.tags["train.flow_run_id"]).deployment_id == gpu.id
            assert [m.step for m in mlflow.get_metric_history(trial.info.run_id, "train/loss")] == [1, 2]
    import optuna

    reported = optuna.load_study(study_name=experiment, storage=sweep.storage).get_trials()
    assert all(sorted(t.intermediate_values) == [1, 2] for t in reported)


def test_a_train_step_no_worker_starts_fails_the_wait_and_is_cancelled(stack, toy_csv):
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.config import TrainConfig
    from pipelines.context import RunContext
    from pipelines.remote import RemoteTrainingError, train_remotely, train_step_flow
    from tasks.results import DatasetRef

    params = csv_parameters(stack, toy_csv, "orch-idle")
    params["cfg"]["storage"].update(uri=f"s3://{BUCKET}/runs", endpoint_url=stack["s3"].url)
    cfg = TrainConfig.model_validate(params["cfg"])
    root = stack["root"]
    ctx = RunContext("run-x", "idle", root / "idle-run", root / "idle-tb", "sqlite:///unused.db", cfg.storage.uri, root)
    dataset = DatasetRef("no-such-key", "", "", "csv", "classification", {}, reused=False)
    with client_for(stack) as client, temporary_settings(updates={PREFECT_API_URL: stack["api"]}):
        client.create_work_pool(WorkPoolCreate(name="gpu-idle", type="process"))  # a pool no worker serves
        train_step_flow.to_deployment(name="idle", work_pool_name="gpu-idle").apply()
        expected = r"no worker started train step 'trainyard-train-step/idle' .* within 3 s: it stayed Scheduled"
        with pytest.raises(RemoteTrainingError, match=expected):
            train_remotely("trainyard-train-step/idle", cfg, ctx, dataset, start_timeout=3)
        dep = client.read_deployment_by_name("trainyard-train-step/idle")
        (step,) = client.read_flow_runs(deployment_filter=_deployment_filter(dep.id))
        assert step.state.type.value == "CANCELLED"  # it will not train later into a failed MLflow run


def _deployment_filter(deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))


def test_deploy_again_sets_the_gpu_slots_entrypoints_and_image(stack):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.deployments import deploy

    with temporary_settings(updates={PREFECT_API_URL: stack["api"]}):
        try:
            deploy(
                REPO,
                gpu_slots=2,
                image="registry.example/trainyard-cuda:1",
                **DEPLOY_ARGS,
            )
            with client_for(stack) as client:
                assert client.read_work_pool("gpu").concurrency_limit == 2
                step = client.read_deployment_by_name("trainyard-train-step/gpu")
                assert step.entrypoint == "pipelines/remote.py:train_step_flow"  # not relative to where deploy ran
                assert step.global_concurrency_limit.limit == 2
                assert step.job_variables == {"working_dir": str(REPO), "image": "registry.example/trainyard-cuda:1"}
                nightly = client.read_deployment_by_name("trainyard-train/nightly-mnist")
                assert nightly.entrypoint == "pipelines/flow.py:retrying_train_flow"
        finally:  # the other tests of this module use the stack as the fixture made it
            deploy(REPO, gpu_slots=1, **DEPLOY_ARGS)
    with client_for(stack) as client:
        assert client.read_work_pool("gpu").concurrency_limit == 1
        assert "image" not in client.read_deployment_by_name("trainyard-train-step/gpu").job_variables


def test_deploy_needs_a_reachable_server(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.cli import main
    from tests.services import free_port

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["deploy"]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err
    url = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        assert main(["deploy"]) == 1
    assert f"trainyard deploy: the Prefect server at {url} is unreachable" in capsys.readouterr().err
