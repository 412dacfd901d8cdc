"""The embedded Prefect server that `trainyard train` starts early, and the command's exit."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import embedded_prefect
from pipelines.embedded_prefect import EmbeddedPrefect

REPO = Path(__file__).resolve().parents[1]


class ScriptedServer(EmbeddedPrefect):
    """Spawns a stand-in script instead of uvicorn; the first one may 'lose' its port (exit 3)."""

    def __init__(self, home: Path, scripts: list[str], timeout: float = 30):
        super().__init__(home, {}, timeout)
        self.scripts = scripts
        self.spawned = 0

    def _spawn(self) -> None:
        self.port = embedded_prefect._free_port()
        script = self.scripts[min(self.spawned, len(self.scripts) - 1)].replace("PORT", str(self.port))
        self.spawned += 1
        self.process = subprocess.Popen([sys.executable, "-c", script])


HEALTHY = """
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/api/health" else 404); self.end_headers(); self.wfile.write(b"true")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", PORT), H).serve_forever()
"""


def lock_is_free(home: Path) -> bool:
    with open(home / "trainyard-embedded-server.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_wait_returns_the_api_url_once_healthy_then_stop_ends_the_process(tmp_path):
    server = ScriptedServer(tmp_path, [HEALTHY]).start()
    try:
        assert not lock_is_free(tmp_path)  # held while the server starts
        url = server.wait()
        assert url == f"http://127.0.0.1:{server.port}/api"
        assert lock_is_free(tmp_path)
        process = server.process
        server.stop()
        assert process.poll() is not None and server.process is None
    finally:
        server.stop()  # a failed check must not leave the stand-in serving


def test_a_lost_port_is_retried_on_another_one(tmp_path):
    server = ScriptedServer(tmp_path, ["import sys; sys.exit(3)", HEALTHY]).start()
    try:
        server.wait()
        assert server.spawned == 2
    finally:
        server.stop()


def test_a_server_that_exits_is_reported_and_the_lock_released(tmp_path):
    server = ScriptedServer(tmp_path, ["import sys; sys.exit(1)"]).start()
    with pytest.raises(RuntimeError, match="exited with status 1 before it answered"):
        server.wait()
    assert lock_is_free(tmp_path) and server.process is None


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path):
    server = ScriptedServer(tmp_path, ["import time; time.sleep(60)"], timeout=1).start()
    process = server.process
    with pytest.raises(RuntimeError, match=r"did not answer on http://127\.0\.0\.1:\d+/api within 1 s"):
        server.wait()
    assert process.poll() is not None and lock_is_free(tmp_path)


def test_no_embedded_server_when_an_api_url_is_configured():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert embedded_prefect.start_if_needed() is None


def test_runs_on_the_embedded_server_send_no_heartbeats(prefect_harness, monkeypatch):
    """The server ends with the process; heartbeats would only cost the join at the run's end."""
    import threading

    from prefect import flow, flow_engine
    from prefect.settings import get_current_settings, temporary_settings

    beat = threading.Event()
    monkeypatch.setattr(flow_engine.FlowRunEngine, "_emit_flow_run_heartbeat", lambda self, *a: beat.set())

    @flow
    def wait_for_a_heartbeat(seconds: float) -> bool:
        return beat.wait(seconds)

    assert wait_for_a_heartbeat(30)  # control: the harness's settings send one at the start
    beat.clear()
    api = get_current_settings().api.url
    with temporary_settings(updates=embedded_prefect.run_settings(api)):
        assert get_current_settings().api.url == api
        assert not wait_for_a_heartbeat(1.5)


@pytest.mark.parametrize("collector_on", [True, False])
def test_the_flow_is_imported_then_its_objects_frozen_and_the_collector_left_as_it_was(collector_on, state_home):
    import gc

    from pipelines import startup
    from pipelines.config import load_config

    was = gc.isenabled()
    (gc.enable if collector_on else gc.disable)()
    try:
        with startup.collector_paused():
            assert not gc.isenabled()
            train_flow = startup.import_flow(load_config("mnist"))  # tracking: the state folder's SQLite file
        assert gc.isenabled() is collector_on
        assert gc.get_freeze_count() > 0
        assert train_flow.name == "trainyard-train"
        assert {"mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "torchmetrics.functional"} <= set(
            sys.modules
        )
    finally:
        gc.unfreeze()
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("argv, code", [(["config", "--preset", "mnist"], 0), (["train"], 2)])
def test_the_command_exits_with_mains_status(argv, code):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == code, proc.stderr
    if code == 0:
        assert "optim:" in proc.stdout
    else:
        assert "give --preset NAME or --config FILE" in proc.stderr


OWNER = """
import sys, time
from pathlib import Path
from pipelines.embedded_prefect import EmbeddedPrefect
home = Path(sys.argv[1])
settings = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
server = EmbeddedPrefect(home, settings, timeout=180).start()
print(server.process.pid, flush=True)
server.wait()
print("up", flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has ended
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_real_server_has_its_own_session_and_dies_with_its_owner(tmp_path):
    import os
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pid = int(owner.stdout.readline())
        assert owner.stdout.readline().strip() == "up"
        # Ctrl-C goes to the terminal's foreground process group: the server is not in it
        assert os.getsid(pid) != os.getsid(owner.pid) and os.getpgid(pid) != os.getpgid(owner.pid)
        owner.kill()  # no exit handler runs: only the parent-death signal can stop the server now
        owner.wait()
        deadline = time.monotonic() + 60
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(pid), f"the embedded server {pid} outlived its owner"
    finally:
        if owner.poll() is None:
            owner.kill()
