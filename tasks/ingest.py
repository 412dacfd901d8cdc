"""Ingest stage: turn the configured source into a prepared dataset, once per content hash.

Returns a small dict (a dataset reference) for the next task: the cache key, the
folder, the content hash and the schema summary. A second run with the same data and
data config finds the folder and reuses it without reading the source again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks.ingest_csv import ingest_csv
from tasks.ingest_mnist import ingest_mnist
from tasks.prepared import dataset_dir, is_complete, load_schema, save_prepared

log = logging.getLogger("trainyard.ingest")


def ingest(data_cfg, state_root: Path) -> dict[str, Any]:
    """Prepare the dataset that `data_cfg` describes under `state_root/datasets/<key>/`."""
    planner = ingest_csv if data_cfg.source == "csv" else ingest_mnist
    key, content_hash, build = planner(data_cfg, Path(state_root))
    folder = dataset_dir(Path(state_root), key)
    if is_complete(folder):
        log.info("reusing prepared dataset %s", folder)
        reused = True
    else:
        prepared = build()
        prepared.schema["key"] = key
        save_prepared(folder, prepared)
        log.info("prepared dataset written to %s", folder)
        reused = False
    schema = load_schema(folder)
    return {
        "key": key,
        "path": str(folder),
        "content_hash": content_hash,
        "source": data_cfg.source,
        "task": schema["task"],
        "split_sizes": schema["split_sizes"],
        "reused": reused,
    }
