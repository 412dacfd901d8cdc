"""How trainyard reaches S3: the endpoint and the client settings, one rule for whatever reads or writes
it (the artifact store, a table on s3://). Standard library only: the config and the planners import it
without boto3.

The endpoint is `storage.endpoint_url`, else AWS_ENDPOINT_URL, else AWS itself; an explicit endpoint
(MinIO and other S3-compatible stores) is addressed by path, since their buckets are not host names.
Credentials come from the standard chain only (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles,
instance roles), never from the config.
"""

from __future__ import annotations

import os
from typing import Any

CONNECT_TIMEOUT, READ_TIMEOUT = 5, 60


def endpoint_url(configured: str = "") -> str | None:
    """The S3 endpoint: the configured one, else AWS_ENDPOINT_URL, else None (AWS's own, by region)."""
    return configured or os.environ.get("AWS_ENDPOINT_URL") or None


def client_settings(endpoint: str | None, max_attempts: int) -> dict[str, Any]:
    """botocore `Config` keyword arguments: `standard` retries (backoff on connection failures, 5xx and
    throttling, never on 403/404), short connect and read timeouts, path addressing for an explicit endpoint."""
    settings: dict[str, Any] = {
        "retries": {"max_attempts": max_attempts, "mode": "standard"},
        "connect_timeout": CONNECT_TIMEOUT,
        "read_timeout": READ_TIMEOUT,
    }
    if endpoint:
        settings["s3"] = {"addressing_style": "path"}
    return settings
