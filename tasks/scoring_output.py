"""Batch scoring's output: the predictions written chunk by chunk, appearing whole or not at all.

A local output is written under a temporary name beside its final path and renamed once complete;
an s3:// output is written to a local temporary file and uploaded in one call once complete (the
client built as the artifact store builds it: the same endpoint, credentials and retries). Whether
the output can be written (its folder, its bucket) is checked before any row is scored. On any
failure the temporary file goes and nothing is left at the output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pyarrow as pa

from tasks import s3_settings
from tasks.csv_file import format_by_name
from tasks.errors import StorageError
from tasks.storage_config import StorageConfig
from tasks.uris import file_path, scheme


class Output:
    """The output table: open() checks it can be written, write() adds a chunk, commit() puts it in place."""

    def __init__(self, uri: str, fmt: str, storage: StorageConfig | None = None):
        self.uri, self.format = uri, format_by_name(uri, fmt)
        self.storage = storage or StorageConfig()
        self.remote = scheme(uri) == "s3"
        self.tmp: Path | None = None
        self.writer = None
        self.schema: pa.Schema | None = None
        if self.remote:
            self.bucket, _, self.key = uri[len("s3://") :].partition("/")
            self.client = self._s3_client()
        else:
            self.path = file_path(uri)

    # ---- checks -------------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse an output that cannot be written: its folder missing or read-only, its bucket missing."""
        if self.remote:
            self._check_bucket()
            return
        folder = self.path.parent
        if self.path.is_dir():
            raise StorageError(f"output {self.uri} is a folder; expected a file name")
        if not folder.is_dir():
            raise StorageError(f"output {self.uri}: folder {folder} does not exist; create it first")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StorageError(f"output {self.uri}: folder {folder} is not writable")

    def _s3_client(self):
        import boto3
        from botocore.config import Config

        endpoint = s3_settings.endpoint_url(self.storage.endpoint_url)
        config = Config(**s3_settings.client_settings(endpoint, self.storage.max_attempts))
        return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)

    def _check_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise StorageError(f"output {self.uri}: {_s3_reason(exc, self.bucket)}") from None

    # ---- writing ------------------------------------------------------------------------------

    def write(self, table: pa.Table) -> None:
        """Add a chunk; the first one opens the temporary file and fixes the columns' types."""
        if self.writer is None:
            self._open(table.schema)
        assert self.schema is not None
        self.writer.write_table(table if table.schema == self.schema else table.cast(self.schema))

    def _open(self, schema: pa.Schema) -> None:
        folder = None if self.remote else self.path.parent
        name = Path(self.key).name if self.remote else self.path.name
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        except OSError as exc:
            raise StorageError(f"output {self.uri} cannot be written ({exc.strerror})") from None
        os.close(fd)
        self.tmp, self.schema = Path(tmp), schema
        if self.format == "parquet":
            import pyarrow.parquet as pq

            self.writer = pq.ParquetWriter(tmp, schema)
        else:
            import pyarrow.csv as pacsv

            self.writer = pacsv.CSVWriter(tmp, schema)

    def commit(self) -> str:
        """Close the file and put it in place (rename, or one upload); the output's URI."""
        if self.writer is None:
            raise StorageError(f"output {self.uri}: nothing was written")
        self.writer.close()
        self.writer = None
        assert self.tmp is not None
        if self.remote:
            try:
                self.client.upload_file(str(self.tmp), self.bucket, self.key)
            except Exception as exc:
                raise StorageError(f"S3 upload failed for {self.uri}: {_s3_reason(exc, self.bucket)}") from None
            self.discard()
        else:
            os.replace(self.tmp, self.path)
            self.tmp = None
        return self.uri

    def discard(self) -> None:
        """Close and remove the temporary file, if there is one."""
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None
        if self.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
            self.tmp = None

    def remove(self) -> None:
        """Take a committed output away again (a later step failed): best effort."""
        with contextlib.suppress(Exception):
            if self.remote:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)
            else:
                os.unlink(self.path)


def _s3_reason(exc: Exception, bucket: str) -> str:
    """Why an S3 call failed, in words (never a key)."""
    from botocore.exceptions import NoCredentialsError

    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    if isinstance(exc, NoCredentialsError):
        return "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile)"
    if code in ("NoSuchBucket", "404"):
        return f"bucket {bucket!r} does not exist"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"):
        return f"credentials refused ({code})"
    if "Connect" in type(exc).__name__:
        return "cannot reach the S3 endpoint after retries"
    return f"{code or type(exc).__name__}"
