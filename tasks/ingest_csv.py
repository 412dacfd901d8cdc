"""CSV ingest: a CSV file -> standardised float32 tensors, encoded labels and a schema.

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
from tasks.uris import file_path, scheme

# The config keys that do not shape a CSV dataset (MNIST's, and the file's location: its content is hashed).
NOT_HASHED = {"path", "root", "download", "split", "n_train", "limit", "source"}


def local_path(path_or_uri: str) -> Path:
    """A local path from a plain path or a file:// URI."""
    kind = scheme(path_or_uri)
    if kind not in ("", "file"):
        raise DataError(f"data.path {path_or_uri!r}: scheme {kind}:// is not supported; use a local path or file://")
    return file_path(path_or_uri)


def ingest_csv(data_cfg: DataConfig, state_root: Path) -> tuple[str, str, Callable[[], Prepared]]:
    """Return (cache key, content hash, a builder that makes the Prepared dataset).

    The builder is only run when the key is not already in the cache.
    """
    path = local_path(data_cfg.path)
    check_file(path)
    content_hash = sha256_file(path)
    params = data_cfg.model_dump(exclude=NOT_HASHED)
    params["source"] = "csv"
    key = cache_key(content_hash, params)
    return key, content_hash, lambda: build_csv(data_cfg, path, content_hash)


def build_csv(data_cfg: DataConfig, path: Path, content_hash: str) -> Prepared:
    """The prepared dataset of the CSV file at `path`, shaped by `data_cfg`."""
    data = read_columns(path, data_cfg)
    inferred = infer(path, data_cfg, data)
    return encode(path, data_cfg, content_hash, inferred)
