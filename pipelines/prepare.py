"""The ingest step: the prepared dataset for the config, recorded in the MLflow run.

The data's identity (content hash, cache key) becomes tags, what ingest inferred (task, classes,
input shape, split sizes) params, and the data itself the run's MLflow dataset input (tasks/lineage.py).
"""

from __future__ import annotations

import logging

from pipelines.config import TrainConfig
from pipelines.context import RunContext, store_for
from tasks import keys
from tasks.results import DatasetRef

log = logging.getLogger("trainyard.flow")


def ingest_data(cfg: TrainConfig, ctx: RunContext) -> DatasetRef:
    """Prepare (or reuse, or fetch from the shared store) the dataset, and record it in the run."""
    from tasks import lineage, tracking
    from tasks.ingest import ingest
    from tasks.prepared import load_schema

    dataset = ingest(cfg.data, ctx.state, store=store_for(cfg, ctx.storage_uri), storage=cfg.storage)
    tracking.set_tags(ctx.tracking_uri, ctx.run_id, {keys.DATA_HASH: dataset.content_hash, keys.DATA_KEY: dataset.key})
    schema = load_schema(dataset.path)
    params = {
        keys.DATASET_TASK: dataset.task,
        keys.DATASET_N_CLASSES: schema["n_classes"],
        keys.DATASET_INPUT_SHAPE: schema["input_shape"],
        **{f"{keys.DATASET_N_PREFIX}{k}": v for k, v in dataset.split_sizes.items()},
    }
    tracking.log_params(ctx.tracking_uri, ctx.run_id, params)
    lineage.log_dataset(ctx.tracking_uri, ctx.run_id, dataset, schema)
    log.info("task type: %s (%s)", dataset.task, schema.get("task_reason", ""))
    return dataset
