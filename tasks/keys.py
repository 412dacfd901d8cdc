"""Every MLflow tag, param and metric key Trainyard writes or reads, and the catalogue of test metrics.

One module, so that a key is spelled once: the flow's steps, the champion gate, `trainyard runs`
and the tests all use these names. Torch-free and MLflow-free.

Adding a test metric: one entry in TEST_METRICS (its task, whether higher is better, whether
`trainyard runs` shows it), and its computation in tasks/evaluate.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ---- tags -----------------------------------------------------------------------------------------
SOURCE = "trainyard.source"
MODEL = "trainyard.model"
CONFIG_HASH = "config.hash"
FLOW_RUN_ID = "prefect.flow_run_id"
GIT_COMMIT = "mlflow.source.git.commit"
CODE_VERSION = "code.version"
VERSION_PREFIX = "version."  # version.<package>
DATA_HASH = "data.hash"
DATA_KEY = "data.key"
RESUMED_FROM_EPOCH = "train.resumed_from_epoch"
TRAIN_DEVICE = "train.device"
TRAIN_PRECISION = "train.precision"
TRAIN_EPOCHS_PLANNED = "train.epochs_planned"  # train.epochs raised for train.min_steps
TRAIN_EPOCHS_RUN = "train.epochs_run"  # fewer when early stopping ended the run
TRAIN_BATCH_SIZE = "train.batch_size_used"  # what train.batch_size=auto chose
TRAIN_STOPPED_EARLY = "train.stopped_early"  # the reason, when early stopping ended the run
TRAIN_PROCESSES = "train.processes"  # DDP world size: training processes over all nodes
TRAIN_DEPLOYMENT = "train.deployment"
TRAIN_FLOW_RUN_ID = "train.flow_run_id"
ARTIFACTS_URI = "artifacts.uri"
CHAMPION_DECISION = "champion.decision"
CHAMPION_REASON = "champion.reason"
CHAMPION_METRIC = "champion.metric"
CHAMPION_PREVIOUS_VERSION = "champion.previous_version"
REGISTRY_MODEL = "registry.model"
REGISTRY_VERSION = "registry.version"
# A run's kind: unset for a training run; a prediction run (`trainyard predict`) is tagged PREDICTION and
# is left out of everything that looks for training runs (`trainyard runs`, the resume search).
RUN_KIND = "trainyard.run_kind"
PREDICTION = "prediction"
SWEEP = "sweep"  # a sweep's parent run (`trainyard sweep`); its trials are training runs, nested under it
PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own nesting tag
SWEEP_NAME = "trainyard.sweep"  # on the parent and on every trial: the sweep (the Optuna study's name)
SWEEP_TRIAL = "trainyard.sweep.trial"  # a trial's number in the study
SWEEP_TRIAL_STATE = "trainyard.sweep.trial_state"  # COMPLETE, PRUNED or FAIL
SWEEP_STORAGE = "trainyard.sweep.storage"  # where the study lives (without a password)
SWEEP_BEST_RUN = "trainyard.sweep.best_run_id"
SWEEP_BEST_VALUE = "sweep/best_value"  # the parent's metric: the best trial's objective
SWEEP_OBJECTIVE = "sweep/objective"  # a finished trial's metric: its objective, the monitored validation metric
SWEEP_DIRECTION = "trainyard.sweep.direction"  # on every trial: maximize or minimize (`trainyard runs --sweep`)
PREDICT_MODEL_URI = "trainyard.predict.model_uri"  # as given: models:/NAME@ALIAS, models:/NAME/VERSION, ...
PREDICT_MODEL_NAME = "trainyard.predict.model_name"
PREDICT_MODEL_VERSION = "trainyard.predict.model_version"
PREDICT_MODEL_RUN_ID = "trainyard.predict.model_run_id"  # the training run that logged the model
PREDICT_INPUT = "trainyard.predict.input"
PREDICT_INPUT_SHA256 = "trainyard.predict.input_sha256"
PREDICT_OUTPUT = "trainyard.predict.output"

# ---- values of the champion.decision tag, and the run statuses Trainyard sets ----------------------
PROMOTED, KEPT = "promoted", "kept"
RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"

# ---- params (besides the flattened config, `section.key`) ---------------------------------------
DATASET_TASK = "dataset.task"
DATASET_N_CLASSES = "dataset.n_classes"
DATASET_INPUT_SHAPE = "dataset.input_shape"
DATASET_N_PREFIX = "dataset.n_"  # dataset.n_train, dataset.n_val, dataset.n_test
RUNS_TABLE_PARAMS = (
    "data.source",
    "model.name",
    "optim.name",
    "optim.lr",
    "schedule.name",
    "train.epochs",
    "train.batch_size",
)

# ---- metrics --------------------------------------------------------------------------------------
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
VAL_ACCURACY = "val/accuracy"
LR = "lr"
CHAMPION_NEW_VALUE = "champion/new_value"
CHAMPION_PREVIOUS_VALUE = "champion/previous_value"
PER_CLASS = ("precision", "recall", "f1")  # test/<metric>/<class> and test/<metric>_macro
PREDICT_ROWS = "predict/rows"
PREDICT_ROWS_MISSING = "predict/rows_missing"  # rows with a missing value in a feature (imputed)
PREDICT_ROWS_UNSEEN = "predict/rows_unseen"  # rows with a category the model did not see in training
PREDICT_MISSING_PREFIX = "predict/missing/"  # predict/missing/<column>, predict/unseen/<column>
PREDICT_UNSEEN_PREFIX = "predict/unseen/"
CONFUSION_MATRIX_IMAGE = "test/confusion_matrix"  # TensorBoard's image tag (MLflow: plots/confusion_matrix.png)


@dataclass(frozen=True)
class TestMetric:
    task: str  # "classification", "regression" or "any"
    higher_is_better: bool
    in_runs_table: bool = False


TEST_METRICS = {
    "test/accuracy": TestMetric("classification", True, in_runs_table=True),
    **{f"test/{m}_macro": TestMetric("classification", True, in_runs_table=m == "f1") for m in PER_CLASS},
    "test/mse": TestMetric("regression", False, in_runs_table=True),
    "test/mae": TestMetric("regression", False),
    "test/r2": TestMetric("regression", True, in_runs_table=True),
    "test/loss": TestMetric("any", False, in_runs_table=True),
}
RUNS_TABLE_METRICS = tuple(k for k, m in TEST_METRICS.items() if m.in_runs_table)
DEFAULT_CHAMPION_METRIC = {"classification": "test/accuracy", "regression": "test/mse"}
_PER_CLASS_KEY = re.compile(rf"test/({'|'.join(PER_CLASS)})/.+")


def is_prediction_run(tags: dict[str, str]) -> bool:
    """Whether a run (by its tags) is a prediction run rather than a training run."""
    return tags.get(RUN_KIND) == PREDICTION


def is_training_run(tags: dict[str, str]) -> bool:
    """Whether a run (by its tags) trained a model: not a prediction run, not a sweep's parent."""
    return tags.get(RUN_KIND) not in (PREDICTION, SWEEP)


def per_class_key(metric: str, class_part: str) -> str:
    return f"test/{metric}/{class_part}"


def is_test_metric_form(key: str) -> bool:
    """Whether `key` names a test metric of some dataset: a catalogue key or a per-class one."""
    return key in TEST_METRICS or bool(_PER_CLASS_KEY.fullmatch(key))


def higher_is_better(key: str) -> bool:
    """Per-class keys (`test/f1/<class>`, whatever the class is named) are better higher."""
    if key in TEST_METRICS:
        return TEST_METRICS[key].higher_is_better
    return bool(_PER_CLASS_KEY.fullmatch(key))


def test_metric_keys(task: str, class_parts: list[str]) -> list[str]:
    """The test metrics the evaluation of a dataset of this task reports (class parts: its classes'
    safe key parts, classification only), in the evaluation's order."""
    keys = [k for k, m in TEST_METRICS.items() if m.task == task]
    if task == "classification":
        keys += [per_class_key(m, part) for part in class_parts for m in PER_CLASS]
    return keys + [k for k, m in TEST_METRICS.items() if m.task == "any"]


# ---- tags of training on Kubernetes (pipelines/trainjob.py) --------------------------------------
TRAIN_TRAINJOB = "train.trainjob"  # namespace/name of the Kubeflow Trainer TrainJob that trained the run
