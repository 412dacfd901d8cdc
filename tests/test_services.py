"""The real services: `mlflow server` on PostgreSQL with proxied S3 artifacts, and our S3 artifact store,
both against moto's standalone S3 server on 127.0.0.1. Faults: the endpoint stopped, a wrong bucket,
refused credentials, a corrupted object."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import uuid

import boto3
import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import load_config
from tasks.storage import StorageError
from tests.conftest import crash_training_once
from tests.services import FAKE_KEYS, free_port, mlflow_server, postgres_database, s3_endpoint, wait_http

pytestmark = [pytest.mark.service, pytest.mark.usefixtures("prefect_harness")]
BUCKET, MLFLOW_BUCKET = "trainyard-artifacts", "mlflow-artifacts"


@pytest.fixture(scope="module")
def s3():
    with s3_endpoint(BUCKET, MLFLOW_BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def mlflow_uri(s3, tmp_path_factory):
    with postgres_database() as (backend, _name):
        log = tmp_path_factory.mktemp("mlflow") / "server.log"
        with mlflow_server(backend, f"s3://{MLFLOW_BUCKET}/mlflow", s3.url, log) as (uri, _proc):
            yield uri


def s3_client(s3):
    return boto3.client("s3", endpoint_url=s3.url)


def service_config(csv_path, s3, mlflow_uri, experiment, *extra):
    return load_config(
        "csv",
        overrides=[
            f"data.path={csv_path}",
            "data.target=label",
            "data.drop=[id]",
            "train.epochs=8",
            f"tracking.uri={mlflow_uri}",
            f"tracking.experiment={experiment}",
            f"storage.uri=s3://{BUCKET}/runs",
            f"storage.endpoint_url={s3.url}",
            "storage.max_attempts=2",
            *extra,
        ],
    )


def test_flow_against_mlflow_server_and_s3_with_champion(toy_csv, s3, mlflow_uri, tmp_path, monkeypatch):
    from pipelines.flow import train_flow

    experiment = f"svc-{uuid.uuid4().hex[:8]}"
    first = train_flow(service_config(toy_csv, s3, mlflow_uri, experiment))
    run_id = first["mlflow_run_id"]
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "mlp"
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == list(range(1, 9))
    # proxied artifacts: the client lists them through the server; the bytes live in the S3 bucket
    assert {"config.yaml", "schema.json", "evaluation", "plots"} <= {a.path for a in client.list_artifacts(run_id)}
    keys = {o["Key"] for o in s3_client(s3).list_objects_v2(Bucket=MLFLOW_BUCKET)["Contents"]}
    assert any(k.endswith("confusion_matrix.png") for k in keys)
    # our artifact store: every object carries its sha256, and it matches the bytes
    prefix = f"runs/{experiment}/{run_id}/"
    objects = s3_client(s3).list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    names = {o["Key"][len(prefix) :] for o in objects}
    assert {"model_state.pt", "schema.json", "metrics.json", "manifest.json", "checkpoints/best.pt"} <= names
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    for name in ("model_state.pt", "schema.json", "checkpoints/best.pt"):
        obj = s3_client(s3).get_object(Bucket=BUCKET, Key=prefix + name)
        assert obj["Metadata"]["sha256"] == hashlib.sha256(obj["Body"].read()).hexdigest()
    # the prepared dataset is shared under datasets/<key>/
    assert s3_client(s3).head_object(Bucket=BUCKET, Key=f"runs/datasets/{first['dataset']['key']}/tensors.pt")
    # the registry: version 1, challenger and champion
    version = client.get_model_version_by_alias(experiment, "champion")
    assert version.version == "1" and version.run_id == run_id
    assert client.get_model_version_by_alias(experiment, "challenger").version == "1"
    assert run.data.tags["champion.decision"] == "promoted"

    # a second, worse run on another "machine" (a fresh state folder): reuses the shared dataset, stays challenger
    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "other-machine"))
    second = train_flow(
        service_config(toy_csv, s3, mlflow_uri, experiment, "train.epochs=1", "optim.lr=1e-6", "schedule.name=none")
    )
    assert second["dataset"]["reused"] and second["dataset"]["key"] == first["dataset"]["key"]
    assert second["test_metrics"]["test/accuracy"] < first["test_metrics"]["test/accuracy"]
    assert client.get_model_version_by_alias(experiment, "champion").version == "1"
    assert client.get_model_version_by_alias(experiment, "challenger").version == "2"
    tags = client.get_run(second["mlflow_run_id"]).data.tags
    assert tags["champion.decision"] == "kept" and "does not beat champion v1" in tags["champion.reason"]
    metrics = client.get_run(second["mlflow_run_id"]).data.metrics
    assert metrics["champion/previous_value"] == pytest.approx(first["test_metrics"]["test/accuracy"])

    # `trainyard runs` and `trainyard champion` read the same server
    from pipelines.inspect_runs import describe_champion, format_table, latest_runs

    rows = latest_runs(mlflow_uri, experiment, 5)
    assert [r["run_id"] for r in rows] == [second["mlflow_run_id"], run_id]
    assert [r["champion"] for r in rows] == [False, True]
    assert "* champion" in format_table(rows)
    assert describe_champion(mlflow_uri, experiment)["version"] == "1"
    # and a person can promote by hand
    from tasks.champion import promote

    promote(mlflow_uri, experiment, "2")
    assert client.get_model_version_by_alias(experiment, "champion").version == "2"


def test_wrong_bucket_fails_before_training(toy_csv, s3, mlflow_uri, monkeypatch):
    import tasks.train_rank as training
    from pipelines.flow import train_flow

    experiment = f"svc-{uuid.uuid4().hex[:8]}"
    cfg = service_config(toy_csv, s3, mlflow_uri, experiment, "storage.uri=s3://no-such-bucket/x")
    called = []
    monkeypatch.setattr(training, "train_model", lambda *a, **k: called.append(1))
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        train_flow(cfg)
    assert called == [] and MlflowClient(mlflow_uri).get_experiment_by_name(experiment) is None


def test_unreachable_mlflow_server_fails_before_training(toy_csv, s3):
    from pipelines.flow import train_flow
    from tasks.tracking import TrackingUnavailable

    cfg = service_config(toy_csv, s3, f"http://127.0.0.1:{free_port()}", "never")
    with pytest.raises(TrackingUnavailable, match="is unreachable"):
        train_flow(cfg)


def test_refused_credentials_are_a_clear_error(tmp_path, monkeypatch):
    for key, value in {**FAKE_KEYS, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)  # keys the endpoint refuses, and that must not be echoed
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", proc=proc)
        from tasks.s3store import S3Store

        store = S3Store("any-bucket", "p", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1)
        with pytest.raises(StorageError) as err:
            store.preflight()
        msg = str(err.value)
        assert "credentials refused" in msg and "any-bucket" in msg
        assert FAKE_KEYS["AWS_SECRET_ACCESS_KEY"] not in msg and FAKE_KEYS["AWS_ACCESS_KEY_ID"] not in msg
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_corrupted_object_is_refused_and_not_used(s3, tmp_path):
    from tasks.s3store import S3Store

    src = tmp_path / "w.bin"
    src.write_bytes(b"the real weights")
    store = S3Store(BUCKET, "corrupt", endpoint_url=s3.url)
    store.publish("e/r", {"model.pt": str(src)})
    assert store.fetch("e/r/model.pt", tmp_path / "ok.bin").read_bytes() == b"the real weights"
    head = s3_client(s3).head_object(Bucket=BUCKET, Key="corrupt/e/r/model.pt")
    s3_client(s3).put_object(
        Bucket=BUCKET, Key="corrupt/e/r/model.pt", Body=b"flipped bits!", Metadata=head["Metadata"]
    )
    with pytest.raises(StorageError, match=r"s3://trainyard-artifacts/corrupt/e/r/model.pt: sha256 .* does not match"):
        store.fetch("e/r/model.pt", tmp_path / "bad.bin")
    assert not (tmp_path / "bad.bin").exists() and not list(tmp_path.glob(".bad.bin*"))


def test_a_failed_checkpoint_upload_keeps_the_previous_checkpoint(s3, tmp_path, monkeypatch):
    from tasks.checkpoint import checkpoint_prefix, fetch_checkpoint, publish_checkpoint
    from tasks.s3store import S3Store

    store = S3Store(BUCKET, "ckpt", endpoint_url=s3.url)
    run_id = uuid.uuid4().hex
    assert fetch_checkpoint(store, run_id, tmp_path) is False

    def checkpoints(epoch: int) -> dict:
        folder = tmp_path / f"epoch{epoch}"
        folder.mkdir()
        for role in ("last", "best"):
            (folder / f"{role}.pt").write_bytes(f"{role} weights of epoch {epoch}".encode())
        return {role: folder / f"{role}.pt" for role in ("last", "best")}

    def fetched() -> dict:
        folder = tmp_path / uuid.uuid4().hex
        folder.mkdir()
        assert fetch_checkpoint(store, run_id, folder)
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    publish_checkpoint(store, run_id, checkpoints(1))
    assert fetched() == {"last.pt": b"last weights of epoch 1", "best.pt": b"best weights of epoch 1"}

    upload = S3Store._upload

    def manifest_fails(self, src, key, sha):
        if key.endswith("/manifest.json"):
            raise StorageError(f"S3 upload failed for {key}: endpoint gone")
        upload(self, src, key, sha)

    monkeypatch.setattr(S3Store, "_upload", manifest_fails)
    second = checkpoints(2)
    with pytest.raises(StorageError, match="endpoint gone"):
        publish_checkpoint(store, run_id, second)
    monkeypatch.setattr(S3Store, "_upload", upload)
    # the run can still resume from epoch 1, on this worker or another
    assert fetched() == {"last.pt": b"last weights of epoch 1", "best.pt": b"best weights of epoch 1"}

    publish_checkpoint(store, run_id, second)
    assert fetched() == {"last.pt": b"last weights of epoch 2", "best.pt": b"best weights of epoch 2"}
    listed = s3_client(s3).list_objects_v2(Bucket=BUCKET, Prefix=f"ckpt/{checkpoint_prefix(run_id)}/")["Contents"]
    assert len(listed) == 3  # the newest two checkpoints and their manifest: superseded ones are deleted


def test_a_retry_on_another_worker_resumes_from_the_shared_checkpoint(toy_csv, s3, state_home, monkeypatch):
    """The worker is lost after epoch 2 with its local run folder; the retry finds the checkpoint in S3."""
    import shutil

    import pipelines.training as training
    from pipelines.flow import train_flow

    cfg = load_config(
        "csv",
        overrides=[
            f"data.path={toy_csv}",
            "data.target=label",
            "data.drop=[id]",
            "train.epochs=4",
            "train.batch_size=16",
            f"storage.uri=s3://{BUCKET}/retry",
            f"storage.endpoint_url={s3.url}",
            "storage.max_attempts=2",
        ],
    )

    def lose_the_workers_files():
        for folder in state_home.glob("runs/*/checkpoints"):
            shutil.rmtree(folder)

    calls = crash_training_once(monkeypatch, at_epoch=2, lose=lose_the_workers_files)
    fetch, fetched = training.fetch_checkpoint, []

    def recording_fetch(store, run_id, folder):
        found = fetch(store, run_id, folder)
        fetched.append(sorted(p.name for p in folder.iterdir()) if found else None)
        return found

    monkeypatch.setattr(training, "fetch_checkpoint", recording_fetch)
    summary = train_flow.with_options(retries=1, retry_delay_seconds=0)(cfg)
    assert calls[0] is None and calls[1] is not None
    assert fetched == [None, ["best.pt", "last.pt"]]  # the retry took both from S3: the weights kept so far too
    run = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["train.resumed_from_epoch"] == "2"


def _stop_after_evaluate(monkeypatch, s3, restart_after: float | None):
    """Stop the S3 endpoint right after evaluation, i.e. just before the artifacts are stored."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    import pipelines.flow as F
    import pipelines.training as training

    def evaluate_then_stop(*args, **kwargs):
        out = training.evaluate(*args, **kwargs)
        s3.stop()
        if restart_after is not None:
            threading.Timer(restart_after, s3.start).start()
        return out

    monkeypatch.setattr(F, "evaluate_task", task(evaluate_then_stop, name="evaluate", cache_policy=NO_CACHE))


def test_s3_outage_during_a_run_is_retried(toy_csv, s3, mlflow_uri, monkeypatch):
    from pipelines.flow import train_flow

    _stop_after_evaluate(monkeypatch, s3, restart_after=1.0)
    summary = train_flow(service_config(toy_csv, s3, mlflow_uri, f"svc-{uuid.uuid4().hex[:8]}"))
    assert MlflowClient(mlflow_uri).get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    obj = s3_client(s3).get_object(Bucket=BUCKET, Key=summary["artifacts"]["model_state.pt"].split(f"{BUCKET}/", 1)[1])
    assert obj["Metadata"]["sha256"] == hashlib.sha256(obj["Body"].read()).hexdigest()


def test_s3_gone_for_good_fails_the_run_cleanly(toy_csv, s3, mlflow_uri, monkeypatch):
    from pipelines.flow import train_flow

    experiment = f"svc-{uuid.uuid4().hex[:8]}"
    _stop_after_evaluate(monkeypatch, s3, restart_after=None)
    try:
        with pytest.raises(StorageError) as err:
            train_flow(service_config(toy_csv, s3, mlflow_uri, experiment))
        assert f"s3://{BUCKET}/runs/{experiment}/" in str(err.value) and "cannot reach the S3 endpoint" in str(
            err.value
        )
    finally:
        s3.start()
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FAILED"
    listed = s3_client(s3).list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{experiment}/")
    assert not any(o["Key"].endswith("manifest.json") for o in listed.get("Contents", []))


def test_no_secret_reaches_anything_the_run_wrote(toy_csv, s3, mlflow_uri, state_home, capfd, monkeypatch):
    from pipelines.flow import train_flow

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlflow-password-never-written")  # unused by this server, but set
    secrets = [FAKE_KEYS["AWS_ACCESS_KEY_ID"], FAKE_KEYS["AWS_SECRET_ACCESS_KEY"], "mlflow-password-never-written"]
    experiment = f"svc-{uuid.uuid4().hex[:8]}"
    summary = train_flow(service_config(toy_csv, s3, mlflow_uri, experiment, "train.epochs=2"))
    written = [p for p in state_home.rglob("*") if p.is_file()]
    assert any(p.name == "tensors.pt" for p in written) and any(p.name.startswith("events.out") for p in written)
    for path in written:
        blob = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in blob, f"{secret[:4]}... found in {path}"
    out, err = capfd.readouterr()
    for secret in secrets:
        assert secret not in out and secret not in err
    run = MlflowClient(mlflow_uri).get_run(summary["mlflow_run_id"])
    everything = repr(run.data.params) + repr(run.data.tags) + repr(run.data.metrics)
    for obj in s3_client(s3).list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{experiment}/")["Contents"]:
        everything += s3_client(s3).get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read().decode("latin-1")
    for secret in secrets:
        assert secret not in everything


def test_preflight_waits_for_an_endpoint_that_is_restarting(s3):
    """A restart of the S3 endpoint during preflight is waited out; a missing bucket is not."""
    from tasks.s3store import S3Store

    def counting(store):
        calls, head = [], store.client.head_bucket

        def head_bucket(**kwargs):
            calls.append(kwargs)
            return head(**kwargs)

        store.client.head_bucket = head_bucket
        return calls

    store = S3Store(BUCKET, "p", endpoint_url=s3.url, max_attempts=1)
    tries = counting(store)
    s3.stop()
    restart = threading.Timer(2.0, s3.start)
    restart.start()
    try:
        store.preflight(wait=30)
    finally:
        restart.join()
    assert len(tries) >= 2  # refused while the endpoint was down, then answered
    missing = S3Store("no-such-bucket", "p", endpoint_url=s3.url, max_attempts=1)
    tries = counting(missing)
    with pytest.raises(StorageError, match="does not exist"):
        missing.preflight(wait=30)
    assert len(tries) == 1  # a missing bucket is not waited for
