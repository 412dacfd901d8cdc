"""`file://` URIs, parsed in one place: the config checks them, ingest and the stores open them."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit


def check_file_uri(uri: str, where: str) -> str:
    """A file:// URI names an absolute path: file:///srv/data. In file://srv/data, `srv` is a host."""
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(
                f"{where} {uri!r}: a file:// URI takes an absolute path after three slashes (file:///srv/data); "
                f"{parts.netloc!r} would be read as a host name. For a relative path drop the file:// prefix"
            )
    return uri


def file_path(uri: str) -> Path:
    """The local path of a file:// URI or of a plain path (a path is returned as it is)."""
    if uri.startswith("file://"):
        return Path(unquote(urlsplit(uri).path))
    return Path(uri)


def scheme(uri: str) -> str:
    """The URI's scheme (`s3`, `file`, ...); '' for a plain path."""
    return uri.split("://", 1)[0] if "://" in uri else ""
