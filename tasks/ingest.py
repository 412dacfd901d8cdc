"""Ingest stage: turn the configured source into a prepared dataset, once per content hash.

Returns a DatasetRef for the next task: the cache key, the folder, the content hash and
the schema summary. A second run with the same data and data config finds the folder and
reuses it without reading the source again.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.data_config import DataConfig
from tasks.ingest_csv import ingest_csv
from tasks.ingest_mnist import ingest_mnist
from tasks.prepared import SCHEMA_FILE, TENSORS_FILE, Prepared, dataset_dir, is_complete, load_schema, save_prepared
from tasks.results import DatasetRef
from tasks.storage_config import StorageConfig

if TYPE_CHECKING:
    from tasks.storage import ArtifactStore

log = logging.getLogger("trainyard.ingest")


def _plan(
    data_cfg: DataConfig, state_root: Path, storage: StorageConfig | None = None
) -> tuple[str, str, Callable[[], Prepared]]:
    """(cache key, content hash, builder) from the configured source's planner."""
    if data_cfg.source == "csv":
        return ingest_csv(data_cfg, Path(state_root), storage)
    return ingest_mnist(data_cfg, Path(state_root))


def source_uri(data_cfg: DataConfig) -> str:
    """Where the data is read from, as the config gives it: data.path for a table, the MNIST folder."""
    return data_cfg.path if data_cfg.source == "csv" else data_cfg.root


def identity(data_cfg: DataConfig, state_root: Path, storage: StorageConfig | None = None) -> tuple[str, str]:
    """(cache key, content hash) of the configured data, without building anything.

    A remote table is downloaded into the source cache when its identity is new (its bytes' sha256 is
    the content hash); when the cached copy is current this costs one metadata request.
    """
    key, content_hash, _ = _plan(data_cfg, state_root, storage)
    return key, content_hash


def fetch_prepared(store: ArtifactStore, key: str, state_root: Path) -> Path:
    """The local folder of prepared dataset `key`, fetched from the shared store when not cached here."""
    folder = dataset_dir(Path(state_root), key)
    if is_complete(folder) or _fetch(store, key, folder):
        return folder
    raise FileNotFoundError(f"prepared dataset {key} is neither in {folder.parent} nor in {store.uri}/datasets/")


def _fetch(store: ArtifactStore, key: str, folder: Path) -> bool:
    """Copy a prepared dataset from the shared store into the local cache; False when it is not there."""
    prefix = f"datasets/{key}"
    if store.read_manifest(prefix) is None:
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=folder.parent))
    try:
        for name in (TENSORS_FILE, SCHEMA_FILE):
            store.fetch(f"{prefix}/{name}", tmp / name)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_complete(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def ingest(
    data_cfg: DataConfig,
    state_root: Path,
    store: ArtifactStore | None = None,
    storage: StorageConfig | None = None,
) -> DatasetRef:
    """Prepare the dataset that `data_cfg` describes under `state_root/datasets/<key>/`.

    With a remote artifact `store` (S3), a dataset another machine prepared is fetched
    from `datasets/<key>/` instead of being built again, and one built here is shared there.
    `storage` (the storage section) gives a table on s3:// the store's endpoint and attempts.
    """
    key, content_hash, build = _plan(data_cfg, state_root, storage)
    folder = dataset_dir(Path(state_root), key)
    shared = store is not None and store.remote
    if is_complete(folder):
        log.info("reusing prepared dataset %s", folder)
        reused = True
    elif shared and _fetch(store, key, folder):
        log.info("fetched prepared dataset %s from %s", key, store.uri)
        reused = True
    else:
        prepared = build()
        prepared.schema["key"] = key
        save_prepared(folder, prepared)
        log.info("prepared dataset written to %s", folder)
        reused = False
    if shared and store.read_manifest(f"datasets/{key}") is None:
        store.publish(f"datasets/{key}", {name: str(folder / name) for name in (TENSORS_FILE, SCHEMA_FILE)})
    return dataset_ref(folder, key, reused, content_hash=content_hash, source=data_cfg.source, uri=source_uri(data_cfg))


def dataset_ref(
    folder: Path, key: str, reused: bool, content_hash: str = "", source: str = "", uri: str = ""
) -> DatasetRef:
    """The reference of the prepared dataset in `folder`: what ingest inferred (task, split sizes) from
    its schema, and the data's identity as given (else as the schema records it) and origin as given."""
    schema = load_schema(folder)
    return DatasetRef(
        key=key,
        path=str(folder),
        content_hash=content_hash or schema.get("content_hash", ""),
        source=source or schema.get("source", ""),
        task=schema["task"],
        split_sizes=schema["split_sizes"],
        reused=reused,
        uri=uri,
    )
