"""What a run trained on, as an MLflow dataset input: the source URI, the content hash, the columns, the rows.

The MLflow UI shows a run's dataset inputs beside its params: the name and digest in the runs table,
the source, the schema (one entry per column of the table as it was read, with the kind ingest gave
it) and the profile (rows read and dropped, rows per split, the columns ingest left out and why).
MLflow stores a digest of at most 36 characters: the digest is the start of the sha256, and the
whole sha256 is an input tag, as it is the run's `data.hash` tag.

MLflow is imported inside the function that logs, so the module imports without it.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from tasks.results import DatasetRef

CONTEXT_TAG = "mlflow.data.context"  # MLflow's own input tag: how the run used the dataset
SHA256_TAG = "trainyard.data.sha256"
DIGEST_CHARS = 32  # MLflow's datasets table holds digests of up to 36 characters
# What each kind of column ingest records reads as, in MLflow's column types.
MLFLOW_TYPES = {"numeric": "double", "boolean": "boolean", "date": "datetime", "categorical": "string"}


def dataset_name(uri: str) -> str:
    """The last part of the source's path (`train.csv` of s3://bucket/data/train.csv), the whole URI failing that."""
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def columns_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The columns as MLflow's dataset schema: a table's features with their types, then the target; for
    images the tensors."""
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.types import ColSpec, Schema, TensorSpec

    if schema.get("source") == "mnist":
        images = Schema([TensorSpec(np.dtype("uint8"), (-1, *schema["input_shape"]), "image")])
        labels = Schema([TensorSpec(np.dtype("int64"), (-1,), "label")])
        return TensorDatasetSchema(features=images, targets=labels).to_dict()
    cols = [ColSpec(MLFLOW_TYPES.get(f.get("kind", ""), "string"), f["name"]) for f in schema.get("features", [])]
    target = schema.get("target", {}).get("name")
    if target:
        # class labels are recorded by their names; a regression target is a number
        cols.append(ColSpec("string" if schema["task"] == "classification" else "double", target))
    return {"mlflow_colspec": Schema(cols).to_dict()}


def profile(schema: dict[str, Any], dataset: DatasetRef) -> dict[str, Any]:
    """Rows read, dropped and per split; for a table each column's kind, the columns left out (with why) and
    the target (the rule behind each kind is in the run's schema.json)."""
    out: dict[str, Any] = {
        "num_rows": schema.get("rows_read", sum(dataset.split_sizes.values())),
        "rows_dropped": schema.get("rows_dropped", 0),
        "splits": dict(dataset.split_sizes),
        "task": dataset.task,
    }
    kinds = {f["name"]: f.get("kind", "") for f in schema.get("features", [])}
    if kinds:
        out["columns"] = kinds
    if "left_out" in schema:
        out["left_out"] = schema["left_out"]
    if "target" in schema:
        out["target"] = schema["target"].get("name")
    return out


def dataset_input(dataset: DatasetRef, schema: dict[str, Any]):
    """The run's training data as an MLflow DatasetInput."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset, DatasetInput, InputTag

    uri = dataset.uri or schema.get("file", "") or dataset.path
    try:
        with warnings.catch_warnings():  # a local path resolves to the same source type two ways
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(uri)
        source_type, source_json = source._get_source_type(), source.to_json()
    except Exception:  # noqa: BLE001 - a scheme MLflow has no source type for (az://, abfs://)
        source_type, source_json = "external", json.dumps({"uri": uri})
    entity = Dataset(
        name=dataset_name(uri),
        digest=dataset.content_hash[:DIGEST_CHARS],
        source_type=source_type,
        source=source_json,
        schema=json.dumps(columns_schema(schema)),
        profile=json.dumps(profile(schema, dataset)),
    )
    tags = [InputTag(CONTEXT_TAG, "training"), InputTag(SHA256_TAG, dataset.content_hash)]
    return DatasetInput(dataset=entity, tags=tags)


def log_dataset(tracking_uri: str, run_id: str, dataset: DatasetRef, schema: dict[str, Any]) -> None:
    """Log the run's training data as its MLflow dataset input."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).log_inputs(run_id, datasets=[dataset_input(dataset, schema)])
