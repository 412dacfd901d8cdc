"""The store and publish steps: the run's artifact unit, then MLflow's reports and the registry.

The unit (`<experiment>/<run-id>/` in the artifact store: weights, schema, metrics, the best
checkpoint, the TensorBoard logs, each with its sha256) is published whole or not at all; a run
that fails afterwards withdraws it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipelines.config import TrainConfig
from pipelines.context import RunContext, store_for, trackers
from tasks import keys, tracking
from tasks.prepared import SCHEMA_FILE
from tasks.results import DatasetRef, Evaluation, Published, StoredUnit, TrainResult

CONFUSION_PNG = "confusion_matrix_png"  # the role of the evaluation's heatmap: an image, not a report


def run_prefix(cfg: TrainConfig, run_id: str) -> str:
    """The unit's key in the artifact store: `<experiment>/<run-id>`."""
    return f"{tracking.safe_name(cfg.tracking.experiment)}/{run_id}"


def tensorboard_files(folder: Path) -> dict[str, str]:
    """`tensorboard/<relative path>` -> local path, for every file under a TensorBoard folder."""
    if not folder.is_dir():
        return {}
    return {f"tensorboard/{p.relative_to(folder).as_posix()}": str(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def hparams(cfg: TrainConfig) -> dict[str, str | int | float | bool]:
    """The flattened config as TensorBoard's HParams take it: scalar values (lists and dicts as JSON), no None."""
    return {key: value for key, value in cfg.flat().items() if isinstance(value, (str, int, float, bool))}


def store_artifacts(
    cfg: TrainConfig, ctx: RunContext, dataset: DatasetRef, result: TrainResult, evaluation: Evaluation
) -> StoredUnit:
    """Weights, schema, metrics, the best checkpoint and the TensorBoard logs to the artifact store, as one unit."""
    import torch

    from tasks.checkpoint import load_weights

    weights_path = ctx.run_dir / "model_state.pt"
    torch.save(load_weights(result.checkpoint)["model_state"], weights_path)
    files = {
        "model_state.pt": str(weights_path),
        "schema.json": str(Path(dataset.path) / SCHEMA_FILE),
        "metrics.json": evaluation.files["metrics_json"],
        "checkpoints/best.pt": result.checkpoint,
        **tensorboard_files(ctx.tb_dir),
    }
    store = store_for(cfg, ctx.storage_uri)
    prefix = run_prefix(cfg, ctx.run_id)
    return StoredUnit(uri=f"{store.uri}/{prefix}", files=store.publish(prefix, files))


def withdraw_artifacts(cfg: TrainConfig, ctx: RunContext) -> None:
    """Remove a failed run's unit from the store, so nothing of it looks complete."""
    store_for(cfg, ctx.storage_uri).remove(run_prefix(cfg, ctx.run_id))


def log_reports(
    cfg: TrainConfig, ctx: RunContext, dataset: DatasetRef, evaluation: Evaluation, stored: StoredUnit, step: int
) -> None:
    """Test metrics and the confusion matrix to MLflow and TensorBoard at `step` (the last epoch trained:
    train.min_steps and early stopping make it differ from train.epochs), and to TensorBoard's HParams with the
    config; reports, config and schema to MLflow."""
    config_path = ctx.run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False), encoding="utf-8")
    with trackers(cfg, ctx) as tracker:
        tracker.log_metrics(evaluation.metrics, step=step)
        if CONFUSION_PNG in evaluation.files:
            tracker.log_image(keys.CONFUSION_MATRIX_IMAGE, evaluation.files[CONFUSION_PNG], step=step)
        tracker.log_hparams(hparams(cfg), evaluation.metrics)  # the dashboard lines runs up by config and metrics
    reports = {role: path for role, path in evaluation.files.items() if role != CONFUSION_PNG}
    tracking.log_artifacts(ctx.tracking_uri, ctx.run_id, reports, artifact_path="evaluation")
    extra = {"config": str(config_path), "schema": str(Path(dataset.path) / SCHEMA_FILE)}
    tracking.log_artifacts(ctx.tracking_uri, ctx.run_id, extra)
    tracking.set_tags(ctx.tracking_uri, ctx.run_id, {keys.ARTIFACTS_URI: stored.uri})


def publish(
    cfg: TrainConfig,
    ctx: RunContext,
    dataset: DatasetRef,
    result: TrainResult,
    evaluation: Evaluation,
    stored: StoredUnit,
) -> Published:
    """The reports to MLflow and TensorBoard; with tracking.log_model, the model to the registry and the
    champion gate."""
    from pipelines import champion_gate

    last_epoch = result.history[-1]["epoch"] if result.history else cfg.train.epochs
    log_reports(cfg, ctx, dataset, evaluation, stored, int(last_epoch))
    if not cfg.tracking.log_model:
        return Published()
    return champion_gate.register(cfg, ctx, dataset, result, evaluation)
