"""URIs parsed in one place: `file://` (the config checks it, ingest and the stores open it) and the
schemes a data source may be read from (the config refuses any other before a run starts)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

# The schemes fsspec reads a table from besides a local path; gs and az/abfs need an optional extra.
REMOTE_SCHEMES = ("s3", "gs", "az", "abfs", "http", "https")
DATA_SCHEMES = ("file", *REMOTE_SCHEMES)


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


def check_data_uri(uri: str, where: str) -> str:
    """A local path, file:///path, or a remote object named by its scheme, its bucket or host, and a name in it."""
    kind = scheme(uri)
    if kind not in ("", *DATA_SCHEMES):
        raise ValueError(f"{where} {uri!r}: scheme {kind}:// is not supported; expected {supported_schemes()}")
    if kind in REMOTE_SCHEMES:
        parts = urlsplit(uri)
        if not parts.netloc or not parts.path.strip("/"):
            holder = {"http": "host", "https": "host", "az": "container", "abfs": "container"}.get(kind, "bucket")
            raise ValueError(f"{where} {uri!r}: expected {kind}://<{holder}>/<name of the file>")
    return check_file_uri(uri, where)


def supported_schemes() -> str:
    """The accepted forms of a data path, for messages."""
    return "a local path, " + ", ".join(f"{s}://" for s in DATA_SCHEMES[:-1]) + f" or {DATA_SCHEMES[-1]}://"


def is_remote(uri: str) -> bool:
    """True for a URI that names an object elsewhere (read through fsspec), False for a local file."""
    return scheme(uri) in REMOTE_SCHEMES


def file_path(uri: str) -> Path:
    """The local path of a file:// URI or of a plain path (a path is returned as it is)."""
    if uri.startswith("file://"):
        return Path(unquote(urlsplit(uri).path))
    return Path(uri)


def scheme(uri: str) -> str:
    """The URI's scheme (`s3`, `file`, ...); '' for a plain path."""
    return uri.split("://", 1)[0] if "://" in uri else ""
