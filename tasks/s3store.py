"""The S3 artifact store (boto3): any S3-compatible endpoint, standard credentials only.

Credentials come from the standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
profiles, instance roles); the endpoint from `storage.endpoint_url` or AWS_ENDPOINT_URL
(MinIO and other S3-compatible stores). No key is ever put into a message: errors name
the bucket and the object key only.

Uploads use boto3's managed transfer (multipart above 64 MiB) and carry the file's
sha256 in the object's metadata; downloads verify it and discard a bad copy. Transient
errors (connection refused, 5xx, throttling) are retried by botocore's `standard` retry
mode with backoff; the Prefect task around publishing retries on top of that.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tasks import s3_settings
from tasks.errors import StorageError
from tasks.hashing import sha256_file
from tasks.store_keys import MANIFEST, check_key

MULTIPART_THRESHOLD = 64 * 1024 * 1024
_TRANSIENT_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise StorageError(f"storage.uri {uri!r} names no bucket; expected s3://bucket/prefix")
    problems = []
    if not _valid_bucket(bucket):
        problems.append(f"{bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, '.', '-')")
    if prefix:
        try:
            check_key(prefix)
        except StorageError:
            problems.append(
                f"prefix {prefix!r} is not allowed; expected relative names without '..', '.' or empty parts"
            )
    if problems:
        raise StorageError(f"storage.uri {uri!r}: {'; '.join(problems)}")
    return bucket, prefix


def _valid_bucket(name: str) -> bool:
    import re

    return bool(re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", name)) and ".." not in name


def _transient(exc: Exception) -> bool:
    """Connection failures, timeouts, 5xx and throttling: worth waiting for. Not 403/404."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError)):
        return True
    code = _error_code(exc)
    return code.startswith("5") or code in _TRANSIENT_CODES


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


class S3Store:
    """A bucket and prefix on any S3-compatible endpoint; a unit is complete once its manifest is uploaded."""

    remote = True

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str = "", max_attempts: int = 5):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}".rstrip("/")
        self.endpoint_url = s3_settings.endpoint_url(endpoint_url)
        config = Config(**s3_settings.client_settings(self.endpoint_url, max_attempts))
        self.client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)

    @classmethod
    def from_uri(cls, uri: str, endpoint_url: str = "", max_attempts: int = 5) -> S3Store:
        bucket, prefix = parse_s3_uri(uri)
        return cls(bucket, prefix, endpoint_url, max_attempts)

    # ---- keys and errors ----

    def key(self, name: str) -> str:
        check_key(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _where(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}" if key else f"bucket {self.bucket!r}"

    def _fail(self, action: str, key: str, exc: Exception) -> StorageError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        code = _error_code(exc)
        where = self._where(key)
        if isinstance(exc, NoCredentialsError):
            why = "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile)"
        elif code in ("NoSuchBucket",) or (code == "404" and not key):
            why = f"bucket {self.bucket!r} does not exist"
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"):
            why = f"credentials refused ({code})"
        elif isinstance(exc, EndpointConnectionError) or "Connect" in type(exc).__name__:
            why = f"cannot reach the S3 endpoint {self.endpoint_url or 'of the default region'} after retries"
        elif isinstance(exc, ClientError):
            why = f"{code or 'error'}: {exc.response.get('Error', {}).get('Message', '')}".strip()
        else:
            why = f"{type(exc).__name__}"
        return StorageError(f"S3 {action} failed for {where}: {why}")

    # ---- the interface ----

    def preflight(self, wait: float = 30.0) -> None:
        """head_bucket: a missing bucket or refused credentials stop the run at once, before training;
        an endpoint that is down (a restart) is waited for up to `wait` seconds, with backoff."""
        import time

        deadline, delay = time.monotonic() + wait, 1.0
        while True:
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except Exception as exc:
                if not _transient(exc) or time.monotonic() + delay > deadline:
                    raise self._fail("preflight", "", exc) from None
            time.sleep(delay)
            delay = min(delay * 2, 8.0)

    def _upload(self, src: str, key: str, sha: str) -> None:
        from boto3.s3.transfer import TransferConfig

        try:
            transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
            self.client.upload_file(src, self.bucket, key, ExtraArgs={"Metadata": {"sha256": sha}}, Config=transfer)
        except Exception as exc:
            raise self._fail("upload", key, exc) from None

    def publish(self, prefix: str, files: dict[str, str]) -> dict[str, dict[str, str]]:
        uploaded: list[str] = []
        manifest: dict[str, dict[str, str]] = {}
        try:
            for name, src in files.items():
                key = self.key(f"{prefix}/{name}")
                sha = sha256_file(src)
                self._upload(src, key, sha)
                uploaded.append(key)
                manifest[name] = {"uri": f"s3://{self.bucket}/{key}", "sha256": sha}
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as tmp:
                json.dump(manifest, tmp, indent=2, sort_keys=True)
            try:
                self._upload(tmp.name, self.key(f"{prefix}/{MANIFEST}"), sha256_file(tmp.name))
            finally:
                os.unlink(tmp.name)
        except BaseException:
            self._delete_quietly(uploaded)
            raise
        return manifest

    def _delete_quietly(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except Exception:  # the endpoint may be down; the missing manifest marks the unit incomplete
                pass

    def discard(self, prefix: str, names: list[str]) -> None:
        """Delete objects of a unit that its manifest no longer names (best effort: an object
        left over is unreferenced, never read)."""
        self._delete_quietly([self.key(f"{prefix}/{name}") for name in names])

    def remove(self, prefix: str) -> None:
        """Withdraw a published unit: the manifest first, so it never looks complete meanwhile."""
        base = self.key(prefix) + "/"
        manifest = base + MANIFEST
        self._delete_quietly([manifest])
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
            keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        except Exception as exc:
            raise self._fail("list", base, exc) from None
        self._delete_quietly(keys)

    def read_manifest(self, prefix: str) -> dict[str, dict[str, str]] | None:
        key = self.key(f"{prefix}/{MANIFEST}")
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail("download", key, exc) from None
        return json.loads(body)

    def fetch(self, name: str, dest: str | os.PathLike) -> Path:
        """Download to a temporary name, check the sha256 from the object's metadata, then rename."""
        key = self.key(name)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        try:
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=key)
                self.client.download_file(self.bucket, key, tmp)
            except Exception as exc:
                raise self._fail("download", key, exc) from None
            expected = head.get("Metadata", {}).get("sha256")
            actual = sha256_file(tmp)
            if not expected:
                raise StorageError(f"{self._where(key)} has no sha256 in its metadata; refusing an unverifiable copy")
            if expected != actual:
                raise StorageError(
                    f"{self._where(key)}: sha256 {actual} does not match the recorded {expected}; "
                    "the copy was discarded"
                )
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest
