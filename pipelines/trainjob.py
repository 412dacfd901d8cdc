"""Training on several nodes as a Kubeflow Trainer v2 `TrainJob` (runtime `torch-distributed`).

The TrainJob starts `numNodes` pods of the trainyard CUDA image; in each, `torchrun` reads the
node count, processes per node, node rank and master address from the `PET_*` variables that the
runtime's torch plugin sets (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR,
PET_MASTER_PORT) and starts `pipelines.train_worker` in every process. Rank 0 logs into the run's
MLflow run and leaves the handoff at `handoffs/<run-id>/` in the shared store, as the gpu pool's
train step does; `train_on_trainjob` submits, waits and brings that handoff back.

`trainyard trainjob` prints the same manifest for an operator to `kubectl apply -f`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import ConfigError, TrainConfig
from tasks import keys
from tasks.errors import RemoteTrainingError

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RUNTIME = "torch-distributed"
NODE = "node"  # the torch-distributed runtime's replicated job, and its trainer container
WORKER_MODULE = "pipelines.train_worker"
PATCH_MANAGER = "trainyard/trainjob"  # a domain-prefixed path, as the Trainer's webhook requires
SHM_SIZE = "8Gi"  # /dev/shm of each node: NCCL and DataLoader workers share memory through it
RUN_ID_LABEL = "trainyard/run-id"
# Keys of the environment secret handed to the training container when present (see deploy/README.md).
_AWS_KEYS = ("ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "SESSION_TOKEN", "ENDPOINT_URL", "DEFAULT_REGION")
_MLFLOW_KEYS = ("S3_ENDPOINT_URL", "TRACKING_USERNAME", "TRACKING_PASSWORD", "TRACKING_TOKEN")
SECRET_KEYS = tuple(f"AWS_{k}" for k in _AWS_KEYS) + tuple(f"MLFLOW_{k}" for k in _MLFLOW_KEYS)
DEFAULT_SECRET = "trainyard-job-env"
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # RFC 1035 label: the TrainJob CRD's rule
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # RFC 1123 label
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
log = logging.getLogger("trainyard.trainjob")


def trainjob_name(run_id: str, name: str = "") -> str:
    """`name`, else `trainyard-<first 12 characters of the run id>`; a valid TrainJob name either way."""
    name = name or f"trainyard-{run_id[:12].lower()}"
    if len(name) > 63 or not _NAME.match(name):
        raise ConfigError(
            f"TrainJob name: expected at most 63 lowercase letters, digits and '-', starting with a letter, "
            f"got {name!r}"
        )
    return name


def worker_args(cfg: TrainConfig, run_id: str, dataset_key: str, tracking_uri: str, storage_uri: str) -> list[str]:
    """The arguments of `pipelines.train_worker` for this run."""
    args = {"config-json": cfg.model_dump_json(), "run-id": run_id, "tracking-uri": tracking_uri}
    args |= {"storage-uri": storage_uri, "dataset-key": dataset_key}
    return [part for key, value in args.items() for part in (f"--{key}", value)]


def processes_and_gpus(cfg: TrainConfig, gpus_per_node: int | None) -> tuple[int, int]:
    """(numProcPerNode, GPUs per node). The CRD takes a whole number of processes, so `auto` becomes the
    node's GPU count (gpus_per_node, default 1), or 1 on CPU nodes (gpus_per_node=0)."""
    nproc = cfg.train.distributed.nproc_per_node
    if gpus_per_node is not None and (isinstance(gpus_per_node, bool) or gpus_per_node < 0):
        raise ConfigError(f"gpus_per_node: expected a whole number >= 0 (0: CPU nodes), got {gpus_per_node!r}")
    if nproc == "auto":
        gpus = 1 if gpus_per_node is None else gpus_per_node
        return max(gpus, 1), gpus
    gpus = nproc if gpus_per_node is None else gpus_per_node
    if gpus and gpus != nproc:
        raise ConfigError(
            f"train.distributed.nproc_per_node={nproc} with {gpus} GPUs per node: each process takes one GPU; "
            f"set nproc_per_node={gpus} (or auto), or gpus_per_node={nproc}"
        )
    return nproc, gpus


def _check_uris(run_id: str, dataset_key: str, tracking_uri: str, storage_uri: str, image: str) -> None:
    """What every node must reach: the MLflow server and the S3 store, by network, from the image."""
    if not image:
        raise ConfigError("image: the TrainJob needs the trainyard CUDA image as the cluster pulls it, got none")
    if not _LABEL_VALUE.match(run_id or ""):
        raise ConfigError(f"run id: expected an MLflow run id (letters and digits, at most 63), got {run_id!r}")
    if not dataset_key:
        raise ConfigError("dataset key: expected the key of a prepared dataset in the artifact store, got none")
    if not tracking_uri.startswith(("http://", "https://")):
        raise ConfigError(
            f"tracking URI: the nodes log to an MLflow server, expected http(s)://host:port, got {tracking_uri!r}"
        )
    if not storage_uri.startswith("s3://"):
        raise ConfigError(
            f"storage URI: several nodes share datasets and checkpoints through S3, expected s3://bucket/prefix, "
            f"got {storage_uri!r}"
        )


def _runtime_patch(gpus: int) -> dict[str, Any]:
    """The pod settings the torch-distributed runtime lacks: the image's user, /dev/shm and GPU nodes."""
    pod: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}}],
        "containers": [{"name": NODE, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
    }
    if gpus:
        pod["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    job = {"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}
    return {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job]}}}}


def _env(tracking_uri: str, storage_uri: str, env_secret: str) -> list[dict[str, Any]]:
    """The URIs as values; credentials and endpoints from the secret's keys, each optional (a cluster that
    gives S3 access by the pod's identity needs no keys)."""
    env: list[dict[str, Any]] = [
        {"name": "MLFLOW_TRACKING_URI", "value": tracking_uri},
        {"name": "TRAINYARD_STORAGE_URI", "value": storage_uri},
    ]
    if env_secret:
        for key in SECRET_KEYS:
            ref = {"name": env_secret, "key": key, "optional": True}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def render_trainjob(
    cfg: TrainConfig,
    *,
    run_id: str,
    dataset_key: str,
    tracking_uri: str,
    storage_uri: str,
    image: str,
    name: str = "",
    namespace: str = "trainyard",
    runtime: str = RUNTIME,
    gpus_per_node: int | None = None,
    env_secret: str = DEFAULT_SECRET,
) -> dict[str, Any]:
    """The TrainJob of this run's training: cfg.train.distributed.nodes pods of `image`, each running
    `torchrun -m pipelines.train_worker ...` with one process per GPU."""
    _check_uris(run_id, dataset_key, tracking_uri, storage_uri, image)
    if not _NAMESPACE.match(namespace) or len(namespace) > 63:
        raise ConfigError(f"namespace: expected a Kubernetes namespace name, got {namespace!r}")
    nproc, gpus = processes_and_gpus(cfg, gpus_per_node)
    trainer: dict[str, Any] = {
        "image": image,
        "command": ["torchrun", "-m", WORKER_MODULE],
        "args": worker_args(cfg, run_id, dataset_key, tracking_uri, storage_uri),
        "numNodes": cfg.train.distributed.nodes,
        "numProcPerNode": nproc,
        "env": _env(tracking_uri, storage_uri, env_secret),
    }
    if gpus:
        trainer["resourcesPerNode"] = {"limits": {"nvidia.com/gpu": gpus}}
    labels = {"app.kubernetes.io/part-of": "trainyard", "app.kubernetes.io/component": "train", RUN_ID_LABEL: run_id}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": trainjob_name(run_id, name), "namespace": namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"name": runtime, "kind": "ClusterTrainingRuntime", "apiGroup": GROUP},
            "trainer": trainer,
            "runtimePatches": [_runtime_patch(gpus)],
        },
    }


def to_yaml(manifest: dict[str, Any]) -> str:
    """The manifest as YAML, keys in the order Kubernetes writes them."""
    return yaml.safe_dump(manifest, sort_keys=False, width=100_000)


# ---- the cluster ------------------------------------------------------------------------------


def api_client_from_environment():
    """A Kubernetes API client: the pod's service account inside a cluster, else the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError, TypeError) as exc:
            raise RemoteTrainingError(
                f"no Kubernetes cluster to submit the TrainJob to: no service account token and no usable "
                f"kubeconfig ({exc}); set KUBECONFIG, or print the manifest with `trainyard trainjob` and apply it"
            ) from None
    return client.ApiClient()


def _api_error(exc: BaseException, what: str) -> RemoteTrainingError:
    """One line for an API call that failed: the server's own message, or why it was not reached."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        try:
            message = json.loads(exc.body or "{}").get("message") or exc.reason
        except (ValueError, AttributeError):
            message = exc.reason
        return RemoteTrainingError(f"{what}: the Kubernetes API answered {exc.status}: {message}")
    return RemoteTrainingError(f"{what}: the Kubernetes API is not reachable ({type(exc).__name__}: {exc})")


def _api_failures() -> tuple[type[BaseException], ...]:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    return (ApiException, HTTPError, OSError)


def _objects(api_client):
    from kubernetes import client

    return client.CustomObjectsApi(api_client or api_client_from_environment())


def submit_trainjob(manifest: dict[str, Any], api_client=None) -> dict[str, Any]:
    """Create the TrainJob; the object the API server returns."""
    meta = manifest["metadata"]
    what = f"submitting TrainJob {meta['namespace']}/{meta['name']}"
    try:
        return _objects(api_client).create_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, manifest)
    except _api_failures() as exc:
        raise _api_error(exc, what) from None


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """("Complete" or "Failed", its reason and message) once the TrainJob has finished; ("", "") before."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            why = ": ".join(p for p in (cond.get("reason"), cond.get("message")) if p)
            return cond["type"], why
    return "", ""


def wait_trainjob(
    name: str, namespace: str = "trainyard", timeout: float | None = None, poll: float = 10.0, api_client=None
) -> dict[str, Any]:
    """The TrainJob once its Complete condition is True; a Failed one, or no end within `timeout` seconds
    (None: no limit), is a RemoteTrainingError."""
    objects = _objects(api_client)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            job = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except _api_failures() as exc:
            raise _api_error(exc, f"reading TrainJob {namespace}/{name}") from None
        state, why = job_state(job)
        if state == "Complete":
            return job
        if state == "Failed":
            raise RemoteTrainingError(f"TrainJob {namespace}/{name} failed: {why or 'no message'}")
        if deadline is not None and time.monotonic() > deadline:
            raise RemoteTrainingError(
                f"TrainJob {namespace}/{name} did not finish within {timeout:.0f} s "
                f"(see `kubectl -n {namespace} describe trainjob {name}`)"
            )
        time.sleep(poll)


def delete_quietly(name: str, namespace: str, api_client=None) -> None:
    """Delete the TrainJob and its pods (best effort: the API may be what failed)."""
    try:
        api = _objects(api_client)
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground")
    except Exception as exc:  # noqa: BLE001 - best effort, logged
        log.warning("could not delete TrainJob %s/%s: %s", namespace, name, exc)


def train_on_trainjob(
    cfg: TrainConfig,
    ctx,
    dataset,
    image: str,
    *,
    namespace: str = "trainyard",
    gpus_per_node: int | None = None,
    timeout: float | None = None,
    poll: float = 10.0,
    api_client=None,
):
    """Train this run (ctx: a RunContext) on the prepared `dataset` (a DatasetRef) as a TrainJob and bring
    its best checkpoint, result and TensorBoard files here; the TrainResult. The TrainJob is deleted when
    the wait fails or is stopped."""
    from pipelines.context import store_for
    from pipelines.remote import _take_handoff
    from tasks import tracking

    nodes = cfg.train.distributed.nodes
    if not image:
        raise RemoteTrainingError(
            f"training on {nodes} nodes runs as a Kubeflow Trainer TrainJob and needs the trainyard CUDA image "
            "as the cluster pulls it: set TRAINYARD_IMAGE (e.g. registry.example.org/trainyard:cuda-<sha>)"
        )
    store = store_for(cfg, ctx.storage_uri)
    if not store.remote:
        raise RemoteTrainingError(
            f"training on {nodes} nodes needs a shared artifact store: set storage.uri=s3://bucket/prefix "
            f"(or TRAINYARD_STORAGE_URI), not {store.uri}"
        )
    try:
        manifest = render_trainjob(
            cfg,
            run_id=ctx.run_id,
            dataset_key=dataset.key,
            tracking_uri=ctx.tracking_uri,
            storage_uri=ctx.storage_uri,
            image=image,
            namespace=namespace,
            gpus_per_node=gpus_per_node,
        )
    except ConfigError as exc:
        raise RemoteTrainingError(f"cannot run the TrainJob: {exc}") from None
    for folder in (ctx.run_dir, ctx.checkpoint_dir, ctx.tb_dir):
        Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(ctx.run_dir) / "trainjob.yaml").write_text(to_yaml(manifest), encoding="utf-8")
    name = manifest["metadata"]["name"]
    api_client = api_client or api_client_from_environment()
    submit_trainjob(manifest, api_client)
    log.info("submitted TrainJob %s/%s: %d nodes", namespace, name, nodes)
    try:
        wait_trainjob(name, namespace, timeout, poll, api_client)
    except BaseException:  # failed, timed out or this run was stopped: the nodes must not train on alone
        delete_quietly(name, namespace, api_client)
        raise
    result = _take_handoff(store, f"TrainJob {namespace}/{name}", ctx)
    tracking.set_tags(ctx.tracking_uri, ctx.run_id, {keys.TRAIN_TRAINJOB: f"{namespace}/{name}"})
    return result


# ---- `trainyard trainjob` -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `trainyard trainjob` besides --preset/--config/--set (SUPPRESS: no "(default: )")."""
    hidden = argparse.SUPPRESS
    parser.add_argument("--run-id", required=True, default=hidden, help="the MLflow run the nodes log into")
    key_help = "key of the prepared dataset in the artifact store"
    parser.add_argument("--dataset-key", required=True, default=hidden, help=key_help)
    image_help = "the trainyard CUDA image as the cluster pulls it"
    parser.add_argument("--image", required=True, default=hidden, help=image_help)
    uri_help = "MLflow server the pods reach (default: tracking.uri, else MLFLOW_TRACKING_URI)"
    parser.add_argument("--tracking-uri", default=hidden, help=uri_help)
    store_help = "s3:// artifact store (default: storage.uri, else TRAINYARD_STORAGE_URI)"
    parser.add_argument("--storage-uri", default=hidden, help=store_help)
    parser.add_argument("--namespace", default="trainyard", help="namespace of the TrainJob")
    gpus_help = "GPUs per node, nvidia.com/gpu (0: CPU nodes; default: a numeric nproc_per_node, else 1)"
    parser.add_argument("--gpus-per-node", default=hidden, help=gpus_help)
    parser.add_argument("--env-secret", default=DEFAULT_SECRET, help="secret with the S3 and MLflow credentials")
    parser.add_argument("--out", default=hidden, metavar="FILE", help="write the YAML here (default: stdout)")


def _gpus(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit():
        raise ConfigError(f"--gpus-per-node: expected a whole number >= 0 (0: CPU nodes), got {text!r}")
    return int(text)


def command(args: argparse.Namespace, cfg: TrainConfig, env: dict[str, str] | None = None) -> int:
    """Print (or write to --out) the TrainJob of the run; a bad value is one line and status 2."""
    env = os.environ if env is None else env
    try:
        manifest = render_trainjob(
            cfg,
            run_id=args.run_id,
            dataset_key=args.dataset_key,
            tracking_uri=getattr(args, "tracking_uri", "") or cfg.tracking.uri or env.get("MLFLOW_TRACKING_URI", ""),
            storage_uri=getattr(args, "storage_uri", "") or cfg.storage.uri or env.get("TRAINYARD_STORAGE_URI", ""),
            image=args.image,
            namespace=args.namespace,
            gpus_per_node=_gpus(getattr(args, "gpus_per_node", None)),
            env_secret=args.env_secret,
        )
    except ConfigError as exc:
        print(f"trainyard trainjob: {exc}", file=sys.stderr)
        return 2
    text = to_yaml(manifest)
    if getattr(args, "out", ""):
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
