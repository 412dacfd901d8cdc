"""Start-up of `trainyard train`: everything between parsing the command line and the flow's first
task, and the private library hooks that make a run quick, behind one switch.

With start-up tuning on (the default):
- the embedded Prefect server (pipelines/embedded_prefect.py; there is one when no PREFECT_API_URL
  is configured) is spawned first and starts while the flow's modules are imported;
- the flow is imported with what its steps import later (MLflow's client and its database store,
  torch, the evaluation's torchmetrics), so those imports overlap the server's start too;
- the garbage collector is paused over those imports and what they made is frozen (moved out of
  the collector's generations), and frozen again before the command exits: the collections would
  walk millions of long-lived objects and free nothing;
- runs on the embedded server send no flow-run heartbeats (the server ends with the process);
- MLflow's model logging skips MLflow's scan of every installed distribution while it checks the
  pinned requirements.

TRAINYARD_STARTUP_TUNING=0 turns all of it off: the embedded server is started and waited for
before the flow is imported, nothing is imported early, the collector is left alone, Prefect sends
its default heartbeats, and MLflow is used through its public API only.

The private hooks (MLflow's `requirements_utils._MODULES_TO_PACKAGES` and `_PACKAGES_TO_MODULES`;
Prefect's own command line for its temporary server, which pipelines/embedded_prefect.py repeats)
were checked against prefect 3.9.1 and mlflow 3.17.2.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.config import TrainConfig
    from pipelines.embedded_prefect import EmbeddedPrefect

SWITCH = "TRAINYARD_STARTUP_TUNING"
_OFF = ("0", "false", "no", "off")


def tuning_on(env: dict[str, str] | None = None) -> bool:
    """Whether start-up tuning is on: TRAINYARD_STARTUP_TUNING unset or anything but 0/false/no/off."""
    env = os.environ if env is None else env
    return env.get(SWITCH, "").strip().lower() not in _OFF


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with the garbage collector paused, then freeze what it made.

    Garbage from before the block is collected first (cheap at a command's start; in a
    longer-lived caller it keeps earlier garbage from being frozen). The few import-time cycles
    that become garbage stay in memory.
    """
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def import_flow(cfg: TrainConfig, early: bool = True):
    """The flow; with `early`, also what its steps import where they first run (MLflow's client and,
    for a database tracking URI, its database store; the evaluation's torchmetrics)."""
    from pipelines.flow import train_flow

    if not early:
        return train_flow
    import mlflow.tracking  # noqa: F401
    import torchmetrics.functional  # noqa: F401
    from mlflow.store.db.db_types import DATABASE_ENGINES

    from pipelines.config import resolve_tracking_uri

    if resolve_tracking_uri(cfg.tracking.uri).split(":", 1)[0].split("+", 1)[0] in DATABASE_ENGINES:
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    return train_flow


def _start_server() -> EmbeddedPrefect | None:
    """Spawn the embedded Prefect server when no PREFECT_API_URL is configured; it stops at exit."""
    import atexit

    from pipelines import embedded_prefect

    server = embedded_prefect.start_if_needed()
    if server is not None:
        atexit.register(server.stop)  # after Prefect's log and event workers have drained
    return server


def _prefect_settings(api_url: str, tuned: bool) -> contextlib.AbstractContextManager:
    """The Prefect settings the flow runs under: the embedded server's API URL, when there is one."""
    if not api_url:
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines import embedded_prefect

    updates = embedded_prefect.run_settings(api_url) if tuned else {PREFECT_API_URL: api_url}
    return temporary_settings(updates=updates)


def prefect_environment() -> None:
    """Prefect settings of a command-line run, as defaults the environment may override; set before
    Prefect is imported, which reads them once."""
    # Our loggers' records go through Prefect's handlers (console and the run's log in the UI).
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "trainyard")
    # The embedded Prefect server's usage telemetry is noise here (and races on its SQLite file).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Several runs starting at once on a small machine start slowly; Prefect's default is 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@contextlib.contextmanager
def flow_ready(cfg: TrainConfig) -> Iterator:
    """The training flow, imported, with a Prefect API to run on for the length of the block."""
    prefect_environment()
    tuned = tuning_on()
    if tuned:
        with collector_paused():
            server = _start_server()
            train_flow = import_flow(cfg)
        api_url = server.wait() if server is not None else ""
    else:
        server = _start_server()
        api_url = server.wait() if server is not None else ""
        train_flow = import_flow(cfg, early=False)
    with _prefect_settings(api_url, tuned):
        yield train_flow


def before_exit() -> None:
    """Freeze what the run left behind, so the interpreter's last collection skips it (tuning only).

    Every file the run writes is closed before this; exit handlers still run.
    """
    if tuning_on():
        gc.freeze()


def model_logging(uri: str) -> contextlib.AbstractContextManager:
    """What MLflow's model logging runs in: its fluent API pointed at `uri` and put back afterwards,
    and, with tuning on, without MLflow's scan of every installed distribution."""
    from tasks import tracking

    if not tuning_on():
        return tracking.fluent_uris(uri)
    return _tuned_model_logging(uri)


@contextlib.contextmanager
def _tuned_model_logging(uri: str) -> Iterator[None]:
    """`tracking.fluent_uris` and `_no_distribution_scan` together."""
    from tasks import tracking

    with tracking.fluent_uris(uri), _no_distribution_scan():
        yield


@contextlib.contextmanager
def _no_distribution_scan() -> Iterator[None]:
    """Spare MLflow's scan of every installed distribution while it checks our requirements.

    log_model checks the requirements it is given against this environment. First it maps every
    installed distribution's files to top-level modules, a map it uses only when a requirement's
    version cannot be read from the distribution's metadata, which never happens for the
    torch/torchvision pins passed here (for a package that is missing, the check still reports
    it). For the call, the map is set empty; afterwards it is put back unbuilt, so that later
    requirement inference in this process builds it whole. Nothing changes where this MLflow
    keeps no such map.
    """
    try:
        from mlflow.utils import requirements_utils as ru
    except ImportError:
        yield
        return
    if getattr(ru, "_MODULES_TO_PACKAGES", "absent") is not None:  # already built, or no such map
        yield
        return
    saved = getattr(ru, "_PACKAGES_TO_MODULES", None)
    ru._MODULES_TO_PACKAGES = {}
    try:
        yield
    finally:
        ru._MODULES_TO_PACKAGES = None
        ru._PACKAGES_TO_MODULES = saved
