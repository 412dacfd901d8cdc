"""The flow's steps as plain functions of small inputs (config sections, paths, run ids).

Each step opens what it needs (the prepared dataset, a tracker) from those inputs, so
no live model, optimizer or loader crosses a task boundary. pipelines/flow.py wraps
them as Prefect tasks; tests call them directly.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import ConfigError, TrainConfig
from tasks import champion, tracking
from tasks.evaluate import evaluate_model
from tasks.ingest import ingest
from tasks.prepared import SCHEMA_FILE, load_prepared, load_schema
from tasks.storage import ArtifactStore, open_store
from tasks.train import load_weights, train_model

log = logging.getLogger("trainyard.flow")


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=5, check=True, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def git_sha() -> str:
    """The commit: TRAINYARD_GIT_SHA (set in images), else `git rev-parse HEAD`, else ''."""
    return os.environ.get("TRAINYARD_GIT_SHA") or _git("rev-parse", "HEAD")


def code_version() -> str:
    """The commit, marked `-dirty` when tracked files differ from it (then it proves nothing)."""
    sha = git_sha()
    if sha and not os.environ.get("TRAINYARD_GIT_SHA") and _git("status", "--porcelain", "--untracked-files=no"):
        return f"{sha}-dirty"
    return sha


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("trainyard", "torch", "torchvision", "torchmetrics", "mlflow", "prefect"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def store_for(cfg: TrainConfig, storage_uri: str) -> ArtifactStore:
    return open_store(storage_uri, endpoint_url=cfg.storage.endpoint_url, max_attempts=cfg.storage.max_attempts)


def preflight(cfg: TrainConfig, tracking_uri: str, storage_uri: str) -> None:
    """Fail at once, before any data is read or a model trained, when a service is unusable."""
    tracking.check_reachable(tracking_uri)
    tracking.init_store(tracking_uri)
    store_for(cfg, storage_uri).preflight()


def config_hash(cfg: TrainConfig) -> str:
    """What the config asks for, minus names that do not change the model (run name)."""
    import hashlib

    data = cfg.model_dump(mode="json")
    data["tracking"].pop("run_name", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def unchanged_since_champion(cfg: TrainConfig, state: Path, tracking_uri: str) -> str:
    """A reason to skip when data hash, config and code version all match the champion's run; else ''."""
    from mlflow.tracking import MlflowClient

    from tasks.ingest import identity

    model_name = cfg.tracking.model_name()
    champ = champion.current_champion(tracking_uri, model_name)
    code = code_version()
    if champ is None or not code or code.endswith("-dirty"):
        return ""
    tags = MlflowClient(tracking_uri).get_run(champ.run_id).data.tags
    _key, content_hash = identity(cfg.data, state)
    same = (
        tags.get("data.hash") == content_hash
        and tags.get("config.hash") == config_hash(cfg)
        and tags.get("code.version") == code
    )
    if not same:
        return ""
    return f"data {content_hash[:12]}, config and code {code[:12]} match champion {model_name} v{champ.version} (run {champ.run_id})"


def start(cfg: TrainConfig, tracking_uri: str, flow_run_id: str = "") -> str:
    """Open the MLflow run: the flattened config as params; flow run, code and package versions as tags."""
    tags = {"trainyard.source": cfg.data.source, "trainyard.model": cfg.model.name, "config.hash": config_hash(cfg)}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    sha = git_sha()
    if sha:
        tags["mlflow.source.git.commit"] = sha
        tags["code.version"] = code_version()
    tags.update({f"version.{k}": v for k, v in versions().items()})
    run_id = tracking.start_run(tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name, tags)
    tracking.MlflowTracker(tracking_uri, run_id).log_params(cfg.flat())
    return run_id


def ingest_data(cfg: TrainConfig, state: Path, tracking_uri: str, run_id: str, storage_uri: str) -> dict[str, Any]:
    ref = ingest(cfg.data, state, store=store_for(cfg, storage_uri))
    tracking.set_tags(tracking_uri, run_id, {"data.hash": ref["content_hash"], "data.key": ref["key"]})
    schema = load_schema(ref["path"])
    tracking.MlflowTracker(tracking_uri, run_id).log_params(
        {
            "dataset.task": schema["task"],
            "dataset.n_classes": schema["n_classes"],
            "dataset.input_shape": schema["input_shape"],
            **{f"dataset.n_{k}": v for k, v in schema["split_sizes"].items()},
        }
    )
    log.info("task type: %s (%s)", schema["task"], schema.get("task_reason", ""))
    return ref


def _trackers(cfg: TrainConfig, tracking_uri: str, run_id: str, tb_dir: str) -> tracking.Tracker:
    tb = tracking.TensorBoardTracker(tb_dir) if cfg.tracking.tensorboard else None
    return tracking.MultiTracker(tracking.MlflowTracker(tracking_uri, run_id, flush_timeout=cfg.tracking.flush_timeout), tb)


def checkpoint_prefix(run_id: str) -> str:
    return f"checkpoints/{run_id}"


def publish_checkpoint(store: ArtifactStore, run_id: str, files: dict[str, Path]) -> None:
    """Upload a run's checkpoints (role -> file: `last`, to resume, and `best`, the weights kept so
    far) to a shared store as one unit, without ever losing the previous unit.

    An S3 upload replaces the object at its key, so each upload goes under new names and the
    unit's manifest, written last, switches to them; only then are the previous objects
    deleted. An upload or manifest that fails leaves the previous unit whole.
    """
    import uuid

    prefix = checkpoint_prefix(run_id)
    previous = store.read_manifest(prefix) or {}
    token = uuid.uuid4().hex[:12]
    named = {f"{role}-{token}.pt": str(path) for role, path in files.items() if Path(path).is_file()}
    store.publish(prefix, named)
    store.discard(prefix, [old for old in previous if old not in named])


def fetch_checkpoint(store: ArtifactStore, run_id: str, folder: Path) -> bool:
    """Copy the run's shared checkpoints (the ones its manifest names) into `folder` as
    `last.pt` and `best.pt`; False when the store holds none."""
    prefix = checkpoint_prefix(run_id)
    manifest = store.read_manifest(prefix)
    if not manifest:
        return False
    for name in manifest:
        role = name.split("-", 1)[0].removesuffix(".pt")
        store.fetch(f"{prefix}/{name}", folder / f"{role}.pt")
    return True


def train(
    cfg: TrainConfig, dataset_path: str, tracking_uri: str, run_id: str, run_dir: str, tb_dir: str, storage_uri: str = ""
) -> dict[str, Any]:
    """Train, resuming from the run's last checkpoint when there is one (here, or in a shared store).

    With a shared (S3) store every resume checkpoint is uploaded under checkpoints/<run-id>/,
    so the run can resume on another worker.
    """
    prepared = load_prepared(dataset_path)
    ckpt_dir = Path(run_dir) / "checkpoints"
    last = ckpt_dir / "last.pt"
    store = store_for(cfg, storage_uri) if storage_uri else None
    shared = store is not None and store.remote
    if not last.is_file() and shared:  # started on another worker: its checkpoints are in the store
        fetch_checkpoint(store, run_id, ckpt_dir)
    resume_from = last if last.is_file() else None
    if resume_from is not None:
        epoch = int(load_weights(resume_from)["epoch"])
        tracking.set_tags(tracking_uri, run_id, {"train.resumed_from_epoch": str(epoch)})
        log.info("run %s resumes after epoch %d from %s", run_id, epoch, resume_from)

    def upload(path: Path) -> None:
        if shared:
            publish_checkpoint(store, run_id, {"last": path, "best": path.with_name("best.pt")})

    with _trackers(cfg, tracking_uri, run_id, tb_dir) as tracker:
        if cfg.tracking.tensorboard and resume_from is None:
            tracker.log_text("config", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        result = train_model(
            prepared, cfg.model, cfg.optim, cfg.schedule, cfg.train, ckpt_dir,
            on_epoch=lambda e, m: tracker.log_metrics(m, e), resume_from=resume_from, on_checkpoint=upload,
        )  # fmt: skip
    tracking.set_tags(tracking_uri, run_id, {"train.device": result.device, "train.precision": result.precision})
    return result.to_dict()


def check_champion_metric(cfg: TrainConfig, dataset_path: str) -> None:
    """Before training: the promotion metric must be one the evaluation of this dataset reports
    (a per-class metric names one of its classes)."""
    from tasks.evaluate import metric_keys

    if not cfg.tracking.log_model:
        return
    schema = load_schema(dataset_path)
    metric, _ = champion.champion_metric(schema["task"], cfg.tracking.champion_metric)
    keys = metric_keys(schema)
    if metric not in keys:
        raise ConfigError(
            f"tracking.champion_metric {metric!r} is not among the test metrics of this {schema['task']} dataset: {', '.join(keys)}"
        )


def find_resumable(cfg: TrainConfig, tracking_uri: str, resume: str = "", flow_run_id: str = "") -> str:
    """The MLflow run this flow run continues, or '': `resume` (a run id), else an unfinished run with
    the configured run name and the same config, else an unfinished run of this Prefect flow run
    (a flow retry). A run is continued only with the config it was started with (its `config.hash`
    tag): its params and checkpoint belong to that config."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    wanted = config_hash(cfg)

    def same_config(run) -> bool:
        started_with = run.data.tags.get("config.hash", "")
        return not started_with or started_with == wanted  # runs from before the tag: as before

    if resume:
        try:
            run = client.get_run(resume)
        except MlflowException:
            raise ConfigError(f"--resume {resume}: no such MLflow run at {tracking_uri}") from None
        if exp is None or run.info.experiment_id != exp.experiment_id:
            raise ConfigError(f"--resume {resume}: that run is not in experiment {cfg.tracking.experiment!r}")
        if run.info.status == "FINISHED":
            raise ConfigError(f"--resume {resume}: that run already finished; nothing to resume")
        if not same_config(run):
            raise ConfigError(
                f"--resume {resume}: that run was started with another config (config.hash "
                f"{run.data.tags['config.hash'][:12]}, this one {wanted[:12]}); resume it with the config it "
                "was started with (its params in MLflow), or start a new run"
            )
        return resume
    if exp is None:
        return ""
    if cfg.tracking.run_name:
        query = f"attributes.run_name = '{cfg.tracking.run_name}'"
    elif flow_run_id:
        query = f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    else:
        return ""
    runs = client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=10)
    unfinished = [r for r in runs if r.info.status != "FINISHED"]
    matching = [r for r in unfinished if same_config(r)]
    if unfinished and not matching:
        log.info(
            "run name %r: the unfinished run %s was started with another config; starting a new run",
            cfg.tracking.run_name, unfinished[0].info.run_id,
        )  # fmt: skip
    return matching[0].info.run_id if matching else ""


def reopen(tracking_uri: str, run_id: str, flow_run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    client.update_run(run_id, status="RUNNING")
    if flow_run_id:
        client.set_tag(run_id, "prefect.flow_run_id", flow_run_id)


def evaluate(cfg: TrainConfig, dataset_path: str, checkpoint: str, run_dir: str) -> dict[str, Any]:
    return evaluate_model(
        load_prepared(dataset_path), cfg.model, checkpoint, Path(run_dir) / "eval",
        device=cfg.train.device, precision=cfg.train.precision, batch_size=cfg.train.eval_batch_size,
    )  # fmt: skip


def store_artifacts(
    cfg: TrainConfig, dataset_path: str, checkpoint: str, evaluation: dict[str, Any], run_id: str, storage_uri: str,
    run_dir: str, tb_dir: str,
) -> dict[str, Any]:
    """Weights, schema, metrics, the best checkpoint and the TensorBoard logs to the artifact store, as one unit."""
    import torch

    run_dir_p = Path(run_dir)
    weights_path = run_dir_p / "model_state.pt"
    torch.save(load_weights(checkpoint)["model_state"], weights_path)
    files = {
        "model_state.pt": str(weights_path),
        "schema.json": str(Path(dataset_path) / SCHEMA_FILE),
        "metrics.json": evaluation["files"]["metrics_json"],
        "checkpoints/best.pt": checkpoint,
    }
    tb = Path(tb_dir)
    if tb.is_dir():
        files.update({f"tensorboard/{p.relative_to(tb).as_posix()}": str(p) for p in sorted(tb.rglob("*")) if p.is_file()})
    store = store_for(cfg, storage_uri)
    prefix = run_prefix(cfg, run_id)
    manifest = store.publish(prefix, files)
    return {"uri": f"{store.uri}/{prefix}", "files": manifest}


def run_prefix(cfg: TrainConfig, run_id: str) -> str:
    return f"{tracking.safe_name(cfg.tracking.experiment)}/{run_id}"


def withdraw_artifacts(cfg: TrainConfig, storage_uri: str, run_id: str) -> None:
    """Remove a failed run's unit from the store, so nothing of it looks complete."""
    store_for(cfg, storage_uri).remove(run_prefix(cfg, run_id))


def publish(
    cfg: TrainConfig,
    dataset_path: str,
    checkpoint: str,
    evaluation: dict[str, Any],
    stored: dict[str, Any],
    tracking_uri: str,
    run_id: str,
    run_dir: str,
    tb_dir: str,
    data_key: str,
) -> dict[str, Any]:
    """Test metrics and reports to MLflow and TensorBoard; the model to MLflow's registry, then the champion decision."""
    import numpy as np

    from models import build_model
    from tasks.data import features

    run_dir_p = Path(run_dir)
    metrics = evaluation["metrics"]
    files = dict(evaluation["files"])
    config_path = run_dir_p / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False), encoding="utf-8")

    with _trackers(cfg, tracking_uri, run_id, tb_dir) as tracker:
        tracker.log_metrics(metrics, step=cfg.train.epochs)
        if "confusion_matrix_png" in files:
            tracker.log_image("test/confusion_matrix", files["confusion_matrix_png"], step=cfg.train.epochs)
    tracking.log_artifacts(
        tracking_uri, run_id, {k: v for k, v in files.items() if k != "confusion_matrix_png"}, artifact_path="evaluation"
    )
    tracking.log_artifacts(tracking_uri, run_id, {"config": str(config_path), "schema": str(Path(dataset_path) / SCHEMA_FILE)})
    tracking.set_tags(tracking_uri, run_id, {"artifacts.uri": stored["uri"]})

    out: dict[str, Any] = {"mlflow_model": "", "champion": None}
    if cfg.tracking.log_model:
        # Check the promotion metric before a model version is registered, not after.
        metric, higher = champion.champion_metric(evaluation["task"], cfg.tracking.champion_metric)
        if metric not in metrics:
            raise ConfigError(f"tracking.champion_metric {metric!r} is not among the test metrics: {', '.join(sorted(metrics))}")
        prepared = load_prepared(dataset_path)
        model = build_model(cfg.model.name, prepared.schema, cfg.model)
        model.load_state_dict(load_weights(checkpoint)["model_state"])
        example = features(prepared, "test")[:2].numpy().astype(np.float32)
        reqs = [f"{k}=={v}" for k, v in versions().items() if k in ("torch", "torchvision")]
        model_name = cfg.tracking.model_name()
        info = tracking.log_torch_model(tracking_uri, run_id, model, example, reqs, registered_model_name=model_name)
        out["mlflow_model"] = info["model_uri"]
        decision = champion.decide(tracking_uri, model_name, info["version"], run_id, metric, higher, metrics[metric], data_key)
        log.info("registry: %s v%s %s (%s)", model_name, decision.version, "promoted to champion" if decision.promoted else "stays challenger", decision.reason)
        out["champion"] = decision.to_dict()
    return out
