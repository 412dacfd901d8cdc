"""Real service processes on 127.0.0.1 for the service tests: an S3 endpoint (moto's
standalone server), a PostgreSQL database of our own, `mlflow server` and `mlflow models serve`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
FAKE_KEYS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKETESTKEY00001",
    "AWS_SECRET_ACCESS_KEY": "fake/secret/key/for/tests/only/000000000",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class S3Endpoint:
    """moto's ThreadedMotoServer; stop() and start() again keep the buckets (moto's state is in-process)."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        wait_http(self.url + "/moto-api/")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@contextmanager
def s3_endpoint(*buckets: str):
    """A started S3Endpoint with `buckets`, the fake keys in the environment and AWS_ENDPOINT_URL unset
    meanwhile (the environment as it was afterwards)."""
    import boto3

    names = (*FAKE_KEYS, "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(FAKE_KEYS, AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("AWS_ENDPOINT_URL", None)
    endpoint = S3Endpoint()
    endpoint.start()
    try:
        client = boto3.client("s3", endpoint_url=endpoint.url)
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        endpoint.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def postgres_database(prefix: str = "trainyard_test"):
    """A fresh database, dropped afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}", name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def mlflow_server(backend_uri: str, artifacts_destination: str, s3_endpoint: str, log_path: Path, port: int = 0):
    """`mlflow server` with a database backend and proxied S3 artifacts; its clients need no S3 keys."""
    port = port or free_port()
    env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=s3_endpoint, AWS_DEFAULT_REGION="us-east-1", **FAKE_KEYS)
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    cmd = [
        exe,
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
            yield f"http://127.0.0.1:{port}", proc
        finally:
            stop_group(proc)


@contextmanager
def model_server(model_uri: str, tracking_uri: str, log_path: Path, workers: int = 1):
    """`mlflow models serve` of `model_uri` in this environment (--env-manager local) on 127.0.0.1; yields its URL."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # MLflow starts `uvicorn` by name: this environment's, as activated
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    exe = shutil.which("mlflow", path=bin_dir) or "mlflow"
    cmd = [exe, "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*cmd, "--workers", str(workers)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=proc)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_group(proc)


@contextmanager
def prefect_server(database_url: str, home: Path, log_path: Path):
    """`prefect server start` on 127.0.0.1, on a PostgreSQL database, as in the deploy stack."""
    port = free_port()
    env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=database_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
    )
    env.pop("PREFECT_API_URL", None)
    exe = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [exe, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/api/health", timeout=180, proc=proc)
            yield f"http://127.0.0.1:{port}/api"
        finally:
            stop_group(proc)


@contextmanager
def prefect_worker(api_url: str, pool: str, env_extra: dict[str, str], log_path: Path, limit: int = 1):
    env = dict(
        os.environ,
        PREFECT_API_URL=api_url,
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_EXTRA_LOGGERS="trainyard",
        **env_extra,
    )
    exe = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [exe, "worker", "start", "--pool", pool, "--limit", str(limit), "--type", "process"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
