"""Artifact stores, chosen by URI: `file://...` (or a plain folder) and `s3://bucket/prefix`.

A run's artifacts are published as one unit under `<experiment>/<run-id>/`: every file
with its sha256 in a `manifest.json`. The local store builds the unit in a temporary
folder and renames it into place; the S3 store uploads the files first and the manifest
last, and deletes what it uploaded when a file fails, so a unit without its manifest is
never complete. Either way a reader sees all of a unit or none of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from tasks.errors import DataError, StorageError
from tasks.hashing import sha256_file
from tasks.store_keys import MANIFEST, check_key
from tasks.uris import file_path, scheme

__all__ = ["MANIFEST", "ArtifactStore", "LocalStore", "StorageError", "check_key", "open_store"]


class ArtifactStore(Protocol):
    uri: str
    remote: bool  # True when other machines can read it (worth syncing prepared datasets to)

    def preflight(self) -> None:
        """Fail at once, before any training, when the store cannot be written."""

    def publish(self, prefix: str, files: dict[str, str]) -> dict[str, dict[str, str]]:
        """Store `files` (name -> local path) under `prefix` as one unit; return name -> {uri, sha256}."""

    def fetch(self, key: str, dest: str | os.PathLike) -> Path:
        """Copy the object at `key` to `dest`, verifying its sha256."""

    def read_manifest(self, prefix: str) -> dict[str, dict[str, str]] | None:
        """The unit's manifest (name -> {uri, sha256}), or None when no complete unit is there."""

    def discard(self, prefix: str, names: list[str]) -> None:
        """Delete files of a unit that its manifest no longer names."""

    def remove(self, prefix: str) -> None:
        """Withdraw a published unit (a failed run's), its manifest first: it never looks complete meanwhile."""


class LocalStore:
    """A folder on this machine: units are built beside their place and renamed into it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.uri = self.root.as_uri()
        self.remote = False

    def preflight(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"artifact store {self.uri} cannot be created: {exc.strerror}") from None
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"artifact store {self.uri} is not writable")

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def publish(self, prefix: str, files: dict[str, str]) -> dict[str, dict[str, str]]:
        final = self._path(prefix)
        if final.exists():
            raise StorageError(f"artifacts already published at {final.as_uri()}; refusing to overwrite them")
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
        try:
            manifest: dict[str, dict[str, str]] = {}
            for name, src in files.items():
                check_key(name)
                dest = staging / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
                manifest[name] = {"uri": (final / name).as_uri(), "sha256": sha256_file(dest)}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def fetch(self, key: str, dest: str | os.PathLike) -> Path:
        src = self._path(key)
        prefix, _, name = key.rpartition("/")
        manifest_path = self._path(f"{prefix}/{MANIFEST}") if prefix else self.root / MANIFEST
        expected = json.loads(manifest_path.read_text(encoding="utf-8")).get(name, {}).get("sha256")
        actual = sha256_file(src)
        if expected != actual:
            raise StorageError(f"{src.as_uri()}: sha256 {actual} does not match the manifest's {expected}")
        dest = Path(dest)
        shutil.copyfile(src, dest)
        return dest

    def remove(self, prefix: str) -> None:
        """Withdraw a published unit (its manifest first, so it never looks complete meanwhile)."""
        folder = self._path(prefix)
        with contextlib.suppress(FileNotFoundError):
            (folder / MANIFEST).unlink()
        shutil.rmtree(folder, ignore_errors=True)

    def discard(self, prefix: str, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self._path(f"{prefix}/{name}").unlink()

    def read_manifest(self, prefix: str) -> dict[str, dict[str, str]] | None:
        path = self._path(f"{prefix}/{MANIFEST}")
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def open_store(uri: str, endpoint_url: str = "", max_attempts: int = 5) -> ArtifactStore:
    """The store at `uri`: a folder (a plain path or file://) or s3://bucket/prefix."""
    kind = scheme(uri)
    if kind in ("", "file"):
        return LocalStore(file_path(uri))
    if kind == "s3":
        from tasks.s3store import S3Store

        return S3Store.from_uri(uri, endpoint_url=endpoint_url, max_attempts=max_attempts)
    raise DataError(
        f"storage.uri {uri!r}: unsupported scheme {kind}://; use file:///path, a local folder or s3://bucket/prefix"
    )
