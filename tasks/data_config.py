"""The data section: where the data comes from and how ingest shapes it (read by tasks/ingest*.py)."""

from __future__ import annotations

import codecs
from typing import Any, Literal

from pydantic import Field, field_validator

from tasks.sections import Section, column_names, no_credentials
from tasks.uris import check_data_uri

# The keys each source reads besides these shared ones; a key set for the other source is refused.
SHARED = ("val_fraction", "split_seed")
USES = {
    "mnist": ("root", "download", "split", "n_train", "limit"),
    "csv": (
        "path",
        "format",
        "delimiter",
        "encoding",
        "target",
        "features",
        "drop",
        "categorical",
        "task",
        "missing",
        "max_categories",
        "test_fraction",
    ),
}


class DataConfig(Section):
    SECTION, CHOICE = "data", "source"

    source: Literal["mnist", "csv"] = Field("mnist", title="Source", description="Where the data comes from.")
    path: str = Field(
        "",
        title="Table path",
        description="The table for source=csv (a CSV or Parquet file): a local path, file://, s3://, gs://, "
        "az:// or abfs://, or http(s)://.",
    )
    format: Literal["auto", "csv", "parquet"] = Field(
        "auto",
        title="File format",
        description="auto: Parquet for a name ending .parquet or .pq, CSV (plain or compressed) otherwise.",
    )
    delimiter: str = Field(
        "auto",
        title="CSV delimiter",
        description="The character between CSV fields; auto: sniffed from the header among , ; tab and |. "
        "'tab' stands for a tab.",
    )
    encoding: str = Field(
        "utf-8", title="CSV encoding", description="The CSV file's text encoding, e.g. utf-8, latin-1, cp1252."
    )
    target: str = Field("", title="Target column", description="The CSV column to predict (source=csv).")
    features: list[str] = Field(
        default_factory=list,
        title="Feature columns",
        description="CSV columns to use as inputs; empty means all others.",
    )
    drop: list[str] = Field(default_factory=list, title="Columns to drop", description="CSV columns to ignore.")
    categorical: list[str] = Field(
        default_factory=list,
        title="Categorical columns",
        description="Columns to one-hot encode even when they hold numbers; text columns are categorical anyway.",
    )
    task: Literal["auto", "classification", "regression"] = Field(
        "auto", title="Task type", description="auto infers it from the target column; the choice is always logged."
    )
    missing: Literal["impute", "drop", "error"] = Field(
        "impute",
        title="Missing values",
        description="impute: training median for numbers, a '<missing>' category for text; "
        "drop: drop rows with any missing value; error: refuse the file.",
    )
    max_categories: int = Field(
        256,
        ge=2,
        le=100_000,
        title="Max categories",
        description="Refuse a categorical column with more distinct values.",
    )
    root: str = Field(
        "data/mnist", title="MNIST folder", description="Folder holding (or receiving) the MNIST IDX files."
    )
    download: bool = Field(True, title="Download MNIST", description="Download MNIST when its files are missing.")
    split: Literal["official", "t10k"] = Field(
        "official",
        title="MNIST split",
        description="official: 60k train files (val carved out) and the 10k test files; "
        "t10k: only the 10k test files, the first n_train to train, the rest to test.",
    )
    n_train: int = Field(8000, ge=1, title="t10k train rows", description="With split=t10k: rows used to train.")
    limit: int = Field(0, ge=0, title="Row limit", description="Use only the first N training rows (0: all).")
    val_fraction: float = Field(
        0.1, gt=0.0, lt=0.5, title="Validation share", description="Share held out for validation."
    )
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, title="Test share", description="Share held out for test (CSV).")
    split_seed: int = Field(0, ge=0, title="Split seed", description="Seed of the train/val/test split.")

    @field_validator("path")
    @classmethod
    def _path_or_uri(cls, v: str) -> str:
        # Refused here, before a run starts; whether the object is there and gs/az's extra is installed is
        # ingest's to find out (the worker that reads it may have what the machine submitting it lacks).
        return no_credentials(
            check_data_uri(v, "data.path"),
            "data.path",
            "AWS_* (s3), GOOGLE_APPLICATION_CREDENTIALS (gs) or AZURE_STORAGE_* (az)",
        )

    @field_validator("delimiter")
    @classmethod
    def _delimiter(cls, v: str) -> str:
        v = "\t" if v == "tab" else v
        if v != "auto" and (len(v) != 1 or v in ('"', "\n", "\r")):
            raise ValueError(f"expected auto, tab or one character such as , ; or |; got {v!r}")
        return v

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown encoding {v!r}; expected a Python codec name such as utf-8 or latin-1") from None
        return v

    @field_validator("target", "features", "drop", "categorical", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        return column_names(v)

    @field_validator("features", "drop", "categorical")
    @classmethod
    def _once_each(cls, v: list[str], info) -> list[str]:
        repeated = sorted({x for x in v if v.count(x) > 1})
        if repeated:
            raise ValueError(
                f"data.{info.field_name} names {', '.join(map(repr, repeated))} more than once; list each column once"
            )
        return v

    @classmethod
    def uses(cls, choice: str) -> tuple[str, ...]:
        return (*USES[choice], *SHARED)
