"""`trainyard predict`: score a table with a registered model, tracked as an MLflow run of its own.

The model URI is resolved in the registry (an alias or a version to the version, its training run),
the model loaded, and a prediction run opened in predict.experiment, tagged `trainyard.run_kind=
prediction` (keys.RUN_KIND) so that nothing looking for training runs finds it. The scoring itself is
tasks/scoring.py. The run ends FINISHED, FAILED on an error or KILLED on Ctrl-C; a run that does not
finish leaves no output.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import resolve_tracking_uri, state_dir
from tasks import keys, tracking
from tasks.errors import ConfigError, ModelError
from tasks.predict_config import PredictConfig
from tasks.scoring import ScoreResult, check_model, score_table
from tasks.uris import file_path

log = logging.getLogger("trainyard.predict")
_ALIAS = re.compile(r"models:/(?P<name>[^@/]+)@(?P<alias>[^/]+)/?")
_VERSION = re.compile(r"models:/(?P<name>[^@/]+)/(?P<version>[^/]+)/?")


@dataclass(frozen=True)
class ModelRef:
    """A model URI resolved: what to load, and (for a registered model) its name, version and training run."""

    uri: str
    load_uri: str
    name: str = ""
    version: str = ""
    run_id: str = ""


def resolve_model(tracking_uri: str, uri: str) -> ModelRef:
    """models:/NAME@ALIAS and models:/NAME/VERSION looked up in the registry; runs:/ and a folder as they are.
    A name, alias or version that does not resolve is one ModelError listing what there is."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    alias, version = _ALIAS.fullmatch(uri), _VERSION.fullmatch(uri)
    if alias or version:
        name = (alias or version).group("name")
        try:
            if alias:
                found = client.get_model_version_by_alias(name, alias.group("alias"))
            else:
                found = client.get_model_version(name, version.group("version"))
        except MlflowException:
            raise _unresolved(client, tracking_uri, uri, name, alias, version) from None
        return ModelRef(uri, f"models:/{name}/{found.version}", name, str(found.version), found.run_id or "")
    if uri.startswith("models:/"):
        raise ModelError(f"model {uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if uri.startswith("runs:/"):
        return ModelRef(uri, uri, run_id=uri[len("runs:/") :].split("/", 1)[0])
    path = file_path(uri)
    if not (path / "MLmodel").is_file():
        raise ModelError(f"model {uri}: no MLflow model there (expected a folder holding an MLmodel file)")
    return ModelRef(uri, str(path))


def _unresolved(client, tracking_uri: str, uri: str, name: str, alias, version) -> ModelError:
    """Why the registry does not resolve `uri`: the names it has, or the aliases (versions) of `name`."""
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=1000))
        there = ", ".join(names) if names else "none"
        return ModelError(f"model {uri}: no registered model {name!r} at {tracking_uri}; registered models: {there}")
    if alias:
        aliases = registered.aliases or {}
        there = ", ".join(f"{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
        wanted = alias.group("alias")
        return ModelError(f"model {uri}: registered model {name!r} has no alias {wanted!r}; its aliases: {there}")
    versions = sorted((int(v.version) for v in client.search_model_versions(f"name = '{name}'")), reverse=True)
    there = ", ".join(map(str, versions)) or "none"
    return ModelError(
        f"model {uri}: registered model {name!r} has no version {version.group('version')!r}; its versions: {there}"
    )


def load_model(tracking_uri: str, ref: ModelRef) -> tuple[Any, str]:
    """(Trainyard's python model, the training run id) of the model `ref` names."""
    import mlflow.pyfunc

    try:
        with tracking.fluent_uris(tracking_uri):
            loaded = mlflow.pyfunc.load_model(ref.load_uri)
    except Exception as exc:  # noqa: BLE001 - whatever the download or the model's loading raises
        raise ModelError(f"model {ref.uri} could not be loaded: {type(exc).__name__}: {exc}") from None
    try:
        raw = loaded.unwrap_python_model()
    except Exception:  # noqa: BLE001 - a model of another flavour
        raise ModelError(f"model {ref.uri} is not a Trainyard table model (not a python model)") from None
    return raw, ref.run_id or str(getattr(loaded.metadata, "run_id", "") or "")


def _check_database(tracking_uri: str, cfg: PredictConfig) -> None:
    """A registered model needs a tracking database that exists; reading must not create an empty one."""
    db = tracking.sqlite_path(tracking_uri)
    if db and cfg.model.startswith("models:/") and not Path(db).is_file():
        raise ModelError(f"model {cfg.model}: no tracking database at {db} (no model has been registered there yet)")


def _run_tags(cfg: PredictConfig, ref: ModelRef, model_run_id: str) -> dict[str, str]:
    return {
        keys.RUN_KIND: keys.PREDICTION,
        keys.PREDICT_MODEL_URI: cfg.model,
        keys.PREDICT_MODEL_NAME: ref.name,
        keys.PREDICT_MODEL_VERSION: ref.version,
        keys.PREDICT_MODEL_RUN_ID: model_run_id,
        keys.PREDICT_INPUT: cfg.input,
        keys.PREDICT_OUTPUT: cfg.output,
    }


def _metrics(result: ScoreResult) -> dict[str, float]:
    metrics = {
        keys.PREDICT_ROWS: result.rows,
        keys.PREDICT_ROWS_MISSING: result.rows_missing,
        keys.PREDICT_ROWS_UNSEEN: result.rows_unseen,
    }
    metrics |= {keys.PREDICT_MISSING_PREFIX + tracking.safe_name(c): n for c, n in result.missing.items()}
    metrics |= {keys.PREDICT_UNSEEN_PREFIX + tracking.safe_name(c): n for c, n in result.unseen.items()}
    return {k: float(v) for k, v in metrics.items()}


def predict(cfg: PredictConfig) -> dict[str, Any]:
    """Score cfg.input with cfg.model into cfg.output as one prediction run; the summary."""
    if not cfg.input or not cfg.output:
        raise ConfigError("predict needs an input and an output (predict.input, predict.output)")
    uri = resolve_tracking_uri(cfg.tracking_uri)
    tracking.check_reachable(uri)
    _check_database(uri, cfg)
    tracking.init_store(uri)
    ref = resolve_model(uri, cfg.model)
    model, model_run_id = load_model(uri, ref)
    check_model(model, cfg.model)
    run_name = f"predict-{tracking.safe_name(ref.name)}-v{ref.version}" if ref.name else "predict"
    run_id = tracking.start_run(uri, cfg.experiment, run_name, _run_tags(cfg, ref, model_run_id))
    output = None
    try:
        tracking.log_params(uri, run_id, {f"predict.{k}": v for k, v in cfg.model_dump().items()})
        result, output = score_table(model, cfg, state_dir(), model_uri=cfg.model)
        tracking.set_tags(uri, run_id, {keys.PREDICT_INPUT_SHA256: result.input_sha256})
        with tracking.MlflowTracker(uri, run_id) as tracker:
            tracker.log_metrics(_metrics(result))
        tracking.end_run(uri, run_id, keys.FINISHED)
    except BaseException as exc:
        if output is not None:
            output.remove()
        status = keys.KILLED if isinstance(exc, KeyboardInterrupt) else keys.FAILED
        with contextlib.suppress(Exception):
            tracking.end_run(uri, run_id, status)
        raise
    log.info("scored %d rows of %s into %s (prediction run %s)", result.rows, cfg.input, result.output, run_id)
    return _summary(cfg, ref, run_id, model_run_id, result, uri)


def _summary(cfg: PredictConfig, ref: ModelRef, run_id: str, model_run_id: str, result: ScoreResult, uri: str):
    return {
        "model": ref.name or cfg.model,
        "model_uri": cfg.model,
        "version": ref.version,
        "run_id": run_id,
        "model_run_id": model_run_id,
        "experiment": cfg.experiment,
        "tracking_uri": uri,
        "input": cfg.input,
        "input_sha256": result.input_sha256,
        "output": result.output,
        "rows": result.rows,
        "rows_missing": result.rows_missing,
        "rows_unseen": result.rows_unseen,
        "missing": result.missing,
        "unseen": result.unseen,
        "seconds": round(result.seconds, 3),
    }
