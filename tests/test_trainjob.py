"""Training on several GPUs and nodes on Kubernetes, without a cluster.

- the Kubeflow Trainer TrainJob that pipelines/trainjob.py renders validates against the TrainJob CRD's
  schema (../shared/schemas/kubeflow-trainer/, else the copy in deploy/schemas/kubeflow-trainer/), and a
  broken one does not;
- the gpu pool's job templates take the step's GPU count (train.distributed.nproc_per_node);
- submission and waiting go through the kubernetes client to a stand-in API server on loopback;
- `trainyard trainjob` prints a manifest that validates, and refuses a bad value in one line.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipelines import trainjob
from pipelines.config import ConfigError, TrainConfig
from tasks.errors import RemoteTrainingError
from tests.test_deploy_stack import DEPLOY, K8S, k8s_validate, render_template

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = "trainer.kubeflow.org_trainjobs.yaml"
SHARED_CRD = ROOT.parent / "shared" / "schemas" / "kubeflow-trainer" / CRD_FILE
VENDORED_CRD = DEPLOY / "schemas" / "kubeflow-trainer" / CRD_FILE
RUN_ID = "0123456789abcdef0123456789abcdef"
NAME = f"trainyard-{RUN_ID[:12]}"
URIS = {"tracking_uri": "http://mlflow.internal:5000", "storage_uri": "s3://trainyard/trainyard"}


def config(**distributed) -> TrainConfig:
    return TrainConfig.model_validate({"train": {"distributed": distributed}})


def render(cfg: TrainConfig, **kwargs) -> dict:
    values = {"run_id": RUN_ID, "dataset_key": "ds-1", "image": "registry.local/trainyard:cuda", **URIS, **kwargs}
    return trainjob.render_trainjob(cfg, **values)


@pytest.fixture(scope="module")
def crd() -> dict:
    path = SHARED_CRD if SHARED_CRD.is_file() else VENDORED_CRD
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator(crd) -> jsonschema.Draft7Validator:
    (served,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    assert served["name"] == trainjob.VERSION and crd["spec"]["group"] == trainjob.GROUP
    assert crd["spec"]["names"]["kind"] == trainjob.KIND and crd["spec"]["names"]["plural"] == trainjob.PLURAL
    schema = served["schema"]["openAPIV3Schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def check_trainjob(validator, crd, manifest: dict) -> None:
    """The CRD's schema, then its CEL rules on what the schema cannot say (read from the CRD, so a new rule
    there fails this until it is checked here too)."""
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert errors == []
    schema = next(v for v in crd["spec"]["versions"] if v["served"])["schema"]["openAPIV3Schema"]
    rules = {r["rule"] for r in schema["x-kubernetes-validations"]}
    assert rules == {"self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')", "size(self.metadata.name) <= 63"}
    name = manifest["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    nproc_rule = schema["properties"]["spec"]["properties"]["trainer"]["properties"]["numProcPerNode"]
    assert [r["rule"] for r in nproc_rule["x-kubernetes-validations"]] == ["self >= 1"]
    assert manifest["spec"]["trainer"]["numProcPerNode"] >= 1
    for patch in manifest["spec"].get("runtimePatches", []):  # the Trainer's webhook: a domain-prefixed path
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9/_.~-]+", patch["manager"]), patch["manager"]


def test_vendored_crd_is_present_and_current():
    crd = yaml.safe_load(VENDORED_CRD.read_text(encoding="utf-8"))
    assert crd["kind"] == "CustomResourceDefinition" and crd["metadata"]["name"] == "trainjobs.trainer.kubeflow.org"
    assert "Apache License" in (VENDORED_CRD.parent / "LICENSE").read_text(encoding="utf-8")
    if SHARED_CRD.is_file():
        assert VENDORED_CRD.read_bytes() == SHARED_CRD.read_bytes(), "deploy/schemas copy differs from shared/"


@pytest.mark.parametrize(
    ("distributed", "gpus_per_node", "nproc", "gpus"),
    [
        ({}, None, 1, 1),
        ({"nodes": 2, "nproc_per_node": "auto"}, None, 1, 1),
        ({"nodes": 2, "nproc_per_node": "auto"}, 8, 8, 8),
        ({"nodes": 3, "nproc_per_node": 4}, None, 4, 4),
        ({"nodes": 2, "nproc_per_node": 2}, 0, 2, 0),  # CPU nodes, gloo
    ],
)
def test_rendered_trainjob_validates(validator, crd, distributed, gpus_per_node, nproc, gpus):
    from pipelines.train_worker import _parser

    cfg = config(**distributed)
    manifest = render(cfg, gpus_per_node=gpus_per_node)
    check_trainjob(validator, crd, manifest)
    assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and manifest["kind"] == "TrainJob"
    assert manifest["metadata"]["name"] == NAME
    assert manifest["metadata"]["labels"][trainjob.RUN_ID_LABEL] == RUN_ID
    spec = manifest["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
        "kind": "ClusterTrainingRuntime",
        "apiGroup": trainjob.GROUP,
    }
    trainer = spec["trainer"]
    assert trainer["numNodes"] == cfg.train.distributed.nodes and trainer["numProcPerNode"] == nproc
    assert trainer.get("resourcesPerNode", {}).get("limits", {}).get("nvidia.com/gpu", 0) == gpus
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node"
    assert ("nodeSelector" in pod["template"]["spec"]["template"]["spec"]) == bool(gpus)
    # The container runs torchrun with the worker's command line, which the worker's own parser reads back.
    assert trainer["command"] == ["torchrun", "-m", "pipelines.train_worker"]
    args = _parser().parse_args(trainer["args"])
    assert TrainConfig.model_validate_json(args.config_json) == cfg
    assert (args.run_id, args.dataset_key, args.tracking_uri, args.storage_uri) == (RUN_ID, "ds-1", *URIS.values())
    env = {e["name"]: e for e in trainer["env"]}
    assert not {n for n in env if n.startswith("PET_")}, "the runtime sets PET_*; a TrainJob may not"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "trainyard-job-env",
        "key": "AWS_SECRET_ACCESS_KEY",
        "optional": True,
    }
    assert "value" not in env["AWS_ACCESS_KEY_ID"] and env["MLFLOW_TRACKING_URI"]["value"] == URIS["tracking_uri"]


def test_broken_trainjob_fails_validation(validator, crd):
    manifest = render(config(nodes=2, nproc_per_node=2))
    check_trainjob(validator, crd, manifest)
    for path, value in [
        (("trainer", "numNodes"), "two"),
        (("trainer", "numProcPerNode"), "auto"),
        (("trainer", "command"), "torchrun -m pipelines.train_worker"),
        (("runtimeRef", "name"), ""),
        (("trainer", "resourcesPerNode", "limits", "nvidia.com/gpu"), "two GPUs"),
    ]:
        broken = copy.deepcopy(manifest)
        node = broken["spec"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert not validator.is_valid(broken), path
    missing = copy.deepcopy(manifest)
    del missing["spec"]["runtimeRef"]
    assert not validator.is_valid(missing)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image": ""}, "image:"),
        ({"tracking_uri": "sqlite:///mlflow.db"}, "tracking URI: the nodes log to an MLflow server"),
        ({"storage_uri": "/var/lib/trainyard/artifacts"}, "storage URI: several nodes share"),
        ({"name": "Trainyard_1"}, "TrainJob name: expected at most 63 lowercase"),
        ({"name": "t" * 64}, "TrainJob name"),
        ({"run_id": ""}, "run id: expected an MLflow run id"),
        ({"namespace": "Train Yard"}, "namespace: expected"),
        ({"gpus_per_node": -1}, "gpus_per_node: expected a whole number >= 0"),
    ],
)
def test_render_refuses_bad_values_in_one_line(kwargs, message):
    with pytest.raises(ConfigError) as info:
        render(config(nodes=2), **kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_processes_must_match_the_gpus():
    with pytest.raises(ConfigError, match=r"nproc_per_node=4 with 2 GPUs per node: each process takes one GPU"):
        render(config(nodes=2, nproc_per_node=4), gpus_per_node=2)


# ---- the gpu pool's job templates ---------------------------------------------------------------------


@pytest.mark.parametrize(("nproc", "gpus"), [(1, 1), ("auto", 1), (2, 2), (4, 4)])
def test_gpu_job_templates_take_the_steps_gpu_count(nproc, gpus):
    from pipelines.remote import step_job_variables

    cfg = config(nproc_per_node=nproc)
    variables = step_job_variables(cfg)
    assert variables == ({"gpu_count": nproc} if gpus > 1 else None)
    values = {"image": "registry.local/trainyard:cuda", "name": "step", **(variables or {})}
    template = json.loads((K8S / "gpu-job-template.json").read_text(encoding="utf-8"))
    assert jsonschema.Draft202012Validator(template["variables"]).is_valid(values)
    manifest = render_template(template, values)["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": gpus}
    container["env"] = [{"name": "PREFECT__FLOW_RUN_ID", "value": "1"}]  # as the worker lists them
    container["args"] = ["prefect", "flow-run", "execute"]
    k8s_validate(manifest)
    docker = json.loads((DEPLOY / "docker-gpu-job-template.json").read_text(encoding="utf-8"))
    assert jsonschema.Draft202012Validator(docker["variables"]).is_valid(values)
    (request,) = render_template(docker, values)["container_create_kwargs"]["device_requests"]
    assert request["count"] == gpus and request["driver"] == "nvidia"


# ---- submitting and waiting, against a stand-in Kubernetes API ---------------------------------------


class FakeTrainJobs(BaseHTTPRequestHandler):
    """POST, GET and DELETE of trainjobs.trainer.kubeflow.org in any namespace; a job's conditions come
    after `polls` GETs: Complete, or Failed with `fail_message` when that is set."""

    jobs: dict[str, dict] = {}
    gets: dict[str, int] = {}
    deleted: list[str] = []
    polls = 2
    fail_message = ""
    prefix = f"/apis/{trainjob.GROUP}/{trainjob.VERSION}/namespaces/"

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _parts(self) -> list[str]:
        assert self.path.startswith(self.prefix), self.path
        return self.path[len(self.prefix) :].split("?")[0].split("/")

    def do_POST(self):  # noqa: N802
        namespace, plural = self._parts()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        name = body["metadata"]["name"]
        if plural != trainjob.PLURAL or body["metadata"]["namespace"] != namespace:
            return self._reply(400, {"kind": "Status", "message": f"bad request {self.path}"})
        if name in self.jobs:
            message = f'trainjobs.trainer.kubeflow.org "{name}" already exists'
            return self._reply(409, {"kind": "Status", "reason": "AlreadyExists", "message": message, "code": 409})
        self.jobs[name] = body
        self._reply(201, body)

    def do_GET(self):  # noqa: N802
        _, _, name = self._parts()
        if name not in self.jobs:
            return self._reply(404, {"kind": "Status", "message": f'trainjobs "{name}" not found', "code": 404})
        self.gets[name] = self.gets.get(name, 0) + 1
        job = copy.deepcopy(self.jobs[name])
        if self.gets[name] > self.polls:
            kind = "Failed" if self.fail_message else "Complete"
            cond = {"type": kind, "status": "True", "reason": "JobsFailed" if self.fail_message else "JobsCompleted"}
            job["status"] = {"conditions": [cond | ({"message": self.fail_message} if self.fail_message else {})]}
        self._reply(200, job)

    def do_DELETE(self):  # noqa: N802
        _, _, name = self._parts()
        self.deleted.append(name)
        self._reply(200, {"kind": "Status", "status": "Success"})

    def log_message(self, *args):
        pass


@pytest.fixture()
def api():
    """A kubernetes ApiClient for a stand-in API server on 127.0.0.1, stopped after the test."""
    from kubernetes import client

    FakeTrainJobs.jobs, FakeTrainJobs.gets, FakeTrainJobs.deleted = {}, {}, []
    FakeTrainJobs.polls, FakeTrainJobs.fail_message = 2, ""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTrainJobs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    api_client = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}"))
    try:
        yield api_client
    finally:
        api_client.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_submit_and_wait_until_complete(api):
    manifest = render(config(nodes=2, nproc_per_node=2))
    name = manifest["metadata"]["name"]
    created = trainjob.submit_trainjob(manifest, api)
    assert created["spec"]["trainer"]["numNodes"] == 2 and FakeTrainJobs.jobs[name] == manifest
    job = trainjob.wait_trainjob(name, "trainyard", timeout=30, poll=0.01, api_client=api)
    assert trainjob.job_state(job) == ("Complete", "JobsCompleted")
    assert FakeTrainJobs.gets[name] == FakeTrainJobs.polls + 1  # it polled until the condition came
    with pytest.raises(RemoteTrainingError) as info:  # the same name again
        trainjob.submit_trainjob(manifest, api)
    assert str(info.value) == (
        f"submitting TrainJob trainyard/{name}: the Kubernetes API answered 409: "
        f'trainjobs.trainer.kubeflow.org "{name}" already exists'
    )
    with pytest.raises(RemoteTrainingError, match=r"reading TrainJob trainyard/nope: .* 404: trainjobs \"nope\""):
        trainjob.wait_trainjob("nope", "trainyard", timeout=30, poll=0.01, api_client=api)


def test_a_failed_trainjob_raises_its_message(api):
    FakeTrainJobs.fail_message = "jobset trainyard-0123 failed: node-1 exited with code 1 (ChildFailedError)"
    manifest = render(config(nodes=2))
    trainjob.submit_trainjob(manifest, api)
    name = manifest["metadata"]["name"]
    with pytest.raises(RemoteTrainingError) as info:
        trainjob.wait_trainjob(name, "trainyard", timeout=30, poll=0.01, api_client=api)
    assert str(info.value) == f"TrainJob trainyard/{name} failed: JobsFailed: {FakeTrainJobs.fail_message}"


def test_wait_gives_up_after_its_timeout(api):
    FakeTrainJobs.polls = 10**6
    manifest = render(config(nodes=2))
    trainjob.submit_trainjob(manifest, api)
    with pytest.raises(RemoteTrainingError, match=r"did not finish within 0 s \(see `kubectl -n trainyard describe"):
        trainjob.wait_trainjob(manifest["metadata"]["name"], "trainyard", timeout=0.05, poll=0.01, api_client=api)


def test_an_unreachable_api_is_one_line():
    from kubernetes import client

    with socket.socket() as sock:  # a loopback port nothing listens on: bound, then closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    configuration = client.Configuration(host=f"http://127.0.0.1:{port}")
    configuration.retries = 0
    with client.ApiClient(configuration) as api_client, pytest.raises(RemoteTrainingError) as info:
        trainjob.submit_trainjob(render(config(nodes=2)), api_client)
    message = str(info.value)
    assert message.startswith(f"submitting TrainJob trainyard/{NAME}: the Kubernetes API is not reachable")
    assert "\n" not in message


def run_context(tmp_path: Path):
    from pipelines.context import RunContext

    run_dir = tmp_path / "runs" / RUN_ID
    return RunContext(RUN_ID, "brave-owl", run_dir, tmp_path / "tb", *URIS.values(), tmp_path)


@pytest.fixture()
def shared_store(tmp_path, monkeypatch):
    """A folder store that says it is remote, with the handoff rank 0 leaves, standing in for S3."""
    from tasks.results import TrainResult
    from tasks.storage import LocalStore

    store = LocalStore(tmp_path / "bucket")
    store.remote = True
    work = tmp_path / "node0"
    work.mkdir()
    (work / "best.pt").write_bytes(b"weights")
    result = TrainResult("/elsewhere/best.pt", 3, 0.9, "val/accuracy", "cuda", "bf16", 12.5, processes=4)
    (work / "result.json").write_text(json.dumps(result.to_dict()), encoding="utf-8")
    files = {"best.pt": str(work / "best.pt"), "result.json": str(work / "result.json")}
    store.publish(f"handoffs/{RUN_ID}", files)
    monkeypatch.setattr("pipelines.context.store_for", lambda cfg, uri: store)
    tags = {}
    monkeypatch.setattr("tasks.tracking.set_tags", lambda uri, run_id, values: tags.update({run_id: values}))
    return tags


def test_train_on_trainjob_brings_the_handoff_back(api, tmp_path, shared_store):
    from tasks import keys
    from tasks.results import DatasetRef

    ctx = run_context(tmp_path)
    dataset = DatasetRef("ds-1", str(tmp_path / "ds"), "hash", "mnist", "classification", {}, reused=True)
    cfg = config(nodes=2, nproc_per_node=2)
    result = trainjob.train_on_trainjob(cfg, ctx, dataset, "registry.local/trainyard:cuda", poll=0.01, api_client=api)
    assert (result.best_epoch, result.processes) == (3, 4)
    assert (
        Path(result.checkpoint) == ctx.checkpoint_dir / "best.pt" and Path(result.checkpoint).read_bytes() == b"weights"
    )
    written = yaml.safe_load((ctx.run_dir / "trainjob.yaml").read_text(encoding="utf-8"))
    assert written == FakeTrainJobs.jobs[NAME] and written["spec"]["trainer"]["numNodes"] == 2
    assert shared_store == {RUN_ID: {keys.TRAIN_TRAINJOB: f"trainyard/{NAME}"}}
    assert FakeTrainJobs.deleted == []


def test_train_on_trainjob_deletes_a_failed_job(api, tmp_path, shared_store):
    FakeTrainJobs.fail_message = "node-0 exited with code 1"
    ctx = run_context(tmp_path)
    with pytest.raises(RemoteTrainingError, match="failed: JobsFailed: node-0 exited with code 1$"):
        trainjob.train_on_trainjob(
            config(nodes=2), ctx, None if False else dataset(tmp_path), "img:1", poll=0.01, api_client=api
        )
    assert FakeTrainJobs.deleted == [NAME] and shared_store == {}


def dataset(tmp_path):
    from tasks.results import DatasetRef

    return DatasetRef("ds-1", str(tmp_path / "ds"), "hash", "mnist", "classification", {}, reused=True)


def test_train_on_trainjob_refusals(tmp_path, monkeypatch):
    from tasks.storage import LocalStore

    ctx = run_context(tmp_path)
    with pytest.raises(RemoteTrainingError, match=r"^training on 2 nodes .* set TRAINYARD_IMAGE"):
        trainjob.train_on_trainjob(config(nodes=2), ctx, dataset(tmp_path), "")
    monkeypatch.setattr("pipelines.context.store_for", lambda cfg, uri: LocalStore(tmp_path / "local"))
    with pytest.raises(RemoteTrainingError, match=r"^training on 2 nodes needs a shared artifact store: set storage"):
        trainjob.train_on_trainjob(config(nodes=2), ctx, dataset(tmp_path), "img:1")
    assert not (ctx.run_dir / "trainjob.yaml").exists()


# ---- `trainyard trainjob` -------------------------------------------------------------------------------


def trainjob_argv(*more: str) -> list[str]:
    return [
        "trainjob",
        "--preset",
        "mnist-fast",
        "--set",
        "train.distributed.nodes=2",
        "--set",
        "train.distributed.nproc_per_node=auto",
        "--run-id",
        RUN_ID,
        "--dataset-key",
        "ds-1",
        "--image",
        "registry.local/trainyard:cuda",
        *more,
    ]


def test_cli_prints_a_trainjob_that_validates(validator, crd, capsys, monkeypatch, tmp_path):
    from pipelines.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", URIS["tracking_uri"])
    monkeypatch.setenv("TRAINYARD_STORAGE_URI", URIS["storage_uri"])
    assert main(trainjob_argv("--gpus-per-node", "4", "--namespace", "ml")) == 0
    manifest = yaml.safe_load(capsys.readouterr().out)
    check_trainjob(validator, crd, manifest)
    trainer = manifest["spec"]["trainer"]
    assert manifest["metadata"]["namespace"] == "ml" and trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 4}
    out = tmp_path / "job.yaml"
    assert main(trainjob_argv("--out", str(out), "--storage-uri", "s3://other/prefix")) == 0
    assert capsys.readouterr().out == ""
    written = yaml.safe_load(out.read_text(encoding="utf-8"))
    check_trainjob(validator, crd, written)
    assert "s3://other/prefix" in written["spec"]["trainer"]["args"]


@pytest.mark.parametrize(
    ("more", "message"),
    [
        (("--gpus-per-node", "two"), "trainyard trainjob: --gpus-per-node: expected a whole number >= 0"),
        (("--gpus-per-node", "-1"), "trainyard trainjob: --gpus-per-node: expected a whole number >= 0"),
        (("--storage-uri", "/tmp/artifacts"), "trainyard trainjob: storage URI: several nodes share"),
    ],
)
def test_cli_refuses_a_bad_value_in_one_line(capsys, monkeypatch, more, message):
    from pipelines.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", URIS["tracking_uri"])
    monkeypatch.delenv("TRAINYARD_STORAGE_URI", raising=False)
    assert main(trainjob_argv(*more) + ([] if "--storage-uri" in more else ["--storage-uri", "s3://b/p"])) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(message) and captured.err.count("\n") == 1


def test_cli_imports_neither_torch_nor_prefect_nor_mlflow(tmp_path):
    from tests.test_startup import loaded_by

    out = tmp_path / "job.yaml"
    argv = trainjob_argv("--out", str(out), *[f"--{k.replace('_', '-')}={v}" for k, v in URIS.items()])
    code, loaded = loaded_by(argv)
    assert code == 0 and loaded == [] and yaml.safe_load(out.read_text())["kind"] == "TrainJob"
