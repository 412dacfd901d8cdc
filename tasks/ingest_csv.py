"""Table ingest: a CSV or Parquet file, local or remote -> standardised float32 tensors, encoded labels and a schema.

The planner names the prepared dataset (its cache key, from the file's content hash and
the data config) and hands back a builder that is only run when the key is not cached.
The builder reads the columns it needs (tasks/csv_read.py), infers what they are
(tasks/csv_infer.py) and encodes them (tasks/csv_encode.py). Statistics come from the
training split only. Every refusal names the file, the column and, where there is one,
the row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tasks.csv_encode import encode
from tasks.csv_file import check_file
from tasks.csv_infer import infer
from tasks.csv_read import read_columns
from tasks.data_config import DataConfig
from tasks.errors import DataError
from tasks.hashing import sha256_file
from tasks.prepared import Prepared, cache_key
from tasks.storage_config import StorageConfig
from tasks.uris import file_path, is_remote, scheme, supported_schemes

# The config keys that do not shape a CSV dataset (MNIST's, and the file's location: its content is hashed).
NOT_HASHED = {"path", "root", "download", "split", "n_train", "limit", "source"}


def table_file(path_or_uri: str, state_root: Path, storage: StorageConfig | None = None) -> tuple[Path, str]:
    """(the local file, the sha256 of its bytes) of data.path: a local file as it is, a remote object as its
    copy in the state folder's source cache (downloaded when its identity is new; see tasks/sources.py)."""
    if is_remote(path_or_uri):
        from tasks.sources import fetch_source  # fsspec only when a remote source is read

        return fetch_source(path_or_uri, state_root, storage)
    if scheme(path_or_uri) not in ("", "file"):
        raise DataError(
            f"data.path {path_or_uri}: scheme {scheme(path_or_uri)}:// is not supported; expected {supported_schemes()}"
        )
    path = file_path(path_or_uri)
    check_file(path)
    return path, sha256_file(path)


def ingest_csv(
    data_cfg: DataConfig, state_root: Path, storage: StorageConfig | None = None
) -> tuple[str, str, Callable[[], Prepared]]:
    """Return (cache key, content hash, a builder that makes the Prepared dataset).

    The builder is only run when the key is not already in the cache. `storage` gives a table on s3://
    the artifact store's endpoint and attempts.
    """
    path, content_hash = table_file(data_cfg.path, state_root, storage)
    params = data_cfg.model_dump(exclude=NOT_HASHED)
    params["source"] = "csv"
    key = cache_key(content_hash, params)
    return key, content_hash, lambda: named_as(data_cfg.path, path, lambda: build_csv(data_cfg, path, content_hash))


def named_as(uri: str, path: Path, build: Callable[[], Prepared]) -> Prepared:
    """Run `build`; a refusal that names `path`, the local copy of a remote object, names its URI instead
    (what the user wrote in data.path, not a file in the state folder)."""
    try:
        return build()
    except DataError as exc:
        if not is_remote(uri):
            raise
        raise type(exc)(str(exc).replace(str(path), uri)) from None


def build_csv(data_cfg: DataConfig, path: Path, content_hash: str) -> Prepared:
    """The prepared dataset of the table (CSV or Parquet) at `path`, shaped by `data_cfg`."""
    data = read_columns(path, data_cfg)
    try:
        inferred = infer(path, data_cfg, data)
        return encode(path, data_cfg, content_hash, inferred)
    except DataError as exc:
        if data.dialect is not None:
            raise
        # the checks after the reader word their refusals for a CSV file: this one is Parquet
        raise type(exc)(str(exc).replace("CSV file ", "Parquet file ", 1)) from None
