"""The tracking section: MLflow's URI, experiment, run name, registry and champion metric; TensorBoard."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from tasks import keys
from tasks.sections import Section, no_credentials


class TrackingConfig(Section):
    SECTION = "tracking"

    uri: str = Field(
        "",
        title="MLflow tracking URI",
        description="sqlite:///... or http://...; empty: MLFLOW_TRACKING_URI, else a SQLite file in the state folder.",
    )
    experiment: str = Field(
        "trainyard", min_length=1, max_length=200, title="Experiment", description="MLflow experiment."
    )
    run_name: str = Field(
        "",
        max_length=200,
        pattern=r"^[A-Za-z0-9_.\- ]*$",
        title="Run name",
        description="MLflow run name (letters, digits, _ . - and spaces); empty: generated. An unfinished run "
        "of the same name is resumed from its last checkpoint.",
    )
    tensorboard: bool = Field(True, title="TensorBoard", description="Write TensorBoard event files.")
    histogram_every: int = Field(
        0,
        ge=0,
        le=10_000,
        title="Histograms every",
        description="Epochs between TensorBoard histograms of every parameter's weights and gradients; 0: none.",
    )
    log_model: bool = Field(True, title="Log model", description="Log the model to MLflow with a signature.")
    flush_timeout: float = Field(
        120.0,
        ge=0.0,
        le=3600.0,
        title="Metric flush timeout",
        description="Seconds to wait for an unreachable MLflow server at the end of training before failing the run.",
    )
    registered_model: str = Field(
        "", max_length=200, title="Registered model", description="Model registry name; empty: the experiment's name."
    )

    @model_validator(mode="after")
    def _histograms_need_tensorboard(self) -> TrackingConfig:
        if self.histogram_every and not self.tensorboard:
            raise ValueError(
                f"tracking.histogram_every={self.histogram_every} writes TensorBoard histograms; "
                "set tracking.tensorboard=true or tracking.histogram_every=0"
            )
        return self

    def model_name(self) -> str:
        """The model registry name: registered_model, else the experiment's name."""
        return self.registered_model or self.experiment

    @field_validator("uri")
    @classmethod
    def _uri_without_secrets(cls, v: str) -> str:
        return no_credentials(v, "tracking.uri", "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")

    champion_metric: str = Field(
        "auto",
        title="Champion metric",
        description="Test metric deciding champion promotion; auto: test/accuracy (classification), "
        "test/mse (regression).",
    )

    @field_validator("champion_metric")
    @classmethod
    def _metric_form(cls, v: str) -> str:
        if v == "auto" or keys.is_test_metric_form(v):
            return v
        per_class = "test/<" + "|".join(keys.PER_CLASS) + ">/<class>"
        raise ValueError(f"got {v!r}; expected auto, {', '.join(keys.TEST_METRICS)} or {per_class}")
