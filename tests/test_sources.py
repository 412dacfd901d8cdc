"""A table on S3 (moto's server on 127.0.0.1) or on a web server (http.server, started here): ingested as
the local file is, downloaded once into the source cache, downloaded again when the object changes, and
every bad case one line naming the URI with nothing left marked complete."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import pytest
import torch

from pipelines.config import load_config
from tasks.errors import DataError
from tasks.ingest import identity, ingest
from tasks.prepared import load_prepared
from tasks.sources import META, fetch_source
from tests.conftest import REPO, cli_env, separable_frame, train_argv
from tests.services import FAKE_KEYS, free_port, s3_endpoint, wait_http

BUCKET = "trainyard-sources"
SETTINGS = ("data.target=label", "data.drop=[id]")


@pytest.fixture(scope="module")
def s3():
    with s3_endpoint(BUCKET) as endpoint:
        yield endpoint


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and counts the requests per method (the test's evidence of a download)."""

    counts: dict[str, int]
    hidden: set[str]  # response headers left out (e.g. last-modified)

    def do_GET(self):
        self.counts["GET"] = self.counts.get("GET", 0) + 1
        super().do_GET()

    def do_HEAD(self):
        self.counts["HEAD"] = self.counts.get("HEAD", 0) + 1
        super().do_HEAD()

    def send_header(self, keyword, value):
        if keyword.lower() not in self.hidden:
            super().send_header(keyword, value)

    def log_message(self, *args):
        pass


@pytest.fixture
def web(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www: (base URL, folder, request counts)."""
    folder = tmp_path / "www"
    folder.mkdir()
    counts: dict[str, int] = {}
    hidden: set[str] = set()
    handler = type("Handler", (CountingHandler,), {"counts": counts, "hidden": hidden})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", folder, counts, hidden
    server.shutdown()
    server.server_close()


def csv_bytes(n: int = 200, seed: int = 0) -> bytes:
    return separable_frame(n, seed).to_csv(index=False).encode()


def put(s3, key: str, body: bytes) -> str:
    boto3.client("s3", endpoint_url=s3.url).put_object(Bucket=BUCKET, Key=key, Body=body)
    return f"s3://{BUCKET}/{key}"


def cfg_for(path: str, endpoint: str = "", *extra: str):
    endpoint_setting = [f"storage.endpoint_url={endpoint}"] if endpoint else []
    return load_config("csv", overrides=[f"data.path={path}", *SETTINGS, *endpoint_setting, *extra], env={})


def complete_copies(state: Path) -> list[Path]:
    """The source cache's entries marked complete (their source.json)."""
    return sorted((state / "sources").glob(f"*/*/{META}"))


def leftovers(state: Path) -> list[Path]:
    return sorted((state / "sources").glob("*/*/.*.part"))


def test_s3_and_http_ingest_to_the_same_tensors_as_the_local_file(s3, web, tmp_path):
    body = csv_bytes()
    local = tmp_path / "table.csv"
    local.write_bytes(body)
    base, folder, _, _ = web
    (folder / "table.csv").write_bytes(body)
    uri = put(s3, "tables/table.csv", body)
    refs = {}
    for name, path in (("local", str(local)), ("s3", uri), ("http", f"{base}/table.csv")):
        cfg = cfg_for(path, s3.url)
        refs[name] = ingest(cfg.data, tmp_path / name, storage=cfg.storage)
        assert refs[name].uri == path and not refs[name].reused
    assert refs["local"].content_hash == hashlib.sha256(body).hexdigest()
    assert {r.content_hash for r in refs.values()} == {refs["local"].content_hash}
    assert {r.key for r in refs.values()} == {refs["local"].key}  # the same prepared dataset
    expected = load_prepared(refs["local"].path).tensors
    for name in ("s3", "http"):
        got = load_prepared(refs[name].path).tensors
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), name
    # the remote copies are in the state folder's cache, complete, with their bytes' sha256 beside them
    for name in ("s3", "http"):
        (meta,) = complete_copies(tmp_path / name)
        assert json.loads(meta.read_text())["sha256"] == refs["local"].content_hash


def test_s3_copy_is_reused_while_unchanged_and_replaced_when_it_changes(s3, tmp_path):
    uri = put(s3, "cache/t.csv", csv_bytes(50))
    cfg = cfg_for(uri, s3.url)
    path, sha = fetch_source(uri, tmp_path, cfg.storage)
    before = path.stat()
    again, sha_again = fetch_source(uri, tmp_path, cfg.storage)
    after = again.stat()
    assert (again, sha_again) == (path, sha)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not downloaded again
    assert identity(cfg.data, tmp_path, cfg.storage)[1] == sha  # the skip check's identity: the same copy
    assert path.stat().st_ino == before.st_ino
    changed = csv_bytes(60, seed=1)
    put(s3, "cache/t.csv", changed)
    new_path, new_sha = fetch_source(uri, tmp_path, cfg.storage)
    assert new_path != path and new_sha == hashlib.sha256(changed).hexdigest()
    assert new_path.read_bytes() == changed
    assert not path.exists() and complete_copies(tmp_path) == [new_path.parent / META]  # the older copy went
    assert not leftovers(tmp_path)


def test_http_copy_is_downloaded_once_and_again_when_it_changes(web, tmp_path):
    base, folder, counts, _ = web
    (folder / "t.csv").write_bytes(csv_bytes(40))
    uri = f"{base}/t.csv"
    path, sha = fetch_source(uri, tmp_path)
    assert counts["GET"] == 1 and sha == hashlib.sha256(csv_bytes(40)).hexdigest()
    heads = counts["HEAD"]
    assert fetch_source(uri, tmp_path) == (path, sha)
    assert counts["GET"] == 1 and counts["HEAD"] > heads  # only asked whether it changed
    (folder / "t.csv").write_bytes(csv_bytes(80))
    new_path, new_sha = fetch_source(uri, tmp_path)
    assert counts["GET"] == 2 and new_sha == hashlib.sha256(csv_bytes(80)).hexdigest() != sha
    assert len(complete_copies(tmp_path)) == 1 and new_path.read_bytes() == csv_bytes(80)


def test_an_http_object_without_a_version_is_downloaded_every_run(web, tmp_path):
    base, folder, counts, hidden = web
    hidden.add("last-modified")  # no ETag either: http.server sends none
    (folder / "t.csv").write_bytes(csv_bytes(40))
    first = fetch_source(f"{base}/t.csv", tmp_path)
    assert fetch_source(f"{base}/t.csv", tmp_path) == first  # the same bytes, the same hash
    assert counts["GET"] == 2 and len(complete_copies(tmp_path)) == 1


def change_after_first_head(monkeypatch, rewrite):
    """The object is rewritten right after the first metadata request, while the download runs."""
    from tasks import sources

    real, calls = sources._Reader._head, []

    def head(self):
        answer = real(self)
        calls.append(answer)
        if len(calls) == 1:
            rewrite()
        return answer

    monkeypatch.setattr(sources._Reader, "_head", head)


@pytest.mark.parametrize("where", ["s3", "http"])
def test_an_object_that_changes_during_the_download_is_refused(where, s3, web, tmp_path, monkeypatch):
    base, folder, _, _ = web
    if where == "s3":
        uri = put(s3, "moving/t.csv", csv_bytes(30))
        rewrite = functools.partial(put, s3, "moving/t.csv", csv_bytes(90, seed=2))
    else:
        (folder / "t.csv").write_bytes(csv_bytes(30))
        uri = f"{base}/t.csv"
        rewrite = functools.partial((folder / "t.csv").write_bytes, csv_bytes(90, seed=2))
    storage = cfg_for(uri, s3.url).storage
    change_after_first_head(monkeypatch, rewrite)
    with pytest.raises(DataError) as err:
        fetch_source(uri, tmp_path, storage)
    message = str(err.value)
    assert message.startswith(f"data.path {uri}: the object changed while it was downloaded") and "\n" not in message
    assert not complete_copies(tmp_path) and not leftovers(tmp_path)
    assert not list((tmp_path / "sources").glob("*/*/t.csv"))  # nothing half-downloaded under the final name
    monkeypatch.undo()
    path, sha = fetch_source(uri, tmp_path, storage)  # once it stays put, it is read
    assert sha == hashlib.sha256(csv_bytes(90, seed=2)).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


def refused(uri: str, storage, state: Path, *fragments: str) -> str:
    with pytest.raises(DataError) as err:
        fetch_source(uri, state, storage)
    message = str(err.value)
    assert message.startswith(f"data.path {uri}") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert not complete_copies(state) and not leftovers(state)
    return message


def test_a_missing_object_or_bucket_names_bucket_and_key(s3, tmp_path):
    storage = cfg_for(f"s3://{BUCKET}/x.csv", s3.url).storage
    refused(f"s3://{BUCKET}/no/such.csv", storage, tmp_path, f"no object 'no/such.csv' in bucket '{BUCKET}'")
    refused("s3://no-such-bucket/t.csv", storage, tmp_path, "bucket 'no-such-bucket' does not exist")


def test_an_unreachable_endpoint_fails_after_the_attempts(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    storage = cfg_for(f"s3://{BUCKET}/t.csv", dead, "storage.max_attempts=2").storage
    refused(f"s3://{BUCKET}/t.csv", storage, tmp_path, f"cannot reach {dead} after 2 attempt(s)")
    refused(f"{dead}/t.csv", storage, tmp_path, f"cannot reach {dead.split('//')[1]} after 2 attempt(s)")


def test_an_http_404_is_one_line(web, tmp_path):
    base, _, _, _ = web
    refused(f"{base}/missing.csv", None, tmp_path, "HTTP 404")


def test_refused_credentials_are_one_line_without_the_keys(tmp_path, monkeypatch):
    for key, value in {**FAKE_KEYS, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0"),  # every request is checked, and these keys fail
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", proc=proc)
        storage = cfg_for("s3://any-bucket/t.csv", f"http://127.0.0.1:{port}", "storage.max_attempts=1").storage
        message = refused("s3://any-bucket/t.csv", storage, tmp_path, "credentials refused")
        assert FAKE_KEYS["AWS_SECRET_ACCESS_KEY"] not in message and FAKE_KEYS["AWS_ACCESS_KEY_ID"] not in message
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("uri", "extra"), [("gs://bucket/t.csv", "trainyard[gcs]"), ("az://container/t.csv", "trainyard[azure]")]
)
def test_gs_and_az_without_their_extra_say_what_to_install(uri, extra, tmp_path):
    import importlib.util

    assert importlib.util.find_spec("gcsfs") is None and importlib.util.find_spec("adlfs") is None
    cfg = cfg_for(uri)  # the config takes it: the worker that reads it may have the extra
    with pytest.raises(DataError) as err:
        ingest(cfg.data, tmp_path, storage=cfg.storage)
    assert (
        str(err.value)
        == f"data.path {uri}: reading {uri.split(':')[0]}:// needs "
        + ("gcsfs" if extra.endswith("[gcs]") else "adlfs")
        + f": install {extra}"
    )


def test_an_unknown_scheme_is_refused_with_the_supported_ones(tmp_path):
    from pipelines.config import ConfigError

    with pytest.raises((ConfigError, ValueError)) as err:
        cfg_for("ftp://host/t.csv")
    message = str(err.value)
    assert "data.path" in message and "scheme ftp:// is not supported" in message
    assert "s3://, gs://, az://, abfs://, http:// or https://" in message
    refused("ftp://host/t.csv", None, tmp_path, "scheme ftp:// is not supported", "a local path, file://")
    for path, words in (
        ("s3://bucket-only", "expected s3://<bucket>/<name of the file>"),
        ("https://user:secret@host/t.csv", "data.path must not hold credentials"),
    ):
        with pytest.raises(ConfigError) as err:
            cfg_for(path)
        assert words in str(err.value) and "secret" not in str(err.value).replace(words, "")


def test_a_refusal_of_the_table_itself_names_the_uri_not_the_cached_copy(s3, tmp_path):
    uri = put(s3, "bad/no-target.csv", b"x1,x2\n1,2\n3,4\n")
    cfg = cfg_for(uri, s3.url)
    with pytest.raises(DataError) as err:
        ingest(cfg.data, tmp_path, storage=cfg.storage)
    message = str(err.value)
    assert uri in message and str(tmp_path) not in message and "'label'" in message, message


@pytest.mark.usefixtures("prefect_harness")
def test_train_on_s3_then_skip_when_unchanged(s3, tmp_path):
    """`trainyard train --set data.path=s3://...`: the first run trains and becomes champion; the second finds
    the object unchanged (one HEAD, no download) and skips."""
    body = csv_bytes(300)
    uri = put(s3, "retrain/retrain.csv", body)
    home = tmp_path / "home"
    env = cli_env(home, harness_api=True, AWS_ENDPOINT_URL=s3.url, TRAINYARD_GIT_SHA="0123456789abcdef", **FAKE_KEYS)
    argv = train_argv(f"data.path={uri}", *SETTINGS, "train.epochs=2", "tracking.log_model=true", json=True)
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout)
    assert summary["dataset"]["uri"] == uri and summary["dataset"]["content_hash"] == hashlib.sha256(body).hexdigest()
    (meta,) = complete_copies(home)
    copy = meta.parent / "retrain.csv"
    before = copy.stat()
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert second.returncode == 0, second.stderr[-3000:]
    skipped = json.loads(second.stdout)
    assert skipped.get("skipped"), f"the second run trained again: {second.stderr[-3000:]}"
    assert skipped["reason"].startswith(f"data {summary['dataset']['content_hash'][:12]}")
    assert (copy.stat().st_ino, copy.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
