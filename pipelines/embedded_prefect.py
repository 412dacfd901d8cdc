"""Prefect's embedded (temporary) API server for a one-off `trainyard train`.

Without PREFECT_API_URL a run needs a server of its own. `EmbeddedPrefect.start()` spawns it
and returns at once, `wait()` blocks until its health check answers, so that the start can
overlap the imports (pipelines/startup.py decides). The command line is Prefect's own
(`SubprocessASGIServer`): uvicorn running `prefect.server.api.server:create_app` on 127.0.0.1,
UI off, on the SQLite database in PREFECT_HOME.

Runs started together share that database, so the server starts under a file lock in
PREFECT_HOME, held until it answers (its migrations are done by then).
"""

from __future__ import annotations

import fcntl
import functools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

PORTS = range(8000, 9000)
PORT_IN_USE = 3  # uvicorn's exit status when it cannot bind
APP = "prefect.server.api.server:create_app"
PR_SET_PDEATHSIG = 1

if sys.platform.startswith("linux"):
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it
else:  # elsewhere the server is stopped at exit only
    _prctl = None


def _die_with_parent(parent: int) -> None:
    """In the server's process, before it runs: end with its parent (SIGTERM when the parent dies,
    SIGKILL and crashes included), and exit at once if the parent is already gone."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)


def _free_port() -> int:
    """A port in PORTS that nothing listens on now (another process may still take it before uvicorn binds)."""
    for _ in range(20):
        port = random.choice(PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port for Prefect's embedded server in {PORTS.start}-{PORTS.stop - 1}")


class EmbeddedPrefect:
    """One temporary Prefect API server process, owned by this run."""

    def __init__(self, home: Path, settings_env: dict[str, str], timeout: float):
        self.home = home
        self.settings_env = settings_env
        self.timeout = timeout
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._lock: IO | None = None

    @property
    def api_url(self) -> str:
        """The server's API URL (its port is known once spawned)."""
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> None:
        """Start the uvicorn process on a free port."""
        import prefect

        self.port = _free_port()
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **self.settings_env,
        }
        app_dir = str(Path(prefect.__file__).resolve().parent.parent)
        command = [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory", APP]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            # Its own session: Ctrl-C in a terminal reaches this process only, which still needs the
            # server to record the run's end; the server is stopped at exit, or dies with this process.
            start_new_session=True,
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),
        )

    def start(self) -> EmbeddedPrefect:
        """Take the lock and spawn the server; do not wait for it."""
        self.home.mkdir(parents=True, exist_ok=True)
        # Held past this call, until the server answers: wait() or stop() closes it.
        self._lock = open(self.home / "trainyard-embedded-server.lock", "w")  # noqa: SIM115
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            self._spawn()
        except BaseException:
            self._release()
            raise
        return self

    def wait(self) -> str:
        """Block until the server's health check answers; return its API URL."""
        import httpx

        deadline = time.monotonic() + self.timeout
        try:
            with httpx.Client(timeout=5) as client:
                while True:
                    status = self.process.poll()
                    if status == PORT_IN_USE:  # another process took the port between the check and the bind
                        self._spawn()
                    elif status is not None:
                        raise RuntimeError(f"Prefect's embedded server exited with status {status} before it answered")
                    try:
                        if client.get(f"{self.api_url}/health").status_code == 200:
                            return self.api_url
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"Prefect's embedded server did not answer on {self.api_url} within {self.timeout:.0f} s"
                        )
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        finally:
            self._release()

    def _release(self) -> None:
        """Let the next run's server start: unlock and close the lock file."""
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def stop(self) -> None:
        """End the server (terminate, then kill after 5 s) and release the lock."""
        self._release()
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def run_settings(api_url: str) -> dict:
    """Prefect settings for a run on the embedded server at `api_url`.

    No flow-run heartbeats: they tell a long-lived server that a run's process is alive, and
    this server ends with the process. With them on, the flow engine also joins its heartbeat
    thread at the end of every run, which sleeps in steps of its own.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    return {PREFECT_API_URL: api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}


def start_if_needed() -> EmbeddedPrefect | None:
    """Spawn the embedded server when no PREFECT_API_URL is configured (env or profile); else None."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
    )

    if PREFECT_API_URL.value():
        return None
    settings_env = get_current_settings().to_environment_variables(exclude_unset=True)
    timeout = float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    return EmbeddedPrefect(Path(PREFECT_HOME.value()), settings_env, timeout).start()
