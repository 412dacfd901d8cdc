"""Remote tables: data.path on object storage (s3://, gs://, az://, abfs://) or a web server
(http(s)://), read through fsspec and downloaded once into the state folder.

A remote object is known by its identity: its URI, its version (the S3 version id, else the ETag,
else Last-Modified) and its size, which one metadata request (HEAD) answers. Its copy lives in
`<state>/sources/<uri>/<identity>/<name>` beside `source.json`, which records that identity and
the sha256 of the bytes: a later run whose HEAD answers the same identity uses the copy without
downloading or hashing it again; a new identity downloads again and then removes the older copy,
so each URI keeps one copy, its newest.

The download streams the object to a temporary name in the entry's folder, one chunk in memory at
a time, hashing each chunk as it is written, and renames it only once it is complete and the
object did not change meanwhile: S3 reads are conditional on the ETag (If-Match, s3fs), and for
every scheme the identity is read again afterwards and the byte count checked. `source.json` is
written last, so a copy without it is never used. Every refusal is one DataError naming the URI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from tasks import s3_settings
from tasks.errors import DataError
from tasks.storage_config import StorageConfig
from tasks.uris import REMOTE_SCHEMES, scheme, supported_schemes

CHUNK = 16 * 1024 * 1024  # bytes per read: one ranged GET on an object store, one chunk in memory at a time
META = "source.json"
SOURCES_DIR = "sources"
# The optional extras of pyproject.toml that bring a scheme's fsspec backend.
EXTRAS = {"gs": ("gcsfs", "gcs"), "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure")}
# Where the backends' info() put an object's version; the first one present is the identity's tag.
VERSION_FIELDS = ("VersionId", "generation", "version_id", "ETag", "etag", "Last-Modified", "LastModified")
HTTP_RETRY_DELAY = 0.2  # seconds before an HTTP source's second try, doubled for each further one
WEB = ("http", "https")

T = TypeVar("T")


@dataclass(frozen=True)
class Identity:
    """What a HEAD says of an object: its version tag and its size ('' and -1 where the server says nothing)."""

    tag: str
    size: int

    @property
    def known(self) -> bool:
        """Without a tag and a size a copy cannot be told from a newer object: it is downloaded every run."""
        return bool(self.tag) and self.size >= 0


def fetch_source(uri: str, state_root: Path, storage: StorageConfig | None = None) -> tuple[Path, str]:
    """(the local copy, the sha256 of its bytes) of the remote object `uri`, downloaded when not cached.

    `storage` gives S3 its endpoint and attempts (the artifact store's: storage.endpoint_url, else
    AWS_ENDPOINT_URL; storage.max_attempts); HTTP sources are tried storage.max_attempts times too.
    """
    reader = _Reader(uri, storage or StorageConfig())
    now = reader.identity()
    entry = _entry_dir(Path(state_root), uri, now)
    cached = _cached(entry, uri, now)
    if cached is not None:
        return cached
    copy = reader.download(now, entry)
    _prune(entry)
    return copy


class _Reader:
    """One remote object through its fsspec filesystem; every failure becomes one DataError naming it."""

    def __init__(self, uri: str, storage: StorageConfig):
        self.uri, self.kind = uri, scheme(uri)
        if self.kind not in REMOTE_SCHEMES:
            raise DataError(f"data.path {uri}: scheme {self.kind}:// is not supported; expected {supported_schemes()}")
        self.endpoint = s3_settings.endpoint_url(storage.endpoint_url) if self.kind == "s3" else None
        self.attempts = storage.max_attempts
        self.fs = _filesystem(uri, self.kind, self.endpoint, self.attempts)

    def identity(self) -> Identity:
        with self._refusals():
            return self._retrying(self._head)

    def download(self, expected: Identity, entry: Path) -> tuple[Path, str]:
        """Stream the object into `entry` under a temporary name; rename it and record it once complete."""
        entry.mkdir(parents=True, exist_ok=True)
        final = entry / _file_name(self.uri)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=entry)
        try:
            with self._refusals():
                sha, size = self._stream(fd)
                after = self._retrying(self._head)
            if after != expected or (expected.size >= 0 and size != expected.size):
                raise DataError(
                    f"data.path {self.uri}: the object changed while it was downloaded ({_describe(expected)}, "
                    f"then {_describe(after)}, {size} bytes read); nothing was kept, run again once it is written"
                )
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _write_meta(entry, {"uri": self.uri, "tag": expected.tag, "size": size, "sha256": sha})
        return final, sha

    def _head(self) -> Identity:
        self.fs.invalidate_cache(self.uri)  # a fresh answer, not what an earlier call saw
        info = self.fs.info(self.uri)
        if info.get("type") == "directory":
            raise DataError(f"data.path {self.uri} is a folder (a prefix of several objects), expected one object")
        tag = next((str(info[name]) for name in VERSION_FIELDS if info.get(name)), "")
        size = info.get("size")
        return Identity(tag, int(size) if size is not None else -1)

    def _stream(self, fd: int) -> tuple[str, int]:
        """Copy the object to the open file `fd` chunk by chunk: (sha256, bytes written)."""
        digest, size = hashlib.sha256(), 0
        # HTTP: one streamed GET (block_size 0; a server need not answer ranges). Object stores: ranged
        # GETs of CHUNK bytes, each conditional on the ETag the file was opened with (s3fs).
        options: dict[str, Any] = {"block_size": 0} if self.kind in WEB else {"block_size": CHUNK, "cache_type": "none"}
        with os.fdopen(fd, "wb") as out, self.fs.open(self.uri, "rb", **options) as src:
            while block := src.read(CHUNK):
                digest.update(block)
                out.write(block)
                size += len(block)
        return digest.hexdigest(), size

    def _retrying(self, call: Callable[[], T]) -> T:
        """HTTP clients do not retry: a connection failure or a 5xx is tried `attempts` times in all, with a
        short doubling delay. S3 retries inside botocore (standard mode), gcsfs and adlfs in their clients."""
        tries = self.attempts if self.kind in WEB else 1
        for attempt in range(1, tries):
            try:
                return call()
            except Exception as exc:
                if not _transient(exc):
                    raise
            time.sleep(HTTP_RETRY_DELAY * 2 ** (attempt - 1))
        return call()

    @contextlib.contextmanager
    def _refusals(self) -> Iterator[None]:
        try:
            yield
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"data.path {self.uri}: {self._why(exc)}") from None

    def _why(self, exc: Exception) -> str:
        """The one-line reason: what failed and what to do, never a key or a secret."""
        from botocore.exceptions import NoCredentialsError

        status, code = _status(exc), _error_code(exc)
        if type(exc).__name__ == "FileExpired" or status == 412 or code == "PreconditionFailed":
            return "the object changed while it was downloaded; nothing was kept, run again once it is written"
        if isinstance(exc, NoCredentialsError):
            return "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile)"
        if self.kind in WEB and status:
            return f"HTTP {status} {_reason(exc)}".rstrip()
        if isinstance(exc, PermissionError):
            hint = "; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" if self.kind == "s3" else ""
            return f"credentials refused ({code or 'access denied'}){hint}"
        if _unreachable(exc):
            where = self.endpoint if self.kind == "s3" else urlsplit(self.uri).netloc
            return f"cannot reach {where or 'the S3 endpoint of the default region'} after {self.attempts} attempt(s)"
        if isinstance(exc, FileNotFoundError):
            return self._missing(code)
        return f"{type(exc).__name__}: {' '.join(str(exc).split())}"

    def _missing(self, code: str) -> str:
        parts = urlsplit(self.uri)
        bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
        holder = "container" if self.kind in ("az", "abfs") else "bucket"
        if code == "NoSuchBucket":
            return f"{holder} {bucket!r} does not exist"
        return f"no object {key!r} in {holder} {bucket!r}"


def _filesystem(uri: str, kind: str, endpoint: str | None, attempts: int):
    """The scheme's fsspec filesystem: s3 with the store's endpoint and retries; gs and az need their extra."""
    import fsspec

    options: dict[str, Any] = {}
    if kind == "s3":
        options = {
            "endpoint_url": endpoint,
            "config_kwargs": s3_settings.client_settings(endpoint, attempts),
        }
    try:
        # fsspec keeps one instance per set of options, so the skip check's HEAD and ingest's share a client
        # (making one costs more than the requests); _head invalidates its listing cache before each HEAD.
        return fsspec.filesystem(kind, **options)
    except ImportError:
        if kind not in EXTRAS:
            raise
        package, extra = EXTRAS[kind]
        raise DataError(f"data.path {uri}: reading {kind}:// needs {package}: install trainyard[{extra}]") from None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it was raised from (fsspec wraps the client's error in FileNotFoundError)."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__


def _status(exc: BaseException) -> int:
    """The HTTP status an aiohttp error carries (0 when none)."""
    from aiohttp import ClientResponseError

    return next((e.status for e in _causes(exc) if isinstance(e, ClientResponseError)), 0)


def _reason(exc: BaseException) -> str:
    from aiohttp import ClientResponseError

    return next((str(e.message) for e in _causes(exc) if isinstance(e, ClientResponseError)), "")


def _error_code(exc: BaseException) -> str:
    """The S3 error code (NoSuchBucket, InvalidAccessKeyId, ...) of a botocore error, '' when none."""
    from botocore.exceptions import ClientError

    for e in _causes(exc):
        if isinstance(e, ClientError):
            return str(e.response.get("Error", {}).get("Code", ""))
    return ""


def _unreachable(exc: BaseException) -> bool:
    """The endpoint did not answer: connection refused, a DNS failure, a connect timeout."""
    from aiohttp import ClientConnectionError, ServerTimeoutError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    kinds = (ClientConnectionError, ServerTimeoutError, BotoConnectionError, ConnectionError, TimeoutError)
    return any(isinstance(e, kinds) for e in _causes(exc))


def _transient(exc: BaseException) -> bool:
    """Worth trying again: the server did not answer, or answered 5xx. Not 4xx."""
    return _unreachable(exc) or _status(exc) >= 500


def _describe(identity: Identity) -> str:
    return f"version {identity.tag or '?'}, {identity.size if identity.size >= 0 else '?'} bytes"


def _entry_dir(state_root: Path, uri: str, identity: Identity) -> Path:
    """`<state>/sources/<uri digest>/<identity digest>/`: a folder per URI, an entry per version of it."""
    where = hashlib.sha256(uri.encode()).hexdigest()[:16]
    which = hashlib.sha256(f"{identity.tag}\n{identity.size}".encode()).hexdigest()[:16]
    return state_root / SOURCES_DIR / where / which


def _file_name(uri: str) -> str:
    """The object's own name (its suffix tells ingest the format and the compression), made safe for a file."""
    name = unquote(urlsplit(uri).path.rstrip("/").rsplit("/", 1)[-1])
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "data"


def _cached(entry: Path, uri: str, identity: Identity) -> tuple[Path, str] | None:
    """The complete copy of this version of `uri`, with its recorded sha256; None when there is none."""
    if not identity.known:
        return None
    try:
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    copy = entry / _file_name(uri)
    same = meta.get("uri") == uri and meta.get("tag") == identity.tag and meta.get("size") == identity.size
    if not same or not copy.is_file() or copy.stat().st_size != identity.size:
        return None
    return copy, str(meta["sha256"])


def _write_meta(entry: Path, meta: dict[str, Any]) -> None:
    """Record the copy as complete: written under a temporary name and renamed, never half there."""
    fd, tmp = tempfile.mkstemp(prefix=f".{META}.", suffix=".part", dir=entry)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(meta, out, indent=2, sort_keys=True)
        os.replace(tmp, entry / META)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _prune(entry: Path) -> None:
    """Keep the newest copy of a URI only: the older versions' entries (and anything left of them) go."""
    for other in entry.parent.iterdir():
        if other != entry:
            shutil.rmtree(other, ignore_errors=True)
