"""Prepared datasets: tensors plus a schema, written once under a content-hash key.

A prepared dataset is a folder `<state>/datasets/<key>/` with `tensors.pt` (a dict of
tensors: x_train, y_train, x_val, y_val, x_test, y_test) and `schema.json`. It is built
in a temporary folder beside the final one and renamed into place, so a reader never
sees half of one; when two ingests of the same data race, the first rename wins and
the other's copy is discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TENSORS_FILE = "tensors.pt"
SCHEMA_FILE = "schema.json"


@dataclass
class Prepared:
    tensors: dict[str, torch.Tensor]
    schema: dict[str, Any]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[f"x_{name}"], self.tensors[f"y_{name}"]


def cache_key(content_hash: str, params: dict[str, Any]) -> str:
    """Key of a prepared dataset: the data's content hash and the config that shaped it."""
    blob = json.dumps({"content": content_hash, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def dataset_dir(root: Path, key: str) -> Path:
    return root / "datasets" / key


def is_complete(folder: Path) -> bool:
    return (folder / TENSORS_FILE).is_file() and (folder / SCHEMA_FILE).is_file()


def save_prepared(folder: Path, prepared: Prepared) -> Path:
    """Write atomically: build in a temporary sibling folder, then rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        torch.save(prepared.tensors, tmp / TENSORS_FILE)
        (tmp / SCHEMA_FILE).write_text(json.dumps(prepared.schema, indent=2, sort_keys=True), encoding="utf-8")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_complete(folder):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_schema(folder: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(folder) / SCHEMA_FILE).read_text(encoding="utf-8"))


def load_prepared(folder: str | os.PathLike) -> Prepared:
    folder = Path(folder)
    if not is_complete(folder):
        raise FileNotFoundError(
            f"prepared dataset {folder} is missing or incomplete (expected {TENSORS_FILE}, {SCHEMA_FILE})"
        )
    tensors = torch.load(folder / TENSORS_FILE, map_location="cpu", weights_only=True)
    return Prepared(tensors=tensors, schema=load_schema(folder))
