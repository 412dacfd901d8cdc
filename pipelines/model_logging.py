"""The registered model of a run: an MLflow pyfunc that takes raw rows (or images) and returns labels and
probabilities, with its signature, an input example of real training rows, and pinned requirements.

What goes into it: tasks/pyfunc_model.py (MLflow's "model from code" file) and tasks/rowcodec.py
(its encoding code) as code, the run's schema.json (the fitted encoding) and the trained network
exported with torch.export (network.pt2) as artifacts. The weights-only artifacts of the run's unit
(model_state.pt, schema.json in the artifact store) are published as before (pipelines/publish.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pipelines.config import TrainConfig
from pipelines.context import RunContext
from tasks import tracking
from tasks.results import DatasetRef, TrainResult

TASKS = Path(__file__).resolve().parent.parent / "tasks"
MODEL_CODE = TASKS / "pyfunc_model.py"
CODE_PATHS = [TASKS / "rowcodec.py"]
# What the model's code imports, pinned to this environment's versions (the model's requirements.txt).
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas")
LABEL_TYPES = {bool: "boolean", int: "long", float: "double", str: "string"}


def requirements() -> list[str]:
    """The model's pip requirements: each package its code imports, at the version installed here."""
    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in REQUIREMENTS]


def export_network(cfg: TrainConfig, schema: dict[str, Any], state: dict, path: Path) -> Path:
    """The trained network as a torch.export program with a batch dimension of any size, saved to `path`."""
    import torch

    from models import build_model

    model = build_model(cfg.model.name, schema, cfg.model)
    model.load_state_dict(state)
    model = model.cpu().eval()
    example = torch.zeros((2, *schema["input_shape"]), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def signature(schema: dict[str, Any]):
    """The model's signature: the raw feature columns with their types (a date's `any`) in, the prediction and
    the probabilities out. An image model's has the outputs only: it takes uint8 or float images, with or without
    the channel axis, and a tensor spec would allow one of them."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    from tasks import rowcodec

    if schema.get("source") == "mnist":
        outputs = [
            ColSpec("long", rowcodec.PREDICTION),
            *(ColSpec("double", f"{rowcodec.PROBABILITY}{d}") for d in range(10)),
        ]
        return ModelSignature(inputs=None, outputs=Schema(outputs))
    codec = rowcodec.RowCodec(schema)
    # A date column takes ISO 8601 text (JSON, pandas.read_csv) as well as datetimes (read_csv with pyarrow,
    # Parquet): MLflow's datetime type would refuse the text pandas reads, so it is declared `any`.
    inputs = Schema([ColSpec(_spec_type(codec.column_types[name]), name) for name in codec.columns])
    if codec.task == "classification":
        label_type = LABEL_TYPES[type(codec.labels[0])]
        outputs = [ColSpec(label_type, rowcodec.PREDICTION), *(ColSpec("double", c) for c in codec.output_columns[1:])]
    else:
        outputs = [ColSpec("double", rowcodec.PREDICTION)]
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


def _spec_type(column_type: str):
    from mlflow.types.schema import AnyType

    return AnyType() if column_type == "datetime" else column_type


def input_example(cfg: TrainConfig, schema: dict[str, Any], dataset: DatasetRef) -> Any:
    """Real inputs from the training split: the file's first rows in it (a table), or two training images."""
    if schema.get("source") == "mnist":
        from tasks.prepared import load_prepared

        return load_prepared(dataset.path).tensors["x_train"][:2].numpy()
    from tasks import rowcodec

    rows = schema.get("example_rows") or [0]
    codec = rowcodec.RowCodec(schema)
    frame = _first_rows(Path(schema["file"]), dataset.uri or schema["file"], cfg, codec.column_types, max(rows) + 1)
    return frame.iloc[rows].reset_index(drop=True)


def _first_rows(path: Path, uri: str, cfg: TrainConfig, types: dict[str, str], n: int):
    """The table's first `n` rows of the columns `types` names, read as batch scoring reads them
    (tasks/scoring_io.py), with the signature's types."""
    from tasks.scoring_io import arrow_type, local_source, read_chunks

    src = local_source(uri, path, "", cfg.data.format, cfg.data.delimiter, cfg.data.encoding)
    with contextlib.closing(read_chunks(src, {c: arrow_type(t) for c, t in types.items()}, n, lambda _: None)) as rows:
        frame = next(rows).to_pandas()
    for name, t in types.items():
        if t == "long":  # scoring reads integers as floats, so that a missing value is NaN; the signature's are int64
            frame[name] = frame[name].astype("int64")
    return frame[list(types)]


def log_pyfunc_model(
    tracking_uri: str,
    run_id: str,
    python_model: Path,
    artifacts: dict[str, Path],
    code_paths: list[Path],
    signature,
    input_example,
    pip_requirements: list[str],
    registered_model_name: str = "",
    logging_context: Callable[[str], contextlib.AbstractContextManager] = tracking.fluent_uris,
) -> dict[str, str]:
    """Log a pyfunc model from its code file (MLflow's "models from code": nothing pickled) with its artifacts,
    code, signature, input example and requirements; register it under `registered_model_name`.

    The logging runs inside `logging_context(tracking_uri)`, which points MLflow's fluent API at the
    run's server and back (by default `fluent_uris`, public API only).
    """
    import mlflow
    import mlflow.pyfunc

    with logging_context(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(python_model),
            artifacts={role: str(path) for role, path in artifacts.items()},
            code_paths=[str(p) for p in code_paths],
            signature=signature,
            input_example=input_example,
            pip_requirements=pip_requirements,
            registered_model_name=registered_model_name or None,
        )
    version = getattr(info, "registered_model_version", None)
    return {"model_uri": info.model_uri, "version": str(version) if version is not None else ""}


def log_model(cfg: TrainConfig, ctx: RunContext, dataset: DatasetRef, result: TrainResult) -> dict[str, str]:
    """Log the run's pyfunc model and register it under the run's model name; its URI and version."""
    from pipelines import startup
    from tasks.checkpoint import load_weights
    from tasks.prepared import SCHEMA_FILE, load_schema

    schema = load_schema(dataset.path)
    network = export_network(cfg, schema, load_weights(result.checkpoint)["model_state"], ctx.run_dir / "network.pt2")
    return log_pyfunc_model(
        ctx.tracking_uri,
        ctx.run_id,
        python_model=MODEL_CODE,
        artifacts={"network": network, "schema": Path(dataset.path) / SCHEMA_FILE},
        code_paths=CODE_PATHS,
        signature=signature(schema),
        input_example=input_example(cfg, schema, dataset),
        pip_requirements=requirements(),
        registered_model_name=cfg.tracking.model_name(),
        logging_context=startup.model_logging,
    )
