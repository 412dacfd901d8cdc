"""The layout both artifact stores share: the manifest's name and which keys are allowed.

A module of its own so that tasks/storage.py (the interface, the local store, `open_store`) and
tasks/s3store.py import it without importing each other.
"""

from __future__ import annotations

from tasks.errors import StorageError

MANIFEST = "manifest.json"


def check_key(key: str) -> str:
    """Refuse keys that could escape the store (absolute paths, `..`, empty parts)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key or "\x00" in key:
        raise StorageError(f"artifact key {key!r} is not allowed: expected relative names without '..' or empty parts")
    return key
