"""The prediction config: which registered model scores which table into which file (read by
tasks/scoring.py and pipelines/predict.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tasks.data_config import DataConfig
from tasks.sections import Section, column_names, no_credentials
from tasks.uris import check_data_uri, check_file_uri, scheme

MODEL_SCHEMES = ("", "file", "models", "runs")
OUTPUT_SCHEMES = ("", "file", "s3")
Format = Literal["auto", "csv", "parquet"]


class PredictConfig(Section):
    SECTION = "predict"

    model: str = Field(
        "models:/trainyard@champion",
        title="Model",
        description="The MLflow model to score with: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model "
        "or a local folder.",
    )
    input: str = Field(
        "",
        title="Input table",
        description="The table to score (CSV or Parquet): a local path, file://, s3://, gs://, az:// or abfs://, "
        "or http(s)://.",
    )
    output: str = Field(
        "",
        title="Output table",
        description="Where the predictions go: a local path or s3://bucket/key; CSV or Parquet by its suffix "
        "(.csv, .parquet) or output_format.",
    )
    format: Format = Field(
        "auto",
        title="Input format",
        description="auto: Parquet for a name ending .parquet or .pq or a file that is Parquet, CSV otherwise.",
    )
    output_format: Format = Field(
        "auto", title="Output format", description="auto: Parquet for an output ending .parquet or .pq, else CSV."
    )
    keep: list[str] = Field(
        default_factory=list,
        title="Columns kept",
        description="Input columns copied to the output before the predictions (e.g. an id).",
    )
    chunk_rows: int = Field(65536, ge=1, title="Rows per chunk", description="Rows read and scored at a time.")
    tracking_uri: str = Field(
        "",
        title="Tracking URI",
        description="The MLflow tracking URI; empty: MLFLOW_TRACKING_URI, else the state folder's SQLite file.",
    )
    experiment: str = Field(
        "trainyard", min_length=1, title="Experiment", description="The MLflow experiment of the prediction run."
    )
    delimiter: str = Field(
        "auto",
        title="CSV delimiter",
        description="The character between the input's CSV fields; auto: sniffed from the header among , ; tab "
        "and |. 'tab' stands for a tab.",
    )
    encoding: str = Field(
        "utf-8", title="CSV encoding", description="The input CSV file's text encoding, e.g. utf-8, latin-1."
    )

    @field_validator("model")
    @classmethod
    def _model_uri(cls, v: str) -> str:
        if not v:
            raise ValueError("expected a model URI such as models:/trainyard@champion")
        if scheme(v) not in MODEL_SCHEMES:
            raise ValueError(
                f"predict.model {v!r}: scheme {scheme(v)}:// is not supported; expected models:/NAME@ALIAS, "
                "models:/NAME/VERSION, runs:/RUN_ID/PATH or a local folder"
            )
        return check_file_uri(v, "predict.model")

    @field_validator("input")
    @classmethod
    def _input_uri(cls, v: str) -> str:
        env_hint = "AWS_* (s3), GOOGLE_APPLICATION_CREDENTIALS (gs) or AZURE_STORAGE_* (az)"
        return no_credentials(check_data_uri(v, "predict.input"), "predict.input", env_hint)

    @field_validator("output")
    @classmethod
    def _output_uri(cls, v: str) -> str:
        if scheme(v) not in OUTPUT_SCHEMES:
            raise ValueError(f"predict.output {v!r}: expected a local path, file:///path or s3://bucket/key")
        if scheme(v) == "s3" and not v[len("s3://") :].partition("/")[2].strip("/"):
            raise ValueError(f"predict.output {v!r}: expected s3://<bucket>/<key of the file>")
        return no_credentials(check_file_uri(v, "predict.output"), "predict.output", "AWS_* in the environment")

    @field_validator("delimiter")
    @classmethod
    def _delimiter(cls, v: str) -> str:
        return DataConfig._delimiter(v)

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        return DataConfig._encoding(v)

    @field_validator("keep", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        return column_names(v)

    @field_validator("keep")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        repeated = sorted({x for x in v if v.count(x) > 1})
        if repeated:
            raise ValueError(f"predict.keep names {', '.join(map(repr, repeated))} more than once; list each once")
        return v

    @model_validator(mode="after")
    def _needs_both(self) -> PredictConfig:
        if self.input and self.output and self.input == self.output:
            raise ValueError(f"predict.output {self.output!r} is the input; write the predictions elsewhere")
        return self
