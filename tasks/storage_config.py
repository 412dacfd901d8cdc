"""The storage section: the artifact store's URI (a folder, file:// or s3://) and its S3 endpoint."""

from __future__ import annotations

from pydantic import Field, field_validator

from tasks.errors import StorageError
from tasks.sections import Section, no_credentials
from tasks.uris import check_file_uri


class StorageConfig(Section):
    SECTION = "storage"

    uri: str = Field(
        "",
        title="Artifact store",
        description="file:///path, a local folder or s3://bucket/prefix; empty: TRAINYARD_STORAGE_URI, "
        "else the state folder's artifacts/.",
    )
    endpoint_url: str = Field(
        "",
        title="S3 endpoint",
        description="S3-compatible endpoint (MinIO, ...); empty: AWS_ENDPOINT_URL, else AWS. "
        "Keys come from AWS_* only.",
    )
    max_attempts: int = Field(
        5, ge=1, le=20, title="S3 attempts", description="botocore attempts per request (with backoff)."
    )

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if "://" in v and not v.startswith(("file://", "s3://")):
            raise ValueError(f"expected file:///path, a local folder or s3://bucket/prefix, got {v!r}")
        if v.startswith("s3:") and not v.startswith("s3://"):  # a typo, not a local folder named "s3:"
            raise ValueError("starts with 's3:' but not 's3://'; expected s3://bucket/prefix")
        v = no_credentials(
            check_file_uri(v, "storage.uri"), "storage.uri", "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
        if v.startswith("s3://"):
            from tasks.s3store import parse_s3_uri  # light: no boto3, no torch

            try:
                parse_s3_uri(v)
            except StorageError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_without_secrets(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL (e.g. http://minio:9000), got {v!r}")
        return no_credentials(v, "storage.endpoint_url", "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
