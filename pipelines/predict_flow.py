"""Batch scoring as a Prefect flow: one task scoring a table with a registered model.

Only wiring lives here; the scoring is `pipelines.predict.predict`, the same call as
`trainyard predict`. The config is the flow's only parameter, so the Prefect UI renders it
as a form. The task retries I/O failures (an S3 or tracking-server blip), never a bad table:
that fails the same way every time.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipelines.deployments import PREDICT_INPUT, PREDICT_OUTPUT, RETRAIN_CSV_MODEL
from pipelines.flow import IO_RETRIES, _not_bad_input
from pipelines.predict import predict
from tasks import tracking
from tasks.predict_config import PredictConfig

PREDICT_FLOW = "trainyard-predict"
# The parameter form's defaults: csv-retrain's champion on the stack's objects (deploy/README.md,
# "Scheduled scoring"); the batch-predict deployment sets its own, from the environment of `trainyard deploy`.
DEFAULT_CONFIG = PredictConfig(
    model=f"models:/{RETRAIN_CSV_MODEL}@champion", input=PREDICT_INPUT, output=PREDICT_OUTPUT
)

predict_task = task(predict, name="predict", cache_policy=NO_CACHE, retry_condition_fn=_not_bad_input, **IO_RETRIES)


@flow(name=PREDICT_FLOW, validate_parameters=True)
def batch_predict_flow(cfg: PredictConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """Score a table with a registered model and write the predictions; return the scoring summary.

    Args:
        cfg: what to score with which model, where the predictions go, and where the prediction
            run is tracked.
    """
    tracking.configure_mlflow_client()  # an unreachable tracking server fails in seconds, then the task retries
    return predict_task(cfg)
